"""Attention kernel benchmark (CUDA): paged Triton kernels vs SDPA, the dense reference and HBM copy bandwidth.

Shapes are the 830M model's attention (16 heads x 96, G = H), bf16, paged with 16-token blocks:
- decode: batch x context for (a) a paper MTA-conv layer (6x11 pre and post conv, wpsm, all-head
  head_kernel; its decode rows finish their convs from a ConvState's partial sums, as in the engine;
  also without the state, recomputing the rows before them: "conv_recompute"), (b) a mixing-only layer
  (wpsm + head_kernel), (c) plain attention (paged flash kernel), and (d) torch SDPA on contiguous K/V;
- prefill of one whole prompt for (a), (b), (c) vs SDPA (flash, causal) and the dense reference
  (dense_attention.attention_probs, which materializes the T x T maps), each through the engine's prompt
  path ((b): the fused two-pass kernel, kernels/mixing_prefill.py), and (b) also through the row pipeline
  ("mixing_rows", its fallback); with --fused-sweep the fused kernel's tile configs and split counts, with
  --prompt-conv-sweep (a)'s prompt conv kernel's key tiles and warps;
Achieved bandwidth = bytes that must move (K and V once, the queries, the output) / time; the copy
bandwidth of a 2 GiB device-to-device copy is measured in the same run. Kernel times are CUDA-graph replays
(the kernels' device time, without Python's launch cost); the decode table and the --split-sweep,
--flash-tile-sweep, --mixing-decode-sweep and --conv-tile-sweep replay enough distinct layers' inputs in
turn that K and V come from HBM, as in a decode step (cold_copies).
Prints a table, writes JSON.

    python benchmarks/kernels.py [--out benchmarks/results/kernels_h200.json] [--quick] [--sweep [KIND ...]]
        [--breakdown] [--kernel-sweep] [--split-sweep] [--conv-split-sweep] [--conv-tile-sweep] [--flash-tile-sweep]
        [--mixing-decode-sweep] [--one-pass-sweep] [--fused-sweep]
        [--prompt-conv-sweep] [--no-dense] [--no-decode] [--no-prefill]
"""
from __future__ import annotations

import argparse
import functools
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton.testing

from common import commit, copy_bandwidth, write_result
from mta_serve.dense_attention import MTAWeights, attention_probs
from mta_serve.kernels import mta_attention
from mta_serve.kernels.mixing_prefill import mixing_prefill_attention
from mta_serve.kernels.mta_attention import ConvState, layer_params, mta_paged_attention
from mta_serve.kernels.paged_flash import paged_flash_attention
from mta_serve.kernels.work_items import build_work_items
from mta_serve.triton_attention import (FUSED_BLOCK_M, decode_splits, flash_block_n,  # the engine's rules
                                        flash_splits, fused_prompt_attention, fused_prompt_splits, mixing_decode)

HEADS, HEAD_DIM, BLOCK = 16, 96, 16
DTYPE = torch.bfloat16


def layer_weights(kind: str) -> MTAWeights | None:
    g = torch.Generator().manual_seed(0)
    eye = torch.eye(HEADS)
    if kind == "plain":
        return None
    w = MTAWeights(wpsm=eye + 0.1 * torch.randn(HEADS, HEADS, generator=g),
                   head_kernel=(eye + 0.1 * torch.randn(HEADS, HEADS, generator=g))[None])
    if kind == "conv":
        w.pre_kernel = torch.randn(HEADS, 1, 6, 11, generator=g) * 0.3
        w.post_kernel = torch.randn(HEADS, 1, 6, 11, generator=g) * 0.3
    return w


def paged_batch(batch: int, context: int, new_rows: int):
    """Caches for `batch` sequences of `context` tokens, each computing its last `new_rows` positions."""
    per_seq = -(-context // BLOCK)
    num_blocks = batch * per_seq
    shape = (num_blocks, BLOCK, HEADS, HEAD_DIM)
    kc, vc, qc = (torch.randn(shape, dtype=DTYPE, device="cuda") for _ in range(3))
    tables = torch.randperm(num_blocks, device="cuda").view(batch, per_seq).to(torch.int32)
    q = torch.randn(batch * new_rows, HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    starts = [context - new_rows] * batch
    rows = [i * new_rows for i in range(batch)]
    return q, qc, kc, vc, tables, starts, [context] * batch, rows


def run_paged(kind: str, inputs, block_m: int, splits: int, block: int | None = None, num_warps: int | None = None,
              decode_dot: bool = True, conv_state: bool = True, pv_in_cache_dtype: bool = False,
              num_stages: int = 2, conv_splits: int | None = None, stream_tile: int | None = None,
              one_pass: tuple[int, int] | None = None):
    """The engine's kernel for this layer kind: paged flash for plain layers, the MTA row pipeline else
    (for the conv layer with a ConvState slot per sequence, unless conv_state is False: decode rows then
    recompute the previous rows); "mixing_fused": the mixing layer's prompt groups through the fused
    two-pass kernel (kernels/mixing_prefill.py)."""
    q, qc, kc, vc, tables, starts, ends, rows = inputs
    state = None
    if kind == "conv" and conv_state:
        state = ConvState.allocate(len(starts), HEADS, 6, 6, max(ends), "cuda")
    work = build_work_items(tables, starts, ends, rows, block_m, splits, "cuda", states=list(range(len(starts))))
    out = torch.empty(q.shape, dtype=torch.float32, device="cuda")
    weights = layer_weights(kind.split("_")[0])
    if kind == "mixing_fused":
        params = layer_params(weights, "cuda")
        return lambda: mixing_prefill_attention(q, kc, vc, params, work, out, key_tile=block or 16,
                                                num_splits=splits, num_warps=num_warps or 4,
                                                pv_in_cache_dtype=pv_in_cache_dtype, num_stages=num_stages)
    if weights is None:
        return lambda: paged_flash_attention(q, kc, vc, work, out, block_n=block, num_warps=num_warps or 4,
                                             decode_dot=decode_dot, num_splits=splits)
    params = layer_params(weights, "cuda")
    q_cache = qc if kind == "conv" else None
    return lambda: mta_paged_attention(q, q_cache, kc, vc, params, work, out, key_tile=block, num_warps=num_warps,
                                       state=state, conv_splits=conv_splits, stream_tile=stream_tile,
                                       one_pass=one_pass)


def sweep(batch: int, context: int, kinds: list[str]) -> list[dict]:
    """Splits x key tile x warps for each decode kernel at one shape (what the engine's defaults rest on);
    for plain layers also decode rows as tl.dot tiles or as broadcast sums (paged_flash's decode_dot)."""
    inputs = paged_batch(batch, context, 1)
    rows = []
    for kind in kinds:
        for splits in (4, 8, 16, 32):
            for block in (32, 64, 128):
                for warps in (4, 8):
                    for dot in (True, False) if kind == "plain" else (True,):
                        ms = bench_ms(run_paged(kind, inputs, 1, splits, block, warps, decode_dot=dot))
                        rows.append(dict(kind=kind, splits=splits, block=block, warps=warps, ms=ms,
                                         **(dict(decode_dot=dot) if kind == "plain" else {})))
        best = min((r for r in rows if r["kind"] == kind), key=lambda r: r["ms"])
        print(f"sweep b={batch} ctx={context} {kind}: best {best}", flush=True)
    return rows


SPLIT_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


def split_sweep(batches, contexts, num_sms: int) -> list[dict]:
    """Decode time of each layer kind at every key-split count of SPLIT_COUNTS and at the engine's rule
    (what decode_splits, mixing_decode and flash_splits rest on; mixing layers at the engine's tiles)."""
    rows = []
    for batch in batches:
        for context in contexts:
            inputs = cold_batches(batch, context)
            for kind in ("conv", "mixing", "plain"):
                rule = engine_splits(kind, batch, context, num_sms)
                tiles = engine_tiles(kind, batch, context, num_sms)
                ms = {s: time_cold(kind, inputs, s, **tiles) for s in sorted(set(SPLIT_COUNTS) | {rule})}
                best = min(ms, key=ms.get)
                rows.append(dict(kind=kind, batch=batch, context=context, rule=rule, best=best, ms=ms))
                print(f"splits {kind} b={batch} ctx={context}: rule {rule} {ms[rule]:.4f} ms, best {best} "
                      f"{ms[best]:.4f} ms", flush=True)
            del inputs
            torch.cuda.empty_cache()
    return rows


FLASH_SPLITS, FLASH_TILES = (1, 2, 4, 8, 16, 32, 64), (64, 128)


def sweep_row(title: str, batch: int, context: int, ms: dict, rule: str, time_rule) -> dict:
    """A sweep's row at one shape: `ms` (config label -> ms) with the engine's choice, labelled `rule`,
    timed by time_rule() where the sweep's configs missed it, and the best label; printed."""
    if rule not in ms:
        ms[rule] = time_rule()
    best = min(ms, key=ms.get)
    print(f"{title} b={batch} ctx={context}: rule {rule} {1e3 * ms[rule]:.1f} us, best {best} "
          f"{1e3 * ms[best]:.1f} us", flush=True)
    return dict(batch=batch, context=context, rule=rule, best=best, ms=ms)


def flash_tile_sweep(num_sms: int, quick: bool) -> list[dict]:
    """(c)'s decode time at every key-split count x keys per tile (FLASH_SPLITS x FLASH_TILES; splits of
    fewer than half a tile's keys left out) at batches 1-256, against the engine's choice (flash_splits,
    flash_block_n: what they rest on). Keys of `ms`: "SxB", S splits of B-key tiles."""
    rows = []
    small = [512, 2048] if quick else [512, 1024, 2048, 4096, 8192]
    for batch in ([1, 64] if quick else [1, 2, 4, 8, 16, 32, 64, 256]):
        for context in (small if batch <= 16 else [512, 2048, 8192]):
            inputs = cold_batches(batch, context)
            ms = {f"{s}x{b}": time_cold("plain", inputs, s, b)
                  for s in FLASH_SPLITS for b in FLASH_TILES if context // s >= b // 2}
            splits, block = flash_splits(batch, context, HEADS, num_sms), flash_block_n(batch, HEADS, num_sms)
            rows.append(sweep_row("flash tiles", batch, context, ms, f"{splits}x{block}",
                                  lambda: time_cold("plain", inputs, splits, block)))
            del inputs
            torch.cuda.empty_cache()
    return rows


MIXING_DECODE_CONFIGS = [(s, kt, st) for s in (8, 16, 32, 64) for kt in (None, 32, 64) for st in (None, 64)]


def mixing_decode_sweep(num_sms: int, quick: bool) -> list[dict]:
    """(b)'s decode time at small batches at each of MIXING_DECODE_CONFIGS (key splits, key_tile, stream_tile;
    None: mta_paged_attention's default) and at the engine's choice (what mixing_decode rests on). Keys of
    `ms`: "S|K|T"."""
    rows = []
    shapes = [(1, 2048)] if quick else [(1, 512), (1, 2048), (1, 8192), (4, 2048), (16, 2048)]
    for batch, context in shapes:
        inputs = cold_batches(batch, context)
        ms = {f"{s}|{kt}|{st}": time_cold("mixing", inputs, s, kt, stream_tile=st)
              for s, kt, st in MIXING_DECODE_CONFIGS}
        splits = engine_splits("mixing", batch, context, num_sms)
        tiles = engine_tiles("mixing", batch, context, num_sms)
        rows.append(sweep_row("mixing decode", batch, context, ms, f"{splits}|{tiles['block']}|{tiles['stream_tile']}",
                              lambda: time_cold("mixing", inputs, splits, **tiles)))
        del inputs
        torch.cuda.empty_cache()
    return rows


# (key tile, key splits) of the mixing layer's one-pass decode form tried by --one-pass-sweep
ONE_PASS_CONFIGS = [(k, s) for k in (32, 64, 128) for s in (2, 4, 8, 16, 32)]


def one_pass_sweep(num_sms: int, quick: bool) -> list[dict]:
    """(b)'s decode time in the one-pass form at each of ONE_PASS_CONFIGS against the engine's choice (what
    triton_attention.mixing_decode's one-pass rule rests on), over cold_copies' inputs. Keys of `ms`:
    "K|S" (one pass, K-key tiles, S key splits) or "pipeline" (the four kernels at the engine's tiles); the
    row's `rule` names the engine's choice among them."""
    rows = []
    shapes = [(1, 2048)] if quick else [(1, 512), (1, 2048), (1, 8192), (2, 2048), (4, 2048), (8, 2048),
                                       (16, 2048), (64, 2048)]
    for batch, context in shapes:
        inputs = cold_batches(batch, context)
        splits = engine_splits("mixing", batch, context, num_sms)
        tiles = engine_tiles("mixing", batch, context, num_sms)
        ms = {f"{k}|{p}": time_cold("mixing", inputs, splits, one_pass=(k, p)) for k, p in ONE_PASS_CONFIGS}
        ms["pipeline"] = time_cold("mixing", inputs, splits, **dict(tiles, one_pass=None))
        rule = "{}|{}".format(*tiles["one_pass"]) if tiles["one_pass"] else "pipeline"
        rows.append(sweep_row("one pass", batch, context, ms, rule,
                              lambda: time_cold("mixing", inputs, splits, **tiles)))
        del inputs
        torch.cuda.empty_cache()
    return rows


CONV_SPLIT_COUNTS = [16, 32, 64]


def conv_split_sweep(batches, contexts, num_sms: int) -> list[dict]:
    """(a)'s decode time and its _logits / _probs times with those two kernels' key splits (conv_splits) at
    P'V's count (the engine's rule), at each of CONV_SPLIT_COUNTS and at mta_attention's default rule (what
    _ring_splits rests on)."""
    rows = []
    for batch in batches:
        for context in contexts:
            inputs = paged_batch(batch, context, 1)
            rule = engine_splits("conv", batch, context, num_sms)
            for label, conv_splits in [("pv_splits", rule), ("default", None)] + [(n, n) for n in CONV_SPLIT_COUNTS]:
                fn = run_paged("conv", inputs, 1, rule, conv_splits=conv_splits)
                times = kernel_times(fn)
                row = dict(batch=batch, context=context, splits=rule, conv_splits=label, ms=bench_ms(fn),
                           logits_us=times.get("_logits_kernel"), probs_us=times.get("_probs_kernel"))
                rows.append(row)
                print(f"conv splits b={batch} ctx={context} {label}: {row['ms']:.4f} ms, _logits "
                      f"{row['logits_us']:.0f} us, _probs {row['probs_us']:.0f} us", flush=True)
            del inputs
            torch.cuda.empty_cache()
    return rows


# (key tile, warps) of the decode conv and softmax kernels (_logits, _probs) tried by --conv-tile-sweep
CONV_TILE_CONFIGS = [(32, 4), (32, 8), (64, 4), (64, 8)]


def conv_tile_sweep(num_sms: int, quick: bool) -> list[dict]:
    """(a)'s decode time (with its ConvState) at each of CONV_TILE_CONFIGS for _logits and _probs (_pv in 2
    warps, the others in 4) and at mta_paged_attention's defaults ("engine"), every config timed twice,
    interleaved, over cold_copies' inputs: what mta_attention's RING_ONE_TILE_WARPS rests on. Keys of `ms`:
    "K|W" -> [ms, ms]."""
    rows = []
    batches = [1, 64] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    for batch in batches:
        for context in ([2048] if quick else [512, 2048, 8192]):
            inputs = cold_batches(batch, context)
            splits = engine_splits("conv", batch, context, num_sms)
            rule = "engine"  # mta_paged_attention's defaults
            configs = {f"{k}|{w}": dict(block=k, num_warps={"_pv_kernel": 2, "_logits_kernel": w, "_probs_kernel": w})
                       for k, w in CONV_TILE_CONFIGS}
            configs[rule] = engine_tiles("conv", batch, context, num_sms)
            ms: dict = {label: [] for label in configs}
            for _ in range(2):
                for label, config in configs.items():
                    ms[label].append(time_cold("conv", inputs, splits, **config))
            best = min(ms, key=lambda label: min(ms[label]))
            print(f"conv tiles b={batch} ctx={context}: rule {rule} "
                  f"{' / '.join(f'{1e3 * t:.1f}' for t in ms[rule])} us, best {best} "
                  f"{' / '.join(f'{1e3 * t:.1f}' for t in ms[best])} us", flush=True)
            rows.append(dict(batch=batch, context=context, splits=splits, rule=rule, best=best, ms=ms))
            del inputs
            torch.cuda.empty_cache()
    return rows


def engine_splits(kind: str, batch: int, context: int, num_sms: int) -> int:
    """The key splits the engine gives decode rows of this layer kind."""
    splits = decode_splits(batch, context, num_sms)
    return {"conv": splits, "mixing": mixing_decode(batch, splits, num_sms, context)["num_splits"],
            "plain": flash_splits(batch, context, HEADS, num_sms)}[kind]


def engine_tiles(kind: str, batch: int, context: int, num_sms: int) -> dict:
    """run_paged's tile arguments as the engine gives them to decode rows of this layer kind."""
    if kind == "plain":
        return dict(block=flash_block_n(batch, HEADS, num_sms))
    if kind == "mixing":
        tiles = mixing_decode(batch, decode_splits(batch, context, num_sms), num_sms, context)
        return dict(block=tiles.get("key_tile"), stream_tile=tiles.get("stream_tile"),
                    one_pass=tiles.get("one_pass"))
    return {}


def bench_ms(fn) -> float:
    """Device time per call, replayed from a CUDA graph as the engine runs decode steps: launched from
    Python, a batch-1 or mixing-layer call measured the ~50 us launch cost of each of its kernels instead
    (do_bench gave 0.45 ms for (b) at 64 x 2048 in one run and 0.30 ms in another)."""
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def kv_bytes(batch: int, context: int) -> int:
    """Bytes of K and V a decode layer reads (bf16)."""
    return 2 * batch * context * HEADS * HEAD_DIM * 2


def cold_copies(num_bytes: int) -> int:
    """How many distinct layers' inputs (K and V of `num_bytes` each) a decode timing cycles through: enough
    that their K and V together are four times the GPU's L2 cache, at most 32. In a decode step a layer's K
    and V come from HBM (the other layers' K and V and the weights have evicted them), but one layer
    replayed alone keeps small batches' K and V in L2: H200, 1 x 2048 (12.6 MB), (c) 8.0 us replayed against
    10.0 us cycling through 8 layers' inputs, (a) 22.0 against 28.1 (results/kernels_h200_decode_cold_l2.json)."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(32, -(-4 * l2 // num_bytes)))


def cold_batches(batch: int, context: int) -> list:
    """cold_copies' distinct decode inputs (paged_batch) of this shape."""
    return [paged_batch(batch, context, 1) for _ in range(cold_copies(kv_bytes(batch, context)))]


def time_cold(kind: str, inputs: list, *args, **kwargs) -> float:
    """bench_cold_ms of run_paged(kind, x, 1, *args, **kwargs) over each of `inputs`."""
    return bench_cold_ms([run_paged(kind, x, 1, *args, **kwargs) for x in inputs])


def bench_cold_ms(fns) -> float:
    """Device time per call of the layers `fns` (each over its own inputs) replayed in turn from one graph."""
    def every_layer():
        for fn in fns:
            fn()
    return bench_ms(every_layer) / len(fns)


def decode_rows(batches, contexts, copy_bw: float, num_sms: int) -> list[dict]:
    """The decode table, each layer timed over cold_copies' distinct inputs."""
    rows = []
    for batch in batches:
        for context in contexts:
            kv = kv_bytes(batch, context)
            inputs = cold_batches(batch, context)
            result = dict(batch=batch, context=context, kv_bytes=kv, copies=len(inputs))
            for kind in ("conv", "mixing", "plain"):
                splits = engine_splits(kind, batch, context, num_sms)
                tiles = engine_tiles(kind, batch, context, num_sms)
                ms = time_cold(kind, inputs, splits, **tiles)
                result[kind] = dict(ms=ms, splits=splits, gbps=kv / ms / 1e6,
                                    copy_fraction=kv / (ms * 1e-3) / copy_bw)
            ms = time_cold("conv", inputs, result["conv"]["splits"], conv_state=False)
            result["conv_recompute"] = dict(ms=ms, gbps=kv / ms / 1e6,
                                            copy_fraction=kv / (ms * 1e-3) / copy_bw)
            del inputs
            k = [torch.randn(batch, HEADS, context, HEAD_DIM, dtype=DTYPE, device="cuda")
                 for _ in range(result["copies"])]
            v = [torch.randn_like(x) for x in k]
            q = torch.randn(batch, HEADS, 1, HEAD_DIM, dtype=DTYPE, device="cuda")
            ms = bench_cold_ms([functools.partial(F.scaled_dot_product_attention, q, kx, vx) for kx, vx in zip(k, v)])
            result["sdpa"] = dict(ms=ms, gbps=kv / ms / 1e6, copy_fraction=kv / (ms * 1e-3) / copy_bw)
            del k, v
            torch.cuda.empty_cache()
            rows.append(result)
            print(f"decode b={batch:4d} ctx={context:5d}  " + "  ".join(
                f"{kind} {result[kind]['ms']:.3f} ms ({100 * result[kind]['copy_fraction']:.0f}% bw)"
                for kind in ("conv", "conv_recompute", "mixing", "plain", "sdpa")), flush=True)
    return rows


def peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# (rows, keys per tile, warps, P'V on P' in the cache dtype, buffers per key / value tile of the second pass)
# (H200, 830M heads, 8192 tokens, b93cffa: 16 x 16 x 8 warps x 2 buffers 26.1 ms on fp32 P', 8.96 ms on bf16 P';
# 4 warps 254 / 23.5 ms; 32 rows, 32 or 64 keys, or 3 buffers overflowed the shared memory)
FUSED_CONFIGS = ((16, 16, 8, False, 2), (16, 16, 8, True, 2), (16, 16, 16, True, 2), (16, 16, 8, True, 1),
                 (16, 32, 8, True, 1), (32, 16, 8, True, 1), (32, 16, 16, True, 1))
FUSED_SPLITS = (1, 2, 4, 8, 16)


def fused_prefill(inputs, length: int) -> dict:
    """The fastest of FUSED_CONFIGS for the mixing layer's fused prefill kernel, each with the engine's key
    splits (fused_prompt_splits), and the engine's config at each of FUSED_SPLITS; a config Triton cannot
    fit on the device is recorded as such."""
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    configs = []
    for rows, keys, warps, p16, stages in FUSED_CONFIGS:
        splits = fused_prompt_splits(-(-length // rows), length, num_sms)
        configs.append(fused_config(inputs, length, rows, keys, warps, p16, stages, splits))
    for splits in FUSED_SPLITS:
        configs.append(fused_config(inputs, length, FUSED_BLOCK_M, 16, 8, True, 2, splits))
    timed = [c for c in configs if "ms" in c]
    best = min(timed, key=lambda c: c["ms"]) if timed else {}
    return dict(ms=best.get("ms", float("nan")), best=best, configs=configs)


def fused_config(inputs, length: int, rows: int, keys: int, warps: int, p16: bool, stages: int,
                 splits: int) -> dict:
    config = dict(rows=rows, keys=keys, warps=warps, pv_in_cache_dtype=p16, stages=stages, splits=splits)
    try:
        config["ms"] = bench_ms(run_paged("mixing_fused", inputs, rows, splits, keys, warps,
                                          pv_in_cache_dtype=p16, num_stages=stages))
    except triton.runtime.errors.OutOfResources as exc:
        config["error"] = str(exc)
    print(f"mixing_fused T={length} {config}", flush=True)
    return config


def engine_prefill(kind: str, inputs, block_m: int):
    """The engine's prompt path for this layer kind (triton_attention): the MTA row pipeline in block_m-row
    groups for the conv layer (and for "mixing_rows", the mixing layer's fallback), the fused kernel with
    the engine's tiles and splits for the mixing layer, paged flash in 64-row tiles for the plain one."""
    if kind == "mixing":
        q, _, kc, vc, tables, starts, ends, rows = inputs
        work = build_work_items(tables, starts, ends, rows, FUSED_BLOCK_M, 1, "cuda")
        out = torch.empty(q.shape, dtype=torch.float32, device="cuda")
        params = layer_params(layer_weights("mixing"), "cuda")
        num_sms = torch.cuda.get_device_properties(0).multi_processor_count
        return lambda: fused_prompt_attention(q, kc, vc, params, work, out, num_sms)
    return run_paged(kind.split("_")[0], inputs, 64 if kind == "plain" else block_m, 1)


def prefill_rows(lengths, block_m: int, dense: bool, fused_sweep: bool) -> list[dict]:
    rows = []
    for length in lengths:
        inputs = paged_batch(1, length, length)
        result = dict(tokens=length)
        for kind in ("conv", "mixing", "mixing_rows", "plain"):
            fn = engine_prefill(kind, inputs, block_m)
            result[kind] = dict(ms=bench_ms(fn), peak_extra_bytes=peak_bytes(fn))
        if fused_sweep:
            result["mixing_fused_sweep"] = fused_prefill(inputs, length)
        q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, dtype=DTYPE, device="cuda") for _ in range(3))
        result["sdpa_flash"] = dict(ms=bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        if dense:
            weights = layer_weights("conv")
            weights = MTAWeights(**{s: (getattr(weights, s).cuda() if isinstance(getattr(weights, s), torch.Tensor)
                                        else getattr(weights, s)) for s in weights.__slots__})
            qd, kd = (t[0].transpose(0, 1).float() for t in (q, k))

            def dense_ref():
                return attention_probs(qd, kd, weights)

            dense_ref()  # the first call of a shape pays library setup; time the second
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dense_ref()
            torch.cuda.synchronize()
            result["dense_reference_conv"] = dict(ms=(time.perf_counter() - t0) * 1e3,
                                                  peak_extra_bytes=peak_bytes(dense_ref))
        del inputs, q, k, v
        torch.cuda.empty_cache()
        rows.append(result)
        print(f"prefill T={length:5d}  " + "  ".join(f"{k} {v['ms']:.2f} ms" for k, v in result.items()
                                                     if isinstance(v, dict)), flush=True)
    return rows


def kernel_times(fn, calls: int = 5) -> dict[str, float]:
    """Microseconds per call of each kernel `fn` launches, from the PyTorch profiler."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] = times.get(event.name, 0.0) + event.device_time / calls
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def breakdown(num_sms: int, block_m: int) -> list[dict]:
    """Per-kernel time of (a) and (b) at decode 64 x 2048 and prefill 8192; (a) at decode also without a
    ConvState ("conv_recompute"), (b) at prefill also through the row pipeline ("mixing_rows")."""
    rows = []
    for shape, (batch, context, new) in (("decode 64x2048", (64, 2048, 1)), ("prefill 8192", (1, 8192, 8192))):
        inputs = paged_batch(batch, context, new)
        for kind in ("conv", "conv_recompute", "mixing") if new == 1 else ("conv", "mixing", "mixing_rows"):
            if new == 1:
                splits = engine_splits(kind.split("_")[0], batch, context, num_sms)
                fn = run_paged(kind.split("_")[0], inputs, 1, splits, conv_state=kind == "conv",
                               **engine_tiles(kind.split("_")[0], batch, context, num_sms))
            else:
                fn = engine_prefill(kind, inputs, block_m)
            times = kernel_times(fn)
            rows.append(dict(shape=shape, kind=kind, kernels_us=times))
            print(f"breakdown {shape} {kind}: " + ", ".join(f"{k} {v:.0f} us" for k, v in times.items()),
                  flush=True)
        del inputs
        torch.cuda.empty_cache()
    return rows


def kernel_sweep(num_sms: int) -> list[dict]:
    """Per-kernel time of (a) at decode 64 x 2048 with every kernel at one warp count and _logits and _probs
    at one key tile (_scores and _pv keep their 128-key tiles): what mta_attention's DECODE_WARPS and decode
    tiles rest on."""
    inputs = paged_batch(64, 2048, 1)
    splits = engine_splits("conv", 64, 2048, num_sms)
    rows = []
    for block in (32, 64, 128):
        for warps in (2, 4, 8):
            times = kernel_times(run_paged("conv", inputs, 1, splits, block, warps))
            rows.append(dict(block=block, warps=warps, kernels_us=times))
            print(f"kernel sweep decode 64x2048 conv, {block}-key tiles, {warps} warps: "
                  + ", ".join(f"{k} {v:.0f} us" for k, v in times.items()), flush=True)
    return rows


# (key tile, warps) of _prompt_conv_kernel tried by --prompt-conv-sweep
PROMPT_CONV_CONFIGS = [(64, 1), (64, 2), (128, 1), (128, 2), (128, 4), (256, 2), (256, 4), (256, 8)]


def prompt_conv_sweep(lengths, block_m: int) -> list[dict]:
    """(a)'s prefill and per-kernel times with _prompt_conv_kernel at each of PROMPT_CONV_CONFIGS (what
    mta_attention.CONV_BN and PROMPT_WARPS rest on)."""
    rows, default = [], mta_attention.CONV_BN
    for length in lengths:
        inputs = paged_batch(1, length, length)
        for block, warps in PROMPT_CONV_CONFIGS:
            mta_attention.CONV_BN = block
            fn = run_paged("conv", inputs, block_m, 1, num_warps={"_prompt_conv_kernel": warps})
            row = dict(tokens=length, key_tile=block, warps=warps, ms=bench_ms(fn), kernels_us=kernel_times(fn, 3))
            rows.append(row)
            print(f"prompt conv sweep T={length} {block}-key tiles, {warps} warps: {row['ms']:.2f} ms, "
                  f"_prompt_conv_kernel {row['kernels_us']['_prompt_conv_kernel']:.0f} us", flush=True)
        mta_attention.CONV_BN = default
        del inputs
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/kernels_h200.json")
    p.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense reference (slow, tens of GB)")
    p.add_argument("--no-decode", action="store_true", help="skip the decode table")
    p.add_argument("--no-prefill", action="store_true", help="skip the prefill table")
    p.add_argument("--prefill-block-m", type=int, default=64)
    p.add_argument("--sweep", nargs="*", choices=["conv", "mixing", "plain"], default=None,
                   help="also sweep splits / tile / warps at batch 64 x 2048 for these layer kinds (all if none)")
    p.add_argument("--breakdown", action="store_true", help="also time each kernel of (a) and (b) at decode "
                   "64 x 2048 and prefill 8192 (PyTorch profiler)")
    p.add_argument("--fused-sweep", action="store_true", help="also time the fused mixing prompt kernel in "
                   "each of FUSED_CONFIGS and at each of FUSED_SPLITS")
    p.add_argument("--kernel-sweep", action="store_true", help="also time each kernel of (a) at decode "
                   "64 x 2048 at every warp count and conv/softmax key tile")
    p.add_argument("--split-sweep", action="store_true", help="also time every key-split count of (a), (b) "
                   "and (c) at each decode shape, against the engine's rules")
    p.add_argument("--flash-tile-sweep", action="store_true", help="also time (c) at every key-split count x "
                   "keys per tile at batches 1-256 (what flash_splits and flash_block_n rest on)")
    p.add_argument("--mixing-decode-sweep", action="store_true", help="also time (b) at small decode batches "
                   "at each of MIXING_DECODE_CONFIGS (key splits and tiles; what mixing_decode rests on)")
    p.add_argument("--one-pass-sweep", action="store_true", help="also time (b) at decode batches 1-64 in the "
                   "one-pass form at each of ONE_PASS_CONFIGS (what mixing_decode's one-pass rule rests on)")
    p.add_argument("--conv-split-sweep", action="store_true", help="also time (a) at each decode shape with "
                   "its conv and softmax kernels' key splits at each of CONV_SPLIT_COUNTS")
    p.add_argument("--conv-tile-sweep", action="store_true", help="also time (a) at decode batches 1-256 at "
                   "each of CONV_TILE_CONFIGS (its conv and softmax kernels' key tile and warps)")
    p.add_argument("--prompt-conv-sweep", action="store_true", help="also time (a)'s prefill at each of "
                   "PROMPT_CONV_CONFIGS (the prompt conv kernel's key tile and warps)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: error: needs a CUDA device", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_bw = copy_bandwidth(torch.device("cuda"))
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s on {torch.cuda.get_device_name()}", flush=True)
    batches, contexts = ([1, 64], [2048]) if args.quick else ([1, 16, 64, 256], [512, 2048, 8192])
    result = dict(
        device=torch.cuda.get_device_name(), commit=commit(), date=time.strftime("%Y-%m-%d"),
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        command=" ".join(sys.argv), heads=HEADS, head_dim=HEAD_DIM, block_size=BLOCK, dtype="bfloat16",
        copy_bandwidth_gbps=copy_bw / 1e9,
        sweep=None if args.sweep is None else sweep(64, 2048, args.sweep or ["conv", "mixing", "plain"]),
        breakdown=breakdown(num_sms, args.prefill_block_m) if args.breakdown else None,
        kernel_sweep=kernel_sweep(num_sms) if args.kernel_sweep else None,
        split_sweep=split_sweep(batches, contexts, num_sms) if args.split_sweep else None,
        conv_split_sweep=conv_split_sweep(batches, contexts, num_sms) if args.conv_split_sweep else None,
        conv_tile_sweep=conv_tile_sweep(num_sms, args.quick) if args.conv_tile_sweep else None,
        mixing_decode_sweep=mixing_decode_sweep(num_sms, args.quick) if args.mixing_decode_sweep else None,
        one_pass_sweep=one_pass_sweep(num_sms, args.quick) if args.one_pass_sweep else None,
        flash_tile_sweep=flash_tile_sweep(num_sms, args.quick) if args.flash_tile_sweep else None,
        prompt_conv_sweep=(prompt_conv_sweep([2048] if args.quick else [2048, 8192], args.prefill_block_m)
                           if args.prompt_conv_sweep else None),
        decode=None if args.no_decode else decode_rows(batches, contexts, copy_bw, num_sms),
        prefill=None if args.no_prefill else prefill_rows([2048] if args.quick else [2048, 8192],
                                                          args.prefill_block_m, not args.no_dense, args.fused_sweep),
    )
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

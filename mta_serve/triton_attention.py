"""The `triton` attention backend: the same paged K/V/Q cache as the `torch` backend, read by Triton kernels.

Layers with any MTA operation run `kernels.mta_attention` (a pipeline over fp32 score, logit and
probability rows); plain layers run `kernels.paged_flash` (one online-softmax pass per head). A step's
sequences form two launches per layer: decode rows (one row per work item, keys split for parallelism) and
prompt chunks (groups of `prefill_block_m` rows). The prompt chunks of mixing-only MTA layers (no key-query
conv) run instead through `kernels.mixing_prefill`'s two fused passes, in groups of FUSED_BLOCK_M rows
(H200, 830M heads, 8192-token prompt: 14.28 -> 8.51 ms at 552010d); where Triton cannot fit its tiles in
the GPU's shared memory (wide heads) those layers fall back to the row pipeline. A step's integer inputs
(tokens, positions, slots, block tables, work items) reach the device in one copy and are shared by all
layers.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .paged_attention import TorchPagedAttention

log = logging.getLogger(__name__)

FUSED_BLOCK_M = 16  # rows per group of the fused mixing prompt kernel: the fewest a tl.dot takes. On the H200
# at 830M heads 32-row groups fit its shared memory only with one buffer per tile and were slower
# (kernels.py --fused-sweep: 13.3 against 8.9 ms at 8192 tokens)


@dataclass(slots=True)
class SequenceSpec:
    """One sequence's part of a step: positions [start, end) at batch rows [row, row + end - start)."""

    start: int
    end: int
    row: int
    block_ids: list[int]  # its block table, at least ceil(end / block_size) entries
    state_slot: int = 0  # its MTA state slot (kv_cache_manager)
    state_ready: bool = False  # the slot holds the rows of the step before: a single row may run as a decode


@dataclass(slots=True)
class TritonBatch:
    slot_mapping: torch.Tensor  # [N] int32: cache slot of each new token
    launches: list  # kernels.work_items.WorkItems, one per tile height (decode rows, prompt chunks)
    fused_prompt: object = None  # the prompt chunks again in FUSED_BLOCK_M-row groups (mixing-only layers)


def decode_splits(num_sequences: int, max_len: int, num_sms: int) -> int:
    """Key splits of decode rows: enough (sequence, split) programs for four per SM, each split >= 64 keys,
    at most 32. The MTA kernels run one program per (row, split) for all heads, so at small batches only
    the splits spread a layer over the GPU (batch 1 at 2048 keys: 32 programs; it was 8 with 256-key
    splits, and the 830M model's batch-1 step spent 1.0 ms of 3.2 in _logits_kernel)."""
    wanted = -(-4 * num_sms // num_sequences)
    return max(1, min(wanted, -(-max_len // 64), 32))


def flash_splits(num_sequences: int, max_len: int, num_heads: int, num_sms: int) -> int:
    """Key splits of decode rows in plain layers: enough (sequence, head, split) programs for about four per
    SM (a paged flash program serves one head), splits of >= 64 keys (one 64-key tile: paged flash's decode
    tiles), at most 32. H200, 830M heads, paged flash + combine per splits x key tile at batch {1, 2, 4, 8, 16}
    x context 512-8192: the best was 64-key tiles with 32 / 16 / 8 / 4 / 2 splits (batch 1 x 2048: 9.9 us at
    the earlier rule, 8 splits of 128-key tiles, -> 8.0 us; 8 x 2048: 37.2 -> 32.3 us; benchmarks/kernels.py
    --flash-tile-sweep). The 830M baseline's batch-1 step, with cache_of's fold: 0.896 / 0.901 -> 0.847 /
    0.845 ms (benchmarks/step_profile.py; docs/benchmarks_h200.md)."""
    wanted = 4 * num_sms // (num_sequences * num_heads)
    return max(1, min(wanted, -(-max_len // 64), 32))


def flash_block_n(num_sequences: int, num_heads: int, num_sms: int) -> int:
    """Keys per tile of paged flash's decode programs: 64 up to about eight (sequence, head) programs per
    SM, 128 beyond, where every SM has programs enough to keep the larger tiles' loads in flight. H200,
    830M heads, at flash_splits' counts: 64-key tiles were faster at batch 1-64 (64 x 2048: 225.0 -> 215.1
    us), 128-key ones at batch 256 (256 x 2048: 858.8 -> 841.8 us, 256 x 8192: 3406 -> 3327 us)."""
    return 64 if num_sequences * num_heads <= 8 * num_sms else 128


def mixing_decode(num_sequences: int, num_splits: int, num_sms: int, max_len: int) -> dict:
    """mta_paged_attention's key splits and tiles for decode rows of MTA layers without a key-query conv,
    given decode_splits' count and the longest sequence. A single row takes the one-pass form in 128-key
    tiles, 8 splits up to 4096 keys and 16 beyond: H200, 830M heads, bf16, K and V from HBM (`benchmarks/
    kernels.py --one-pass-sweep`, results/kernels_h200_0cac5e0_one_pass_sweep.json), against the
    pipeline: 1 x 512 14.5 -> 11.7 us, 1 x 2048 16.4 -> 16.3 us, 1 x 8192 (16 splits) 34.4 -> 33.5 us;
    the 830M MTA batch-1 step 1.093 / 1.099 -> 1.066 / 1.065 ms (`benchmarks/step_profile.py`, two runs
    each, interleaved: two kernels fewer per mixing layer). From 2 rows it was slower (2 x 2048 21.1 ->
    21.2 us, 4 x 2048 28.9 -> 34.1). Where decode_splits' count gives at most one (row, split) program per SM, these
    layers take it with 64-key tiles in every kernel; beyond, half of it with the kernels' default tiles
    (128 keys), as their programs do less work per key than a conv layer's, for which decode_splits' count
    was best (mixing layer, at an earlier commit: 64 x 2048 0.259 -> 0.253 ms with half the splits).
    H200, 830M heads, bf16, splits x tiles at 3c399ac (results/kernels_h200_mixing_decode_experiments.json;
    benchmarks/kernels.py --mixing-decode-sweep runs the same sweep): 1 x 2048 14.2 -> 13.8 us, 1 x 512
    13.6 -> 12.2, 1 x 8192 36.9 -> 33.0, 4 x 2048 28.1 -> 26.2 against half the splits at 128-key tiles; at
    16 x 2048 those stayed best (71.8 us; 73.4 with these). The decode table, 205027c's run -> 08d7a51's:
    1 x 2048 15.2 -> 13.8 us, 1 x 8192 37.0 -> 33.1; the 830M MTA batch-1 step did not change (1.101 /
    1.102 -> 1.103 / 1.103 ms, benchmarks/step_profile.py)."""
    if num_sequences == 1:
        return dict(num_splits=num_splits, one_pass=(128, 8 if max_len <= 4096 else 16))
    if num_sequences * num_splits <= num_sms:
        return dict(num_splits=num_splits, key_tile=64, stream_tile=64)
    return dict(num_splits=max(1, num_splits // 2))


def fused_prompt_splits(num_groups: int, max_len: int, num_sms: int) -> int:
    """Key splits of the fused mixing prompt kernel: enough (group, split) programs for sixteen per SM,
    splits of >= 64 keys, at most 8. H200, 830M heads, one prompt (benchmarks/kernels.py --fused-sweep):
    8192 tokens took 9.92 / 8.91 / 8.52 / 8.44 / 8.75 ms with 1 / 2 / 4 / 8 / 16 splits, 2048 tokens
    1.11 / 0.89 / 0.74 / 0.71 / 0.77 ms."""
    return max(1, min(8, -(-16 * num_sms // max(num_groups, 1)), max_len // 64))


def fused_prompt_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, params, work,
                           out: torch.Tensor, num_sms: int, head_norm=None) -> torch.Tensor:
    """Prompt groups (work: FUSED_BLOCK_M-row groups) of a mixing-only layer through kernels.mixing_prefill
    as the engine runs them: 16-key tiles, 8 warps, fused_prompt_splits, P'V on probabilities in the cache
    dtype for 16-bit caches (as paged flash's prompt tiles). Raises Triton's OutOfResources where its tiles
    do not fit the GPU. `head_norm`: steps 8-9 in the last kernel (fused_ops.HeadNormGate; None: the cast)."""
    from .kernels.fused_ops import CAST_ONLY
    from .kernels.mixing_prefill import mixing_prefill_attention

    splits = fused_prompt_splits(work.work_seq.numel(), work.max_len, num_sms)
    return mixing_prefill_attention(q, k_cache, v_cache, params, work, out, key_tile=16, num_splits=splits,
                                    num_warps=8, pv_in_cache_dtype=True, head_norm=head_norm or CAST_ONLY)


def mixing_only(params) -> bool:
    """An MTA layer's kernel params with head mixing but no key-query conv."""
    return params is not None and params.pre_kernel is None and params.post_kernel is None


def conv_state_layers(cfg: ModelConfig) -> list[int]:
    """Layers whose decode rows read earlier rows from a ConvState: those with a post-conv over several queries."""
    post = cfg.mta.post_conv
    return [i for i in range(cfg.n_layers) if post is not None and post[0] > 1 and cfg.mta.has_conv(i)]


def conv_state_bytes(cfg: ModelConfig, num_slots: int) -> int:
    """Device memory of the ConvStates of `num_slots` slots (plus the graphs' scratch slot)."""
    from .kernels.mta_attention import ConvState

    layers = conv_state_layers(cfg)
    if not layers:
        return 0
    return len(layers) * ConvState.num_bytes(num_slots + 1, cfg.n_heads, *_conv_rows(cfg), cfg.max_seq_len)


def _conv_rows(cfg: ModelConfig) -> tuple[int, int]:
    """(c_q, c_q') of the model's key-query convs (1 for an absent one)."""
    return tuple(1 if conv is None else conv[0] for conv in (cfg.mta.pre_conv, cfg.mta.post_conv))


def triton_available(device: torch.device) -> bool:
    """Triton kernels run on CUDA, or on the CPU under the interpreter (TRITON_INTERPRET=1, tests only)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


class StepUploader:
    """Packs a step's integer arrays into one host buffer (pinned on CUDA) and copies it to the device at
    once; the arrays come back as views of one device buffer. The host buffer is reused only after the
    previous copy has finished."""

    def __init__(self, device: torch.device):
        self.device = device
        self.host = self.dev = None
        self.done = torch.cuda.Event() if device.type == "cuda" else None

    def upload(self, arrays: list[list[int]]) -> list[torch.Tensor]:
        # Every array starts at a multiple of 4 elements: Triton compiles a kernel variant per pointer
        # alignment, and views at arbitrary offsets would compile new variants step after step.
        sizes = [len(a) for a in arrays]
        padded = [-(-n // 4) * 4 for n in sizes]
        total = sum(padded)
        if self.host is None or self.host.numel() < total:
            capacity = max(total, 2 * (0 if self.host is None else self.host.numel()), 1 << 12)
            self.host = torch.empty(capacity, dtype=torch.int32, pin_memory=self.device.type == "cuda")
            self.dev = torch.empty(capacity, dtype=torch.int32, device=self.device)
        elif self.done is not None:
            self.done.synchronize()
        self.host[:total] = torch.tensor([x for a, n in zip(arrays, padded) for x in a + [0] * (n - len(a))],
                                         dtype=torch.int32)
        self.dev[:total].copy_(self.host[:total], non_blocking=True)
        if self.done is not None:
            self.done.record(torch.cuda.current_stream(self.device))
        return [part[:n] for part, n in zip(self.dev[:total].split(padded), sizes)]


class TritonPagedAttention(TorchPagedAttention):
    """Owns the caches like the torch backend (same layout, same writes); only the attention math differs."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str, prefill_block_m: int = 64, num_state_slots: int = 0):
        from .kernels.mta_attention import ConvState

        super().__init__(cfg, num_blocks, block_size, dtype, device)
        self.device = torch.device(device)
        self.prefill_block_m = prefill_block_m
        # Post-conv layers keep each request's partial conv sums of its next rows (slot num_state_slots: the
        # graphs' padding rows). Without slots, decode rows recompute the rows before them.
        self.scratch_state = num_state_slots
        layers = set(conv_state_layers(cfg)) if num_state_slots else set()
        self.conv_states = [ConvState.allocate(num_state_slots + 1, cfg.n_heads, *_conv_rows(cfg), cfg.max_seq_len,
                                               self.device) if i in layers else None for i in range(cfg.n_layers)]
        self.has_conv_state = bool(layers)
        self.num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                        if self.device.type == "cuda" else 2)
        self._params: dict[int, object] = {}
        self._head_norms: dict[int, object] = {}
        self.uploader = StepUploader(self.device)
        mta = cfg.mta
        mixes = mta.wpsm or mta.wposm or mta.head_kernel_size is not None
        convs = mta.pre_conv is not None or mta.post_conv is not None
        # some layer mixes heads without a conv; cleared if Triton cannot fit the fused kernel on this GPU
        # (then the row pipeline runs those layers)
        self.fuse_mixing = mixes and not (convs and all(mta.has_conv(i) for i in range(cfg.n_layers)))

    def prepare(self, tokens: list[int], positions: list[int], slots: list[int], specs: list[SequenceSpec]):
        """A step's inputs on the device, all integer arrays packed into one upload: (tokens [N] int32,
        positions [N] int32, TritonBatch)."""
        from .kernels.work_items import WorkItems, tile_rows

        width = max((len(s.block_ids) for s in specs), default=1)
        tables = [b for s in specs for b in s.block_ids + [0] * (width - len(s.block_ids))]
        starts, ends, rows = [s.start for s in specs], [s.end for s in specs], [s.row for s in specs]
        groups = []  # (block_m, splits, chosen sequences) per launch: decode rows, then prompt chunks
        # A single row whose state slot is not current (a prefix-cache hit, a resumed request) runs as a
        # prompt group: that computes the rows before it and writes the slot.
        single = [s.end - s.start == 1 and (s.state_ready or not self.has_conv_state) for s in specs]
        for decode in (True, False):
            chosen = [i for i, s in enumerate(specs) if single[i] == decode]
            if chosen:
                splits = self._num_splits(len(chosen), max(ends[i] for i in chosen)) if decode else 1
                groups.append((1 if decode else self.prefill_block_m, splits, chosen))
        fused = self.fuse_mixing and bool(groups) and groups[-1][0] > 1
        if fused:  # the prompt chunks again, for the fused kernel of mixing-only layers
            groups.append((FUSED_BLOCK_M, 1, groups[-1][2]))
        tiles = [tile_rows(starts, ends, block_m, chosen) for block_m, _, chosen in groups]
        states = [s.state_slot for s in specs]
        arrays = [tokens, positions, slots, tables, starts, ends, rows, states] + [a for pair in tiles for a in pair]
        views = self.uploader.upload(arrays)
        tokens_t, positions_t, slots_t, tables_t, starts_t, ends_t, rows_t, states_t = views[:8]
        tables_t = tables_t.view(len(specs), width)
        launches = [WorkItems(tables_t, starts_t, ends_t, rows_t, views[8 + 2 * k], views[9 + 2 * k], block_m,
                              splits, max(ends[i] for i in chosen), states_t)
                    for k, (block_m, splits, chosen) in enumerate(groups)]
        return tokens_t, positions_t, TritonBatch(slots_t, launches[:-1] if fused else launches,
                                                  launches[-1] if fused else None)

    def decode_batch(self, slots: torch.Tensor, tables: torch.Tensor, positions: torch.Tensor, ends: torch.Tensor,
                     rows: torch.Tensor, states: torch.Tensor) -> TritonBatch:
        """A decode step over fixed-address inputs (cuda_graphs): one row per sequence, launch shapes set by
        the number of rows and the model's max_seq_len alone. slots, positions, ends, rows, states (state
        slots, each current) [n] int32; tables [n, max_blocks] int32."""
        from .kernels.work_items import WorkItems

        max_len = self.cfg.max_seq_len
        work = WorkItems(tables, positions, ends, rows, rows, positions, 1,
                         self._num_splits(rows.numel(), max_len), max_len, states)
        return TritonBatch(slots, [work])

    def _num_splits(self, num_sequences: int, max_len: int) -> int:
        return decode_splits(num_sequences, max_len, self.num_sms)

    def cache_of(self, batch: TritonBatch, layer_id: int, attn) -> tuple:
        """The layer's cache destination for the fused forward (model.CacheFn): its q|k|v product writes the
        step's new tokens there (at batch 1 in the product's own kernel, a launch fewer per layer), and
        attend then leaves them as they are. H200, batch-1 step: 830M MTA 1.224 -> 1.207 ms; the baseline's
        plain layers were slower with it at paged flash's earlier decode tiles (0.999 -> 1.022 / 1.024 ms;
        8 splits of 128-key tiles, 0.901 -> 0.930 ms) and faster at flash_splits' (0.880 -> 0.848 / 0.852 ms)."""
        return batch.slot_mapping, self.k_cache[layer_id], self.v_cache[layer_id], self.q_cache[layer_id]

    def attend(self, batch: TritonBatch, layer_id: int, attn, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """As TorchPagedAttention.attend, for the fused forward (the only forward this backend runs): heads
        [N, H, d] in fp32, or, where the kernels applied the layer's steps 8-9 (_head_norm), [N, H * d] in
        q's (the model's) dtype, as model.AttendFn allows. The forward has written the new tokens to the
        caches (cache_of, which the runner and the graph runner pass for every layer)."""
        params = self._layer_params(layer_id, attn)
        head_norm = self._head_norm(layer_id, attn, params)
        out = torch.empty(q.shape, dtype=q.dtype if head_norm else torch.promote_types(q.dtype, torch.float32),
                          device=q.device)
        q = q.to(self.k_cache[layer_id].dtype).contiguous()
        for work in batch.launches:
            self._run_kernels(layer_id, params, q, work, out, batch.fused_prompt, head_norm)
        return out.flatten(-2) if head_norm else out

    def _head_norm(self, layer_id: int, attn, params):
        """The layer's steps 8-9 as its attention kernels' epilogue (fused_ops.HeadNormGate), or None where
        the model applies them: a full [d, d] gate, or group norm or gate after paged flash. With it,
        attend returns the heads as the fused forward takes them: [N, H * d] in the model's dtype (the
        baseline's layers: only the cast, in paged flash's last kernel). Kept per layer like _layer_params: it
        holds the layer's norm and gate parameters themselves, so it follows in-place weight updates."""
        from .kernels.fused_ops import CAST_ONLY, HeadNormGate

        if layer_id not in self._head_norms:
            sub, gate = attn.subln, attn.gate
            full_gate = gate is not None and gate.out_features != 1
            if full_gate or params is None and (sub is not None or gate is not None):
                self._head_norms[layer_id] = None
            elif sub is None and gate is None:
                self._head_norms[layer_id] = CAST_ONLY
            else:
                self._head_norms[layer_id] = HeadNormGate(
                    None if sub is None else sub.weight, 1e-5 if sub is None else sub.eps,
                    1.0 if sub is None else sub.scale, None if gate is None else gate.weight[0],
                    None if gate is None else gate.bias)
        return self._head_norms[layer_id]

    def _run_kernels(self, layer_id: int, params, q: torch.Tensor, work, out: torch.Tensor, fused=None,
                     head_norm=None) -> None:
        """One launch's rows of one layer: paged flash for a plain layer, the MTA pipeline otherwise; prompt
        rows of a mixing-only layer through the fused kernel, over `fused` (the same rows in FUSED_BLOCK_M-row
        groups). The MTA kernels end with `head_norm` (None: the cast alone); paged flash only casts."""
        from .kernels.fused_ops import CAST_ONLY
        from .kernels.mta_attention import mta_paged_attention
        from .kernels.paged_flash import paged_flash_attention

        k_cache, v_cache = self.k_cache[layer_id], self.v_cache[layer_id]
        decode = work.block_m == 1
        head_norm = head_norm or CAST_ONLY
        assert params is not None or head_norm is CAST_ONLY, "paged flash has no group norm or gate epilogue"
        if not decode and fused is not None and mixing_only(params):
            if self._fused_prompt(layer_id, params, q, fused, out, head_norm):
                return
        if params is None:
            num_seqs, heads = work.work_seq.numel(), self.cfg.n_heads
            splits = flash_splits(num_seqs, work.max_len, heads, self.num_sms) if decode else 1
            block_n = flash_block_n(num_seqs, heads, self.num_sms) if decode else None
            paged_flash_attention(q, k_cache, v_cache, work, out, block_n=block_n, num_splits=splits)
        else:
            tiles = (mixing_decode(work.work_seq.numel(), work.num_splits, self.num_sms, work.max_len)
                     if decode and mixing_only(params) else {})
            mta_paged_attention(q, self.q_cache[layer_id], k_cache, v_cache, params, work, out,
                                state=self.conv_states[layer_id], head_norm=head_norm, **tiles)

    def _fused_prompt(self, layer_id: int, params, q: torch.Tensor, work, out: torch.Tensor, head_norm) -> bool:
        """fused_prompt_attention for a mixing-only layer's prompt groups; False if Triton cannot build it
        here (then never again)."""
        from triton.runtime.errors import OutOfResources

        if not self.fuse_mixing:
            return False
        try:
            fused_prompt_attention(q, self.k_cache[layer_id], self.v_cache[layer_id], params, work, out,
                                   self.num_sms, head_norm)
        except OutOfResources as exc:
            log.warning("fused mixing prompt kernel does not fit this GPU (%s); mixing-only layers' prompts "
                        "use the row pipeline", exc)
            self.fuse_mixing = False
            return False
        return True

    @torch.no_grad()
    def warm_up(self, model) -> int:
        """Run every kernel variant the model needs once — decode rows (one and several key splits) and a
        prompt chunk, per distinct layer kind — on throwaway inputs, so that no request waits for Triton's
        compiler. Reads block 0 of the cache, writes nothing to it (only the scratch state slot). Returns the
        number of layer kinds (attention kernels and steps 8-9 epilogue)."""
        from .kernels.work_items import build_work_items

        cfg, kinds = self.cfg, set()
        prompt_len = self.prefill_block_m + 1
        tables = torch.zeros(2, -(-prompt_len // self.block_size), dtype=torch.int32, device=self.device)
        q = torch.zeros(prompt_len + 1, cfg.n_heads, cfg.head_dim, dtype=self.k_cache[0].dtype, device=self.device)
        model_dtype = model.tok_embeddings.weight.dtype  # the fused forward's q, and attend's output with head_norm
        # sequence 0: a whole prompt (two row groups); sequence 1: one decode row, keys in 1 and in 2 splits;
        # both in the scratch state slot, which the prompt writes before the decode rows read it
        shapes = ((0, self.prefill_block_m, 1), (1, 1, 1), (1, 1, 2))
        launches = [build_work_items(tables, [0, prompt_len - 1], [prompt_len, prompt_len], [0, prompt_len],
                                     block_m, splits, self.device, only=[seq], states=[self.scratch_state] * 2)
                    for seq, block_m, splits in shapes]
        fused = build_work_items(tables, [0, prompt_len - 1], [prompt_len, prompt_len], [0, prompt_len],
                                 FUSED_BLOCK_M, 1, self.device, only=[0])  # the prompt, for mixing-only layers
        for layer_id, layer in enumerate(model.layers):
            params = self._layer_params(layer_id, layer.attention)
            head_norm = self._head_norm(layer_id, layer.attention, params)
            kind = None if params is None else (
                tuple(None if t is None else tuple(t.shape) for t in (params.pre_kernel, params.post_kernel,
                                                                      params.pre_mix, params.post_mix)),
                params.pad_key)
            epilogue = None if head_norm is None else tuple(head_norm.kernel_args(q)[k] for k in ("NORM", "SCALE",
                                                                                                  "GATE"))
            if (kind, epilogue) in kinds:
                continue
            kinds.add((kind, epilogue))
            out = torch.empty(q.shape, dtype=model_dtype if head_norm else torch.promote_types(q.dtype, torch.float32),
                              device=self.device)
            for work in launches:
                self._run_kernels(layer_id, params, q, work, out, fused, head_norm)
        return len(kinds)

    def _layer_params(self, layer_id: int, attn):
        """The layer's MTA weights in kernel form (None for a plain layer), converted once."""
        from .kernels.mta_attention import layer_params

        if layer_id not in self._params:
            weights = attn.mta_weights()
            plain = all(t is None for t in (weights.pre_kernel, weights.post_kernel, weights.wpsm,
                                            weights.head_kernel, weights.wposm))
            self._params[layer_id] = None if plain else layer_params(weights, self.device)
        return self._params[layer_id]

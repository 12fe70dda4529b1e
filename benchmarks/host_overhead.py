"""Host work of a decode step, on its own: the engine's Python path (scheduling, block allocation, the graph
inputs, sampling launch, token read-back, detokenization and outputs) with the model forward replaced by a
no-op, so that the figure is what the host adds to every step whatever the GPU.

B requests of `--context` tokens (prompt + outputs) decode with the `triton` backend's decode-step path
(cuda_graphs.DecodeGraphs with its forward stubbed out; prompt steps are stubbed entirely) through the
real scheduler, KV-cache manager, sampler and byte-level detokenizer. Per step it reports the wall time and
its parts: the step in flight completed (tokens read and appended), the next one launched (scheduling, then
the runner's input building and the sampler's launch), and the outputs built. Runs on the CPU (Triton's
interpreter is enabled only so that the backend can be built; no kernel runs).

    python benchmarks/host_overhead.py [--batch 64] [--context 2048] [--steps 200] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the backend builds on the CPU

import torch  # noqa: E402

from common import ROOT, run_info, write_result  # noqa: E402
from mta_serve.config import CacheConfig, ModelConfig, MTAConfig, SchedulerConfig  # noqa: E402
from mta_serve.engine import LLMEngine  # noqa: E402
from mta_serve.model import build_model  # noqa: E402
from mta_serve.model_runner import StepLogits  # noqa: E402
from mta_serve.sampling_params import SamplingParams  # noqa: E402
from mta_serve.tokenizer import BytesTokenizer  # noqa: E402


def build_engine(batch: int, context: int, block_size: int, overlap: bool) -> LLMEngine:
    """An engine over a tiny model (the forward never runs) whose caches and graph inputs have the shapes of
    `batch` sequences of `context` tokens."""
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258, max_seq_len=context,
                      mta=MTAConfig(pre_conv=[3, 5], mta_layers=[0], wpsm=True))
    blocks = batch * -(-context // block_size)
    engine = LLMEngine(build_model(cfg, seed=0), BytesTokenizer(),
                       CacheConfig(block_size=block_size, num_blocks=blocks, attention_backend="triton"),
                       SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=8192, overlap_steps=overlap))
    runner, vocab = engine.runner, cfg.vocab_size
    decode_step = runner.execute
    runner.graphs._forward = lambda size: None  # the device's part of a decode step

    def execute(scheduled, *args):
        if all(s.end - s.start == 1 for s in scheduled):
            return decode_step(scheduled, *args)
        return StepLogits(torch.zeros(sum(s.samples for s in scheduled), vocab), {})

    runner.execute = execute
    return engine


def timed(obj, name: str, totals: dict) -> None:
    """Accumulate the wall time of obj.name() calls in totals[name]."""
    inner = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

    setattr(obj, name, wrapper)


def measure(batch: int, context: int, steps: int, block_size: int, overlap: bool, seed: int) -> dict:
    engine = build_engine(batch, context, block_size, overlap)
    rng = random.Random(seed)
    prompt_len = context - steps - 8
    for i in range(batch):
        engine.add_request(f"r{i}", [rng.randrange(256) for _ in range(prompt_len)],
                           SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True))
    while any(t.request.num_output_tokens == 0 for t in engine.requests.values()):
        engine.step()
    engine.step()
    totals: dict[str, float] = {}
    for obj, name in ((engine, "_complete"), (engine, "_launch"), (engine, "_outputs"),
                      (engine.scheduler, "schedule"), (engine.runner, "execute"), (engine.sampler, "sample_async")):
        timed(obj, name, totals)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    ms = {name: 1e3 * total / steps for name, total in totals.items()}
    return dict(batch=batch, context=context, overlap_steps=overlap, steps=steps, step_ms=1e3 * statistics.mean(times),
                step_p50_ms=1e3 * statistics.median(times), complete_ms=ms["_complete"], launch_ms=ms["_launch"],
                schedule_ms=ms["schedule"], runner_ms=ms["execute"], sample_launch_ms=ms["sample_async"],
                outputs_ms=ms["_outputs"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "host_overhead.json"))
    args = p.parse_args()
    if args.context - args.steps - 8 < 1:
        p.error("--context must exceed --steps + 8")
    rows = []
    for batch in args.batch:
        for overlap in (False, True):
            rows.append(measure(batch, args.context, args.steps, args.block_size, overlap, args.seed))
            r = rows[-1]
            print(f"batch {batch} overlap {'on' if overlap else 'off'}: step {r['step_ms']:.3f} ms "
                  f"(p50 {r['step_p50_ms']:.3f}): complete {r['complete_ms']:.3f}, launch {r['launch_ms']:.3f} "
                  f"(schedule {r['schedule_ms']:.3f}, runner {r['runner_ms']:.3f}, sampler {r['sample_launch_ms']:.3f}), "
                  f"outputs {r['outputs_ms']:.3f} ms", flush=True)
    info = run_info(torch.device("cpu"), 0.0)
    del info["copy_bandwidth_gbps"]  # no copy is measured: nothing here is bandwidth-bound
    write_result(args.out, dict(**info, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode-step anatomy: how long one engine step takes at a fixed batch and context, how much of it the GPU
spends in kernels, which kernels, and how that compares with the bytes the step must move.

For each model and batch size B, B requests with prompts of (context - steps) random tokens are prefilled,
then `--steps` decode steps are timed one by one (wall time of `engine.step()`, which ends by reading the
sampled tokens), and `--profile-steps` more run under the PyTorch profiler. Per step it reports:
  - step time (mean, p50): at batch 1 this is the inter-token latency;
  - the forward's device span (CUDA events around the runner) and host time = step time - that span, the
    time the GPU waits for the host (scheduling, input building, sampling read-back, postprocessing);
  - the kernels' summed durations (from the profiled steps);
  - bounds: weights once / copy bandwidth (the batch-1 bound), and weights + every sequence's K/V (and MTA
    query) cache / copy bandwidth (the decode roofline), both from the bandwidth measured in the same run;
  - the kernels that take the most GPU time.

    python benchmarks/step_profile.py [--models configs/830m_mta.yaml configs/830m_baseline.yaml] \
        [--batch 1 64] [--context 2048 512] [--steps 32] [--cuda-graphs on off] [--overlap-steps on off] [--out FILE]
"""
from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from common import (ROOT, add_model_args, build_bench_model, copy_bandwidth, release, run_info, sync,
                    write_result)
from mta_serve.config import ModelConfig
from mta_serve.llm import LLM
from mta_serve.sampling_params import SamplingParams

OVERLAP = {"auto": None, "on": True, "off": False}  # SchedulerConfig.overlap_steps


def fill(llm: LLM, batch: int, prompt_len: int, max_tokens: int, vocab: int, seed: int) -> None:
    """Add `batch` requests and step until every one is decoding (has its first output token)."""
    rng = random.Random(seed)
    engine = llm.engine
    for i in range(batch):
        engine.add_request(f"p{i}", [rng.randrange(vocab) for _ in range(prompt_len)],
                           SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    while any(t.request.num_output_tokens == 0 for t in engine.requests.values()):
        engine.step()


def time_steps(llm: LLM, steps: int, device: torch.device) -> tuple[list[float], list[float], list[int]]:
    """(wall seconds of each of `steps` decode steps, seconds of each step's forward on the device, rows of
    each launched step). The
    forward's device span runs from an event recorded when the runner starts the step to one recorded when
    it has enqueued the whole forward; everything else in the step's wall time is host work the GPU waits
    for (scheduling, input building, sampling read-back, postprocessing)."""
    runner = llm.engine.runner
    execute, spans, rows, timing = runner.execute, [], [], [False]

    def timed_execute(scheduled, *args):
        rows.append(len(scheduled))
        if device.type != "cuda" or not timing[0]:
            return execute(scheduled, *args)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = execute(scheduled, *args)
        end.record()
        spans.append((start, end))
        return out

    runner.execute = timed_execute
    times = []
    try:
        # One untimed step first, so that with overlap_steps every timed step() completes a step launched
        # inside the timing (and launches the next): no synchronisation here or between steps.
        llm.engine.step()
        # Spans only of the forwards launched inside the timed steps: the untimed step's forward starts on the
        # GPU the sync above left idle, so its span also holds the host time before the device got work.
        timing[0] = True
        for _ in range(steps):
            # No synchronisation between steps: with overlap_steps a step() returns with the next step
            # running on the device, and the time between returns is what a client sees per token.
            start = time.perf_counter()
            llm.engine.step()
            times.append(time.perf_counter() - start)
        sync(device)
    finally:
        runner.__dict__.pop("execute", None)  # back to the class's method
    return times, [a.elapsed_time(b) * 1e-3 for a, b in spans], rows


def profile_steps(llm: LLM, steps: int):
    """The PyTorch profiler's record of `steps` decode steps (CPU and CUDA activity)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            llm.engine.step()
        torch.cuda.synchronize()
    return prof


def kernel_table(prof, steps: int, top: int) -> tuple[float, list[dict]]:
    """(GPU busy seconds per step, the `top` kernels by device time per step)."""
    rows = []
    for evt in prof.key_averages():
        device_us = getattr(evt, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(evt, "self_cuda_time_total", 0)
        if device_us > 0 and evt.device_type == torch.autograd.DeviceType.CUDA:
            rows.append(dict(name=evt.key[:80], calls_per_step=evt.count / steps, us_per_step=device_us / steps))
    rows.sort(key=lambda r: -r["us_per_step"])
    return sum(r["us_per_step"] for r in rows) * 1e-6, rows[:top]


def fill_margin(batch: int, context: int, args) -> int:
    """More than the number of steps that prefill `batch` prompts of `context` tokens."""
    return -(-batch * context // args.max_num_batched_tokens) + 1


def measure(path: str, batch: int, context: int, graphs: bool, overlap: str, args, device,
            bandwidth: float) -> dict:
    cfg, model, weight_bytes, kv_per_token = build_bench_model(path, args.dtype, device)
    options = dict(max_num_seqs=max(batch, 1), max_num_batched_tokens=args.max_num_batched_tokens,
                   overlap_steps=OVERLAP[overlap])
    if not graphs:
        options["enforce_eager"] = True
    llm = LLM(model, **options)
    decode_steps = args.warmup_steps + args.steps + args.profile_steps + 2  # + time_steps' untimed steps
    # Requests admitted first decode while later prompts still prefill, so they run ahead by up to the
    # number of fill steps: the margin keeps every request running until the last measured step.
    margin = fill_margin(batch, context, args)
    prompt_len = context - decode_steps - 1 - margin  # prompt + outputs = context
    fill(llm, batch, prompt_len, decode_steps + 1 + margin, cfg.vocab_size, args.seed)
    time_steps(llm, args.warmup_steps, device)
    first_context = prompt_len + 1 + args.warmup_steps + 2  # keys the first timed step attends to (at least)
    times, spans, rows = time_steps(llm, args.steps, device)
    if min(rows) != batch or max(rows) != batch:
        raise RuntimeError(f"timed steps ran {min(rows)}..{max(rows)} sequences, not {batch}")
    prof = profile_steps(llm, args.profile_steps) if device.type == "cuda" and args.profile_steps else None
    mean_context = first_context + (args.steps - 1) / 2
    step_s = statistics.mean(times)
    row = dict(config=path, batch=batch, cuda_graphs=llm.engine.runner.cuda_graphs,
               overlap_steps=llm.engine.overlap_steps, mean_context=mean_context,
               backend=llm.engine.runner.backend_name, step_ms=1e3 * step_s,
               step_p50_ms=1e3 * statistics.median(times), weight_bytes=weight_bytes,
               weight_bound_ms=1e3 * weight_bytes / bandwidth,
               roofline_ms=1e3 * (weight_bytes + batch * mean_context * kv_per_token) / bandwidth)
    row["step_over_weight_bound"] = row["step_ms"] / row["weight_bound_ms"]
    row["step_over_roofline"] = row["step_ms"] / row["roofline_ms"]
    if spans:
        row.update(forward_ms=1e3 * statistics.mean(spans), host_ms=1e3 * (step_s - statistics.mean(spans)),
                   host_share=1 - statistics.mean(spans) / step_s)
    if prof is not None:
        busy, top = kernel_table(prof, args.profile_steps, args.top)
        row.update(gpu_busy_ms=1e3 * busy, top_kernels=top)
    del llm, model
    release(device)
    return row


def describe(row: dict) -> str:
    text = (f"{Path(row['config']).stem} batch {row['batch']} ctx {row['mean_context']:.0f} graphs "
            f"{'on' if row['cuda_graphs'] else 'off'} overlap {'on' if row.get('overlap_steps') else 'off'}: step {row['step_ms']:.3f} ms (p50 {row['step_p50_ms']:.3f}), "
            f"{row['step_over_weight_bound']:.2f}x weight bound, {row['step_over_roofline']:.2f}x roofline")
    if "forward_ms" in row:
        text += (f"; forward on the device {row['forward_ms']:.3f} ms, host {row['host_ms']:.3f} ms "
                 f"({100 * row['host_share']:.1f} %)")
    if "gpu_busy_ms" in row:
        text += f"; kernels {row['gpu_busy_ms']:.3f} ms"
        for k in row["top_kernels"]:
            text += f"\n    {k['us_per_step']:9.1f} us  {k['calls_per_step']:6.1f}x  {k['name']}"
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    p.add_argument("--context", nargs="+", type=int, default=[2048],
                   help="prompt + generated tokens of each request (several: one row each)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--profile-steps", type=int, default=8, help="steps recorded by the profiler, after the "
                   "timed ones (its overhead would distort their times)")
    p.add_argument("--cuda-graphs", nargs="+", choices=["on", "off"], default=["on"])
    p.add_argument("--overlap-steps", nargs="+", choices=list(OVERLAP), default=["auto"],
                   help="launch each step before the previous one's outputs are built (auto: on CUDA)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--top", type=int, default=8, help="kernels listed per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_profile.json"))
    args = p.parse_args()
    for context in args.context:
        margin = fill_margin(max(args.batch), context, args)
        if context - args.steps - args.warmup_steps - args.profile_steps - margin < 4:
            p.error(f"--context {context} must exceed --steps + --warmup-steps + --profile-steps + {margin + 3} "
                    "(the steps that fill the batch and two untimed steps)")
    for path in args.models:
        max_len = ModelConfig.from_yaml(path).max_seq_len
        if max(args.context) > max_len:
            p.error(f"--context {max(args.context)} exceeds {path}'s max_seq_len {max_len}")
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s on {args.device}", flush=True)
    rows = []
    for path in args.models:
        for batch, context in itertools.product(args.batch, args.context):
            for graphs, overlap in itertools.product(args.cuda_graphs, args.overlap_steps):
                rows.append(measure(path, batch, context, graphs == "on", overlap, args, device, bandwidth))
                print(describe(rows[-1]), flush=True)
    write_result(args.out, dict(**run_info(device, bandwidth), rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

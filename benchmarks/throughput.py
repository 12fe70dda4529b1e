"""Offline engine throughput: mta-serve on MTA and baseline models side by side, against a reference-style
generator and the decode roofline, all in one run on one machine.

Workloads:
  (a) the common small-engine workload: --num-seqs sequences (default 256), input and output lengths
      uniform in [--min-len, --max-len] (default [100, 1024]), random token ids, ignore_eos;
  (b) fixed INPUTxOUTPUT sweeps (--sweep 128x128 1024x256 ...), --num-seqs sequences each.
Models are config files with seeded random weights (speed does not depend on the weights), by default the
paper's 830M MTA config and its same-shape baseline. The reference-style generator recomputes the whole
dense model (every layer's full score maps) at every decode step, as the reference implementation does; it
runs a reduced workload (--reference-seqs x --reference-input + --reference-output), which mta-serve also
runs so the speed-up compares like with like.

Roofline: a step must read the weights once and the K/V (and MTA query) cache of every scheduled sequence;
bytes / the device-to-device copy bandwidth measured in the same run is its bound. The fraction reported is
the sum of bounds over the sum of measured times, for decode-only steps and for all steps.

    python benchmarks/throughput.py [--models configs/830m_mta.yaml configs/830m_baseline.yaml] \
        [--device cuda] [--dtype bfloat16] [--num-seqs 256] [--sweep 512x128] [--out FILE] [--plot FILE]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common import (ROOT, add_model_args, build_bench_model, copy_bandwidth, release, run_info, sync,
                    write_result)
from mta_serve.llm import LLM
from mta_serve.sampling_params import SamplingParams


def workload(num: int, lo: int, hi: int, vocab: int, seed: int, fixed: tuple[int, int] | None = None):
    """(prompts, output lengths): random token ids; lengths uniform in [lo, hi] unless fixed."""
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(num):
        n_in, n_out = fixed or (rng.randint(lo, hi), rng.randint(lo, hi))
        prompts.append([rng.randrange(vocab) for _ in range(n_in)])
        outputs.append(n_out)
    return prompts, outputs


class StepRecorder:
    """Wraps the engine's step: wall time and roofline bytes of every step."""

    def __init__(self, llm: LLM, weight_bytes: int, kv_bytes_per_token: int, device: torch.device):
        self.engine, self.device = llm.engine, device
        self.weight_bytes, self.kv_bytes = weight_bytes, kv_bytes_per_token
        self.steps: list[tuple[float, int, bool]] = []  # (seconds, bytes that must move, decode only)
        inner_execute = self.engine.runner.execute
        self._scheduled = None

        def execute(scheduled, *args):
            self._scheduled = scheduled
            return inner_execute(scheduled, *args)

        self.engine.runner.execute = execute
        inner_step = self.engine.step

        def step():
            start = time.perf_counter()
            out = inner_step()
            sync(self.device)
            if self._scheduled:
                nbytes = self.weight_bytes + sum(s.end for s in self._scheduled) * self.kv_bytes
                decode = all(s.end - s.start == 1 for s in self._scheduled)
                self.steps.append((time.perf_counter() - start, nbytes, decode))
            self._scheduled = None
            return out

        self.engine.step = step

    def roofline(self, bandwidth: float) -> dict:
        def fraction(rows):
            seconds = sum(r[0] for r in rows)
            return sum(r[1] for r in rows) / bandwidth / seconds if seconds else None

        decode = [r for r in self.steps if r[2]]
        return dict(num_steps=len(self.steps), num_decode_steps=len(decode),
                    decode_step_ms=1e3 * sum(r[0] for r in decode) / len(decode) if decode else None,
                    roofline_fraction_decode=fraction(decode), roofline_fraction_all=fraction(self.steps))


def run_engine(llm: LLM, recorder: StepRecorder, prompts, outputs, label: str) -> dict:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in outputs]
    warm = prompts[:2]
    llm.generate(warm, [SamplingParams(max_tokens=2, ignore_eos=True)] * len(warm), use_tqdm=False)  # warm-up
    recorder.steps.clear()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    seconds = time.perf_counter() - start
    generated = sum(len(o.token_ids) for o in outs)
    assert generated == sum(outputs), "ignore_eos requests must generate exactly max_tokens"
    n_in = sum(map(len, prompts))
    print(f"{label}: {generated / seconds:.1f} output tok/s, {(generated + n_in) / seconds:.1f} total tok/s "
          f"({seconds:.1f} s)", flush=True)
    return dict(seconds=seconds, input_tokens=n_in, output_tokens=generated,
                output_tokens_per_s=generated / seconds, total_tokens_per_s=(generated + n_in) / seconds)


@torch.inference_mode()
def run_reference(model, prompts, outputs) -> dict:
    """The reference implementation's generation: a full dense forward over the sequence for every token."""
    device = model.tok_embeddings.weight.device
    generated = 0
    start = time.perf_counter()
    for prompt, n_out in tqdm(list(zip(prompts, outputs)), desc="reference-style"):
        tokens = list(prompt)
        for _ in range(n_out):
            logits = model.score([tokens])[0][-1]
            tokens.append(int(torch.argmax(logits)))
            generated += 1
    sync(device)
    seconds = time.perf_counter() - start
    print(f"reference-style: {generated / seconds:.2f} output tok/s ({seconds:.1f} s)", flush=True)
    return dict(seconds=seconds, output_tokens=generated, output_tokens_per_s=generated / seconds)


def bench_model(path: str, args, device: torch.device, bandwidth: float) -> dict:
    cfg, model, weight_bytes, kv_per_token = build_bench_model(path, args.dtype, device)
    llm = LLM(model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              attention_backend=args.backend, enforce_eager=args.enforce_eager,
              overlap_steps={"auto": None, "on": True, "off": False}[args.overlap_steps])
    recorder = StepRecorder(llm, weight_bytes, kv_per_token, device)
    vocab = cfg.vocab_size
    result = dict(config=path, backend=llm.engine.runner.backend_name, cuda_graphs=llm.engine.runner.cuda_graphs,
                  overlap_steps=llm.engine.overlap_steps,
                  weight_bytes=weight_bytes, kv_bytes_per_token=kv_per_token)
    prompts, outputs = workload(args.num_seqs, args.min_len, args.max_len, vocab, args.seed)
    result["workload_a"] = run_engine(llm, recorder, prompts, outputs, f"{Path(path).stem} (a)")
    result["workload_a"].update(recorder.roofline(bandwidth))
    result["sweep"] = []
    for spec in args.sweep:
        n_in, n_out = map(int, spec.split("x"))
        prompts, outputs = workload(args.num_seqs, 0, 0, vocab, args.seed, fixed=(n_in, n_out))
        row = run_engine(llm, recorder, prompts, outputs, f"{Path(path).stem} {spec}")
        result["sweep"].append(dict(input_len=n_in, output_len=n_out, **row, **recorder.roofline(bandwidth)))
    if args.reference_seqs:
        prompts, outputs = workload(args.reference_seqs, 0, 0, vocab, args.seed + 1,
                                    fixed=(args.reference_input, args.reference_output))
        ours = run_engine(llm, recorder, prompts, outputs, f"{Path(path).stem} reduced")
        ref = run_reference(model, prompts, outputs)
        result["reduced"] = dict(mta_serve=ours, reference_style=ref,
                                 speedup=ours["output_tokens_per_s"] / ref["output_tokens_per_s"])
    del llm, model, recorder
    release(device)
    return result


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("throughput.py: matplotlib is not installed; no plot (pip install -e '.[bench]')", file=sys.stderr)
        return
    models = result["models"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    names = [Path(m["config"]).stem for m in models]
    ax1.bar(names, [m["workload_a"]["output_tokens_per_s"] for m in models])
    ax1.set_ylabel("output tokens/s, workload (a)")
    if any(m["sweep"] for m in models):
        for m, name in zip(models, names):
            ax2.plot([f"{r['input_len']}x{r['output_len']}" for r in m["sweep"]],
                     [r["output_tokens_per_s"] for r in m["sweep"]], "o-", label=name)
        ax2.set_ylabel("output tokens/s, fixed INxOUT sweep")
        ax2.legend()
    else:  # no sweep: how close each model's decode steps come to the roofline
        ax2.bar(names, [100 * (m["workload_a"]["roofline_fraction_decode"] or 0) for m in models])
        ax2.set_ylabel("% of decode roofline, workload (a)")
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--overlap-steps", choices=["auto", "on", "off"], default="auto",
                   help="launch each step before the previous one's outputs are built (auto: on CUDA)")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--sweep", nargs="*", default=[], metavar="INxOUT")
    p.add_argument("--reference-seqs", type=int, default=4)
    p.add_argument("--reference-input", type=int, default=256)
    p.add_argument("--reference-output", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "throughput.json"))
    p.add_argument("--plot", help="write a PNG of the results")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s on {args.device}", flush=True)
    models = [bench_model(path, args, device, bandwidth) for path in args.models]
    result = dict(**run_info(device, bandwidth), args=vars(args), models=models)
    if len(models) >= 2:
        result["ratio_first_to_second_workload_a"] = (models[0]["workload_a"]["output_tokens_per_s"]
                                                      / models[1]["workload_a"]["output_tokens_per_s"])
        print(f"{Path(models[0]['config']).stem} / {Path(models[1]['config']).stem} output tok/s on (a): "
              f"{result['ratio_first_to_second_workload_a']:.3f}")
    write_result(args.out, result)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

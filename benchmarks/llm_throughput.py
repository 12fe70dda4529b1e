"""Offline generation throughput of `LLM.generate` for a few request counts.

  python benchmarks/llm_throughput.py [--config configs/tiny.yaml] [--num-requests 1 16] \
      [--prompt-len 64] [--output-len 64] [--device cpu] [--backend auto|torch|triton]

Every request has a random prompt of --prompt-len tokens and generates exactly --output-len tokens
(ignore_eos). Prints a table and saves JSON (hardware, commit and command included).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from common import ROOT, commit
from mta_serve.config import ModelConfig
from mta_serve.llm import LLM
from mta_serve.model import build_model
from mta_serve.sampling_params import SamplingParams


def measure(llm: LLM, num_requests: int, prompt_len: int, output_len: int, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(num_requests)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for _ in range(num_requests)]
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    generated = sum(len(o.token_ids) for o in outs)
    return {"num_requests": num_requests, "seconds": seconds, "output_tokens": generated,
            "output_tokens_per_s": generated / seconds,
            "total_tokens_per_s": (generated + num_requests * prompt_len) / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--num-requests", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"], help="attention backend")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llm_throughput_cpu.json"))
    args = p.parse_args()

    cfg = ModelConfig.from_yaml(args.config)
    model = build_model(cfg, seed=0, mta_init="random", device=args.device)
    llm = LLM(model, max_num_seqs=max(args.num_requests), attention_backend=args.backend)
    rows = [measure(llm, n, args.prompt_len, args.output_len, cfg.vocab_size) for n in args.num_requests]
    print(f"{'requests':>9} {'seconds':>9} {'output tok/s':>13} {'total tok/s':>12}")
    for r in rows:
        print(f"{r['num_requests']:>9} {r['seconds']:>9.2f} {r['output_tokens_per_s']:>13.1f} "
              f"{r['total_tokens_per_s']:>12.1f}")
    result = {"command": " ".join(["python"] + sys.argv), "config": args.config, "device": args.device,
              "backend": llm.engine.runner.backend_name,
              "prompt_len": args.prompt_len, "output_len": args.output_len, "torch": torch.__version__,
              "cpu_threads": torch.get_num_threads(), "machine": platform.machine(), "commit": commit(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

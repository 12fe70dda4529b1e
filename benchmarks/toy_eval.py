"""Score a served toy-task model through a running server's /v1/completions.

  python benchmarks/toy_eval.py --url http://127.0.0.1:8000 --model NAME [--n 1000] [--concurrency 16]
      [--api-key KEY] [--out benchmarks/results/toy_eval_NAME.json]

Each test sample's prompt (the 52 blocks, '#', the query; no BOS: the server's char tokenizer adds it) is sent
with greedy decoding (temperature 0) and max_tokens 6 (the 5 answer letters, then EOS). A sample is correct when
the first 5 generated characters equal the target block exactly. Prints the error % and saves JSON with the
settings, counts, timing and a few wrong answers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import time
from pathlib import Path

import httpx

from mta_serve import toy_task

ROOT = Path(__file__).resolve().parents[1]


async def complete(client: httpx.AsyncClient, sem: asyncio.Semaphore, model: str, prompt: str) -> str:
    """The greedy completion text of one prompt."""
    body = {"model": model, "prompt": prompt, "max_tokens": toy_task.BLOCK_LEN + 1, "temperature": 0}
    async with sem:
        resp = await client.post("/v1/completions", json=body)
    if resp.status_code != 200:
        raise RuntimeError(f"/v1/completions answered {resp.status_code}: {resp.text[:300]}")
    return resp.json()["choices"][0]["text"]


async def evaluate(url: str, model: str, samples: list[toy_task.ToySample], concurrency: int,
                   api_key: str | None, timeout: float) -> list[str]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as client:
        return await asyncio.gather(*(complete(client, sem, model, s.prompt) for s in samples))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="served model name (GET /v1/models lists it)")
    p.add_argument("--n", type=int, default=toy_task.TEST_SIZE, help="first N samples of the toy test set")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/toy_eval_NAME.json)")
    args = p.parse_args()

    samples = toy_task.test_set(args.n)
    start = time.perf_counter()
    texts = asyncio.run(evaluate(args.url, args.model, samples, args.concurrency, args.api_key, args.timeout))
    seconds = time.perf_counter() - start
    wrong = [(s, t) for s, t in zip(samples, texts) if t[:toy_task.BLOCK_LEN] != s.answer]
    error_pct = 100.0 * len(wrong) / len(samples)
    print(f"{args.model}: error {error_pct:.1f}% ({len(wrong)}/{len(samples)} wrong) in {seconds:.1f} s "
          f"({len(samples) / seconds:.1f} req/s, concurrency {args.concurrency})")

    result = {
        "model": args.model, "url": args.url, "n": len(samples), "test_seed": toy_task.TEST_SEED,
        "wrong": len(wrong), "error_pct": error_pct, "seconds": seconds, "concurrency": args.concurrency,
        "request": {"max_tokens": toy_task.BLOCK_LEN + 1, "temperature": 0},
        "examples_wrong": [{"query": s.query, "answer": s.answer, "generated": t} for s, t in wrong[:20]],
        "host": platform.node(),
    }
    safe_name = re.sub(r"[^A-Za-z0-9._-]", "_", args.model)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"toy_eval_{safe_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()

"""Online serving benchmark: an async load generator against a live OpenAI-compatible server.

For each request rate (Poisson arrivals; `inf` sends everything at once) and each client-side concurrency
cap, it sends --num-prompts streaming /v1/completions requests (random token-id prompts of --input-len
tokens, or --dataset toy: the toy task's test prompts), each generating exactly --output-len tokens
(ignore_eos), and reports, with the definitions of
`vllm bench serve`:

- TTFT: time from sending a request to its first streamed chunk;
- TPOT: per request, (E2EL - TTFT) / (output tokens - 1), requests with more than one output token;
- ITL: the gaps between consecutive streamed chunks of a request, over all requests;
- E2EL: time from sending a request to the end of its response;
- request, output-token and total-token throughput over the run's wall time;
- goodput: requests per second that met every --goodput target (e.g. ttft:500 tpot:50 e2el:2000, in ms).

    python benchmarks/serving.py --url http://127.0.0.1:8000 --model NAME [--num-prompts 200] \
        [--input-len 256] [--output-len 128] [--request-rate inf 8 32] [--max-concurrency 0 64] \
        [--goodput ttft:500 tpot:50] [--out benchmarks/results/serving.json] [--plot serving.png]

PNG plots need matplotlib (`pip install -e ".[bench]"`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PERCENTILES = (50, 90, 95, 99)


@dataclass
class RequestRecord:
    sent: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk carrying a choice
    end: float | None = None  # when the response was complete (after [DONE])
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent

    @property
    def e2el(self) -> float:
        return (self.end if self.end is not None else self.chunk_times[-1]) - self.sent


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(records: list[RequestRecord], duration: float, goodput: dict[str, float]) -> dict:
    """vllm-bench-serve metrics of one run, times in ms."""
    ok = [r for r in records if r.error is None and r.end is not None and r.chunk_times]
    ttft = [r.ttft * 1e3 for r in ok]
    tpot = [(r.e2el - r.ttft) * 1e3 / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [(b - a) * 1e3 for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    e2el = [r.e2el * 1e3 for r in ok]
    good = [r for r in ok if _meets(r, goodput)]
    out = dict(completed=len(ok), failed=len(records) - len(ok), duration_s=duration,
               request_throughput=len(ok) / duration,
               output_throughput=sum(r.output_tokens for r in ok) / duration,
               total_token_throughput=sum(r.output_tokens + r.prompt_tokens for r in ok) / duration,
               goodput=len(good) / duration if goodput else None, goodput_targets_ms=goodput,
               errors=sorted({r.error for r in records if r.error})[:5])
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        out[f"mean_{name}_ms"] = sum(values) / len(values) if values else float("nan")
        for q in PERCENTILES:
            out[f"p{q}_{name}_ms"] = percentile(values, q)
    return out


def _meets(r: RequestRecord, targets: dict[str, float]) -> bool:
    tpot = (r.e2el - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
    values = {"ttft": r.ttft, "tpot": tpot, "e2el": r.e2el}
    return all(values[k] * 1e3 <= limit for k, limit in targets.items())


async def _send(client: httpx.AsyncClient, url: str, model: str, prompt: list[int] | str, output_len: int,
                record: RequestRecord) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                record.error = f"HTTP {resp.status_code}"
                await resp.aread()
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    record.error = str(event["error"].get("message"))[:120]
                    return
                if event.get("usage") and not event["choices"]:
                    record.output_tokens = event["usage"]["completion_tokens"]
                    record.prompt_tokens = event["usage"]["prompt_tokens"]
                elif event["choices"]:  # like vllm bench serve: every choice chunk, even with empty text
                    record.chunk_times.append(time.perf_counter())
            record.end = time.perf_counter()
    except httpx.HTTPError as exc:
        record.error = type(exc).__name__


async def run(url: str, model: str, prompts: list[list[int]] | list[str], output_len: int, rate: float,
              concurrency: int, seed: int = 0) -> tuple[list[RequestRecord], float]:
    """Send every prompt (Poisson arrivals at `rate` per second; at most `concurrency` in flight, 0 = no
    cap); return the records and the wall time."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency) if concurrency > 0 else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    records: list[RequestRecord] = []

    async def one(prompt):
        if gate:
            async with gate:
                await _one(prompt)
        else:
            await _one(prompt)

    async def _one(prompt):
        record = RequestRecord(sent=time.perf_counter())
        records.append(record)
        await _send(client, url, model, prompt, output_len, record)

    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(one(prompt)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        return records, time.perf_counter() - start


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def parse_goodput(items: list[str]) -> dict[str, float]:
    targets = {}
    for item in items:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not value:
            raise SystemExit(f"serving.py: error: invalid --goodput {item!r}: allowed ttft:MS, tpot:MS, e2el:MS")
        targets[key] = float(value)
    return targets


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("serving.py: matplotlib is not installed; no plot (pip install -e '.[bench]')", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric in zip(axes, ("p99_ttft_ms", "p99_tpot_ms", "p99_e2el_ms")):
        for conc in sorted({r["max_concurrency"] for r in rows}):
            sel = sorted((r for r in rows if r["max_concurrency"] == conc), key=lambda r: r["request_rate"])
            ax.plot([r["output_throughput"] for r in sel], [r[metric] for r in sel], "o-",
                    label=f"concurrency {conc or 'unlimited'}")
        ax.set_xlabel("output tokens/s (request rate rising along each line)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(True)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=256, help="prompt token ids are drawn from [0, vocab)")
    p.add_argument("--dataset", choices=["random", "toy"], default="random",
                   help="random token ids, or the toy task's test prompts (text; --input-len is ignored)")
    p.add_argument("--request-rate", type=float, nargs="+", default=[float("inf")])
    p.add_argument("--max-concurrency", type=int, nargs="+", default=[0], help="0 = no cap")
    p.add_argument("--goodput", nargs="*", default=[], metavar="METRIC:MS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write results as JSON")
    p.add_argument("--plot", help="write latency-vs-throughput plots as PNG")
    args = p.parse_args()
    targets = parse_goodput(args.goodput)
    if args.dataset == "toy":
        from mta_serve import toy_task

        prompts = [s.prompt for s in toy_task.test_set(args.num_prompts)]
    else:
        prompts = random_prompts(args.num_prompts, args.input_len, args.vocab, args.seed)
    rows = []
    for rate in args.request_rate:
        for conc in args.max_concurrency:
            records, duration = asyncio.run(run(args.url, args.model, prompts, args.output_len, rate, conc,
                                                args.seed))
            row = dict(request_rate=rate, max_concurrency=conc, **summarize(records, duration, targets))
            rows.append(row)
            print(f"rate {rate:>6} conc {conc or '-':>4}: {row['completed']} ok, {row['failed']} failed, "
                  f"{row['request_throughput']:.2f} req/s, {row['output_throughput']:.1f} out tok/s, "
                  f"TTFT p50/p99 {row['p50_ttft_ms']:.1f}/{row['p99_ttft_ms']:.1f} ms, "
                  f"TPOT p50/p99 {row['p50_tpot_ms']:.1f}/{row['p99_tpot_ms']:.1f} ms", flush=True)
    result = dict(command=" ".join(["python"] + sys.argv), url=args.url, model=args.model,
                  num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                  date=time.strftime("%Y-%m-%d"), rows=rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.out}")
    if args.plot:
        plot(rows, args.plot)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

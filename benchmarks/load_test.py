"""Overload test of a live mta-serve: many concurrent streaming clients, a share of them disconnecting
mid-stream, more clients than the queue admits. Every request must end as exactly one of: completed (a
finish_reason, a usage chunk and [DONE], as many text chunks as completion tokens), aborted by its own
client, or rejected with 429. Afterwards the server must be idle (no running or waiting request, no KV
block in use), its finished-request counters must account for what the clients saw (`accounted`), /health
must have answered 200 throughout, and its resident memory must stay flat across rounds.

    python benchmarks/load_test.py --url http://127.0.0.1:8000 --model NAME [--clients 512] \
        [--rounds 20] [--disconnect 0.25] [--max-tokens 32] [--pid SERVER_PID] [--out FILE]

`tests/test_load.py` runs a short version of the same rounds in CI.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

OUTCOMES = ("completed", "client_abort", "rejected_429")


@dataclass
class RoundResult:
    outcomes: Counter = field(default_factory=Counter)  # outcome -> count; anything else is a failure
    failures: list[str] = field(default_factory=list)  # what went wrong, one line per bad request
    health_checks: int = 0
    health_failures: int = 0
    health_max_s: float = 0.0
    seconds: float = 0.0


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
               disconnect_after: int | None, result: RoundResult) -> None:
    # A client that will leave asks for far more tokens than it reads, so its request is still running on
    # the server when the disconnect lands: it can only end as an abort there.
    if disconnect_after is not None:
        max_tokens *= 10
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code == 429:
                await resp.aread()
                result.outcomes["rejected_429"] += 1
                return
            if resp.status_code != 200:
                result.failures.append(f"status {resp.status_code}: {(await resp.aread())[:200]!r}")
                return
            await _read_stream(resp, disconnect_after, result)
    except (httpx.HTTPError, ValueError) as exc:
        result.failures.append(f"{type(exc).__name__}: {exc}")


async def _read_stream(resp: httpx.Response, disconnect_after: int | None, result: RoundResult) -> None:
    chunks, finishes, usage, done = 0, 0, None, 0
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done += 1
            continue
        event = json.loads(line[6:])
        if "error" in event:
            result.failures.append(f"error event: {event['error']}")
            return
        if event.get("usage") and not event["choices"]:
            usage = event["usage"]
            continue
        choice = event["choices"][0]
        if choice.get("text"):
            chunks += 1
        finishes += choice.get("finish_reason") is not None
        if disconnect_after is not None and chunks >= disconnect_after:
            result.outcomes["client_abort"] += 1
            return  # leaving the context closes the connection mid-stream
    if done != 1 or finishes != 1 or usage is None:
        result.failures.append(f"incomplete stream: [DONE] x{done}, finish x{finishes}, usage {usage}")
    elif usage["completion_tokens"] < chunks:
        result.failures.append(f"{chunks} text chunks for {usage['completion_tokens']} completion tokens")
    else:
        result.outcomes["completed"] += 1


async def _watch_health(client: httpx.AsyncClient, url: str, stop: asyncio.Event, result: RoundResult) -> None:
    while not stop.is_set():
        start = time.monotonic()
        try:
            ok = (await client.get(url + "/health", timeout=30)).status_code == 200
        except httpx.HTTPError:
            ok = False
        result.health_checks += 1
        result.health_failures += not ok
        result.health_max_s = max(result.health_max_s, time.monotonic() - start)
        await asyncio.sleep(0.1)


async def run_round(url: str, model: str, clients: int, disconnect: float, max_tokens: int,
                    seed: int = 0) -> RoundResult:
    """`clients` simultaneous streaming requests; a `disconnect` share of them leaves after 1-3 chunks."""
    rng = random.Random(seed)
    result = RoundResult()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client, \
            httpx.AsyncClient(timeout=30) as health_client:
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch_health(health_client, url, stop, result))
        start = time.monotonic()
        await asyncio.gather(*(
            _one(client, url, model, f"load test {seed} {i}: " + "abc " * rng.randint(1, 12), max_tokens,
                 rng.randint(1, 3) if rng.random() < disconnect else None, result)
            for i in range(clients)))
        result.seconds = time.monotonic() - start
        stop.set()
        await watcher
    return result


def server_counters(url: str) -> dict[str, float]:
    """Finished requests by reason and the idle gauges, from /metrics."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for name, key in (("vllm:num_requests_running", "running"), ("vllm:num_requests_waiting", "waiting"),
                      ("vllm:kv_cache_usage_perc", "kv_usage")):
        out[key] = float(re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))
    for reason in ("stop", "length", "abort"):
        match = re.search(rf'^vllm:request_success_total\{{[^}}]*finished_reason="{reason}"[^}}]*\}} (\S+)$',
                          text, re.M)
        out[reason] = float(match.group(1)) if match else 0.0
    return out


def accounted(outcomes: dict, server_completed: float, server_aborted: float) -> bool:
    """Every request the clients did not see rejected ended exactly once on the server, completed or aborted,
    and every client that read a whole stream is among the server's completions. Only the sum is exact: a
    client that leaves just as its last token arrives counts an abort for a request the server completed."""
    return (server_completed + server_aborted == outcomes["completed"] + outcomes["client_abort"]
            and server_completed >= outcomes["completed"])


def wait_idle(url: str, timeout: float = 60.0) -> dict[str, float]:
    """Counters once nothing runs or waits (aborts of disconnected streams land a moment after the client
    leaves)."""
    deadline = time.monotonic() + timeout
    while True:
        counters = server_counters(url)
        if (counters["running"] == 0 and counters["waiting"] == 0) or time.monotonic() > deadline:
            return counters
        time.sleep(0.2)


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * 4096


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, default=512, help="simultaneous streaming clients per round")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--disconnect", type=float, default=0.25, help="share of clients that leave mid-stream")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--pid", type=int, help="the server's pid, to track its resident memory")
    p.add_argument("--out", help="write the per-round results as JSON")
    args = p.parse_args()
    rounds, ok = [], True
    for i in range(args.rounds):
        before = wait_idle(args.url)
        result = asyncio.run(run_round(args.url, args.model, args.clients, args.disconnect, args.max_tokens, i))
        after = wait_idle(args.url)
        completed = (after["stop"] + after["length"]) - (before["stop"] + before["length"])
        row = dict(round=i, seconds=result.seconds, outcomes=dict(result.outcomes), failures=result.failures[:5],
                   num_failures=len(result.failures), server_completed=completed,
                   server_aborted=after["abort"] - before["abort"], idle=after,
                   health=dict(checks=result.health_checks, failures=result.health_failures,
                               max_s=result.health_max_s),
                   rss_bytes=resident_bytes(args.pid) if args.pid else None)
        good = (not result.failures and sum(result.outcomes.values()) == args.clients
                and accounted(result.outcomes, completed, row["server_aborted"]) and after["kv_usage"] == 0
                and not result.health_failures)
        ok &= good
        rounds.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(args=vars(args), rounds=rounds, passed=ok), indent=1))
    print("load test " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/serving.py: its metric definitions on hand-made timings, and a real run against the server."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY_RANDOM, Server

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import serving  # noqa: E402


def test_metrics_follow_vllm_bench_serve_definitions():
    a = serving.RequestRecord(sent=0.0, chunk_times=[0.1, 0.2, 0.4], end=0.4, output_tokens=3, prompt_tokens=10)
    b = serving.RequestRecord(sent=1.0, chunk_times=[1.3, 1.4], end=1.4, output_tokens=2, prompt_tokens=10)
    failed = serving.RequestRecord(sent=2.0, error="HTTP 500")
    m = serving.summarize([a, b, failed], duration=2.0, goodput={"ttft": 200.0})
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)  # (100 + 300) / 2
    # TPOT of a: (400 - 100) / (3 - 1) = 150 ms; of b: (400 - 300) / (2 - 1) = 100 ms
    assert m["mean_tpot_ms"] == pytest.approx(125.0)
    assert m["p90_tpot_ms"] == pytest.approx(145.0)
    assert sorted([m["p50_itl_ms"], m["mean_itl_ms"]]) == pytest.approx([100.0, 400 / 3])  # gaps 100, 200, 100
    assert m["mean_e2el_ms"] == pytest.approx(400.0)
    assert m["output_throughput"] == pytest.approx(2.5) and m["total_token_throughput"] == pytest.approx(12.5)
    assert m["goodput"] == pytest.approx(0.5)  # only a has TTFT <= 200 ms
    assert serving.percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)


def test_live_run_and_cli(tmp_path):
    srv = Server(*TINY_RANDOM)
    try:
        prompts = serving.random_prompts(12, 20, 256, seed=1)
        records, duration = asyncio.run(serving.run(srv.url, "mta-tiny-random", prompts, 6, float("inf"), 4))
        assert len(records) == 12 and all(r.error is None for r in records)
        assert all(r.output_tokens == 6 and r.prompt_tokens == 20 for r in records)
        assert all(0 < r.ttft <= r.e2el < duration for r in records)
        out = tmp_path / "serving.json"
        done = subprocess.run([sys.executable, str(BENCH / "serving.py"), "--url", srv.url, "--model",
                               "mta-tiny-random", "--num-prompts", "8", "--input-len", "16", "--output-len", "4",
                               "--request-rate", "inf", "20", "--max-concurrency", "0", "2", "--goodput",
                               "ttft:60000", "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        rows = json.loads(out.read_text())["rows"]
        assert len(rows) == 4 and all(r["completed"] == 8 and r["failed"] == 0 for r in rows)
        assert all(r["goodput"] == pytest.approx(r["request_throughput"]) for r in rows)
    finally:
        srv.stop()


def test_plots_are_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    import throughput

    rows = [dict(request_rate=r, max_concurrency=c, output_throughput=t, p99_ttft_ms=1.0, p99_tpot_ms=2.0,
                 p99_e2el_ms=3.0) for r, c, t in ((float("inf"), 0, 9.0), (4.0, 0, 5.0), (4.0, 8, 4.0))]
    serving.plot(rows, str(tmp_path / "serving.png"))
    model = dict(config="a.yaml", workload_a=dict(output_tokens_per_s=3.0),
                 sweep=[dict(input_len=8, output_len=4, output_tokens_per_s=2.0)])
    throughput.plot(dict(models=[model, dict(model, config="b.yaml")]), str(tmp_path / "throughput.png"))
    for name in ("serving.png", "throughput.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

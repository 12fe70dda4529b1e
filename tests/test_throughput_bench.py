"""The benchmark scripts end to end on the CPU: benchmarks/throughput.py with two tiny models and a tiny
workload must run every part (workload (a), a sweep, the reduced reference-style comparison, the roofline)
and write JSON whose numbers are consistent with the workload it generated; step_profile.py,
host_overhead.py and launch_chain.py likewise, small."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "throughput.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--models", str(ROOT / "configs" / "tiny.yaml"),
         str(ROOT / "configs" / "toy_baseline.yaml"), "--device", "cpu", "--num-seqs", "4", "--min-len", "4",
         "--max-len", "12", "--sweep", "8x4", "--reference-seqs", "2", "--reference-input", "6",
         "--reference-output", "3", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["models"]) == 2 and result["copy_bandwidth_gbps"] > 0
    for model in result["models"]:
        a = model["workload_a"]
        assert 4 * 4 <= a["output_tokens"] <= 4 * 12 and a["output_tokens_per_s"] > 0
        assert a["num_decode_steps"] > 0 and 0 < a["roofline_fraction_decode"]
        assert model["sweep"][0]["output_tokens"] == 4 * 4 and model["sweep"][0]["input_tokens"] == 4 * 8
        assert model["reduced"]["reference_style"]["output_tokens"] == 2 * 3 and model["reduced"]["speedup"] > 0
    ratio = result["models"][0]["workload_a"]["output_tokens_per_s"] / result["models"][1]["workload_a"][
        "output_tokens_per_s"]
    assert abs(result["ratio_first_to_second_workload_a"] - ratio) < 1e-9


def test_step_profile_runs_and_reports(tmp_path):
    """benchmarks/step_profile.py on the CPU (no CUDA events or profiler there): the rows it reports must
    be consistent with the bounds it computes from the measured copy bandwidth."""
    out = tmp_path / "step_profile.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_profile.py"), "--models", str(ROOT / "configs" / "tiny.yaml"),
         "--device", "cpu", "--batch", "1", "3", "--context", "40", "48", "--steps", "5", "--warmup-steps", "1",
         "--profile-steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["batch"] for r in rows] == [1, 1, 3, 3] and result["copy_bandwidth_gbps"] > 0
    for row, context in zip(rows, [40, 48, 40, 48]):
        # at context 40, prompts of 40 - (1 + 5 + 2 + 2) - 1 - 2 = 27 tokens (+ 2: an untimed step before the
        # warm-up and the timed steps; 2: the fill steps' margin, so that no request ends during the timed
        # steps); the 5 timed steps attend to 27 + 1 + 1 + 2 = 31 .. 35 keys (at 48: 39 .. 43)
        assert row["step_ms"] > 0 and row["mean_context"] == context - 7
        assert abs(row["step_over_roofline"] - row["step_ms"] / row["roofline_ms"]) < 1e-9
        assert row["roofline_ms"] > row["weight_bound_ms"] > 0
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_profile.py"), "--context", "5"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--context 5 must exceed" in bad.stderr
    too_long = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_profile.py"), "--models",
                               str(ROOT / "configs" / "tiny.yaml"), "--context", "64", "600"],
                              capture_output=True, text=True, timeout=120)
    assert too_long.returncode == 2 and "--context 600 exceeds" in too_long.stderr
    assert "max_seq_len 512" in too_long.stderr


def test_host_overhead_runs_and_reports(tmp_path):
    """benchmarks/host_overhead.py: the engine's host path of decode steps with the forward stubbed out;
    its parts must fit inside the step."""
    out = tmp_path / "host.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--batch", "3",
                           "--context", "64", "--steps", "20", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["overlap_steps"]) for r in rows] == [(3, False), (3, True)]
    for row in rows:
        assert 0 < row["launch_ms"] < row["step_ms"] and 0 < row["outputs_ms"] < row["step_ms"]
        assert row["schedule_ms"] + row["runner_ms"] + row["sample_launch_ms"] <= row["launch_ms"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU check; on CUDA the script times the chain")
def test_launch_chain_checks_its_chain_on_the_cpu():
    """benchmarks/launch_chain.py without CUDA: the interpreter runs the chain of link kernels and the
    persistent kernel's chain, and the script checks that every link added to what the one before it
    wrote; without the interpreter it says how to run it."""
    script = [sys.executable, str(ROOT / "benchmarks" / "launch_chain.py"), "--links", "6"]
    done = subprocess.run(script, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0 and "6 links checked on the CPU (kernels and persistent)" in done.stdout, \
        done.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    refused = subprocess.run(script, capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 2 and "TRITON_INTERPRET=1" in refused.stderr

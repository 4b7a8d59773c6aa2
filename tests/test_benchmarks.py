"""The GPU scripts run only on a lent GPU machine, for a few minutes in all: each is tried here on the CPU first
(their --smoke / --small modes run the same code on CPU-sized work), so a broken import or argument is found before
it costs GPU time."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_gpu_checks_numerics_and_stage0_run_on_the_cpu():
    out = run("benchmarks/gpu_checks.py", "--smoke", "--parts", "numerics,stage0")
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith(("| check", "| ---"))]
    assert len(rows) == 5, out  # two Llama rows, two Audio-MAE rows, the stage-0 step
    assert all(line.rstrip().endswith("| ok |") for line in rows), out
    assert "paper stage 0, one step at batch 16" in out


def test_gpu_step_benchmark_runs_on_the_cpu_and_profiles():
    out = run("benchmarks/bench_gpu_step.py", "--small", "--batch", "2", "--profile")
    assert "MFU" in out and "aten::mm" in out, out

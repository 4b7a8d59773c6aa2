"""The GPU scripts run only on a lent GPU machine, for a few minutes in all: each is tried here on the CPU first
(their --smoke / --small modes run the same code on CPU-sized work), so a broken import or argument is found before
it costs GPU time."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_script as run

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_checks_numerics_and_stage0_run_on_the_cpu():
    out = run("benchmarks/gpu_checks.py", "--smoke", "--parts", "numerics,stage0", "--batch", "8", "--windows", "3")
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith(("| check", "| ---"))]
    assert len(rows) == 5, out  # two Llama rows, two Audio-MAE rows, the stage-0 step
    assert all(line.rstrip().endswith("| ok |") for line in rows), out
    assert "paper stage 0, one step at batch 8, 3 window(s) a clip" in out


def test_gpu_checks_training_runs_on_the_cpu(tmp_path):
    """The GPU's training check (every stage, stage 1 in fp32 and with compiled LLM blocks against the
    precision=auto run, evaluate.py --task all) on the miniature, here on the CPU, where precision=auto is fp32: a
    test of the script, not of bf16. Each row ok, its log written."""
    out = run("benchmarks/gpu_checks.py", "--smoke", "--parts", "training", "--out", str(tmp_path))
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith(("| check", "| ---"))]
    assert len(rows) == 10 and all(line.rstrip().endswith("| ok |") for line in rows), out
    assert "stage 1, first step's loss: bf16, compiled LLM blocks vs fp32 (same batch)" in out
    assert "$ evaluate.py --task all" in (tmp_path / "gpu_training.log").read_text()


def test_gpu_checks_exit_status_fails_when_any_check_fails(monkeypatch, tmp_path, capsys):
    """run_gpu.sh and a user read the exit status: non-zero when one check fails, even if the others pass."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as the script runs
    from benchmarks import gpu_checks

    for results, failed in (((True, False, True), True), ((True, True), False)):
        monkeypatch.setattr(gpu_checks, "ROWS", [])
        monkeypatch.setattr(gpu_checks, "numerics", lambda results=results: [
            gpu_checks.row(f"check {i}", "x", ok) for i, ok in enumerate(results)])
        monkeypatch.setattr(sys, "argv", ["gpu_checks.py", "--smoke", "--parts", "numerics", "--out", str(tmp_path)])
        with pytest.raises(SystemExit) as stop:
            gpu_checks.main()
        assert bool(stop.value.code) is failed and capsys.readouterr().out.count("| FAIL |") == (not all(results))


def test_audio_benchmark_prints_its_ratios_and_the_decode_threads_one():
    """Each ratio is the reference's time over ours (> 1: ours is faster), of the times it prints; clips/s are the
    files over their time; the tiny encoder runs the first of its two blocks (output_block -2), and so does the
    reference."""
    out = run("benchmarks/bench_audio.py", "--sizes", "tiny", "--repeats", "1", "--threads", "2")
    num = r"([\d.]+)"
    said = re.search(rf"{num} clips/s file->features \((\d+) files in {num} ms\)", out)
    clips, files, ours = map(float, said.groups())
    assert files == 8 and clips == pytest.approx(8 / (ours / 1e3), rel=0.05), out
    for pattern in (rf"front end {num} ms for 8 files, 2 decode threads {num} ms \({num}x\)",
                    rf"fbank {num} ms vs torchaudio {num} ms \({num}x\)",
                    rf"encoder {num} ms vs transformers ViT {num} ms \({num}x\)"):
        first, second, ratio = map(float, re.search(pattern, out).groups())
        reference, mine = (first, second) if pattern.startswith("front") else (second, first)  # one thread: ref
        rounding = 0.006 + ratio * 0.05 * (1 / mine + 1 / reference)  # the ratio's last digit, the times' 0.1 ms
        assert abs(reference / mine - ratio) <= rounding, (pattern, out)  # the ratio of what it printed
    assert "tiny encoder (cpu, torch.float32, 16 windows, 1 blocks run)" in out, out


def test_llama_benchmark_generates_transformers_tokens_and_prints_its_ratios():
    """bench_llama.py: our greedy generation gives transformers' tokens (a prompt shorter than its usual 64 too), and
    each ratio is transformers' time over ours, of the times it prints."""
    out = run("benchmarks/bench_llama.py", "--batch", "2", "--seq", "32", "--new-tokens", "4", "--repeats", "1",
              "--threads", "2")
    ours, keep16, ratio16, every, ratio_all = map(float, re.search(
        r"\(a\) fwd\+bwd B=2 T=32: ours ([\d.]+) ms \| transformers, logits_to_keep=16 ([\d.]+) ms -> ratio ([\d.]+)x "
        r"\| transformers, all logits \(logits_to_keep=0\) ([\d.]+) ms -> ratio ([\d.]+)x", out).groups())
    for theirs, ratio in ((keep16, ratio16), (every, ratio_all)):  # times printed to 0.1 ms, ratios to 0.01
        assert abs(theirs / ours - ratio) <= 0.006 + ratio * (0.05 / ours + 0.05 / theirs), out
    mine, theirs, ratio = map(float, re.search(r"\(b\) greedy B=2 prompt=32 new=4: ours (\d+) tok/s \| transformers "
                                               r"(\d+) tok/s -> ratio ([\d.]+)x \(tokens identical: 100%\)",
                                               out).groups())
    assert abs(mine / theirs - ratio) <= ratio * (0.5 / mine + 0.5 / theirs) + 0.006, out  # whole tokens a second


def test_cpu_bf16_benchmark_prints_each_lever_against_fp32():
    """bench_cpu_bf16.py: the probe's speed-up, then each bf16 way's time and its ratio to fp32's (fp32 over it)."""
    out = run("benchmarks/bench_cpu_bf16.py", "--repeats", "1", "--shapes", "tiny")
    assert re.search(r"\(1\) probe: a bf16 matrix product runs [\d.]+x as fast as fp32", out), out
    t = r"([\d.]+) s"
    fp32, auto, x_auto, bf16, x_bf16 = map(float, re.search(
        rf"\(2\) tiny  train step: fp32 {t} \| bf16 autocast, fp32 weights {t} \(([\d.]+)x\) \| bf16 autocast, "
        rf"bf16 weights {t} \(([\d.]+)x\)", out).groups())
    ev32, ev16, x_ev = map(float, re.search(rf"\(3\) tiny  episode forward: fp32 {t} \| bf16 weights {t} "
                                            r"\(([\d.]+)x\)", out).groups())
    for num, den, ratio in ((fp32, auto, x_auto), (fp32, bf16, x_bf16), (ev32, ev16, x_ev)):
        assert abs(num / den - ratio) <= 0.01 + ratio * 0.0005 * (1 / num + 1 / den), out  # times printed to 1 ms
    assert "small" not in out


def test_read_ahead_benchmark_times_the_three_ways_and_prints_their_ratios():
    out = run("benchmarks/bench_read_ahead.py", "--batch", "2", "--steps", "10", "--threads", "2", "--step_ms", "20")
    here = float(re.search(r"decoded on the training thread +(\d+) ms a step", out).group(1))
    rows = re.findall(r"ReadAhead, (\d) thread\(s\) +(\d+) ms a step: ([\d.]+)x", out)
    assert [threads for threads, _, _ in rows] == ["1", "2"], out
    # a step: at least the 20 ms the GPU's work stands in for, far less than the ten steps' 200 ms
    assert all(20 <= float(ms) < 200 for ms in [here] + [ms for _, ms, _ in rows]), out
    assert all(abs(here / float(ms) - float(x)) <= 0.1 * float(x) for _, ms, x in rows), out  # what it printed


def test_gpu_step_benchmark_runs_on_the_cpu_and_profiles():
    """Each --keep setting is measured (its own line); the FLOPs counted as the benchmarks' README says (per token
    the frozen LLM's forward 2N and backward to its activations 2N, N counted here from --small's shapes, attention
    forward and backward to both inputs, the vocabulary projection where a loss is taken, the trainable aligner's
    6N per query), and the hardware's count adding each recomputed block's forward; the MFU reported is the best
    setting's; the profile's table and its time by kind, every kind named, the matrix products among them, adding
    up (the busy time) to the profiler's own total."""
    small = dict(D=256, I=688, L=2, V=32000, Q=32, B=2)  # bench_gpu_step's --small LLM; LlamaConfig's vocabulary
    block = 4 * small["D"] ** 2 + 3 * small["D"] * small["I"] + 2 * small["D"]  # q, k, v, o; gate, up, down; norms
    n_llm = small["L"] * block + small["D"]  # and the final norm

    def counted(out, compiled):
        T = int(re.search(r"sequence (\d+) tokens", out)[1])
        flops, tokens, answered, llm, aligner, per_block = map(int, re.search(
            r"counted: (\d+) FLOPs a step from (\d+) tokens, (\d+) of them answers; LLM (\d+) parameters less its "
            r"vocabulary projection of \d+; aligner (\d+); a recomputed block (\d+)", out).groups())
        assert llm == n_llm and per_block == block - (0 if compiled else small["D"] * small["I"]), out
        assert flops == (tokens * (4 * n_llm + 3 * 4 * small["L"] * T * small["D"])
                         + answered * 4 * small["V"] * small["D"] + 6 * aligner * small["B"] * small["Q"]), out
        rows = re.findall(r"^(\d) of 2 blocks recomputed: .* MFU ([\d.]+)% \(hardware ([\d.]+)%\)", out, re.M)
        for recomputed, mfu, hfu in rows:  # the hardware's share adds the recomputation
            more = int(recomputed) * tokens * (2 * per_block + 4 * T * small["D"])
            assert float(hfu) / float(mfu) == pytest.approx(1 + more / flops, rel=2e-3), out
        assert float(re.search(r"^MFU: ([\d.]+)%", out, re.M)[1]) == max(float(m) for _, m, _ in rows), out
        return [r for r, _, _ in rows], tokens - answered

    out = run("benchmarks/bench_gpu_step.py", "--small", "--batch", "2", "--keep", "1,0", "--profile",
              "--peak_tflops", "0.0001")  # a small peak: percentages with digits to compare
    assert "MFU" in out and "aten::mm" in out, out
    measured, prompts = counted(out, compiled=False)
    assert measured == ["2", "1"], out
    best = re.search(r"the fastest .*: (\d) of 2 blocks recomputed", out)[1]  # its step, timed unprofiled
    step_ms = int(re.search(rf"^{best} of 2 blocks recomputed: .*\((\d+) ms per step\)", out, re.M)[1])
    assert abs(int(re.search(r"one step: (\d+) ms on the clock \(unprofiled\)", out)[1]) - step_ms) <= 1, out
    busy, parts = re.search(r"the CPU busy (\d+) ms \(\d+%\); of that, (.*)", out).groups()
    ms = {k: int(v) for k, v in re.findall(r"(?:^|, )([a-z ()]+) (\d+) ms \(\d+%\)", parts)}
    assert set(ms) == {"attention", "matrix products", "fused (compiled)", "other"}, out
    assert ms["matrix products"] > 0, out
    total = re.search(r"Self CPU time total: ([\d.]+)(ms|s)\n", out)  # the profiler's own sum (seconds from 1 s)
    assert total, out
    assert abs(int(busy) - float(total[1]) * (1000 if total[2] == "s" else 1)) <= 1, out
    # compiled blocks inside and outside non-reentrant checkpointing: what run_gpu.sh measures first
    out = run("benchmarks/bench_gpu_step.py", "--small", "--batch", "2", "--keep", "1,0", "--compile",
              "--peak_tflops", "0.0001", "--answer_words", "20")
    measured, same_prompts = counted(out, compiled=True)
    assert measured == ["2", "1"] and same_prompts == prompts, out  # shorter answers, the same prompts
    assert re.search(r"^compiled blocks against uncompiled ones, 2 of 2 blocks recomputed, timed in this run: "
                     r"[\d.]+x \(\d+ ms uncompiled\)$", out, re.M), out  # its reference measured beside it


def test_mfu_is_taken_against_the_cards_own_peak():
    """MFU's denominator follows the device's name: an H100 PCIe card (756 TFLOP/s dense bf16) is not judged against
    the SXM card's 989, which would under-report it by a quarter."""
    from benchmarks.bench_gpu_step import peak_tflops

    assert peak_tflops("NVIDIA H100 PCIe") == 756 and peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops("NVIDIA H200") == 989 and peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert peak_tflops("NVIDIA H200 NVL") == 835  # (not the SXM card's 989)
    assert peak_tflops("NVIDIA GeForce RTX 4090") is None  # unknown: the script says so rather than assume an H100


def test_probe_prompts_readout_is_scikit_learns_logistic_regression():
    """The read-out of benchmarks/probe_prompts.py (hand-written: L-BFGS on binary cross-entropy with an L2 weight)
    fits the same model as scikit-learn's LogisticRegression, one per class, at the matching strength: its mean over
    N rows and C classes plus l2 |w|^2 is, per class, scikit-learn's sum of losses plus |w|^2 / (2 C_sk) with
    C_sk = 1 / (2 N C l2). readout_map takes the L2 weight whose held-out rows rank best."""
    from sklearn.linear_model import LogisticRegression

    from benchmarks.probe_prompts import fit_readout

    rng = np.random.default_rng(0)
    n, f, c, l2 = 120, 6, 3, 0.01
    x = rng.normal(size=(n, f))
    y = (x @ rng.normal(size=(f, c)) + rng.normal(size=(n, c)) > 0).astype(float)
    w = fit_readout(torch.from_numpy(x), torch.from_numpy(y), l2).numpy()
    for k in range(c):
        ref = LogisticRegression(C=1 / (2 * n * c * l2), tol=1e-10, max_iter=10_000).fit(x, y[:, k])
        np.testing.assert_allclose(w[:-1, k], ref.coef_[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(w[-1, k], ref.intercept_[0], rtol=1e-4, atol=1e-5)
    # readout_map's L2 weight is the one of its five whose fit on the first four fifths of the training rows ranks
    # the last fifth best (few rows, many noisy features: the weights matter)
    from apt_min import metrics
    from benchmarks.probe_prompts import readout_map, with_bias

    x = rng.normal(size=(60, 40))
    y = (x[:, :3] + 2 * rng.normal(size=(60, 3)) > 0).astype(float)
    _, chosen = readout_map(x, y, x, y)
    z = torch.from_numpy((x - x.mean(0)) / (x.std(0) + 1e-6))
    held = {l2: metrics.mean_average_precision((with_bias(z[48:]) @ fit_readout(z[:48], torch.from_numpy(y[:48]),
                                                                                  l2)).numpy(), y[48:])
            for l2 in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)}
    assert held[chosen] == max(held.values()) > min(held.values()), held


def test_block_memory_counts_what_a_frozen_block_keeps_for_backward():
    """benchmarks/block_memory.py: per token, in hidden-size units of bf16 values. As written a block keeps its two
    norms' float32 inputs (2 x 2), q, k, v and the attention's output (4), and the SwiGLU's gate, up and SiLU output
    (3 x F/D); compiled, the norms' inputs in bf16 (2) and the SiLU recomputed (2 x F/D). Besides, float32 statistics
    per row: the two norms' scales and a log-sum-exp per head. No weight's input is kept (all frozen). (Exactly what
    torch 2.11, the pinned version, saves: another version may keep a little more or less, and this says so.)"""
    from apt_min.llama import Block, LlamaConfig
    from benchmarks.block_memory import saved_per_token

    cfg = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=100)
    block = Block(cfg).to(torch.bfloat16).requires_grad_(False)
    ratio = cfg.intermediate_size / cfg.hidden_size
    stats = (2 + cfg.num_attention_heads) * 4 / (2 * cfg.hidden_size)  # float32 values in bf16 hidden-size units
    eager = saved_per_token(block, cfg) / (2 * cfg.hidden_size)
    assert eager == 4 + 4 + 3 * ratio + stats
    block.compile()
    saved_per_token(block, cfg)
    compiled = saved_per_token(block, cfg) / (2 * cfg.hidden_size)
    assert compiled == 2 + 4 + 2 * ratio + stats
    # the GiB a kept block adds at Vicuna-7B's width: what it keeps beyond its input (which a checkpoint keeps
    # anyway), bf16, for each of batch x seq tokens
    out = run("benchmarks/block_memory.py", "--no-compile", "--batch", "32", "--seq", "170")
    beyond, gib = map(float, re.search(r"as written: [\d.]+ values per hidden unit, ([\d.]+) beyond the block's "
                                       r"input: ([\d.]+) GiB more per block kept", out).groups())
    assert gib == pytest.approx(beyond * 2 * 4096 * 32 * 170 / 2**30, abs=0.006), out


def test_bench_chain_says_why_a_stage_failed(tmp_path):
    """A stage that stops (here: a data folder that is not the synthetic benchmark, which holds no AudioSet list)
    is reported with train.py's own message, not a bare exit status."""
    (tmp_path / "data" / "mine").mkdir(parents=True)
    (tmp_path / "data" / "mine" / "notes.txt").write_text("not a data set")
    done = subprocess.run([sys.executable, "benchmarks/bench_chain.py", f"--data_root={tmp_path / 'data'}",
                           f"--run_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert re.search(r"bench_chain.py: stage 0 failed \(exit status 1\):\n.*train.py: error: .*no such data file",
                     done.stderr, re.S), done.stderr[-2000:]


def test_bench_chain_times_each_stage_of_the_chain_and_shows_its_validation(tmp_path):
    """The tiny chain on the miniature, each stage in a fresh process: a line per stage in the chain's order, its
    validation figures the first and the last its log holds, and the whole chain's minutes the stages' sum."""
    from conftest import opts

    from apt_min.config import stage_folder

    out = run("benchmarks/bench_chain.py", *opts(tmp_path))
    rows = re.findall(r"^stage +(\w+): +([\d.]+) s   validation \(step (\d+) -> (\d+)\): (.*)$", out, re.M)
    assert [r[0] for r in rows] == ["0", "lm", "1", "2"], out
    for stage, _, first, last, shown in rows:
        log = [json.loads(x) for x in (tmp_path / "run" / stage_folder(stage) / "log.jsonl").read_text().splitlines()]
        evals = [e for e in log if any(k.startswith("val") or k.endswith("_r1") for k in e)]
        steps = {"0": 3, "lm": 3, "1": 4, "2": 2}[stage]  # (the miniature's)
        assert (int(first), int(last)) == (evals[0]["step"], evals[-1]["step"]) == (0, steps)
        figures = dict((k, (float(a), float(b))) for k, a, b in re.findall(r"(\w+) ([\d.]+) -> ([\d.]+)", shown))
        assert set(figures) == {k for k in evals[0] if k != "step"}, shown
        for k, (a, b) in figures.items():
            assert (a, b) == pytest.approx((evals[0][k], evals[-1][k]), abs=5e-4), (stage, k)
    minutes = float(re.search(r"^whole chain: ([\d.]+) min", out, re.M).group(1))
    assert "the synthetic data, if absent, is generated inside stage 0)" in out  # tiny's chain starts there
    assert minutes == pytest.approx(sum(float(r[1]) for r in rows) / 60, abs=0.051)


def test_bench_two_jobs_times_each_setting_against_the_job_alone(prepared, tmp_path, monkeypatch):
    """On the miniature benchmark: one job alone (also with sleeping waits), then two at once with the default threads,
    with half the cores each and with sleeping waits; every timed run trains from the warm-up run's feature cache, and
    each ratio is the one its printed speeds give. A --run_dir holding anything else is refused, not emptied; a job
    gets its row's thread settings, not the shell's."""
    from conftest import MINI

    base = tmp_path / "jobs"
    out = run("benchmarks/bench_two_jobs.py", "--steps", "3", f"--run_dir={base}",
              f"--data_root={prepared / 'synth'}", *MINI)
    cores = int(re.search(r"^stage 0, 3 steps, threads per process by default: (\d+)$", out, re.M)[1])
    alone = float(re.search(r"^one job alone +([\d.]+) examples/s$", out, re.M)[1])
    passive, ratio = map(float, re.search(r"^one job alone, OMP_WAIT_POLICY=PASSIVE +([\d.]+) examples/s: ([\d.]+)x "
                                          r"the job alone$", out, re.M).groups())
    assert ratio == pytest.approx(passive / alone, rel=0.02, abs=0.006)
    for label in (f"{cores} threads each \\(the default\\)", f"OMP_NUM_THREADS={max(1, cores // 2)} each",
                  "OMP_WAIT_POLICY=PASSIVE each"):
        shown = re.search(rf"^two at once, {label} +([\d.]+) and ([\d.]+) examples/s: each ([\d.]+)x the job alone, "
                          r"both together ([\d.]+)x$", out, re.M)
        assert shown, out
        a, b, each, both = map(float, shown.groups())  # (the speeds as printed, to 0.1)
        assert each == pytest.approx((a + b) / 2 / alone, rel=0.02, abs=0.006)
        assert both == pytest.approx((a + b) / alone, rel=0.02, abs=0.006)
    for name in ("alone", "alone-passive", "default-a", "default-b", "split-a", "split-b", "passive-a", "passive-b"):
        assert (base / name / "features").resolve() == (base / "warmup" / "features").resolve()
        assert json.loads((base / name / "stage0" / "log.jsonl").read_text().splitlines()[-1])["step"] == 3
    (tmp_path / "mine").mkdir()  # a folder holding anything else is not emptied
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    done = subprocess.run([sys.executable, "benchmarks/bench_two_jobs.py", "--steps", "1", f"--run_dir={tmp_path}/mine",
                           f"--data_root={prepared / 'synth'}", *MINI], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1 and "holds more than this benchmark's runs" in done.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    from benchmarks import bench_two_jobs  # and a job's settings reach its process, beside the rest of the environment

    started = {}
    monkeypatch.setattr(bench_two_jobs.subprocess, "Popen", lambda command, **kw: started.update(kw, command=command))
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the shell's own: not passed on
    bench_two_jobs.start(base, "more", 3, ["--seed=1"], {"OMP_NUM_THREADS": "1"})
    assert started["env"]["OMP_NUM_THREADS"] == "1" and started["env"]["PATH"] == os.environ["PATH"]
    assert "OMP_WAIT_POLICY" not in started["env"]
    assert started["command"][-2:] == [f"--run_dir={base / 'more'}", "--seed=1"]

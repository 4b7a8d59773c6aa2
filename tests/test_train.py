"""train.py end to end on a miniature of the tiny preset: stages, resume after SIGKILL, DDP, atomic checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import copy_of, opts
from safetensors.torch import load_file
from torch import nn

import train
from apt_min import data

ROOT = Path(__file__).resolve().parents[1]


def run(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kw)


def test_stages_chain_and_outputs(prepared, tmp_path):
    tmp = copy_of(prepared, tmp_path)
    for stage in ("1", "2"):
        train.main(["--stage", stage, *opts(tmp)])
    final = tmp / "run" / "stage2" / "final"
    meta = json.loads((final / "apt.json").read_text())
    assert meta["stage"] == 2 and meta["llm"]["path"].endswith("llm") and len(meta["encoder"]["fingerprint"]) == 16
    records = [json.loads(line) for line in (tmp / "run" / "stage1" / "log.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "val_loss" in records[0]  # validation before training, then every step
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(r["examples_per_s"] > 0 and "lr" in r for r in records if "loss" in r)
    assert (tmp / "run" / "stage0" / "final" / "aligner.safetensors").is_file()
    assert (tmp / "run" / "llm" / "model.safetensors").is_file()


def test_stage_without_its_prerequisite_says_what_to_run(prepared, tmp_path):
    tmp = copy_of(prepared, tmp_path)
    shutil.rmtree(tmp / "run" / "stage0")
    with pytest.raises(SystemExit, match=r"run `python train.py --stage 0` first"):
        train.main(["--stage", "1", *opts(tmp)])
    with pytest.raises(SystemExit, match=r"unknown setting --nonsense"):
        train.main(["--stage", "1", "--nonsense=3"])
    with pytest.raises(SystemExit, match=r"--batch_size: expected int, got 'many'"):
        train.main(["--stage", "1", "--batch_size=many"])


def weights(tmp):
    return load_file(str(tmp / "run" / "stage1" / "final" / "apt.safetensors"))


def test_resume_after_sigkill_equals_an_uninterrupted_run(prepared, tmp_path):
    args = ["--steps_1=14", "--save_every=3", "--log_every=1"]
    whole = copy_of(prepared, tmp_path / "whole")
    assert run(["train.py", "--stage", "1", *opts(whole, *args)]).returncode == 0
    cut = copy_of(prepared, tmp_path / "cut")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", "--stage", "1", *opts(cut, *args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = cut / "run" / "stage1" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.is_file() and latest.read_text() >= "step_0000006"):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.read_text() < "step_0000014"  # it was stopped part-way
    assert not (cut / "run" / "stage1" / "final").exists()
    resumed = run(["train.py", "--stage", "1", "--resume", *opts(cut, *args)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = weights(whole), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_update_like_one_with_the_same_global_batch(prepared, tmp_path):
    args = ["--steps_1=2", "--aligner_dropout=0", "--warmup_steps=1"]
    one = copy_of(prepared, tmp_path / "one")
    r = run(["train.py", "--stage", "1", *opts(one, *args, "--batch_size=4")])
    assert r.returncode == 0, r.stderr[-2000:]
    two = copy_of(prepared, tmp_path / "two")
    r = run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29613", "train.py", "--stage",
             "1", *opts(two, *args, "--batch_size=2")])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(one), weights(two)
    start = load_file(str(prepared / "run" / "stage0" / "final" / "aligner.safetensors"))
    moved = max((a[f"aligner.{k}"] - v).abs().max().item() for k, v in start.items())
    assert moved > 1e-4  # the update is real
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_compiled_llm_blocks_train_like_eager_ones(prepared, tmp_path):
    args = ["--steps_1=3", "--aligner_dropout=0", "--warmup_steps=1", "--log_every=1"]
    from torch._dynamo.utils import counters

    logs, graphs = {}, {}
    for mode in ("false", "true"):
        torch.compiler.reset()
        counters.clear()
        tmp = copy_of(prepared, tmp_path / mode)
        train.main(["--stage", "1", *opts(tmp, *args, f"--compile_llm={mode}")])
        records = (tmp / "run" / "stage1" / "log.jsonl").read_text().splitlines()
        logs[mode] = [json.loads(r)["loss"] for r in records if "loss" in json.loads(r)]
        graphs[mode] = counters["stats"]["unique_graphs"]
    assert graphs["false"] == 0 and graphs["true"] > 0  # the blocks really were compiled
    assert len(logs["true"]) == 3 and logs["true"] == pytest.approx(logs["false"], rel=1e-4)


def test_corrupt_audio_is_skipped_and_counted(prepared, tmp_path):
    tmp = copy_of(prepared, tmp_path)
    (tmp / "synth").unlink()
    shutil.copytree(prepared / "synth", tmp / "synth")
    broken = sorted((tmp / "synth" / "audio").glob("*.wav"))[::2]  # half the pool
    for f in broken:
        f.write_text("not audio any more")
    train.main(["--stage", "1", *opts(tmp)])
    records = [json.loads(line) for line in (tmp / "run" / "stage1" / "log.jsonl").read_text().splitlines()]
    assert max(r.get("skipped_audio", 0) for r in records) > 0
    with pytest.raises(Exception, match=r"not a readable audio file"):
        train.main(["--stage", "1", *opts(tmp, "--strict_audio=true")])


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    ck = train.Checkpoints(tmp_path, keep=2)
    ck.save(1, {"w": torch.ones(3)}, {"step": 1})

    def crash(*a, **k):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save(2, {"w": torch.zeros(3)}, {"step": 2})
    w, state = ck.load()
    assert state["step"] == 1 and torch.equal(w["w"], torch.ones(3))


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    cfg = train.load_config("tiny", {"steps_1": 3, "warmup_steps": 1, "eval_every": 100, "save_every": 1,
                                     "log_every": 1})
    module = nn.Linear(2, 1)
    params = dict(module.named_parameters())
    sampler = data.TaskSampler({"x": [1, 2]}, {"x": 1.0}, 1)
    calls = []

    def micro_step(model, sampler):
        sampler.next_batch()
        calls.append(1)
        loss = model(torch.ones(2)).sum() * (float("nan") if len(calls) == 2 else 1.0)
        return loss, {"loss": loss.item()}

    with pytest.raises(SystemExit, match=r"loss became nan at step 1.*last good checkpoint is step_0000001"):
        train.fit(cfg, "1", module, params, sampler, micro_step, lambda: {}, False, 0, 1, None, tmp_path)

"""train.py end to end on a miniature of the tiny preset: stages, resume after SIGKILL, DDP, atomic checkpoints."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import copy_of, opts
from safetensors.torch import load_file
from torch import nn

import train
from apt_min import data, evaluation

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


def log_records(tmp, stage):
    return [json.loads(line) for line in (tmp / "run" / stage / "log.jsonl").read_text().splitlines()]


def training_records(records):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if "loss" in r]


def test_resume_after_sigkill_continues_where_the_checkpoint_left_off(prepared, tmp_path):
    """A run killed mid-way and resumed logs every step once, validates at step 0 once, and draws the same batches
    and takes the same optimizer steps as an uninterrupted run (a restart from step 0, or lost optimizer or
    sampler state, would log other losses and end with other weights)."""
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
    stopped_at = int(latest.read_text()[5:])
    assert 6 <= stopped_at < 14 and not (cut / "run" / "stage1" / "final").exists()  # stopped part-way
    resumed = run(["train.py", "--stage", "1", "--resume", *opts(cut, *args)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = log_records(cut, "stage1")
    assert [r["step"] for r in records if "val_loss" in r] == [0, 14]  # validated once before training
    assert training_records(records) == training_records(log_records(whole, "stage1"))  # steps 1-14, once each
    assert [s for s, _, _ in training_records(records)] == list(range(1, 15))
    a, b = weights(whole), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_fresh_run_sets_the_previous_runs_log_and_checkpoints_aside(prepared, tmp_path):
    """Run a stage for 6 steps, then afresh (no --resume) for 2: the log holds the new run's steps once, its
    checkpoints are the new run's (not pruned in favour of the old step_0000006), so --resume finds them; the old
    run's log and checkpoints are kept in previous/."""
    tmp = copy_of(prepared, tmp_path)
    train.main(["--stage", "1", *opts(tmp, "--steps_1=6", "--save_every=2", "--log_every=1", "--keep_checkpoints=2")])
    train.main(["--stage", "1", *opts(tmp, "--steps_1=2", "--save_every=1", "--log_every=1", "--keep_checkpoints=2")])
    folder = tmp / "run" / "stage1"
    assert [r["step"] for r in log_records(tmp, "stage1")] == [0, 1, 2, 2]  # validation, steps, validation
    assert sorted(p.name for p in (folder / "checkpoints").glob("step_*")) == ["step_0000001", "step_0000002"]
    assert train.Checkpoints(folder / "checkpoints", 2).load()[1]["step"] == 2
    old = [json.loads(line)["step"] for line in (folder / "previous" / "log.jsonl").read_text().splitlines()]
    assert max(old) == 6 and (folder / "previous" / "checkpoints" / "step_0000006").is_dir()
    train.main(["--stage", "1", "--resume", *opts(tmp, "--steps_1=2", "--save_every=1", "--log_every=1")])
    assert [r["step"] for r in log_records(tmp, "stage1")] == [0, 1, 2, 2]  # resumed at its end: nothing more


def crash_at_batch(monkeypatch, n):
    """Make the n-th training batch raise, as if the process died there (validation draws no batches)."""
    calls, real = [0], data.TaskSampler.next_batch

    def next_batch(self):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt(f"stopped at batch {n}")
        return real(self)

    monkeypatch.setattr(data.TaskSampler, "next_batch", next_batch)


@pytest.mark.parametrize("stage, folder, result", [("0", "stage0", "final/aligner.safetensors"),
                                                    ("lm", "llm-train", "../llm/model.safetensors")])
def test_resume_of_stage_0_and_the_stand_in_llm(prepared, tmp_path, monkeypatch, stage, folder, result):
    """Stopped during step 4 (checkpoint at step 2, step 3 already logged): the resumed run drops step 3's record,
    redoes it, and ends exactly like an uninterrupted run."""
    args = ["--steps_0=5", "--steps_lm=5", "--save_every=2", "--log_every=1"]
    ends = {}
    for name in ("whole", "cut"):
        tmp = copy_of(prepared, tmp_path / name)  # with the encoder's cached features and the tokenizer
        shutil.rmtree(tmp / "run" / folder)
        if name == "cut":
            with monkeypatch.context() as m:
                crash_at_batch(m, 4)
                with pytest.raises(KeyboardInterrupt):
                    train.main(["--stage", stage, *opts(tmp, *args)])
            assert [r["step"] for r in log_records(tmp, folder) if "loss" in r] == [1, 2, 3]
            train.main(["--stage", stage, "--resume", *opts(tmp, *args)])
        else:
            train.main(["--stage", stage, *opts(tmp, *args)])
        ends[name] = (training_records(log_records(tmp, folder)), load_file(str(tmp / "run" / folder / result)))
    (log_a, w_a), (log_b, w_b) = ends["whole"], ends["cut"]
    assert [s for s, _, _ in log_b] == [1, 2, 3, 4, 5] and log_a == log_b
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_gradient_accumulation_equals_one_larger_batch(prepared, tmp_path):
    """Two micro-batches of 2 accumulate to the gradient of one batch of 4: the same token-level mean (captions
    differ in length, so a mean of the micro-batches' means would differ), not twice the gradient. The logged
    gradient norm is taken before clipping, so it shows the scale that AdamW would hide."""
    only = "--task_ratios=tagging=0,aqa=0,sed=0,ter=0,counting=0"  # one task: the same examples in the same order
    args = ["--steps_1=2", "--aligner_dropout=0", "--warmup_steps=1", only]
    logs, final = {}, {}
    for name, extra in (("one", ["--batch_size=4"]), ("accumulated", ["--batch_size=2", "--grad_accum=2"])):
        tmp = copy_of(prepared, tmp_path / name)
        train.main(["--stage", "1", *opts(tmp, *args, *extra)])
        logs[name] = [r for r in log_records(tmp, "stage1") if "loss" in r]
        final[name] = weights(tmp)
    assert all(set(r) >= {"loss", "loss_captioning"} and not any(k.startswith("loss_t") for k in r)
               for r in logs["one"])  # --task_ratios: captioning only
    for a, b in zip(logs["one"], logs["accumulated"], strict=True):  # equal to the log's precision (4 and 5 places)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], abs=2e-4) and b["loss"] == pytest.approx(a["loss"],
                                                                                                      abs=2e-5)
    assert agree(final["one"], final["accumulated"], prepared)


def agree(a, b, prepared):
    """The two runs' weights agree to 1 % of how far training moved them (measured: under 0.02 %: summation order)."""
    start = load_file(str(prepared / "run" / "stage0" / "final" / "aligner.safetensors"))
    moved = max((a[f"aligner.{k}"] - v).abs().max().item() for k, v in start.items())
    assert moved > 1e-4  # the update is real
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-2 * moved


def test_two_processes_update_like_one_with_the_same_global_batch(prepared, tmp_path):
    args = ["--steps_1=2", "--aligner_dropout=0", "--warmup_steps=1"]
    one = copy_of(prepared, tmp_path / "one")
    r = run(["train.py", "--stage", "1", *opts(one, *args, "--batch_size=4")])
    assert r.returncode == 0, r.stderr[-2000:]
    two = copy_of(prepared, tmp_path / "two")
    r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", "--stage",
             "1", *opts(two, *args, "--batch_size=2")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert agree(weights(one), weights(two), prepared)
    # the log shows the loss of the whole global batch, not the first process's share of it
    la, lb = (training_records(log_records(t, "stage1")) for t in (one, two))
    assert [s for s, _, _ in la] == [s for s, _, _ in lb] == [1, 2]
    assert all(x[1] == pytest.approx(y[1], abs=2e-5) and x[2] == pytest.approx(y[2], abs=2e-4) for x, y in zip(la, lb))


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
    with pytest.raises(SystemExit, match=r"^train.py: error: .*\.wav: not a readable audio file"):  # one clean line
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
        return loss, 1, {}

    job = SimpleNamespace(module=module, params=params, sampler=sampler, scaler=None, micro_step=micro_step,
                          validate=lambda: {})
    with pytest.raises(SystemExit, match=r"loss became nan at step 1.*last good checkpoint is step_0000001"):
        train.fit(cfg, "1", job, False, 0, 1, tmp_path)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    ck = train.Checkpoints(tmp_path, keep=2)
    for step in range(1, 6):
        ck.save(step, {"w": torch.full((2,), float(step))}, {"step": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000004", "step_0000005"]
    w, state = ck.load()
    assert state["step"] == 5 and torch.equal(w["w"], torch.full((2,), 5.0))


def test_task_ratios_change_the_mixture_and_unknown_tasks_are_named():
    base = train.STAGES["1"]["ratios"]
    ratios = train.parse_ratios("aqa=0.3, fewshot=1,captioning=0", base)
    assert ratios == {**base, "aqa": 0.3, "captioning": 0.0}  # fewshot belongs to stage 2: ignored here
    assert train.parse_ratios("", base) == base
    with pytest.raises(SystemExit, match=r"--task_ratios: unknown task 'speech'"):
        train.parse_ratios("speech=1", base)


def test_made_up_names_in_training_episodes_are_a_setting(trained):
    """fewshot_made_up: the share of stage 2's episodes whose classes get made-up names (paper: none)."""
    from apt_min import synth

    real = {c.name for c in synth.TRAIN_CLASSES}

    def made_up(share):
        cfg = train.load_config("tiny", {"data_root": str(trained / "synth"), "fewshot_made_up": share})
        episodes = [train.training_pools(cfg, "2")["fewshot"](random.Random(i)) for i in range(40)]
        return sum(ep.answer not in real for ep in episodes)

    assert made_up(0.0) == 0 and made_up(1.0) == 40 and 5 < made_up(0.5) < 35
    assert train.load_config("paper", {}).fewshot_made_up == 0.0
    with pytest.raises(SystemExit, match="fewshot_made_up"):
        made_up(1.5)


def test_data_sources_are_settings_and_the_paper_preset_reads_the_papers(trained, tmp_path):
    """caption_sources, tagging_sources and stage0_sources choose what the stages train on, among the files of
    data.LAYOUT: here a WavCaps subset over three of the miniature's clips and an unbalanced AudioSet list of two
    rows join in. A misspelt source is an error naming the setting, not a data set silently left out."""
    root = tmp_path / "synth"
    shutil.copytree(trained / "synth", root, copy_function=os.symlink)
    clips = sorted((root / "audio").glob("*.wav"))[:3]
    (root / "wavcaps" / "FreeSound").mkdir(parents=True)
    for clip in clips:
        (root / "wavcaps" / "FreeSound" / f"{clip.stem}.flac").symlink_to(clip)
    listing = {"data": [{"id": clip.stem, "caption": f"a caption from wavcaps {i}"} for i, clip in enumerate(clips)]}
    (root / "wavcaps" / "json_files" / "FreeSound").mkdir(parents=True)
    (root / "wavcaps" / "json_files" / "FreeSound" / "fsd_final.json").write_text(json.dumps(listing))
    balanced = (root / "audioset" / "balanced_train_segments.csv").read_text().splitlines()
    rows = [line for line in balanced if not line.startswith("#")]
    (root / "audioset" / "unbalanced_train_segments.csv").write_text("\n".join(balanced[:3] + rows[:2]) + "\n")

    def pools(**settings):
        cfg = train.load_config("tiny", {"data_root": str(root), **settings})
        return train.training_pools(cfg, "1"), train.stage0_pairs(cfg, random.Random(0))

    base, base0 = pools()
    assert len(base0) == len(base["captioning"]) + len(base["tagging"])  # AudioCaps + Clotho + AudioSet
    more, more0 = pools(caption_sources="audiocaps,clotho,wavcaps:FreeSound", tagging_sources="balanced,unbalanced",
                        stage0_sources="tagging,wavcaps:FreeSound")
    wavcaps = [ex.answer for ex in more["captioning"] if "/wavcaps/" in ex.segments[0][1]]
    assert sorted(wavcaps) == [f"a caption from wavcaps {i}" for i in range(3)]
    assert len(more["captioning"]) == len(base["captioning"]) + 3 and len(more["tagging"]) == len(base["tagging"]) + 2
    assert len(more0) == len(more["tagging"]) + 3  # AudioSet and WavCaps only, as the paper's stage 0
    assert {ex.answer for ex in more0} >= set(wavcaps)
    assert not {ex.answer for ex in base["captioning"]} & {ex.answer for ex in more0}  # no AudioCaps, no Clotho
    for setting, value in (("caption_sources", "audiocap"), ("tagging_sources", "test"), ("stage0_sources", ""),
                           ("tagging_sources", "wavcaps:FreeSound"), ("tagging_sources", "train,balanced"),
                           ("caption_sources", "clotho,audiocaps,clotho")):
        with pytest.raises(SystemExit, match=f"--{setting}"):
            train.main(["--stage", "1", *opts(tmp_path), f"--{setting}={value}"])  # before anything runs
    paper = train.load_config("paper", {})
    assert train.sources(paper, "caption_sources")[2:] == [f"wavcaps:{s}" for s in data.LAYOUT["wavcaps"]["names"]]
    assert train.sources(paper, "stage0_sources")[0] == "tagging" and paper.tagging_sources == "balanced,unbalanced"


def test_stage_0_has_its_own_contrastive_batch_and_warm_up(prepared, tmp_path):
    """stage0_batch_size: stage 0's batch per process, one contrastive batch (the paper preset's 128 against its
    micro-batch of 8); warmup_steps_0: stage 0's warm-up (paper 5 000, other stages 2 000)."""
    tmp = copy_of(prepared, tmp_path)
    shutil.rmtree(tmp / "run" / "stage0")
    train.main(["--stage", "0", *opts(tmp, "--steps_0=2", "--warmup_steps_0=4", "--stage0_batch_size=6")])
    log = [json.loads(line) for line in (tmp / "run" / "stage0" / "log.jsonl").read_text().splitlines()]
    first = next(r for r in log if r["step"] == 1 and "lr" in r)
    assert first["lr"] == pytest.approx(1e-3 * 2 / 4)  # the second of 4 warm-up steps (warmup_steps=2 would give 1e-3)
    cfg = train.load_config("tiny", [*opts(tmp, "--stage0_batch_size=6")])
    job = train.AlignStage0(cfg, 0, 1, torch.device("cpu"))
    loss, _, info = job.micro_step(job.module, job.sampler)
    assert job.sampler.batch_size == 6 and info["examples"] == 6 and loss.isfinite()
    paper = train.load_config("paper", {})
    assert (paper.stage0_batch_size, paper.warmup_steps_0, paper.warmup_steps) == (128, 5000, 2000)


def test_caption_fine_tuning_makes_whole_passes_over_one_caption_set(trained, tmp_path):
    """--stage caption_ft (paper §4.2, before Table 4): stage 2's APT tuned on one caption set's training captions
    alone, for caption_ft_epochs passes; saved beside the stages in caption_ft-{source}/ (so evaluation finds the
    run's stage-0 aligner)."""
    tmp = copy_of(trained, tmp_path)
    captions = data.examples("captioning", tmp / "synth", "train", source="clotho", rng=random.Random(0))
    train.main(["--stage", "caption_ft", *opts(tmp, "--caption_ft_source=clotho", "--caption_ft_epochs=0.5")])
    folder = tmp / "run" / "caption_ft-clotho"
    steps = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert len(steps) == math.ceil(0.5 * len(captions) / 4) and len(steps) > 4  # batch_size 4 (the miniature's)
    assert all({k for k in r if k.startswith("loss_")} == {"loss_captioning"} for r in steps)
    meta = json.loads((folder / "final" / "apt.json").read_text())
    assert meta["stage"] == "caption_ft" and meta["config"]["caption_ft_source"] == "clotho"
    before = load_file(str(tmp / "run" / "stage2" / "final" / "apt.safetensors"))
    after = load_file(str(folder / "final" / "apt.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert evaluation.stage0_aligner(folder / "final", "cpu") is not None
    with pytest.raises(SystemExit, match="--caption_ft_source='wavcaps:FreeSound': expected one of audiocaps, clotho"):
        train.main(["--stage", "caption_ft", *opts(tmp, "--caption_ft_source=wavcaps:FreeSound")])


def test_start_from_continues_stage_2_from_a_trained_apt(trained, tmp_path):
    """--start_from: stage 2 starts from the given APT instead of stage 1's result (how the small release continues
    the chain's stage 2 with another mixture); with lr 0 its result is that APT exactly. Refused: for stage 1, a
    folder with no APT, and the run's own stage-2 result, which the continuation would overwrite."""
    tmp = copy_of(trained, tmp_path)
    start = tmp / "start"
    shutil.copytree(tmp / "run" / "stage2" / "final", start)
    stage1 = load_file(str(tmp / "run" / "stage1" / "final" / "apt.safetensors"))
    given = load_file(str(start / "apt.safetensors"))
    assert any(not torch.equal(stage1[k], given[k]) for k in given)
    train.main(["--stage", "2", *opts(tmp, "--steps_2=1", "--lr=0", f"--start_from={start}")])
    out = tmp / "run" / "stage2" / "final"
    after = load_file(str(out / "apt.safetensors"))
    assert after.keys() == given.keys() and all(torch.equal(after[k], given[k]) for k in given)
    assert json.loads((out / "apt.json").read_text())["config"]["start_from"] == str(start)
    train.main(["--stage", "2", *opts(tmp, "--steps_2=1", "--lr=0")])  # the default: stage 1's result
    after = load_file(str(out / "apt.safetensors"))
    assert all(torch.equal(after[k], stage1[k]) for k in stage1)
    for stage in ("1", "0", "vision"):  # refused before any data is made
        with pytest.raises(SystemExit, match=f"stage {stage} does not start from one"):
            train.main(["--stage", stage, *opts(tmp, f"--start_from={start}")])
    with pytest.raises(SystemExit, match="no trained APT there"):
        train.main(["--stage", "2", *opts(tmp, f"--start_from={tmp / 'synth'}")])
    for same in (out, f"{tmp}/run/./stage2/../stage2/final"):  # however it is spelt
        with pytest.raises(SystemExit, match="would overwrite it"):
            train.main(["--stage", "2", *opts(tmp, f"--start_from={same}")])


def test_precision_settings():
    cpu = torch.device("cpu")
    with pytest.raises(SystemExit, match=r"--precision=fp16 needs a CUDA device"):
        train.amp_settings(train.load_config("tiny", {"precision": "fp16"}), cpu)
    autocast, scaler, frozen = train.amp_settings(train.load_config("tiny", {"precision": "bf16"}), cpu)
    with autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert scaler is None and frozen == torch.bfloat16  # the frozen parts held in bf16 too (bench_cpu_bf16.py)
    autocast, scaler, frozen = train.amp_settings(train.load_config("tiny", {}), cpu)  # auto: fp32 on a CPU
    with autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_an_optimizer_step_rescales_to_the_windows_mean_then_clips():
    """optimizer_step on a window of two micro-batches of 2 and 6 items (the first backpropagated over 2, as fit
    does): the gradient becomes the mean over all 8, its norm is logged, and the update is clipped to grad_clip."""
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    window = train.Window(world=1)
    for n in (2, 6):
        window.add(torch.tensor(float(n)), n, {})
    p.grad = torch.tensor([30.0, 40.0])  # norm 50 over the first micro-batch's 2 items: 12.5 over all 8
    job = SimpleNamespace(params={"p": p}, scaler=None)
    grad_norm = train.optimizer_step(SimpleNamespace(grad_clip=1.0), job, opt, sched, window)
    assert grad_norm.item() == pytest.approx(12.5)
    torch.testing.assert_close(p.detach(), torch.tensor([-0.6, -0.8]))  # one SGD step of the clipped unit gradient
    assert p.grad is None  # cleared for the next window


def test_a_windows_logs_are_means_over_its_items_and_micro_batches():
    """Window.logs: the loss is the mean over every item of the window (and per task over that task's items); other
    values a micro-batch reports (stage 0's ATC, ATM, AGTG) are averaged over the micro-batches."""
    window = train.Window(world=1)
    window.add(torch.tensor(6.0), 2, {"task": "aqa", "atc": 1.0, "examples": 2})
    window.add(torch.tensor(2.0), 6, {"task": "captioning", "atc": 3.0, "examples": 6})
    window.add(torch.tensor(4.0), 2, {"task": "aqa", "atc": 5.0, "examples": 2})
    assert window.logs() == pytest.approx({"loss": 12 / 10, "loss_aqa": 10 / 4, "loss_captioning": 2 / 6, "atc": 3.0})


def test_learning_rate_warms_up_then_falls_along_a_cosine_to_its_floor():
    """cosine_schedule: linear warm-up to the full rate over `warmup` steps, then half a cosine down to min_lr_ratio
    at the last step, where it stays."""
    factor = train.cosine_schedule(SimpleNamespace(min_lr_ratio=0.1), total=14, warmup=4)
    assert [factor(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert factor(9) == pytest.approx(0.55)  # half way down: (1 + 0.1) / 2
    assert factor(14) == pytest.approx(0.1) and factor(20) == pytest.approx(0.1)


def test_weight_decay_falls_on_matrices_only():
    """make_optimizer: AdamW (0.9, 0.999) with weight decay on parameters of two or more dimensions (the query
    tokens are (1, Q, H)); none on biases, norms, the temperature or <AUDIO>."""
    cfg = train.load_config("tiny", {})
    params = {"matrix": nn.Parameter(torch.zeros(3, 4)), "queries": nn.Parameter(torch.zeros(1, 2, 3)),
              "bias": nn.Parameter(torch.zeros(4)), "temp": nn.Parameter(torch.tensor(0.07))}
    decay, rest = train.make_optimizer(params, cfg).param_groups
    assert cfg.weight_decay > 0 and (decay["weight_decay"], rest["weight_decay"]) == (cfg.weight_decay, 0.0)
    assert [p.shape for p in decay["params"]] == [(3, 4), (1, 2, 3)] and [p.shape for p in rest["params"]] == [(4,), ()]
    assert decay["betas"] == (0.9, 0.999)


def test_caption_fine_tuning_steps_and_training_episode_shapes():
    """caption_ft_steps: enough steps of batch_size * grad_accum * world captions for caption_ft_epochs whole passes
    (the last step may be short, never missing). episode_shape: the paper's 4-way 1-shot, or with fewshot_shapes=mixed
    every shape of 2-5 ways and 1-3 shots with at most 12 support clips."""
    cfg = SimpleNamespace(caption_ft_epochs=2, batch_size=3, grad_accum=2)
    assert train.caption_ft_steps(cfg, 10, world=1) == 4  # 20 captions, 6 a step
    assert train.caption_ft_steps(cfg, 10, world=2) == 2  # 12 a step
    assert train.caption_ft_steps(cfg, 9, world=1) == 3
    rng = random.Random(0)
    assert train.episode_shape(SimpleNamespace(fewshot_shapes="4x1"), rng) == (4, 1)
    shapes = {train.episode_shape(SimpleNamespace(fewshot_shapes="mixed"), rng) for _ in range(1000)}
    assert shapes == {(ways, shots) for ways in range(2, 6) for shots in range(1, 4) if ways * shots <= 12}


def test_proj_init_words_reaches_stage_1_and_needs_the_llms_words(prepared, tmp_path, monkeypatch):
    """--proj_init=words starts stage 1's projection from the aligner's word map (start_proj_from_words, checked in
    test_aligner), once, before the first step; a preset whose aligner has its own word table is refused before
    anything runs."""
    from apt_min.model import APT

    with pytest.raises(SystemExit, match="--proj_init=words .* --aligner_words=llm"):
        train.main(["--stage", "1", *opts(tmp_path), "--proj_init=words"])
    calls = []
    monkeypatch.setattr(APT, "start_proj_from_words", lambda self: calls.append(self.proj.weight.clone()))
    tmp = copy_of(prepared, tmp_path)
    train.main(["--stage", "1", *opts(tmp, "--steps_1=1", "--proj_init=words", "--aligner_words=llm")])
    assert len(calls) == 1
    train.main(["--stage", "1", *opts(tmp, "--steps_1=1")])
    assert len(calls) == 1  # the default leaves nn.Linear's start

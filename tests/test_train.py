"""train.py end to end on a miniature of the tiny preset: stages, resume after SIGKILL, DDP, atomic checkpoints."""

import collections
import dataclasses
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import MINI, copy_of, opts
from safetensors.torch import load_file
from torch import nn

import train
from apt_min import audio, build, data, evaluation, tasks
from apt_min.audiomae import AudioMAEConfig
from apt_min.checkpoint import CheckpointError
from apt_min.errors import MissingFileError, SettingError
from apt_min.model import FeatureCache

ROOT = Path(__file__).resolve().parents[1]


def run(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kw)


TWO_PROCESSES = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # torchrun, for run()


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
    with pytest.raises(SystemExit, match=r"--resume: no checkpoint under .*llm-train/checkpoints \(a first run"):
        train.main(["--stage", "lm", "--resume", f"--run_dir={tmp_path / 'new'}"])  # said before anything is made
    assert not (tmp_path / "new").exists()
    tmp = copy_of(prepared, tmp_path)
    with pytest.raises(SystemExit, match=r"stage caption_ft starts from stage 2's result, which is not in "
                                         rf"{re.escape(str(tmp_path / 'new2' / 'stage2' / 'final'))}/"):
        train.main(["--stage", "caption_ft", *opts(tmp, f"--run_dir={tmp_path / 'new2'}")])
    assert not (tmp_path / "new2").exists()  # no tokenizer, no encoder made first
    shutil.rmtree(tmp / "run" / "stage0")
    with pytest.raises(SystemExit, match=r"run `python train.py --stage 0` first"):
        train.main(["--stage", "1", *opts(tmp)])
    (tmp / "run" / "stage0" / "final").mkdir(parents=True)  # a folder without the result (a save never finished)
    with pytest.raises(SystemExit, match=r"run `python train.py --stage 0` first"):
        train.main(["--stage", "1", *opts(tmp)])
    with pytest.raises(SystemExit, match=r"unknown setting --nonsense"):
        train.main(["--stage", "1", "--nonsense=3"])
    with pytest.raises(SystemExit, match=r"--batch_size: expected int, got 'many'"):
        train.main(["--stage", "1", "--batch_size=many"])


def test_a_runs_tokenizer_and_stand_in_llm_are_kept_and_other_sizes_named(prepared, tmp_path, caplog):
    """The tokenizer and the stand-in LLM of a run are made once (stage 0, --stage lm); settings asked of them
    later are named in a warning, not silently dropped (--llm_vocab included, which the tokenizer cannot tell
    apart from the smaller vocabulary a small corpus gives, so the asked size is kept beside it)."""
    from apt_min import build

    tmp = copy_of(prepared, tmp_path)
    caplog.set_level(logging.WARNING)
    same = train.load_config("tiny", opts(tmp))
    build.ensure_tokenizer(same)
    build.load_llm(same, torch.device("cpu"), torch.float32)
    assert "not used" not in caplog.text
    other = train.load_config("tiny", opts(tmp, "--llm_vocab=500", "--llm_layers=3", "--llm_heads=4",
                                           "--llm_kv_heads=2"))
    tok = build.ensure_tokenizer(other)
    llm, _ = build.load_llm(other, torch.device("cpu"), torch.float32)
    assert tok.vocab_size <= 400 and llm.config.num_hidden_layers == 2
    folder = tmp / "run" / "llm"
    assert (f"{folder / 'tokenizer.model'} was trained with llm_vocab=400; the settings' llm_vocab=500 are not used"
            in caplog.text)
    build.ensure_tokenizer(other)  # asked for again in the same process (evaluate.py and load_apt both do): said once
    assert caplog.text.count("the settings' llm_vocab=500 are not used") == 1
    assert (f"{folder} holds a stand-in LLM of llm_layers=2, llm_heads=2, llm_kv_heads=1; the settings' llm_layers=3, "
            "llm_heads=4, llm_kv_heads=2 are not used") in caplog.text


def test_stage_0_starts_the_aligners_words_from_the_llms(prepared, tmp_path):
    """aligner_init=llm: the aligner's word vectors start as the LLM's embedding table reduced by PCA to the
    aligner's width: its own table's first V rows ([DEC] keeps its init), or, reading the LLM's table
    (aligner_words=llm), the map from it; aligner_init=random leaves them as initialised."""
    from apt_min import build

    tmp = copy_of(prepared, tmp_path)
    cfg = train.load_config("tiny", opts(tmp))
    words = build.llm_embeddings(cfg)
    weight, bias = build.llm_pca_map(words, cfg.aligner_hidden)
    job = train.AlignStage0(train.load_config("tiny", opts(tmp, "--aligner_init=llm")), 0, 1, torch.device("cpu"))
    table = job.aligner.word_embeddings.weight.detach()
    V = len(words)
    torch.testing.assert_close(table[:V], (words @ weight.T + bias).float())
    plain = train.AlignStage0(cfg, 0, 1, torch.device("cpu")).aligner.word_embeddings.weight.detach()
    assert torch.equal(table[V:], plain[V:]) and not torch.allclose(table[:V], plain[:V], atol=1e-3)
    job = train.AlignStage0(train.load_config("tiny", opts(tmp, "--aligner_init=llm", "--aligner_words=llm")), 0, 1,
                            torch.device("cpu"))
    torch.testing.assert_close(job.aligner.word_map.weight.detach(), weight.float())
    torch.testing.assert_close(job.aligner.word_map.bias.detach(), bias.float())
    job = train.AlignStage0(train.load_config("tiny", opts(tmp, "--aligner_words=llm")), 0, 1, torch.device("cpu"))
    assert job.aligner.word_map.weight.shape == weight.shape  # the map as initialised, not the LLM's PCA
    assert not torch.allclose(job.aligner.word_map.weight.detach(), weight.float(), atol=1e-3)


def test_each_stage_trains_what_its_table_says_on_its_mixture(trained, tmp_path):
    """Stage 0 steps the whole aligner (its heads: the contrastive projections and temperature, the match and
    caption heads); stages 1 and 2 the aligner without those heads, the projection and <AUDIO>. The mixtures are
    the public APT code's (tagging 1, captioning 1, AQA 0.1, SED, TER and counting 0.45 each; stage 2 adds
    few-shot 0.5), and NLAR's 0.5 ours; a stage-2 job draws every one of them."""
    from apt_min.aligner import STAGE0_HEADS

    cpu = torch.device("cpu")
    tmp = copy_of(trained, tmp_path)
    zero = train.AlignStage0(train.load_config("tiny", opts(tmp)), 0, 1, cpu)
    assert zero.params.keys() == dict(zero.aligner.named_parameters()).keys()
    assert all(any(k.startswith(h) for k in zero.params) for h in STAGE0_HEADS)
    one = train.TuneAPT(train.load_config("tiny", opts(tmp)), "1", 0, 1, cpu)
    aligner = [f"aligner.{k}" for k, _ in one.model.aligner.named_parameters() if not k.startswith(STAGE0_HEADS)]
    assert sorted(one.params) == sorted([*aligner, "proj.weight", "proj.bias", "audio_token"])
    first = {"tagging": 1.0, "captioning": 1.0, "aqa": 0.1, "sed": 0.45, "ter": 0.45, "counting": 0.45}
    assert train.STAGES["1"]["ratios"] == first
    assert train.STAGES["2"]["ratios"] == {**first, "fewshot": 0.5, "nlar": 0.5}
    two = train.TuneAPT(train.load_config("tiny", opts(tmp)), "2", 0, 1, cpu)
    assert sorted(two.sampler.tasks) == sorted(train.STAGES["2"]["ratios"])


def test_training_data_is_drawn_as_documented(prepared, tmp_path):
    """Stages 1-2 word each task's instructions with its paraphrases (not evaluation's first one alone), stage 2's
    episodes are laid out as fewshot_layout says (the layout a checkpoint records and evaluation follows), and
    stage 0 validates on the validation split, never on the test clips."""
    from apt_min import tasks

    tmp = copy_of(prepared, tmp_path)
    cfg = train.load_config("tiny", opts(tmp, "--fewshot_layout=list"))
    pools = train.training_pools(cfg, "2", list(train.STAGES["2"]["ratios"]))
    for task in ("tagging", "captioning", "sed", "ter", "counting"):
        first = re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(tasks.PROMPTS[task][0])) + "$")
        worded = [next(v for k, v in ex.segments if k == "text") for ex in pools[task]]
        assert 0.1 < sum(not first.match(w) for w in worded) / len(worded) < 0.95, task
    episode = pools["fewshot"](random.Random(0))
    assert episode.segments[:2] == [("text", tasks.FEWSHOT_LIST_INSTRUCTION), ("turn", "")]
    job = train.AlignStage0(cfg, 0, 1, torch.device("cpu"))
    val = {ex.segments[0][1] for ex in data.examples("captioning", cfg.data_root, "val")}
    assert job.val and {ex.segments[0][1] for ex in job.val} <= val


def test_the_encoder_pretrains_on_the_training_clips_and_validates_on_the_validation_clips(prepared, tmp_path,
                                                                                           monkeypatch):
    """--stage mae reads the windows of every training clip (both caption sets' and tagging's) to learn from, and
    of the validation split's caption clips to validate on: no test clip, and no clip in both; it validates on
    val_batches batches of mae_batch_size windows."""
    from apt_min import audio

    read = []
    monkeypatch.setattr(audio, "load_fbank", lambda path, t, f: read.append(path) or torch.zeros(1, t, f))
    cfg = train.load_config("tiny", opts(copy_of(prepared, tmp_path), "--encoder_init=mae", "--mae_batch_size=3"))
    job = train.PretrainEncoder(cfg, 0, 1, torch.device("cpu"))
    root = cfg.data_root

    def clips(task, split, **options):
        return {ex.segments[0][1] for ex in data.examples(task, root, split, **options)}

    trained = clips("captioning", "train") | clips("captioning", "train", source="clotho") | clips("tagging", "train")
    val = clips("captioning", "val") | clips("captioning", "val", source="clotho")
    assert set(read[:len(job.train_windows)]) == trained and set(read[len(job.train_windows):]) == val
    assert len(read) == len(trained) + len(val) and not trained & val
    assert len(job.val_windows) == cfg.val_batches * cfg.mae_batch_size < len(val)  # a clip: one window here
    # the encoder trains (AudioMAE freezes itself when built), with the decoder; each step masks anew, at the
    # setting's ratio (Audio-MAE's 0.8 by default)
    assert any(k.startswith("encoder.") for k in job.params) and all(p.requires_grad for p in job.params.values())
    masked = []
    model = lambda batch, ratio, g, keep: masked.append((len(batch), keep)) or torch.zeros(())  # noqa: E731
    for _ in range(2):
        job.micro_step(model, job.sampler)
    n = job.encoder.num_patches
    assert [keep.shape for _, keep in masked] == [(size, round(n * (1 - 0.8))) for size, _ in masked]
    assert cfg.mask_ratio == 0.8 and not torch.equal(masked[0][1], masked[1][1])


def test_the_encoders_pretraining_needs_a_preset_that_makes_its_own_and_skips_a_clip_it_cannot_read(
        prepared, tmp_path, monkeypatch, caplog):
    """--stage mae is refused where the encoder is not the preset's own to pretrain: given (--encoder_checkpoint)
    or a seeded random one (encoder_init=random, tiny's). A training clip that cannot be read is skipped with a
    warning naming it, and with strict_audio ends the run. Each step masks anew, and alike when it is taken again
    (a resumed run). The clips are the caption sources' (with tagging's, in training), as the settings name them:
    with AudioCaps alone, no Clotho clip is read."""
    from apt_min import audio

    cpu = torch.device("cpu")
    for settings in (["--encoder_init=mae", "--encoder_checkpoint=given.safetensors"], []):
        with pytest.raises(SettingError, match=r"--stage mae pretrains the encoder of a preset with --encoder_init="):
            train.PretrainEncoder(train.load_config("tiny", opts(tmp_path, *settings)), 0, 1, cpu)
    copied = copy_of(prepared, tmp_path)
    cfg = train.load_config("tiny", opts(copied, "--encoder_init=mae"))
    clips = {ex.segments[0][1] for task, options in (("captioning", {}), ("captioning", {"source": "clotho"}),
                                                     ("tagging", {}))
             for ex in data.examples(task, cfg.data_root, "train", **options)}
    bad = sorted(clips)[0]

    def load_fbank(path, t, f):
        if path == bad:
            raise audio.AudioError(f"{path}: not audio")
        return torch.zeros(1, t, f)

    monkeypatch.setattr(audio, "load_fbank", load_fbank)
    caplog.set_level(logging.WARNING)
    job = train.PretrainEncoder(cfg, 0, 1, cpu)
    assert len(job.train_windows) == len(clips) - 1 and f"{bad}: not audio" in caplog.text
    with torch.no_grad():  # (as pretraining leaves it: other weights than any encoder saved before)
        next(job.encoder.parameters()).add_(1.0)
    job.finish({"val_loss": 0.5})  # saved where every later stage (and evaluate.py) builds the run's encoder from
    later, _ = build.build_encoder(cfg, cpu, torch.float32, create=False)
    assert all(torch.equal(x, y) for x, y in zip(later.state_dict().values(), job.encoder.state_dict().values()))
    masks = []  # what each step's masks keep: drawn anew each step, the same again when a step is taken again

    def model(batch, ratio, generator, keep):
        masks.append(keep)
        return torch.zeros(())

    state = job.sampler.state_dict()
    for _ in range(2):
        job.micro_step(model, job.sampler)
    job.sampler.load_state_dict(state)
    job.micro_step(model, job.sampler)
    assert not torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])
    strict = train.load_config("tiny", opts(tmp_path, "--encoder_init=mae", "--strict_audio=true"))
    with pytest.raises(audio.AudioError, match=f"{re.escape(bad)}: not audio"):
        train.PretrainEncoder(strict, 0, 1, cpu)
    read = []
    monkeypatch.setattr(audio, "load_fbank", lambda path, t, f: read.append(path) or torch.zeros(1, t, f))
    train.PretrainEncoder(train.load_config("tiny", opts(copied, "--encoder_init=mae", "--caption_sources=audiocaps")),
                          0, 1, cpu)
    audiocaps = {split: {ex.segments[0][1] for ex in data.examples("captioning", cfg.data_root, split)}
                 for split in ("train", "val")}
    tagging = {ex.segments[0][1] for ex in data.examples("tagging", cfg.data_root, "train")}
    assert set(read) == audiocaps["train"] | tagging | audiocaps["val"] and len(read) == len(set(read))


def test_stage0_validation_encodes_its_clips_once(trained, tmp_path, monkeypatch):
    """Stage 0's validation reads each clip's features once for its loss and its retrieval: without a feature cache
    (the paper preset's) the encoder would run over them twice, and an unreadable clip be reported twice."""
    cfg = train.load_config("tiny", opts(copy_of(trained, tmp_path), "--feature_cache=off"))
    job = train.AlignStage0(cfg, 0, 1, torch.device("cpu"))
    calls, encode = [], train.encode_clips
    monkeypatch.setattr(train, "encode_clips", lambda enc, paths, *a: calls.append(list(paths)) or encode(enc, paths,
                                                                                                           *a))
    metrics = job.validate()
    assert calls == [[ex.segments[0][1] for ex in job.val]]
    assert {"val_loss", "a2t_r1", "t2a_r1"} <= metrics.keys()


def test_stage1_validation_answers_aqa_from_the_features_its_loss_read(trained, tmp_path):
    """Stages 1-2's validation encodes each chunk of each task once, for the loss; the AQA answers that follow read
    those features again, not the encoder (which, without a feature cache, would run over 64 clips once more)."""
    cfg = train.load_config("tiny", opts(copy_of(trained, tmp_path), "--feature_cache=off"))
    job = train.TuneAPT(cfg, "1", 0, 1, torch.device("cpu"))
    calls, encode = [], job.model.encode_clips
    job.model.encode_clips = lambda paths, *a: calls.append(list(paths)) or encode(paths, *a)
    metrics = job.validate()
    chunks = sum(math.ceil(len(exs) / cfg.batch_size) for exs in job.val.values())
    assert "aqa" in job.val and len(calls) == chunks and {"val_loss", "val_aqa_accuracy"} <= metrics.keys()


def test_training_reads_at_most_max_clip_windows_of_a_clip_drawn_by_step_and_validation_every_window(
        prepared, trained, tmp_path, monkeypatch):
    """max_clip_windows: stage 0, and stages 1 and 2 on captions, train on at most that many windows of a long clip,
    a run drawn by the run's seed and the step (so a resumed step draws the same); the other tasks, whose answers
    may lie anywhere in a clip, and validation read every window."""
    tmp, cpu = copy_of(prepared, tmp_path), torch.device("cpu")
    (tmp / "run" / "encoder.safetensors").unlink()  # 1.28 s windows: a 5 s clip spans four
    cfg = train.load_config("tiny", opts(tmp, "--target_length=128", "--max_clip_windows=2", "--feature_cache=off"))
    clotho = data.examples("captioning", cfg.data_root, "train", source="clotho")[:3]
    seen, encode = [], train.encode_clips
    monkeypatch.setattr(train, "encode_clips", lambda *a: seen.append(a[4:6]) or encode(*a))
    stage0, kept, batch = train.AlignStage0(cfg, 0, 1, cpu), [], train.stage0_batch
    monkeypatch.setattr(train, "stage0_batch", lambda caps, clips, *a: kept.append([len(c) for c in clips])
                        or batch(caps, clips, *a))
    stage0.micro_step(stage0.module, OneBatch("pairs", clotho))
    stage0.validate()
    whole = [len(c) for c in stage0.whole_clips(stage0.val)[1]]
    assert kept == [[2, 2, 2], whole] and min(whole) > 2
    assert seen[:2] == [(2, f"{cfg.seed}|1"), (0, "")]

    tmp = copy_of(trained, tmp_path / "stage1")  # stages 1 and 2 pass the same to the APT's encode_clips
    caps = data.examples("captioning", cfg.data_root, "train")[:2]
    for stage in ("1", "2"):
        job = train.TuneAPT(train.load_config("tiny", opts(tmp, "--max_clip_windows=2")), stage, 0, 1, cpu)
        asked, encode = [], job.model.encode_clips
        job.model.encode_clips = lambda paths, *a, asked=asked, encode=encode: asked.append(a) or encode(paths, *a)
        job.micro_step(job.module, OneBatch("captioning", caps))
        for task in ("sed", "counting", "aqa"):
            job.micro_step(job.module, OneBatch(task, data.examples(task, cfg.data_root, "train")[:2]))
        job.validate()
        assert asked[0] == (False, 2, f"{cfg.seed}|1") and asked[1:4] == [(False, 0, f"{cfg.seed}|1")] * 3
        assert set(asked[4:]) == {(False, 0, "")}


def test_with_decode_threads_each_step_reads_the_next_steps_clips_ahead_and_trains_alike(trained, tmp_path,
                                                                                          monkeypatch):
    """decode_threads (where features are not cached): each training step of stages 0 and 1 starts decoding the
    clips of its share of the next batch in the background, which the next step takes; the losses are those of
    decoding on the spot. -1 (the default): threads on a GPU only, one per core but one, at most 8; none with a
    feature cache; under torchrun, of the process's share of the cores."""
    tmp, cpu = copy_of(trained, tmp_path), torch.device("cpu")
    for stage in ("0", "1"):
        losses = {}
        for threads in (0, 2):
            cfg = train.load_config("tiny", opts(tmp, "--feature_cache=off", f"--decode_threads={threads}"))
            job = train.AlignStage0(cfg, 0, 1, cpu) if stage == "0" else train.TuneAPT(cfg, "1", 0, 1, cpu)
            ahead = job.ahead if stage == "0" else job.model.read_ahead
            assert (ahead is None) == (threads == 0)
            losses[threads] = []
            for _ in range(2):
                losses[threads].append(job.micro_step(job.module, job.sampler)[0].item())
                if ahead:  # one process: its share is the whole batch
                    assert list(ahead.started) == data.clips_of(job.sampler.peek()[1])
        assert losses[0] == pytest.approx(losses[2], rel=1e-5), stage  # decoded alike, to rounding
    cfg = train.load_config("tiny", opts(tmp, "--feature_cache=off"))  # decode_threads=-1
    on_cpu = SimpleNamespace(config=AudioMAEConfig(), cls_token=torch.zeros(1))
    on_gpu = SimpleNamespace(config=AudioMAEConfig(), cls_token=SimpleNamespace(device=torch.device("cuda")))
    made = build.read_ahead(cfg, on_gpu, None)
    assert (made.pool._max_workers if made else 0) == min(8, os.cpu_count() - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(os.cpu_count()))  # torchrun, a process per core: none each
    assert build.read_ahead(cfg, on_gpu, None) is None
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # a 64-core machine: 8 processes share it, 7 threads each
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert build.read_ahead(cfg, on_gpu, None).pool._max_workers == 7
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))  # a scheduler pinned it to 4 cores
    assert build.read_ahead(cfg, on_gpu, None).pool._max_workers == 3
    assert build.read_ahead(cfg, on_cpu, None) is None and build.read_ahead(cfg, on_gpu, FeatureCache(tmp_path, "s")
                                                                             ) is None
    threaded = train.load_config("tiny", opts(tmp, "--feature_cache=off", "--decode_threads=2"))
    apt = build.load_apt(threaded, tmp / "run" / "stage2" / "final")  # evaluation decodes in them too
    assert apt.read_ahead.pool._max_workers == 2 and build.load_apt(cfg, tmp / "run" / "stage2" / "final"
                                                                    ).read_ahead is None

    class Started:  # under DDP, each process reads ahead its own share of the next batch
        def start(self, paths):
            self.paths = paths

    sampler = data.TaskSampler({"pairs": data.examples("captioning", cfg.data_root, "train")}, {"pairs": 1.0}, 6)
    train.read_next(started := Started(), sampler, 1, 2)
    assert started.paths == [ex.segments[0][1] for ex in sampler.next_batch()[1][1::2]]


def test_every_stage_draws_one_global_batch_for_all_its_processes(trained, tmp_path, monkeypatch):
    """Each micro-step draws one global batch, of which each of the world processes takes its share (rank, rank +
    world, ...): so the batch drawn is world times the batch a process trains on (batch_size; stage 0's
    stage0_batch_size where set; --stage mae's mae_batch_size), whatever the number of processes."""
    from apt_min import audio

    monkeypatch.setattr(audio, "load_fbank", lambda path, t, f: torch.zeros(1, t, f))
    tmp, cpu = copy_of(trained, tmp_path), torch.device("cpu")
    cfg = train.load_config("tiny", opts(tmp, "--stage0_batch_size=3"))
    mae = train.load_config("tiny", opts(tmp, "--encoder_init=mae", "--mae_batch_size=5"))
    world = 3  # processes, as torchrun would start them
    jobs = {"lm": train.StandInLLM(cfg, 0, world, cpu), "mae": train.PretrainEncoder(mae, 0, world, cpu),
            "0": train.AlignStage0(cfg, 0, world, cpu), "1": train.TuneAPT(cfg, "1", 0, world, cpu),
            "2": train.TuneAPT(cfg, "2", 0, world, cpu)}
    got = {stage: job.sampler.batch_size for stage, job in jobs.items()}
    b = cfg.batch_size
    assert got == {"lm": b * world, "mae": 5 * world, "0": 3 * world, "1": b * world, "2": b * world}
    # one global batch: another process draws the very same one (and takes its own share of it)
    others = {"lm": train.StandInLLM(cfg, 1, world, cpu), "mae": train.PretrainEncoder(mae, 1, world, cpu)}
    for stage, job in others.items():
        assert job.sampler.peek() == jobs[stage].sampler.peek(), stage


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
    def reached():
        return latest.is_file() and latest.read_text() >= "step_0000006"

    while time.time() < deadline and proc.poll() is None and not reached():
        time.sleep(0.02)
    if not reached():
        if proc.poll() is not None:
            pytest.fail(f"the run to be killed ended (status {proc.returncode}) before its step-6 checkpoint")
        proc.kill()  # a machine too loaded to time this, not a resume bug
        proc.wait()
        pytest.fail("the run to be killed did not reach its step-6 checkpoint within 300 s")
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


def test_a_third_fresh_run_replaces_the_runs_set_aside_before(tmp_path, capsys):
    """previous/ holds the run before the last one alone: a fresh run with a previous/ already there replaces it
    (the older run's log and checkpoints go), and says what it moved."""
    (tmp_path / "checkpoints" / "step_0000004").mkdir(parents=True)
    (tmp_path / "log.jsonl").write_text("first\n")
    train.set_aside_previous_run(tmp_path)
    (tmp_path / "log.jsonl").write_text("second\n")
    train.set_aside_previous_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]
    assert [p.name for p in (tmp_path / "previous").iterdir()] == ["log.jsonl"]
    assert (tmp_path / "previous" / "log.jsonl").read_text() == "second\n"
    assert capsys.readouterr().out.splitlines()[-1] == (f"a fresh run: the previous run's log.jsonl moved to "
                                                        f"{tmp_path / 'previous'}/ (--resume continues a run instead)")


def test_a_validation_of_nothing_is_neither_logged_nor_shown(tmp_path, capsys):
    """A stage that validates on nothing (every validated task set to 0) returns no metrics: no log record and no
    line on the screen, where a validation's are both."""
    with open(tmp_path / "log.jsonl", "a") as logfile:
        train.log_validation(logfile, "1", 0, {}, "before training")
        train.log_validation(logfile, "1", 4, {"val_loss": 0.5})
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 4, "val_loss": 0.5}\n'
    assert capsys.readouterr().out == "stage 1 step 4: val_loss 0.5000\n"


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
    r = run([*TWO_PROCESSES, "train.py", "--stage",
             "1", *opts(two, *args, "--batch_size=2")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert agree(weights(one), weights(two), prepared)
    # the log shows the loss of the whole global batch, not the first process's share of it
    la, lb = (training_records(log_records(t, "stage1")) for t in (one, two))
    assert [s for s, _, _ in la] == [s for s, _, _ in lb] == [1, 2]
    assert all(x[1] == pytest.approx(y[1], abs=2e-5) and x[2] == pytest.approx(y[2], abs=2e-4) for x, y in zip(la, lb))


def test_two_processes_train_stage_2_as_one_does(trained, tmp_path):
    """Stage 2 (few-shot episodes and NLAR among its tasks, drawn by the sampler's generator alike in every process)
    on two processes of 2 examples each logs the losses, and ends with the weights, of one process of 4."""
    args = ["--steps_2=3", "--aligner_dropout=0", "--warmup_steps=1", "--log_every=1"]
    one, two = copy_of(trained, tmp_path / "one"), copy_of(trained, tmp_path / "two")
    r = run(["train.py", "--stage", "2", *opts(one, *args, "--batch_size=4")])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run([*TWO_PROCESSES, "train.py", "--stage", "2",
             *opts(two, *args, "--batch_size=2")])
    assert r.returncode == 0, r.stderr[-3000:]
    la, lb = (training_records(log_records(t, "stage2")) for t in (one, two))
    assert [s for s, _, _ in la] == [s for s, _, _ in lb] == [1, 2, 3]
    assert all(x[1] == pytest.approx(y[1], abs=2e-5) and x[2] == pytest.approx(y[2], abs=2e-4) for x, y in zip(la, lb))
    start = load_file(str(trained / "run" / "stage1" / "final" / "apt.safetensors"))
    a, b = (load_file(str(t / "run" / "stage2" / "final" / "apt.safetensors")) for t in (one, two))
    moved = max((a[k] - v).abs().max().item() for k, v in start.items())
    assert moved > 1e-4 and a.keys() == b.keys()  # the update is real
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-2 * moved


@pytest.mark.parametrize("stage, args, result", [
    ("lm", ["--steps_lm=3"], "llm/model.safetensors"),
    ("mae", ["--encoder_init=mae", "--steps_mae=3"], "encoder.safetensors"),
    ("caption_ft", ["--caption_ft_source=clotho", "--caption_ft_epochs=0.3", "--aligner_dropout=0"],
     "caption_ft-clotho/final/apt.safetensors")])
def test_two_processes_pretrain_and_tune_captions_as_one_does(trained, tmp_path, stage, args, result):
    """The stand-in LLM's pretraining (each process its share of the documents), the encoder's (each its windows'
    masks out of the global batch's) and caption_ft (its steps counted from the captions over the global batch:
    batch_size * processes) on two processes of 2 examples each take the steps, log the losses and end with the
    weights of one process of 4."""
    args = [*args, "--warmup_steps=1", "--log_every=1"]
    batch = "mae_batch_size" if stage == "mae" else "batch_size"
    one, two = copy_of(trained, tmp_path / "one"), copy_of(trained, tmp_path / "two")
    r = run(["train.py", "--stage", stage, *opts(one, *args, f"--{batch}=4")])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run([*TWO_PROCESSES, "train.py", "--stage", stage,
             *opts(two, *args, f"--{batch}=2")])
    assert r.returncode == 0, r.stderr[-3000:]
    folder = {"lm": "llm-train", "mae": "encoder-train", "caption_ft": "caption_ft-clotho"}[stage]
    la, lb = (training_records(log_records(t, folder)) for t in (one, two))
    assert len(la) >= 3 and [s for s, _, _ in la] == [s for s, _, _ in lb] and la[0][1] != la[-1][1]
    assert all(x[1] == pytest.approx(y[1], abs=2e-5) and x[2] == pytest.approx(y[2], abs=2e-4) for x, y in zip(la, lb))
    a, b = (load_file(str(t / "run" / result)) for t in (one, two))
    reach = train.load_config("tiny").lr * len(la)  # about the most AdamW moves a weight in these steps
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-2 * reach  # measured 2e-7


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
    monkeypatch.undo()  # the resumed run reaches step 2 again: its save replaces what the crash left
    ck.save(2, {"w": torch.zeros(3)}, {"step": 2})
    w, state = ck.load()
    assert state["step"] == 2 and torch.equal(w["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000001", "step_0000002"]


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_loss_stops_naming_the_step(tmp_path, bad):
    """The second step's loss is not finite: the run stops naming that step as log.jsonl numbers it (2) and the
    last good checkpoint (step 1's)."""
    cfg = train.load_config("tiny", {"steps_1": 3, "warmup_steps": 1, "eval_every": 100, "save_every": 1,
                                     "log_every": 1})
    module = nn.Linear(2, 1)
    params = dict(module.named_parameters())
    sampler = data.TaskSampler({"x": [1, 2]}, {"x": 1.0}, 1)
    calls = []

    def micro_step(model, sampler):
        sampler.next_batch()
        calls.append(1)
        loss = model(torch.ones(2)).sum() * (float(bad) if len(calls) == 2 else 1.0)
        return loss, 1, {}

    job = SimpleNamespace(module=module, params=params, sampler=sampler, scaler=None, micro_step=micro_step,
                          validate=lambda: {})
    with pytest.raises(SystemExit, match=rf"loss became -?{bad} at step 2.*last good checkpoint is step_0000001"):
        train.fit(cfg, "1", job, False, 0, 1, tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1]


def test_only_the_newest_checkpoints_are_kept(tmp_path, monkeypatch):
    ck = train.Checkpoints(tmp_path, keep=2)
    for step in range(1, 6):
        ck.save(step, {"w": torch.full((2,), float(step))}, {"step": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000004", "step_0000005"]
    read = []  # the training state is read onto the CPU, whatever device saved it (a GPU run resumed under
    monkeypatch.setattr(torch, "load", lambda *a, _load=torch.load, **k: read.append(k) or _load(*a, **k))  # torchrun)
    w, state = ck.load()
    assert state["step"] == 5 and torch.equal(w["w"], torch.full((2,), 5.0))
    assert read == [{"map_location": "cpu", "weights_only": True}]


def test_a_save_cut_short_is_not_counted_among_the_kept_checkpoints(tmp_path):
    """The step_N.tmp folder of a save a crash cut short (at step 9, say, in a run later resumed from an earlier
    checkpoint) is neither a checkpoint nor counted as one: keep=2 still keeps the two newest whole checkpoints."""
    ck = train.Checkpoints(tmp_path, keep=2)
    (tmp_path / "step_0000009.tmp").mkdir(parents=True)
    for step in range(1, 6):
        ck.save(step, {"w": torch.full((2,), float(step))}, {"step": step})
    assert sorted(p.name for p in tmp_path.glob("step_???????")) == ["step_0000004", "step_0000005"]
    assert ck.load()[1]["step"] == 5


def test_resume_drops_the_log_records_after_the_checkpoint_and_one_cut_short(tmp_path):
    """The log holds every step once after a resume: records written after the checkpoint's step go, and so does a
    last line the dying run wrote only in part (which stopped --resume with a JSONDecodeError)."""
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": k, "loss": 1.0 / k}) + "\n" for k in range(1, 6)) + '{"step": 6, "lo')
    train.truncate_log(log, 4)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    train.truncate_log(tmp_path / "gone.jsonl", 4)  # a run whose log was removed resumes, and starts a new one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]


def test_task_ratios_change_the_mixture_and_unknown_tasks_are_named(prepared, tmp_path):
    base = train.STAGES["1"]["ratios"]
    ratios = train.parse_ratios("aqa=0.3, fewshot=1,captioning=0", base)
    assert ratios == {**base, "aqa": 0.3, "captioning": 0.0}  # fewshot belongs to stage 2: ignored here
    assert train.parse_ratios("", base) == base
    with pytest.raises(SettingError, match=r"--task_ratios: unknown task 'speech'"):
        train.parse_ratios("speech=1", base)
    for bad in ("aqa", "aqa=x", "aqa=-1", "aqa=inf", "aqa=nan"):  # a weight missing, not a number, below 0
        with pytest.raises(SettingError, match=f"--task_ratios: '{bad}': expected task=weight, a weight of 0 or more"):
            train.parse_ratios(bad, base)
    with pytest.raises(SystemExit, match=r"^train.py: error: --task_ratios: 'aqa=x'"):  # one line, no traceback
        train.main(["--stage", "1", *opts(copy_of(prepared, tmp_path)), "--task_ratios=aqa=x"])


def test_a_task_set_to_0_reads_no_data_and_data_with_no_clip_left_is_one_clean_error(trained, tmp_path):
    """A user without some data set (AudioSet's strong labels; NLAR's, which is ours) turns its tasks off with
    --task_ratios=task=0: none of their files is read then, and stage 2 validates without NLAR. Where the clips a
    list names are all missing (copies named otherwise than the layout says), the stage stops before training with
    one message naming what is left empty, instead of dividing by zero many steps in or validating to a loss of 0;
    every ratio 0 is a setting error."""
    root = tmp_path / "data"
    shutil.copytree(trained / "synth", root, copy_function=os.symlink)
    (root / "layout.json").write_text(json.dumps({"audioset": {"strong": {"train": "gone/strong.tsv"}},
                                                  "nlar": {"json": "gone/nlar_{split}.json"}}))
    tmp = copy_of(trained, tmp_path)

    def job(stage, *settings):
        return train.TuneAPT(train.load_config("tiny", opts(tmp, f"--data_root={root}", *settings)), stage, 0, 1,
                             torch.device("cpu"))

    with pytest.raises(MissingFileError, match="gone/strong.tsv"):
        job("1")
    one = job("1", "--task_ratios=sed=0,ter=0,counting=0")
    assert set(one.sampler.tasks) == {"tagging", "captioning", "aqa"} == set(one.sampler.pools)
    with pytest.raises(MissingFileError, match="gone/nlar_train.json"):
        job("2", "--task_ratios=sed=0,ter=0,counting=0")
    two = job("2", "--task_ratios=sed=0,ter=0,counting=0,nlar=0")
    assert "nlar" not in two.sampler.pools and list(two.val) == ["captioning", "aqa"]
    with pytest.raises(SettingError, match="leaves this stage no task to train on"):
        job("1", "--task_ratios=" + ",".join(f"{t}=0" for t in train.STAGES["1"]["ratios"]))
    (root / "layout.json").write_text(json.dumps({"audiocaps": {"csv": "gone/{split}.csv"},  # no captions, no AQA:
                                                  "clotho": {"csv": "gone/c_{split}.csv"},  # their validation
                                                  "clotho_aqa": {"csv": "gone/a_{split}.csv"}}))  # splits unread too
    tags = job("1", "--task_ratios=captioning=0,aqa=0")
    assert set(tags.sampler.pools) == {"tagging", "sed", "ter", "counting"} and tags.val == {}
    assert tags.validate() == {}

    (root / "layout.json").write_text(json.dumps({"clotho_aqa": {"audio": "elsewhere/{file_name}"}}))
    with pytest.raises(data.DataError, match=r"^no training examples left for aqa: every clip the data lists is"):
        job("1")
    with pytest.raises(SystemExit, match=r"^train.py: error: no training examples left for aqa"):  # one line, first
        train.main(["--stage", "1", *opts(tmp, f"--data_root={root}")])
    (root / "layout.json").write_text(json.dumps({"audiocaps": {"audio": "elsewhere/{ytid}.wav"}}))
    with pytest.raises(SystemExit, match=rf"^train.py: error: captioning's validation split under {root}: every "
                                         "clip it lists is missing"):
        train.main(["--stage", "0", *opts(tmp, f"--data_root={root}")])
    with pytest.raises(SystemExit, match=r"the val split's audio \(captioning's and tagging's clips\) under .*: every "
                                         "clip it lists is missing"):  # --stage mae: AudioCaps and Clotho missing
        (root / "layout.json").write_text(json.dumps({"audiocaps": {"audio": "elsewhere/{ytid}.wav"},
                                                      "clotho": {"audio": "elsewhere/{split}/{file_name}"}}))
        train.main(["--stage", "mae", *opts(tmp, f"--data_root={root}", "--encoder_init=mae",
                                            f"--run_dir={tmp / 'mae'}", f"--llm_path={tmp / 'no-llm-yet'}")])
        # (the encoder pretrains without the LLM, or its tokenizer, downloaded yet)


def test_stage_2_trains_with_the_settings_dropout_and_keeps_the_apts_layout(trained, tmp_path, caplog):
    """Stage 2 (and caption_ft) continue a saved APT: its aligner's dropout is the setting's, as in stage 1; the
    layout it was trained in (prompt format, instruction BOS, long audio) and its aligner's shape stay, and a setting
    that differs is named in a warning rather than silently dropped."""
    from torch import nn

    tmp = copy_of(trained, tmp_path)
    with caplog.at_level("WARNING"):
        job = train.TuneAPT(train.load_config("tiny", opts(tmp, "--aligner_dropout=0", "--long_audio=all",
                                                       "--num_queries=7")), "2", 0, 1, torch.device("cpu"))
    rates = {m.p for m in job.model.aligner.modules() if isinstance(m, nn.Dropout) or hasattr(m, "heads")}
    assert rates == {0.0} and job.model.aligner.config.dropout == 0.0
    first = train.TuneAPT(train.load_config("tiny", opts(tmp, "--aligner_dropout=0.3")), "1", 0, 1,
                          torch.device("cpu"))  # stage 1 from stage 0's aligner (saved at the preset's 0.1)
    assert {m.p for m in first.model.aligner.modules() if isinstance(m, nn.Dropout) or hasattr(m, "heads")} == {0.3}
    assert job.model.long_audio == "windows" and "long_audio=windows; the settings' long_audio=all are not used" in \
        caplog.text
    queries = job.model.aligner.config.num_queries  # the aligner's shape is stage 0's: the size asked is named
    assert queries != 7 and f"holds an aligner of num_queries={queries}; the settings' num_queries=7 are not used" \
        in caplog.text


def test_made_up_names_in_training_episodes_are_a_setting(trained):
    """fewshot_made_up: the share of stage 2's episodes whose classes get made-up names (paper: none)."""
    from apt_min import synth

    real = {c.name for c in synth.TRAIN_CLASSES}

    def made_up(share):
        cfg = train.load_config("tiny", {"data_root": str(trained / "synth"), "fewshot_made_up": share})
        episodes = [train.training_pools(cfg, "2", ["fewshot"])["fewshot"](random.Random(i)) for i in range(40)]
        return sum(ep.answer not in real for ep in episodes)

    assert made_up(0.0) == 0 and made_up(1.0) == 40 and 5 < made_up(0.5) < 35
    assert train.load_config("paper", {}).fewshot_made_up == 0.0
    # tiny's and small's: half (docs/choices.md), so that answering means matching the query to the supports
    assert train.load_config("tiny", {}).fewshot_made_up == train.load_config("small", {}).fewshot_made_up == 0.5
    with pytest.raises(SystemExit, match="fewshot_made_up"):
        made_up(1.5)


def test_the_encoders_pretraining_reads_the_clips_its_sources_name(prepared, tmp_path, monkeypatch):
    """--stage mae trains on the clips of every source caption_sources and tagging_sources name: here a WavCaps
    subset of three clips, and an unbalanced AudioSet list that names clips no caption set trains on (AudioSet's
    test clips) join in. It validates on the held-out clips of the caption sources that have a split: AudioCaps'
    here; WavCaps has none, so none of its clips is validated on."""
    from apt_min import audio

    root = tmp_path / "synth"
    shutil.copytree(prepared / "synth", root, copy_function=os.symlink)
    (root / "wavcaps" / "FreeSound").mkdir(parents=True)
    (root / "wavcaps" / "json_files" / "FreeSound").mkdir(parents=True)
    clips = sorted((root / "audio").glob("*.wav"))[:3]
    for clip in clips:
        (root / "wavcaps" / "FreeSound" / f"{clip.stem}.flac").symlink_to(clip)
    listing = {"data": [{"id": clip.stem, "caption": f"a caption from wavcaps {i}"} for i, clip in enumerate(clips)]}
    (root / "wavcaps" / "json_files" / "FreeSound" / "fsd_final.json").write_text(json.dumps(listing))
    (root / "audioset" / "unbalanced_train_segments.csv").write_text(
        (root / "audioset" / "eval_segments.csv").read_text())
    read = []
    monkeypatch.setattr(audio, "load_fbank", lambda path, t, f: read.append(path) or torch.zeros(1, t, f))
    cfg = train.load_config("tiny", opts(tmp_path, "--encoder_init=mae", "--tagging_sources=balanced,unbalanced",
                                         "--caption_sources=audiocaps,wavcaps:FreeSound"))
    job = train.PretrainEncoder(cfg, 0, 1, torch.device("cpu"))

    def clips_of(task, split, **options):
        return {ex.segments[0][1] for ex in data.examples(task, str(root), split, **options)}

    wavcaps = {str(root / "wavcaps" / "FreeSound" / f"{clip.stem}.flac") for clip in clips}
    listed_alone = clips_of("tagging", "test") - clips_of("captioning", "train") - clips_of("tagging", "train")
    assert listed_alone and not wavcaps & clips_of("captioning", "train")
    trained = clips_of("captioning", "train") | wavcaps | clips_of("tagging", "train") | listed_alone
    assert set(read[:len(job.train_windows)]) == trained and len(job.train_windows) == len(trained)
    assert set(read[len(job.train_windows):]) == clips_of("captioning", "val")


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
        return train.training_pools(cfg, "1", ["captioning", "tagging"]), train.stage0_pairs(cfg, random.Random(0))

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
                           ("caption_sources", "clotho,audiocaps,clotho"), ("caption_sources", "tagging")):
        with pytest.raises(SystemExit, match=f"--{setting}"):
            train.main(["--stage", "1", *opts(tmp_path), f"--{setting}={value}"])  # before anything runs
    spaced = train.load_config("tiny", {"data_root": str(root), "caption_sources": " audiocaps , clotho,"})
    assert train.sources(spaced, "caption_sources") == ["audiocaps", "clotho"]  # as a shell may quote it
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
    assert first["lr"] == pytest.approx(1e-3 / 4)  # the first of 4 warm-up steps (warmup_steps=2 would give 1e-3 / 2)
    cfg = train.load_config("tiny", [*opts(tmp, "--stage0_batch_size=6")])
    job = train.AlignStage0(cfg, 0, 1, torch.device("cpu"))
    loss, _, info = job.micro_step(job.module, job.sampler)
    assert job.sampler.batch_size == 6 and info["examples"] == 6 and loss.isfinite()
    paper = train.load_config("paper", {})
    assert (paper.stage0_batch_size, paper.warmup_steps_0, paper.warmup_steps) == (128, 5000, 2000)
    assert (paper.grad_accum_0, paper.grad_accum) == (1, 4)  # a stage-0 step is one contrastive batch


def test_stage_1_refuses_a_stage_0_aligner_of_another_encoder(prepared, tmp_path):
    """Stage 0 records the encoder its aligner read (aligner.json); stage 1 with another encoder (a new --stage mae,
    another --encoder_checkpoint or --output_block) would tune an aligner on features it never saw: refused, naming
    the folder and both encoders, as APT.load does for stages 2 on."""
    tmp = copy_of(prepared, tmp_path)
    meta_file = tmp / "run" / "stage0" / "final" / "aligner.json"
    meta = json.loads(meta_file.read_text())
    meta["encoder"]["fingerprint"] = "0123456789abcdef"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match=r"stage0/final: stage 0's aligner was trained against the encoder .*"
                                         r"0123456789abcdef.*but the encoder is now"):
        train.main(["--stage", "1", *opts(tmp)])

def test_caption_fine_tuning_makes_whole_passes_over_one_caption_set(trained, tmp_path):
    """--stage caption_ft (paper §4.2, before Table 4): stage 2's APT tuned on one caption set's training captions
    alone, for caption_ft_epochs passes; saved beside the stages in caption_ft-{source}/ (so evaluation finds the
    run's stage-0 aligner); it continues the run's own stage 2 (not, as a run without one, the preset's release)."""
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
    assert meta["config"]["start_from"] == ""
    before = load_file(str(tmp / "run" / "stage2" / "final" / "apt.safetensors"))
    after = load_file(str(folder / "final" / "apt.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    train.main(["--stage", "caption_ft", *opts(tmp, "--caption_ft_source=audiocaps", "--caption_ft_epochs=0.05",
                                               "--lr=0")])  # with lr 0 its result is where it started: stage 2's
    after = load_file(str(tmp / "run" / "caption_ft-audiocaps" / "final" / "apt.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
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


def test_a_continuation_in_a_run_folder_of_its_own_reads_the_parts_its_apt_names(trained, tmp_path):
    """--start_from into another --run_dir, and evaluate.py --checkpoint from one: the encoder and the LLM are the
    ones the APT was trained against (its apt.json names both), not the new folder's own, which has none (a tokenizer
    or an encoder made there would not be the APT's); tagging's paper protocol follows the continuation back to the
    chain's stage-0 aligner."""
    import evaluate

    tmp = copy_of(trained, tmp_path)
    chain, more = tmp / "run", tmp / "more"
    settings = [f"--data_root={tmp / 'synth'}", *MINI]
    train.main(["--stage", "2", *settings, f"--run_dir={more}", "--steps_2=1",
                f"--start_from={chain / 'stage2' / 'final'}"])
    meta = json.loads((more / "stage2" / "final" / "apt.json").read_text())
    start = json.loads((chain / "stage2" / "final" / "apt.json").read_text())  # (the copy names the chain's files)
    assert meta["encoder"] == start["encoder"] and meta["llm"] == start["llm"]
    assert not (more / "llm").exists() and not (more / "encoder.safetensors").exists()
    evaluate.main(["--task", "audioset", "--limit", "4", "--batch-size", "4", *settings, f"--run_dir={tmp / 'none'}",
                   f"--checkpoint={more / 'stage2' / 'final'}", f"--out={tmp / 'eval'}"])
    rows = json.loads((tmp / "eval" / "metrics_audioset.json").read_text())
    assert rows[0]["protocol"].startswith("paper protocol:") and 0 <= rows[0]["apt"] <= 1
    assert not (tmp / "none" / "llm").exists() and not (tmp / "none" / "encoder.safetensors").exists()
    # resumed without the --start_from it continued: told to give it again, not to pretrain an encoder (the folder
    # has none of its own: a preset whose encoder --stage mae makes was told to run that)
    with pytest.raises(SystemExit, match=rf"^stage 2 starts from stage 1's result, which is not in "
                                         rf"{more}/stage1/final/; .*give its --start_from again"):
        train.main(["--stage", "2", *settings, f"--run_dir={more}", "--encoder_init=mae", "--resume"])


def test_precision_settings():
    cpu = torch.device("cpu")
    with pytest.raises(SettingError, match=r"--precision=fp16 needs a CUDA device"):
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
    grad_norm = train.optimizer_step(SimpleNamespace(grad_clip=0.5), job, opt, sched, window)
    assert grad_norm.item() == pytest.approx(12.5)
    torch.testing.assert_close(p.detach(), torch.tensor([-0.3, -0.4]))  # one SGD step of the gradient clipped to 0.5
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
    """cosine_schedule: linear warm-up to the full rate over `warmup` steps, the full rate at the warm-up's last step
    alone, then half a cosine down to min_lr_ratio at the run's last step, where it stays. The step numbered k takes
    factor(k - 1), as LambdaLR gives it."""
    factor = train.cosine_schedule(SimpleNamespace(min_lr_ratio=0.1), total=14, warmup=4)
    after_peak = 0.1 + 0.9 * 0.5 * (1 + math.cos(0.1 * math.pi))  # a tenth of the way down
    assert [factor(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, after_peak])
    assert factor(8) == pytest.approx(0.55)  # step 9, half way down: (1 + 0.1) / 2
    assert factor(13) == pytest.approx(0.1) and factor(20) == pytest.approx(0.1)  # step 14, the last, at the floor
    no_warmup = train.cosine_schedule(SimpleNamespace(min_lr_ratio=0.1), total=3, warmup=0)
    assert [no_warmup(s) for s in range(3)] == pytest.approx([1.0, 0.55, 0.1])


def test_each_stage_warms_up_over_its_own_steps():
    """Stage 0 has its own warm-up where set; caption_ft, a fine-tune of a few thousand steps, warms up over a tenth
    of them (the paper preset's 2 000 would leave the whole run warming up) unless given its own; the rest share
    warmup_steps."""
    paper = train.load_config("paper", {})
    assert [train.warmup_steps(paper, s, 1200) for s in ("0", "1", "2", "caption_ft")] == [5000, 2000, 2000, 120]
    assert train.warmup_steps(train.load_config("paper", {"warmup_steps_caption_ft": 300}), "caption_ft", 1200) == 300
    tiny = train.load_config("tiny", {})
    assert train.warmup_steps(tiny, "0", 600) == tiny.warmup_steps and train.warmup_steps(tiny, "caption_ft", 5) == 1


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
    assert rng.random() == random.Random(0).random()  # the one shape takes no random number: the episode drawn after
    # it is the one the same generator drew before shapes were a setting
    shapes = {train.episode_shape(SimpleNamespace(fewshot_shapes="mixed"), rng) for _ in range(1000)}
    assert shapes == {(ways, shots) for ways in range(2, 6) for shots in range(1, 4) if ways * shots <= 12}
    # the ways first, each as likely (5 ways allow only 2 shot counts, the others 3), then the shots they allow
    mixed = SimpleNamespace(fewshot_shapes="mixed")
    ways = collections.Counter(train.episode_shape(mixed, rng)[0] for _ in range(4000))
    assert all(abs(ways[w] / 4000 - 0.25) < 0.03 for w in range(2, 6)), ways


def test_training_episodes_take_only_the_shapes_the_pool_can_fill(caplog):
    """A few-shot pool of three classes (clips: 4, 4, 2) fills 2-3 ways, but 3 shots only for two classes: the
    other shapes are named in a warning and never drawn (an episode of them stopped stage 2); a pool that fills
    every shape draws exactly as before; one that fills none is an error that says why."""
    mixed = SimpleNamespace(fewshot_shapes="mixed")
    small = {"a": list("1234"), "b": list("5678"), "c": list("90")}
    with caplog.at_level("WARNING"):
        fillable = train.fillable_shapes(mixed, small)
    assert fillable == {(2, 1), (2, 2), (2, 3), (3, 1)} and "(4, 1)" in caplog.text
    rng = random.Random(0)
    drawn = collections.Counter(train.episode_shape(mixed, rng, fillable) for _ in range(300))
    assert drawn.keys() == fillable
    # a shape drawn that cannot be filled is drawn again among those that can, alike: each of the four is drawn a
    # quarter of the time ((2, 1): 1/12 at once, then a quarter of the 2/3 drawn again)
    assert all(0.15 < n / 300 < 0.35 for n in drawn.values()), drawn
    for _ in range(50):
        data.fewshot_episode(small, *train.episode_shape(mixed, rng, fillable), rng)
    large = {str(i): list("0123") for i in range(6)}
    assert train.fillable_shapes(mixed, large) == set(train.episode_shapes(mixed))
    a, b = random.Random(3), random.Random(3)
    assert [train.episode_shape(mixed, a, set(train.episode_shapes(mixed))) for _ in range(50)] == \
        [train.episode_shape(mixed, b) for _ in range(50)]
    with pytest.raises(data.DataError, match=r"cannot fill any episode .* it has 1 classes with two or more "
                                             "single-label clips"):
        train.fillable_shapes(mixed, {"a": ["1", "2"], "b": ["3"]})


def test_made_up_class_names_differ_within_an_episode_and_from_real_ones(monkeypatch):
    """fewshot_episode(rename=True): a made-up name is drawn again while it repeats one of the episode's or names a
    real class of the pool ("siren" is one that pseudo_word can make)."""
    words = iter(["siren", "tovak", "tovak", "bamik", "tovak", "delun", "fomas"])
    monkeypatch.setattr(data, "pseudo_word", lambda rng: next(words))
    pool = {"Siren": list("abcd"), **{f"class{i}": list("abcd") for i in range(3)}}
    episode = data.fewshot_episode(pool, 4, 1, random.Random(0), rename=True)
    assert sorted(episode.target["choices"]) == ["bamik", "delun", "fomas", "tovak"]


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


# ------------------------------------------------------------------------------- each stage's parts, one at a time


class OneBatch:
    """A sampler that hands out one given global batch, as TaskSampler.next_batch does: (task, examples)."""

    def __init__(self, task, batch):
        self.task, self.batch, self.step = task, batch, 0

    def next_batch(self):
        self.step += 1
        return self.task, self.batch


def test_each_process_trains_on_its_own_share_of_the_global_batch(prepared, monkeypatch):
    """Under DDP every stage's micro_step takes the global batch's examples rank, rank + world, ...: process 1 of 2
    gets examples 1, 3, 5 of 7. (The update alone cannot show it: two processes that both train on the whole batch
    average to the same gradient, at twice the work, with every example counted twice.)"""
    from apt_min.mae import random_keep as mae_masks

    batch = data.examples("aqa", prepared / "synth", "train")[:7]
    mine = batch[1::2]
    seen = []
    one = torch.tensor(1.0)

    lm = object.__new__(train.StandInLLM)
    lm.rank, lm.world = 1, 2
    lm.loss_sum = lambda model, docs: (seen.append(docs), (one, len(docs)))[1]
    assert lm.micro_step(None, OneBatch("lm", batch))[1:] == (3, {"examples": 3}) and seen.pop() == mine

    align = object.__new__(train.AlignStage0)
    align.rank, align.world, align.cfg, align.ahead = 1, 2, SimpleNamespace(seed=0, max_clip_windows=0), None
    parts = dict.fromkeys(("total", "atc", "atm", "agtg"), one)
    align.whole_clips = lambda examples, *crop: (examples, [], 0)
    align.losses = lambda model, examples, g, found: (seen.append(examples), (parts, examples, 0))[1]
    assert align.micro_step(None, OneBatch("pairs", batch))[2]["examples"] == 3 and seen.pop() == mine

    tune = object.__new__(train.TuneAPT)
    tune.rank, tune.world, tune.device, tune.autocast = 1, 2, torch.device("cpu"), nullcontext
    tune.cfg, tune.model = SimpleNamespace(seed=0, max_clip_windows=0), SimpleNamespace(read_ahead=None)
    tune.usable = lambda examples, *crop: (seen.append(examples), (examples, {}))[1]
    monkeypatch.setattr(train, "nothing_to_train", lambda keep, world, device: not keep)  # no process group here
    model = lambda *collated: (one, len(collated[0]))  # noqa: E731
    assert tune.micro_step(model, OneBatch("aqa", batch))[2]["examples"] == 3 and seen.pop() == mine
    tune.usable = lambda examples, *crop: (examples[1:], {})  # an example with a lost clip: skipped, not trained
    assert tune.micro_step(model, OneBatch("aqa", batch))[2] == {"task": "aqa", "examples": 2, "skipped": 1}
    tune.usable = lambda examples, *crop: ([], {})  # none left: the step has nothing to train
    assert tune.micro_step(model, OneBatch("aqa", batch)) == (None, 0, {"examples": 0, "skipped": 3})

    mae = object.__new__(train.PretrainEncoder)
    mae.rank, mae.world, mae.device, mae.autocast = 1, 2, torch.device("cpu"), nullcontext
    mae.cfg, mae.train_windows = SimpleNamespace(seed=0, mask_ratio=0.5), torch.arange(10.0)[:, None]
    mae.encoder = SimpleNamespace(num_patches=6)
    mae_model = lambda windows, ratio, g, keep: (seen.append((windows.flatten().tolist(), keep)), one)[1]  # noqa: E731
    assert mae.micro_step(mae_model, OneBatch("windows", [0, 2, 4, 6, 8, 9, 7]))[2]["examples"] == 3
    windows, keep = seen.pop()  # and their masks: the global batch's rows 1, 3, 5, as one process would draw them
    assert windows == [2.0, 6.0, 9.0]
    assert torch.equal(keep, mae_masks(7, 6, 0.5, torch.Generator().manual_seed(1))[1::2])


def test_the_stand_in_llm_learns_next_tokens_of_whole_documents_from_a_small_start(prepared, monkeypatch):
    """--stage lm: a corpus document is BOS, its pieces' tokens, EOS (at most 1024 ids); the loss is the
    next-token cross-entropy summed over each document's own tokens (padding never predicted nor predicting); the
    matrices start at N(0, 0.02); it validates on documents it does not train on (the corpus's test split), and
    validation's answer accuracy is the share of the validation documents answered (of the first 64: a quick
    metric), on val_batches batches of them."""
    cfg = train.load_config("tiny", opts(prepared))
    job = train.StandInLLM(cfg, 0, 1, torch.device("cpu"))
    tok = job.tok
    doc = ["A dog barks.", " Then rain falls."]
    assert job.encode(doc) == [tok.bos_id, *tok.encode(doc[0], bos=False), *tok.encode(doc[1], bos=False),
                               tok.eos_id]
    assert len(job.encode(["rain " * 2000])) == 1024
    matrices = [p for p in job.llm.parameters() if p.ndim >= 2]
    assert matrices and all(abs(p.std().item() - 0.02) < 0.002 for p in matrices)
    trained_on = {tuple(d) for d in job.train_docs}
    assert job.val_docs and not any(tuple(job.encode(d)) in trained_on for d in job.val_docs)

    docs = [job.encode(d) for d in job.val_docs[:3]]
    assert len({len(d) for d in docs}) > 1  # padded to the longest
    loss_sum, count = job.loss_sum(job.llm, docs)
    with torch.no_grad():
        alone = [F.cross_entropy(job.llm(torch.tensor([d[:-1]]))[0], torch.tensor(d[1:]), reduction="sum")
                 for d in docs]
    assert count == sum(len(d) - 1 for d in docs)
    assert loss_sum.item() == pytest.approx(sum(alone).item(), rel=1e-5)

    answers = {tuple(job.encode(d[:-1])[:-1]): d[-1] for d in job.val_docs}
    right, caps = set(list(answers)[::2]), set()  # every other document answered

    def generate(ids, max_new_tokens, **kw):
        caps.add(max_new_tokens)
        said = answers[tuple(ids[0].tolist())] if tuple(ids[0].tolist()) in right else "no idea"
        return torch.tensor([tok.encode(said, bos=False)])

    monkeypatch.setattr(job.llm, "generate", generate)
    assert len(job.val_docs) < 64
    assert job.validate()["val_answer_accuracy"] == pytest.approx(len(right) / len(job.val_docs))
    four = tasks.format_segments([(0.1, 0.9), (1.3, 2.4), (2.8, 3.6), (4.1, 4.7)])  # an event heard four times
    longest = max(len(tok.encode(a, bos=False)) + 1 for a in [four, *answers.values()])
    assert min(caps) >= longest  # room for the longest answer and its EOS: every document can be answered
    # val_batches batches of documents; the answer accuracy over the first 64 of them (the quick metric)
    many = train.StandInLLM(train.load_config("tiny", opts(prepared, "--val_batches=20")), 0, 1, torch.device("cpu"))
    asked = []
    monkeypatch.setattr(many.llm, "generate", lambda ids, max_new_tokens, **kw: asked.append(1) or torch.tensor(
        [tok.encode(answers.get(tuple(ids[0].tolist()), "?"), bos=False)]))
    answers = {tuple(many.encode(d[:-1])[:-1]): d[-1] for d in many.val_docs}
    assert len(many.val_docs) == 20 * cfg.batch_size > 64
    assert many.validate()["val_answer_accuracy"] == 1.0 and len(asked) == 64

    # the run's precision, as every stage: bf16 autocast where it resolves to bf16 (the weights train in fp32)
    half = train.StandInLLM(train.load_config("tiny", opts(prepared, "--precision=bf16")), 0, 1, torch.device("cpu"))
    computed = []
    half.llm.lm_head.register_forward_hook(lambda module, args, out: computed.append(out.dtype))
    half.loss_sum(half.llm, docs)
    job.llm.lm_head.register_forward_hook(lambda module, args, out: computed.append(out.dtype))
    job.loss_sum(job.llm, docs)
    assert computed == [torch.bfloat16, torch.float32] and half.llm.lm_head.weight.dtype == torch.float32


def test_stage_0_reads_whole_clips_counts_what_it_skips_and_retrieves_over_every_reference(prepared, tmp_path,
                                                                                          monkeypatch, caplog, capsys):
    """AlignStage0: a caption describes its whole clip, so every window of a clip longer than one (here 1.28 s
    windows of 5 s clips) reaches the aligner; a clip that cannot be read is skipped and counted in the step's
    record, and where another process has no usable example this one skips the step too (under DDP all run the
    same forwards); validation's retrieval ranks every reference caption of each clip (each owned by its clip), not
    only the first, each tokenised as training's captions are (BOS ... EOS). (A run keeps the encoder it saved: a
    window setting that disagrees is named in a warning.)"""
    cfg = train.load_config("tiny", opts(copy_of(prepared, tmp_path), "--target_length=128"))
    caplog.set_level(logging.WARNING)
    kept = train.AlignStage0(cfg, 0, 1, torch.device("cpu"))  # the run's encoder, built for 512 frames, stays
    assert kept.encoder.config.target_length == 512
    assert "encoder.safetensors was built with target_length=512; the settings' target_length=128 are not used" in \
        caplog.text
    (tmp_path / "run" / "encoder.safetensors").unlink()
    job = train.AlignStage0(cfg, 0, 1, torch.device("cpu"))
    clotho = data.examples("captioning", cfg.data_root, "train", source="clotho")[:3]
    lost = dataclasses.replace(clotho[0], segments=[("audio", str(tmp_path / "nowhere.wav")),
                                                    *clotho[0].segments[1:]])
    keep, clips, skipped = job.whole_clips([lost, *clotho])
    assert keep == clotho and skipped == 1
    job.cfg.strict_audio = True  # --strict_audio=true: the clip that cannot be read stops the run, named
    with pytest.raises(audio.AudioError, match="nowhere.wav: no such audio file"):
        job.whole_clips([lost, *clotho])
    job.cfg.strict_audio = False
    windows = [audio.load_fbank(ex.segments[0][1], cfg.target_length, job.encoder.config.num_mel_bins).shape[0]
               for ex in clotho]
    assert [len(c) for c in clips] == windows and min(windows) > 1

    loss, count, info = job.micro_step(job.module, OneBatch("pairs", [lost, *clotho]))
    assert count == 1 and torch.isfinite(loss) and (info["examples"], info["skipped"]) == (3, 1)

    monkeypatch.setattr(train, "nothing_to_train", lambda keep, world, device: True)  # another process has none
    assert job.micro_step(job.module, OneBatch("pairs", clotho)) == (None, 0, {"examples": 0, "skipped": 0})

    seen = {}
    monkeypatch.setattr(train, "retrieval_r1", lambda aligner, feats, ids, mask, owner, heard: seen.update(
        rows=len(ids), owner=owner.tolist(), ends={(int(i[0]), int(i[m].tolist()[-1])) for i, m in zip(ids, mask)})
        or {"a2t_r1": 0.0, "t2a_r1": 0.0})
    job.validate()  # (its loss: this process's batch alone, with no other process to ask)
    refs = [len(ex.target["references"]) for ex in job.val]
    assert max(refs) > 1 and seen.pop("ends") == {(job.tok.bos_id, job.tok.eos_id)}
    assert seen == {"rows": sum(refs), "owner": [i for i, n in enumerate(refs) for _ in range(n)]}
    job.finish({"val_loss": 1.0, "a2t_r1": 0.25, "t2a_r1": 0.5})  # the closing line names each direction's R@1
    assert "audio->text R@1 0.250, text->audio R@1 0.500" in capsys.readouterr().out


def test_stage_0s_validation_loss_is_its_three_losses_summed_over_the_whole_validation_set(prepared, tmp_path,
                                                                                         monkeypatch):
    """AlignStage0.validate: the loss is ATC + ATM + AGTG on the first val_batches * batch_size clips of the
    validation split, as one batch of this process's alone, its hard negatives drawn from a generator of its own
    seeded 0: the same at every validation, whatever training has drawn since; with the run's ATM negatives."""
    cfg = train.load_config("tiny", opts(copy_of(prepared, tmp_path), "--val_batches=2", "--atm_negatives=local"))
    job = train.AlignStage0(cfg, 0, 1, torch.device("cpu"))
    assert job.val == data.examples("captioning", cfg.data_root, "val")[:8] and len(job.val) == 2 * cfg.batch_size
    seen, real = [], train.stage0_losses

    def stage0_losses(aligner, feats, ids, mask, clip_ids, audio_mask, generator, negatives, across_processes):
        seen.append({"pairs": len(ids), "seed": generator.initial_seed(), "across_processes": across_processes,
                     "negatives": negatives})
        parts = real(aligner, feats, ids, mask, clip_ids, audio_mask, generator, negatives, across_processes)
        seen[-1] |= {k: v.item() for k, v in parts.items()}
        return parts

    monkeypatch.setattr(train, "stage0_losses", stage0_losses)
    first = train.validation(job)["val_loss"]  # dropout off, as fit validates
    torch.manual_seed(1)
    job.sampler.next_batch()
    assert train.validation(job)["val_loss"] == first
    assert len(seen) == 2 and seen[0] == seen[1]
    got = seen[0]
    assert (got["pairs"], got["seed"], got["across_processes"], got["negatives"]) == (8, 0, False, "local")
    assert first == got["total"] == pytest.approx(got["atc"] + got["atm"] + got["agtg"], rel=1e-6)
    assert min(got["atc"], got["atm"], got["agtg"]) > 0.05  # each term counts


def test_the_stand_in_llms_and_the_encoders_validation_losses_are_means_over_their_items():
    """StandInLLM.validate: the next-token loss summed over every validation batch's tokens over their number (a
    batch of short documents weighs less than one of long ones); the answers scored over every validation
    document. PretrainEncoder.validate: the masked-patch loss over every validation window alike (each batch's own
    mean, weighted by its windows: a short last batch weighs less), its masks drawn from a generator seeded 0, at
    the setting's mask ratio, in batches of mae_batch_size windows."""
    cpu = torch.device("cpu")
    lm = object.__new__(train.StandInLLM)
    lm.cfg, lm.device = SimpleNamespace(batch_size=2), cpu
    lm.val_docs = [[str(k), "yes" if k % 2 else "no"] for k in range(1, 6)]  # document k: k tokens of loss k each
    lm.encode = lambda doc: [int(doc[0])] * int(doc[0]) if doc else []
    batches = []

    def loss_sum(model, docs):
        batches.append(len(docs))
        return torch.tensor(float(sum(d[0] * len(d) for d in docs))), sum(len(d) for d in docs)

    lm.loss_sum = loss_sum
    lm.llm = SimpleNamespace(generate=lambda ids, **kw: torch.tensor([[ids.shape[1] + 1]]))  # says k for prompt k
    lm.tok = SimpleNamespace(eos_id=2, decode=lambda ids: "yes" if ids[0] % 2 else "wrong")  # k odd: right
    got = lm.validate()
    assert batches == [2, 2, 1]
    assert got == {"val_loss": pytest.approx((1 + 4 + 9 + 16 + 25) / 15), "val_answer_accuracy": 3 / 5}

    mae = object.__new__(train.PretrainEncoder)
    mae.cfg, mae.device, mae.autocast = SimpleNamespace(mae_batch_size=2, mask_ratio=0.8), cpu, nullcontext
    mae.val_windows = torch.arange(6.0)[:, None, None] ** 2  # windows 0, 1, 4, 9, 16, 25
    asked = []

    def masked_loss(chunk, ratio, g):  # a batch's loss: the mean of its windows
        asked.append((chunk.flatten().tolist(), ratio, g.initial_seed()))
        return chunk.mean()

    mae.module = masked_loss
    assert mae.validate() == {"val_loss": pytest.approx((0.5 + 6.5 + 20.5) / 3)}
    assert asked == [([0.0, 1.0], 0.8, 0), ([4.0, 9.0], 0.8, 0), ([16.0, 25.0], 0.8, 0)]
    mae.cfg.mae_batch_size = 4  # batches of 4 and 2 windows: the mean of the six
    assert mae.validate() == {"val_loss": pytest.approx((0 + 1 + 4 + 9 + 16 + 25) / 6)}


def test_stage_0s_hard_negatives_are_drawn_by_step_and_a_resumed_sampler_draws_them_again():
    """AlignStage0.micro_step draws its ATM hard negatives from a generator seeded by the run's seed and the
    sampler's step: each step its own, whatever else has drawn from the global generators, and a sampler restored
    to a step (--resume) draws that step's again."""
    align = object.__new__(train.AlignStage0)
    align.rank, align.world, align.cfg, align.ahead = 0, 1, SimpleNamespace(seed=3, max_clip_windows=0), None
    align.whole_clips = lambda examples, *crop: (examples, [], 0)
    one = torch.tensor(1.0)
    parts = dict.fromkeys(("total", "atc", "atm", "agtg"), one)
    drawn = []
    align.losses = lambda model, examples, g, found: drawn.append(torch.rand(4, generator=g)) or (parts, examples, 0)
    sampler = data.TaskSampler({"pairs": list(range(10))}, {"pairs": 1.0}, 2, seed=3)
    align.micro_step(None, sampler)
    state = sampler.state_dict()
    for seed in (5, 6):
        torch.manual_seed(seed)
        align.micro_step(None, sampler)
    resumed = data.TaskSampler({"pairs": list(range(10))}, {"pairs": 1.0}, 2, seed=3)
    resumed.load_state_dict(state)
    torch.manual_seed(7)
    align.micro_step(None, resumed)
    assert torch.equal(drawn[3], drawn[1])  # step 2 again
    assert not torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[1], drawn[2])
    align.cfg = SimpleNamespace(seed=4, max_clip_windows=0)  # another run's seed: other negatives at the same step
    align.micro_step(None, data.TaskSampler({"pairs": list(range(10))}, {"pairs": 1.0}, 2, seed=3))
    assert not torch.equal(drawn[4], drawn[0])


def test_stages_1_2_and_caption_ft_validate_their_own_tasks_and_drop_examples_with_any_lost_clip(trained, tmp_path):
    """TuneAPT: stage 1 validates on captioning and AQA, stage 2 on NLAR too (what it adds), caption_ft on the
    validation captions of its own caption set; an example is usable only if every one of its clips is (an NLAR pair
    with one clip lost is dropped, not trained with the other alone). AQA's accuracy takes an answer as evaluation
    does (normalised: case, punctuation, articles), generated with room for the longest training answer."""
    tmp = copy_of(trained, tmp_path)
    root, cpu = tmp / "synth", torch.device("cpu")
    jobs = {stage: train.TuneAPT(train.load_config("tiny", opts(tmp, "--caption_ft_source=clotho")), stage, 0, 1, cpu)
            for stage in ("1", "2", "caption_ft")}
    assert {s: list(j.val) for s, j in jobs.items()} == {
        "1": ["captioning", "aqa"], "2": ["captioning", "aqa", "nlar"], "caption_ft": ["captioning"]}
    # val_batches * batch_size examples (1 * 4 in the miniature) shared out among the tasks, at least one each
    assert {s: [len(v) for v in j.val.values()] for s, j in jobs.items()} == {"1": [2, 2], "2": [1, 1, 1],
                                                                          "caption_ft": [4]}
    twice = train.TuneAPT(train.load_config("tiny", opts(tmp, "--val_batches=2")), "2", 0, 1, cpu)
    assert [len(v) for v in twice.val.values()] == [2, 2, 2]
    # caption_ft: whole passes over the set's captions, each step taking batch_size * world of them; or as asked
    captions = len(data.examples("captioning", root, "train", source="clotho", rng=random.Random(0)))
    steps = {}
    for world, asked in ((1, []), (2, []), (1, ["--steps_caption_ft=5"])):
        cfg = train.load_config("tiny", opts(tmp, "--caption_ft_source=clotho", "--caption_ft_epochs=2", *asked))
        train.TuneAPT(cfg, "caption_ft", 0, world, cpu)
        steps[world, bool(asked)] = cfg.steps_caption_ft
    assert steps == {(1, False): math.ceil(2 * captions / 4), (2, False): math.ceil(2 * captions / 8), (1, True): 5}

    class Scored:  # a model whose every example scores loss 3 over 2 answer tokens
        asked, room, says = [], [], None  # says: segments -> the answer generated (None: "?")

        def encode_clips(self, paths, strict, *crop):
            return dict.fromkeys(paths), []

        def __call__(self, segments, answers, feats):
            return torch.tensor(3.0 * len(segments)), 2 * len(segments)

        def generate(self, segments, feats, max_new_tokens):
            self.asked.append(len(segments))
            self.room.append(max_new_tokens)
            return [Scored.says(s) if Scored.says else "?" for s in segments]

    jobs["1"].model = Scored()
    got = jobs["1"].validate()  # the loss per answer token (not per batch); AQA's accuracy over all its examples
    assert got == {"val_loss": 1.5, "val_aqa_accuracy": 0.0} and Scored.asked == [min(64, len(jobs["1"].val["aqa"]))]
    assert Scored.asked[0] > 1
    written = {str(ex.segments): f"The {ex.target['answer'].upper()}." for ex in jobs["1"].val["aqa"]}
    Scored.says = lambda segments: written[str(segments)]
    assert jobs["1"].validate()["val_aqa_accuracy"] == 1.0
    tok = jobs["1"].tok
    longest = max(len(tok.encode(ex.answer, bos=False)) + 1 for ex in data.examples("aqa", root, "train"))
    assert min(Scored.room) >= longest > 2  # its EOS too
    clotho = data.examples("captioning", root, "val", source="clotho")
    assert jobs["caption_ft"].val["captioning"] == clotho[:len(jobs["caption_ft"].val["captioning"])]
    assert jobs["1"].val["captioning"] != clotho[:len(jobs["1"].val["captioning"])]  # AudioCaps

    pair, other = data.examples("nlar", root, "val")[:2]
    clips = [v for k, v in pair.segments if k == "audio"]
    assert len(clips) == 2
    half_lost = dataclasses.replace(pair, segments=[(k, str(tmp / "nowhere.wav") if v == clips[1] else v)
                                                    for k, v in pair.segments])
    keep, feats = jobs["2"].usable([half_lost, other])
    assert keep == [other] and clips[0] in feats


def test_a_validation_chunk_whose_every_clip_is_lost_is_passed_over(trained, tmp_path):
    """TuneAPT.validate: a chunk of validation examples none of which has its clips adds nothing to the loss (there
    is nothing to score): the loss is that of the other tasks' examples alone."""
    tmp = copy_of(trained, tmp_path)
    job = train.TuneAPT(train.load_config("tiny", opts(tmp)), "1", 0, 1, torch.device("cpu"))
    captions, questions = job.val["captioning"], job.val["aqa"]
    job.val = {"aqa": questions}
    alone = train.validation(job)  # in eval mode, as fit validates
    lost = [dataclasses.replace(ex, segments=[(k, str(tmp / "nowhere.wav") if k == "audio" else v)
                                              for k, v in ex.segments]) for ex in captions]
    job.val = {"captioning": lost, "aqa": questions}
    assert train.validation(job) == alone and alone["val_loss"] > 0


def toy_job(grad_accum_results):
    """A stand-in stage for fit: one weight; micro_step returns the given results in turn (None: nothing usable)."""
    module = nn.Linear(2, 1)
    results, calls = iter(grad_accum_results), []

    def micro_step(model, sampler):
        sampler.next_batch()
        calls.append(sampler.step)
        n = next(results)
        if n is None:  # nothing usable: two clips lost
            return None, 0, {"examples": 0, "skipped": 2}
        return model(torch.ones(2)).sum() * n, n, {"examples": n, "skipped": 1}

    job = SimpleNamespace(module=module, params=dict(module.named_parameters()), scaler=None, micro_step=micro_step,
                          sampler=data.TaskSampler({"x": [1, 2, 3]}, {"x": 1.0}, 1), calls=calls,
                          validate=lambda: {"val_loss": float(len(calls))})
    return job


def test_fit_logs_validates_and_saves_on_schedule_and_always_at_the_last_step(tmp_path):
    """fit over 5 steps with log_every 2, eval_every 3, save_every 2: a record at steps 2, 4 and the last, 5;
    validation before training, at 3 and at 5; checkpoints at 2, 4 and 5. A micro-batch with nothing usable is
    skipped while the step's others still count (grad_accum 2: 10 micro-batches drawn, 9 trained), and its lost
    clips are counted too. Each record's learning rate is the one its step used, and its gradient norm the
    unclipped norm of the gradient of the mean item's loss (here w . (1, 1) + b: the gradient (1, 1, 1))."""
    cfg = train.load_config("tiny", {"steps_1": 5, "log_every": 2, "eval_every": 3, "save_every": 2,
                                     "keep_checkpoints": 5, "grad_accum": 2, "warmup_steps": 1})
    job = toy_job([None, 1, 2, 2, 2, 2, 2, 2, 2, 2])
    metrics = train.fit(cfg, "1", job, False, 0, 1, tmp_path)
    assert job.calls == list(range(1, 11)) and metrics == {"val_loss": 10.0}
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 5]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 5]
    assert [r["skipped_audio"] for r in records if "loss" in r] == [5, 9, 11]  # 2 + 1 per micro-batch after it
    factor = train.cosine_schedule(cfg, 5, 1)
    assert [r["lr"] for r in records if "loss" in r] == pytest.approx([cfg.lr * factor(k - 1) for k in (2, 4, 5)])
    assert [r["grad_norm"] for r in records if "loss" in r] == pytest.approx([math.sqrt(3)] * 3, abs=1e-4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000002", "step_0000004",
                                                                                  "step_0000005"]



def test_a_stage_0_step_takes_its_own_number_of_micro_batches(tmp_path):
    """grad_accum_0: the paper preset's stage-0 step is one contrastive batch (grad_accum_0=1) while its stages 1-2
    accumulate 4; 0 leaves stage 0 at grad_accum."""
    for stage, settings, drawn in [("0", {"grad_accum_0": 1}, [1, 2]), ("1", {"grad_accum_0": 1}, list(range(1, 7))),
                                   ("0", {}, list(range(1, 7)))]:
        cfg = train.load_config("tiny", {"steps_0": 2, "steps_1": 2, "grad_accum": 3, "warmup_steps": 1,
                                         "eval_every": 5, **settings})
        job, out = toy_job([1] * 6), tmp_path / f"{stage}{len(settings)}"
        out.mkdir()
        train.fit(cfg, stage, job, False, 0, 1, out)
        assert job.calls == drawn, (stage, settings)

def test_resuming_with_other_weights_names_the_checkpoint_and_what_differs(tmp_path):
    """--resume copies the checkpoint's weights into the run strictly: a run whose settings changed a shape, or
    that lost or gained a tensor, is refused naming the checkpoint and the keys (a missing key kept its fresh value
    and a changed shape was a bare traceback)."""
    cfg = train.load_config("tiny", {"steps_1": 2, "save_every": 1, "eval_every": 5, "warmup_steps": 1})
    train.fit(cfg, "1", toy_job([1, 1]), False, 0, 1, tmp_path)
    wider = toy_job([1, 1])
    wider.module = nn.Linear(3, 1)
    wider.params = dict(wider.module.named_parameters())
    with pytest.raises(CheckpointError, match=r"step_0000002 \(weights.safetensors\): wrong shapes: weight in "
                                              r"weights.safetensors: expected \(1, 3\), found"):
        train.fit(cfg, "1", wider, True, 0, 1, tmp_path)
    fewer = toy_job([1, 1])
    fewer.params = {"weight": fewer.module.weight}
    with pytest.raises(CheckpointError, match="unexpected keys: bias"):
        train.fit(cfg, "1", fewer, True, 0, 1, tmp_path)

def test_the_stand_in_llm_is_trained_only_where_no_llm_is_given(tmp_path):
    with pytest.raises(SettingError, match=r"^--stage lm trains the tiny stand-in LLM; with --llm_path set, the LLM is "
                                           r"given$"):
        train.StandInLLM(train.load_config("tiny", opts(tmp_path, "--llm_path=weights/an-llm")), 0, 1,
                         torch.device("cpu"))


@pytest.mark.parametrize("stage, preset, says", [
    ("lm", "paper", "--stage lm trains the tiny stand-in LLM"),
    ("lm", "small", "--stage lm trains the tiny stand-in LLM"),
    ("mae", "tiny", "--stage mae pretrains the encoder of a preset with --encoder_init=mae"),
    ("vision", "tiny", "--stage vision trains the embedded default's vision side; with --vision_path set")])
def test_a_stage_the_preset_does_not_have_is_refused_before_anything_is_made(tmp_path, monkeypatch, stage, preset,
                                                                              says):
    """Before the benchmark is generated, a tokenizer trained or an LLM fetched: the refusal is the stage's own, not
    an error about a file the stage would never have read."""
    from apt_min import build

    monkeypatch.setattr(build, "fetch_known_llm", lambda cfg: pytest.fail("an LLM was fetched"))
    extra = ["--vision_path=weights/instructblip"] if stage == "vision" else []
    with pytest.raises(SystemExit, match=rf"^train.py: error: {re.escape(says)}"):
        train.main(["--stage", stage, "--preset", preset, f"--run_dir={tmp_path / 'run'}",
                    f"--data_root={tmp_path / 'data'}", *extra])
    assert list(tmp_path.iterdir()) == []


def test_a_process_with_no_usable_example_has_nothing_to_train():
    """nothing_to_train: true where this process has no usable example this micro-step (alone, there is no other
    process to ask), so that the stage skips the micro-step rather than run its model on an empty batch."""
    cpu = torch.device("cpu")
    assert train.nothing_to_train([], 1, cpu) is True and train.nothing_to_train(["an example"], 1, cpu) is False


@pytest.mark.filterwarnings("error::UserWarning")  # torch's warning of a schedule stepped first: not shown
def test_a_step_with_nothing_to_train_leaves_the_weights_and_an_fp16_scaler_alone(tmp_path):
    """A step none of whose micro-batches has a usable example (missing clips in a real data set) has no gradient:
    the schedule moves on, the weights and the fp16 loss scaler are not stepped (which would fail: it has recorded
    no gradient to unscale), and the next step trains."""
    cfg = train.load_config("tiny", {"steps_1": 2, "log_every": 1, "eval_every": 5, "save_every": 5,
                                     "grad_accum": 2, "warmup_steps": 1})
    job = toy_job([None, None, 1, 1])
    job.scaler = torch.amp.GradScaler("cpu")
    before = {k: p.detach().clone() for k, p in job.params.items()}
    train.fit(cfg, "1", job, False, 0, 1, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    records = [r for r in records if "grad_norm" in r]
    assert records[0]["grad_norm"] == 0 and "loss" not in records[0] and records[1]["grad_norm"] > 0
    assert [r["skipped_audio"] for r in records] == [4, 6]
    assert all(not torch.equal(before[k], p) for k, p in job.params.items())


def test_validation_runs_with_dropout_off_and_training_resumes_with_it_on(tmp_path):
    """Validation measures the model as evaluation will use it (dropout off), and the steps after it train with
    dropout on again."""
    cfg = train.load_config("tiny", {"steps_1": 2, "log_every": 1, "eval_every": 1, "save_every": 5,
                                     "warmup_steps": 1})
    job = toy_job([1, 1])
    seen = []
    job.validate = lambda: seen.append(("validate", job.module.training)) or {"val_loss": 0.0}
    step = job.micro_step
    job.micro_step = lambda model, sampler: seen.append(("train", job.module.training)) or step(model, sampler)
    train.fit(cfg, "1", job, False, 0, 1, tmp_path)
    assert seen == [("validate", False), ("train", True), ("validate", False), ("train", True), ("validate", False)]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_an_fp16_loss_scaler_changes_neither_the_gradient_nor_the_step(tmp_path):
    """fp16's loss scaler multiplies the loss by 2^16 for the backward pass; the gradient is unscaled before it is
    clipped and logged, so a run with the scaler logs the same gradient norm and takes the same clipped steps as
    one without (clipping the scaled gradient would shrink every step 65 536-fold). An empty window moves the
    schedule on all the same."""
    cfg = train.load_config("tiny", {"steps_1": 3, "log_every": 1, "eval_every": 5, "save_every": 5,
                                     "warmup_steps": 1, "grad_clip": 0.05})
    runs = {}
    for scaled in (False, True):
        torch.manual_seed(0)
        job = toy_job([3, None, 2])
        job.scaler = torch.amp.GradScaler("cpu") if scaled else None
        (tmp_path / str(scaled)).mkdir()
        train.fit(cfg, "1", job, False, 0, 1, tmp_path / str(scaled))
        records = [json.loads(line) for line in (tmp_path / str(scaled) / "log.jsonl").read_text().splitlines()]
        runs[scaled] = ([(r["grad_norm"], r["lr"]) for r in records if "grad_norm" in r],
                        {k: p.detach().clone() for k, p in job.params.items()})
    (plain, weights), (scaled, scaled_weights) = runs[False], runs[True]
    assert plain[0][0] > cfg.grad_clip  # clipped: the check would be empty otherwise
    assert [n for n, _ in scaled] == pytest.approx([n for n, _ in plain], rel=1e-5)
    assert all(torch.allclose(weights[k], scaled_weights[k], rtol=1e-5, atol=1e-7) for k in weights)
    lrs = [lr for _, lr in plain]
    assert lrs[0] > lrs[1] > lrs[2]  # the cosine moved on through the empty window (step 2)


def test_the_logged_rate_is_the_examples_trained_over_the_seconds_spent_training(tmp_path, monkeypatch):
    """examples_per_s: the examples trained since the run started (a micro-batch's own count of them, not its
    items: here 5 tokens an example) over the seconds spent in training steps, validation and saving left out, to
    the hundredth. On a clock that a micro-batch moves on by 1 s, a validation by 100 s and a save by 50 s, steps of
    1, 2, 3 and 4 examples log 3 / 2 s at step 2 and 10 / 4 s at step 4 (the last step's window alone would be
    7 / 2 s); with micro-batches of 0.4 s (steps shorter than a second), 3 / 0.8 s and 10 / 1.6 s."""
    clock = [0.0]

    def wait(seconds):
        clock[0] += seconds

    monkeypatch.setattr(train, "time", SimpleNamespace(time=lambda: clock[0]))
    save = train.Checkpoints.save
    monkeypatch.setattr(train.Checkpoints, "save", lambda self, *a: wait(50) or save(self, *a))
    cfg = train.load_config("tiny", {"steps_1": 4, "log_every": 2, "eval_every": 1, "save_every": 1,
                                     "warmup_steps": 1})

    def rates(seconds, out):
        job = toy_job([1, 2, 3, 4])
        step = job.micro_step

        def micro_step(model, sampler):
            wait(seconds)
            loss_sum, n, info = step(model, sampler)
            return loss_sum * 5, n * 5, info

        job.micro_step, job.validate = micro_step, lambda: wait(100) or {"val_loss": 0.0}
        clock[0] = 0.0
        out.mkdir()
        train.fit(cfg, "1", job, False, 0, 1, out)
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return [(r["step"], r["examples_per_s"]) for r in records if "loss" in r]

    assert rates(1, tmp_path / "a") == [(2, 1.5), (4, 2.5)]
    assert clock[0] == 4 + 5 * 100 + 4 * 50  # the validations and saves did take their time
    assert rates(0.4, tmp_path / "b") == [(2, 3.75), (4, 6.25)]


def test_the_count_of_skipped_audio_goes_on_across_a_resume(tmp_path):
    """skipped_audio counts the clips skipped since the run began, not since it was last resumed: the checkpoint
    keeps the count and a resumed run goes on from it, so a run stopped during step 3 and resumed logs what an
    uninterrupted one does (1 clip lost a micro-batch, 2 in the step with nothing usable)."""
    cfg = train.load_config("tiny", {"steps_1": 4, "log_every": 1, "eval_every": 5, "save_every": 2,
                                     "warmup_steps": 1})
    logged = {}
    for name in ("whole", "cut"):
        out = tmp_path / name
        out.mkdir()
        job = toy_job([1, None, 1, 1])
        if name == "cut":
            step = job.micro_step

            def dies_in_step_3(model, sampler, step=step):
                if sampler.step == 2:  # steps 1 and 2 done and saved
                    raise KeyboardInterrupt("stopped during step 3")
                return step(model, sampler)

            job.micro_step = dies_in_step_3
            with pytest.raises(KeyboardInterrupt):
                train.fit(cfg, "1", job, False, 0, 1, out)
            train.fit(cfg, "1", toy_job([1, 1]), True, 0, 1, out)
        else:
            train.fit(cfg, "1", job, False, 0, 1, out)
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        logged[name] = [(r["step"], r["skipped_audio"]) for r in records if "skipped_audio" in r]
    assert logged["whole"] == [(1, 1), (2, 3), (3, 4), (4, 5)] and logged["cut"] == logged["whole"]
    assert train.Checkpoints(tmp_path / "cut" / "checkpoints", 2).load()[1]["skipped_audio"] == 5


def test_resuming_a_finished_run_trains_and_logs_nothing_and_returns_a_validation_of_its_weights(tmp_path):
    """--resume of a run whose last checkpoint is its last step: no batch is drawn, the log is left as it was (no
    second validation record), and fit returns one validation, with dropout off, of the checkpoint's weights (what
    the stage's result is saved and reported with)."""
    cfg = train.load_config("tiny", {"steps_1": 2, "log_every": 1, "eval_every": 1, "save_every": 2,
                                     "warmup_steps": 1})
    train.fit(cfg, "1", toy_job([1, 1]), False, 0, 1, tmp_path)
    log = (tmp_path / "log.jsonl").read_text()
    saved = load_file(str(tmp_path / "checkpoints" / "step_0000002" / "weights.safetensors"))
    job = toy_job([])
    seen = []
    job.validate = lambda: seen.append((job.module.training, {k: p.detach().clone() for k, p in
                                                              job.params.items()})) or {"val_loss": 0.25}
    assert train.fit(cfg, "1", job, True, 0, 1, tmp_path) == {"val_loss": 0.25}
    assert job.calls == [] and (tmp_path / "log.jsonl").read_text() == log
    ((training, validated),) = seen
    assert not training and validated.keys() == saved.keys() and all(torch.equal(validated[k], saved[k])
                                                                      for k in saved)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_an_fp16_step_whose_gradient_overflowed_is_skipped_and_the_loss_scale_halved(tmp_path):
    """fp16: a step whose scaled gradient is not finite (an overflow; the loss itself finite) leaves the weights
    and AdamW's moments alone, halves the loss scale, and is logged with its loss and an infinite gradient norm; the
    schedule moves on all the same, and the next step trains."""
    cfg = train.load_config("tiny", {"steps_1": 2, "log_every": 1, "eval_every": 1, "save_every": 5,
                                     "warmup_steps": 1})
    job = toy_job([1, 1])
    job.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    step = job.micro_step

    def micro_step(model, sampler):
        loss_sum, n, info = step(model, sampler)
        if sampler.step == 1:
            loss_sum.register_hook(lambda grad: grad * math.inf)
        return loss_sum, n, info

    validated = []
    job.micro_step = micro_step
    job.validate = lambda: validated.append([p.detach().clone() for p in job.params.values()]) or {"val_loss": 0.0}
    train.fit(cfg, "1", job, False, 0, 1, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    records = [r for r in records if "grad_norm" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["grad_norm"] == math.inf and math.isfinite(records[0]["loss"])
    assert 0 < records[1]["grad_norm"] < math.inf
    assert [r["lr"] for r in records] == pytest.approx([cfg.lr, cfg.lr * cfg.min_lr_ratio])
    start, after_1, after_2 = validated
    assert all(torch.equal(a, b) for a, b in zip(start, after_1))  # skipped
    assert all(torch.isfinite(b).all() and not torch.equal(a, b) for a, b in zip(start, after_2))  # trained
    state = train.Checkpoints(tmp_path / "checkpoints", 2).load()[1]
    assert state["scaler"]["scale"] == 512.0 and state["optimizer"]["state"][0]["step"].item() == 1


def test_a_checkpoint_restores_weights_optimizer_schedule_sampler_every_generator_and_the_skip_count(tmp_path):
    """training_state + restore: after a checkpoint at step 3 and more training, restore brings back the weights,
    AdamW's moments, the schedule's step, the sampler's position, the torch and Python generators (what a resumed
    run draws next) and the count of audio skipped so far."""
    cfg = train.load_config("tiny", {"steps_1": 10, "warmup_steps": 4})
    job = toy_job([])
    opt = train.make_optimizer(job.params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train.cosine_schedule(cfg, 10, 4))

    def step():
        job.sampler.next_batch()
        job.module(torch.ones(2)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    for _ in range(3):
        step()
    ckpts = train.Checkpoints(tmp_path, keep=2)
    job.scaler = torch.amp.GradScaler("cpu", init_scale=512.0)  # fp16's loss scale, as the run had it
    ckpts.save(3, job.params, train.training_state(3, opt, sched, job, skipped=7))
    saved = {k: v.detach().clone() for k, v in job.params.items()}
    expected = (job.sampler.next_batch(), torch.rand(3), random.random(), sched.get_last_lr())
    for _ in range(4):
        step()
    job.scaler = torch.amp.GradScaler("cpu", init_scale=4.0)  # a fresh process's
    assert train.restore(ckpts, job, opt, sched) == (3, 7)
    assert job.scaler.get_scale() == 512.0
    job.scaler = None
    assert all(torch.equal(job.params[k], v) for k, v in saved.items())
    assert opt.state_dict()["state"][0]["step"].item() == 3
    got = (job.sampler.next_batch(), torch.rand(3), random.random(), sched.get_last_lr())
    assert got[0] == expected[0] and torch.equal(got[1], expected[1]) and got[2:] == expected[2:]
    with pytest.raises(SystemExit, match="--resume: no checkpoint under"):
        train.restore(train.Checkpoints(tmp_path / "none", keep=2), job, opt, sched)
    # a checkpoint from before every process's generators were kept: one process's, under the older keys
    state = train.training_state(3, opt, sched, job, skipped=7)
    (mine,) = state.pop("rng")
    state |= {"torch_rng": mine["torch"], "cuda_rng": mine["cuda"], "py_rng": mine["py"]}
    ckpts.save(3, job.params, state)
    expected = (torch.rand(3), random.random())
    torch.rand(2), random.random()
    assert train.restore(ckpts, job, opt, sched) == (3, 7)
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def test_resuming_under_another_number_of_processes_says_so_and_each_takes_a_saved_generator(tmp_path, caplog):
    """A checkpoint written by one process and resumed by two, or by two and resumed by one or three, is resumed
    with a warning that the batches and random draws are no longer an uninterrupted run's; process r takes the
    generators of saved process r modulo their number. The same number of processes resumes without a word."""
    cfg = train.load_config("tiny", {})
    job = toy_job([])
    opt = train.make_optimizer(job.params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train.cosine_schedule(cfg, 10, 4))
    ckpts = train.Checkpoints(tmp_path, keep=2)
    draws = []
    for seed in (1, 2):  # what each saved process draws next
        torch.manual_seed(seed)
        draws.append(torch.rand(2))
    torch.manual_seed(1)
    one = train.training_state(3, opt, sched, job, 0)
    torch.manual_seed(2)
    two = {**one, "rng": [*one["rng"], train.training_state(3, opt, sched, job, 0)["rng"][0]]}
    caplog.set_level(logging.WARNING)
    warning = ("{} was written by {} and is resumed by {}: the batches and the random draws are no longer "
               "those of an uninterrupted run")
    for state, rank, world, takes in ((one, 0, 1, 0), (one, 1, 2, 0), (two, 1, 2, 1), (two, 0, 1, 0), (two, 1, 3, 1)):
        ckpts.save(3, job.params, state)
        caplog.clear()
        train.restore(ckpts, job, opt, sched, rank, world)
        saved_by = len(state["rng"])
        said = [r.getMessage() for r in caplog.records]
        written = "1 process" if saved_by == 1 else f"{saved_by} processes"
        assert said == ([] if saved_by == world else [warning.format(tmp_path, written, world)]), (saved_by, world)
        assert torch.equal(torch.rand(2), draws[takes]), (saved_by, rank, world)


def test_each_process_draws_its_own_dropout_after_the_weights_are_built():
    """Every process seeds alike to build the same weights; then own_generators gives each its own draws, and
    process 0 the draws of a single process (so one process's run is unchanged)."""
    cfg = train.load_config("tiny", {})
    draws = []

    def build():  # seeded, then what building the weights draws
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        torch.rand(5), random.random()

    for rank in (0, 1, 2):
        build()
        train.own_generators(cfg, rank)
        draws.append((torch.rand(2).tolist(), random.random()))
    build()
    assert draws[0] == (torch.rand(2).tolist(), random.random())  # process 0 goes on from where building left off
    assert len({str(t) for t, _ in draws}) == 3 and len({r for _, r in draws}) == 3  # torch's and Python's alike

def _resume_worker(rank, world, folder, out):
    """One of two processes: its own generators (as its own dropout draws leave them), a checkpoint written by
    process 0 with every process's generators, draws that move them on, then restore: what each draws next."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank,
                                         world_size=world)
    torch.manual_seed(100 + rank)
    random.seed(200 + rank)
    cfg = train.load_config("tiny", {})
    job = toy_job([])
    opt = train.make_optimizer(job.params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train.cosine_schedule(cfg, 10, 4))
    ckpts = train.Checkpoints(folder / "checkpoints", keep=2)
    state = train.training_state(3, opt, sched, job, 0, world)
    if rank == 0:
        ckpts.save(3, job.params, state)
    torch.distributed.barrier()
    expected = (torch.rand(3), random.random())
    torch.rand(5 + rank), random.random()  # the run went on
    train.restore(ckpts, job, opt, sched, rank, world)
    got = (torch.rand(3), random.random())
    out[rank] = torch.equal(got[0], expected[0]) and got[1] == expected[1], expected[1]
    torch.distributed.destroy_process_group()


def test_each_process_resumes_its_own_generators(tmp_path):
    """Under DDP each process draws its own dropout masks: a checkpoint keeps every process's generators and a
    resumed process takes back its own (process 0's in every process would make the others draw differently)."""
    import torch.multiprocessing as mp

    out = mp.Manager().dict()
    mp.spawn(_resume_worker, args=(2, tmp_path, out), nprocs=2, join=True)
    assert out[0][0] and out[1][0] and out[0][1] != out[1][1]  # each its own, and they differ


class HalfFrozen(nn.Module):
    """A trainable layer beside a frozen one and a buffer, as APT holds its trainable parts beside the frozen
    encoder and LLM, and a trainable layer no step uses (as the vision stage's projection while it aligns)."""

    def __init__(self):
        super().__init__()
        self.trained, self.frozen = nn.Linear(2, 1), nn.Linear(2, 1).requires_grad_(False)
        self.idle = nn.Linear(2, 1)
        self.register_buffer("table", torch.zeros(3))

    def forward(self, x):
        return self.trained(x) + self.frozen(x)


def _ddp_worker(rank, world, folder, out):
    """One of two processes training HalfFrozen with fit under DDP, its frozen weights and buffer its own."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank,
                                         world_size=world)
    torch.manual_seed(0)
    module = HalfFrozen()
    with torch.no_grad():
        module.frozen.weight.fill_(rank)  # what a broadcast from process 0 would overwrite
        module.table.fill_(rank)
    x = torch.tensor([1.0, 2.0 + rank])  # each process its own batch: its own gradient
    before = {n: p.detach().clone() for n, p in module.named_parameters()}

    def micro_step(model, sampler):
        sampler.next_batch()
        return model(x).sum(), 1, {"examples": 1}

    job = SimpleNamespace(module=module, params={n: p for n, p in module.named_parameters() if p.requires_grad},
                          scaler=None, micro_step=micro_step, validate=lambda: {}, unused_parameters=True,
                          sampler=data.TaskSampler({"x": [1, 2, 3]}, {"x": 1.0}, 2))
    cfg = train.load_config("tiny", {"steps_1": 2, "eval_every": 5, "save_every": 5, "warmup_steps": 1,
                                     "log_every": 1})
    train.time = SimpleNamespace(time=itertools.count().__next__)  # a clock: each step takes one second
    train.fit(cfg, "1", job, False, rank, world, folder / f"out{rank}")
    cpu = torch.device("cpu")
    out[rank] = (module.trained.weight.detach().clone(), float(module.frozen.weight[0, 0]), float(module.table[0]),
                 not torch.equal(module.trained.weight, before["trained.weight"]),
                 torch.equal(module.idle.weight, before["idle.weight"]),
                 train.nothing_to_train([] if rank else ["an example"], world, cpu),  # one process has none
                 train.nothing_to_train(["an example"], world, cpu))
    torch.distributed.destroy_process_group()


def test_ddp_synchronises_what_trains_and_leaves_the_frozen_parts_alone(tmp_path):
    """Under torchrun, fit's DistributedDataParallel averages the trainable parameters' gradients (both processes
    end with the same weights from different batches) and neither broadcasts nor syncs the frozen parameters and
    buffers (for the paper preset a 7 B LLM, sent to every process at every start). A stage that says some steps
    give some of its parameters no gradient (job.unused_parameters) trains (DDP otherwise raises at the second
    step: it expected those gradients). nothing_to_train asks every process: where one has no usable example, all
    skip. The examples a second logged are the run's: both processes'."""
    import torch.multiprocessing as mp

    for rank in range(2):
        (tmp_path / f"out{rank}").mkdir()
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, tmp_path, out), nprocs=2, join=True)
    assert torch.equal(out[0][0], out[1][0])  # gradients averaged: one model
    assert out[0][1:3] == (0.0, 0.0) and out[1][1:3] == (1.0, 1.0)  # each process kept its own frozen tensors
    assert out[0][3:] == out[1][3:] == (True, True, True, False)  # trained; the unused layer left; asked of all
    rates = [r["examples_per_s"] for r in map(json.loads, (tmp_path / "out0" / "log.jsonl").open()) if "loss" in r]
    assert rates == [2.0, 2.0]  # an example a second in each process: the run's rate is both processes'


def test_two_processes_log_stage_0_as_one_does(prepared, tmp_path):
    """Stage 0 on two processes of 4 pairs each (ATC's negatives gathered from both) logs what one process of 8
    does: the same ATC (each process's batch mean averaged over the processes, not summed), the audio skipped in
    both processes' shares (one clip of each process's share of the step's batch is unreadable here), and the same
    validation loss (each process holds the whole validation set: it is not contrasted with the other process's
    copy of it)."""
    args = ["--steps_0=1", "--aligner_dropout=0", "--warmup_steps=1"]
    cfg = train.load_config("tiny", opts(prepared, *args, "--batch_size=8"))
    pairs = train.stage0_pairs(cfg, random.Random(cfg.seed))  # the step's batch, as stage 0 draws it
    _, batch = data.TaskSampler({"pairs": pairs}, {"pairs": 1.0}, 8, cfg.seed).next_batch()
    clips = [Path(ex.segments[0][1]).relative_to(prepared / "synth") for ex in batch]  # process r's: clips[r::2]
    broken = {next(c for c in clips[r::2] if clips.count(c) == 1) for r in (0, 1)}  # one clip of each share
    logs = {}
    for name, launch, batch in (("one", [], 8), ("two", TWO_PROCESSES, 4)):
        tmp = tmp_path / name
        shutil.copytree(prepared / "synth", tmp / "synth", copy_function=os.symlink)
        for clip in broken:  # AudioCaps' clips and Clotho's both
            (tmp / "synth" / clip).unlink()
            (tmp / "synth" / clip).write_text("not audio")
        val = f"--val_batches={32 // batch}"  # the same 32 validation clips
        r = run([*launch, "train.py", "--stage", "0", *opts(tmp, *args, f"--batch_size={batch}", val)])
        assert r.returncode == 0, r.stderr[-3000:]
        logs[name] = log_records(tmp, "stage0")
    (one,), (two,) = ([rec for rec in logs[name] if "atc" in rec] for name in ("one", "two"))
    assert two["atc"] == pytest.approx(one["atc"], abs=2e-5)
    assert one["skipped_audio"] > 0 and two["skipped_audio"] == one["skipped_audio"]
    # before training (after it, the weights differ a little: each process's ATC gradient holds the other's
    # features constant, as BLIP-2's does)
    start = {name: [r["val_loss"] for r in records if "val_loss" in r and r["step"] == 0]
             for name, records in logs.items()}
    assert len(start["one"]) == 1 and start["two"] == pytest.approx(start["one"], abs=2e-5)


def test_stage_2s_few_shot_episodes_draw_on_every_tagging_source(trained, tmp_path):
    """fewshot_pool: AudioSet's single-label clips by label, over every list tagging_sources names (here balanced
    and an unbalanced list of two of its rows: each of those clips is then in its label's pool twice)."""
    root = tmp_path / "synth"
    shutil.copytree(trained / "synth", root, copy_function=os.symlink)
    balanced = (root / "audioset" / "balanced_train_segments.csv").read_text().splitlines()
    rows = [line for line in balanced if not line.startswith("#")]
    (root / "audioset" / "unbalanced_train_segments.csv").write_text("\n".join(balanced[:3] + rows) + "\n")
    one = train.fewshot_pool(train.load_config("tiny", {"data_root": str(root)}))
    both = train.fewshot_pool(train.load_config("tiny", {"data_root": str(root),
                                                        "tagging_sources": "balanced,unbalanced"}))
    assert one and both.keys() == one.keys() and all(both[label] == clips + clips for label, clips in one.items())


def test_the_vision_stage_without_a_trained_apt_says_to_train_one_before_anything_is_made(prepared, tmp_path):
    """--stage vision builds its sequences as the trained APT does: a run with no stage 2 (and no release) is told
    to train it, before anything is loaded."""
    from conftest import VISION

    tmp = copy_of(prepared, tmp_path)
    with pytest.raises(SystemExit, match=r"--stage vision builds its sequences as the trained APT does, which is not "
                                         rf"in {re.escape(str(tmp / 'run' / 'stage2' / 'final'))}/; run `python "
                                         r"train.py --stage 2` first"):
        train.main(["--stage", "vision", *opts(tmp, *VISION)])


def test_the_vision_stage_trains_its_aligner_alone_first_then_with_the_answers(with_vision, tmp_path, monkeypatch):
    """TrainVision: only the visual aligner and the projection train; the first vision_align_steps optimizer steps
    (grad_accum micro-batches each) run the picture-text losses alone, then the answer loss joins them as one sum
    whose mean over the answer's tokens is the answer's mean loss plus the three picture-text losses; every picture
    has its own id (what ATC and ATM take as one positive pair), across steps and processes; the alignment phase
    draws other pictures at each step and in each process, then each process takes its share of a global batch
    (batch_size of each); the description is paired with each example's first frame."""
    from conftest import VISION

    tmp = copy_of(with_vision, tmp_path)
    cfg = train.load_config("tiny", opts(tmp, *VISION, "--grad_accum=2", "--val_batches=2"))
    job = train.TrainVision(cfg, 0, 1, torch.device("cpu"))
    assert len(job.val) == cfg.val_batches * cfg.batch_size  # validation pictures, as every stage's examples
    asked = [ex[1] for ex in job.val]  # each of the four picture tasks in turn, so that each is validated
    assert len(asked) == 8 and asked[0::4] == ["What objects are in the picture?"] * 2
    assert asked[1::4] == ["Describe the picture."] * 2 and all("Which object can be seen?" in a for a in asked[2::4])
    assert all(re.fullmatch(r"Is there an? [a-z ]+ in the picture\?", a) for a in asked[3::4]), asked
    assert any(n.startswith("blip.proj.") for n in job.params)
    assert all(n.startswith(("blip.qformer.", "blip.proj.")) for n in job.params)

    ids, real = [], train.stage0_losses
    monkeypatch.setattr(train, "stage0_losses", lambda aligner, tokens, *a, **kw: (
        ids.append(set(a[2].tolist())), seen_tokens.append(tokens), real(aligner, tokens, *a, **kw))[2])
    seen_tokens = []
    steps = [job.micro_step(job.module, job.sampler) for _ in range(4)]
    assert [info["task"] == "align" for _, _, info in steps] == [True, True, False, False]
    loss_sum, n, info = steps[2]
    assert n > 1 and (loss_sum / n).item() == pytest.approx(info["answer"] + info["atc"] + info["atm"] + info["agtg"],
                                                           rel=1e-5)
    by_step, shares, batches = {}, {}, {}

    def recording(mine, *args, **kwargs):  # the examples a process trains on at a step
        shares[job.rank, step] = [example[1:] for example in mine]
        return job.module(mine, *args, **kwargs)

    for rank in (0, 1):  # the same steps, as each of two processes
        job.rank, job.world = rank, 2
        job.sampler.load_state_dict({**job.sampler.state_dict(), "step": 0})
        for step in range(4):
            ids.clear()
            batches[step] = [example[1:] for example in job.sampler.peek()[1]]
            job.micro_step(recording, job.sampler)
            by_step.setdefault(step, []).append(ids[0])
    assert all(len(mine) > 1 and not mine & theirs for mine, theirs in by_step.values())  # gathered: all distinct
    # aligning, each process draws pictures of its own, others at each step; then each takes its share of the batch
    assert shares[0, 0] != shares[1, 0] and shares[0, 0] != shares[0, 1]
    assert all(shares[0, step] == batches[step][0::2] and shares[1, step] == batches[step][1::2] for step in (2, 3))
    monkeypatch.setattr(train.dist, "barrier", lambda: None)  # (process 0 waits there for the others)
    assert train.TrainVision(cfg, 0, 2, torch.device("cpu")).sampler.batch_size == 2 * cfg.batch_size  # one global

    frames = [ex[0][0] for ex in job.val[:3]]
    assert len(set(frames)) == 3
    examples = [([frames[0], frames[1]], "Describe the picture.", "x", "x"),
                ([frames[2], frames[0], frames[1]], "Describe the picture.", "x", "x")]
    job.module.eval()
    seen_tokens.clear()
    job.module(examples, torch.tensor([0, 1]), torch.Generator().manual_seed(0), answer=False)
    first = job.blip.frame_tokens(torch.stack([job.blip.processing(f) for f in (frames[0], frames[2])]))
    torch.testing.assert_close(seen_tokens[0], first)
    # with the answers: each frame's visual queries read the example's question, the picture-text losses pair the
    # first frame with the description, and the LLM is taught the answer
    asked, described, taught = [], [], []
    visual, tokenize, apt = job.blip.visual_prompts, job.blip.qformer_tokenizer, job.module.apt.forward
    monkeypatch.setattr(job.blip, "visual_prompts", lambda pixels, texts, *a: asked.append(texts) or visual(
        pixels, texts, *a))
    monkeypatch.setattr(job.blip, "qformer_tokenizer", lambda texts: described.append(texts) or tokenize(texts))
    monkeypatch.setattr(job.module.apt, "forward", lambda segments, answers, feats: taught.append(answers) or apt(
        segments, answers, feats))
    examples = [([frames[0], frames[1]], "Which shape is red?", "circle", "A red circle and a blue square."),
                ([frames[2]], "Is there a star?", "no", "A green triangle.")]
    job.module(examples, torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert asked == [["Which shape is red?"] * 2 + ["Is there a star?"]]
    assert described[0] == ["A red circle and a blue square.", "A green triangle."] and taught == [["circle", "no"]]
    # the alignment phase draws vision_align_batch fresh pictures per step, each process its own
    job.cfg.vision_align_batch, job.rank, job.world = 3, 0, 2
    job.sampler.load_state_dict({**job.sampler.state_dict(), "step": 0})
    drawn = {}
    for rank in (0, 1):
        job.rank = rank
        job.sampler.load_state_dict({**job.sampler.state_dict(), "step": 0})
        seen_tokens.clear()
        job.micro_step(job.module, job.sampler)
        drawn[rank] = seen_tokens[0]
    assert len(drawn[0]) == 3 and not torch.allclose(drawn[0], drawn[1])
    assert job.unused_parameters  # DDP: the projection has no gradient while aligning
    negatives = []  # the matching loss's hard negatives come from where atm_negatives says, as in stage 0
    monkeypatch.setattr(train, "stage0_losses", lambda *a, **kw: negatives.append(kw["atm_negatives"]) or real(*a,
                                                                                                            **kw))
    for where in ("global", "local"):
        local = train.TrainVision(train.load_config("tiny", opts(tmp, *VISION, f"--atm_negatives={where}")), 0, 1,
                                  torch.device("cpu"))
        local.micro_step(local.module, local.sampler)
    assert negatives == ["global", "local"] == [cfg.atm_negatives, "local"]


def test_the_vision_stages_validation_scores_its_choices_and_ranks_every_pictured_object():
    """TrainVision.validate: the answer loss per answer token over the validation pictures; the share of the
    "which object can be seen" questions whose answer the APT scores highest of the four offered; and the mean
    place (0 = first) among all the looks' names of every object a picture shows, asked what the picture shows.
    Here the APT prefers an option the earlier it is listed, and the looks' names in their own order."""
    from apt_min import synth, synth_av
    from apt_min.blip2 import avqa_prompt

    names = [c.name for c in synth.TRAIN_CLASSES]
    a, b, c, d = names[:4]
    choose = avqa_prompt(synth_av.QUESTIONS["view"], [a, b, c, d])
    val = [([], choose, a, ""), ([], choose, c, ""),  # the first option: right, then wrong
           ([], "What objects are in the picture?", f"{names[2]}, {names[5]}", ""),  # places 2 and 5
           ([], "What objects are in the picture?", names[1], ""),  # place 1
           ([], "Describe the picture.", f"A picture of {synth.an(a)}.", "")]
    job = object.__new__(train.TrainVision)
    job.cfg, job.autocast, job.val = SimpleNamespace(batch_size=2), nullcontext, val
    job.module = SimpleNamespace(segments=lambda examples: [ex[1] for ex in examples])
    offered, scored = [], []

    class APT:
        def __call__(self, segments, answers, feats):  # loss 3 over 2 tokens an example
            scored.extend(answers)
            return torch.tensor(3.0 * len(answers)), 2 * len(answers)

        def choice_logprob(self, prompt, options, feats):
            offered.append(options)
            return -torch.arange(float(len(options)))

    job.apt = APT()
    got = job.validate()
    assert offered == [[a, b, c, d], [a, b, c, d], names, names]
    assert scored == [ex[2] for ex in val]  # the loss is the answers', not the pictures' descriptions
    assert got == {"val_loss": 1.5, "val_choice_accuracy": 0.5, "val_object_rank": pytest.approx((2 + 5 + 1) / 3)}


TWO = ["--steps_1=4", "--save_every=2", "--keep_checkpoints=3", "--aligner_dropout=0.3", "--log_every=1"]


@pytest.fixture(scope="module")
def two_processes(prepared, tmp_path_factory):
    """Stage 1 trained by two processes on one machine (torchrun --standalone), dropout on: what the multi-process
    tests below compare with."""
    whole = copy_of(prepared, tmp_path_factory.mktemp("two"))
    r = run([*TWO_PROCESSES, "train.py", "--stage", "1",
             *opts(whole, *TWO)])
    assert r.returncode == 0, r.stderr[-3000:]
    return whole


def test_two_processes_resumed_train_as_two_uninterrupted_ones_do(two_processes, prepared, tmp_path):
    """Under torchrun every process draws its own dropout (seeded apart once the job is built), saves its own
    generators into the checkpoint, and a resumed run gives each its own back: two processes resumed from the
    step-2 checkpoint of a run end with the weights the uninterrupted run ended with (were one process's generators
    saved, or restored to both, their dropout would differ from then on)."""
    whole = two_processes
    state = torch.load(whole / "run" / "stage1" / "checkpoints" / "step_0000002" / "state.pt", weights_only=True)
    mine, other = state["rng"]  # process 0's and process 1's
    assert not torch.equal(mine["torch"], other["torch"]) and mine["py"] != other["py"]
    cut = copy_of(prepared, tmp_path / "cut")  # the run as a kill after step 2's checkpoint would leave it
    checkpoints = cut / "run" / "stage1" / "checkpoints"
    shutil.copytree(whole / "run" / "stage1" / "checkpoints" / "step_0000002", checkpoints / "step_0000002")
    (checkpoints / "latest").write_text("step_0000002")
    log = (whole / "run" / "stage1" / "log.jsonl").read_text().splitlines()
    (cut / "run" / "stage1" / "log.jsonl").write_text("".join(line + "\n" for line in log
                                                              if json.loads(line).get("step", 0) <= 2))
    r = run([*TWO_PROCESSES, "train.py", "--stage", "1",
             "--resume", *opts(cut, *TWO)])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(whole), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_step_one_process_cannot_use_is_skipped_by_both(prepared, tmp_path):
    """Under torchrun a stage 1-2 micro-step in which one process has no usable example (here the one clip of
    process 1's share of step 1 is unreadable) is skipped by every process (under DDP they must run the same
    forwards: were the skip decided per process, process 0's backward would wait for process 1 for ever); the
    clip is counted once and the run goes on."""
    shutil.copytree(prepared / "run", tmp_path / "run")
    shutil.copytree(prepared / "synth", tmp_path / "synth", copy_function=os.symlink)
    cfg = train.load_config("tiny", opts(tmp_path, "--batch_size=1"))
    ratios = train.parse_ratios(cfg.task_ratios, train.STAGES["1"]["ratios"])
    pools = train.training_pools(cfg, "1", [t for t, weight in ratios.items() if weight > 0])
    _, (first, second) = data.TaskSampler(pools, ratios, 2, cfg.seed).next_batch()  # step 1: a clip each
    (clip,) = data.clips_of([second])
    assert clip not in data.clips_of([first])
    Path(clip).unlink()
    Path(clip).write_text("not audio")
    ((rc, out),) = torchrun([["--standalone", "--nproc_per_node", "2", "train.py", "--stage", "1",
                              *opts(tmp_path, "--batch_size=1")]], tmp_path, 300,
                            "the two processes waited for each other: one trained the step the other skipped")
    assert rc == 0, out[-3000:]
    steps = [r for r in log_records(tmp_path, "stage1") if "step" in r and "lr" in r]
    assert [(r["step"], "loss" in r, r["skipped_audio"]) for r in steps] == [(1, False, 1), (2, True, 1),
                                                                           (3, True, 1), (4, True, 1)]


def test_two_processes_train_the_vision_stage(trained, tmp_path):
    """--stage vision under torchrun: process 0 makes the audio-visual set while the other waits for it, then both
    train (its projection has no gradient in the alignment steps: DDP is told of unused parameters) and process 0
    saves the side (the audio-visual set, which an earlier test may have made, is left out of the copy: this run
    makes it)."""
    from conftest import VISION

    shutil.copytree(trained / "run", tmp_path / "run")
    shutil.copytree(trained / "synth", tmp_path / "synth", copy_function=os.symlink,
                    ignore=lambda folder, names: ["avqa", "vision"] if folder == str(trained / "synth") else [])
    r = run([*TWO_PROCESSES, "train.py", "--stage", "vision",
             *opts(tmp_path, *VISION)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [r["step"] for r in log_records(tmp_path, "vision") if "loss" in r] == [1, 2, 3]
    assert (tmp_path / "run" / "vision" / "final" / "vision.json").is_file()


def torchrun(launches: list[list[str]], folder: Path, timeout: float, stuck: str) -> list[tuple[int, str]]:
    """Start a torchrun for each argument list at once, each one's output to a file in `folder`, and wait for all:
    [(exit status, output)]. Any still running after `timeout` seconds is stopped and the test fails, saying
    `stuck` (torchrun is asked to stop: it stops its workers, which run in sessions of their own)."""
    env, procs = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, []
    logs = [folder / f"torchrun{i}.txt" for i in range(len(launches))]
    try:
        for args, log in zip(launches, logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], cwd=ROOT,
                                              env=env, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.time() + timeout
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{stuck} (still running after {timeout} s)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return [(proc.returncode, log.read_text()) for proc, log in zip(procs, logs)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_of_one_process_train_as_one_machine_of_two_does(two_processes, prepared, tmp_path):
    """On two nodes (here two torchrun agents on this machine, one process each) every process is local rank 0:
    the process's place in the run is RANK, not LOCAL_RANK. The two train the run's two shares and end with the
    weights one machine's two processes ended with; only process 0 sets a previous run aside (the new log holds this
    run's steps once, previous/ the whole previous run)."""
    whole, tmp = two_processes, copy_of(prepared, tmp_path)
    stage = tmp / "run" / "stage1"
    stage.mkdir()
    shutil.copy(whole / "run" / "stage1" / "log.jsonl", stage / "log.jsonl")  # a previous run of the stage
    shutil.copytree(whole / "run" / "stage1" / "checkpoints", stage / "checkpoints")
    for _ in range(3):  # a port found free may be taken before node 0 listens on it: then another one
        port = str(free_port())
        ended = torchrun([["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node), "--master_addr",
                           "127.0.0.1", "--master_port", port, "train.py", "--stage", "1", *opts(tmp, *TWO)]
                          for node in (0, 1)], tmp_path, 300, "the two nodes did not finish")
        if not any("EADDRINUSE" in out or "address already in use" in out.lower() for _, out in ended):
            break
    assert [rc for rc, _ in ended] == [0, 0], ended[0][1][-3000:] + ended[1][1][-3000:]
    a, b = weights(whole), weights(tmp)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (stage / "previous" / "log.jsonl").read_text() == (whole / "run" / "stage1" / "log.jsonl").read_text()
    assert sorted(p.name for p in (stage / "previous" / "checkpoints").iterdir()) == sorted(
        p.name for p in (whole / "run" / "stage1" / "checkpoints").iterdir())
    assert [r["step"] for r in log_records(tmp, "stage1") if "loss" in r] == [1, 2, 3, 4]


def test_two_processes_start_from_nothing(tmp_path):
    """Under torchrun process 0 makes what every process reads (the synthetic data, the tokenizer, tiny's encoder)
    while the others wait for it: two processes run stage 0 from an empty folder."""
    r = run([*TWO_PROCESSES, "train.py", "--stage", "0",
             *opts(tmp_path, "--steps_0=1")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [r["step"] for r in log_records(tmp_path, "stage0") if "loss" in r] == [1]

"""evaluate.py on every task with a briefly trained miniature APT, and `python -m apt_min ask`."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import copy_of, opts
from safetensors.torch import load_file, save_file

import evaluate
from apt_min import data, evaluation, metrics, tasks
from apt_min.aligner import STAGE0_HEADS, Aligner
from apt_min.config import load_config
from apt_min.errors import MissingFileError
from apt_min.evaluation import EVALUATIONS

ROOT = Path(__file__).resolve().parents[1]


def test_every_task_writes_predictions_and_metrics(trained, capsys, monkeypatch):
    monkeypatch.setattr(evaluation, "spice_missing", lambda: "absent here")  # SPICE would write into site-packages
    evaluate.main(["--task", "all", "--limit", "6", "--episodes", "3", "--batch-size", "4", *opts(trained)])
    table = capsys.readouterr().out
    out = trained / "run" / "eval"
    for task in EVALUATIONS:
        rows = json.loads((out / f"metrics_{task}.json").read_text())
        assert rows and all(r["protocol"] for r in rows), task  # every number names its protocol
        *rows, scored = rows  # the last row: on how many clips the scores stand, and that nothing was lost
        assert scored["metric"] == "clips scored" and scored["apt"] > 0, task
        assert re.search(r"lists \d+: 0 missing, 0 unreadable", scored["protocol"]), (task, scored)
        assert scored["protocol"].endswith("--limit took the first examples") == (task != "esc50"), (task, scored)
        assert not (out / f"missing_{task}.txt").exists()
        preds = [json.loads(line) for line in (out / f"predictions_{task}.jsonl").read_text().splitlines()]
        assert preds and all({"output", "reference"} <= p.keys() for p in preds), task
        assert task in table
    # the printed table names a protocol its rows share once: the six caption metrics of each caption set
    assert table.count("COCO caption evaluation against all of a clip's references") == 2
    assert re.search(r"\nclotho +CIDEr-D +[\d.]+ +[\d.]+  \n", table)
    tagging = json.loads((out / "metrics_audioset.json").read_text())[:-1]
    tagging = {r["metric"] + r["protocol"][:12]: r for r in tagging}
    assert any("paper protoc" in k for k in tagging) and any("LLM likeliho" in k for k in tagging)
    assert all(0 <= r["apt"] <= 1 for r in tagging.values())
    few = json.loads((out / "metrics_esc50.json").read_text())[:-1]
    settings = ["accuracy 5-way 5-shot", "accuracy 12-way 5-shot", "accuracy 4-way 1-shot"]
    rows = [m for s in settings for m in (s, f"{s}, ranked", f"{s} vs a prototypical network")]
    # held-out clips of the classes trained on: the miniature's test split has too few single-label clips per class
    # for any episode, which the table says rather than drawing smaller episodes
    rows += [f"{s}, training classes" for s in settings]
    assert [r["metric"] for r in few] == rows
    assert [r["protocol"].startswith("not run: needs") for r in few] == [False] * 9 + [True] * 3
    chance = [r["baseline"] for r in few if "prototypical" not in r["metric"]]
    assert chance == pytest.approx([1 / 5] * 2 + [1 / 12] * 2 + [1 / 4] * 2 + [1 / 5, 1 / 12, 1 / 4])
    assert all(0 <= r["apt"] <= 1 and 0 <= r["baseline"] <= 1 for r in few if "not run" not in r["protocol"])
    shown = [json.loads(line) for line in (out / "predictions_esc50.jsonl").read_text().splitlines()]
    assert [len(p["audio"]) for p in shown] == [26] * 3 + [61] * 3 + [5] * 3  # N * K supports and the query
    assert all(p["ranked"] in p["prompt"] and p["reference"] in p["prompt"] for p in shown)
    category = {Path(f).name: c for f, _, _, c in data.read_esc50(trained / "synth" / "esc50/meta/esc50.csv")}
    assert all(p["reference"] == tasks.label_text(category[Path(p["audio"][-1]).name]) for p in shown)  # the query's
    clips = data.examples("captioning", trained / "synth", "test")[:6]
    written = [json.loads(line) for line in (out / "predictions_audiocaps.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in written] == [ex.target["references"][0] for ex in clips]  # each clip's first
    caps = {r["metric"]: r for r in json.loads((out / "metrics_audiocaps.json").read_text())}
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D", "METEOR", "SPICE"} <= caps.keys()
    assert caps["SPICE"]["protocol"] == "SPICE unavailable: absent here"  # said so, with why
    assert caps["SPIDEr"]["protocol"].startswith("SPIDEr unavailable: it needs SPICE")  # and so is SPIDEr
    if shutil.which("java"):  # METEOR runs in Java; without it the row says so
        assert caps["METEOR"]["protocol"].startswith("METEOR 1.5") and 0 < caps["METEOR"]["apt"] < 1
    else:
        assert caps["METEOR"]["protocol"] == "METEOR unavailable: Java is not installed"


def test_a_checkpoint_that_is_not_an_apt_is_one_clean_error(trained, tmp_path, capsys, monkeypatch):
    """evaluate.py and ask given a folder whose apt.json is broken or not an APT's: the file named, no traceback,
    before the model loads."""
    from apt_min import build
    from apt_min.__main__ import main as ask_main

    monkeypatch.setattr(build, "load_apt", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setattr(evaluate, "load_apt", lambda *a, **k: pytest.fail("the model loaded"))
    for text in ("{", "{}"):
        (tmp_path / "apt.json").write_text(text)
        with pytest.raises(SystemExit, match=f"evaluate.py: error: {re.escape(str(tmp_path / 'apt.json'))}: not "):
            evaluate.main(["--task", "audiocaps", "--checkpoint", str(tmp_path), *opts(trained)])
        clip = str(next((trained / "synth" / "audio").iterdir()))
        assert ask_main(["ask", "--audio", clip, "What is heard?", "--checkpoint", str(tmp_path), *opts(trained)]) == 2
        assert f"error: {tmp_path / 'apt.json'}: not " in capsys.readouterr().err


def test_spice_says_why_it_cannot_run(monkeypatch, tmp_path):
    """SPICE needs Java, pycocoevalcap and the CoreNLP jars, which cannot be fetched here: each lack is named."""
    import pycocoevalcap.spice as spice

    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")  # Java there (this test needs none)
    monkeypatch.setattr(spice, "__file__", str(tmp_path / "spice" / "__init__.py"))  # its lib/ as this test makes it
    assert evaluation.spice_missing().startswith("pycocoevalcap's spice/lib lacks the Stanford CoreNLP 3.6.0 jars")
    (tmp_path / "spice" / "lib").mkdir(parents=True)
    for jar in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"):
        assert evaluation.spice_missing().startswith("pycocoevalcap's spice/lib lacks")  # both jars are needed
        (tmp_path / "spice" / "lib" / jar).write_bytes(b"PK")
    assert evaluation.spice_missing() is None
    monkeypatch.setitem(sys.modules, "pycocoevalcap.spice", None)  # as if not installed
    assert evaluation.spice_missing() == "pycocoevalcap is not installed (pip install pycocoevalcap)"
    assert [r[3] for r in evaluation.java_metrics([["a"]], ["a"])] == [
        f"{m} unavailable: pycocoevalcap is not installed (pip install pycocoevalcap)" for m in ("METEOR", "SPICE")]
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert evaluation.spice_missing() == "Java is not installed"


def test_each_evaluation_takes_its_documented_data_baseline_and_vocabulary(trained, monkeypatch):
    """With the model's answers scripted: --limit keeps the first N test examples; captioning's baseline is the most
    frequent training caption; Clotho-AQA adds the yes/no rows and NLAR the fixed "yes"; TER reads an answer against
    every class name the data set has, so naming a class the window lacks is wrong even where no test window has
    that class; the novel classes' few-shot episodes come from the seeds they always did (results compare across
    versions); a class with exactly K clips cannot give an episode its query."""
    monkeypatch.setattr(evaluation, "java_metrics", lambda refs, outputs: [])  # METEOR / SPICE: not the point here
    cfg = load_config("tiny", opts(trained))

    class Scripted:  # says what `say` gives for each example (found by its segments)
        def __init__(self, examples, say):
            self.said = {id(ex.segments): say(ex) for ex in examples}

        def generate(self, batch, **options):
            return [self.said[id(segments)] for segments in batch]

    full = evaluation.examples_for("clotho_aqa", cfg, evaluation.Options())
    aqa = evaluation.examples_for("clotho_aqa", cfg, evaluation.Options(limit=40))
    assert len(full) > 40 and [ex.segments for ex in aqa] == [ex.segments for ex in full[:40]]
    rows, _, _ = evaluation.eval_exact(Scripted(aqa, lambda ex: ex.answer), cfg, "clotho_aqa", aqa,
                                       evaluation.Options())
    assert [r[0] for r in rows] == ["accuracy", "accuracy, yes/no questions"] and rows[0][1] == 1.0
    nlar = evaluation.examples_for("nlar", cfg, evaluation.Options(limit=20))
    rows, _, _ = evaluation.eval_exact(Scripted(nlar, lambda ex: "yes"), cfg, "nlar", nlar, evaluation.Options())
    assert [r[0] for r in rows] == ["accuracy", "accuracy vs always 'yes'"] and rows[1][1] == rows[1][2]

    caps = evaluation.examples_for("audiocaps", cfg, evaluation.Options(limit=20))
    rows, _, _ = evaluation.eval_captioning(Scripted(caps, lambda ex: "a bell rings."), cfg, "audiocaps", caps,
                                            evaluation.Options())
    train = data.examples("captioning", cfg.data_root, "train", source="audiocaps", rng=random.Random(0))
    fixed = metrics.majority([ex.answer for ex in train])
    assert fixed != metrics.majority([c for ex in caps for c in ex.target["references"]])  # else this proves nothing
    refs = [ex.target["references"] for ex in caps]
    assert rows[0][0] == "BLEU-1" and rows[0][2] == pytest.approx(metrics.bleu(refs, [fixed] * len(caps))[0])

    ter = evaluation.examples_for("ter", cfg, evaluation.Options(limit=20))
    names = data.read_mid_to_name(Path(cfg.data_root) / data.LAYOUT["audioset"]["names"]).values()
    extra = sorted(set(names) - {label for ex in ter for label in ex.target["labels"]})[0]
    rows, _, _ = evaluation.eval_ter(Scripted(ter, lambda ex: f"{ex.answer}, {tasks.label_text(extra)}"), cfg,
                                     "ter", ter, evaluation.Options())
    assert rows[0][1] == 0.0  # every answer names one class too many
    rows, _, _ = evaluation.eval_ter(Scripted(ter, lambda ex: ex.answer), cfg, "ter", ter, evaluation.Options())
    assert rows[0][1] == 1.0

    episodes = evaluation.examples_for("esc50", cfg, evaluation.Options(episodes=2))
    rng = random.Random("esc50/5/5")
    pool = data.esc50_pool(cfg.data_root)
    again = [data.fewshot_episode(pool, 5, 5, rng, layout=cfg.fewshot_layout) for _ in range(2)]
    assert [ep.segments for ep in episodes[:2]] == [ep.segments for ep in again]
    assert evaluation.eligible_classes({"a": ["1", "2", "3"], "b": ["1", "2"]}, 2) == 1


def test_fewshot_episodes_follow_the_layout_the_checkpoint_was_trained_on(trained, tmp_path, capsys):
    """A run trained on list-layout episodes is evaluated on list-layout episodes though the preset's layout is the
    paper's, and says so; --fewshot_layout still chooses."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "run" / "stage2" / "final", ckpt)
    meta = json.loads((ckpt / "apt.json").read_text())
    assert meta["config"]["fewshot_layout"] == "paper"  # what the miniature chain trained on
    meta["config"]["fewshot_layout"] = "list"
    (ckpt / "apt.json").write_text(json.dumps(meta))
    for extra, layout in (([], "list"), (["--fewshot_layout=paper"], "paper")):
        out = tmp_path / layout
        evaluate.main(["--task", "esc50", "--episodes", "1", "--checkpoint", str(ckpt), "--out", str(out),
                       *opts(trained), *extra])
        said = capsys.readouterr().out
        assert ("fewshot_layout=list (the tiny preset's is paper" in said) == (layout == "list")
        shown = [json.loads(line) for line in (out / "predictions_esc50.jsonl").read_text().splitlines()]
        assert len(shown) == 3  # one episode of each of the three settings
        assert all(("This is a sound of" in p["prompt"]) == (layout == "paper") for p in shown)
        assert all(p["reference"] in p["prompt"] for p in shown)  # the supports' labels, in either layout


def data_with_faults(trained, tmp_path) -> tuple[Path, list[Path]]:
    """A copy of the miniature's data (a link per file) where the first Clotho-AQA test clip is missing and the
    second is not audio: what real copies of the data sets look like."""
    root = tmp_path / "synth"
    shutil.copytree(trained / "synth", root, copy_function=os.symlink)
    listed = data.read_clotho_aqa(root / "clotho_aqa" / "clotho_aqa_test.csv")
    gone, broken = [root / "clotho_aqa" / "audio_files" / f for f in dict.fromkeys(f for f, *_ in listed)][:2]
    gone.unlink()
    broken.unlink()
    broken.write_bytes(b"RIFF, but nothing after it")
    return root, [gone, broken]


@pytest.mark.parametrize("cache", ["memory", "off"])
def test_the_readability_check_encodes_only_what_it_keeps(trained, tmp_path, monkeypatch, cache):
    """Which clips decode is checked before scoring: with a feature cache by encoding them (scoring then reads the
    features), without one (the paper preset) by decoding them only, so no clip goes through the encoder twice."""
    from apt_min.audiomae import AudioMAE

    root, (gone, broken) = data_with_faults(trained, tmp_path)
    for clip in (root / "clotho_aqa" / "audio_files").iterdir():  # copies of their own: no features of the
        if clip.is_symlink():  # originals (other tests score them) are in the run's cache under their keys
            target = clip.resolve()
            clip.unlink()
            shutil.copy(target, clip)
    encoded, checking = [], []
    forward, check = AudioMAE.forward, evaluation.unreadable

    def counted(self, x, *a, **k):
        encoded.append((bool(checking), len(x)))
        return forward(self, x, *a, **k)

    def flagged(*a, **k):
        checking.append(True)
        try:
            return check(*a, **k)
        finally:
            checking.clear()

    monkeypatch.setattr(AudioMAE, "forward", counted)
    monkeypatch.setattr(evaluation, "unreadable", flagged)
    out = tmp_path / "eval"
    evaluate.main(["--task", "clotho_aqa", "--out", str(out), *opts(trained), f"--data_root={root}",
                   f"--feature_cache={cache}"])
    *_, scored = json.loads((out / "metrics_clotho_aqa.json").read_text())
    assert "1 missing, 1 unreadable" in scored["protocol"]  # found either way
    in_check = sum(n for c, n in encoded if c)
    assert (in_check > 0) == (cache == "memory") and any(not c for c, _ in encoded) == (cache == "off"), encoded


def test_coverage_row_says_how_many_clips_no_few_shot_episode_drew():
    """Few-shot's fixed episodes need not draw every clip of its pools: the clips neither lost nor scored are counted
    as drawn into no episode; every other task scores each clip it lists, so nothing is said there."""
    coverage = data.Coverage()
    coverage.listed = {f"{c}.wav": "esc50.csv" for c in "abcdef"}
    coverage.missing = {"f.wav": "esc50.csv"}
    episode = tasks.Example("fewshot", [("audio", "a.wav"), ("label", "dog"), ("audio", "b.wav"), ("audio", "a.wav")],
                            "dog")
    expected = "scored on 2 clips; the test data lists 6: 1 missing, 0 unreadable (listed in missing_{}.txt)"
    assert evaluation.coverage_row("esc50", [episode], coverage, evaluation.Options()) == (
        "clips scored", 2, None, expected.format("esc50") + "; 3 drawn into no episode")
    assert evaluation.coverage_row("nlar", [episode], coverage, evaluation.Options())[3] == expected.format("nlar")
    coverage.listed = {"a.wav": "esc50.csv", "b.wav": "esc50.csv"}
    coverage.missing = {}
    assert evaluation.coverage_row("esc50", [episode], coverage, evaluation.Options())[3] == (
        "scored on 2 clips; the test data lists 2: 0 missing, 0 unreadable")


def test_evaluation_skips_counts_and_lists_missing_and_unreadable_clips(trained, tmp_path, capsys):
    root, (gone, broken) = data_with_faults(trained, tmp_path)
    listed = len({f for f, *_ in data.read_clotho_aqa(root / "clotho_aqa" / "clotho_aqa_test.csv")})
    out = tmp_path / "eval"
    args = ["--task", "clotho_aqa", "--out", str(out), *opts(trained), "--data-root", str(root)]  # the flag
    evaluate.main(args)
    table = capsys.readouterr().out
    *_, scored = json.loads((out / "metrics_clotho_aqa.json").read_text())
    assert scored["metric"] == "clips scored" and scored["apt"] == listed - 2
    assert scored["protocol"] == (f"scored on {listed - 2} clips; the test data lists {listed}: 1 missing, "
                                  "1 unreadable (listed in missing_clotho_aqa.txt)")
    assert f"clips scored {' ' * 20}{listed - 2:8d}" in table  # a count, printed as one
    lost = dict(line.split("\t") for line in (out / "missing_clotho_aqa.txt").read_text().splitlines())
    assert lost.keys() == {str(gone), str(broken)}
    assert lost[str(gone)].startswith("missing (listed in") and lost[str(gone)].endswith("clotho_aqa_test.csv)")
    assert lost[str(broken)].startswith(f"unreadable: {broken}: ")
    preds = [json.loads(line) for line in (out / "predictions_clotho_aqa.jsonl").read_text().splitlines()]
    assert preds and not {str(gone), str(broken)} & {a for p in preds for a in p["audio"]}
    with pytest.raises(SystemExit, match=f"evaluate.py: error: {re.escape(str(gone))}: audio listed in .* not on disk"):
        evaluate.main([*args, "--strict"])
    with pytest.raises(SystemExit, match=f"{re.escape(str(gone))}: audio listed in .* not on disk"):
        evaluate.main([*args, "--strict_audio=true"])  # the setting says it too
    gone.write_bytes(b"")  # on disk again, but empty: --strict stops at it too
    broken.unlink()
    broken.symlink_to(trained / "synth" / broken.relative_to(root))
    with pytest.raises(SystemExit, match=f"evaluate.py: error: {re.escape(str(gone))}: empty file"):
        evaluate.main([*args, "--strict"])
    evaluate.main(args)  # and without --strict the list is rewritten: one unreadable, none missing
    assert (out / "missing_clotho_aqa.txt").read_text() == f"{gone}\tunreadable: {gone}: empty file (0 bytes)\n"

    def protocol():  # the coverage row's text
        return json.loads((out / "metrics_clotho_aqa.json").read_text())[-1]["protocol"]

    assert protocol().endswith(": 0 missing, 1 unreadable (listed in missing_clotho_aqa.txt)")
    gone.unlink()
    gone.symlink_to(trained / "synth" / gone.relative_to(root))
    evaluate.main(args)  # nothing lost now: no list left over from the runs before
    assert not (out / "missing_clotho_aqa.txt").exists()
    assert protocol() == f"scored on {listed} clips; the test data lists {listed}: 0 missing, 0 unreadable"
    for clip in (root / "clotho_aqa" / "audio_files").iterdir():
        clip.unlink()
    with pytest.raises(SystemExit, match=f"clotho_aqa: nothing to score under {re.escape(str(root))}: of the "
                                         f"{listed} clips its test data lists, {listed} are missing and 0 unreadable"):
        evaluate.main(args)


def test_task_all_runs_every_task_whose_data_is_there(trained, tmp_path, capsys, monkeypatch):
    """A real data folder without one task's data (NLAR's is ours; a set whose clips are all named otherwise): with
    --task all the other tasks are scored, the lacking ones' rows and metrics files say why (an earlier run's
    predictions for them removed), and the exit status is non-zero, naming them; --strict stops at the first."""
    monkeypatch.setattr(evaluation, "spice_missing", lambda: "absent here")
    root = tmp_path / "data"
    shutil.copytree(trained / "synth", root, copy_function=os.symlink)
    (root / "layout.json").write_text(json.dumps({"nlar": {"json": "gone/nlar_{split}.json"},
                                                  "clotho_aqa": {"audio": "elsewhere/{file_name}"}}))
    out = tmp_path / "eval"
    out.mkdir()
    (out / "predictions_nlar.jsonl").write_text('{"output": "an earlier run\'s"}\n')
    args = ["--task", "all", "--limit", "2", "--episodes", "1", "--batch-size", "4", *opts(trained),
            f"--data-root={root}", f"--out={out}"]
    with pytest.raises(SystemExit, match=r"^evaluate.py: 2 of 9 tasks not run \(clotho_aqa, nlar\): their data is "
                                         r"missing or unusable"):
        evaluate.main(args)
    table = capsys.readouterr().out
    assert re.search(rf"\nnlar +not run +— +{re.escape(str(root))}/gone/nlar_test.json: no such data file", table)
    assert re.search(r"\nclotho_aqa +not run +— +clotho_aqa: nothing to score under", table)
    [row] = json.loads((out / "metrics_nlar.json").read_text())
    assert row["metric"] == "not run" and row["apt"] is None and "gone/nlar_test.json" in row["protocol"]
    assert not (out / "predictions_nlar.jsonl").exists() and (out / "made_nlar.json").is_file()
    for task in set(EVALUATIONS) - {"nlar", "clotho_aqa"}:  # before and after the two: scored
        assert json.loads((out / f"metrics_{task}.json").read_text())[-1]["metric"] == "clips scored", task
    for strict in ("--strict", "--strict_audio=true"):  # the flag, or the setting a run was trained with
        with pytest.raises(SystemExit, match=r"^evaluate.py: error: .*/elsewhere/.*\.wav: audio listed in .*"
                                             r"clotho_aqa_test.csv is not on disk"):
            evaluate.main([*args, strict])


def test_few_shot_skips_and_counts_a_missing_clip_as_the_other_tasks_do(trained, tmp_path):
    """Few-shot pools read once, as the episodes were drawn: an ESC-50 clip missing from a real copy is skipped and
    counted (not an error at scoring time); with --strict it is the error, naming the file."""
    root = tmp_path / "synth"
    shutil.copytree(trained / "synth", root, copy_function=os.symlink)
    gone = root / "esc50" / "audio" / data.read_esc50(root / "esc50" / "meta" / "esc50.csv")[0][0]
    gone.unlink()
    out = tmp_path / "eval"
    args = ["--task", "esc50", "--episodes", "2", "--out", str(out), *opts(trained), "--data-root", str(root)]
    evaluate.main(args)
    *rows, scored = json.loads((out / "metrics_esc50.json").read_text())
    assert "1 missing, 0 unreadable" in scored["protocol"] and sum("not run" not in r["protocol"] for r in rows) == 9
    assert (out / "missing_esc50.txt").read_text().startswith(f"{gone}\tmissing (listed in")
    with pytest.raises(SystemExit, match=f"{re.escape(str(gone))}: audio listed in .* not on disk"):
        evaluate.main([*args, "--strict"])


def test_an_nlar_pair_with_one_unreadable_clip_is_skipped_and_counted(trained, tmp_path):
    """A pair is scored only if both its clips decode: one that cannot (here the second clip of the first pair, on
    disk but not audio) drops every pair it is in, and is counted and listed once."""
    root = tmp_path / "synth"
    shutil.copytree(trained / "synth", root, copy_function=os.symlink)
    pairs = data.read_nlar(root / "nlar" / "nlar_test.json")[:8]
    name = pairs[0]["audio_2"]
    assert name not in {p["audio_1"] for p in pairs}  # it stands beside a clip that decodes
    broken = root / "audio" / name
    broken.unlink()
    broken.write_bytes(b"RIFF, but nothing after it")
    out = tmp_path / "eval"
    evaluate.main(["--task", "nlar", "--limit", "8", "--out", str(out), *opts(trained), f"--data_root={root}"])
    *_, scored = json.loads((out / "metrics_nlar.json").read_text())
    assert "0 missing, 1 unreadable (listed in missing_nlar.txt)" in scored["protocol"]
    preds = [json.loads(line) for line in (out / "predictions_nlar.jsonl").read_text().splitlines()]
    kept = [p for p in pairs if name not in (p["audio_1"], p["audio_2"])]
    assert len(preds) == len(kept) < 8 and not any(str(broken) in p["audio"] for p in preds)
    assert (out / "missing_nlar.txt").read_text().startswith(f"{broken}\tunreadable: {broken}: ")


def test_the_caption_baseline_reads_the_training_captions_not_their_audio(trained, tmp_path):
    """The fixed-caption baseline is the most frequent training caption: read from the annotations alone, so a copy
    with none of the training audio (a test-only download) gets the same baseline as the whole data set."""
    root = tmp_path / "synth"
    shutil.copytree(trained / "synth", root, copy_function=os.symlink)
    args = ["--task", "audiocaps", "--limit", "4", "--batch-size", "4", *opts(trained), "--data-root", str(root)]
    evaluate.main([*args, "--out", str(tmp_path / "whole")])
    for _, ytid, _, _ in data.read_audiocaps(root / "audiocaps" / "train.csv"):
        (root / "audio" / f"Y{ytid}.wav").unlink()
    evaluate.main([*args, "--out", str(tmp_path / "test-only")])
    whole, test_only = (json.loads((tmp_path / run / "metrics_audiocaps.json").read_text())
                        for run in ("whole", "test-only"))
    assert [r["baseline"] for r in test_only] == [r["baseline"] for r in whole]
    assert whole[0]["metric"] == "BLEU-1" and whole[0]["baseline"] > 0
    captions = data.caption_texts(root, "train")
    assert len(captions) == len(data.read_audiocaps(root / "audiocaps" / "train.csv")) and not data.examples(
        "captioning", root, "train", rng=random.Random(0))
    clotho = data.caption_texts(root, "train", "clotho")  # Clotho's baseline from Clotho's own training captions
    assert sorted(clotho) == sorted(c for ex in data.examples("captioning", root, "train", source="clotho",
                                                                  rng=random.Random(0)) for c in [ex.answer])


def test_a_missing_training_caption_file_is_told_before_anything_is_generated(trained, tmp_path, monkeypatch):
    """The caption baseline needs the training captions: without them the evaluation stops naming the file before it
    spends the generation's time, not after."""
    root = tmp_path / "synth"
    shutil.copytree(trained / "synth", root, copy_function=os.symlink)
    (root / "audiocaps" / "train.csv").unlink()
    generated = []
    monkeypatch.setattr(evaluation, "generate", lambda *args, **kwargs: generated.append(args) or [""] * 4)
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["--task", "audiocaps", "--limit", "4", *opts(trained), "--data-root", str(root),
                       "--out", str(tmp_path / "eval")])
    assert not generated and str(root / "audiocaps" / "train.csv") in str(stopped.value.code)


def test_an_empty_split_and_a_broken_file_are_one_clean_line_without_traceback(trained, tmp_path):
    """Errors about the user's files end evaluate.py and train.py with one line naming the file (non-zero status),
    no traceback; an annotation file with a header and no rows is such an error, not an empty evaluation."""
    root, _ = data_with_faults(trained, tmp_path)
    test_csv = root / "clotho_aqa" / "clotho_aqa_test.csv"
    header = test_csv.read_text().splitlines()[0]
    test_csv.unlink()
    test_csv.write_text(header + "\n")
    settings = [*opts(trained), f"--data_root={root}", f"--run_dir={tmp_path / 'run'}"]
    shutil.copytree(trained / "run", tmp_path / "run", ignore=shutil.ignore_patterns("features", "eval"))

    def fails(script, *args):
        run = subprocess.run([sys.executable, ROOT / script, *args, *settings], capture_output=True, text=True,
                             cwd=tmp_path, timeout=300)
        assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
        return run.stderr.strip().splitlines()[-1]

    said = fails("evaluate.py", "--task", "clotho_aqa")
    assert said == f"evaluate.py: error: {test_csv}: lists nothing (no rows after the header)"
    captions = root / "audiocaps" / "train.csv"
    rows = captions.read_text().splitlines()
    captions.unlink()
    captions.write_text("\n".join(rows[:3] + ["17,x1Fh-zm9tbR,0"] + rows[4:]) + "\n")  # line 4: no caption
    said = fails("train.py", "--stage", "0")
    assert said.startswith(f"train.py: error: {captions}:4: expected 4 fields, found 3")


def test_clean_exit_keeps_the_traceback_for_bugs():
    from apt_min.errors import UserError, clean_exit

    @clean_exit("prog")
    def fails(error):
        raise error

    with pytest.raises(SystemExit, match=r"^prog: error: data.csv:3: bad$"):
        fails(data.DataError("data.csv:3: bad"))
    with pytest.raises(KeyError):  # not about the user's files: a bug, raised as it is
        fails(KeyError("x"))
    assert issubclass(data.DataError, UserError) and issubclass(evaluation.data.MissingFileError, FileNotFoundError)


def test_whole_number_reads_whole_numbers_from_its_least_up(capsys):
    """whole_number(least) stands in for argparse's int: an int, `least` itself included, spaces around it allowed as
    int allows them; a digit that int cannot read (a superscript two) is argparse's own error, naming the option and
    what was expected."""
    import argparse

    from apt_min.errors import whole_number

    assert (whole_number(1)("1"), whole_number(0)("0"), whole_number(1)(" 12 ")) == (1, 0, int(" 12 "))
    assert type(whole_number(1)("3")) is int
    ap = argparse.ArgumentParser(prog="p")
    ap.add_argument("--n", type=whole_number(2))
    assert ap.parse_args(["--n", "2"]).n == 2
    with pytest.raises(SystemExit):
        ap.parse_args(["--n", "\u00b2"])
    assert "argument --n: invalid whole number >= 2 value: '\u00b2'" in capsys.readouterr().err


def test_the_command_lines_options_reach_the_evaluation(trained, tmp_path, monkeypatch):
    """evaluate.py's defaults are the evaluation's own (Options: every example, 100 episodes a few-shot setting, as
    the README's table reports them, the public APT code's captioning decoding), and each option given reaches it."""
    asked = []

    class Stop(Exception):
        pass

    def evaluated(name, apt, cfg, options):
        asked.append(options)
        raise Stop

    monkeypatch.setattr(evaluate, "evaluate", evaluated)
    monkeypatch.setattr(evaluate, "load_apt", lambda cfg, checkpoint, device: None)
    args = ["--task", "audiocaps", "--out", str(tmp_path), *opts(trained)]
    for extra in ([], ["--limit", "3", "--episodes", "7", "--batch-size", "2", "--num-beams", "2",
                       "--repetition-penalty", "1.2", "--max-new-tokens", "9", "--strict"]):
        with pytest.raises(Stop):
            evaluate.main([*args, *extra])
    default, given = ((o.batch_size, o.limit, o.episodes, o.caption, o.strict) for o in asked)
    plain = evaluation.Options()
    assert default == (plain.batch_size, 0, 100, evaluation.CAPTION, False) and plain.caption == evaluation.CAPTION
    assert given == (2, 3, 7, {"num_beams": 2, "repetition_penalty": 1.2, "max_new_tokens": 9}, True)


def test_the_printed_table_shows_scores_and_baselines_alike_and_counts_whole(tmp_path, capsys):
    """print_report: a score and its baseline to three places, side by side; a count as a whole number; no
    baseline, no number."""
    evaluate.print_report([("nlar", "accuracy", 0.5, 0.25, "exact match"),
                           ("nlar", "clips scored", 12, None, "scored on 12 clips")], tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"nlar +accuracy +0\.500 +0\.250  exact match", lines[2]), lines
    assert re.fullmatch(r"nlar +clips scored +12 +  scored on 12 clips", lines[3]), lines


def test_the_synthetic_benchmark_is_made_where_the_data_root_has_none(trained, tmp_path):
    """evaluate.py on a preset that runs on the synthetic benchmark makes it first where the data root is empty,
    as train.py does."""
    tmp = copy_of(trained, tmp_path)
    fresh = tmp_path / "fresh"
    evaluate.main(["--task", "counting", "--limit", "2", "--batch-size", "2", *opts(tmp), f"--data_root={fresh}",
                   f"--out={tmp_path / 'eval'}"])
    *_, scored = json.loads((tmp_path / "eval" / "metrics_counting.json").read_text())
    assert scored["apt"] == 2 and len(data.examples("counting", fresh, "test")) >= 2


def test_missing_checkpoint_is_explained_before_anything_is_written(tmp_path):
    with pytest.raises(SystemExit, match=r"no trained APT there; train one \(python train.py --stage 0, lm, 1, 2, in "
                                         r"turn\) or pass --checkpoint"):
        evaluate.main(["--task", "nlar", f"--run_dir={tmp_path / 'run'}", f"--data_root={tmp_path / 'synth'}"])
    assert list(tmp_path.iterdir()) == []  # no data generated, no folder made
    empty = tmp_path / "stage2" / "final"  # a folder, but no APT in it (a save that never finished)
    empty.mkdir(parents=True)
    with pytest.raises(SystemExit, match=rf"^{re.escape(str(empty))}: no trained APT there; train one"):
        evaluate.main(["--task", "nlar", f"--checkpoint={empty}", f"--run_dir={tmp_path / 'run'}",
                       f"--data_root={tmp_path / 'synth'}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage2"]


# ------------------------------------------------------------------------ scoring, on hand-worked answers
# Labels as the real data sets write them: AudioSet's display names (capitals, commas), ESC-50's categories
# (underscores). Perfect answers are the examples' own answers, as the model is trained to write them.

AUDIOSET = ["Speech", "Male speech, man speaking", "Dog", "Domestic animals, pets", "Chirping, tweeting"]


def test_tagging_scores_the_label_set_read_against_the_class_list():
    exs = [tasks.tagging("a.wav", ["Male speech, man speaking", "Dog"]), tasks.tagging("b.wav", ["Speech"]),
           tasks.tagging("c.wav", ["Domestic animals, pets"])]
    assert exs[0].answer == "male speech, man speaking, dog"
    (perfect,) = metrics.score_tagging(exs, [ex.answer for ex in exs], AUDIOSET)
    assert perfect[1] == 1.0
    # b: "male speech, man speaking" is not "speech"; c: "domestic animals" is not a class name
    outputs = ["Dog, male speech, man speaking.", "male speech, man speaking", "domestic animals"]
    (row,) = metrics.score_tagging(exs, outputs, AUDIOSET)
    assert row[1] == pytest.approx(1 / 3) and row[2] == pytest.approx(1 / 3)  # baseline: one of three sets
    # naming more than the clip's labels is wrong too (a list of every class is no answer)
    (row,) = metrics.score_tagging(exs, ["male speech, man speaking, dog, speech", "speech", ", ".join(AUDIOSET)],
                                   AUDIOSET)
    assert row[1] == pytest.approx(1 / 3)
    # the baseline is the most frequent label set, not the first clip's: {Speech} twice in three clips
    later = [exs[2], exs[1], tasks.tagging("d.wav", ["Speech"])]
    assert metrics.score_tagging(later, ["dog"] * 3, AUDIOSET)[0][2] == pytest.approx(2 / 3)
    labels = metrics.label_matrix(exs, AUDIOSET)
    assert labels.tolist() == [[0, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 1, 0]]
    assert metrics.mean_average_precision(labels.astype(float), labels) == 1.0


def test_captions_score_perfect_and_hand_worked_answers():
    exs = [tasks.captioning("a.wav", ["A dog barks.", "A dog is barking loudly"]),
           tasks.captioning("b.wav", ["Rain falls on a roof.", "Rain is falling"]),
           tasks.captioning("c.wav", ["A man speaks, then a bell rings.", "Speech and a bell"])]
    table = {m: (v, b) for m, v, b, _ in metrics.score_captions(exs, [ex.answer for ex in exs], "rain")}
    assert [table[f"BLEU-{k}"][0] for k in (1, 2, 3, 4)] == pytest.approx([1.0] * 4)
    assert table["ROUGE-L"][0] == pytest.approx(1.0)
    assert table["CIDEr-D"][0] > 1.0 and table["CIDEr-D"][1] < 0.2 * table["CIDEr-D"][0]
    # the baseline, "rain" for every clip: BLEU-1 1 of 3 words, the brevity penalty of 3 words against 3 + 3 + 4 (each
    # clip's closest reference length); ROUGE-L on the rain clip only, precision 1 and recall 1/3 (the best of 1/5, 1/3)
    assert table["BLEU-1"][1] == pytest.approx(np.exp(1 - 10 / 3) / 3)
    assert table["ROUGE-L"][1] == pytest.approx((1 + 1.2**2) * (1 / 3) / (1 / 3 + 1.2**2) / 3)
    # a one-word caption has no word pairs: its BLEU-2 to 4 are the smoothing's (6e-5), not its BLEU-1 again
    assert max(table[f"BLEU-{k}"][1] for k in (2, 3, 4)) < table["BLEU-1"][1] / 100
    # nothing in common with any reference: zero everywhere (BLEU's smoothing leaves < 1e-10)
    table = {m: v for m, v, _, _ in metrics.score_captions(exs, ["engines hum"] * 3, "rain")}
    assert max(table[f"BLEU-{k}"] for k in (1, 2, 3, 4)) < 1e-10 and table["ROUGE-L"] == table["CIDEr-D"] == 0.0
    # one clip, "a dog runs" against "a dog barks": 2 of 3 words and 1 of 2 word pairs match, lengths equal
    one = [tasks.captioning("a.wav", ["A dog barks."])]
    table = {m: v for m, v, _, _ in metrics.score_captions(one, ["A dog runs."], "rain")}
    assert table["BLEU-1"] == pytest.approx(2 / 3, rel=1e-8) and table["BLEU-2"] == pytest.approx(3 ** -0.5, rel=1e-8)
    assert table["ROUGE-L"] == pytest.approx(2 / 3)  # LCS 2 of 3 both ways


def test_spider_is_the_mean_of_cider_d_and_spice():
    rows = [("CIDEr-D", 0.5, 0.1, ""), ("METEOR", 0.2, None, ""), ("SPICE", 0.125, None, "")]
    assert metrics.spider(rows) == [("SPIDEr", pytest.approx(0.3125), None, "(CIDEr-D + SPICE) / 2")]
    [(name, value, base, protocol)] = metrics.spider(rows[:2] + [("SPICE", float("nan"), None, "no jars")])
    assert name == "SPIDEr" and np.isnan(value) and base is None and "needs SPICE" in protocol
    [(_, value, _, protocol)] = metrics.spider(rows[:2])  # no SPICE row at all: unavailable too, not a KeyError
    assert np.isnan(value) and "needs SPICE" in protocol


def test_exact_match_normalises_answers():
    exs = [tasks.aqa("a.wav", "Is a dog barking?", ["Yes", "yes.", "no"]), tasks.aqa("a.wav", "How many barks?",
                                                                                     ["Two", "2", "three"]),
           tasks.aqa("b.wav", "Is it raining?", "No"), tasks.aqa("b.wav", "What falls?", "Rain drops")]
    assert [ex.target["answer"] for ex in exs] == ["yes", "2", "no", "rain drops"]
    perfect = metrics.score_exact(exs, [ex.answer for ex in exs], yes_no=True)
    assert [r[1] for r in perfect] == [1.0, 1.0]
    table = metrics.score_exact(exs, ["Yes.", "three", "yes", "The rain drops!"], yes_no=True)
    assert [r[0] for r in table] == ["accuracy", "accuracy, yes/no questions"]
    assert table[0][1] == pytest.approx(2 / 4) and table[1][1] == pytest.approx(1 / 2)
    assert table[0][2] == pytest.approx(1 / 4) and table[1][2] == pytest.approx(1 / 2)  # always "yes" / "yes"
    nlar = [tasks.nlar("a.wav", "b.wav", "Which recording contains the bell?", "first"),
            tasks.nlar("a.wav", "b.wav", "Is the bell louder in the first recording?", "Yes"),
            tasks.nlar("b.wav", "a.wav", "Which recording contains the bell?", "second")]
    table = metrics.score_exact(nlar, ["The first.", "no", "second"])
    assert len(table) == 1 and table[0][1] == pytest.approx(2 / 3)
    nlar.append(tasks.nlar("b.wav", "a.wav", "Which recording is longer?", "first"))
    table = metrics.score_exact(nlar, ["The first.", "no", "second", "second"], always="yes")  # the paper's baseline
    assert [r[0] for r in table] == ["accuracy", "accuracy vs always 'yes'"]
    assert table[0][1] == table[1][1] == pytest.approx(2 / 4)
    assert table[0][2] == pytest.approx(2 / 4) and table[1][2] == pytest.approx(1 / 4)  # always "first" / "yes"
    later = [tasks.aqa("a.wav", "Is it raining?", "no"), tasks.aqa("b.wav", "Is it raining?", "yes"),
             tasks.aqa("c.wav", "Is it raining?", "yes")]  # the most frequent answer is not the first one
    # an answer that says more than the answer is wrong ("yes or no" is no answer to a yes/no question)
    assert metrics.score_exact(later, ["no, or yes", "yes or no", "yes"])[0][1] == pytest.approx(1 / 3)
    [(_, _, base, protocol)] = metrics.score_exact(later, ["no", "no", "no"])
    assert base == pytest.approx(2 / 3) and "always 'yes'" in protocol and "tied" not in protocol
    [(_, _, base, protocol)] = metrics.score_exact(later[:2], ["no", "no"])  # one "no", one "yes": a tie, said
    assert base == 0.5 and protocol.endswith("(baseline: always 'no', the most frequent answer, tied with 'yes')")
    assert metrics.majority(["b", "a", "a", "b"]) == "b"  # among equals, the first seen
    mixed = [tasks.aqa("a.wav", f"How many? {i}", "two") for i in range(3)] + \
        [tasks.aqa("a.wav", "Is it raining?", a) for a in ("no", "no", "yes")]
    rows = metrics.score_exact(mixed, ["2"] * 6, yes_no=True)  # always '2' overall, always 'no' among yes/no
    assert rows[0][2] == pytest.approx(3 / 6) and rows[1][2] == pytest.approx(2 / 3)
    # the annotators' most frequent answer, not the first
    assert tasks.aqa("a.wav", "Is it raining?", ["No", "Yes", "yes."]).target["answer"] == "yes"


def test_fewshot_reads_esc50_labels_with_underscores():
    support = [("s1.wav", "chirping_birds"), ("s2.wav", "crying_baby"), ("s3.wav", "dog"),
               ("s4.wav", "door_wood_knock")]
    eps = [tasks.fewshot(support, "q1.wav", "chirping_birds"), tasks.fewshot(support, "q2.wav", "door_wood_knock"),
           tasks.fewshot(support, "q3.wav", "dog"), tasks.fewshot(support, "q4.wav", "crying_baby")]
    assert eps[0].answer == "chirping birds" and eps[0].target["choices"] == [s for _, s in support]
    for ep, ranked in zip(eps, ["chirping_birds", "dog", "dog", "dog"]):
        ep.target["ranked"] = ranked
    perfect = metrics.score_fewshot(eps, [ep.answer for ep in eps], "accuracy 4-way 1-shot")
    assert perfect[0][1] == 1.0 and perfect[1][1] == pytest.approx(2 / 4)
    table = metrics.score_fewshot(eps, ["Chirping birds.", "door wood knock", "a cat", "dog"], "x")
    assert [r[0] for r in table] == ["x", "x, ranked"]
    assert table[0][1] == pytest.approx(2 / 4) and table[0][2] == pytest.approx(1 / 4)
    # the answer is the first label named: one that names every label is right only where the right one comes first
    every = ["chirping birds, crying baby, dog, door wood knock"] * 4
    assert metrics.score_fewshot(eps, every, "x")[0][1] == pytest.approx(1 / 4)
    assert metrics.score_fewshot(eps, ["dog or chirping birds", "dog", "dog", "dog"], "x")[0][1] == pytest.approx(1 / 4)
    # chance is one in the episode's labels (4), however many episodes there are
    assert [r[2] for r in metrics.score_fewshot(eps[:2], every[:2], "x")] == [pytest.approx(1 / 4)] * 2


def test_the_prototypical_network_takes_the_nearest_class_mean_of_max_pooled_features():
    """Hand-worked: A's supports peak at 5 and 3 in feature 0 (max-pooled prototype (4, 0)), B's hold 2 throughout
    ((2, 0)); the query peaks at 4 over a floor of 1: max-pooled it is A's (distance 0 against 4), though its mean
    (1.75, 0) would be B's. Its row sets APT's generated accuracy beside the network's."""
    def clip(*rows):
        return torch.tensor([[list(r) for r in rows]], dtype=torch.float16)  # (W=1, N, D=2)

    feats = {"a1": clip((5, 0), (0, 0), (0, 0), (0, 0)), "a2": clip((3, 0), (0, 0), (0, 0), (0, 0)),
             "b1": clip((2, 0), (2, 0), (2, 0), (2, 0)), "q": clip((4, 0), (1, 0), (1, 0), (1, 0)),
             "q2": clip((2, 0), (2, 0), (2, 0), (1, 0)), "q3": clip((3.25, 0), (0, 0), (0, 0), (0, 0))}
    support = [("a1", "alarm"), ("b1", "bell"), ("a2", "alarm")]
    first, second = tasks.fewshot(support, "q", "alarm"), tasks.fewshot(support, "q2", "bell")
    assert evaluation.prototype_label(first, feats) == "alarm"
    assert evaluation.prototype_label(second, feats) == "bell"
    # nearer A's mean (4) than B's (2), though nearer B than A's first support (5): the mean of the supports counts
    assert evaluation.prototype_label(tasks.fewshot(support, "q3", "alarm"), feats) == "alarm"
    # Euclidean distance: (1, 1) is 1.41 from (0, 0) and 1.45 from (2.45, 1) (by the sum of the differences, 2
    # against 1.45, it would be the second)
    feats |= {"c1": clip((0, 0)), "d1": clip((2.45, 1)), "q4": clip((1, 1))}
    assert evaluation.prototype_label(tasks.fewshot([("c1", "alarm"), ("d1", "bell")], "q4", "alarm"), feats) == "alarm"
    # max-pooled over windows too: a query of two windows peaking at 4 in one and 0 in the other is (4, 0), nearer
    # A's prototype (5, 0) than B's (mean of (0, 0) and (2, 0): (1, 0)); averaged over windows, (2, 0), it is B's
    feats |= {"q5": torch.tensor([[[4, 0]], [[0, 0]]], dtype=torch.float16)}  # (W=2, N=1, D=2)
    assert evaluation.prototype_label(tasks.fewshot([("c1", "bell"), ("a1", "alarm"), ("b1", "bell")], "q5", "alarm"),
                                      feats) == "alarm"
    # measured in float32 from the float16 cache: over an encoder's 768 features the sums of squares pass float16's
    # 65 504 (30 against 0 and 20: 691 200 and 76 800), where both would be infinite and the first label win
    feats |= {name: torch.full((1, 1, 768), value, dtype=torch.float16) for name, value in (("c2", 0), ("d2", 20),
                                                                                             ("q6", 30))}
    assert evaluation.prototype_label(tasks.fewshot([("c2", "alarm"), ("d2", "bell")], "q6", "bell"), feats) == "bell"
    for ep, proto in ((first, "alarm"), (second, "alarm")):
        ep.target.update(ranked="bell", prototype=proto)
    rows = metrics.score_fewshot([first, second], ["alarm", "bell"], "accuracy 2-way 2-shot")
    assert rows[2][0] == "accuracy 2-way 2-shot vs a prototypical network"
    assert rows[1][1] == pytest.approx(0.5)  # ranked "bell" both times
    assert rows[2][1] == pytest.approx(1.0) and rows[2][2] == pytest.approx(0.5)  # generated, beside the prototype
    assert rows[0][2] == pytest.approx(1 / 2)  # chance: 2 labels among the 3 supports
    del second.target["prototype"]  # the network's answer for some episodes only: no row beside it
    assert [r[0] for r in metrics.score_fewshot([first, second], ["alarm", "bell"], "x")] == ["x", "x, ranked"]


def test_tagging_scores_the_generated_answers_class_by_class(trained, monkeypatch):
    """eval_tagging's rows, with the model scripted: the paper protocol embeds what the model generated (not the
    references) with the checkpoint's stage-0 aligner (given the LLM's word table, which aligner_words=llm needs)
    and takes mAP over classes; the likelihood protocol ranks classes by their likelihood, highest first."""
    cfg = load_config("tiny", opts(trained))
    examples = evaluation.examples_for("audioset", cfg, evaluation.Options(limit=12))
    classes = evaluation.audioset_classes(cfg)
    labels = metrics.label_matrix(examples, classes)
    rng = np.random.default_rng(0)
    branch, likely = rng.random(labels.shape), rng.random(labels.shape)
    said = [ex.answer if i % 3 == 0 else f"answer {i}" for i, ex in enumerate(examples)]  # every third: its labels
    by_clip = {ex.segments[0][1]: i for i, ex in enumerate(examples)}
    words = torch.randn(5, 3)
    apt = SimpleNamespace(generate=lambda batch, **o: [said[by_clip[b[0][1]]] for b in batch],
                          encode_clips=lambda paths, strict: ({}, []), tokenizer="tok",
                          choice_logprob=lambda segments, answers, feats: torch.tensor(likely[by_clip[segments[0][1]]]),
                          proj=SimpleNamespace(weight=torch.zeros(1)),
                          llm=SimpleNamespace(model=SimpleNamespace(embed_tokens=SimpleNamespace(weight=words))))
    asked = {}
    monkeypatch.setattr(evaluation, "stage0_aligner", lambda checkpoint, device, table=None: asked.update(
        checkpoint=checkpoint, words=table) or "the stage-0 aligner")
    monkeypatch.setattr(evaluation, "text_branch_scores", lambda aligner, tok, answers, names: asked.update(
        aligner=aligner, answers=answers, classes=names) or branch)
    rows, outputs, _ = evaluation.eval_tagging(apt, cfg, "audioset", examples, evaluation.Options(checkpoint="ckpt"))
    assert outputs == said and asked["answers"] == said and asked["classes"] == classes
    assert asked["aligner"] == "the stage-0 aligner" and asked["checkpoint"] == "ckpt" and asked["words"] is words
    (_, paper, chance, _), (_, likelihood, chance_too, _) = rows[:2]
    assert paper == pytest.approx(metrics.mean_average_precision(branch, labels))
    assert likelihood == pytest.approx(metrics.mean_average_precision(likely, labels))
    # beside both: the mAP of random scores (seeded, so that reruns compare), not of no ranking at all
    seeded = metrics.mean_average_precision(np.random.default_rng(0).random(labels.shape), labels)
    assert chance == chance_too == pytest.approx(seeded) and chance != pytest.approx(
        metrics.mean_average_precision(np.zeros(labels.shape), labels))
    # and the answers read as label sets: every third names its clip's labels exactly
    [(metric, exact, _, _)] = rows[2:]
    assert metric == "exact label set" and exact == pytest.approx(len(range(0, len(examples), 3)) / len(examples))
    # else the checks above would not tell clips from classes, or high from low
    assert metrics.mean_average_precision(branch.T, labels.T) != pytest.approx(paper)
    assert metrics.mean_average_precision(-likely, labels) != pytest.approx(likelihood)


def test_closed_set_protocols_ask_the_llm_as_documented(tmp_path):
    """The likelihood protocols, the LLM's scores scripted: tagging scores each class by the likelihood of
    "{class}." after the clip and "This is a sound of"; few-shot scores the episode's labels after the episode and
    ranks the best first (its "ranked" answer, beside the greedy one from the same pass). The paper's tagging
    protocol embeds the answer and each class name as stage 0 trained the text branch: a caption, BOS ... EOS."""
    from types import SimpleNamespace

    from apt_min.aligner import AlignerConfig, stage0_batch
    from apt_min.tokenizer import Tokenizer, train_sentencepiece

    asked = []
    scripted = iter([torch.tensor([0.5, -1.0]), torch.tensor([-2.0, 0.25]), torch.tensor([-3.0, 1.0, 0.0])])

    def choice_logprob(segments, answers, feats):
        asked.append((segments, answers))
        return next(scripted)

    asked_strict = []  # each protocol encodes its clips strictly: one that fails here (after the readability check)
    # is an error naming it, not a gap in the features found later as a KeyError

    def encode_clips(paths, strict):
        asked_strict.append(strict)
        return {}, []

    def answer_and_rank(segments, answers, feats, n):
        asked.append((segments, answers))
        return f"a bell ({n} tokens)", torch.tensor([0.0, 2.0, 1.0])

    apt = SimpleNamespace(encode_clips=encode_clips, choice_logprob=choice_logprob, answer_and_rank=answer_and_rank)
    clips = [tasks.tagging("a.wav", ["Dog"]), tasks.tagging("b.wav", ["Male speech, man speaking"])]
    scores = evaluation.likelihood_scores(apt, clips, ["Dog", "Male speech, man speaking"])
    np.testing.assert_array_equal(scores, [[0.5, -1.0], [-2.0, 0.25]])
    assert asked[1] == ([("audio", "b.wav"), ("text", "This is a sound of")], ["dog.", "male speech, man speaking."])
    episode = tasks.fewshot([("s1.wav", "alarm"), ("s2.wav", "chirping_birds"), ("s3.wav", "dog")], "q.wav", "dog")
    assert evaluation.rank_labels(apt, episode) == "chirping_birds"
    assert asked[2] == (episode.segments, ["alarm.", "chirping birds.", "dog."])
    assert evaluation.answer_and_rank(apt, episode, {}) == "a bell (12 tokens)"  # a short answer's room, greedy
    assert asked[3] == (episode.segments, ["alarm.", "chirping birds.", "dog."])  # the same sentences, one pass
    assert episode.target["ranked"] == "chirping_birds"
    assert asked_strict == [True, True]

    train_sentencepiece(["a dog barks", "a bell rings twice", "male speech"] * 30, tmp_path / "tokenizer.model", 320)
    tok = Tokenizer(tmp_path)
    torch.manual_seed(0)
    aligner = Aligner(AlignerConfig(vocab_size=tok.vocab_size, audio_dim=8, hidden_size=16, num_layers=2,
                                    num_heads=2, intermediate_size=32, num_queries=2, dropout=0.0)).eval()
    with torch.no_grad():  # beyond BERT's small start, where every text embeds alike (cosines 0.99999)
        for p in aligner.parameters():
            p.normal_(0, 0.3)
    got = evaluation.text_branch_scores(aligner, tok, ["a dog barks"], ["Bell", "male_speech"])
    with torch.no_grad():
        def caption(text):  # as stage 0 reads a caption
            b = stage0_batch([text], [torch.zeros(2, 8)], ["x.wav"], tok, "cpu")
            return aligner.encode_text(b.text_ids, b.text_mask)[0]
        want = [float(caption("a dog barks") @ caption(c)) for c in ("bell", "male speech")]
    np.testing.assert_allclose(got[0], want, rtol=1e-5)


def test_each_task_generates_room_for_its_longest_answer(trained, monkeypatch):
    """Generation stops at a cap of new tokens per task: each cap holds the longest reference answer of its test
    split, EOS included (SED's four-times events ran past the old cap of 40 and lost their last segment). Captions
    are left out: their cap is the public APT code's 40, which the miniature's 400-word tokenizer cannot meet."""
    from apt_min.tokenizer import Tokenizer

    caps = {}

    class Generated(Exception):  # tagging's evaluator goes on to ask the APT itself: stopped once it has generated
        pass

    def generate(apt, examples, options, *args):
        caps.setdefault(examples[0].task, options["max_new_tokens"])
        if examples[0].task == "tagging":
            raise Generated
        return [ex.answer for ex in examples]

    monkeypatch.setattr(evaluation, "generate", generate)
    cfg = load_config("tiny", opts(trained))
    tok = Tokenizer(trained / "run" / "llm")
    for name in ("audioset", "sed", "ter", "counting", "clotho_aqa", "nlar"):
        examples = evaluation.examples_for(name, cfg, evaluation.Options())
        try:
            evaluation.EVALUATORS[evaluation.EVALUATIONS[name][0]](None, cfg, name, examples, evaluation.Options())
        except Generated:
            pass
        longest = max(len(tok.encode(ex.answer, bos=False)) + 1 for ex in examples)
        assert caps[examples[0].task] >= longest, (name, caps, longest)
    assert caps["sed"] >= 64


def test_the_checkpoints_layout_is_used_and_said_unless_chosen(trained, tmp_path, capsys):
    """evaluate.py lays few-shot episodes out as the checkpoint was trained, saying so, unless --fewshot_layout (or
    --fewshot-layout) chooses; the prompt format, instruction BOS and long-audio mode are always the APT's own, and
    one given on the command line that differs is said to be unused."""
    args = ["--task", "counting", "--limit", "4", "--batch-size", "4", "--out", str(tmp_path), *opts(trained)]
    evaluate.main([*args, "--preset", "small", "--llm_path=" + str(trained / "run" / "llm"),
                   "--aligner_words=own", "--aligner_init=random", "--encoder_init=random"])
    said = capsys.readouterr().out
    assert "few-shot episodes laid out as" in said and "fewshot_layout=paper (the small preset's is list" in said
    assert json.loads((tmp_path / "made_counting.json").read_text())["preset"] == "small"
    assert "is not used" not in said  # the small preset's prompt format, not typed here: nothing to say of it
    evaluate.main(args)  # the tiny preset's layout is the one the APT was trained on: nothing to say
    assert "few-shot episodes laid out as" not in capsys.readouterr().out
    for spelling in ("--fewshot_layout=list", "--fewshot-layout=list"):
        evaluate.main([*args, spelling])
        assert "few-shot episodes laid out as" not in capsys.readouterr().out, spelling
    evaluate.main([*args, "--prompt_format=smollm2-chat", "--long-audio=all", "--instruction_bos=true"])
    said = capsys.readouterr().out
    assert "--prompt_format=smollm2-chat is not used" in said and "--long_audio=all is not used" in said
    assert "--instruction_bos=True is not used" in said


def test_segment_f1_finds_the_most_matches_there_are():
    """On random small sets of segments (grid ends, so IoU ties at 0.5 and touching segments occur): the matched
    count equals the best of every way to pair predictions with references (brute force), in any order."""
    import itertools

    rng = random.Random(0)

    def fits(p, r):
        inter, union = max(0.0, min(p[1], r[1]) - max(p[0], r[0])), max(p[1], r[1]) - min(p[0], r[0])
        return inter / union >= 0.5

    def segments(n):
        return [tuple(sorted(rng.sample(range(7), 2))) for _ in range(n)]

    for _ in range(300):
        pred, ref = segments(rng.randint(0, 4)), segments(rng.randint(0, 4))
        best = max((sum(fits(p, ref[j]) for p, j in zip(pred, js) if j is not None)
                    for js in itertools.permutations(list(range(len(ref))) + [None] * len(pred), len(pred))),
                   default=0)
        assert metrics.segment_f1(pred, ref) == (best, len(pred), len(ref)), (pred, ref)
        assert metrics.segment_f1(pred[::-1], ref)[0] == best


def test_segment_f1_hand_worked():
    f1 = metrics.segment_f1
    assert f1([(0.0, 1.0)], [(0.0, 1.0)]) == (1, 1, 1)
    assert f1([(0.0, 1.0)], [(0.0, 0.5)]) == (1, 1, 1)  # IoU exactly 0.5 counts
    assert f1([(0.0, 1.0)], [(0.5, 1.5)]) == (0, 1, 1)  # IoU 1/3
    assert f1([(0.0, 1.0), (0.1, 1.0)], [(0.0, 1.0)]) == (1, 2, 1)  # a reference is matched once
    assert f1([(2.0, 3.0), (0.0, 1.0)], [(0.0, 1.0), (2.2, 3.0)]) == (2, 2, 2)  # in any order
    assert f1([], [(0.0, 1.0)]) == (0, 0, 1) and f1([(0.0, 1.0)], []) == (0, 1, 0)
    assert f1([(1.0, 1.0)], [(1.0, 1.0)]) == (0, 1, 1)  # zero-length spans (parse_segments keeps them): no match
    assert f1([(0.0, 1.0)], [(2.0, 3.0)], iou=0.0) == (1, 1, 1)  # segments apart have IoU 0, not below it
    # a prediction that fits two touching references: it takes the one no other prediction fits, whatever the order
    touching = [(0.0, 1.0), (1.0, 2.0)]
    assert f1([(0.0, 2.0), (0.0, 1.0)], touching) == f1([(0.0, 1.0), (0.0, 2.0)], touching) == (2, 2, 2)
    exs = [tasks.sed("a.wav", "Dog", [(3.0, 3.6), (0.5, 1.2)]), tasks.sed("a.wav", "chirping_birds", [(0.0, 4.0)]),
           tasks.sed("a.wav", "Rain", [(2.0, 4.0)])]
    assert exs[0].answer == "0.5s-1.2s; 3.0s-3.6s" and exs[0].target["segments"] == [(0.5, 1.2), (3.0, 3.6)]
    (perfect,) = metrics.score_sed(exs, [ex.answer for ex in exs])
    assert perfect[1] == 1.0
    # 1 of 2 dog segments found, one false alarm; birds and rain found: 3 matched, 4 predicted, 4 true -> F1 2*3/8
    (row,) = metrics.score_sed(exs, ["0.5s-1.1s; 6s-7s", "0.0s to 4.5s", "2s-4s"])
    assert row[1] == pytest.approx(6 / 8)
    # the whole clip (without durations 0-4 s: the latest end of any query's segments), once per query: the birds,
    # and the rain by IoU exactly 0.5 (an end of 3.6 s or 5 s would miss it)
    assert row[2] == pytest.approx(2 * 2 / (3 + 4))
    # with each clip's duration (what evaluation passes, from the files): a 4 s clip's birds, nothing of 10 s clips
    (row,) = metrics.score_sed(exs, ["", "", ""], durations=[10.0, 4.0, 10.0])
    assert row[1] == 0.0 and row[2] == pytest.approx(2 * 1 / (3 + 4))


def test_temporal_retrieval_with_commas_and_underscores_in_labels():
    events = [("Male speech, man speaking", 0.0, 2.0), ("chirping_birds", 1.0, 3.0), ("Dog", 5.0, 6.0)]
    exs = [tasks.ter("a.wav", events, 0.5, 2.5), tasks.ter("a.wav", events, 5.0, 6.0)]
    assert exs[0].target["labels"] == ["Male speech, man speaking", "chirping_birds"]
    vocab = ["Male speech, man speaking", "Speech", "chirping_birds", "Dog"]
    (perfect,) = metrics.score_ter(exs, [ex.answer for ex in exs], vocab)
    assert perfect[1] == 1.0
    (row,) = metrics.score_ter(exs, ["chirping birds and male speech, man speaking", "speech, dog"], vocab)
    assert row[1] == pytest.approx(1 / 2)  # order does not matter; an extra label does
    again = tasks.ter("a.wav", events, 5.2, 5.8)  # the dog again: its set is the windows' most frequent
    (row,) = metrics.score_ter([*exs, again], ["", "", ""], vocab)
    assert row[1] == 0.0 and row[2] == pytest.approx(2 / 3)  # the baseline scored against the windows' labels
    many = [f"Label {c}" for c in "JIHGFEDCBA"]  # a window of ten labels: the baseline names them in sorted order
    [(_, _, _, protocol)] = metrics.score_ter([tasks.Example("ter", [], "", {"labels": many})], [""], many)
    assert protocol == f"exact set of labels (baseline: always {', '.join(sorted(many)).lower()!r})"


def test_counting_reads_numbers_and_words():
    exs = [tasks.counting("a.wav", "Dog", n) for n in (3, 3, 1, 2)]
    table = metrics.score_counting(exs, [ex.answer for ex in exs])
    assert [r[1] for r in table] == [1.0, 0.0]
    table = metrics.score_counting(exs, ["3", "three times", "twice", "??"])
    assert table[0][1] == pytest.approx(2 / 4) and table[0][2] == pytest.approx(2 / 4)  # baseline: always 3
    assert table[1][1] == pytest.approx((0 + 0 + 1 + 2) / 4)  # "??" counts as 0
    assert table[1][2] == pytest.approx((0 + 0 + 2 + 1) / 4)
    exs = [tasks.counting("a.wav", "Dog", n) for n in (1, 1, 4, 5, 6)]  # most frequent 1, median 4
    assert metrics.score_counting(exs, ["1"] * 5)[1][2] == pytest.approx((0 + 0 + 3 + 4 + 5) / 5)
    # an unreadable answer is never right, not even where the count is 0 (it counts as 0 for the error alone)
    table = metrics.score_counting([tasks.counting("a.wav", "Dog", n) for n in (0, 0, 2)], ["??", "never", "2"])
    assert table[0][1] == pytest.approx(2 / 3) and table[1][1] == 0.0


def test_ask_about_two_clips(trained):
    clips = sorted((trained / "synth" / "audio").glob("*.wav"))[:2]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "apt_min", "ask", "--audio", str(clips[0]), "--audio", str(clips[1]),
           "Which recording contains the bell?", *opts(trained)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip()  # an answer (untrained miniature: any text)
    bad = trained / "notes.wav"
    bad.write_text("not audio")
    cmd[cmd.index(str(clips[1]))] = str(bad)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and f"error: {bad}: not a readable audio file" in r.stderr and "Traceback" not in r.stderr
    assert "cannot use" not in r.stderr  # the reason names the file
    cmd[cmd.index(str(bad))] = str(trained / "missing.wav")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "missing.wav: no such audio file" in r.stderr and "Traceback" not in r.stderr


def test_ask_checks_its_question_and_files_before_loading_anything(trained, monkeypatch, capsys):
    """A clip that is not a file (missing, or a folder) is named before the model loads (a preset's LLM may be
    fetched first); an empty question, or one typed without quotes, is refused with what to do."""
    from apt_min import __main__, build

    monkeypatch.setattr(build, "load_apt", lambda *a, **k: pytest.fail("the model loaded"))
    clip = str(next((trained / "synth" / "audio").iterdir()))
    for given, said in (([trained / "missing.wav"], "missing.wav: no such audio file"),
                        ([clip, trained], f"{trained}: a folder, not an audio file")):
        assert __main__.main(["ask", *(x for p in given for x in ("--audio", str(p))), "What?", *opts(trained)]) == 2
        assert said in capsys.readouterr().err
    for words, said in ((["  "], "the question is empty"),
                        (["What", "sounds", "are", "here?"], "unexpected 'sounds are here?' after the question "
                                                             "'What'; give the whole question in quotes"),
                        (["Is", "it", "-3", "dB?"], "unexpected 'it -3 dB?' after the question 'Is'"),  # "-3": a word
                        (["Barking", "dogs?"], "unexpected 'dogs?' after the question 'Barking'")):  # one word over
        with pytest.raises(SystemExit):
            __main__.main(["ask", "--audio", clip, *words, *opts(trained)])
        assert said in capsys.readouterr().err
    for given in (["What?", "--lr", "1e-4"], ["--output_block", "-2", "What?"]):  # a setting's value without "="
        assert __main__.main(["ask", "--audio", clip, *given, *opts(trained)]) == 2
        err = capsys.readouterr().err
        assert "expected --key=value, got '--" in err and "quotes" not in err, err


def test_ask_puts_the_clips_in_the_order_given_before_the_question(trained, monkeypatch, tmp_path, capsys):
    """The clips in the order given, then the question, answered in at most --max-new-tokens tokens; a
    --checkpoint folder with no APT in it is named before anything loads."""
    from apt_min import __main__
    from apt_min.model import APT

    clips = [str(p) for p in sorted((trained / "synth" / "audio").glob("*.wav"))[:2]]
    asked = []
    monkeypatch.setattr(APT, "generate", lambda self, batch, feats, **kw: asked.append((batch, kw)))
    question = "Which recording contains the bell?"
    assert __main__.main(["ask", "--audio", clips[1], "--audio", clips[0], "--max-new-tokens", "7", question,
                          *opts(trained)]) == 0
    assert [batch for batch, _ in asked] == [[[("audio", clips[1]), ("audio", clips[0]), ("text", question)]]]
    assert asked[0][1]["max_new_tokens"] == 7
    assert __main__.main(["ask", "--audio", clips[0], "--checkpoint", str(tmp_path), question, *opts(trained)]) == 2
    assert f"error: {tmp_path}: no trained APT there" in capsys.readouterr().err and len(asked) == 1


def test_an_evaluated_apt_holds_its_frozen_parts_in_the_runs_precision(trained, tmp_path):
    """load_apt: the encoder and the LLM in the run's precision (bf16 here, asked for), the aligner trained in fp32
    kept so, everything in evaluation mode (dropout off), the feature cache keyed by the dtype the encoder computes
    in; a run whose encoder is gone is an error, not a new random encoder."""
    from apt_min.build import load_apt

    checkpoint = trained / "run" / "stage2" / "final"
    apt = load_apt(load_config("tiny", [*opts(trained), "--precision=bf16"]), checkpoint)
    assert {p.dtype for part in (apt.encoder, apt.llm) for p in part.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in apt.aligner.parameters()} == {torch.float32}
    assert not any(m.training for m in apt.modules())
    fp32 = load_apt(load_config("tiny", [*opts(trained), "--precision=fp32"]), checkpoint)
    assert {p.dtype for p in fp32.encoder.parameters()} == {torch.float32}
    assert apt.cache.setting == fp32.cache.setting + "|torch.bfloat16"
    run = copy_of(trained, tmp_path)
    (run / "run" / "encoder.safetensors").unlink()
    with pytest.raises(MissingFileError, match="encoder.safetensors: the tiny preset's encoder is not there"):
        load_apt(load_config("tiny", opts(run)), run / "run" / "stage2" / "final")
    assert not (run / "run" / "encoder.safetensors").exists()


def test_ask_streams_whole_characters(capsys):
    """A byte-level tokenizer spells one character over several tokens: the stream writes text as soon as it is
    whole, never a half character (U+FFFD), and the whole answer by the end; --max-new-tokens must be at least 1."""
    from apt_min.__main__ import TextStream, main

    answer = "Ça sonne comme un 🎹 — 日本語, twice."
    written = []
    stream = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), written.append)
    for byte in answer.encode():  # one token per byte
        stream(byte)
    stream.finish()
    assert "".join(written) == answer and not any("\ufffd" in w for w in written)
    assert len(written) > 10  # it streamed, a piece at a time
    written.clear()
    stream = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), written.append)
    for byte in "twice 日".encode()[:-1]:  # the answer cut short inside its last character (max-new-tokens)
        stream(byte)
    assert "".join(written) == "twice "
    stream.finish()  # what is left is written, as it decodes: not silently dropped
    assert "".join(written) == "twice \ufffd"
    written.clear()  # a U+FFFD the model itself chose stays where it is: only an unfinished end is held back
    stream = TextStream(lambda ids: "".join(map(chr, ids)), written.append)
    for ch in "a \ufffd b":
        stream(ord(ch))
    assert "".join(written) == "a \ufffd b"
    for bad in ("0", "-3", "many"):
        with pytest.raises(SystemExit):
            main(["ask", "--audio", "a.wav", "--max-new-tokens", bad, "What is it?"])
        assert f"--max-new-tokens: expected a whole number of at least 1, got '{bad}'" in capsys.readouterr().err
    from evaluate import main as evaluate_main  # the same for evaluate.py's counts, before anything loads

    for option, bad, least in [("--max-new-tokens", "0", 1), ("--num-beams", "0", 1), ("--episodes", "-1", 1),
                               ("--batch-size", "0", 1), ("--limit", "-5", 0)]:
        with pytest.raises(SystemExit):
            evaluate_main(["--task", "audiocaps", option, bad])
        assert f"{option}: expected a whole number of at least {least}, got '{bad}'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # training's setting, which evaluation would not read: said so
        evaluate_main(["--task", "audiocaps", "--batch_size=4", "--batch-size", "2", "--checkpoint", "nowhere"])
    assert ("--batch_size is training's batch size, which evaluation does not read; evaluation batches "
            "--batch-size=2 examples") in capsys.readouterr().err


def test_results_table_names_the_margin(trained, tmp_path, capsys, monkeypatch):
    from benchmarks import results_table

    assert results_table.margin(0.40, 0.20) == "yes" and results_table.margin(0.21, 0.20) == "barely"
    assert results_table.margin(0.20, 0.20) == "**no**" and results_table.margin(0.1, 0.0) == "yes"
    assert results_table.margin(0.60, 0.78, lower_is_better=True) == "yes"
    assert results_table.margin(0.77, 0.78, lower_is_better=True) == "barely"
    # a clear margin is at least a tenth of the baseline and at least 0.02
    assert results_table.margin(0.53, 0.50) == "barely" and results_table.margin(0.02, 0.0) == "yes"
    out = tmp_path / "eval"
    evaluate.main(["--task", "counting", "--limit", "4", "--batch-size", "4", "--out", str(out), *opts(trained)])
    monkeypatch.setattr(sys, "argv", ["results_table.py", str(out)])
    capsys.readouterr()  # only the table below
    results_table.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| task | metric | APT-tiny | baseline | clear margin?")
    count = [line for line in lines if line.startswith("| counting | accuracy |")]
    assert len(count) == 1 and count[0].split(" | ")[4] in ("yes", "barely", "**no**")
    scored = [line.split(" | ") for line in lines if line.startswith("| counting | clips scored |")]
    assert len(scored) == 1 and scored[0][2].isdigit() and scored[0][4] == ""  # a count, no margin
    # a protocol that rows share is named once, on the first of them (the JSON names it on every row)
    rows = [{"metric": m, "apt": 0.5, "baseline": 0.25, "protocol": p} for m, p in
            [("BLEU-1", "COCO"), ("BLEU-2", "COCO"), ("CIDEr-D", "COCO"), ("METEOR", "METEOR 1.5"), ("SPICE", "COCO")]]
    (tmp_path / "metrics_audiocaps.json").write_text(json.dumps(rows))
    monkeypatch.setattr(sys, "argv", ["results_table.py", str(tmp_path)])
    results_table.main()
    named = [line.split(" | ")[5].removesuffix("|").strip() for line in capsys.readouterr().out.splitlines()
             if line.startswith("| audiocaps")]
    assert named == ["COCO", "", "", "METEOR 1.5", "COCO"]
    # an error is better lower; a score that is not there (a few-shot setting not run) gets no verdict
    rows = [{"metric": "mean absolute error", "apt": 0.5, "baseline": 1.0, "protocol": "p"},
            {"metric": "accuracy", "apt": float("nan"), "baseline": 0.25, "protocol": "p"}]
    (tmp_path / "metrics_counting.json").write_text(json.dumps(rows))
    results_table.main()
    verdicts = [line.split(" | ")[4] for line in capsys.readouterr().out.splitlines() if line.startswith("| counting")]
    assert verdicts == ["yes", ""]


def test_each_metrics_file_says_what_made_it_and_a_mixed_folder_is_named(trained, tmp_path, capsys, monkeypatch):
    """made_{task}.json beside each metrics file: the checkpoint, data root and options; results_table.py says when
    the files of one folder come from different runs (here: another --limit), which would read as one model."""
    from benchmarks import results_table

    out = tmp_path / "eval"
    args = ["--batch-size", "4", "--episodes", "7", "--out", str(out), *opts(trained)]
    evaluate.main(["--task", "counting", "--limit", "4", *args])
    made = json.loads((out / "made_counting.json").read_text())
    assert made["checkpoint"] == str((trained / "run" / "stage2" / "final").resolve()) and made["limit"] == 4
    assert made["episodes"] == 7
    evaluate.main(["--task", "nlar", "--limit", "4", *args])
    assert results_table.runs_mixed(out) == ""  # one run's settings
    evaluate.main(["--task", "nlar", "--limit", "6", *args])
    monkeypatch.setattr(sys, "argv", ["results_table.py", str(out)])
    capsys.readouterr()
    results_table.main()
    assert f"note: the metrics in {out} come from different runs (limit: nlar 6, counting 4)" in capsys.readouterr().err
    evaluate.main(["--task", "nlar", "--limit", "4", "--num-beams", "2", *args])  # captioning's decoding differs
    assert results_table.runs_mixed(out).startswith("captioning: nlar {")
    (out / "made_counting.json").unlink()  # metrics from before evaluate.py wrote made files: nothing says
    assert results_table.runs_mixed(out) == "no made_{task}.json says how counting was made"


def test_another_apts_results_go_to_its_own_runs_eval_folder(trained, tmp_path, capsys, monkeypatch, caplog):
    """Without --out, evaluating a --checkpoint writes beside the run it belongs to, never over the results of the
    run_dir's own APT (a caption_ft APT of the paper's run wrote over its stage 2's): here stage 1's APT of a copied
    run, then a folder of its own."""
    from conftest import copy_of

    tmp = copy_of(trained, tmp_path)
    shutil.rmtree(tmp / "run" / "eval", ignore_errors=True)  # (other tests' results, copied with the run)
    cfg = load_config("tiny", [f"--run_dir={tmp / 'run'}"])
    final = tmp / "run" / "caption_ft-audiocaps" / "final"
    assert evaluate.default_out(cfg, final, given=True) == tmp / "run" / "eval-caption_ft-audiocaps"
    assert evaluate.default_out(cfg, tmp / "run" / "stage2" / "final", given=True) == tmp / "run" / "eval"
    assert evaluate.default_out(cfg, Path("weights/apt-small"), given=True) == tmp / "run" / "eval-apt-small"
    assert evaluate.default_out(cfg, Path("weights/apt-small"), given=False) == tmp / "run" / "eval"  # stands in
    with monkeypatch.context() as m:
        m.chdir(tmp / "run" / "stage1")
        assert evaluate.default_out(cfg, Path("final"), given=True) == (tmp / "run" / "eval-stage1").resolve()
    with monkeypatch.context() as m:  # a checkpoint given relative to where evaluate.py runs
        m.chdir(tmp)
        evaluate.main(["--task", "counting", "--limit", "2", "--batch-size", "4", *opts(tmp),
                       "--checkpoint=run/stage1/final"])
    assert f"written to {tmp / 'run' / 'eval-stage1'}/" in capsys.readouterr().out
    made = json.loads((tmp / "run" / "eval-stage1" / "made_counting.json").read_text())
    assert made["checkpoint"] == str((tmp / "run" / "stage1" / "final").resolve())
    assert not (tmp / "run" / "eval").exists()
    other = tmp / "mine"
    shutil.copytree(tmp / "run" / "stage2" / "final", other)
    with caplog.at_level("WARNING"):  # and an aligner size asked that the APT does not have is named
        evaluate.main(["--task", "counting", "--limit", "2", "--batch-size", "4", *opts(tmp), f"--checkpoint={other}",
                       "--num_queries=7"])
    assert (tmp / "run" / "eval-mine" / "metrics_counting.json").is_file() and not (tmp / "run" / "eval").exists()
    assert "the settings' num_queries=7 are not used (stage 0 sets an aligner's shape)" in caplog.text
    # without --checkpoint and with no APT of the run's own, the preset's release stands in for it: its results are
    # the run's own (eval), not a given folder's (eval-{release})
    from apt_min import release

    release.pack(tmp / "run", tmp / "packed")
    shutil.rmtree(tmp / "run" / "stage2")
    shutil.rmtree(tmp / "run" / "eval", ignore_errors=True)
    capsys.readouterr()
    evaluate.main(["--task", "counting", "--limit", "2", "--batch-size", "4", *opts(tmp),
                   f"--release={tmp / 'packed'}"])
    assert f"written to {tmp / 'run' / 'eval'}/" in capsys.readouterr().out
    assert not (tmp / "run" / "eval-packed").exists()


def test_the_stage0_aligner_is_the_evaluated_checkpoints_own(trained, tmp_path, caplog):
    """The paper's tagging protocol uses the stage-0 aligner of the run the checkpoint belongs to, wherever that run
    is, not the one under the configured run_dir: the one beside it, else the one its record leads back to
    (release.history: the run folder its apt.json names, a continuation's --start_from), else none."""
    run = trained / "run"
    mine = Aligner.load(run / "stage0" / "final")

    def same(found):
        return all(torch.equal(a, b) for a, b in zip(found.state_dict().values(), mine.state_dict().values()))

    assert same(evaluation.stage0_aligner(run / "stage2" / "final", "cpu"))
    assert not any(m.training for m in evaluation.stage0_aligner(run / "stage2" / "final", "cpu").modules())  # no
    # dropout in the tagging protocol's scores
    copy = tmp_path / "elsewhere" / "stage2" / "final"
    shutil.copytree(run / "stage2" / "final", copy)
    assert same(evaluation.stage0_aligner(copy, "cpu"))  # followed back to the run it was trained in
    meta = json.loads((copy / "apt.json").read_text())
    meta["config"]["run_dir"] = str(tmp_path / "gone")
    (copy / "apt.json").write_text(json.dumps(meta))
    assert evaluation.stage0_aligner(copy, "cpu") is None
    shutil.copytree(run / "stage0" / "final", tmp_path / "elsewhere" / "stage0" / "final")
    with torch.no_grad():
        next(mine.parameters()).add_(1.0)  # told apart from the chain's: the one beside the checkpoint is read
    mine.save(tmp_path / "elsewhere" / "stage0" / "final")
    assert same(evaluation.stage0_aligner(copy, "cpu"))
    # followed back to a folder that holds another stage 0 now (a user's own runs/small beside a continuation of
    # the release): its heads differ from those the APT kept, so it is not read
    chain, other = tmp_path / "chain", tmp_path / "other" / "stage2" / "final"
    for stage, final in (("1", chain / "stage1" / "final"), ("2", chain / "stage2" / "final"), ("2", other)):
        shutil.copytree(run / f"stage{stage}" / "final", final)
        meta = json.loads((final / "apt.json").read_text())
        meta["config"]["run_dir"] = str(chain)  # other: a copy of the chain's result, trained (it says) in chain
        (final / "apt.json").write_text(json.dumps(meta))
    mine = Aligner.load(run / "stage0" / "final")
    mine.save(chain / "stage0" / "final")  # the one it was trained from
    assert same(evaluation.stage0_aligner(other, "cpu"))
    with torch.no_grad():
        mine.text_proj.weight.add_(1.0)
    mine.save(chain / "stage0" / "final")
    caplog.clear()
    with caplog.at_level("WARNING", logger="apt_min"):
        assert evaluation.stage0_aligner(other, "cpu") is None  # and says so: the paper's protocol is not run
    assert "is not the one this APT was trained from" in caplog.text and str(chain / "stage0" / "final") in caplog.text
    mine.save(tmp_path / "elsewhere" / "stage0" / "final")  # and beside: stage 0 run again there since
    assert evaluation.stage0_aligner(copy, "cpu") is None
    # a checkpoint without stage-0 heads (a release, or its continuation) is no aligner's, however it was reached
    own = Aligner.load(run / "stage0" / "final")
    assert evaluation.same_stage0_heads(run / "stage2" / "final", own)
    headless = tmp_path / "headless"
    headless.mkdir()
    kept = load_file(str(run / "stage2" / "final" / "apt.safetensors"))
    save_file({k: v for k, v in kept.items() if not k.startswith(tuple(f"aligner.{h}" for h in STAGE0_HEADS))},
              str(headless / "apt.safetensors"))
    assert not evaluation.same_stage0_heads(headless, own)
    # a release (SHA256SUMS beside it) stands alone: its record, which names the run it was cut from, is not followed
    # to that run's stage-0 aligner, which could only be refused for the heads the release dropped, with a warning
    shutil.copy(run / "stage2" / "final" / "apt.json", headless)
    (headless / "SHA256SUMS").write_text("")
    caplog.clear()
    with caplog.at_level("WARNING", logger="apt_min"):
        assert evaluation.stage0_aligner(headless, "cpu") is None
    assert not caplog.records


def test_fewshot_pools_are_the_novel_classes_and_held_out_clips_of_the_training_classes(trained):
    from apt_min import synth

    cfg = load_config("tiny", opts(trained))
    pools = dict(evaluation.fewshot_pools(cfg))
    assert pools["novel"] and set(pools["novel"]) <= {c.name for c in synth.NOVEL_CLASSES}
    assert pools["training"] and {k.lower() for k in pools["training"]} <= {c.name for c in synth.TRAIN_CLASSES}
    trained_on = {a for clips in data.single_label_pool(cfg.data_root, "train").values() for a in clips}
    assert not trained_on & {a for clips in pools["training"].values() for a in clips}  # held out


def test_a_stage0_aligner_that_reads_the_llms_words_gets_them_back(tmp_path):
    """An aligner trained with aligner_words=llm saves no word table (it reads the frozen LLM's); stage0_aligner
    hands it the LLM's table again, so its text branch embeds as it did in training."""
    from apt_min.aligner import AlignerConfig

    torch.manual_seed(0)
    table = torch.randn(40, 12)
    trained = Aligner(AlignerConfig(vocab_size=40, audio_dim=8, hidden_size=16, num_layers=1, num_heads=2,
                                    intermediate_size=32, num_queries=2, dropout=0.0, llm_words=12)).eval()
    trained.attach_llm_words(table)
    trained.save(tmp_path / "run" / "stage0" / "final")
    from safetensors.torch import save_file  # the APT it began: the stage-0 heads as stage 0 left them

    (tmp_path / "run" / "stage2" / "final").mkdir(parents=True)
    save_file({f"aligner.{k}": v.detach().clone() for k, v in trained.named_parameters()
               if k.startswith(("text_proj", "audio_proj", "temp"))}, tmp_path / "run" / "stage2" / "final" /
              "apt.safetensors")
    ids = torch.tensor([[1, 5, 9, 2]])
    found = evaluation.stage0_aligner(tmp_path / "run" / "stage2" / "final", "cpu", table)
    with torch.no_grad():
        torch.testing.assert_close(found.encode_text(ids), trained.encode_text(ids))
        with pytest.raises(RuntimeError, match="call attach_llm_words first"):
            evaluation.stage0_aligner(tmp_path / "run" / "stage2" / "final", "cpu").encode_text(ids)


def test_few_shot_encodes_its_episodes_clips_strictly():
    """The episodes' clips passed the readability check before: one that fails when the setting encodes them is an
    error naming it (strict), not a gap in the features found later as a KeyError."""
    pool = {f"class{i}": [f"c{i}_{j}.wav" for j in range(2)] for i in range(4)}
    rng = random.Random(0)
    episodes = [data.fewshot_episode(pool, 4, 1, rng) for _ in range(2)]
    for ep in episodes:
        ep.target["setting"] = ("novel", 4, 1)
    asked = []

    def encode_clips(paths, strict):
        asked.append(strict)
        return {p: torch.ones(1, 2, 3) for p in paths}, []

    apt = SimpleNamespace(encode_clips=encode_clips,
                          answer_and_rank=lambda segments, answers, feats, n: ("x", torch.zeros(len(answers))))
    rows, _, _ = evaluation.eval_fewshot(apt, None, "esc50", episodes, SimpleNamespace(pools=[("novel", pool)]))
    assert asked == [True] and "accuracy 4-way 1-shot" in [r[0] for r in rows]


@pytest.mark.parametrize("error, says", [(RuntimeError("e" * 300), "e" * 120), (BrokenPipeError(), "BrokenPipeError")])
def test_a_failed_java_run_says_why_in_a_line_of_120_characters_at_most(monkeypatch, error, says):
    """METEOR's or SPICE's Java process failing leaves a NaN row whose protocol gives the start of the error, cut at
    120 characters (its Java traceback would fill the table), or its type where it has no message; the classes are
    stood in for, so no Java is needed."""
    import pycocoevalcap.meteor.meteor as meteor
    import pycocoevalcap.spice.spice as spice

    class Fails:
        def compute_score(self, gts, res):
            raise error

    class Scores:
        def compute_score(self, gts, res):
            return 0.25, None

    monkeypatch.setattr(evaluation, "java_missing", lambda: None)
    monkeypatch.setattr(evaluation, "spice_missing", lambda: None)
    for failing in ("METEOR", "SPICE"):
        monkeypatch.setattr(meteor, "Meteor", Fails if failing == "METEOR" else Scores)
        monkeypatch.setattr(spice, "Spice", Fails if failing == "SPICE" else Scores)
        rows = {name: (value, protocol) for name, value, _, protocol in evaluation.java_metrics([["a dog barks"]],
                                                                                               ["a dog"])}
        value, protocol = rows.pop(failing)
        assert np.isnan(value) and protocol == f"{failing} unavailable: {says}"
        assert [value for value, _ in rows.values()] == [0.25]  # the other one scored


def test_meteor_is_given_every_reference_of_each_clip(monkeypatch):
    """METEOR scores each caption against all of its clip's references (as BLEU, ROUGE-L and CIDEr-D do), tokenised
    as they read them; here its Java process is stood in for, so the test needs no Java."""
    import pycocoevalcap.meteor.meteor as meteor

    given = {}

    class Meteor:
        def compute_score(self, gts, res):
            given.update(gts=gts, res=res)
            return 0.25, None

    monkeypatch.setattr(meteor, "Meteor", Meteor)
    monkeypatch.setattr(evaluation, "java_missing", lambda: None)
    monkeypatch.setattr(evaluation, "spice_missing", lambda: "absent here")
    refs = [["A dog barks twice.", "The dog is barking!"], ["Rain falls on a roof."]]
    rows = evaluation.java_metrics(refs, ["A dog, barks.", "Rain."])
    assert rows[0][:2] == ("METEOR", 0.25)
    assert given == {"gts": {0: ["a dog barks twice", "the dog is barking"], 1: ["rain falls on a roof"]},
                     "res": {0: ["a dog barks"], 1: ["rain"]}}


def test_a_caption_set_is_scored_against_its_own_training_captions_and_every_reference(monkeypatch, tmp_path):
    """eval_captioning takes its fixed-caption baseline from the scored set's own training captions (Clotho's for
    Clotho, not AudioCaps') and hands METEOR and SPICE every reference of each clip, as BLEU, ROUGE-L and CIDEr-D get
    them; the model, generation and Java are stood in for."""
    read, given = [], []
    monkeypatch.setattr(data, "caption_texts", lambda root, split, source="audiocaps", layout=None:
                        read.append((Path(root), split, source)) or ["a dog barks", "rain falls", "a dog barks"])
    monkeypatch.setattr(evaluation, "generate", lambda apt, examples, *a, **k: ["a dog barks twice", "rain"])
    monkeypatch.setattr(evaluation, "java_metrics", lambda refs, outputs: given.append((refs, outputs)) or [])
    refs = [["a dog barks twice", "the dog is barking"], ["rain falls on a roof", "it rains", "water drips"]]
    examples = [SimpleNamespace(target={"references": r}) for r in refs]
    rows, outputs, truth = evaluation.eval_captioning(
        None, SimpleNamespace(data_root=tmp_path), "clotho", examples, SimpleNamespace(caption={}, batch_size=2))
    assert read == [(tmp_path, "train", "clotho")]
    assert given == [(refs, ["a dog barks twice", "rain"])]
    assert outputs == ["a dog barks twice", "rain"] and truth == ["a dog barks twice", "rain falls on a roof"]
    got = {metric: (value, base) for metric, value, base, _ in rows}
    assert got["BLEU-1"] == (metrics.bleu(refs, outputs)[0], metrics.bleu(refs, ["a dog barks"] * 2)[0])
    assert got["CIDEr-D"][1] == metrics.cider_d(refs, ["a dog barks"] * 2) and np.isnan(got["SPIDEr"][0])


def test_meteor_reads_captions_tokenised_as_the_other_caption_metrics():
    """METEOR is given the tokens BLEU, ROUGE-L and CIDEr-D read (lower case, no punctuation): a caption that differs
    from its reference only in case and punctuation scores as the reference itself (given as written, METEOR
    scores it 0.50)."""
    if shutil.which("java") is None:
        pytest.skip("METEOR runs in Java, which is not installed here")
    refs = [["a dog barks twice", "the dog is barking"], ["rain falls on a roof"]]
    written = evaluation.java_metrics(refs, ["A dog, barks twice!", "Rain falls on a roof."])
    assert written[0][0] == "METEOR" and written[0][1] == evaluation.java_metrics(refs, [r[0] for r in refs])[0][1]


def test_each_task_decodes_as_documented(trained, monkeypatch):
    """Greedy decoding with room for what each task answers (40 new tokens for tagging's label lists, 96 for SED's time
    spans, 30 for TER's labels, 12 for a short answer); captioning as --num-beams and the others set it (the public
    APT code's beam search by default)."""
    asked = {}

    def scripted(apt, examples, options, batch_size=16, desc=""):
        asked[desc] = options
        return [ex.answer for ex in examples]

    monkeypatch.setattr(evaluation, "generate", scripted)
    monkeypatch.setattr(evaluation, "java_metrics", lambda refs, outputs: [])
    apt = SimpleNamespace(encode_clips=lambda paths, strict: ({}, []),  # tagging's likelihood protocol, scripted
                          choice_logprob=lambda segments, answers, feats: torch.zeros(len(answers)))
    cfg = load_config("tiny", opts(trained))
    beams = evaluation.Options(caption=evaluation.CAPTION | {"num_beams": 3})
    for name in ("audioset", "audiocaps", "clotho_aqa", "nlar", "sed", "ter", "counting"):
        examples = evaluation.examples_for(name, cfg, evaluation.Options(limit=3))
        evaluation.EVALUATORS[EVALUATIONS[name][0]](apt, cfg, name, examples, beams)
    assert asked == {"tagging": {"max_new_tokens": 40}, "sed": {"max_new_tokens": 96}, "ter": {"max_new_tokens": 30},
                     "clotho_aqa": {"max_new_tokens": 12}, "nlar": {"max_new_tokens": 12},
                     "counting": {"max_new_tokens": 12},
                     "captioning (audiocaps)": {"max_new_tokens": 40, "num_beams": 3, "repetition_penalty": 1.5}}
    assert evaluation.Options().caption == {"max_new_tokens": 40, "num_beams": 5, "repetition_penalty": 1.5}


def test_sed_baseline_answers_each_clip_whole(tmp_path):
    """SED's baseline answers every query with its whole clip, 0 s to the clip's own duration read from its file
    (not the latest reference end of the test set, which would give a short clip a span beyond its end)."""
    import soundfile as sf

    sed = []
    for name, seconds, event in (("long", 10.0, (0.5, 9.5)), ("short", 4.0, (0.0, 4.0))):
        sf.write(tmp_path / f"{name}.wav", np.zeros(int(seconds * 16000), np.float32), 16000)
        sed.append(tasks.Example("sed", [("audio", str(tmp_path / f"{name}.wav")), ("text", "When is the bell?")],
                                 "", {"segments": [event]}))
    apt = SimpleNamespace(generate=lambda batch, **options: ["" for _ in batch])
    (row,), _, _ = evaluation.eval_sed(apt, None, "sed", sed, evaluation.Options())
    assert row[:3] == ("segment F1", 0.0, 1.0)  # both clips' whole spans match (IoU 0.9 and 1)
    assert metrics.score_sed(sed, ["", ""])[0][2] == 0.5  # [0, 9.5] for the 4 s clip would not



def test_a_few_shot_setting_left_without_episodes_says_why():
    """A setting whose pool has too few classes is 'not run' for that reason; one whose episodes were all dropped
    because a clip could not be decoded says that instead (not that the pool is too small)."""
    pool = {f"class{i}": [f"c{i}_{j}.wav" for j in range(3)] for i in range(5)}  # 5 classes of 3 clips
    rows, _, _ = evaluation.eval_fewshot(None, None, "esc50", [], SimpleNamespace(pools=[("novel", pool)]))
    why = {metric: protocol for metric, _, _, protocol in rows}
    assert why["accuracy 4-way 1-shot"] == ("not run: every episode held a clip that could not be decoded "
                                            "(missing_esc50.txt lists them)")
    assert why["accuracy 5-way 5-shot"] == "not run: needs 5 classes with more than 5 clips; this pool has 0"
    assert {m: b for m, _, b, _ in rows}["accuracy 5-way 5-shot"] == 1 / 5  # chance stays beside the row not run
    assert {m: b for m, _, b, _ in rows}["accuracy 4-way 1-shot"] == 1 / 4
    four = {f"class{i}": [f"c{i}_{j}.wav" for j in range(2)] for i in range(4)}  # just enough for 4-way 1-shot
    rows, _, _ = evaluation.eval_fewshot(None, None, "esc50", [], SimpleNamespace(pools=[("novel", four)]))
    assert {m: p for m, _, _, p in rows}["accuracy 4-way 1-shot"].startswith("not run: every episode held a clip")
    three = {f"class{i}": [f"c{i}_{j}.wav" for j in range(3)] for i in range(3)}  # 3 classes with more than 1 clip
    rows, _, _ = evaluation.eval_fewshot(None, None, "esc50", [], SimpleNamespace(pools=[("novel", three)]))
    assert {m: p for m, _, _, p in rows}["accuracy 4-way 1-shot"] == ("not run: needs 4 classes with more than 1 "
                                                                     "clips; this pool has 3")


def test_temporal_retrieval_reads_answers_against_the_windows_own_labels_too(tmp_path):
    """A class that mid_to_display_name.tsv does not name keeps its mid as its label (data.py): an answer naming it
    is read against the windows' own labels as well as the names file, and is right."""
    (tmp_path / "audioset").mkdir()
    (tmp_path / "audioset" / "mid_to_display_name.tsv").write_text("/m/0bt9lr\tDog\n/m/07yv9\tVehicle\n")
    ex = tasks.ter("a.wav", [("Dog", 1.0, 2.0), ("/m/0unnamed", 1.5, 2.5)], 1.0, 2.0)
    apt = SimpleNamespace(generate=lambda batch, **options: ["dog, /m/0unnamed"] * len(batch))
    [(metric, accuracy, _, _)], _, _ = evaluation.eval_ter(apt, SimpleNamespace(data_root=str(tmp_path)), "ter", [ex],
                                                           evaluation.Options())
    assert (metric, accuracy) == ("accuracy", 1.0)


def test_the_training_classes_episodes_are_drawn_from_their_own_fixed_seed(monkeypatch):
    """Held-out clips of the training classes give fixed episodes too, from a seed of their own
    ("esc50/{ways}/{shots}/training"), not the novel classes' draws repeated on another pool."""
    pool = {f"class{i}": [f"c{i}_{j}.wav" for j in range(7)] for i in range(12)}
    monkeypatch.setattr(evaluation, "fewshot_pools", lambda cfg, strict, coverage: [("novel", pool),
                                                                                    ("training", pool)])
    episodes = evaluation.examples_for("esc50", SimpleNamespace(fewshot_layout="paper"), evaluation.Options(episodes=2))
    for n_way, k_shot in evaluation.FEWSHOT_SETTINGS:
        for classes, suffix in (("novel", ""), ("training", "/training")):
            rng = random.Random(f"esc50/{n_way}/{k_shot}{suffix}")
            want = [data.fewshot_episode(pool, n_way, k_shot, rng).segments for _ in range(2)]
            assert [ep.segments for ep in episodes if ep.target["setting"] == (classes, n_way, k_shot)] == want


def test_a_clip_of_several_questions_is_checked_once():
    """The readability check decodes each distinct clip once, in the order first listed (AVQA asks several
    questions of a video), chunk by chunk, and reports the ones that fail by path."""
    asked = []

    def encode_clips(paths, strict):
        asked.append(list(paths))
        return {}, [(p, "not audio") for p in paths if p.startswith("bad")]

    apt = SimpleNamespace(cache=True, encode_clips=encode_clips)
    assert evaluation.unreadable(apt, ["a.wav", "bad.wav", "a.wav", "b.wav", "bad.wav"]) == {"bad.wav": "not audio"}
    assert asked == [["a.wav", "bad.wav", "b.wav"]]
    asked.clear()  # in chunks, every clip in one of them
    clips = ["a.wav", "b.wav", "c.wav", "bad1.wav", "d.wav", "bad2.wav", "e.wav"]
    assert evaluation.unreadable(apt, clips, chunk=3) == {"bad1.wav": "not audio", "bad2.wav": "not audio"}
    assert asked == [clips[:3], clips[3:6], clips[6:]]
    taken = []  # without a feature cache, decoded only: by the APT's decoding threads where it has them
    ahead = SimpleNamespace(take=lambda path: taken.append(path) or SimpleNamespace(result=lambda: torch.zeros(1)))
    apt = SimpleNamespace(cache=None, encoder=SimpleNamespace(config=None), read_ahead=ahead)
    assert evaluation.unreadable(apt, ["a.wav", "b.wav", "a.wav"]) == {} and taken == ["a.wav", "b.wav"]


def test_short_answers_are_scored_and_shown_against_the_normalised_answer():
    """Clotho-AQA and NLAR write, as each prediction's reference, the answer exact match compares with: the
    annotators' most frequent answer in digits, the NLAR answer without its article and period."""
    examples = [tasks.aqa("a.wav", "How many rings?", ["two", "2", "three"]),
                tasks.nlar("a.wav", "b.wav", "Which is louder?", " The first. ")]
    apt = SimpleNamespace(generate=lambda batch, **options: ["2", "first"][:len(batch)])
    _, outputs, refs = evaluation.eval_exact(apt, None, "clotho_aqa", examples[:1], evaluation.Options())
    assert outputs == ["2"] and refs == ["2"]
    _, _, refs = evaluation.eval_exact(apt, None, "nlar", examples[1:], evaluation.Options())
    assert refs == ["first"]


def test_ask_runs_the_tiny_preset_on_the_gpu_there_is_and_writes_a_whole_line(tmp_path, monkeypatch, capsys):
    """ask with the model stubbed: --audio is required and only `ask` is a command (else the usage); the tiny
    preset by default (config: the default preset), on CUDA where there is a card; the checkpoint's description is
    read before the model loads; the streamed answer then a newline; clips the model cannot read are each named, and
    nothing is generated; an empty question and a setting without "=" are refused before anything loads."""
    from apt_min import __main__, build, release
    from apt_min.model import APT

    clip = tmp_path / "a.wav"
    clip.write_bytes(b"RIFF")
    (tmp_path / "apt.json").write_text("{}")
    did, bad = [], []

    class Stub:
        tokenizer = SimpleNamespace(decode=lambda ids: bytes(ids).decode("utf-8", errors="replace"))

        def encode_clips(self, paths):
            return {}, [(p, f"{p}: unreadable here") for p in bad]

        def generate(self, batch, feats, max_new_tokens, streamer):
            did.append("generate")
            for byte in "é ok".encode():
                streamer(torch.tensor([byte]))

    monkeypatch.setattr(release, "resolve_checkpoint", lambda cfg, given: tmp_path)
    monkeypatch.setattr(APT, "read_meta", lambda folder: did.append(("meta", folder)))
    monkeypatch.setattr(build, "load_apt", lambda cfg, checkpoint, device: did.append((cfg.preset, device)) or Stub())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert __main__.main(["ask", "--audio", str(clip), "What?"]) == 0
    assert did == [("meta", tmp_path), ("tiny", "cuda"), "generate"]
    assert capsys.readouterr().out == "é ok\n"
    bad[:] = [str(clip), str(clip)]
    assert __main__.main(["ask", "--audio", str(clip), "--audio", str(clip), "What?"]) == 2
    assert capsys.readouterr().err.count(f"error: {clip}: unreadable here") == 2 and did.count("generate") == 1
    for argv, said in ((["ask", "What?"], "the following arguments are required: --audio"),
                       (["ask", "--audio", str(clip), " "], "the question is empty")):
        with pytest.raises(SystemExit):
            __main__.main(argv)
        assert said in capsys.readouterr().err
    assert __main__.main(["ask", "--audio", str(clip), "What?", "--lr", "1e-4"]) == 2
    assert "expected --key=value, got '--lr'" in capsys.readouterr().err
    for argv in ([], ["tell", "--audio", str(clip), "What?"]):
        assert __main__.main(argv) == 2
        assert "python -m apt_min ask --audio a.wav" in capsys.readouterr().err
    assert len(did) == 5  # nothing more loaded after the run with unreadable clips


def test_ask_answers_in_at_most_40_tokens_by_default_and_writes_an_answer_cut_short(tmp_path, monkeypatch, capsys):
    """ask with the model stubbed: without --max-new-tokens an answer is at most 40 tokens long; an answer whose
    last character is cut short (the tokens ran out inside it) is still written out, as it decodes, then the
    newline."""
    from apt_min import __main__, build, release
    from apt_min.model import APT

    clip = tmp_path / "a.wav"
    clip.write_bytes(b"RIFF")
    asked = []

    class Stub:
        tokenizer = SimpleNamespace(decode=lambda ids: bytes(ids).decode("utf-8", errors="replace"))

        def encode_clips(self, paths):
            return {}, []

        def generate(self, batch, feats, max_new_tokens, streamer):
            asked.append(max_new_tokens)
            for byte in "ok 日".encode()[:-1]:
                streamer(torch.tensor([byte]))

    monkeypatch.setattr(release, "resolve_checkpoint", lambda cfg, given: tmp_path)
    (tmp_path / "apt.json").write_text("{}")
    monkeypatch.setattr(APT, "read_meta", lambda folder: None)
    monkeypatch.setattr(build, "load_apt", lambda cfg, checkpoint, device: Stub())
    assert __main__.main(["ask", "--audio", str(clip), "What?"]) == 0
    assert asked == [40] and capsys.readouterr().out == "ok \ufffd\n"


def test_ask_says_a_users_mistake_in_one_line_and_lets_a_bug_show_its_traceback(monkeypatch, capsys):
    """main: a UserError from anywhere in ask (a missing file, say) is one line on stderr and exit status 2; any other
    error (a ValueError of the code's own) keeps its traceback."""
    from apt_min import __main__
    from apt_min.errors import MissingFileError

    def fails(argv):
        raise raised

    monkeypatch.setattr(__main__, "ask", fails)
    raised = MissingFileError("x.wav: no such audio file")
    assert __main__.main(["ask"]) == 2 and capsys.readouterr().err == "error: x.wav: no such audio file\n"
    raised = ValueError("a bug")
    with pytest.raises(ValueError, match="a bug"):
        __main__.main(["ask"])

"""evaluate.py on every task with a briefly trained miniature APT, and `python -m apt_min ask`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_of, opts

import evaluate
import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    tmp = copy_of(prepared, tmp_path_factory.mktemp("eval"))
    for stage in ("1", "2"):
        train.main(["--stage", stage, *opts(tmp)])
    return tmp


def test_every_task_writes_predictions_and_metrics(trained, capsys):
    evaluate.main(["--task", "all", "--limit", "6", "--episodes", "3", "--batch-size", "4", *opts(trained)])
    table = capsys.readouterr().out
    out = trained / "run" / "eval"
    for task in evaluate.TASKS:
        rows = json.loads((out / f"metrics_{task}.json").read_text())
        assert rows and all(r["protocol"] is not None for r in rows), task
        preds = [json.loads(line) for line in (out / f"predictions_{task}.jsonl").read_text().splitlines()]
        assert preds and all({"output", "reference"} <= p.keys() for p in preds), task
        assert task in table
    tagging = {r["metric"] + r["protocol"][:12]: r for r in json.loads((out / "metrics_audioset.json").read_text())}
    assert any("paper protoc" in k for k in tagging) and any("LLM likeliho" in k for k in tagging)
    assert all(0 <= r["apt"] <= 1 for r in tagging.values())
    few = json.loads((out / "metrics_esc50.json").read_text())
    settings = ["accuracy 5-way 5-shot", "accuracy 12-way 5-shot", "accuracy 4-way 1-shot"]
    assert [r["metric"] for r in few] == [m for s in settings for m in (s, f"{s}, ranked")]
    assert [r["baseline"] for r in few] == pytest.approx([1 / 5] * 2 + [1 / 12] * 2 + [1 / 4] * 2)
    assert all(0 <= r["apt"] <= 1 for r in few)
    shown = [json.loads(line) for line in (out / "predictions_esc50.jsonl").read_text().splitlines()]
    assert [len(p["audio"]) for p in shown] == [26] * 3 + [61] * 3 + [5] * 3  # N * K supports and the query
    assert all(p["ranked"] in p["prompt"] and p["reference"] in p["prompt"] for p in shown)
    caps = {r["metric"]: r for r in json.loads((out / "metrics_audiocaps.json").read_text())}
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D", "METEOR", "SPICE"} <= caps.keys()
    assert "unavailable" in caps["SPICE"]["protocol"] or caps["SPICE"]["apt"] >= 0  # absent jars are said so


def test_missing_checkpoint_is_explained(tmp_path):
    with pytest.raises(SystemExit, match="no trained APT there"):
        evaluate.main(["--task", "nlar", f"--run_dir={tmp_path}"])


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
    assert r.returncode == 2 and f"cannot use {bad}" in r.stderr and "Traceback" not in r.stderr
    cmd[cmd.index(str(bad))] = str(trained / "missing.wav")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "missing.wav: no such audio file" in r.stderr and "Traceback" not in r.stderr


def test_results_table_names_the_margin(trained, capsys, monkeypatch):
    from benchmarks import results_table

    assert results_table.margin(0.40, 0.20) == "yes" and results_table.margin(0.21, 0.20) == "barely"
    assert results_table.margin(0.20, 0.20) == "**no**" and results_table.margin(0.1, 0.0) == "yes"
    assert results_table.margin(0.60, 0.78, lower_is_better=True) == "yes"
    assert results_table.margin(0.77, 0.78, lower_is_better=True) == "barely"
    out = trained / "run" / "eval"
    if not (out / "metrics_count.json").is_file():
        evaluate.main(["--task", "count", "--limit", "4", "--batch-size", "4", *opts(trained)])
    monkeypatch.setattr(sys, "argv", ["results_table.py", str(out)])
    results_table.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| task | metric | APT-tiny | baseline | clear margin?")
    count = [line for line in lines if line.startswith("| count | accuracy |")]
    assert len(count) == 1 and count[0].split(" | ")[4] in ("yes", "barely", "**no**")

"""The probes and sweeps whose figures the README and benchmarks/README.md report (the stand-in LLM on text, few-shot
matching, counting without the LLM, read-outs along the prompt's path, the query count, the shared prefix): each run
end to end on the miniature chain, its printed figures checked against what they are said to be, and the parts
that compute something of their own against inputs whose answer is known."""

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import copy_of, opts
from helpers import run_script as run

from apt_min import data, metrics, synth, tasks


def apt_metric(run_dir: Path, task: str, protocol_start: str) -> dict:
    """The row of evaluate.py's metrics_{task}.json whose protocol starts so (the first, for "")."""
    rows = json.loads((run_dir / "eval" / f"metrics_{task}.json").read_text())
    return next(r for r in rows if r["protocol"].startswith(protocol_start))


# ------------------------------------------------------------------------------------------------ probe_fewshot.py


def test_probe_fewshot_says_which_pool_is_too_small(trained):
    """The miniature's test split holds one single-label clip a class: lines (1) and (2) say why they have no
    episodes, line (3) (the novel classes, seven clips each) is scored; chance is a quarter."""
    out = run("benchmarks/probe_fewshot.py", *opts(trained), "--episodes", "4")
    assert "4-way 1-shot, 4 episodes each; chance 0.250" in out
    for line in ("(1) training classes", "(2) the same, a made-up name"):
        assert re.search(rf"^     -      -  {re.escape(line)}.*: none \(a 4-way 1-shot episode needs 4 classes with "
                         r"more than 1 clips; this pool has 0\)$", out, re.M), out
    named, ranked = re.search(r"^ *([\d.]+) +([\d.]+)  \(3\) the novel classes", out, re.M).groups()
    assert float(named) in (0, 0.25, 0.5, 0.75, 1) and float(ranked) in (0, 0.25, 0.5, 0.75, 1), out


def test_probe_fewshot_asks_each_pool_as_its_line_says(trained, monkeypatch, capsys):
    """(1) held-out clips of the training classes under their names, (2) the same under a made-up name per class
    and episode, (3) the novel classes; each line's two figures are its episodes' share of answers naming the query's
    label and of labels ranked first that are it. (The held-out pool is the training split's here: the miniature's
    test split is too small for an episode.)"""
    from benchmarks import probe_fewshot

    root = trained / "synth"
    held_out, novel = data.single_label_pool(root, "train"), data.esc50_pool(root)
    monkeypatch.setattr(data, "single_label_pool", lambda r, split, strict: held_out)
    said = {}

    def answer_and_rank(apt, episode, feats):
        said[id(episode)] = real(apt, episode, feats)
        return said[id(episode)]

    real = probe_fewshot.answer_and_rank
    monkeypatch.setattr(probe_fewshot, "answer_and_rank", answer_and_rank)
    asked, score = [], probe_fewshot.score
    monkeypatch.setattr(probe_fewshot, "score", lambda apt, episodes: asked.append(episodes) or score(apt, episodes))
    monkeypatch.setattr(sys, "argv", ["probe_fewshot.py", *opts(trained), "--episodes", "6"])
    probe_fewshot.main()
    out = capsys.readouterr().out
    assert [len(episodes) for episodes in asked] == [6, 6, 6]
    class_of = {clip: label for pool in (held_out, novel) for label, clips in pool.items() for clip in clips}
    for episodes, pool, renamed, line in zip(asked, (held_out, held_out, novel), (False, True, False),
                                             ("(1)", "(2)", "(3)")):
        for ep in episodes:
            support, query = ep.target["support"], ep.target["query"]
            assert len(support) == 4 and {class_of[c] for c, _ in support} <= set(pool) and query in class_of
            assert query not in {c for c, _ in support}
            answer_clip = next(c for c, label in support if label == ep.target["label"])
            assert class_of[answer_clip] == class_of[query]  # the answer is the query's class, under its shown name
            if renamed:  # one made-up name per class, none a class of the pool
                assert all(label not in pool and label.lower() not in {k.lower() for k in pool}
                           for _, label in support)
            else:
                assert all(label == class_of[c] for c, label in support)
        named = np.mean([metrics.named_label(said[id(ep)], ep) == ep.target["label"] for ep in episodes])
        ranked = np.mean([ep.target["ranked"] == ep.target["label"] for ep in episodes])
        assert re.search(rf"^ *{named:.3f} +{ranked:.3f}  {re.escape(line)}", out, re.M), out


# ----------------------------------------------------------------------------------------------- probe_counting.py


def test_probe_counting_prints_each_readout_beside_the_majority_and_the_apts_answer(trained, tmp_path):
    """Every line of the table is the mean of its last three evaluations (four a run, one each --steps / 4 steps);
    "always N" is the most frequent training count's share of the test questions; APT's own line is evaluate.py's
    counting accuracy, where the run has one. Settings of apt_min/config.py reach the probe as --key=value."""
    import evaluate

    tmp = copy_of(trained, tmp_path)
    evaluate.main(["--task", "counting", *opts(tmp)])
    out = run("benchmarks/probe_counting.py", *opts(tmp), "--steps", "4", "--batch", "8")
    curves = {name: json.loads(accs) for name, accs in re.findall(r"^(\(\w\) .*): test accuracy (\[.*\])$", out, re.M)}
    assert len(curves) == 4 and all(len(accs) == 4 and all(0 <= a <= 1 for a in accs) for accs in curves.values())
    table = dict((name, float(acc)) for acc, name in re.findall(r"^ *([\d.]+)  (.*)$", out.split("accuracy  what")[1],
                                                                re.M))
    for name, accs in curves.items():
        assert table[name] == pytest.approx(np.mean(accs[-3:]), abs=5e-4), name
    root = tmp / "synth"
    train = Counter(ex.target["count"] for ex in data.examples("counting", root, "train"))
    test = [ex.target["count"] for ex in data.examples("counting", root, "test")]
    common = train.most_common(1)[0][0]
    assert table[f"always {common} (the most frequent training answer)"] == pytest.approx(
        test.count(common) / len(test), abs=5e-4)
    assert f"counting, {len(test)} test questions of the synthetic benchmark ({sum(train.values())} to train)" in out
    apt = apt_metric(tmp / "run", "counting", "")["apt"]
    assert table["APT-tiny, the LLM's answer (evaluate.py --task counting)"] == pytest.approx(apt, abs=5e-4)
    # fewer steps than evaluations is refused by name, not a division by zero
    assert "argument --steps: expected a whole number of at least 4, got '3'" in run(
        "benchmarks/probe_counting.py", *opts(tmp), "--steps", "3", code=2)


def test_probe_counting_cnn_reads_a_count_the_frames_show():
    """fit_cnn's every-class table: frames in which each of two classes' events are plain pulses on its own channel,
    their number the count. Trained on 48 clips, it counts 16 held-out ones nearly always (chance: a quarter);
    questions whose counts were paired with the wrong clip or class would leave it near chance."""
    from benchmarks.probe_counting import fit_cnn

    rng = np.random.default_rng(0)
    frames, questions = {}, []
    for i in range(64):
        x = torch.zeros(48, 2)
        for c, label in enumerate(("bell", "dog")):
            count = int(rng.integers(1, 5))
            for at in rng.choice(np.arange(2, 46, 5), count, replace=False):
                x[at:at + 2, c] = 1.0
            questions.append(SimpleNamespace(segments=[("audio", f"clip{i}")], target={"label": label,
                                                                                      "count": count}))
        frames[f"clip{i}"] = x
    train, test = questions[:96], questions[96:]
    accs = fit_cnn(train, test, 200, 16, 0, frames.__getitem__)
    assert np.mean(accs[-3:]) > 0.8, accs


# ---------------------------------------------------------------------------------------------------- probe_llm.py


def test_probe_llm_counts_the_documents_of_the_split_it_is_given(trained):
    """(2) and (3) ask the stand-in LLM every few-shot and counting document of the split's corpus, (3) beside the
    most frequent count's share; a split without them says so; (4) the toy reports at step 125 and at its last."""
    llm = [f"--run_dir={trained / 'run'}", f"--data_root={trained / 'synth'}"]
    out = run("benchmarks/probe_llm.py", *llm, "--split", "train", "--toy", "130", "--batch", "4")
    corpus = synth.lm_corpus(trained / "synth", "train", 0)
    fewshot = [d for d in corpus if d[-2] == tasks.FEWSHOT_QUERY]
    counting = [d for d in corpus if re.fullmatch(r"How many times does \w+ occur\?", d[1])]
    assert fewshot and counting
    assert re.search(r"^\(1\) copy drills: \d+% of 50 lines said again", out, re.M), out
    assert re.search(rf"^\(2\) {len(fewshot)} few-shot documents \(text\): answered with the trained names \d+%, "
                     r"with made-up names \d+%$", out, re.M), out
    count, share = Counter(d[-1] for d in counting).most_common(1)[0]
    assert re.search(rf"^\(3\) {len(counting)} counting documents \(text\): accuracy \d+%; always {count!r}: "
                     rf"{share / len(counting):.0%}$", out, re.M), out
    assert re.findall(r"^\(4\) toy step (\d+): copy-token accuracy [\d.]+", out, re.M) == ["125", "130"], out
    test = synth.lm_corpus(trained / "synth", "test", 0)
    assert not any(d[-2] == tasks.FEWSHOT_QUERY for d in test)  # the miniature's test split has none
    assert "(2) few-shot documents: none in test" in run("benchmarks/probe_llm.py", *llm)


def test_probe_llm_renames_each_class_of_a_document_once():
    """A few-shot document renamed: every description kept, each class's support sentence under one made-up word
    (none of them a class's real name), the query's prompt kept, and the answer the word of the query's class."""
    from benchmarks.probe_llm import label_of, renamed_document

    doc = ["a1 at 0.1s-0.4s.", "This is a sound of bell.", "d1 at 0.2s-0.9s.", "This is a sound of dog.",
           "a2 at 1.1s-1.5s.", "This is a sound of bell.", "q at 0.3s-0.6s.", tasks.FEWSHOT_QUERY, "bell"]
    text, answer = renamed_document(doc, random.Random(0))
    assert len(text) == len(doc) - 1 and text[::2] == doc[:-1:2] and text[-1] == tasks.FEWSHOT_QUERY
    words = [label_of(t) for t in text[1:-2:2]]
    assert words[0] == words[2] == answer and words[1] != answer and not {"bell", "dog"} & set(words)
    assert all(t == tasks.PROMPTS["fewshot"][0].format(label=w) for t, w in zip(text[1:-2:2], words))


# ------------------------------------------------------------------------------------------------ probe_prompts.py


def test_probe_prompts_reads_the_classes_out_and_scores_the_llm_as_evaluate_does(trained, tmp_path):
    """On all 20 of the miniature's test clips: the chance line and the LLM's "This is a sound of {class}." line are
    evaluate.py --task audioset's random baseline and likelihood mAP; the filter banks' read-out, fitted on 120
    training clips, finds the classes far above chance (the benchmark's sounds are distinct), and each read-out says
    how many numbers a clip gives it."""
    import evaluate

    tmp = copy_of(trained, tmp_path)
    evaluate.main(["--task", "audioset", *opts(tmp)])
    out = run("benchmarks/probe_prompts.py", *opts(tmp), "--train", "120", "--test", "100")
    chance = float(re.search(r"macro mAP on 20 test clips \(random scores: ([\d.]+)\); read-outs fitted on 120 "
                             r"training clips", out).group(1))
    likelihood = apt_metric(tmp / "run", "audioset", "LLM likelihood")
    assert chance == pytest.approx(likelihood["baseline"], abs=5e-4)
    said = float(re.search(r"its likelihoods ([\d.]+) +\(evaluate.py --task audioset's", out).group(1))
    assert said == pytest.approx(likelihood["apt"], abs=5e-4)
    readouts = {name: (float(score), int(numbers)) for name, score, numbers in
                re.findall(r"^  (filter banks|encoder|soft prompts) +linear read-out ([\d.]+) +\((\d+) numbers", out,
                           re.M)}
    assert readouts["filter banks"][0] > chance + 0.2, out
    mel, width, prompts = 128, 32, 4 * 32  # (the miniature's mel bins, encoder width, queries x LLM width)
    assert {k: n for k, (_, n) in readouts.items()} == {"filter banks": 2 * mel, "encoder": 2 * width,
                                                       "soft prompts": prompts}


# ------------------------------------------------------------------------------------------------ sweep_queries.py


def test_sweep_queries_trains_each_count_and_prints_its_validation(prepared, tmp_path):
    """Stage 0 then stage 1 per count, each in its own folder with its own query count whatever the settings given
    (the miniature's 4 among them), sharing the run's stand-in LLM; each row's figures are its runs' last validation."""
    tmp = copy_of(prepared, tmp_path)
    out = run("benchmarks/sweep_queries.py", "--preset", "tiny", *opts(tmp), "--counts", "2,3", "--steps_0", "2",
              "--steps_1", "2")  # (its own --steps_0 and --steps_1 after the miniature's, which name them too)
    rows = re.findall(r"^ +(\d+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)$", out, re.M)
    assert [int(r[0]) for r in rows] == [2, 3], out
    for count, _, _, r1, loss, aqa in rows:
        folder = tmp / "run" / "sweep-queries" / f"q{count}"
        assert (folder / "llm").resolve() == (tmp / "run" / "llm").resolve()
        meta = json.loads((folder / "stage1" / "final" / "apt.json").read_text())
        assert meta["aligner"]["num_queries"] == int(count), meta["aligner"]
        logs = {stage: [json.loads(x) for x in (folder / stage / "log.jsonl").read_text().splitlines()]
                for stage in ("stage0", "stage1")}
        assert max(e["step"] for e in logs["stage0"]) == max(e["step"] for e in logs["stage1"]) == 2
        last = {k: v for e in logs["stage0"] + logs["stage1"] for k, v in e.items()}
        assert (float(r1), float(loss), float(aqa)) == pytest.approx(
            (last["a2t_r1"], last["val_loss"], last["val_aqa_accuracy"]), abs=5e-4)
    assert "argument --counts: expected query counts of at least 1, separated by commas, got '2,x'" in run(
        "benchmarks/sweep_queries.py", "--counts", "2,x", code=2)


# ------------------------------------------------------------------------------------------ bench_shared_prefix.py


def test_bench_shared_prefix_times_the_same_steps_both_ways(smollm2, prepared, tmp_path):
    """The small preset's release on the miniature benchmark, against SmolLM2: its chat template's opening (24
    tokens) run once or in every row gives the same loss on each batch (the same dropout drawn for both), and each
    ratio is the one its printed times give."""
    folder, _ = smollm2
    out = run("benchmarks/bench_shared_prefix.py", f"--data_root={prepared / 'synth'}", f"--run_dir={tmp_path}",
              "--synth_scale=0.1", f"--llm_path={folder}", "--batch_size=2", "--precision=fp32", "--batches", "2")
    assert "small preset, fp32, batch 2, prefix 24 tokens" in out, out
    steps = re.findall(r"^stage (\d) step: prefix in every row ([\d.]+) s \| shared ([\d.]+) s \(([\d.]+)x\); losses "
                       r"differ by at most ([\d.e+-]+)$", out, re.M)
    assert [s[0] for s in steps] == ["1", "2"], out
    for _, full, shared, ratio, differ in steps:
        assert float(ratio) == pytest.approx(float(full) / float(shared), abs=0.02)  # (each printed to 3 places)
        assert float(differ) < 1e-4, out


# ------------------------------------------------------------------------------------------------------- as a user


@pytest.mark.parametrize("script, names", [
    ("probe_fewshot.py", "run/stage2/final: no trained APT"), ("probe_counting.py", "run/stage2/final: no trained APT"),
    ("probe_prompts.py", "run/encoder.safetensors: the tiny preset's encoder is not there"),
    ("probe_avqa.py", "run/vision/final: no vision side yet"),
    ("probe_llm.py", "run/llm: no tokenizer.model or tokenizer.json found"),
    ("sweep_queries.py", "run/encoder.safetensors: no pretrained encoder"),
    ("bench_shared_prefix.py", "llm: no LLM there yet")])
def test_each_probe_names_what_is_missing_in_one_line(tmp_path, script, names):
    """A run or data folder with nothing in it: the script's name, the missing file and what to do, no traceback."""
    settings = [f"--data_root={tmp_path / 'data'}", f"--run_dir={tmp_path / 'run'}"]
    if script == "sweep_queries.py":
        settings.append("--preset=small")  # (its default too: the small preset's encoder comes from --stage mae)
    if script == "bench_shared_prefix.py":
        settings.append(f"--llm_path={tmp_path / 'llm'}")  # (SmolLM2's own folder would be fetched)
    err = run(f"benchmarks/{script}", *settings, code=1)
    assert err.startswith(f"{script}: error: {tmp_path / names.split(':')[0]}:{names.split(':', 1)[1]}"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err

"""The synthetic benchmark: read back through the real-format readers, it gives the generator's ground truth."""

import hashlib
import random

import numpy as np
import pytest

from apt_min import data, synth, tasks

SCALE = 0.02  # 40/4/4 pool scenes, 8/2/2 Clotho scenes, 7 ESC clips per novel class, 20/2/2 NLAR pairs


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return root, synth.build(root, seed=7, scale=SCALE)


def tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_classes():
    assert len(synth.CLASSES) >= 30 and len(synth.NOVEL_CLASSES) >= 12
    assert len({c.name for c in synth.CLASSES}) == len(synth.CLASSES)
    rng = np.random.default_rng(0)
    for c in synth.CLASSES:  # each generator varies between draws, and stays finite and audible
        a, b = (c.generate(rng, 0.5) for _ in range(2))
        assert np.isfinite(a).all() and np.abs(a).max() > 0.01 and not np.allclose(a[:len(b)], b[:len(a)])


def test_novel_classes_never_reach_training_files(bench):
    root, _ = bench
    novel = {c.name for c in synth.NOVEL_CLASSES}
    for f in [*root.glob("audioset/*"), *root.glob("audiocaps/*"), *root.glob("clotho*/*.csv"), *root.glob("nlar/*")]:
        text = f.read_text(encoding="latin-1").lower()
        assert not any(f"syn_{n}" in text or f" {n} " in text or f" {n}." in text for n in novel), f
    assert {c for _, _, _, c in data.read_esc50(root / "esc50/meta/esc50.csv")} == novel


def test_round_trip_tagging_and_strong_labels(bench):
    root, truth = bench
    for split in ("train", "test"):
        clips = truth["pool"][split]
        tagging = data.examples("tagging", root, split)
        assert len(tagging) == len(clips)
        for ex, (yid, events, _) in zip(tagging, clips):
            assert ex.segments[0][1].endswith(f"Y{yid}.wav")
            assert [x.lower() for x in ex.target["labels"]] == list(dict.fromkeys(e.label for e in events))
        sed = {(ex.segments[0][1], ex.target["label"].lower()): ex.target["segments"]
               for ex in data.examples("sed", root, split)}
        count = {(ex.segments[0][1], ex.target["label"].lower()): ex.target["count"]
                 for ex in data.examples("counting", root, split)}
        for yid, events, _ in clips:
            path = str(root / "audio" / f"Y{yid}.wav")
            for label in {e.label for e in events}:
                spans = sorted((e.onset, e.offset) for e in events if e.label == label)
                assert sed[(path, label)] == spans and count[(path, label)] == len(spans)


def test_round_trip_captions_aqa_esc_nlar(bench):
    root, truth = bench
    caps = {ex.segments[0][1]: sorted(ex.target["references"]) for ex in data.examples("captioning", root, "val")}
    assert {p.rsplit("/Y", 1)[1][:-4]: r for p, r in caps.items()} == {y: sorted(c) for y, _, c in
                                                                       truth["pool"]["val"]}
    train = data.examples("captioning", root, "train", rng=random.Random(0))
    assert [ex.answer for ex in train] == [c[0] for _, _, c in truth["pool"]["train"]]  # one caption per clip
    clotho = data.examples("captioning", root, "test", source="clotho")
    assert [ex.target["references"] for ex in clotho] == [c for _, _, c, _ in truth["clotho"]["test"]]
    assert all(" " in ex.segments[0][1].rsplit("/", 1)[1] for ex in clotho)  # names with spaces
    aqa = data.examples("aqa", root, "val")
    expected = [(q, tasks.normalize_answer(a)) for _, _, _, qs in truth["clotho"]["val"] for q, a in qs]
    assert [(ex.segments[1][1], ex.target["answer"]) for ex in aqa] == expected
    pool = data.esc50_pool(root)
    assert sum(map(len, pool.values())) == len(truth["esc50"]) and len(pool) == 12
    nlar = data.examples("nlar", root, "test")
    assert [(ex.segments[2][1], ex.answer) for ex in nlar] == [(i["question"], i["answer"])
                                                               for i in truth["nlar"]["test"]]


def test_same_seed_same_bytes_other_seed_other_data(bench, tmp_path):
    root, _ = bench
    synth.build(tmp_path / "again", seed=7, scale=SCALE)
    assert tree_digest(tmp_path / "again") == tree_digest(root)
    synth.build(tmp_path / "other", seed=8, scale=SCALE)
    assert tree_digest(tmp_path / "other") != tree_digest(root)


def test_second_generate_is_a_no_op(tmp_path):
    synth.generate(tmp_path / "b", seed=1, scale=0.01)
    marker = tmp_path / "b" / "audiocaps" / "train.csv"
    before = marker.stat().st_mtime_ns
    synth.generate(tmp_path / "b", seed=1, scale=0.01)
    assert marker.stat().st_mtime_ns == before


def test_a_folder_of_other_data_is_never_replaced(tmp_path):
    """The tiny preset pointed at real data (or any folder not written by synth) must read it, not delete it."""
    real = tmp_path / "real"
    (real / "audiocaps").mkdir(parents=True)
    (real / "audiocaps" / "train.csv").write_text("audiocap_id,youtube_id,start_time,caption\n")
    with pytest.raises(FileExistsError, match="no synth.json"):
        synth.generate(real, seed=1, scale=0.01)
    import train

    with pytest.raises(SystemExit, match="real/audioset/.*no such data file"):  # it read the folder as data, and
        # stopped there, with one clean line
        train.main(["--stage", "1", f"--data_root={real}", f"--run_dir={tmp_path / 'run'}"])
    assert (real / "audiocaps" / "train.csv").is_file()
    synth.generate(tmp_path / "empty", seed=1, scale=0.01)  # an empty or new folder is generated into
    assert (tmp_path / "empty" / "synth.json").is_file()


def test_nlar_answers_flip_when_the_clips_swap():
    ev1 = [synth.Event("bell", 0.0, 1.0, -1.0), synth.Event("bell", 2.0, 3.0, -1.0), synth.Event("hum", 1, 2, -9)]
    ev2 = [synth.Event("bell", 0.5, 1.0, -8.0), synth.Event("drip", 1.0, 1.5, -2.0)]
    forward, backward = synth.nlar_questions(None, ev1, ev2), synth.nlar_questions(None, ev2, ev1)
    flip = {"first": "second", "second": "first"}
    assert [q for q, _ in forward] == [q for q, _ in backward]
    assert [flip.get(a, a) for _, a in forward] == [a for _, a in backward]
    answers = dict(forward)
    assert answers["In which recording does the bell occur more often?"] == "first"
    assert answers["In which recording is the bell louder?"] == "first"
    assert answers["Which recording contains the drip?"] == "second"
    assert all(a in ("yes", "no", "first", "second", "both", "neither", "equal") for _, a in forward)  # closed set

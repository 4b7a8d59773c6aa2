"""The audio-visual default: synthetic videos and questions, AVQA's reader, the AVQA scores, and the miniature chain
through the vision stage and `evaluate.py --task avqa`."""

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import record_scenes

from apt_min import data, synth, synth_av
from apt_min.audio import AudioError
from apt_min.blip2 import MODES, Answer, avqa_prompt
from apt_min.build import load_apt_blip2
from apt_min.config import load_config
from apt_min.errors import MissingFileError
from apt_min.evaluation import Options, avqa_coverage_row, eval_avqa
from apt_min.release import resolve_checkpoint
from tests.conftest import VISION, copy_of, opts

NAMES = [c.name for c in synth.TRAIN_CLASSES]


@pytest.fixture(scope="module")
def av(tmp_path_factory):
    out = tmp_path_factory.mktemp("av")
    synth_av.generate(out, seed=3, videos=24, pictures=6)
    return out


def test_an_audio_visual_set_that_runs_read_is_not_replaced_by_other_settings(av):
    """As the synthetic benchmark: the same arguments are a no-op, other ones are refused, each named (the vision
    stage trains on this set and evaluation asks its questions), and a set that an older version of this module or
    of synth wrote is written again."""
    from apt_min.errors import SettingError

    questions = av / "avqa" / "val_qa.json"
    before = questions.stat().st_mtime_ns
    synth_av.generate(av, seed=3, videos=24, pictures=6)
    with pytest.raises(SettingError, match=rf"{av}: holds the synthetic benchmark written with seed 3, videos 24, "
                                           rf"which other runs read; seed 4, videos 25 is another benchmark"):
        synth_av.generate(av, seed=4, videos=25, pictures=6)
    with pytest.raises(SystemExit, match=r"^python -m apt_min.synth_av: error: .*seed 3, .*seed 0"):
        synth_av.main(["--out", str(av)])
    for setting, was, now in (("frames", 4, 2), ("pictures", 6, 7), ("length", 5.12, 10.24)):
        with pytest.raises(SettingError, match=rf"written with {setting} {was}, which .*; {setting} {now} is another"):
            synth_av.generate(av, **{"seed": 3, "videos": 24, "pictures": 6, setting: now})
    assert questions.stat().st_mtime_ns == before
    manifest = av / "avqa" / "synth_av.json"
    old = json.loads(manifest.read_text())
    (av / "avqa" / "synth_av.json").write_text(json.dumps({**old, "args": {**old["args"], "version": 0}}))
    synth_av.generate(av, seed=3, videos=24, pictures=6)  # written again, as it was
    assert json.loads(manifest.read_text()) == old and questions.stat().st_mtime_ns != before
    before = questions.stat().st_mtime_ns  # and so is one whose audio an older synth made (its scenes differ)
    (av / "avqa" / "synth_av.json").write_text(json.dumps({**old, "args": {**old["args"], "synth": 0}}))
    synth_av.generate(av, seed=3, videos=24, pictures=6)
    assert json.loads(manifest.read_text()) == old and questions.stat().st_mtime_ns != before


def test_real_audio_visual_data_is_never_replaced(tmp_path, monkeypatch):
    """A data folder's own AVQA (or vision folder) that this module did not write is refused, by the function and
    by its command line (one clean line); an interrupted writing of the synthetic set is written again."""
    from apt_min.errors import ForeignDataError

    for part, file in (("avqa", "val_qa.json"), ("vision", "pictures_val.json")):
        real = tmp_path / part
        (real / part).mkdir(parents=True)
        (real / part / file).write_text('[{"my": "real questions"}]')
        with pytest.raises(ForeignDataError, match=f"{real / part}: holds files but .*synth_av.json is missing"):
            synth_av.generate(real, videos=1, pictures=1)
        with pytest.raises(SystemExit, match=r"^python -m apt_min.synth_av: error: .*refusing to replace it"):
            synth_av.main(["--out", str(real), "--videos", "1"])
        assert (real / part / file).read_text() == '[{"my": "real questions"}]'
    cut = tmp_path / "cut"  # stopped after the videos, before the pictures: marked as ours from the start
    with monkeypatch.context() as patched:
        patched.setattr(synth_av, "random_picture", lambda rng: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            synth_av.generate(cut, videos=1, pictures=1)
    assert (cut / "avqa" / "val_qa.json").is_file() and not (cut / "vision" / "pictures_val.json").exists()
    (cut / "avqa" / "val_qa.json").write_text("[")  # and stopped part-way through a file
    synth_av.generate(cut, videos=1, pictures=1)
    assert len(json.loads((cut / "avqa" / "val_qa.json").read_text())) == 1
    empty = tmp_path / "empty"  # folders made ready for the set but holding nothing: nothing to lose
    for part in ("avqa", "vision"):
        (empty / part).mkdir(parents=True)
    synth_av.generate(empty, videos=1, pictures=1)
    assert len(json.loads((empty / "avqa" / "val_qa.json").read_text())) == 1
    older = tmp_path / "older"  # inside the synthetic benchmark, a set an older version left without its manifest
    (older / "avqa").mkdir(parents=True)
    (older / "synth.json").write_text("{}")
    (older / "avqa" / "val_qa.json").write_text("[")
    synth_av.generate(older, videos=1, pictures=1)
    assert len(json.loads((older / "avqa" / "val_qa.json").read_text())) == 1


def test_every_class_has_its_own_look():
    assert set(synth_av.LOOKS) == set(NAMES)
    assert len(set(synth_av.LOOKS.values())) == len(NAMES)


def test_questions_need_what_their_relation_says(av):
    items = json.loads((av / "avqa" / "val_qa.json").read_text())
    assert len(items) == 24 and {i["question_relation"] for i in items} == {"Both", "View", "Sound"}
    for item in items:
        options, answer = item["multi_choice"], item["multi_choice"][item["answer"]]
        pictured, heard = set(item["pictured"]), set(item["heard"])
        assert len(options) == len(set(options)) == 4 and set(options) <= set(NAMES)
        if item["question_relation"] == "Both":  # the answer alone is pictured and heard; each sense alone leaves two
            assert answer in pictured & heard
            assert sum(o in pictured for o in options) == 2 and sum(o in heard for o in options) == 2
            assert [o in pictured and o in heard for o in options].count(True) == 1
        elif item["question_relation"] == "View":  # the picture alone answers; no option is heard
            assert answer in pictured - heard and [o in pictured for o in options].count(True) == 1
            assert not set(options) & heard
        else:  # the sound alone answers; no option is pictured
            assert answer in heard - pictured and [o in heard for o in options].count(True) == 1
            assert not set(options) & pictured


def test_the_audio_holds_the_heard_objects_and_the_frames_the_pictured(av, monkeypatch):
    """The sound scene's events are exactly the heard classes; each frame shows the pictured objects' colours."""
    items = json.loads((av / "avqa" / "val_qa.json").read_text())
    rng, trng = np.random.default_rng(3 + 7), random.Random(3 + 7)  # generate's own seeds: the same draws again
    scenes = record_scenes(monkeypatch)
    frames, audio, pictured, heard = synth_av.make_video(rng, trng, 5.12, 4)
    assert len(scenes) == 1 and {e.label for e in scenes[0]} == set(heard)  # each heard object sounds, none else
    for _ in range(30):
        scenes.clear()
        _, _, more_pictured, more_heard = synth_av.make_video(rng, trng, 5.12, 4)
        assert {e.label for e in scenes[0]} == set(more_heard) and len(set(more_heard) - set(more_pictured)) == 1
    assert (pictured, heard) == (items[0]["pictured"], items[0]["heard"])
    wav, rate = sf.read(av / "avqa" / "audio" / f"{items[0]['video_name']}.wav")
    assert rate == 16000 and len(wav) == len(audio) and np.abs(wav - audio).max() < 1e-3
    from PIL import Image

    for k in range(4):
        image = np.asarray(Image.open(av / "avqa" / "frames" / items[0]["video_name"] / f"{k:02d}.jpg")).astype(int)
        assert colours(image) == {synth_av.LOOKS[name][1] for name in pictured}, k
        assert np.abs(image - np.asarray(frames[k]).astype(int)).mean() < 7, k  # a fine JPEG (Pillow's 75: 7.4)


def colours(image) -> set:
    """The object colours that cover a few pixels of `image` (no pale background has any of them)."""
    return {colour for colour, rgb in synth_av.COLOURS.items()
            if (np.abs(image - np.array(rgb)).sum(-1) < 60).sum() > 12}


def test_each_picture_shows_exactly_its_objects_and_a_set_its_frames(tmp_path):
    """random_picture's frames (one or two) each show every object of its record and no other; generate writes as
    many frames a video as asked, and the command line's --videos is how many videos it writes."""
    rng = random.Random(0)
    for _ in range(40):
        record = synth_av.random_picture(rng)
        assert 1 <= len(record["frames"]) <= 2
        drawn = {synth_av.LOOKS[name][1] for name in record["objects"]}
        assert all(colours(np.asarray(f).astype(int)) == drawn for f in record["frames"]), record
    synth_av.generate(tmp_path / "two", seed=1, videos=2, pictures=1, frames=2)
    written = sorted(p.name for p in (tmp_path / "two" / "avqa" / "frames").rglob("*.jpg"))
    assert written == ["00.jpg", "00.jpg", "01.jpg", "01.jpg"]  # two videos of two frames
    synth_av.main(["--out", str(tmp_path / "cli"), "--videos", "3"])
    assert len(json.loads((tmp_path / "cli" / "avqa" / "val_qa.json").read_text())) == 3


def test_each_object_sits_in_a_cell_of_its_own():
    """layout's boxes lie each inside one 16-pixel cell, no two in the same cell, within the picture; each size of
    11 to 14 pixels occurs, and each place off the cell's centre by at most a pixel, either way, along either axis."""
    rng, sizes, off = np.random.default_rng(0), set(), set()
    for n in (1, 2, 3, 4, 16):
        for _ in range(50):
            boxes = synth_av.layout(rng, n)
            cells = [(x // synth_av.CELL, y // synth_av.CELL) for x, y, _ in boxes]
            assert len(set(cells)) == n
            for (x, y, s), (cx, cy) in zip(boxes, cells):
                assert 11 <= s <= 14 and (x + s - 1) // synth_av.CELL == cx and (y + s - 1) // synth_av.CELL == cy
                assert x + s <= synth_av.SIZE and y + s <= synth_av.SIZE
                sizes.add(s)
                centred = (synth_av.CELL - s) // 2
                off |= {("x", x - cx * synth_av.CELL - centred), ("y", y - cy * synth_av.CELL - centred)}
    assert sizes == {11, 12, 13, 14} and off == {(axis, d) for axis in "xy" for d in (-1, 0, 1)}


def test_the_vision_stages_questions_are_true_of_the_picture():
    """picture_example's answers: the objects and the description name exactly the pictured ones; "choose" asks which
    object can be seen (a silent picture: not which one sounds), offering one pictured object among three absent
    ones at any of the four places (none given away by its position); "yesno" asks about pictured and absent objects
    about equally, and answers truly."""
    import re
    from collections import Counter

    rng, answers, places = random.Random(0), [], Counter()
    for _ in range(400):
        record = synth_av.random_picture(rng)
        objects = set(record["objects"])
        _, _, listed, description = synth_av.picture_example(record, "objects", rng)
        assert set(listed.split(", ")) == objects and set(re.findall(r"\w+", description)) & set(NAMES) == objects
        _, prompt, answer, _ = synth_av.picture_example(record, "choose", rng)
        options = re.search(r"Options: 0 (\w+); 1 (\w+); 2 (\w+); 3 (\w+)\. Answer:$", prompt).groups()
        assert len(set(options)) == 4 and set(options) <= set(NAMES)
        assert [o for o in options if o in objects] == [answer] and "Which object can be seen?" in prompt
        places[options.index(answer)] += 1
        _, prompt, answer, _ = synth_av.picture_example(record, "yesno", rng)
        name = re.fullmatch(r"Is there an? (\w+) in the picture\?", prompt)[1]
        assert answer == ("yes" if name in objects else "no")
        answers.append(answer)
    assert 0.4 < answers.count("yes") / len(answers) < 0.6
    assert set(places) == {0, 1, 2, 3} and min(places.values()) > 60


def test_avqa_items_spaces_frames_and_skips_what_is_missing(av, tmp_path, caplog):
    items = data.avqa_items(av, "test", frames=2)
    assert len(items) == 24
    first = items[0]
    assert [f.split("/")[-1] for f in first["frames"]] == ["00.jpg", "03.jpg"]  # the first and the last of four
    assert first["audio"].endswith(f"{first['video']}.wav") and first["options"][first["answer"]]
    assert len(data.avqa_items(av, "test", frames=10)[0]["frames"]) == 4  # no more than were extracted

    broken = tmp_path / "root"  # one video without audio, one without frames: both skipped, counted, named
    (broken / "avqa").mkdir(parents=True)
    (broken / "avqa" / "val_qa.json").symlink_to(av / "avqa" / "val_qa.json")
    (broken / "avqa" / "frames").mkdir()
    (broken / "avqa" / "audio").mkdir()
    for item in json.loads((av / "avqa" / "val_qa.json").read_text())[2:]:
        (broken / "avqa" / "frames" / item["video_name"]).symlink_to(av / "avqa" / "frames" / item["video_name"])
    for item in json.loads((av / "avqa" / "val_qa.json").read_text())[1:]:
        name = f"{item['video_name']}.wav"
        (broken / "avqa" / "audio" / name).symlink_to(av / "avqa" / "audio" / name)
    with caplog.at_level(logging.WARNING):
        assert len(data.avqa_items(broken, "test")) == 22
    assert "have no frames" in caplog.text and "synth00000_000000" in caplog.text
    with pytest.raises(FileNotFoundError, match="no frames"):
        data.avqa_items(broken, "test", strict=True)


class Scripted:
    """A stand-in for APTBLIP2 whose answers are given per video: (named option, ranked option) per mode."""

    class blip:  # noqa: N801
        processing = staticmethod(lambda path: torch.zeros(3, 4, 4))

    class apt:  # noqa: N801 -- a clip named "broken" cannot be decoded
        cache = True  # features are kept: the check encodes the clips

        @staticmethod
        def encode_clips(paths, strict):
            bad = [(p, "not audio") for p in paths if "broken" in p]
            if bad and strict:
                raise AudioError(f"{bad[0][0]}: {bad[0][1]}")
            return {}, bad

    def __init__(self, script):
        self.script = script

    def answer(self, question, options, modes, frames, audio):
        video = audio.split("/")[-1][:-4]
        out = {}
        for mode in modes:
            named, ranked, cloze = self.script[video][mode]
            scores, alone = torch.full((4,), -5.0), torch.full((4,), -5.0)
            scores[ranked], alone[cloze] = -1.0, -1.0
            out[mode] = Answer(named, str(named), scores, alone)
        return out


def test_avqa_reads_every_frame_in_order_under_the_public_codes_prompt():
    """Each question is asked with all of its video's frames, in time order, and AVQA's prompt numbers the options
    in the order the answer index counts them (the public APT code's wording)."""
    assert avqa_prompt("What is heard?", ["cat", "bell", "dog", "car"]) == (
        "Choose the correct option to the following question: What is heard? Options: 0 cat; 1 bell; 2 dog; 3 car. "
        "Answer:")
    seen = []

    class Framed(Scripted):
        class blip:  # noqa: N801 -- a frame's pixels say which frame it was
            processing = staticmethod(lambda path: torch.full((3, 4, 4), float(path[1:])))

        def answer(self, question, options, modes, frames, audio):
            seen.append(frames[:, 0, 0, 0].tolist())
            return super().answer(question, options, modes, frames, audio)

    item = {"question": "q", "options": list("abcd"), "answer": 0, "relation": "Both", "video": "v0",
            "frames": [f"f{k}" for k in range(10)], "audio": "/x/v0.wav"}
    eval_avqa(Framed({"v0": {m: (0, 0, 0) for m in MODES}}), [item], Options())
    assert seen == [[float(k) for k in range(10)]]


def test_avqa_baseline_among_equally_frequent_answers_is_the_first_seen():
    """The fixed-answer baseline is the most frequent correct option; among equals the first seen, the rule every
    other task's majority baseline follows (metrics.majority)."""
    items = [{"question": "q", "options": list("abcd"), "answer": a, "relation": "Both", "video": f"v{i}",
              "frames": ["f"], "audio": f"/x/v{i}.wav"} for i, a in enumerate([2, 0, 2, 0])]
    script = {f"v{i}": {m: (0, 0, 0) for m in MODES} for i in range(4)}
    rows, _ = eval_avqa(Scripted(script), items, Options())
    assert rows[0][2] == 0.5 and rows[0][3] == "4-way accuracy over 4 questions (baseline: always option 2)"


def test_avqa_scores_on_scripted_answers():
    items = [{"question": "q", "options": list("abcd"), "answer": a, "relation": r, "video": f"v{i}",
              "frames": ["f"], "audio": f"/x/v{i}.wav"} for i, (a, r) in enumerate([(0, "Both"), (1, "Both"),
                                                                                   (1, "View"), (3, "Sound")])]
    # per video and mode: (the option named, the likeliest after AVQA's prompt, the likeliest after the question)
    script = {"v0": {"audio-visual": (0, 0, 0), "video": (-1, 2, 0), "audio": (0, 1, 2)},
              "v1": {"audio-visual": (1, 1, 1), "video": (1, 1, 3), "audio": (2, 1, 1)},
              "v2": {"audio-visual": (1, 0, 1), "video": (1, 1, 1), "audio": (3, 3, 0)},
              "v3": {"audio-visual": (3, 3, 3), "video": (0, 0, 2), "audio": (3, 3, 3)}}
    broken = dict(items[0], video="v4", audio="/x/broken.wav")  # skipped and counted, not scored
    coverage = data.Coverage()
    coverage.listed = {it["audio"]: "val_qa.json" for it in [*items, broken]}
    rows, records = eval_avqa(Scripted(script), [*items, broken], Options(), coverage=coverage)
    assert [r["video_name"] for r in records] == ["v0", "v1", "v2", "v3"] and coverage.unreadable == {broken["audio"]:
                                                                                                "not audio"}
    with pytest.raises(AudioError, match="broken.wav: not audio"):  # strict: the first one ends it, named
        eval_avqa(Scripted(script), [*items, broken], Options(strict=True))
    lone = data.Coverage()
    lone.listed = {broken["audio"]: "val_qa.json"}
    with pytest.raises(data.DataError, match="avqa: nothing to score: of the 1 videos listed, 0 lack their frames or "
                       "audio and 1 cannot be decoded"):
        eval_avqa(Scripted(script), [broken], Options(), coverage=lone)
    assert avqa_coverage_row(records, coverage) == (
        "videos scored", 4, None, "4 questions on 4 videos; the test data lists 5 videos' clips or frames: 0 missing, "
        "1 unreadable (listed in missing_avqa.txt)")
    gone = data.Coverage()  # a video missing, none unreadable: the list is named too
    gone.listed, gone.missing = dict(coverage.listed), {broken["audio"]: "val_qa.json"}
    assert avqa_coverage_row(records, gone)[3].endswith("1 missing, 0 unreadable (listed in missing_avqa.txt)")
    whole = data.Coverage()
    whole.listed = {it["audio"]: "val_qa.json" for it in items}
    assert avqa_coverage_row(records, whole)[3] == ("4 questions on 4 videos; the test data lists 4 videos' clips or "
                                                    "frames: 0 missing, 0 unreadable")  # nothing lost: no list named
    two = [records[0], dict(records[0], question="another question on v0"), records[1]]  # AVQA asks several a video
    assert avqa_coverage_row(two, coverage)[1:3] == (2, None)
    assert avqa_coverage_row(two, coverage)[3].startswith("3 questions on 2 videos;")
    got = {m: round(v, 4) for m, v, _, _ in rows}
    assert got["audio-visual, option named"] == 1.0 and got["audio-visual, option likelihood"] == 0.75
    assert got["audio-visual, cloze likelihood"] == 1.0 and got["video, cloze likelihood"] == 0.5
    assert got["video, option named"] == 0.5 and got["video, option likelihood"] == 0.5
    assert got["audio, option named"] == 0.5 and got["audio, option likelihood"] == 0.5
    assert got["audio, cloze likelihood"] == 0.5
    assert got["audio-visual, option likelihood, Both (2)"] == 1.0 and got["video, option likelihood, Both (2)"] == 0.5
    assert got["audio, option likelihood, Sound (1)"] == 1.0
    assert got["audio-visual, option likelihood, View (1)"] == 0.0
    assert got["audio-visual, cloze likelihood, View (1)"] == 1.0 and got["video, cloze likelihood, Both (2)"] == 0.5
    assert got["audio, cloze likelihood, Both (2)"] == 0.5 and got["video, cloze likelihood, Sound (1)"] == 0.0
    assert {b for _, _, b, _ in rows[:9]} == {0.5}  # always option 1, the most frequent answer: 2 of 4
    assert records[2]["audio-visual"] == {"said": "1", "named": 1, "ranked": 0, "cloze": 1}
    # audio + video against each sense alone: right only with both / only with the one (exact McNemar: 2 / 0 -> 0.5)
    assert got["audio-visual vs video, cloze likelihood: p"] == 0.5
    assert got["audio-visual vs audio, option named: p"] == 0.5
    assert got["audio-visual vs audio, option likelihood: p"] == 1.0  # 1 / 0
    protocols = {m: p for m, _, _, p in rows}
    assert protocols["audio-visual vs video, option likelihood: p"] == (
        "exact two-sided McNemar test: right with audio + video only 2, with video only 1")
    assert all(p for _, _, _, p in rows)  # every row names its protocol (the printed table, once for rows sharing it)
    assert protocols["audio, cloze likelihood"] == "4-way accuracy over 4 questions (baseline: always option 1)"
    assert protocols["video, cloze likelihood, Both (2)"].startswith("questions that need the picture and the sound")


def test_avqa_skips_videos_whose_frames_cannot_be_read_and_compares_only_the_modes_it_runs():
    """A video whose frames cannot be decoded is skipped and recorded by its frames' folder (strict: an error naming
    the file); questions with no relation (AVQA's may lack one) get no per-relation row; without the audio-visual
    mode there is nothing to compare the senses with, so no McNemar rows, and with one sense beside it, only its."""
    from apt_min.vision import ImageError

    class Unreadable(Scripted):
        class blip:  # noqa: N801 -- frames under a folder named "bad" cannot be decoded
            @staticmethod
            def processing(path):
                if "/bad/" in path:
                    raise ImageError(f"{path}: not an image")
                return torch.zeros(3, 4, 4)

    items = [{"question": "q", "options": list("abcd"), "answer": i % 2, "relation": ["Both", "", "View"][i],
              "video": f"v{i}", "frames": [f"/x/v{i}/00.jpg"], "audio": f"/x/v{i}.wav"} for i in range(3)]
    bad = dict(items[0], video="v3", frames=["/x/bad/00.jpg"], audio="/x/v3.wav")
    script = {f"v{i}": dict.fromkeys(MODES, (0, 0, 0)) for i in range(4)}
    coverage = data.Coverage()
    rows, records = eval_avqa(Unreadable(script), [*items, bad], Options(), coverage=coverage)
    assert [r["video_name"] for r in records] == ["v0", "v1", "v2"]
    assert coverage.unreadable == {"/x/bad": "/x/bad/00.jpg: not an image"}
    # the fixed-answer baseline over the scored questions only (answers 0, 1, 0; with the skipped one's 0: 3 of 3)
    assert rows[0][3] == "4-way accuracy over 3 questions (baseline: always option 0)"
    assert [base for _, _, base, _ in rows if base is not None] == [pytest.approx(2 / 3)] * 9  # 3 modes, 3 ways
    names = [m for m, *_ in rows]
    assert {m.split(", ")[-1] for m in names if m.endswith(")")} == {"Both (1)", "View (1)"}
    assert sum(m.endswith(": p") for m in names) == 6  # against video and against audio, by three protocols
    with pytest.raises(ImageError, match="/x/bad/00.jpg: not an image"):
        eval_avqa(Unreadable(script), [*items, bad], Options(strict=True))
    rows, _ = eval_avqa(Unreadable(script), items, Options(), modes=["video", "audio"])
    assert rows and not any(m.endswith(": p") or m.startswith("audio-visual") for m, *_ in rows)
    rows, _ = eval_avqa(Unreadable(script), items, Options(), modes=["audio-visual", "audio"])  # one sense: its rows
    assert [m for m, *_ in rows if m.endswith(": p")] and all("vs audio" in m for m, *_ in rows if m.endswith(": p"))


def test_vision_stage_and_avqa_evaluation(trained, tmp_path, capsys):
    """The miniature chain goes on through the vision stage (a few steps), then APT-BLIP-2 answers in three modes."""
    import evaluate
    import train

    tmp = copy_of(trained, tmp_path)
    vision = VISION
    root = tmp_path / "data"  # the benchmark without its videos: none are made before the vision side is found
    root.mkdir()
    for entry in (trained / "synth").iterdir():
        if entry.name not in ("avqa", "vision"):
            (root / entry.name).symlink_to(entry)
    with pytest.raises(SystemExit, match=rf"^evaluate.py: error: {tmp / 'run' / 'vision' / 'final'}: no vision side "
                                         rf"yet; run `python "
                                         r"train.py --stage vision`"):
        evaluate.main(["--task", "avqa", "--limit", "2", *opts(tmp, *vision), f"--data-root={root}"])
    assert not (root / "avqa").exists()
    real = tmp_path / "real"  # a folder of other data: no synthetic pictures are made there, and none are there
    real.mkdir()
    (real / "audioset").symlink_to(trained / "synth" / "audioset")
    with pytest.raises(SystemExit, match=rf"^train.py: error: {re.escape(str(real / 'vision' / 'pictures_val.json'))}: "
                                         r"not there; --stage vision trains on the synthetic pictures"):
        train.main(["--stage", "vision", *opts(tmp, *vision), f"--data_root={real}"])
    assert [p.name for p in real.iterdir()] == ["audioset"]
    train.main(["--stage", "vision", *opts(tmp, *vision)])
    final = tmp / "run" / "vision" / "final"
    assert {"vision.json", "vision.safetensors"} <= {f.name for f in final.iterdir()}
    saved = json.loads((final / "vision.json").read_text())
    assert saved["qformer"]["num_queries"] == 2 and saved["vit"]["depth"] == 1
    log = [json.loads(line) for line in (tmp / "run" / "vision" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # the first phase aligns pictures and texts without the LLM (no answer loss), then the LLM's answers join in
    assert "loss_align" in steps[0] and "answer" not in steps[0] and steps[0]["atc"] > 0
    assert all("answer" in r and "loss_align" not in r for r in steps[1:])

    evaluate.main(["--task", "avqa", "--limit", "6", *opts(tmp, *vision), f"--out={tmp / 'eval'}"])
    metrics = json.loads((tmp / "eval" / "metrics_avqa.json").read_text())
    assert [m["metric"] for m in metrics[:9]] == [f"{mode}, {how}" for mode in MODES
                                                  for how in ("option named", "option likelihood", "cloze likelihood")]
    *metrics, scored = metrics
    assert all(0 <= m["apt"] <= 1 for m in metrics)
    assert scored["metric"] == "videos scored" and " 0 missing, 0 unreadable" in scored["protocol"]
    predictions = [json.loads(line) for line in (tmp / "eval" / "predictions_avqa.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 and set(MODES) <= set(predictions[0])
    table = capsys.readouterr().out
    assert "\navqa " in table and "videos scored" in table and f"metrics written to {tmp / 'eval'}/" in table
    elsewhere = [*opts(tmp, *vision, f"--vision_path={final}"), f"--run_dir={tmp / 'other'}"]  # a vision side
    evaluate.main(["--task", "avqa", "--limit", "6", *elsewhere, f"--checkpoint={tmp / 'run' / 'stage2' / 'final'}",
                   f"--out={tmp / 'eval2'}"])  # trained here, named by --vision_path: the same answers
    answers = [(tmp / out / "predictions_avqa.jsonl").read_text() for out in ("eval", "eval2")]
    assert answers[0] == answers[1]
    made = json.loads((tmp / "eval" / "made_avqa.json").read_text())  # what made them: the frames a video too
    cfg = load_config("tiny", opts(tmp, *vision))
    assert (made["limit"], made["avqa_frames"], made["avqa_blocks_apart"]) == (6, cfg.avqa_frames, False)
    assert (made["preset"], made["data_root"], made["vision_path"]) == ("tiny", str(cfg.data_root), "")
    made = json.loads((tmp / "eval2" / "made_avqa.json").read_text())
    assert made["vision_path"] == str(final)
    lost = tmp_path / "lost"  # a copy whose first test video has lost its audio: --strict stops there
    shutil.copytree(trained / "synth", lost, copy_function=os.symlink)
    gone = Path(data.avqa_items(lost, "test", cfg.avqa_frames)[0]["audio"])
    gone.unlink()
    with pytest.raises(SystemExit, match=rf"^evaluate.py: error: {re.escape(str(gone))}: audio listed in "):
        evaluate.main(["--task", "avqa", "--limit", "2", "--strict", *opts(tmp, *vision), f"--data-root={lost}",
                       f"--out={tmp / 'eval3'}"])
    evaluate.main(["--task", "avqa", "--limit", "2", *opts(tmp, *vision), f"--data-root={lost}",
                   f"--out={tmp / 'eval3'}"])  # without: skipped, counted and listed
    assert (tmp / "eval3" / "missing_avqa.txt").read_text().startswith(f"{gone}\tmissing (listed in ")
    # the setting that keeps the visual and the acoustic prompts apart reaches the model (tiny: off, as the paper)
    for setting, apart in (([], False), (["--avqa_blocks_apart=true"], True)):
        cfg = load_config("tiny", [*opts(tmp, *vision), *setting])
        assert load_apt_blip2(cfg, resolve_checkpoint(cfg, None)).blocks_apart is apart
    cfg = load_config("tiny", [*opts(tmp, *vision), "--feature_cache=off", "--decode_threads=2"])  # and decode_threads
    assert load_apt_blip2(cfg, resolve_checkpoint(cfg, None)).apt.read_ahead.pool._max_workers == 2
    (tmp / "run" / "encoder.safetensors").unlink()  # the run's encoder is gone: said, not made anew at random
    with pytest.raises(MissingFileError, match="encoder.safetensors: the tiny preset's encoder is not there"):
        load_apt_blip2(load_config("tiny", opts(tmp, *vision)), tmp / "run" / "stage2" / "final")
    assert not (tmp / "run" / "encoder.safetensors").exists()


def test_probe_avqa_asks_as_the_evaluation_does(with_vision):
    """benchmarks/probe_avqa.py, its third part: the sequences of audio only, video only and audio + video score the
    options exactly as the evaluation's cloze form does (APTBLIP2.answer), the one-frame sequence holds the first
    frame's prompts alone, and the rates it returns count those scores' right answers."""
    from benchmarks.probe_avqa import frames, picture_and_sound, variants

    cfg = load_config("tiny", opts(with_vision, *VISION))
    model = load_apt_blip2(cfg, resolve_checkpoint(cfg, None))
    items = data.avqa_items(cfg.data_root, "test", cfg.avqa_frames, True)
    kinds = {k: [i for i in items if i["relation"] == k][:2] for k in ("Sound", "Both", "View")}
    per_frame = model.blip.qformer.config.num_queries
    want = {name: dict.fromkeys(kinds, 0.0) for name in ("audio only", "video only", "audio + video")}
    for kind, chosen in kinds.items():
        for item in chosen:
            pixels = frames(model, item)
            visual = model.blip.frame_prompts(pixels, item["question"])
            asked = variants(item, visual, torch.zeros_like(visual), per_frame)
            answers = model.answer(item["question"], item["options"], frames=pixels, audio=item["audio"])
            feats = model.apt.encode_clips([item["audio"]], strict=True)[0]
            for name, mode in (("audio only", "audio"), ("video only", "video"), ("audio + video", "audio-visual")):
                got = model.apt.choice_logprob(asked[name], item["options"], feats, model.blocks_apart)
                torch.testing.assert_close(got, answers[mode].cloze)
                want[name][kind] += (int(answers[mode].cloze.argmax()) == item["answer"]) / len(chosen)
            torch.testing.assert_close(asked["audio + video, one frame"][0][1],
                                       model.blip.frame_prompts(pixels[:1], item["question"]))
            laid_out = {name: [kind for kind, _ in segments] for name, segments in asked.items()}
            assert laid_out["audio + video"] == ["prompts", "audio", "text"]  # AVQA's order: the picture first
            assert laid_out["video after audio"] == ["audio", "prompts", "text"]
    right = picture_and_sound(model, kinds, per_frame)
    assert len(right) == 8 and all(right[name] == pytest.approx(want[name]) for name in want)


def test_probe_avqa_ranks_from_the_likeliest():
    """probe_avqa.mean_rank: where each wanted name ranks among all names by the APT's likelihood, 0 the likeliest."""
    from benchmarks.probe_avqa import mean_rank

    class Likelihoods:  # an APT whose scores of the names are given
        @staticmethod
        def choice_logprob(segments, names, feats):
            return torch.tensor([-3.0, -1.0, -7.0, -2.0])

    assert mean_rank(Likelihoods(), [], {}, ["cat", "bell", "dog", "car"], ["bell", "dog", "car"]) == [0, 3, 1]


def test_probe_avqa_puts_the_previous_questions_video_beside_each_one():
    """probe_avqa.sides_followed: each question's "another video" is the one asked before it (the first's: the
    last), never its own; the rates count how often the likeliest option is pictured, heard and right."""
    from benchmarks.probe_avqa import MIXES, sides_followed

    pairs = []

    class Scores:  # an APT-BLIP-2 whose likeliest option is always the first
        blocks_apart = False

        class blip:  # noqa: N801
            processing = staticmethod(lambda path: torch.zeros(3, 4, 4))
            frame_prompts = staticmethod(lambda pixels, question: torch.zeros(len(pixels), 2, 8))

        class apt:  # noqa: N801
            @staticmethod
            def encode_clips(paths, strict):
                pairs.append(tuple(paths))
                return dict.fromkeys(paths), []

            @staticmethod
            def choice_logprob(segments, options, feats, apart):
                return torch.tensor([0.0, -1.0, -2.0, -3.0])

    items = [{"video": f"v{i}", "question": "q", "audio": f"v{i}.wav", "frames": ["f"], "options": list("abcd"),
              "answer": i % 2} for i in range(3)]
    rates = sides_followed(Scores(), items, {f"v{i}": {"pictured": ["a"], "heard": ["b"]} for i in range(3)})
    assert pairs == [("v0.wav", "v2.wav"), ("v1.wav", "v0.wav"), ("v2.wav", "v1.wav")]
    assert set(rates) == set(MIXES) and rates["video only"].tolist() == pytest.approx([1.0, 0.0, 2 / 3])


def test_probe_avqa_tells_each_sense_in_words(with_vision):
    """benchmarks/probe_avqa.py, its fourth part: each side's content in words (the pictured objects as seen, the
    heard as heard), and its rates are the questions whose likeliest option, after those words, is the answer."""
    from benchmarks.probe_avqa import in_words, told_in_words

    video = {"pictured": ["wind", "drum"], "heard": ["drum", "hiss"]}
    assert in_words(video, "sentences") == {
        "picture": "The picture shows a wind and a drum.", "sound": "The sound is of a drum and a hiss.",
        "both": "The picture shows a wind and a drum. The sound is of a drum and a hiss."}
    assert in_words(video, "lists")["both"] == "Seen: wind, drum. Heard: drum, hiss."
    three = {"pictured": ["bell", "drum", "wind"], "heard": ["drum"]}
    assert in_words(three, "sentences")["both"] == ("The picture shows a bell, a drum and a wind. "
                                                    "The sound is of a drum.")
    cfg = load_config("tiny", opts(with_vision, *VISION))
    model = load_apt_blip2(cfg, resolve_checkpoint(cfg, None))
    truth = {q["video_name"]: q for q in json.loads((Path(cfg.data_root) / "avqa" / "val_qa.json").read_text())}
    items = data.avqa_items(cfg.data_root, "test", cfg.avqa_frames, True)[:4]
    for listed in (False, True):
        right = told_in_words(model, items, truth, "sentences", listed)
        for m in ("picture", "sound", "both"):
            want = []
            for item in items:
                question = avqa_prompt(item["question"], item["options"]) if listed else item["question"]
                told = in_words(truth[item["video"]], "sentences")[m]
                scores = model.apt.choice_logprob([("text", f"{told} {question}")], item["options"], {})
                want.append(int(scores.argmax()) == item["answer"])
            assert right[m].tolist() == want


def test_a_quarter_of_the_questions_need_the_picture_a_quarter_the_sound_and_half_both(av):
    """docs/choices.md: a quarter ask "Which object can be seen?" (View), a quarter "Which object can be heard?"
    (Sound), half "Which object in the picture is making a sound?" (Both); the answer may stand at any of the four
    places (none is given away by its position), and the distractors no sense speaks to are drawn from all the
    other classes."""
    from collections import Counter

    items = json.loads((av / "avqa" / "val_qa.json").read_text())
    asked = Counter((i["question_relation"], i["question_text"]) for i in items)
    assert asked == {("Both", "Which object in the picture is making a sound?"): 12,
                     ("View", "Which object can be seen?"): 6, ("Sound", "Which object can be heard?"): 6}
    rng, places, offered = random.Random(0), Counter(), set()
    for _ in range(400):
        _, options, answer = synth_av.av_question(rng, rng.choice(synth_av.KINDS), NAMES[:3], NAMES[1:2] + NAMES[3:4])
        places[answer] += 1
        offered |= set(options)
    assert set(places) == {0, 1, 2, 3} and min(places.values()) > 60 and offered == set(NAMES)


def test_videos_draw_every_class_and_one_or_two_pictured_objects_sound(monkeypatch):
    """make_video: over all 24 classes, a picture of one or two sounding objects and one silent one (which may stand
    anywhere in the pictured list), and one more object heard from outside the picture."""
    monkeypatch.setattr(synth, "make_scene", lambda rng, classes, length, n_types: (np.zeros(8), []))
    monkeypatch.setattr(synth_av, "draw_frames", lambda rng, objects, frames: [])
    rng, trng = np.random.default_rng(0), random.Random(0)
    used, sounding, silent_at = set(), set(), set()
    for _ in range(200):
        _, _, pictured, heard = synth_av.make_video(rng, trng, 5.12, 4)
        used |= {*pictured, *heard}
        sounding.add(len(set(pictured) & set(heard)))
        [silent] = set(pictured) - set(heard)
        silent_at.add(pictured.index(silent))
        assert len(set(heard) - set(pictured)) == 1 and len(set(pictured)) == len(pictured)
    assert used == set(NAMES) and sounding == {1, 2} and silent_at == {0, 1, 2}


def test_the_six_shapes_differ():
    """Each look is a shape and a colour: the six shapes, drawn in the same 14-pixel box, differ from each other by
    a good share of their pixels (else two looks of one colour could hardly be told apart; a ten-sided star's
    outline would pass for a circle)."""
    import itertools

    from PIL import Image, ImageDraw

    masks = {}
    for shape in synth_av.SHAPES:
        image = Image.new("L", (16, 16))
        synth_av.draw_shape(ImageDraw.Draw(image), shape, (1, 1, 14, 14), 255)
        masks[shape] = np.asarray(image) > 0
    for a, b in itertools.combinations(synth_av.SHAPES, 2):
        assert (masks[a] != masks[b]).sum() >= 25, (a, b)


def test_objects_drift_a_pixel_at_most_over_a_pale_background():
    """draw_frames: each object stays within a pixel of its layout box (and does drift, either way: two frames of one
    picture may lie two pixels apart), on a pale background."""
    drifted = both_ways = False
    for seed in range(20):
        name = NAMES[seed]
        [(x, y, s)] = synth_av.layout(np.random.default_rng(seed), 1)  # draw_frames's first draws
        frames = synth_av.draw_frames(np.random.default_rng(seed), [name], 4)
        starts = set()
        for frame in frames:
            pixels = np.asarray(frame).astype(int)
            at = np.abs(pixels - np.array(synth_av.COLOURS[synth_av.LOOKS[name][1]])).sum(-1) < 60
            ys, xs = np.nonzero(at)
            assert xs.min() >= x - 1 and ys.min() >= y - 1 and xs.max() <= x + s + 1 and ys.max() <= y + s + 1
            starts.add((xs.min(), ys.min()))
            outside = np.ones((synth_av.SIZE, synth_av.SIZE), bool)
            outside[max(0, y - 2):y + s + 3, max(0, x - 2):x + s + 3] = False
            assert (pixels[outside].min(-1) >= 150).mean() > 0.99  # pale
        drifted |= len(starts) > 1
        both_ways |= any(max(at) - min(at) == 2 for at in zip(*starts))
    assert drifted and both_ways


def test_the_written_set_is_in_avqas_form_and_its_pictures_are_each_their_own_files(av):
    """val_qa.json: one id and one video_id per video, the question_type the question's first word (AVQA's types);
    the vision stage's validation pictures: every frame its own file, read back as the picture drawn, showing its
    record's objects."""
    from PIL import Image

    items = json.loads((av / "avqa" / "val_qa.json").read_text())
    for key in ("id", "video_id", "video_name"):
        assert len({i[key] for i in items}) == len(items), key
    assert all(i["question_type"] == i["question_text"].split()[0] for i in items)
    records = json.loads((av / "vision" / "pictures_val.json").read_text())
    paths = [p for r in records for p in r["frames"]]
    assert len(set(paths)) == len(paths) > len(records)  # some pictures have two frames
    for record in records:
        drawn = {synth_av.LOOKS[name][1] for name in record["objects"]}
        assert all(colours(np.asarray(Image.open(av / p)).astype(int)) == drawn for p in record["frames"])
    looks = json.loads((av / "avqa" / "synth_av.json").read_text())["looks"]
    assert {name: tuple(look) for name, look in looks.items()} == synth_av.LOOKS  # which look each class has


def test_pictures_hold_one_to_three_objects_in_one_or_two_frames_and_describe_them():
    """random_picture: one to three objects (a video's picture has two or three), in one or two frames;
    picture_example's description is the documented sentence, and an unknown task is refused."""
    rng, counts, frames = random.Random(1), set(), set()
    for _ in range(60):
        record = synth_av.random_picture(rng)
        counts.add(len(record["objects"]))
        frames.add(len(record["frames"]))
    assert counts == {1, 2, 3} and frames == {1, 2}
    _, _, _, description = synth_av.picture_example({"frames": [], "objects": ["bell", "drum"]}, "describe", rng)
    assert description == "A picture of a bell and a drum."
    with pytest.raises(ValueError, match="unknown picture task 'draw'"):
        synth_av.picture_example({"frames": [], "objects": ["bell"]}, "draw", rng)


def test_the_command_line_writes_the_set_a_full_size_run_makes(tmp_path, monkeypatch):
    """`python -m apt_min.synth_av` with its defaults writes what build.ensure_av_data writes at synth_scale 1, so
    the one after the other is a no-op, not a refusal."""
    import inspect

    from apt_min import build

    asked = {}
    monkeypatch.setattr(synth_av, "generate", lambda out, seed, **kw: asked.update(seed=seed, **kw))
    monkeypatch.setattr(build, "ensure_data", lambda cfg: None)
    build.ensure_av_data(load_config("tiny", [f"--data_root={tmp_path / 'synth'}", "--synth_scale=1"]))
    monkeypatch.undo()
    defaults = {k: p.default for k, p in inspect.signature(synth_av.generate).parameters.items() if k != "out"}
    args = {"version": synth_av.VERSION, "synth": synth.VERSION, **defaults, **asked}
    (tmp_path / "synth" / "avqa").mkdir(parents=True)
    (tmp_path / "synth" / "avqa" / "synth_av.json").write_text(json.dumps({"args": args}))
    synth_av.main(["--out", str(tmp_path / "synth")])  # the same arguments: nothing written, nothing refused
    assert not (tmp_path / "synth" / "avqa" / "val_qa.json").exists()

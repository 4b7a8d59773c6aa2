"""Readers on small files written by hand in each real format (quirks and broken rows); parsers; batching."""

import json
import logging
import random
import re
from pathlib import Path

import pytest

from apt_min import data, evaluation, tasks
from apt_min.config import load_config
from apt_min.data import DataError
from apt_min.errors import SettingError
from train import sources

AUDIOSET = ('# Segments csv created Sun Mar  5 10:54:31 2017\n'
            '# num_ytids=22160, num_segs=22160, num_unique_labels=527, num_positive_labels=52882\n'
            '# YTID, start_seconds, end_seconds, positive_labels\n'
            '--4gqARaEJE, 0.000, 10.000, "/m/068hy,/m/07q6cd_,/m/0bt9lr,/m/0jbk"\n'
            '--BfvyPmVMo, 20.000, 30.000, "/m/03l9g"\n')
CLASSES = ('index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/05zppz,"Male speech, man speaking"\n'
           '2,/m/068hy,"Domestic animals, pets"\n3,/m/07q6cd_,"Squeak"\n4,/m/0bt9lr,"Dog"\n5,/m/0jbk,"Animal"\n'
           '6,/m/03l9g,"Hammer"\n')


def write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def touch_audio(root, *names):
    for n in names:
        write(root / n, "RIFF")  # existence is all the readers check


def test_audioset_segments_and_classes(tmp_path):
    rows = data.read_audioset_segments(write(tmp_path / "eval_segments.csv", AUDIOSET))
    assert rows[0] == ("--4gqARaEJE", 0.0, 10.0, ["/m/068hy", "/m/07q6cd_", "/m/0bt9lr", "/m/0jbk"])
    assert rows[1] == ("--BfvyPmVMo", 20.0, 30.0, ["/m/03l9g"])
    names = data.read_class_labels(write(tmp_path / "class_labels_indices.csv", CLASSES))
    assert names["/m/05zppz"] == "Male speech, man speaking" and list(names)[0] == "/m/09x0r"


@pytest.mark.parametrize("line, problem", [('abcdefghijk, 0.000, "/m/0jbk"\n', "expected YTID"),
                                           ('abcdefghijk, zero, 10.000, "/m/0jbk"\n', "start 'zero' is not"),
                                           ('abcdefghijk, 0.000, ten, "/m/0jbk"\n', "end 'ten' is not")])
def test_audioset_broken_rows_name_file_and_line(tmp_path, line, problem):
    path = write(tmp_path / "bad.csv", AUDIOSET + line)
    with pytest.raises(DataError, match=rf"bad.csv:6: .*{problem}"):
        data.read_audioset_segments(path)


@pytest.mark.parametrize("reader, empty", [
    ("read_audioset_segments", "# Segments csv created Sun Mar  5 10:54:31 2017\n# num_ytids=0\n"),
    ("read_class_labels", "index,mid,display_name\n"), ("read_mid_to_name", "\n"),
    ("read_strong_labels", "segment_id\tstart_time_seconds\tend_time_seconds\tlabel\n"),
    ("read_audiocaps", "audiocap_id,youtube_id,start_time,caption\n"),
    ("read_clotho_captions", "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"),
    ("read_clotho_aqa", "file_name,QuestionText,answer,confidence\n"),
    ("read_wavcaps", '{"num_captions_per_audio": 1, "data": []}'),
    ("read_esc50", "filename,fold,target,category,esc10,src_file,take\n"), ("read_nlar", "[]"), ("read_avqa", "[]")])
def test_every_reader_refuses_a_file_that_lists_nothing(tmp_path, reader, empty):
    """A list cut short by a failed download (its header, no rows): an error naming the file, not an empty split
    that trains or scores on nothing."""
    path = write(tmp_path / "list.txt", empty)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: lists nothing"):
        getattr(data, reader)(path)


def test_a_segment_labelled_with_an_unknown_class_names_the_file(tmp_path):
    """A segments list whose labels are not all in class_labels_indices.csv (a list from another AudioSet release):
    a DataError naming the file, the clip and the labels, not a KeyError."""
    write(tmp_path / "audioset/class_labels_indices.csv", CLASSES)
    write(tmp_path / "audioset/eval_segments.csv", AUDIOSET.replace("/m/03l9g", "/m/0unknown"))
    touch_audio(tmp_path, "audio/Y--4gqARaEJE.wav", "audio/Y--BfvyPmVMo.wav")
    with pytest.raises(DataError, match=r"eval_segments.csv: --BfvyPmVMo has labels not in class_labels_indices.csv: "
                                        r"\['/m/0unknown'\]"):
        data.examples("tagging", tmp_path, "test")


def test_strong_labels(tmp_path):
    tsv = ("segment_id\tstart_time_seconds\tend_time_seconds\tlabel\n"
           "s9d-2nhuJCQ_30000\t2.627\t7.237\t/m/053hz1\n"
           "s9d-2nhuJCQ_30000\t0.000\t10.000\t/m/03m9d0z\n"
           "a_b_cdefghi_0\t1.5\t2.25\t/m/0jbk\n"
           "zyxwvutsrqp_12345\t0.5\t1.0\t/m/0jbk\n")
    labels = data.read_strong_labels(write(tmp_path / "strong.tsv", tsv))
    assert labels[("zyxwvutsrqp", 12.345)] == [("/m/0jbk", 0.5, 1.0)]  # a clip start in milliseconds, not seconds
    assert labels[("s9d-2nhuJCQ", 30.0)] == [("/m/053hz1", 2.627, 7.237), ("/m/03m9d0z", 0.0, 10.0)]
    assert labels[("a_b_cdefghi", 0.0)] == [("/m/0jbk", 1.5, 2.25)]  # ids may contain '_': split at the last
    with pytest.raises(DataError, match=r"strong2.tsv:2: segment_id 'nomilliseconds'"):
        data.read_strong_labels(write(tmp_path / "strong2.tsv", tsv.replace("s9d-2nhuJCQ_30000", "nomilliseconds")))
    mids = data.read_mid_to_name(write(tmp_path / "m.tsv", "/g/11b630rrvh\tKettle whistle\n  \n/m/0jbk\tAnimal\n"))
    assert mids == {"/g/11b630rrvh": "Kettle whistle", "/m/0jbk": "Animal"}
    with pytest.raises(DataError, match=r"m2.tsv:2: expected `mid<TAB>display name`"):
        data.read_mid_to_name(write(tmp_path / "m2.tsv", "/m/0jbk\tAnimal\n/m/x Dog\n"))


def test_audiocaps(tmp_path):
    text = ("audiocap_id,youtube_id,start_time,caption\r\n"
            "97151,vfY_TJq7n_U,130,Rustling occurs; ducks quack and water splashes\r\n"
            '108945,tdWhHV3X25Q,60,"A man speaks, then a dog barks"\r\n'
            "97152,vfY_TJq7n_U,130,Ducks quack over rustling\r\n")
    rows = data.read_audiocaps(write(tmp_path / "audiocaps" / "test.csv", text))
    assert rows[1] == (108945, "tdWhHV3X25Q", 60, "A man speaks, then a dog barks")
    touch_audio(tmp_path, "audio/YvfY_TJq7n_U.wav", "audio/YtdWhHV3X25Q.wav")
    ex = data.examples("captioning", tmp_path, "test")  # a clip's rows need not be adjacent
    refs = ["Rustling occurs; ducks quack and water splashes", "Ducks quack over rustling"]
    assert ex[0].target["references"] == refs
    drawn = data.examples("captioning", tmp_path, "test", rng=random.Random(0))  # training: one per caption
    assert sorted(e.answer for e in drawn) == sorted([*refs, "A man speaks, then a dog barks"])
    with pytest.raises(DataError, match=r"val.csv:2: audiocap_id and start_time must be whole numbers"):
        data.read_audiocaps(write(tmp_path / "val.csv", text.replace("130,Rustling", "13.5,Rustling")))
    with pytest.raises(DataError, match=r"x.csv:1: expected the header"):
        data.read_audiocaps(write(tmp_path / "x.csv", "id,ytid,start,caption\n"))


def test_clotho_latin1_and_spaces(tmp_path):
    caps = "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n" \
           "Distorted AM Radio noise.wav,a radio hums,static crackles,noise plays,a caf\xe9 radio,a,b\n"
    with pytest.raises(DataError, match=r"clotho_captions_evaluation.csv:2: expected 6 fields, found 7"):
        data.read_clotho_captions(write(tmp_path / "clotho/clotho_captions_evaluation.csv", caps, "latin-1"))
    write(tmp_path / "clotho/clotho_captions_evaluation.csv", caps.replace(",a,b\n", ", ab \n"), "latin-1")
    rows = data.read_clotho_captions(tmp_path / "clotho/clotho_captions_evaluation.csv")
    assert rows == [("Distorted AM Radio noise.wav", ["a radio hums", "static crackles", "noise plays",
                                                       "a caf\xe9 radio", "ab"])]
    aqa = ("file_name,QuestionText,answer,confidence\n"
           "Bell ringing.wav,Is a bell ringing?,Yes,yes\nBell ringing.wav,Is a bell ringing?,yes.,yes\n"
           "Bell ringing.wav,Is a bell ringing?,no,maybe\nBell ringing.wav,How many rings?,Two,yes\n"
           "Bell ringing.wav,How many rings?,2,yes\nBell ringing.wav,How many rings?,three,no\n")
    write(tmp_path / "clotho_aqa/clotho_aqa_test.csv", aqa, "latin-1")
    touch_audio(tmp_path, "clotho_aqa/audio_files/Bell ringing.wav")
    ex = data.examples("aqa", tmp_path, "test")
    assert [(e.segments[1][1], e.target["answer"], e.answer) for e in ex] == [
        ("Is a bell ringing?", "yes", "yes"), ("How many rings?", "2", "two")]


def test_wavcaps_leaves_out_the_clips_its_blacklists_name(tmp_path, caplog):
    """WavCaps's blacklists name its clips that are also test clips of AudioCaps, Clotho or ESC-50 ({"AudioSet":
    ["Y...wav"], "FreeSound": ["156"]}, by subset): they are never trained on. A blacklist that is not there is
    said, once, naming the file."""
    items = [{"id": f"{y}.wav", "caption": f"clip {y}"} for y in ("Yaaaaaaaaaaa", "Ybbbbbbbbbbb", "Ycccccccccc")]
    write(tmp_path / "wavcaps/json_files/AudioSet_SL/as_final.json", json.dumps({"data": items}))
    write(tmp_path / "wavcaps/json_files/FreeSound/fsd_final.json", json.dumps({"data": [
        {"id": "156", "caption": "a test clip"}, {"id": "157", "caption": "kept"}]}))
    touch_audio(tmp_path, *[f"wavcaps/AudioSet_SL/{d['id'][:-4]}.flac" for d in items],
                "wavcaps/FreeSound/156.flac", "wavcaps/FreeSound/157.flac")
    [test_ac, esc50] = [tmp_path / f for f in data.LAYOUT["wavcaps"]["blacklists"]]

    def captions(subset):
        return [ex.answer for ex in data.examples("captioning", tmp_path, "train", source=f"wavcaps:{subset}",
                                                  rng=random.Random(0))]

    write(test_ac, json.dumps({"AudioSet": ["Ybbbbbbbbbbb.wav"], "FreeSound": ["156"]}))
    with caplog.at_level("INFO"):
        assert captions("AudioSet_SL") == ["clip Yaaaaaaaaaaa", "clip Ycccccccccc"]
        assert captions("FreeSound") == ["kept"]
    assert caplog.text.count(f"{esc50}: WavCaps's blacklist is not there") == 1  # said once
    for subset, name in (("AudioSet_SL", "as_final"), ("FreeSound", "fsd_final")):  # how many were left out: said
        assert f"{subset}/{name}.json: 1 clips left out" in caplog.text
    write(esc50, json.dumps({"AudioSet": ["Ycccccccccc.wav"]}))
    assert captions("AudioSet_SL") == ["clip Yaaaaaaaaaaa"]
    write(esc50, json.dumps(["Ycccccccccc.wav"]))
    with pytest.raises(DataError, match=r"blacklist_exclude_ub8k_esc50_vggsound.json: expected an object of id lists"):
        captions("AudioSet_SL")


def test_a_wavcaps_layout_without_names_or_blacklists(tmp_path, caplog):
    """A layout= whose WavCaps entry gives only its files ("json", "audio"): a subset's JSON is then
    json_files/{subset}.json, and no blacklist is read or warned about."""
    lay = {"wavcaps": {"json": "unused/{subset}/{name}.json", "audio": "wavcaps/{subset}/{stem}.flac"}}
    write(tmp_path / "wavcaps/json_files/FreeSound.json", json.dumps({"data": [{"id": "156", "caption": "kept"}]}))
    touch_audio(tmp_path, "wavcaps/FreeSound/156.flac")
    with caplog.at_level("WARNING"):
        ex = data.examples("captioning", tmp_path, "train", source="wavcaps:FreeSound", layout=lay)
    assert [e.answer for e in ex] == ["kept"] and "blacklist" not in caplog.text


def test_wavcaps_audioset_clips_that_audioset_tests_on_are_left_out(tmp_path, caplog):
    """WavCaps's AudioSet_SL subset holds clips of AudioSet's evaluation lists that its blacklists do not name
    (about 6 000 of eval_segments.csv): the tagging and detection test clips would be trained on. Its clips whose
    YouTube id AudioSet's test lists name are left out; lists that are not there are said, once each."""
    items = [{"id": f"{y}.wav", "caption": f"clip {y}"} for y in ("Yaaaaaaaaaaa", "Ybbbbbbbbbbb_30.000",
                                                                  "Yccccccccccc")]
    write(tmp_path / "wavcaps/json_files/AudioSet_SL/as_final.json", json.dumps({"data": items}))
    touch_audio(tmp_path, *[f"wavcaps/AudioSet_SL/{d['id'][:-4]}.flac" for d in items])
    for blacklist in data.LAYOUT["wavcaps"]["blacklists"]:
        write(tmp_path / blacklist, "{}")

    def captions():
        return [ex.answer for ex in data.examples("captioning", tmp_path, "train", source="wavcaps:AudioSet_SL",
                                                  rng=random.Random(0))]

    with caplog.at_level("WARNING"):
        assert len(captions()) == 3 and len(captions()) == 3
    for name in ("eval_segments.csv", "audioset_eval_strong.tsv"):
        assert caplog.text.count(f"audioset/{name}: AudioSet's test list is not there") == 1
    write(tmp_path / "audioset/eval_segments.csv", AUDIOSET.replace("--BfvyPmVMo", "aaaaaaaaaaa"))
    write(tmp_path / "audioset/audioset_eval_strong.tsv", "segment_id\tstart_time_seconds\tend_time_seconds\t"
          "label\nbbbbbbbbbbb_30000\t1.0\t2.5\t/m/09x0r\n")
    assert captions() == ["clip Yccccccccccc"]
    # a subset of one's own, not named in LAYOUT (its JSON: json_files/{subset}.json), whose name starts with
    # AudioSet is read against AudioSet's test lists too; a clip named by its id alone is known by it, and a name
    # whose 11 characters after the Y run on is not that id
    more = [{"id": f"{y}.flac", "caption": f"clip {y}"} for y in ("aaaaaaaaaaa", "Yaaaaaaaaaaab", "ddddddddddd")]
    write(tmp_path / "wavcaps/json_files/AudioSet_more.json", json.dumps({"data": more}))
    touch_audio(tmp_path, *[f"wavcaps/AudioSet_more/{d['id'][:-5]}.flac" for d in more])
    assert [ex.answer for ex in data.examples("captioning", tmp_path, "train", source="wavcaps:AudioSet_more",
                                              rng=random.Random(0))] == ["clip Yaaaaaaaaaaab", "clip ddddddddddd"]


def test_an_audio_pattern_with_a_field_its_records_lack_is_a_setting_error(tmp_path):
    """LAYOUT's audio patterns are filled from each record's fields: a pattern naming another field (a folder per
    split, say) is one clear error naming the pattern and the fields it may use; so is a split Clotho or AudioSet
    lacks."""
    write(tmp_path / "audioset/eval_segments.csv", AUDIOSET)
    write(tmp_path / "audioset/class_labels_indices.csv", CLASSES)
    layout = {**data.LAYOUT, "audioset": {**data.LAYOUT["audioset"], "audio": "audios/{split}/Y{ytid}.wav"}}
    with pytest.raises(SettingError, match=r"'audios/\{split\}/Y\{ytid\}.wav' .*eval_segments.csv.*"
                                           r"KeyError: 'split'.*its fields are \{ytid\}, \{start\}, \{end\}, "
                                           r"\{list\}"):
        data.examples("tagging", tmp_path, "test", layout=layout)
    with pytest.raises(DataError, match=r"Clotho has no 'dev' split here; it has \['test', 'train', 'val'\]"):
        data.examples("captioning", tmp_path, "dev", source="clotho")
    with pytest.raises(DataError, match=r"AudioSet has no 'dev' split here; it has \['balanced', 'test', 'train', "
                                        r"'unbalanced'\]"):
        data.examples("tagging", tmp_path, "dev")
    with pytest.raises(DataError, match=r"AudioSet strong labels have no 'dev' split here; they have \['test', "
                                        r"'train'\]"):
        data.examples("sed", tmp_path, "dev")


def test_a_download_tools_folders_are_patterns_too(tmp_path):
    """PANNs keeps AudioSet's clips in a folder per segment list (the unbalanced one over 41 part folders), aac-
    datasets AudioCaps's in a folder per split: AudioSet's pattern may name {list} (the segment file's name) and
    {end}, AudioCaps's {split}, and a "**" stands for any folders below, the file found by its name (a name found
    twice there is an error naming both). A file saved from Excel reads as Windows-1252, its quotes intact."""
    write(tmp_path / "audioset/eval_segments.csv", AUDIOSET)
    write(tmp_path / "audioset/class_labels_indices.csv", CLASSES)
    touch_audio(tmp_path, "audios/eval_segments/part00/Y--4gqARaEJE.wav",
                "audios/eval_segments/part07/Y--BfvyPmVMo.wav")
    write(tmp_path / "audiocaps/test.csv", "audiocap_id,youtube_id,start_time,caption\n7,abcdefghijk,30,A dog barks\n")
    touch_audio(tmp_path, "caps/test/abcdefghijk_30_40.flac")
    touch_audio(tmp_path, "dcase/Y--4gqARaEJE_0.000_10.000.wav")
    write(tmp_path / "layout.json", json.dumps({"audioset": {"audio": "dcase/Y{ytid}_{start:.3f}_{end:.3f}.wav"}}))
    assert len(data.examples("tagging", tmp_path, "test")) == 1  # the list's own end: 10.000, 30.000
    write(tmp_path / "layout.json", json.dumps({"audioset": {"audio": "audios/{list}/**/Y{ytid}.wav"},
                                                "audiocaps": {"audio": "caps/{split}/{ytid}_{start}_{end}.flac"}}))
    found = data.examples("tagging", tmp_path, "test", strict=True)
    assert [ex.segments[0][1] for ex in found] == [str(tmp_path / "audios/eval_segments/part00/Y--4gqARaEJE.wav"),
                                                   str(tmp_path / "audios/eval_segments/part07/Y--BfvyPmVMo.wav")]
    with pytest.raises(SettingError, match=r"KeyError: 'end'.*its fields are \{ytid\}, \{start\}, \{split\}"):
        data.examples("captioning", tmp_path, "test", source="audiocaps")  # AudioCaps lists no end
    write(tmp_path / "layout.json", json.dumps({"audiocaps": {"audio": "caps/{split}/{ytid}_{start}_40.flac"}}))
    [caption] = data.examples("captioning", tmp_path, "test", source="audiocaps", strict=True)
    assert caption.segments[0][1] == str(tmp_path / "caps/test/abcdefghijk_30_40.flac")
    touch_audio(tmp_path, "audios/eval_segments/part09/Y--BfvyPmVMo.wav")
    data._files_below.cache_clear()  # (read once per process)
    write(tmp_path / "layout.json", json.dumps({"audioset": {"audio": "audios/{list}/**/Y{ytid}.wav"}}))
    with pytest.raises(DataError, match=r"part0[79]/Y--BfvyPmVMo.wav and .*part0[79]/Y--BfvyPmVMo.wav: two files of "
                                        r"one name below .*audios/eval_segments"):
        data.examples("tagging", tmp_path, "test")
    aqa = "file_name,QuestionText,answer,confidence\nBell.wav,What\u2019s ringing \u201cnow\u201d?,a bell,yes\n"
    write(tmp_path / "clotho_aqa/clotho_aqa_test.csv", aqa, "cp1252")  # bytes 0x92, 0x93, 0x94
    [(_, question, _, _)] = data.read_clotho_aqa(tmp_path / "clotho_aqa/clotho_aqa_test.csv")
    assert question == "What\u2019s ringing \u201cnow\u201d?"


def test_caption_texts_read_the_captions_where_the_data_roots_layout_puts_them(tmp_path):
    """The captions a text-only baseline needs are read from the file the data root's layout.json names, or the one
    a layout given names, whether or not any audio is there."""
    write(tmp_path / "lists/caps_train.csv", "audiocap_id,youtube_id,start_time,caption\n1,abcdefghijk,30,A dog\n"
                                               "2,abcdefghijk,30,A dog barks\n")
    write(tmp_path / "layout.json", json.dumps({"audiocaps": {"csv": "lists/caps_{split}.csv"}}))
    assert data.caption_texts(tmp_path, "train") == ["A dog", "A dog barks"]
    (tmp_path / "layout.json").unlink()
    layout = {**data.LAYOUT, "audiocaps": {**data.LAYOUT["audiocaps"], "csv": "lists/caps_{split}.csv"}}
    assert data.caption_texts(tmp_path, "train", layout=layout) == ["A dog", "A dog barks"]


def test_the_layout_names_each_data_sets_files_as_its_release_names_them():
    """A user unpacks the real downloads under the data root: the file names the readers look for are the ones those
    releases ship (Clotho v2 on Zenodo, WavCaps's json_files on the Hugging Face hub, AudioSet's lists, ESC-50's
    meta, Clotho-AQA's CSVs), not names of our own. (The synthetic benchmark is written from LAYOUT itself, so only
    this test would see a name drift away from the releases.)"""
    L = data.LAYOUT
    assert sorted(L["clotho"]["csv"].format(split=s) for s in L["clotho"]["splits"].values()) == [
        "clotho/clotho_captions_development.csv", "clotho/clotho_captions_evaluation.csv",
        "clotho/clotho_captions_validation.csv"]
    assert sorted(L["wavcaps"]["json"].format(subset=k, name=v) for k, v in L["wavcaps"]["names"].items()) == [
        "wavcaps/json_files/AudioSet_SL/as_final.json", "wavcaps/json_files/BBC_Sound_Effects/bbc_final.json",
        "wavcaps/json_files/FreeSound/fsd_final.json", "wavcaps/json_files/SoundBible/sb_final.json"]
    assert [b.rsplit("/", 1)[1] for b in L["wavcaps"]["blacklists"]] == [
        "blacklist_exclude_test_ac.json", "blacklist_exclude_ub8k_esc50_vggsound.json"]
    assert {k: v.rsplit("/", 1)[1] for k, v in L["audioset"]["segments"].items()} == {
        "train": "balanced_train_segments.csv", "balanced": "balanced_train_segments.csv",
        "unbalanced": "unbalanced_train_segments.csv", "test": "eval_segments.csv"}
    assert [L["audioset"][k].rsplit("/", 1)[1] for k in ("classes", "names")] == [
        "class_labels_indices.csv", "mid_to_display_name.tsv"]
    assert L["esc50"]["csv"] == "esc50/meta/esc50.csv" and L["clotho_aqa"]["csv"].endswith("clotho_aqa_{split}.csv")


def test_a_data_roots_layout_json_replaces_the_entries_it_names(tmp_path, caplog):
    """Clips named as another download tool names them need no code change: the data root's layout.json replaces
    LAYOUT's entries for that root (a new segments list may be added); a name LAYOUT lacks, or a value of another
    kind, is an error naming the file."""
    write(tmp_path / "audioset/eval_segments.csv", AUDIOSET)
    write(tmp_path / "lists/mine.csv", AUDIOSET)
    write(tmp_path / "lists/classes.csv", CLASSES)
    touch_audio(tmp_path, "clips/--4gqARaEJE_0.000.flac", "clips/--BfvyPmVMo_20.000.flac")
    layout = {"audioset": {"audio": "clips/{ytid}_{start:.3f}.flac", "segments": {"mine": "lists/mine.csv"},
                           "classes": "lists/classes.csv"}}
    write(tmp_path / "layout.json", json.dumps(layout))
    with caplog.at_level(logging.INFO):
        found = data.examples("tagging", tmp_path, "test", strict=True)
    assert [ex.segments[0][1] for ex in found] == [str(tmp_path / "clips/--4gqARaEJE_0.000.flac"),
                                                   str(tmp_path / "clips/--BfvyPmVMo_20.000.flac")]
    assert len(data.examples("tagging", tmp_path, "mine", strict=True)) == 2
    assert f"{tmp_path / 'layout.json'} replaces data.LAYOUT's entries for audioset" in caplog.text
    assert data.layout_of(tmp_path)["audioset"]["strong"] == data.LAYOUT["audioset"]["strong"]  # the rest kept
    assert data.LAYOUT["audioset"]["audio"] == "audio/Y{ytid}.wav"  # LAYOUT itself untouched
    assert data.layout_of(tmp_path / "lists") is data.LAYOUT  # a root without the file
    cfg = load_config("tiny", {"data_root": str(tmp_path), "tagging_sources": "mine"})
    assert sources(cfg, "tagging_sources") == ["mine"]  # a source of the root's own layout
    assert evaluation.audioset_classes(cfg)[:2] == ["Speech", "Male speech, man speaking"]
    for wrong, says in [({"audiosets": {}}, r"audiosets is not an entry of apt_min.data.LAYOUT; it has audiocaps, "),
                        ({"audioset": {"wav": "x"}}, r"audioset.wav is not an entry .*; audioset has audio, classes"),
                        ({"audioset": {"audio": 3}}, r"audioset.audio must be text as in LAYOUT .*found 3"),
                        ({"audioset": {"segments": "x.csv"}}, r"audioset.segments must be a JSON object"),
                        ({"wavcaps": {"blacklists": "b.json"}}, r"wavcaps.blacklists must be a list of texts"),
                        ({"wavcaps": {"blacklists": ["b.json", 3]}}, r"wavcaps.blacklists must be a list of texts")]:
        write(tmp_path / "layout.json", json.dumps(wrong))
        with pytest.raises(SettingError, match=rf"{re.escape(str(tmp_path / 'layout.json'))}: {says}"):
            data.examples("tagging", tmp_path, "test")


def test_avqa_frames_in_time_order_each_once_and_a_broken_answer_named(tmp_path):
    """Frames named without zero padding are read in time order (2 before 10); a video with fewer frames than
    asked for gives each frame once; an answer that is not an index 0-3 is an error naming the file and item."""
    items = [{"id": i, "video_name": f"v{i}", "question_text": "Which object is making a sound?",
              "multi_choice": ["dog", "cat", "car", "bell"], "answer": 1} for i in range(2)]
    write(tmp_path / "avqa/val_qa.json", json.dumps(items))
    touch_audio(tmp_path, "avqa/audio/v0.wav", "avqa/audio/v1.wav",
                *[f"avqa/frames/v0/{k}.jpg" for k in range(1, 12)], *[f"avqa/frames/v1/{k:02d}.jpg" for k in range(9)])
    eleven, nine = data.avqa_items(tmp_path, "test", frames=10)
    assert [f.split("/")[-1] for f in eleven["frames"]] == ["1.jpg", "2.jpg", "3.jpg", "4.jpg", "5.jpg", "7.jpg",
                                                           "8.jpg", "9.jpg", "10.jpg", "11.jpg"]
    assert [f.split("/")[-1] for f in nine["frames"]] == [f"{k:02d}.jpg" for k in range(9)]
    assert [f.split("/")[-1] for f in data.avqa_items(tmp_path, "test", frames=3)[0]["frames"]] == \
        ["1.jpg", "6.jpg", "11.jpg"]
    assert [f.split("/")[-1] for f in data.avqa_items(tmp_path, "test", frames=1)[0]["frames"]] == ["1.jpg"]
    # options given as numbers are read as text, an answer written as text with spaces as its index; AVQA's
    # question_relation is kept, and a question without one has none
    write(tmp_path / "avqa/val_qa.json", json.dumps([{**items[0], "multi_choice": [1, 2, 3, 4], "answer": " 2 ",
                                                      "question_relation": "Both"}, items[1]]))
    first, second = data.avqa_items(tmp_path, "test", frames=1)
    assert (first["options"], first["answer"], first["relation"]) == (["1", "2", "3", "4"], 2, "Both")
    assert (second["options"], second["answer"], second["relation"]) == (["dog", "cat", "car", "bell"], 1, "")
    for answer in ("b", 4, None):
        write(tmp_path / "avqa/val_qa.json", json.dumps([items[0], {**items[1], "answer": answer}]))
        with pytest.raises(DataError, match=r"val_qa.json: item 1 needs a list of 4 choices and an answer index 0-3"):
            data.avqa_items(tmp_path, "test")
    for text in ("dog", "bird", ["dog", "cat", "car"], ["dog", "cat", "car", "bell", "bus"]):  # a text is not a list
        # of choices, even one of 4 letters; nor are 3 choices or 5 (the answer's index means another one)
        write(tmp_path / "avqa/val_qa.json", json.dumps([{**items[0], "multi_choice": text}]))
        with pytest.raises(DataError, match=r"val_qa.json: item 0 needs a list of 4 choices"):
            data.avqa_items(tmp_path, "test")


def test_avqa_frames_may_be_png_and_a_video_without_frames_is_counted(tmp_path, caplog):
    """Frames extracted as PNG are read as JPEG ones are; a video with no frames at all is skipped, said once, and
    its frame folder counted as missing in the coverage, whose lines name it and the list that named it (strict: an
    error naming the folder and the video)."""
    items = [{"id": i, "video_name": f"v{i}", "question_text": "Which object is making a sound?",
              "multi_choice": ["dog", "cat", "car", "bell"], "answer": 1} for i in range(2)]
    write(tmp_path / "avqa/val_qa.json", json.dumps(items))
    touch_audio(tmp_path, "avqa/audio/v0.wav", "avqa/audio/v1.wav", *[f"avqa/frames/v0/{k}.png" for k in range(3)])
    coverage = data.Coverage()
    with caplog.at_level(logging.WARNING, logger="apt_min.data"):
        [item] = data.avqa_items(tmp_path, "test", frames=2, coverage=coverage)
    assert item["video"] == "v0" and [f.split("/")[-1] for f in item["frames"]] == ["0.png", "2.png"]
    folder = str(tmp_path / "avqa/frames/v1")
    assert coverage.missing == {folder: str(tmp_path / "avqa/val_qa.json")} and folder in coverage.listed
    assert coverage.lines() == [f"{folder}\tmissing (listed in {tmp_path / 'avqa/val_qa.json'})"]
    assert f"1 of the videos listed in {tmp_path / 'avqa/val_qa.json'} have no frames under " \
           f"{tmp_path / 'avqa/frames/{video_name}'} (e.g. ['v1'])" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"frames/v1: no frames \(\*.jpg, \*.png\) for video v1 listed in"):
        data.avqa_items(tmp_path, "test", strict=True)


def test_wavcaps_esc50_nlar_avqa(tmp_path):
    wav = {"num_captions_per_audio": 1, "data": [{"id": "Yb0RFKhbpFJA.wav", "caption": "Wind blows", "audio":
                                                  "wav_path", "duration": 10.0, "description": "x"}]}
    write(tmp_path / "wavcaps/json_files/AudioSet_SL/as_final.json", json.dumps(wav))  # as WavCaps names it
    touch_audio(tmp_path, "wavcaps/AudioSet_SL/Yb0RFKhbpFJA.flac")
    ex = data.examples("captioning", tmp_path, "train", source="wavcaps:AudioSet_SL", rng=random.Random(0))
    assert ex[0].answer == "Wind blows" and ex[0].segments[0][1].endswith("AudioSet_SL/Yb0RFKhbpFJA.flac")
    with pytest.raises(DataError, match=r"broken.json:1: not valid JSON"):
        data.read_wavcaps(write(tmp_path / "broken.json", "{\"data\": [}"))
    esc = data.read_esc50(write(tmp_path / "esc50.csv", "filename,fold,target,category,esc10,src_file,take\n"
                                                         "1-100032-A-0.wav,1,0,dog,True,100032,A\n"))
    assert esc == [("1-100032-A-0.wav", 1, 0, "dog")]
    with pytest.raises(DataError, match="item 0 lacks one of"):
        data.read_nlar(write(tmp_path / "n.json", json.dumps([{"audio_1": "a.wav", "question": "?"}])))
    avqa = [{"id": 1, "video_name": "-HG3Omg_89c_000030", "video_id": 3, "question_text": "What?", "multi_choice":
             ["a", "b", "c", "d"], "answer": 2, "question_relation": "Both", "question_type": "Which"}]
    assert data.read_avqa(write(tmp_path / "val_qa.json", json.dumps(avqa)))[0]["answer"] == 2
    avqa[0]["answer"] = 4
    with pytest.raises(DataError, match="needs a list of 4 choices and an answer index 0-3"):
        data.read_avqa(write(tmp_path / "val_qa.json", json.dumps(avqa)))


def test_a_task_or_captioning_source_examples_cannot_build_is_refused(tmp_path):
    """examples() refuses, before reading anything, a task it does not know, few-shot (its examples are episodes,
    built by fewshot_episode) and a captioning source other than audiocaps, clotho or wavcaps:<subset>."""
    with pytest.raises(ValueError, match=r"unknown task 'speech'"):
        data.examples("speech", tmp_path, "test")
    with pytest.raises(ValueError, match=r"few-shot examples are episodes: use .*fewshot_episode"):
        data.examples("fewshot", tmp_path, "test")
    with pytest.raises(ValueError, match=r"unknown captioning source 'wavcaps'"):
        data.examples("captioning", tmp_path, "test", source="wavcaps")


def test_a_data_file_that_is_not_there_is_a_missing_file(tmp_path):
    """A list that is not on disk is a FileNotFoundError naming it (a file missing), not a DataError (a file that
    is there but cannot be read)."""
    for read, name in ((data.read_esc50, "esc50.csv"), (data.read_avqa, "val_qa.json")):
        with pytest.raises(FileNotFoundError, match=rf"{name}: no such data file") as caught:
            read(tmp_path / name)
        assert not isinstance(caught.value, DataError)
    # NLAR's, which no one can download, says how to train without it
    with pytest.raises(FileNotFoundError, match=r"nlar_train.json: no such data file \(the paper's NLAR set is not "
                       r"released: .* or train without it: nlar=0 in --task_ratios, after the preset's own"):
        data.examples("nlar", tmp_path, "train")


def test_files_as_spreadsheets_and_annotators_leave_them(tmp_path):
    """What real copies carry: a UTF-8 byte-order mark (a CSV saved by a spreadsheet), blank lines, spaces around a
    caption or after a question (one question, however spaced, is one question), a header with spaces."""
    caps = write(tmp_path / "caps.csv", "\ufeffaudiocap_id,youtube_id,start_time,caption\r\n\r\n"
                                        "97151,vfY_TJq7n_U,130,  Ducks quack over rustling \r\n,,,\r\n")
    assert data.read_audiocaps(caps) == [(97151, "vfY_TJq7n_U", 130, "Ducks quack over rustling")]
    aqa = write(tmp_path / "aqa.csv", "file_name,QuestionText,answer,confidence\n"
                                      "a.wav,Is a bell ringing?,Yes,yes\nb.wav,Is a bell ringing?,no,maybe\n"
                                      "a.wav,Is a bell ringing? ,yes,no\n")
    assert data.read_clotho_aqa(aqa) == [("a.wav", "Is a bell ringing?", ["Yes", "yes"], ["yes", "no"]),
                                         ("b.wav", "Is a bell ringing?", ["no"], ["maybe"])]  # as written, per clip
    spaced = write(tmp_path / "spaced.csv", "audiocap_id, youtube_id, start_time , caption\n"
                                            "97151,vfY_TJq7n_U,130,Ducks\n")
    assert data.read_audiocaps(spaced) == [(97151, "vfY_TJq7n_U", 130, "Ducks")]  # a header typed with spaces


def test_a_file_no_codepage_reads_is_latin1_and_an_empty_or_blank_row_is_no_row(tmp_path):
    """Bytes that are neither UTF-8 nor Windows-1252 (0x81 and 0x8d are undefined there) read as ISO-8859-1, each
    byte its own character, as Clotho's metadata is written; an empty file has no header, a DataError naming it; a
    row of cells holding only spaces (a spreadsheet's) is a blank row, skipped like an empty one."""
    caps = "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n" \
           "a.wav,one\x81,two,three\x8d,four,five\n"
    rows = data.read_clotho_captions(write(tmp_path / "c.csv", caps, "latin-1"))
    assert rows == [("a.wav", ["one\x81", "two", "three\x8d", "four", "five"])]
    with pytest.raises(DataError, match=r"empty.csv:1: expected the header audiocap_id,youtube_id,start_time,caption, "
                                        r"found None"):
        data.read_audiocaps(write(tmp_path / "empty.csv", ""))
    blank = write(tmp_path / "blank.csv", "audiocap_id,youtube_id,start_time,caption\n  ,  , ,  \n"
                                          "7,abcdefghijk,30,A dog barks\n")
    assert data.read_audiocaps(blank) == [(7, "abcdefghijk", 30, "A dog barks")]


AUDIOCAPS_HEAD = "audiocap_id,youtube_id,start_time,caption\n"
STRONG_HEAD = "segment_id\tstart_time_seconds\tend_time_seconds\tlabel\n"
AVQA_ITEM = {"id": 1, "video_name": "v", "question_text": "What?", "multi_choice": ["a", "b", "c", "d"], "answer": 2}


@pytest.mark.parametrize("reader, name, text, problem", [
    ("audioset_segments", "segments.csv", AUDIOSET + 'abcdefghijk, 0.000, 10.000, "/m/0jbk", extra\n',
     r"segments.csv:6: expected YTID"),
    ("audioset_segments", "segments.csv", AUDIOSET + 'abcdefghijk, 0.000, 10.000, ""\n',
     r"segments.csv:6: expected YTID"),
    ("mid_to_name", "names.tsv", "/m/0jbk\tAnimal\n/m/0bt9lr\tDog\tDomestic\n", r"names.tsv:2: expected `mid<TAB>"),
    ("strong_labels", "strong.tsv", STRONG_HEAD + "_30000\t1.0\t2.0\t/m/0jbk\n", r"strong.tsv:2: segment_id '_30000'"),
    ("strong_labels", "strong.tsv", STRONG_HEAD + "abcdefghijk_30.000\t1.0\t2.0\t/m/0jbk\n",
     r"strong.tsv:2: segment_id 'abcdefghijk_30.000' is not YTID_milliseconds"),
    ("audiocaps", "caps.csv", AUDIOCAPS_HEAD + "7,abcdefghijk,30,A dog\nx8,abcdefghijk,40,A cat\n",
     r"caps.csv:3: audiocap_id and start_time must be whole numbers"),
    ("esc50", "esc50.csv", "filename,fold,target,category,esc10,src_file,take\n1-1-A-0.wav,one,0,dog,True,1,A\n",
     r"esc50.csv:2: fold and target must be whole numbers"),
    ("esc50", "esc50.csv", "filename,fold,target,category,esc10,src_file,take\n1-1-A-0.wav,1,zero,dog,True,1,A\n",
     r"esc50.csv:2: fold and target must be whole numbers"),
    ("wavcaps", "wavcaps.json", json.dumps({"data": [{"id": "a.wav", "caption": "Wind"}, {"id": "b.wav"}]}),
     r"wavcaps.json: data\[1\] lacks 'id' or 'caption'"),
    ("wavcaps", "wavcaps.json", json.dumps([{"id": "a.wav", "caption": "Wind"}]),
     r"wavcaps.json: expected an object with a 'data' list"),
    ("wavcaps", "wavcaps.json", json.dumps({"num_captions_per_audio": 1}),
     r"wavcaps.json: expected an object with a 'data' list"),
    ("nlar", "nlar.json", json.dumps({"audio_1": "a.wav", "audio_2": "b.wav", "question": "?", "answer": "yes"}),
     r"nlar.json: expected a list of items"),
    ("nlar", "nlar.json", json.dumps(["a.wav"]), r"nlar.json: item 0 lacks one of"),
    ("avqa", "val_qa.json", json.dumps([{**AVQA_ITEM, "multi_choice": ["a", "b", "c", "d", "e"]}]),
     r"val_qa.json: item 0 needs a list of 4 choices"),
], ids=["segments", "segments-no-labels", "names-three-fields", "strong-no-ytid", "strong-seconds", "audiocaps-id",
        "esc50-fold", "esc50-target", "wavcaps", "wavcaps-list", "wavcaps-no-data", "nlar-object",
        "nlar-not-an-item", "avqa-five"])
def test_a_broken_row_of_any_reader_names_the_file(tmp_path, reader, name, text, problem):
    """A row with a field too many or its labels empty, a segment id without its YouTube id or its milliseconds, an
    id, fold or target that is not a whole number, a WavCaps file or item not as released, an NLAR file that is not
    a list of items, an AVQA question with five choices: a DataError naming the file (and the line, where the format
    has lines)."""
    with pytest.raises(DataError, match=problem):
        getattr(data, f"read_{reader}")(write(tmp_path / name, text))


def test_a_sampler_refuses_a_task_with_no_examples_and_a_mixture_of_none():
    """A training task whose examples were all skipped (every clip missing) is an error naming it before any step,
    not a division by zero when it is first drawn; every ratio 0 is a setting error; a task at 0 needs no pool."""
    with pytest.raises(DataError, match=r"^no training examples left for aqa: every clip the data lists is missing"):
        data.TaskSampler({"aqa": [], "tagging": ["x"]}, {"aqa": 1.0, "tagging": 1.0}, 2)
    with pytest.raises(SettingError, match="every task's ratio is 0"):
        data.TaskSampler({"tagging": ["x"]}, {"tagging": 0.0}, 2)
    sampler = data.TaskSampler({"tagging": ["x", "y"]}, {"tagging": 1.0, "aqa": 0.0}, 2)
    task, batch = sampler.next_batch()
    assert task == "tagging" and sorted(batch) == ["x", "y"]


def test_missing_audio_is_counted_and_skipped_or_raised(tmp_path, caplog):
    write(tmp_path / "audioset/eval_segments.csv", AUDIOSET)
    write(tmp_path / "audioset/class_labels_indices.csv", CLASSES)
    touch_audio(tmp_path, "audio/Y--4gqARaEJE.wav")
    with caplog.at_level(logging.WARNING, logger="apt_min.data"):
        ex = data.examples("tagging", tmp_path, "test")
    assert len(ex) == 1 and ex[0].answer == "domestic animals, pets, squeak, dog, animal"
    assert len(caplog.records) == 1 and "1 of 2 audio files listed in" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"Y--BfvyPmVMo.wav: audio listed in .*eval_segments.csv"):
        data.examples("tagging", tmp_path, "test", strict=True)
    (tmp_path / "audio/Y--BfvyPmVMo.wav").mkdir()  # a folder of the clip's name is not the clip
    assert len(data.examples("tagging", tmp_path, "test")) == 1
    (tmp_path / "audio/Y--BfvyPmVMo.wav").rmdir()
    touch_audio(tmp_path, "audio/Y--BfvyPmVMo.wav")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="apt_min.data"):
        assert len(data.examples("tagging", tmp_path, "test")) == 2
    assert not caplog.records  # nothing missing: nothing said


def test_two_stars_inside_a_file_name_are_part_of_the_name(tmp_path):
    """Only a "**" that is a whole folder of the pattern stands for any folders; a listed file whose own name holds
    "**" is that file."""
    write(tmp_path / "clotho_aqa/clotho_aqa_test.csv",
          "file_name,QuestionText,answer,confidence\nStars **.wav,Is it loud?,yes,yes\n")
    touch_audio(tmp_path, "clotho_aqa/audio_files/Stars **.wav")
    [ex] = data.examples("aqa", tmp_path, "test")
    assert ex.segments[0][1] == str(tmp_path / "clotho_aqa/audio_files/Stars **.wav")


def test_a_clip_a_folder_pattern_cannot_find_is_counted_and_a_pattern_that_cannot_format_is_named(tmp_path):
    """With a "**" pattern a clip found in no folder below is missing like any other (counted, listed where it was
    looked for; strict: the error); a format its field cannot take ({start:d} of a float) is a SettingError naming
    the pattern; the strong labels' clips fill {end} with their start and 10 s."""
    write(tmp_path / "audioset/eval_segments.csv", AUDIOSET)
    write(tmp_path / "audioset/class_labels_indices.csv", CLASSES)
    touch_audio(tmp_path, "audios/eval_segments/part00/Y--4gqARaEJE.wav")
    write(tmp_path / "layout.json", json.dumps({"audioset": {"audio": "audios/{list}/**/Y{ytid}.wav"}}))
    data._files_below.cache_clear()  # (read once per process)
    coverage = data.Coverage()
    [found] = data.examples("tagging", tmp_path, "test", coverage=coverage)
    assert found.segments[0][1] == str(tmp_path / "audios/eval_segments/part00/Y--4gqARaEJE.wav")
    assert list(coverage.missing) == [str(tmp_path / "audios/eval_segments/**/Y--BfvyPmVMo.wav")]
    with pytest.raises(FileNotFoundError, match=r"\*\*/Y--BfvyPmVMo.wav: audio listed in .*eval_segments.csv"):
        data.examples("tagging", tmp_path, "test", strict=True)
    layout = {**data.LAYOUT, "audioset": {**data.LAYOUT["audioset"], "audio": "audio/Y{ytid}_{start:d}.wav"}}
    with pytest.raises(SettingError, match=r"'audio/Y\{ytid\}_\{start:d\}.wav' .*eval_segments.csv.*ValueError"):
        data.examples("tagging", tmp_path, "test", layout=layout)
    layout["audioset"]["audio"] = "audio/{0}.wav"  # a field by position: records fill fields by name
    with pytest.raises(SettingError, match=r"'audio/\{0\}.wav' .*IndexError"):
        data.examples("tagging", tmp_path, "test", layout=layout)
    write(tmp_path / "audioset/audioset_eval_strong.tsv", "segment_id\tstart_time_seconds\tend_time_seconds\tlabel\n"
                                                            "abcdefghijk_30000\t1.0\t2.5\t/m/0jbk\n")
    write(tmp_path / "audioset/mid_to_display_name.tsv", "/m/0jbk\tAnimal\n")
    touch_audio(tmp_path, "dcase/Yabcdefghijk_30.000_40.000.wav")
    write(tmp_path / "layout.json", json.dumps({"audioset": {"audio": "dcase/Y{ytid}_{start:.3f}_{end:.3f}.wav"}}))
    [sed] = data.examples("sed", tmp_path, "test", strict=True)
    assert sed.segments[0][1] == str(tmp_path / "dcase/Yabcdefghijk_30.000_40.000.wav")


def test_strong_labels_count_each_class_and_a_class_without_a_name_keeps_its_mid(tmp_path):
    """Counting: each class of a clip, with how many of its events the clip holds (not the clip's events of every
    class); a class that mid_to_display_name.tsv does not name is called by its mid rather than dropped; a row
    repeated exactly (the same class and times) is one event, where the same times of another class are not."""
    write(tmp_path / "audioset/audioset_eval_strong.tsv", "segment_id\tstart_time_seconds\tend_time_seconds\tlabel\n"
          "abcdefghijk_30000\t1.0\t2.0\t/m/0bt9lr\nabcdefghijk_30000\t4.0\t5.0\t/m/0bt9lr\n"
          "abcdefghijk_30000\t6.0\t7.0\t/m/0bt9lr\nabcdefghijk_30000\t3.0\t3.5\t/m/0unnamed\n"
          "abcdefghijk_30000\t4.0\t5.0\t/m/0bt9lr\nabcdefghijk_30000\t4.0\t5.0\t/m/0unnamed\n")
    write(tmp_path / "audioset/mid_to_display_name.tsv", "/m/0bt9lr\tDog\n")
    touch_audio(tmp_path, "audio/Yabcdefghijk.wav")
    counts = {ex.target["label"]: ex.target["count"] for ex in data.examples("counting", tmp_path, "test")}
    assert counts == {"Dog": 3, "/m/0unnamed": 2}
    spans = {ex.target["label"]: ex.target["segments"] for ex in data.examples("sed", tmp_path, "test")}
    assert spans == {"Dog": [(1.0, 2.0), (4.0, 5.0), (6.0, 7.0)], "/m/0unnamed": [(3.0, 3.5), (4.0, 5.0)]}


def test_an_nlar_pair_with_either_clip_missing_is_skipped_or_raised(tmp_path, caplog):
    """A pair is an example only with both its clips (never one clip and a None); --strict names the missing one."""
    items = [{"audio_1": a, "audio_2": b, "question": "Which is longer?", "answer": "first"}
             for a, b in (("a.wav", "b.wav"), ("a.wav", "gone.wav"), ("gone.wav", "b.wav"))]
    write(tmp_path / "nlar/nlar_test.json", json.dumps(items))
    touch_audio(tmp_path, "audio/a.wav", "audio/b.wav")
    with caplog.at_level(logging.WARNING, logger="apt_min.data"):
        ex = data.examples("nlar", tmp_path, "test")
    assert [[v for k, v in e.segments if k == "audio"] for e in ex] == [[str(tmp_path / "audio/a.wav"),
                                                                       str(tmp_path / "audio/b.wav")]]
    assert "nlar_test.json" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"gone.wav: audio listed in .*nlar_test.json"):
        data.examples("nlar", tmp_path, "test", strict=True)


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    """The synthetic benchmark at 3 % of its size, with its audio-visual set (about a second to write)."""
    from apt_min import synth, synth_av

    out = synth.generate(tmp_path_factory.mktemp("bench") / "synth", seed=1, scale=0.03)
    return synth_av.generate(out, seed=1, videos=3, pictures=1, frames=2)


@pytest.mark.parametrize("task, source", [("tagging", None), ("sed", None), ("counting", None), ("ter", None),
                                          ("captioning", "audiocaps"), ("captioning", "clotho"), ("aqa", None),
                                          ("nlar", None), ("avqa", None)])
def test_every_reader_skips_and_counts_a_missing_clip_or_with_strict_names_it(benchmark, tmp_path, task, source,
                                                                             caplog):
    """Each task's test split with its first clip gone: skipped (with every example it is in), said in the log
    naming the list, and recorded in the coverage, or, strict, a FileNotFoundError naming it and the list that
    names it."""
    import os
    import shutil

    root = tmp_path / "synth"
    shutil.copytree(benchmark, root, copy_function=os.symlink)

    def read(strict, coverage=None):  # each example's clips
        if task == "avqa":
            return [[item["audio"]] for item in data.avqa_items(root, "test", strict=strict, coverage=coverage)]
        found = data.examples(task, root, "test", source=source, strict=strict, coverage=coverage)
        return [[v for k, v in ex.segments if k == "audio"] for ex in found]

    every = read(strict=True)
    gone = every[0][0]
    os.unlink(gone)
    coverage = data.Coverage()
    with caplog.at_level(logging.WARNING, logger="apt_min.data"):
        left = read(strict=False, coverage=coverage)
    assert left == [clips for clips in every if gone not in clips] and left
    said = re.search(r"\d+ of \d+ audio files listed in (.+) are missing under (.+) \(pattern", caplog.text)
    assert said and Path(said[1]).is_file() and said[2] == str(root), caplog.text  # the list, then where clips go
    assert list(coverage.missing) == [gone] and gone in coverage.listed
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(gone)}: audio listed in .* is not on disk"):
        read(strict=True)


# ---------------------------------------------------------------------------------------------------- parsers


def test_format_then_parse_is_identity():
    vocab = ["Male speech, man speaking", "Speech", "Dog", "chirping_birds"]
    for labels in (["Dog"], ["Male speech, man speaking", "Dog"], ["chirping_birds", "Speech"]):
        assert tasks.parse_labels(tasks.format_labels(labels), vocab) == labels
    segs = [(0.0, 1.2), (3.5, 10.0)]
    assert tasks.parse_segments(tasks.format_segments(segs)) == segs
    for n in range(21):
        assert tasks.parse_count(tasks.format_count(n)) == n


def test_parsers_tolerate_variations():
    assert tasks.parse_segments(" 0.5 s - 1.2s ;3s to 3.6 seconds.") == [(0.5, 1.2), (3.0, 3.6)]
    assert tasks.parse_count("It occurs three times.") == 3 and tasks.parse_count("twice") == 2
    assert tasks.parse_labels("Dog, speech.", ["Speech", "Dog"]) == ["Dog", "Speech"]
    assert tasks.parse_labels("A train passes, then a drumroll.", ["rain", "drum"]) == []  # whole words only
    assert tasks.normalize_answer(" Yes. ") == "yes" and tasks.normalize_answer("The two") == "2"
    assert tasks.normalize_answer("A dog and an owl") == "dog and owl" == tasks.normalize_answer("the dog and owl")
    assert tasks.parse_segments("1.0s-1.0s") == [(1.0, 1.0)]  # a zero-length segment is an answer (a false alarm)
    assert [tasks.parse_count(t) for t in ("twenty-nine", "ninety nine", "twenty-ten")] == [29, 99, 20]
    for text in ("1.5 secs - 2 secs", "from 1.5 second to 2 seconds", "1.5sec-2sec", "1.5s–2s"):
        assert tasks.parse_segments(text) == [(1.5, 2.0)], text
    assert tasks.parse_segments(".5s-1s") == [(0.5, 1.0)]
    assert [tasks.parse_count(t) for t in ("Twenty-one.", "thirty", "No times.", "never", "none", "two-fold")] == [
        21, 30, 0, 0, 0, 2]
    assert tasks.parse_count("twenty one") == 21 and tasks.parse_count("No, three times.") == 3  # a number first
    assert tasks.parse_count("There were no barks.") == 0  # "no" anywhere, with no number: zero
    assert {tasks.normalize_answer(t) for t in ("21", "twenty-one", "Twenty one.", "twenty one")} == {"21"}
    assert tasks.normalize_answer("seventeen") == "17" and tasks.normalize_answer("someone") == "someone"
    assert tasks.parse_segments("from one to two seconds") == [(1.0, 2.0)]
    for vocabulary in (["Car horn", "Horn toy"], ["Horn toy", "Car horn"]):  # equal lengths, overlapping in the text
        assert tasks.parse_labels("a car horn toy", vocabulary) == ["Car horn"]  # the same reading, either order
    assert [tasks.parse_count(t) for t in ("once", "Thrice.", "twenty  one")] == [1, 3, 21]  # two spaces in a number
    assert tasks.normalize_answer("A high-pitched beep") == "high pitched beep"  # a hyphen parts words, as a space
    for text in ("1.5s until 2s; 3s\u20144s", "1.5S - 2S; 3 SECONDS TO 4 SECONDS"):  # until, an em dash, capitals
        assert tasks.parse_segments(text) == [(1.5, 2.0), (3.0, 4.0)], text
    assert tasks.parse_labels("dog, a Dog and dog", ["Dog", "Cat"]) == ["Dog"]  # named three times: listed once
    # without a vocabulary: split at commas, semicolons and "and", each part trimmed of spaces and periods, none empty
    assert tasks.parse_labels("Dog and cat; bird.") == ["dog", "cat", "bird"]
    assert tasks.parse_labels("dog, , cat ;") == ["dog", "cat"] and tasks.parse_labels("") == []
    assert tasks.parse_labels("dog, .") == ["dog"]  # a part of nothing but a period is no label
    assert tasks.label_text(" chirping_birds ") == "chirping birds"  # a class name read with spaces around it


def test_every_number_word_reads_as_its_value():
    """Zero to twenty and the tens, in a count and in a short answer, each its value; a number glued to a letter
    ("x3") is still the first number."""
    words = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
             "seventeen eighteen nineteen twenty").split()
    for n, word in enumerate(words):
        assert tasks.parse_count(f"{word} times") == n and tasks.normalize_answer(word.capitalize()) == str(n), word
    for word, n in {"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
                    "ninety": 90}.items():
        assert tasks.parse_count(word) == n and tasks.parse_count(f"{word}-four") == n + 4, word
    assert tasks.parse_count("it barks x3") == 3


def test_a_time_window_always_holds_the_event_that_defines_it():
    """An event shorter than the 0.1 s minimum overlap still answers its own window (an AudioSet strong label of a
    click lasts 80 ms); a longer event needs 0.1 s inside the window; a window is never 0 s long."""
    events = [("Tick", 2.0, 2.08), ("Dog", 5.0, 7.0), ("Bird", 2.05, 3.0)]
    assert tasks.ter("a.wav", events, 2.0, 2.1).target["labels"] == ["Tick"]  # the bird: 0.05 s inside
    assert tasks.labels_between(events, 2.0, 2.2) == ["Tick", "Bird"]
    assert tasks.labels_between(events, 6.95, 8.0) == []  # the dog's last 0.05 s


def test_malformed_output_parses_to_no_answer():
    """Output that is no answer reads as none: no segments, no count, no label; and random strings of the
    characters answers are made of never give a span that ends before it starts, nor a negative count."""
    for text in ("", "s-s", "-1.0s", "1.5s-0.5s", "??", "one two", "\x00\ufffd", "🙂" * 3, "s to s", "dogma",
                 "1e9999s-2s"):
        assert tasks.parse_segments(text) == [] and tasks.parse_labels(text, ["Dog"]) == [], text
    for text in ("", "s-s", "??", "\x00\ufffd", "🙂" * 3, "s to s", "dogma"):
        assert tasks.parse_count(text) is None, text
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("0123456789.s-; to,abc") for _ in range(rng.randint(0, 30)))
        assert all(a <= b for a, b in tasks.parse_segments(text)), text
        count = tasks.parse_count(text)
        assert count is None or count >= 0, text


# --------------------------------------------------------------------------------------------------- batching


def test_fewshot_episode(monkeypatch):
    pool = {f"class{i}": [f"c{i}_{j}.wav" for j in range(6)] for i in range(8)}
    ep = data.fewshot_episode(pool, n_way=4, k_shot=2, rng=random.Random(3))
    audio = [s[1] for s in ep.segments if s[0] == "audio"]
    assert len(audio) == 4 * 2 + 1 and len(set(audio)) == 9  # the query is not one of the supports
    assert ep.segments[-1] == ("text", "This is a sound of") and ep.answer in {label for label in ep.target["choices"]}
    assert audio[-1].startswith(ep.answer.replace("class", "c"))
    with pytest.raises(ValueError, match="needs 12 classes"):
        data.fewshot_episode(pool, 12, 5, random.Random(0))
    # a class with exactly k clips has none left for a query: never in an episode; supports come shuffled
    small = {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2"], "c": ["c0", "c1"]}
    with pytest.raises(DataError, match="a 3-way 2-shot episode needs 3 classes with more than 2 clips; this pool "
                                        "has 2"):
        data.fewshot_episode(small, 3, 2, random.Random(0))
    episodes = [data.fewshot_episode(small, 2, 2, random.Random(seed)) for seed in range(30)]
    assert all(set(ep.target["choices"]) == {"a", "b"} for ep in episodes)
    orders = [[label for _, label in ep.target["support"]] for ep in episodes]
    assert any(order[0] != order[1] for order in orders)  # a class's two supports are not always side by side
    renamed = data.fewshot_episode(pool, n_way=4, k_shot=2, rng=random.Random(3), rename=True)
    texts = " ".join(v for k, v in renamed.segments if k == "text")
    assert "class" not in texts and f"This is a sound of {renamed.answer}." in texts
    assert [s for s in renamed.segments if s[0] == "audio"] == [s for s in ep.segments if s[0] == "audio"]
    for seed in range(300):  # made-up names: pronounceable words
        names = data.fewshot_episode(pool, n_way=8, k_shot=1, rng=random.Random(seed), rename=True).target["choices"]
        assert all(re.fullmatch(r"([bdfgklmnprstvz][aeiou]){2}[kmnst]", n) for n in names)
    # and each class its own: a word drawn twice, or a class's name, is drawn again
    drawn = iter(["zubik", "zubik", "class1", "kipot", "zubik", "lemas", "nodus"])
    monkeypatch.setattr(data, "pseudo_word", lambda rng: next(drawn))
    renamed = data.fewshot_episode(pool, n_way=4, k_shot=1, rng=random.Random(0), rename=True)
    assert sorted(renamed.target["choices"]) == ["kipot", "lemas", "nodus", "zubik"]
    drawn = iter(["zubik", "kipot", "lemas", "nodus", "bados"])  # "zubik" is a class's name, however written
    renamed = data.fewshot_episode({**pool, "Zubik": pool["class0"]}, n_way=4, k_shot=1, rng=random.Random(0),
                                   rename=True)
    assert sorted(renamed.target["choices"]) == ["bados", "kipot", "lemas", "nodus"]
    listed = data.fewshot_episode(pool, n_way=4, k_shot=2, rng=random.Random(3), layout="list")
    assert listed.answer == ep.answer and listed.target["support"] == ep.target["support"]
    assert listed.segments[:2] == [("text", tasks.FEWSHOT_LIST_INSTRUCTION), ("turn", "")]
    assert listed.segments[2:] == [seg for clip, label in ep.target["support"]
                                   for seg in (("audio", clip), ("label", f"{label}.\n"))] + [("audio", audio[-1])]
    with pytest.raises(ValueError, match="few-shot layout 'grid'"):
        data.fewshot_episode(pool, 4, 2, random.Random(3), layout="grid")
    # a pool read in another order (another file system's listing) gives the same episodes from the same seed
    backwards = dict(reversed(pool.items()))
    assert data.fewshot_episode(backwards, 4, 2, random.Random(3)).segments == ep.segments


def test_the_single_label_pool_holds_the_clips_with_exactly_one_label(tmp_path):
    write(tmp_path / "audioset/eval_segments.csv", AUDIOSET)
    write(tmp_path / "audioset/class_labels_indices.csv", CLASSES)
    touch_audio(tmp_path, "audio/Y--4gqARaEJE.wav", "audio/Y--BfvyPmVMo.wav")
    assert data.single_label_pool(tmp_path, "test") == {"Hammer": [str(tmp_path / "audio/Y--BfvyPmVMo.wav")]}
    write(tmp_path / "audioset/balanced_train_segments.csv", AUDIOSET.replace("--BfvyPmVMo", "zyxwvutsrqp"))
    touch_audio(tmp_path, "audio/Yzyxwvutsrqp.wav")
    assert data.single_label_pool(tmp_path) == {"Hammer": [str(tmp_path / "audio/Yzyxwvutsrqp.wav")]}  # by default


def test_sampler_ratios_and_resume():
    pools = {"tagging": [f"t{i}" for i in range(7)], "captioning": [f"c{i}" for i in range(5)],
             "fewshot": lambda rng: f"episode{rng.random():.6f}"}
    ratios = {"tagging": 1.0, "captioning": 1.0, "fewshot": 0.5}
    s = data.TaskSampler(pools, ratios, batch_size=3, seed=1)
    seen = [s.next_batch() for _ in range(2000)]
    share = {t: sum(task == t for task, _ in seen) / 2000 for t in ratios}
    assert abs(share["fewshot"] - 0.2) < 0.03 and abs(share["tagging"] - 0.4) < 0.04
    taken = [x for task, b in seen if task == "tagging" for x in b]
    assert sorted(taken[:7]) == sorted(pools["tagging"])  # every example once per pass
    assert sorted(taken[7:14]) == sorted(pools["tagging"]) and taken[7:14] != taken[:7]  # each pass reshuffled
    episodes = [x for task, b in seen if task == "fewshot" for x in b]
    assert len(set(episodes)) == len(episodes)  # a builder draws with the step's generator: a new episode each time
    a = data.TaskSampler(pools, ratios, batch_size=3, seed=1)
    first = [a.next_batch() for _ in range(10)]
    state = a.state_dict()
    snapshot = json.loads(json.dumps(state))  # survives a JSON round trip (checkpoints)
    # the state counts the batches drawn and the examples each list pool gave (a builder's pool: none)
    assert state["step"] == 10 and state["cursor"] == {
        "tagging": 3 * sum(task == "tagging" for task, _ in first),
        "captioning": 3 * sum(task == "captioning" for task, _ in first), "fewshot": 0}
    rest = [a.next_batch() for _ in range(10)]
    assert state == snapshot  # a state once taken is not changed by the batches drawn after it
    b = data.TaskSampler(pools, ratios, batch_size=3, seed=1)
    b.load_state_dict(state)
    assert [b.next_batch() for _ in range(10)] == rest and first != rest
    b.load_state_dict(state)  # peek: the batch next_batch then gives (its clips read ahead), the state untouched
    peeked = [(b.peek(), b.state_dict(), b.next_batch()) for _ in range(10)]
    assert [p for p, _, _ in peeked] == [n for _, _, n in peeked] == rest and peeked[0][1] == state
    for other in ({"tagging": 1.0, "captioning": 1.0}, {**ratios, "aqa": 1.0}):  # a task fewer, a task more
        with pytest.raises(SettingError, match=r"the checkpoint was trained on the tasks \['captioning', 'fewshot', "
                                               r"'tagging'\] and these settings draw \[.*\]: resume with the run's "
                                               r"own --task_ratios"):
            data.TaskSampler({**pools, "aqa": ["q"]}, other, batch_size=3, seed=1).load_state_dict(state)
    twins = data.TaskSampler({"tagging": list(range(20)), "captioning": list(range(20))},
                             {"tagging": 1.0, "captioning": 1.0}, batch_size=20, seed=1)
    firsts = {}
    while len(firsts) < 2:
        task, batch = twins.next_batch()
        firsts.setdefault(task, batch)
    assert firsts["tagging"] != firsts["captioning"]  # pools of one size: each task shuffled its own way

    def first_batch(seed):  # a pool's first examples: where its first pass starts is the seed's
        return data.TaskSampler({"tagging": list(range(20))}, {"tagging": 1.0}, batch_size=5, seed=seed).next_batch()

    assert first_batch(1) == first_batch(1) != first_batch(2)  # two seeds, two orders (--seed reorders the data)
    reweighted = data.TaskSampler(pools, {**ratios, "fewshot": 2.0}, batch_size=3, seed=1)  # the same tasks
    reweighted.load_state_dict(state)
    assert reweighted.step == 10
    with pytest.raises(SettingError, match=r"ratios for tasks without data: \['nlar'\]"):
        data.TaskSampler(pools, {**ratios, "nlar": 0.5}, batch_size=3)


def test_a_resumed_sampler_takes_its_seed_from_the_state_and_leaves_the_state_as_it_was():
    """The state holds the seed: a sampler made with another seed draws on as the saved one would; drawing on does
    not change the state it was loaded from (a checkpoint's, saved again later); the seed chooses the tasks drawn,
    not only the order within each pool."""
    pools = {"tagging": [f"t{i}" for i in range(7)], "captioning": [f"c{i}" for i in range(5)]}
    ratios = {"tagging": 1.0, "captioning": 1.0}
    a = data.TaskSampler(pools, ratios, batch_size=2, seed=1)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    saved = json.loads(json.dumps(state))
    rest = [a.next_batch() for _ in range(20)]
    b = data.TaskSampler(pools, ratios, batch_size=2, seed=0)
    b.load_state_dict(state)
    assert [b.next_batch() for _ in range(20)] == rest
    assert state == saved

    def tasks_drawn(seed):
        sampler = data.TaskSampler(pools, ratios, 1, seed)
        return [sampler.next_batch()[0] for _ in range(30)]

    assert tasks_drawn(0) != tasks_drawn(1)


def test_collate_gives_every_examples_segments_and_answer_in_order():
    batch = [tasks.counting("a.wav", "Dog", 2), tasks.aqa("b.wav", "Is it raining?", ["yes"])]
    segments, answers = data.collate(batch)
    assert segments == [batch[0].segments, batch[1].segments] and answers == ["2", "yes"]


# ----------------------------------------------------------------------------------- temporal retrieval, ESC-50


def test_labels_between_hand_worked():
    events = [("Dog", 0.0, 1.0), ("Speech", 0.95, 2.0), ("Bird", 2.5, 3.0), ("Dog", 2.0, 2.6)]
    # Dog overlaps [0.9, 2.55] by exactly 0.1 s (in floats 0.0999...: still counted), Bird by 0.05 s (not)
    assert tasks.labels_between(events, 0.9, 2.55) == ["Dog", "Speech"]
    assert tasks.labels_between(events, 2.45, 3.0) == ["Dog", "Bird"]  # by onset: Dog's second event first
    assert tasks.labels_between(events, 3.5, 4.0) == []
    assert tasks.labels_between(events, 2.5, 3.0, min_overlap=0.5) == ["Bird"]


def test_training_prompts_are_drawn_among_each_tasks_paraphrases():
    """Training words each instruction with one of its task's paraphrases, drawn; evaluation always with the first."""
    for task, options in tasks.PROMPTS.items():
        fields = {"label": "bell", "start": 1.0, "end": 2.0, "question": "Is it raining?"}
        drawn = {tasks.prompt(task, random.Random(seed), **fields) for seed in range(60)}
        assert drawn == {o.format(**fields) for o in options}, task
        assert tasks.prompt(task, None, **fields) == options[0].format(**fields)


def test_each_paraphrase_asks_what_its_tasks_answer_gives():
    """A paraphrase changes the words, not the request: tagging's ask for key words or tags (a sentence is a
    caption), captioning's for a caption or a sentence, SED's for times and never a number, counting's for a number and
    never times, TER's name the window from its start to its end."""
    asks = {"tagging": r"key words|\btag", "captioning": r"caption|describe|succinctly|sentence",
            "sed": r"when|at what times|start and end", "counting": r"how many|count|how often",
            "ter": r"between \{start\}s and \{end\}s|from \{start\}s to \{end\}s"}
    never = {"tagging": r"sentence|caption", "captioning": r"key words", "sed": r"how many|count|how often",
             "counting": r"when|how long|at what times|start and end"}
    for task, wants in asks.items():
        for text in tasks.PROMPTS[task]:
            assert re.search(wants, text, re.I), (task, text)
            assert not re.search(never.get(task, "^$"), text, re.I), (task, text)


def test_each_builder_writes_its_prompt_and_answer_as_documented():
    """The evaluation prompts name a class as label_text writes it and give times to 0.1 s; the answer is the first
    reference (captioning), the written form of the annotators' most frequent answer, lower case without its period
    (AQA), the answer trimmed (NLAR, scored normalised); a few-shot episode's sentences name its labels as label_text
    writes them, its choices are the support labels once each in the order shown, and an unknown layout is refused."""
    assert tasks.sed("a.wav", "chirping_birds", [(0.0, 1.0)]).segments[1][1] == "When does chirping birds happen?"
    assert tasks.counting("a.wav", "Dog", 2).segments[1][1] == "How many times does dog occur?"
    assert tasks.ter("a.wav", [], 1, 2.04).segments[1][1] == "What happens between 1.0s and 2.0s?"
    caption = tasks.captioning("a.wav", ["A dog barks.", "Barking", "A dog is barking"])
    assert caption.answer == "A dog barks." and caption.target["references"][1:] == ["Barking", "A dog is barking"]
    assert tasks.aqa("a.wav", "Is it raining?", ["No", "Yes.", "yes"]).answer == "yes"
    assert tasks.aqa("a.wav", "Is it raining?", ["Yes", "No"]).answer == "yes"  # among equals, the first given
    nlar = tasks.nlar("a.wav", "b.wav", "Which recording holds the bell?", " The first. ")
    assert nlar.answer == "The first." and nlar.target["answer"] == "first"
    episode = tasks.fewshot([("s1.wav", "dog"), ("s2.wav", "chirping_birds"), ("s3.wav", "dog")], "q.wav", "dog")
    assert episode.target["choices"] == ["dog", "chirping_birds"]
    assert episode.segments[3] == ("text", "This is a sound of chirping birds.")
    for layout in ("List", "x"):
        with pytest.raises(SettingError, match=f"few-shot layout '{layout}'"):
            tasks.fewshot([("s1.wav", "dog")], "q.wav", "dog", layout=layout)


def test_the_evaluation_prompts_are_the_papers_and_the_list_layout_names_labels_as_the_prompts_do():
    """Tagging and captioning are asked as the paper asks them (§4.2, §4.3; appendix A.2 lists "Summarize the audio
    succinctly." among the caption prompts); a "list" episode is its instruction, the end of the user's turn, each
    support clip followed by its label as label_text writes it (as the answer is written), the query clip last."""
    assert tasks.tagging("a.wav", ["Dog"]).segments[1] == ("text", "Summarize the audio with key words.")
    assert tasks.captioning("a.wav", "A dog barks.").segments[1] == ("text", "Describe the audio clip concisely.")
    assert "Summarize the audio succinctly." in tasks.PROMPTS["captioning"][1:]
    episode = tasks.fewshot([("s1.wav", "chirping_birds"), ("s2.wav", "Dog")], "q.wav", "chirping_birds", layout="list")
    assert episode.segments == [("text", "Each sound is followed by its name. Name the last sound."), ("turn", ""),
                                ("audio", "s1.wav"), ("label", "chirping birds.\n"), ("audio", "s2.wav"),
                                ("label", "dog.\n"), ("audio", "q.wav")]
    assert episode.answer == "chirping birds"


def test_temporal_retrieval_examples(tmp_path):
    strong = ("segment_id\tstart_time_seconds\tend_time_seconds\tlabel\n"
              "abcdefghijk_30000\t4.0\t5.0\t/m/05zppz\n"
              "abcdefghijk_30000\t1.5\t2.5\t/m/0bt9lr\n"
              "abcdefghijk_30000\t0.0\t2.0\t/m/05zppz\n")
    write(tmp_path / "audioset/audioset_eval_strong.tsv", strong)
    write(tmp_path / "audioset/audioset_train_strong.tsv", strong)
    write(tmp_path / "audioset/mid_to_display_name.tsv", "/m/05zppz\tMale speech, man speaking\n/m/0bt9lr\tDog\n")
    touch_audio(tmp_path, "audio/Yabcdefghijk.wav")
    # evaluation: one window per event type, its first event's span; the answer names every overlapping type
    ex = data.examples("ter", tmp_path, "test")
    assert [(e.segments[1][1], e.answer) for e in ex] == [
        ("What happens between 1.5s and 2.5s?", "male speech, man speaking, dog"),
        ("What happens between 0.0s and 2.0s?", "male speech, man speaking, dog")]
    assert ex[0].target["labels"] == ["Male speech, man speaking", "Dog"]
    # training: one random event per clip, its span widened by up to 0.5 s each side; its label is in the answer
    widened = 0
    for seed in range(20):
        (t,) = data.examples("ter", tmp_path, "train", rng=random.Random(seed))
        start, end = (float(x) for x in re.findall(r"(\d+\.\d)s", t.segments[1][1]))
        widened += (start, end) not in {(4.0, 5.0), (1.5, 2.5), (0.0, 2.0)}
        inside = [lab for lab, on, off in [("Male speech, man speaking", 4.0, 5.0), ("Dog", 1.5, 2.5),
                                           ("Male speech, man speaking", 0.0, 2.0)]
                  if start <= on and off <= end and on - start <= 0.5 + 1e-9 and end - off <= 0.5 + 1e-9]
        assert inside and set(inside) <= set(t.target["labels"]), (seed, start, end)
    assert widened >= 10  # most windows are wider than their event (each side: 0 to 0.5 s, drawn)
    heard = set()  # and the event a window is made from is drawn among all of the clip's events
    for seed in range(20):
        (t,) = data.examples("ter", tmp_path, "train", rng=random.Random(seed))
        start, end = (float(x) for x in re.findall(r"(\d+\.\d)s", t.segments[1][1]))
        heard |= {on for on, off in [(4.0, 5.0), (1.5, 2.5), (0.0, 2.0)] if start <= on and off <= end}
    assert heard == {4.0, 1.5, 0.0}
    # one event: each side widened by 0, 0.1, ... or 0.5 s, every one of them drawn over 60 seeds (at 0.7 s and
    # 1.1 s, where 0.7 - 0.2 and 1.1 + 0.1 are a hair off 0.5 and 1.2 in floats: still rounded to them)
    write(tmp_path / "audioset/audioset_train_strong.tsv", strong.split("\n", 2)[0] + "\nabcdefghijk_30000\t0.7\t1.1\t"
                                                                                   "/m/05zppz\n")
    sides = set()
    for seed in range(60):
        (t,) = data.examples("ter", tmp_path, "train", rng=random.Random(seed))
        start, end = (float(x) for x in re.findall(r"(\d+\.\d)s", t.segments[1][1]))
        sides.add((round(0.7 - start, 1), round(end - 1.1, 1)))
    steps = {0.0, 0.1, 0.2, 0.3, 0.4, 0.5}
    assert {a for a, _ in sides} == steps and {b for _, b in sides} == steps
    assert len(sides) >= 20  # the two sides drawn apart, not one draw for both (6 pairs, 0-0 to 0.5-0.5)
    # a 40 ms bark gets a window of 0.1 s that names it, never "between 3.0s and 3.0s" with no answer
    write(tmp_path / "audioset/audioset_eval_strong.tsv", strong.replace("1.5\t2.5", "3.01\t3.05"))
    windows = {e.segments[1][1]: e.answer for e in data.examples("ter", tmp_path, "test")}
    assert windows["What happens between 3.0s and 3.1s?"] == "dog"
    write(tmp_path / "audioset/audioset_eval_strong.tsv", strong.replace("1.5\t2.5", "3.0\t3.0"))  # an instant
    windows = {e.segments[1][1]: e.answer for e in data.examples("ter", tmp_path, "test")}
    assert windows["What happens between 3.0s and 3.1s?"] == "dog"
    # strong labels in milliseconds: the window is rounded outward, so a 0.15 s bark at 1.04-1.19 s is inside its own
    # 1.0-1.2 s window (rounded to 1.0-1.2 either way) and one at 1.06-1.14 s too (inward: 1.1-1.1, 0.04 s of it)
    for on, off, window in [("1.04", "1.19", "1.0s and 1.2s"), ("1.06", "1.14", "1.0s and 1.2s"),
                            ("0.96", "1.04", "0.9s and 1.1s")]:
        write(tmp_path / "audioset/audioset_eval_strong.tsv", strong.replace("1.5\t2.5", f"{on}\t{off}"))
        windows = {e.segments[1][1]: e.answer for e in data.examples("ter", tmp_path, "test")}
        assert windows[f"What happens between {window}?"].endswith("dog"), (on, off, windows)


def test_esc50_pool_by_category_and_fold(tmp_path, caplog):
    rows = ["1-100032-A-0.wav,1,0,dog,True,100032,A", "1-110389-A-0.wav,1,0,dog,True,110389,A",
            "2-100648-A-14.wav,2,14,chirping_birds,False,100648,A",
            "3-102583-A-14.wav,3,14,chirping_birds,False,102583,A",
            "4-110389-A-0.wav,4,0,dog,True,110389,A", "5-9032-A-0.wav,5,0,dog,True,9032,A"]
    write(tmp_path / "esc50/meta/esc50.csv", "filename,fold,target,category,esc10,src_file,take\n" + "\n".join(rows))
    touch_audio(tmp_path, *[f"esc50/audio/{r.split(',')[0]}" for r in rows if not r.startswith("4-")])
    audio = tmp_path / "esc50" / "audio"
    assert data.esc50_pool(tmp_path, folds=(1, 2, 3)) == {
        "dog": [str(audio / "1-100032-A-0.wav"), str(audio / "1-110389-A-0.wav")],
        "chirping_birds": [str(audio / "2-100648-A-14.wav"), str(audio / "3-102583-A-14.wav")]}
    assert data.esc50_pool(tmp_path, folds=(2,)) == {"chirping_birds": [str(audio / "2-100648-A-14.wav")]}
    with caplog.at_level(logging.WARNING, logger="apt_min.data"):
        everything = data.esc50_pool(tmp_path)  # all five folds; fold 4's clip is not on disk: counted, said once
    assert len(everything["dog"]) == 3 and "1 of 6 audio files listed in" in caplog.text


def test_the_readmes_layouts_find_every_audioset_and_audiocaps_clip(prepared, tmp_path):
    """The two layout.json examples of the README, on the miniature benchmark with its AudioSet clips renamed as they
    say: by their start, and in PANNs' folders (one per segment list; a clip no list names, as AudioCaps' validation
    clips here, in a part folder of the unbalanced list). Every task that reads AudioSet's or AudioCaps' clips finds
    each clip it found in the benchmark's own layout: the segment lists', the strong labels' (detection, retrieval,
    counting) and AudioCaps' (a "{list}" pattern misses the strong labels' clips: their list is their own file)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    given = [json.loads(" ".join(m.split())) for m in re.findall(r"`(\{\"audioset\": .*?\}\})`", readme, re.S)]
    by_start = next(g for g in given if "{start:.3f}" in g["audioset"]["audio"])
    panns = next(g for g in given if "**" in g["audioset"]["audio"])
    assert set(by_start) == set(panns) == {"audioset", "audiocaps"}, given
    source = prepared / "synth"
    listed = {}
    for name in ("balanced_train_segments", "eval_segments"):
        for line in (source / "audioset" / f"{name}.csv").read_text().splitlines():
            if not line.startswith("#"):
                listed[line.split(",")[0]] = name
    checks = [("tagging", "train", {}), ("tagging", "test", {}), ("sed", "train", {}), ("ter", "test", {}),
              ("counting", "test", {})] + [("captioning", s, {"source": "audiocaps"}) for s in ("train", "val", "test")]
    part = "unbalanced_train_segments/unbalanced_train_segments_part00"
    for layout, rename in ((by_start, lambda ytid: f"audio/{ytid}_{0:.3f}.flac"),  # (every synthetic clip starts at 0)
                           (panns, lambda ytid: f"audios/{listed.get(ytid, part)}/Y{ytid}.wav")):
        root = tmp_path / ("panns" if layout is panns else "by_start")
        for entry in source.iterdir():
            if entry.name != "audio":
                (root / entry.name).parent.mkdir(parents=True, exist_ok=True)
                (root / entry.name).symlink_to(entry)
        for clip in (source / "audio").glob("Y*.wav"):
            (root / rename(clip.stem[1:])).parent.mkdir(parents=True, exist_ok=True)
            (root / rename(clip.stem[1:])).symlink_to(clip)  # (a .flac name on WAV bytes: read by its content)
        (root / "layout.json").write_text(json.dumps(layout))
        data._files_below.cache_clear()  # (read once per process)
        for task, split, kw in checks:
            ours = data.examples(task, source, split, **kw)
            theirs = data.examples(task, root, split, strict=True, **kw)
            assert ours and [Path(x.segments[0][1]).resolve() for x in theirs] == [
                Path(x.segments[0][1]).resolve() for x in ours], (layout, task, split)

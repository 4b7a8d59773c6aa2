"""Readers for the real data sets' own files, the examples of each task built from them, and batching.

Every reader takes the file as its authors released it (the formats are documented at each reader) and returns
plain records; a row it cannot read raises `DataError` naming the file and line. The synthetic benchmark
(`synth.py`) writes the same formats, so one path serves both. Where audio lives differs between download tools:
`LAYOUT` gives each data set's files and audio path pattern relative to a data root; a `layout.json` in the data root
replaces the entries it names, for that root (`layout_of`; e.g. "audio": "audio/{ytid}_{start:.3f}.flac" for clips named
by their start, or "audios/**/Y{ytid}.wav" for PANNs' folders, in both the "audioset" and the "audiocaps" entry, whose
clips are AudioSet's: a "**" stands for any folders below, the file found by its name; README, Quickstart), and
`layout=` overrides both. AudioSet's {list} is the name of the file that lists the clip: a segment list's, or for the
strong labels their own file's.
Audio that a list names but that is not on disk is counted and skipped with one warning per file (strict=True raises
instead) — never silently; a `Coverage` passed in records which files were listed and which were missing. A list
with no rows is an error naming the file.

    examples(task, root, split)        -> list[tasks.Example]   (evaluation: fixed prompts, all references)
    TaskSampler(pools, ratios, ...)    -> one task per batch, drawn by ratio; seeded and resumable
    fewshot_episode(pool, n, k, rng)   -> an N-way K-shot episode from a labelled pool
    caption_texts(root, split, source) -> a captioning split's captions alone (no audio needed)
"""

from __future__ import annotations

import copy
import csv
import functools
import io
import json
import logging
import math
import os
import random
import re
from collections import defaultdict
from pathlib import Path

from apt_min import tasks
from apt_min.errors import MissingFileError, SettingError, UserError
from apt_min.tasks import Example

log = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    """A data file that cannot be read as its format says; the message names the file and line."""


LAYOUT = {  # relative to the data root; {split} and the audio pattern's fields are filled per record
    "audioset": {"segments": {"train": "audioset/balanced_train_segments.csv",  # the train split (the readers')
                              "balanced": "audioset/balanced_train_segments.csv",  # tagging_sources' names: balanced
                              "unbalanced": "audioset/unbalanced_train_segments.csv",  # (22 k clips), unbalanced (2 M)
                              "test": "audioset/eval_segments.csv"},
                 "strong": {"train": "audioset/audioset_train_strong.tsv", "test": "audioset/audioset_eval_strong.tsv"},
                 "classes": "audioset/class_labels_indices.csv", "names": "audioset/mid_to_display_name.tsv",
                 "audio": "audio/Y{ytid}.wav"},  # fields: ytid, start, end, list (the segment file's name)
    "audiocaps": {"csv": "audiocaps/{split}.csv", "audio": "audio/Y{ytid}.wav"},  # fields: ytid, start, split
    "clotho": {"csv": "clotho/clotho_captions_{split}.csv", "audio": "clotho/{split}/{file_name}",
               "splits": {"train": "development", "val": "validation", "test": "evaluation"}},
    "clotho_aqa": {"csv": "clotho_aqa/clotho_aqa_{split}.csv", "audio": "clotho_aqa/audio_files/{file_name}"},
    # WavCaps: one JSON per subset, named as its release names them (a subset not listed: json_files/{subset}.json);
    # its zips unpack to .../waveforms/{subset}_flac/: move each to wavcaps/{subset}/. Its blacklists name the clips
    # that are also in the test sets of AudioCaps and Clotho, and of ESC-50 (with UrbanSound8K and VGGSound):
    # left out of training
    "wavcaps": {"json": "wavcaps/json_files/{subset}/{name}.json", "audio": "wavcaps/{subset}/{stem}.flac",
                "names": {"AudioSet_SL": "as_final", "BBC_Sound_Effects": "bbc_final", "FreeSound": "fsd_final",
                          "SoundBible": "sb_final"},
                "blacklists": ["wavcaps/json_files/blacklist/blacklist_exclude_test_ac.json",
                               "wavcaps/json_files/blacklist/blacklist_exclude_ub8k_esc50_vggsound.json"]},
    "esc50": {"csv": "esc50/meta/esc50.csv", "audio": "esc50/audio/{filename}"},
    "nlar": {"json": "nlar/nlar_{split}.json", "audio": "audio/{name}"},
    # AVQA's videos (avqa/videos/{video_name}.mp4) are read as extracted frames and 16 kHz audio (README: ffmpeg)
    "avqa": {"json": "avqa/{split}_qa.json", "frames": "avqa/frames/{video_name}",
             "audio": "avqa/audio/{video_name}.wav", "splits": {"train": "train", "val": "val", "test": "val"}},
}


LAYOUT_FILE = "layout.json"  # in a data root: the LAYOUT entries that differ there


def layout_of(root) -> dict:
    """LAYOUT for the data under `root`: LAYOUT with the entries that root's layout.json names replaced. A name
    LAYOUT lacks or a value of another kind is a SettingError naming the file; inside a dict-valued entry (a data
    set's splits, WavCaps's subsets) new names may be added."""
    path = Path(root) / LAYOUT_FILE
    if not path.is_file():
        return LAYOUT
    own = _json(path)
    merged = copy.deepcopy(LAYOUT)

    def merge(into: dict, new, where: str, open_keys: bool):
        if not isinstance(new, dict):
            raise SettingError(f"{path}: {where or 'the file'} must be a JSON object, found {new!r}")
        for key, value in new.items():
            at = f"{where}.{key}" if where else key
            if key not in into and not open_keys:
                raise SettingError(f"{path}: {at} is not an entry of apt_min.data.LAYOUT; "
                                   f"{where or 'it'} has {', '.join(sorted(into))}")
            like = into[key] if key in into else next(iter(into.values()))  # a new name: as its siblings
            if isinstance(like, dict):
                merge(into.setdefault(key, {}), value, at, open_keys=bool(where))
            elif isinstance(like, str) and isinstance(value, str) or isinstance(like, list) and \
                    isinstance(value, list) and all(isinstance(v, str) for v in value):
                into[key] = value
            else:
                raise SettingError(f"{path}: {at} must be {'text' if isinstance(like, str) else 'a list of texts'} "
                                   f"as in LAYOUT ({like!r}), found {value!r}")

    merge(merged, own, "", open_keys=False)
    _announce(str(path), ", ".join(own))
    return merged


@functools.cache
def _announce(path: str, names: str):
    log.info("%s replaces data.LAYOUT's entries for %s", path, names)


# ------------------------------------------------------------------------------------------------------- readers


def _json(path: Path):
    """A JSON file's contents; a file that is not JSON is a DataError naming the file and line."""
    try:
        return json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _text(path: Path) -> str:
    """File contents as text: UTF-8, else Windows-1252 (a file saved from Excel: its quotes and dashes), else
    ISO-8859-1 (Clotho's metadata), which reads any byte."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such data file")
    raw = path.read_bytes()
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            pass
    return raw.decode("latin-1")


def _rows(path: Path, header: list[str], **kw):
    """(line number, dict) for each row of a CSV whose first line must be `header`."""
    reader = csv.reader(io.StringIO(_text(path), newline=""), **kw)
    first = next(reader, None)
    if first is None or [h.strip() for h in first] != header:
        raise DataError(f"{path}:1: expected the header {','.join(header)}, found {first}")
    for row in reader:
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{reader.line_num}: expected {len(header)} fields, found {len(row)}: {row}")
        yield reader.line_num, dict(zip(header, row))


def _float(path, line, value, what):
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{path}:{line}: {what} {value!r} is not a number") from None


def _listed(path, records):
    """records, unless the file lists nothing (a header and no rows): an empty split is an error, not a result."""
    if not records:
        raise DataError(f"{path}: lists nothing (no rows after the header)")
    return records


def read_audioset_segments(path) -> list[tuple[str, float, float, list[str]]]:
    """AudioSet's segments CSV: '#' comment lines, then `YTID, start_seconds, end_seconds, "mid,mid,..."`."""
    out = []
    reader = csv.reader(io.StringIO(_text(path), newline=""), skipinitialspace=True)
    for row in reader:
        if not row or row[0].startswith("#"):
            continue
        line = reader.line_num
        if len(row) != 4 or not row[3]:
            raise DataError(f"{path}:{line}: expected YTID, start, end, \"labels\"; found {row}")
        out.append((row[0], _float(path, line, row[1], "start"), _float(path, line, row[2], "end"), row[3].split(",")))
    return _listed(path, out)


def read_class_labels(path) -> dict[str, str]:
    """class_labels_indices.csv -> {mid: display name}, in index order."""
    return _listed(path, {r["mid"]: r["display_name"] for _, r in _rows(path, ["index", "mid", "display_name"])})


def read_mid_to_name(path) -> dict[str, str]:
    """mid_to_display_name.tsv (no header): `mid<TAB>name` per line."""
    out = {}
    for line, text in enumerate(_text(path).splitlines(), 1):
        if text.strip():
            parts = text.split("\t")
            if len(parts) != 2:
                raise DataError(f"{path}:{line}: expected `mid<TAB>display name`, found {text!r}")
            out[parts[0]] = parts[1]
    return _listed(path, out)


def read_strong_labels(path) -> dict[tuple[str, float], list[tuple[str, float, float]]]:
    """AudioSet strong labels TSV -> {(ytid, clip start s): [(mid, onset, offset), ...]}; times within the clip.
    segment_id is `{YTID}_{start in ms}`; YouTube ids may themselves contain '_', so it is split at the last one."""
    out = defaultdict(list)
    for line, r in _rows(path, ["segment_id", "start_time_seconds", "end_time_seconds", "label"], delimiter="\t"):
        ytid, _, ms = r["segment_id"].rpartition("_")
        if not ytid or not ms.isdigit():
            raise DataError(f"{path}:{line}: segment_id {r['segment_id']!r} is not YTID_milliseconds")
        on, off = (_float(path, line, r[k], k) for k in ("start_time_seconds", "end_time_seconds"))
        out[(ytid, int(ms) / 1000)].append((r["label"], on, off))
    return _listed(path, dict(out))


def read_audiocaps(path) -> list[tuple[int, str, int, str]]:
    """AudioCaps CSV -> (audiocap_id, youtube_id, start_time, caption) rows."""
    out = []
    for line, r in _rows(path, ["audiocap_id", "youtube_id", "start_time", "caption"]):
        if not r["audiocap_id"].isdigit() or not r["start_time"].isdigit():
            raise DataError(f"{path}:{line}: audiocap_id and start_time must be whole numbers: {r}")
        out.append((int(r["audiocap_id"]), r["youtube_id"], int(r["start_time"]), r["caption"].strip()))
    return _listed(path, out)


def read_clotho_captions(path) -> list[tuple[str, list[str]]]:
    """clotho_captions_*.csv -> (file_name, five captions)."""
    header = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
    return _listed(path, [(r["file_name"], [r[f"caption_{i}"].strip() for i in range(1, 6)])
                          for _, r in _rows(path, header)])


def read_clotho_aqa(path) -> list[tuple[str, str, list[str], list[str]]]:
    """clotho_aqa_*.csv, one row per annotator -> (file_name, question, answers, confidences) per question."""
    grouped = {}
    for _, r in _rows(path, ["file_name", "QuestionText", "answer", "confidence"]):
        entry = grouped.setdefault((r["file_name"], r["QuestionText"].strip()), ([], []))
        entry[0].append(r["answer"])
        entry[1].append(r["confidence"])
    return _listed(path, [(f, q, a, c) for (f, q), (a, c) in grouped.items()])


def read_wavcaps(path) -> list[dict]:
    """A WavCaps JSON file: {"num_captions_per_audio": 1, "data": [{"id", "caption", "audio", "duration", ...}]}."""
    raw = _json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise DataError(f"{path}: expected an object with a 'data' list")
    for i, item in enumerate(raw["data"]):
        if not isinstance(item, dict) or not {"id", "caption"} <= item.keys():
            raise DataError(f"{path}: data[{i}] lacks 'id' or 'caption': {item}")
    return _listed(path, raw["data"])


def read_esc50(path) -> list[tuple[str, int, int, str]]:
    """esc50.csv -> (filename, fold, target, category)."""
    out = []
    for line, r in _rows(path, ["filename", "fold", "target", "category", "esc10", "src_file", "take"]):
        if not r["fold"].isdigit() or not r["target"].isdigit():
            raise DataError(f"{path}:{line}: fold and target must be whole numbers: {r}")
        out.append((r["filename"], int(r["fold"]), int(r["target"]), r["category"]))
    return _listed(path, out)


def _json_list(path, keys) -> list[dict]:
    raw = _json(path)
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a list of items")
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not set(keys) <= item.keys():
            raise DataError(f"{path}: item {i} lacks one of {keys}: {item}")
    return _listed(path, raw)


def read_nlar(path) -> list[dict]:
    """NLAR JSON (ours; the original is unreleased): [{"audio_1", "audio_2", "question", "answer"}]."""
    if not Path(path).is_file():  # the one data set a real-data user cannot download: say what to do instead
        raise MissingFileError(f"{path}: no such data file (the paper's NLAR set is not released: write one in "
                               "this format, as apt_min/synth.py does, or train without it: nlar=0 in --task_ratios, "
                               "after the preset's own ratios if it sets any)")
    return _json_list(path, ["audio_1", "audio_2", "question", "answer"])


def read_avqa(path) -> list[dict]:
    """AVQA train_qa.json / val_qa.json: [{id, video_name, video_id, question_text, multi_choice, answer, ...}]."""
    items = _json_list(path, ["id", "video_name", "question_text", "multi_choice", "answer"])
    for i, item in enumerate(items):
        choices, answer = item["multi_choice"], str(item["answer"]).strip()
        if not isinstance(choices, list) or len(choices) != 4 or answer not in ("0", "1", "2", "3"):
            raise DataError(f"{path}: item {i} needs a list of 4 choices and an answer index 0-3: {item}")
    return items


# ------------------------------------------------------------------------------------------------- audio on disk


class Coverage:
    """What a split's lists named and what of it could be used: {path: the list that names it} for the distinct
    files listed, those not on disk, and {path: why} for those that could not be decoded (evaluation fills that in,
    as it encodes them). Evaluation reports it beside its scores; nothing is dropped without being counted here."""

    def __init__(self):
        self.listed, self.missing, self.unreadable = {}, {}, {}

    def lines(self) -> list[str]:
        """One line per file that could not be used: path, tab, why."""
        return ([f"{p}\tmissing (listed in {src})" for p, src in self.missing.items()]
                + [f"{p}\tunreadable: {why}" for p, why in self.unreadable.items()])


class AudioFiles:
    """Resolves records to audio paths under a data root; counts what is missing and warns once per source."""

    def __init__(self, root: Path, pattern: str, source: Path, strict: bool, coverage: Coverage | None = None):
        self.root, self.pattern, self.source, self.strict = Path(root), pattern, source, strict
        self.seen = self.missing = 0
        self.coverage = coverage

    def __call__(self, **fields) -> str | None:
        try:
            path = self.root / self.pattern.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise SettingError(f"the audio path pattern {self.pattern!r} (data.LAYOUT or the data root's "
                               f"{LAYOUT_FILE}, for the clips {self.source} lists) cannot be filled "
                               f"({type(e).__name__}: {e}); its fields are "
                               f"{', '.join('{' + k + '}' for k in fields)}") from None
        if "**" in path.parts:  # "audios/**/Y{ytid}.wav": the file of that name anywhere below audios/
            path = _files_below(Path(*path.parts[:path.parts.index("**")])).get(path.name, path)
        self.seen += 1
        if self.coverage is not None:
            self.coverage.listed.setdefault(str(path), str(self.source))
        if path.is_file():
            return str(path)
        if self.strict:
            raise MissingFileError(f"{path}: audio listed in {self.source} is not on disk")
        self.missing += 1
        if self.coverage is not None:
            self.coverage.missing[str(path)] = str(self.source)
        return None

    def report(self):
        if self.missing:
            log.warning("%d of %d audio files listed in %s are missing under %s (pattern %r); those rows are "
                        "skipped (strict=True raises instead)", self.missing, self.seen, self.source, self.root,
                        self.pattern)


@functools.cache
def _files_below(folder: Path) -> dict[str, Path]:
    """Every file below `folder` by its name (read once per process): where a pattern's "**" stands for folders the
    download tool chose, such as PANNs' unbalanced_train_segments_part00 .. part40. A name found twice is an error."""
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            if name in found:
                raise DataError(f"{found[name]} and {Path(parent) / name}: two files of one name below {folder}, "
                                "where an audio path pattern's ** stands for any folder")
            found[name] = Path(parent) / name
    return found


# ------------------------------------------------------------------------------------------------------ examples


def _in_number_order(path: Path) -> list:
    """A sort key that puts frame 2 before frame 10 (the digits in a name compared as numbers)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path.name)]


def avqa_items(root, split: str = "test", frames: int = 10, strict: bool = False, layout: dict | None = None,
               coverage: Coverage | None = None):
    """AVQA questions whose frames and audio are on disk: [{"question", "options", "answer" (index), "relation",
    "video", "frames" (`frames` paths, evenly spaced over those extracted, in time order), "audio"}]. A video without
    its audio or frames is skipped, counted and reported (strict=True raises instead). The test split is AVQA's val."""
    lay, root = (layout or layout_of(root))["avqa"], Path(root)
    path = root / lay["json"].format(split=lay["splits"].get(split, split))
    files = AudioFiles(root, lay["audio"], path, strict, coverage)
    out, no_frames = [], []
    for item in read_avqa(path):
        name = item["video_name"]
        folder = root / lay["frames"].format(video_name=name)
        images = sorted([*folder.glob("*.jpg"), *folder.glob("*.png")], key=_in_number_order) if folder.is_dir() else []
        if not images:
            if strict:
                raise MissingFileError(f"{folder}: no frames (*.jpg, *.png) for video {name} listed in {path}")
            no_frames.append(name)
            if coverage is not None:
                coverage.listed[str(folder)] = coverage.missing[str(folder)] = str(path)
            continue
        audio = files(video_name=name)
        if audio is None:
            continue
        n = min(frames, len(images))  # a video with fewer frames than asked for gives each of its frames once
        pick = [images[round(i * (len(images) - 1) / max(1, n - 1))] for i in range(n)]
        out.append({"question": item["question_text"], "options": [str(c) for c in item["multi_choice"]],
                    "answer": int(item["answer"]), "relation": item.get("question_relation", ""), "video": name,
                    "frames": [str(f) for f in pick], "audio": audio})
    files.report()
    if no_frames:
        log.warning("%d of the videos listed in %s have no frames under %s (e.g. %s); their questions are skipped "
                    "(strict=True raises instead)", len(no_frames), path, root / lay["frames"], no_frames[:3])
    return out


def examples(task: str, root, split: str, *, source: str | None = None, rng: random.Random | None = None,
             strict: bool = False, layout: dict | None = None, coverage: Coverage | None = None) -> list[Example]:
    """All examples of `task` in `split` of the data under `root`. rng=None gives evaluation examples (first
    prompts; captioning with all references per clip); an rng gives training ones (drawn paraphrases, one example
    per caption). source picks the captioning set: audiocaps (default), clotho or wavcaps:<subset>. coverage: where the
files listed and those missing are recorded."""
    L, root = layout or layout_of(root), Path(root)
    if task == "tagging":
        return _audioset(L, root, split, strict, lambda audio, names, _: [tasks.tagging(audio, names, rng)], coverage)
    if task in ("sed", "ter", "counting"):
        return _strong(L, root, split, task, rng, strict, coverage)
    if task == "captioning":
        return _captions(L, root, split, source or "audiocaps", rng, strict, coverage)
    if task == "aqa":
        lay = L["clotho_aqa"]
        path = root / lay["csv"].format(split=split)
        files = AudioFiles(root, lay["audio"], path, strict, coverage)
        out = [tasks.aqa(a, q, answers) for f, q, answers, _ in read_clotho_aqa(path) if (a := files(file_name=f))]
        files.report()
        return out
    if task == "nlar":
        lay = L["nlar"]
        path = root / lay["json"].format(split=split)
        files = AudioFiles(root, lay["audio"], path, strict, coverage)
        out = []
        for item in read_nlar(path):
            a1, a2 = files(name=item["audio_1"]), files(name=item["audio_2"])
            if a1 and a2:
                out.append(tasks.nlar(a1, a2, item["question"], item["answer"]))
        files.report()
        return out
    if task == "fewshot":
        raise ValueError("few-shot examples are episodes: use esc50_pool / single_label_pool and fewshot_episode")
    raise ValueError(f"unknown task {task!r}; one of {tasks.TASKS}")


def _names(L, root) -> dict[str, str]:
    return read_class_labels(root / L["audioset"]["classes"])


def _audioset(L, root, split, strict, build, coverage=None):
    lay = L["audioset"]
    if split not in lay["segments"]:
        raise DataError(f"AudioSet has no {split!r} split here; it has {sorted(lay['segments'])}")
    path, names = root / lay["segments"][split], _names(L, root)
    files = AudioFiles(root, lay["audio"], path, strict, coverage)
    out = []
    for ytid, start, end, mids in read_audioset_segments(path):
        unknown = [m for m in mids if m not in names]
        if unknown:
            raise DataError(f"{path}: {ytid} has labels not in class_labels_indices.csv: {unknown}")
        if audio := files(ytid=ytid, start=start, end=end, list=path.stem):
            out += build(audio, [names[m] for m in mids], (ytid, start))
    files.report()
    return out


def _strong(L, root, split, task, rng, strict, coverage=None):
    lay = L["audioset"]
    if split not in lay["strong"]:
        raise DataError(f"AudioSet strong labels have no {split!r} split here; they have {sorted(lay['strong'])}")
    path = root / lay["strong"][split]
    names = read_mid_to_name(root / lay["names"])
    files = AudioFiles(root, lay["audio"], path, strict, coverage)
    out = []
    for (ytid, start), rows in read_strong_labels(path).items():
        audio = files(ytid=ytid, start=start, end=start + 10, list=path.stem)  # (strong labels: 10 s clips)
        if not audio:
            continue
        events = sorted({(names.get(m, m), on, off) for m, on, off in rows})  # a row repeated exactly (label and
        # times) is one event annotated twice, not two: counting would count it twice, detection match it twice
        by_label = defaultdict(list)
        for label, on, off in events:
            by_label[label].append((on, off))
        if task == "sed":
            out += [tasks.sed(audio, label, spans, rng) for label, spans in by_label.items()]
        elif task == "counting":
            out += [tasks.counting(audio, label, len(spans), rng) for label, spans in by_label.items()]
        else:  # ter: one window per event type at evaluation; a random, widened event span in training
            picks = [spans[0] for spans in by_label.values()] if rng is None else [rng.choice(events)[1:]]
            for on, off in picks:
                if rng is not None:
                    on, off = max(0.0, on - rng.randint(0, 5) / 10), off + rng.randint(0, 5) / 10
                # to 0.1 s, outward, so the window holds the event it was made from (an event of 0.1-0.2 s
                # rounded inward can overlap its window by less than labels_between asks); never a 0 s window
                on, off = math.floor(on * 10 + 1e-6) / 10, math.ceil(off * 10 - 1e-6) / 10
                out.append(tasks.ter(audio, events, on, max(off, round(on + 0.1, 1)), rng))
    files.report()
    return out


def _captions(L, root, split, source, rng, strict, coverage=None):
    path, pattern, records = _caption_records(L, root, split, source)
    files = AudioFiles(root, pattern, path, strict, coverage)
    pairs = [(files(**fields), caps) for fields, caps in records]
    files.report()
    if rng is None:
        return [tasks.captioning(a, caps) for a, caps in pairs if a]
    return [tasks.captioning(a, c, rng) for a, caps in pairs if a for c in caps]


def _caption_records(L, root, split, source) -> tuple[Path, str, list[tuple[dict, list[str]]]]:
    """A captioning set's annotation file, the pattern of its audio paths, and per clip (the fields that name its
    audio in the pattern, its captions)."""
    if source == "audiocaps":
        lay = L["audiocaps"]
        by_clip = {}
        for _, ytid, start, caption in read_audiocaps(path := root / lay["csv"].format(split=split)):
            by_clip.setdefault((ytid, start), []).append(caption)
        return path, lay["audio"], [({"ytid": y, "start": s, "split": split}, caps) for (y, s), caps in by_clip.items()]
    if source == "clotho":
        lay = L["clotho"]
        if split not in lay["splits"]:
            raise DataError(f"Clotho has no {split!r} split here; it has {sorted(lay['splits'])} (its files' "
                            f"{', '.join(lay['splits'].values())})")
        name = lay["splits"][split]
        path = root / lay["csv"].format(split=name)
        return path, lay["audio"].replace("{split}", name), [({"file_name": f}, caps)
                                                             for f, caps in read_clotho_captions(path)]
    if source.startswith("wavcaps:"):
        lay, subset = L["wavcaps"], source.split(":", 1)[1]
        name = lay.get("names", {}).get(subset)
        path = root / (lay["json"].format(subset=subset, name=name) if name else f"wavcaps/json_files/{subset}.json")
        excluded, listed = wavcaps_blacklisted(root, subset, tuple(lay.get("blacklists", ()))), read_wavcaps(path)
        held_out = audioset_test_ytids(L, root) if subset.startswith("AudioSet") else set()
        records = [({"stem": stem, **d}, [d["caption"]]) for d in listed
                   if (stem := Path(str(d["id"])).stem) not in excluded and _ytid(stem) not in held_out]
        if dropped := len(listed) - len(records):
            log.info("%s: %d clips left out, WavCaps's blacklists name them or AudioSet tests on them (test clips "
                     "of other data sets)", path, dropped)
        return path, lay["audio"].replace("{subset}", subset), records
    raise ValueError(f"unknown captioning source {source!r}: audiocaps, clotho or wavcaps:<subset>")


def _ytid(stem: str) -> str | None:
    """The YouTube id in a clip's name: "Y" and the 11-character id, or the id alone, maybe followed by "_start"."""
    m = re.match(r"Y?([A-Za-z0-9_-]{11})(?:_|$)", stem)
    return m[1] if m else None


def audioset_test_ytids(L: dict, root: Path) -> set[str]:
    """The YouTube ids of AudioSet's test clips (eval_segments.csv, and the strong labels' test list), which
    WavCaps's AudioSet_SL subset holds some of (its ids: "Y" + the 11-character YouTube id ...) and its blacklists do
    not all name: left out of training. A list not under the data root is a warning, once."""
    lay, out = L["audioset"], set()
    for path, read in ((root / lay["segments"]["test"], lambda p: {y for y, *_ in read_audioset_segments(p)}),
                       (root / lay["strong"]["test"], lambda p: {y for y, _ in read_strong_labels(p)})):
        if path.is_file():
            out |= read(path)
        else:
            _warn_once(f"{path}: AudioSet's test list is not there; WavCaps's AudioSet_SL clips that it names are not "
                       "left out of training")
    return out


def wavcaps_blacklisted(root: Path, subset: str, blacklists: tuple[str, ...]) -> set[str]:
    """The clips of one WavCaps subset that its release's blacklists name, by file stem ({"AudioSet": ["Y...wav",
    ...], "FreeSound": ["156", ...]}: a key names the subsets it starts). A blacklist not under the data root is a
    warning, once: the test clips it names may then be trained on."""
    out = set()
    for name in blacklists:
        path = root / name
        if not path.is_file():
            _warn_once(f"{path}: WavCaps's blacklist is not there; the clips it names (test clips of AudioCaps, Clotho "
                       "or ESC-50) are not left out of training")
            continue
        lists = _json(path)
        if not isinstance(lists, dict):
            raise DataError(f"{path}: expected an object of id lists by subset")
        for key, ids in lists.items():
            if subset == key or subset.startswith(f"{key}_"):
                out |= {Path(str(i)).stem for i in ids}
    return out


@functools.cache
def _warn_once(message: str):
    log.warning("%s", message)


def caption_texts(root, split: str, source: str = "audiocaps", layout: dict | None = None) -> list[str]:
    """Every caption of a captioning set's split, read from its annotation file alone, whether or not the audio is
    on disk: what a text-only baseline (the most frequent training caption) needs."""
    return [c for _, caps in _caption_records(layout or layout_of(root), Path(root), split, source)[2] for c in caps]


# ------------------------------------------------------------------------------------------------------ few-shot


def esc50_pool(root, folds=(1, 2, 3, 4, 5), strict=False, layout=None, coverage=None) -> dict[str, list[str]]:
    """ESC-50 clips by category: {label: [audio paths]}."""
    lay = (layout or layout_of(root))["esc50"]
    path = Path(root) / lay["csv"]
    files = AudioFiles(root, lay["audio"], path, strict, coverage)
    pool = defaultdict(list)
    for fname, fold, _, category in read_esc50(path):
        if fold in folds and (a := files(filename=fname)):
            pool[category].append(a)
    files.report()
    return dict(pool)


def single_label_pool(root, split="train", strict=False, layout=None, coverage=None) -> dict[str, list[str]]:
    """AudioSet clips that carry exactly one label, by label: the training pool for few-shot episodes."""
    pool = defaultdict(list)

    def keep(audio, names, _):
        if len(names) == 1:
            pool[names[0]].append(audio)
        return []

    _audioset(layout or layout_of(root), Path(root), split, strict, keep, coverage)
    return dict(pool)


def pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word ("tovak"): a label that no model can know beforehand."""
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(2)) + rng.choice("kmnst")


def fillable_classes(pool: dict[str, list[str]], k_shot: int) -> list[str]:
    """The classes of a few-shot pool that can give K supports and a query (more than K clips each), sorted."""
    return sorted(label for label, clips in pool.items() if len(clips) > k_shot)


def fewshot_episode(pool: dict[str, list[str]], n_way: int, k_shot: int, rng: random.Random,
                    rename: bool = False, layout: str = "paper") -> Example:
    """N classes, K support clips each (shuffled), and one more clip of one of them as the query.
    rename=True gives the classes made-up names for this episode: the answer can then only be found by matching
    the query to the supports, which is what classes never seen in training will need (beyond the paper, which
    trains on real names only)."""
    eligible = fillable_classes(pool, k_shot)
    if len(eligible) < n_way:
        raise DataError(f"a {n_way}-way {k_shot}-shot episode needs {n_way} classes with more than {k_shot} clips; "
                         f"this pool has {len(eligible)}")
    labels = rng.sample(eligible, n_way)
    answer = rng.choice(labels)
    support = []
    for label in labels:
        clips = rng.sample(pool[label], k_shot + (label == answer))
        if label == answer:
            query = clips.pop()
        support += [(c, label) for c in clips]
    rng.shuffle(support)
    if rename:  # different names, none of them the name of a class in the pool ("siren" can be made up)
        names, taken = {}, {label.lower() for label in pool}
        for label in labels:
            while (name := pseudo_word(rng)) in taken:
                pass
            names[label] = name
            taken.add(name)
        support, answer = [(c, names[label]) for c, label in support], names[answer]
    return tasks.fewshot(support, query, answer, layout)


# ------------------------------------------------------------------------------------------------------ batching


class TaskSampler:
    """One task per batch, drawn by ratio (as the public APT code does), from per-task pools.
    A pool is a list of examples (visited in a fresh shuffled order each pass) or a function rng -> Example (such
    as an episode builder). Everything derives from (seed, step), so `state_dict` is a few integers and a resumed
    run draws exactly the batches an uninterrupted one would."""

    def __init__(self, pools: dict, ratios: dict[str, float], batch_size: int, seed: int = 0):
        if unknown := {t for t, weight in ratios.items() if weight > 0} - set(pools):
            raise SettingError(f"ratios for tasks without data: {sorted(unknown)}")
        self.pools = pools
        self.tasks = [t for t in ratios if ratios[t] > 0]
        if not self.tasks:
            raise SettingError("no task to train on: every task's ratio is 0")
        if empty := [t for t in self.tasks if not callable(pools[t]) and not pools[t]]:
            raise DataError(f"no training examples left for {', '.join(empty)}: every clip the data lists is "
                            f"missing or was skipped (the warnings above count them and name the audio path pattern; a "
                            f"{LAYOUT_FILE} in the data root names your copies' files)")
        self.weights = [ratios[t] for t in self.tasks]
        self.batch_size, self.seed = batch_size, seed
        self.step, self.cursor = 0, {t: 0 for t in self.tasks}  # cursor: examples taken so far from a list pool
        self._orders = {}  # task -> (epoch, its shuffled order), computed once per pass

    def _order(self, task: str, epoch: int) -> list[int]:
        if self._orders.get(task, (None,))[0] != epoch:
            order = list(range(len(self.pools[task])))
            random.Random(f"{self.seed}/{task}/{epoch}").shuffle(order)
            self._orders[task] = (epoch, order)
        return self._orders[task][1]

    def next_batch(self) -> tuple[str, list[Example]]:
        rng = random.Random(f"{self.seed}/step/{self.step}")
        task = rng.choices(self.tasks, self.weights)[0]
        pool, batch = self.pools[task], []
        for _ in range(self.batch_size):
            if callable(pool):
                batch.append(pool(rng))
                continue
            epoch, i = divmod(self.cursor[task], len(pool))
            batch.append(pool[self._order(task, epoch)[i]])
            self.cursor[task] += 1
        self.step += 1
        return task, batch

    def peek(self) -> tuple[str, list[Example]]:
        """The batch next_batch will return, without taking it (so that its clips can be read ahead)."""
        state = self.state_dict()
        try:
            return self.next_batch()
        finally:
            self.load_state_dict(state)

    def state_dict(self) -> dict:
        return {"step": self.step, "cursor": dict(self.cursor), "seed": self.seed}

    def load_state_dict(self, state: dict):
        """Continue where `state` (a checkpoint's) stopped; its seed is kept. A checkpoint drawn from other tasks
        (a cursor per task it drew from) is refused: the draws could not continue, and a task new to it has no place."""
        if set(state["cursor"]) != set(self.tasks):
            raise SettingError(f"the checkpoint was trained on the tasks {sorted(state['cursor'])} and these "
                               f"settings draw {sorted(self.tasks)}: resume with the run's own --task_ratios (or start "
                               "a new run)")
        self.step, self.seed, self.cursor = state["step"], state["seed"], copy.deepcopy(state["cursor"])


def clips_of(examples: list[Example]) -> list[str]:
    """The distinct audio files of the examples, in order."""
    return list(dict.fromkeys(v for ex in examples for k, v in ex.segments if k == "audio"))


def collate(batch: list[Example]) -> tuple[list[list[tuple[str, str]]], list[str]]:
    """Examples -> (the segment lists, the answers), as the model takes them."""
    return [ex.segments for ex in batch], [ex.answer for ex in batch]

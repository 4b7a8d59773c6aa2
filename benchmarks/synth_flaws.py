"""The synthetic benchmark's known flaws, counted over every split: where its ground truth is not the whole truth of
the audio it wrote, or where a question's form tells its answer. The benchmark is generated again into a temporary
folder (about a minute), and what is counted is measured here, with this script's own code, on what the files and
the ground truth hold (never with the generator's functions that wrote them). Version 1 of the data had every flaw
below; version 2 mended them (README, The synthetic benchmark, version 2), and this is how it shows.
    python benchmarks/synth_flaws.py

- ties: two kinds of sound that start at the same moment leave "Which sound is heard first?", "Which sound starts
  last?", "Does the X start before the Y?" (AQA) and "Do the two recordings start with the same sound?" (NLAR)
  without a single right answer;
- order answers: "Which sound starts last?" answered with another kind than the one of the last onset;
- loudness: NLAR's "In which recording is the X louder?" answered against what the written files say;
- silent ends: an event whose first or last 100 ms holds nothing louder than the scene's background (a pulse sound's
  annotated offset past its last pulse), and, the other way, sound still heard in the 100 ms after an offset;
- caption order: captions that order the kinds of sound ("then", "in that order", "in sequence") where their
  occurrences interleave;
- the forms' lean: how much of the test a question's form alone answers (each form's most frequent answer in the
  train split), for AQA's yes/no questions and for NLAR, beside a random answer per form;
- the stand-in LLM's corpus: the answers of its AQA documents (version 1: yes or no, never a word).
"""

import argparse
import collections
import re
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from apt_min import synth

ORDER_WORDS = re.compile(r", then |in that order|followed by|^First |in sequence")  # the caption forms that order
STEP = 0.1  # seconds: the grid of the annotations


def first_onsets(events) -> dict[str, float]:
    onsets = {}
    for e in sorted(events, key=lambda e: e.onset):
        onsets.setdefault(e.label, e.onset)
    return onsets


def openers(events) -> set[str]:
    """The kinds of sound that start first; several when they start together."""
    start = min(e.onset for e in events)
    return {e.label for e in events if e.onset == start}


def last_starters(events) -> set[str]:
    """The kinds of sound of the last onset; several when two start together last."""
    start = max(e.onset for e in events)
    return {e.label for e in events if e.onset == start}


def aqa_order_answers(question: str, events) -> set[str] | None:
    """Every answer the scene allows to an order question (one, unless sounds start together); None for the rest."""
    if question == "Which sound is heard first?":
        return openers(events)
    if question == "Which sound starts last?":
        return last_starters(events)
    if m := re.fullmatch(r"Does the (\w+) start before the (\w+)\?", question):
        onsets = first_onsets(events)
        x, y = onsets[m[1]], onsets[m[2]]
        return {"yes", "no"} if x == y else {"yes" if x < y else "no"}
    return None


def interleaved(events) -> bool:
    """Whether some occurrence of a kind starts after an occurrence of a kind that first appears later."""
    order = list(first_onsets(events))
    last = {x: max(e.onset for e in events if e.label == x) for x in order}
    first = first_onsets(events)
    return any(last[a] > first[b] for i, a in enumerate(order) for b in order[i + 1:])


def window_levels(audio: np.ndarray) -> np.ndarray:
    """RMS of each 100 ms window of the grid (window k: k/10 s to (k+1)/10 s) above 20 Hz, each window alone: its
    straight-line trend taken out, then its bins below 20 Hz (brown noise holds most of its power there, where the
    filter banks see nothing). Window by window, so no sound's level leaks into the windows around it."""
    n = int(STEP * 16000)
    x = audio[:len(audio) // n * n].astype(np.float64).reshape(-1, n)
    t = np.linspace(-1, 1, n)
    slope = x @ t / (t @ t)
    x = x - x.mean(axis=1, keepdims=True) - slope[:, None] * t
    spectrum = np.fft.rfft(x, axis=1)
    spectrum[:, np.fft.rfftfreq(n, 1 / 16000) < 20] = 0
    return np.sqrt(np.mean(np.fft.irfft(spectrum, n, axis=1) ** 2, axis=1))


def silent_ends(audio: np.ndarray, events, over: float = 1.3) -> dict[str, int]:
    """For each event whose edge no other event touches: whether its first and its last 100 ms stand above the
    background (their level above `over` times the median of the windows away from every event), and whether the
    100 ms after its offset, where no event is annotated, does. The background's own windows are counted too (how
    often noise alone passes: what "heard after the end" is to be read against)."""
    level = window_levels(audio)
    busy = np.zeros(len(level), dtype=bool)
    for e in events:
        busy[max(0, round(e.onset * 10) - 1):round(e.offset * 10) + 1] = True
    quiet = level[~busy]
    if len(quiet) < 3:
        return {}
    floor = over * float(np.median(quiet))
    out = collections.Counter({"background windows": len(quiet), "background above": int((quiet > floor).sum())})

    def clear(a, b, e):  # no other event within [a, b) seconds
        return not any(o is not e and o.onset < b - 1e-6 and a + 1e-6 < o.offset for o in events)

    for e in events:
        a, b = round(e.onset * 10), round(e.offset * 10)
        if clear(e.onset, e.onset + STEP, e):
            out["starts checked"] += 1
            out["silent start"] += bool(level[a] <= floor)
        if clear(e.offset - STEP, e.offset, e):
            out["ends checked"] += 1
            out["silent end"] += bool(level[b - 1] <= floor)
        if b < len(level) and clear(e.offset, e.offset + STEP, e):
            out["after checked"] += 1
            out["heard after the end"] += bool(level[b] > floor)
    return out


def alone(event, events) -> bool:
    """Whether no other event sounds during this one."""
    return not any(o is not event and o.onset < event.offset and event.onset < o.offset for o in events)


def peak_in(audio: np.ndarray, event) -> float:
    return float(np.abs(audio[int(round(event.onset * 16000)):int(round(event.offset * 16000))]).max())


def form_of(question: str) -> str:
    """A question's form: its words with the sound names taken out."""
    names = "|".join(c.name for c in synth.CLASSES)
    return re.sub(rf"\b(an? )?({names})\b", "X", question)


def lean(train: list[tuple[str, str]], test: list[tuple[str, str]]) -> tuple[float, float]:
    """(accuracy on test of each form's most frequent train answer, of a random answer among each form's answers)."""
    by_form = collections.defaultdict(collections.Counter)
    for q, a in train:
        by_form[form_of(q)][a] += 1
    right = chance = 0.0
    for q, a in test:
        answers = by_form[form_of(q)]
        right += bool(answers) and answers.most_common(1)[0][0] == a
        chance += 1 / len(answers) if a in answers else 0.0
    return right / len(test), chance / len(test)


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    count = collections.Counter()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        truth = synth.build(root)
        scenes = [(root / "audio" / f"Y{yid}.wav", events) for split in truth["pool"].values()
                  for yid, events, _ in split]
        files = {"train": "development", "val": "validation", "test": "evaluation"}
        scenes += [(root / "clotho" / files[split] / name, events) for split, rows in truth["clotho"].items()
                   for name, events, _, _ in rows]
        audio = {path.name: sf.read(path, dtype="float32")[0] for path, _ in scenes}
        for path, events in scenes:
            count.update(silent_ends(audio[path.name], events))
        aqa = {split: [(q, a) for _, _, _, qs in rows for q, a in qs] for split, rows in truth["clotho"].items()}
        for rows in truth["clotho"].values():
            for _, events, _, questions in rows:
                for q, a in questions:
                    allowed = aqa_order_answers(q, events)
                    if allowed is not None:
                        count["AQA order"] += 1
                        count["AQA tie"] += len(allowed) > 1
                        count["AQA order, wrong"] += a not in allowed
        for rows in truth["pool"].values():
            for _, events, captions in rows:
                if len({e.label for e in events}) > 1:
                    ordering = sum(bool(ORDER_WORDS.search(c)) for c in captions)
                    count["captions ordering"] += ordering
                    count["captions ordering, false"] += ordering * interleaved(events)
        pool = {f"Y{yid}.wav": events for split in truth["pool"].values() for yid, events, _ in split}
        for items in truth["nlar"].values():
            for item in items:
                q, a, ev1, ev2 = item["question"], item["answer"], pool[item["audio_1"]], pool[item["audio_2"]]
                count["NLAR"] += 1
                if q == "Do the two recordings start with the same sound?":
                    count["NLAR tie"] += len({x == y for x in openers(ev1) for y in openers(ev2)}) > 1
                loudest = [max((e for e in ev if e.label == q.split()[-2]), key=lambda e: e.gain_db, default=None)
                           for ev in (ev1, ev2)]
                if re.fullmatch(r"In which recording is the (\w+) louder\?", q) and all(
                        alone(e, ev) for e, ev in zip(loudest, (ev1, ev2))):  # each clip's loudest, read alone
                    peaks = [peak_in(audio[item[f"audio_{i}"]], e) for i, e in ((1, loudest[0]), (2, loudest[1]))]
                    said = 20 * np.log10(peaks[0] / peaks[1]) * (1 if a == "first" else -1)
                    count["louder"] += 1
                    count["louder, the files say the other"] += said < 0
                    count["louder, the files say the other by 3 dB"] += said <= -3
        nlar = {split: [(i["question"], i["answer"]) for i in items] for split, items in truth["nlar"].items()}
        corpus = synth.lm_corpus(root, "train", 0)
    yes_no = {split: [(q, a) for q, a in qs if a in ("yes", "no")] for split, qs in aqa.items()}

    print(f"ties: AQA {count['AQA tie']} of {count['AQA order']} order questions, NLAR {count['NLAR tie']} of "
          f"{count['NLAR']}, ask about an order that two sounds share")
    print(f"order answers: {count['AQA order, wrong']} of {count['AQA order']} AQA order questions answered with a "
          "kind or yes/no that the onsets contradict")
    print(f"loudness: of {count['louder']} NLAR 'louder' questions (those whose events sound alone) the written "
          f"files say the other clip's is louder in {count['louder, the files say the other']}, by 3 dB or more in "
          f"{count['louder, the files say the other by 3 dB']}")
    print(f"silent ends: {count['silent end']} of {count['ends checked']} events end with 100 ms no louder than the "
          f"background, {count['silent start']} of {count['starts checked']} start so; the 100 ms after the end stand "
          f"above it after {count['heard after the end']} of {count['after checked']} (the background's own 100 ms "
          f"windows: {count['background above']} of {count['background windows']})")
    print(f"caption order: {count['captions ordering, false']} of {count['captions ordering']} captions that order "
          "several kinds of sound order them falsely (their occurrences interleave)")
    for name, train, test in (("AQA yes/no", yes_no["train"], yes_no["test"]), ("AQA all", aqa["train"], aqa["test"]),
                              ("NLAR", nlar["train"], nlar["test"])):
        form, chance = lean(train, test)
        print(f"the forms' lean, {name}: the form's most frequent answer scores {form:.3f} on the {len(test)} test "
              f"questions, a random answer per form {chance:.3f}")
    taken = [doc[-1] for doc in corpus if len(doc) == 3 and doc[1].endswith("?") and form_of(doc[1]) in
             {form_of(q) for q, _ in aqa["train"]}]
    kinds = collections.Counter(a if a in ("yes", "no") else "one word" for a in taken)
    print(f"the stand-in LLM's corpus (train): {len(taken)} AQA documents, answered {dict(kinds)}")


if __name__ == "__main__":
    main()

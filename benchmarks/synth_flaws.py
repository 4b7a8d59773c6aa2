"""The synthetic benchmark's known flaws, counted over every split: where its ground truth is not the whole truth of
the audio it wrote. The benchmark is generated again into a temporary folder (about 30 s) with its writers watched,
so what is counted is what the files hold. A fix changes the data, and so every figure trained on it; this script is
how the next version shows each count at zero.
    python benchmarks/synth_flaws.py

- ties: onsets lie on a 100 ms grid, so two kinds of sound can start together, and then "Which sound is heard first?",
  "Which sound starts last?", "Does the X start before the Y?" (AQA) and "Do the two recordings start with the same
  sound?" (NLAR) have no single right answer;
- loudness: NLAR's "In which recording is the X louder?" compares the events' gains before each scene is scaled to
  its peak, and that scaling differs between scenes;
- silent tails: a sound made of pulses (a bark, a knock) ends before its annotated offset, so detection, retrieval
  and "last longer" count silence as the sound;
- caption order: captions list the kinds of sound by first appearance and say "then", "in that order", "in
  sequence", which is false where their occurrences interleave;
- the stand-in LLM's corpus asks three of each scene's six AQA questions, always the first three: two answered yes,
  one no, none of the one-word questions.
"""

import collections
import re
import tempfile
from dataclasses import replace

import numpy as np

from apt_min import synth

ORDER_WORDS = re.compile(r", then |in that order|followed by|^First |in sequence")  # the caption forms that order


def first_onsets(events) -> dict[str, float]:
    onsets = {}
    for e in events:  # sorted by onset
        onsets.setdefault(e.label, e.onset)
    return onsets


def openers(events, last=False) -> set[str]:
    """The kinds of sound whose first occurrence starts first (last=True: last); several when they start together."""
    onsets = first_onsets(events)
    edge = (max if last else min)(onsets.values())
    return {label for label, t in onsets.items() if t == edge}


def ambiguous_aqa(question: str, events) -> bool:
    if question in ("Which sound is heard first?", "Which sound starts last?"):
        return len(openers(events, last=question.endswith("last?"))) > 1
    if " start before the " in question:
        onsets = first_onsets(events)
        x, y = question[len("Does the "):-1].split(" start before the ")
        return onsets[x] == onsets[y]
    return False


def interleaved(events) -> bool:
    """Whether some occurrence of a kind starts after an occurrence of a kind that first appears later."""
    order = list(dict.fromkeys(e.label for e in events))
    last = {x: max(e.onset for e in events if e.label == x) for x in order}
    first = first_onsets(events)
    return any(last[a] > first[b] for i, a in enumerate(order) for b in order[i + 1:])


def audible_end(sound: np.ndarray, floor_db: float = -40) -> float:
    """Seconds from a sound's start to its last sample within floor_db of its peak."""
    loud = np.flatnonzero(np.abs(sound) >= np.abs(sound).max() * 10 ** (floor_db / 20))
    return (loud[-1] + 1) / synth.SR


def main():
    count = collections.Counter()
    tails = collections.defaultdict(list)  # class -> silent tail (s) of each occurrence
    scale_db = {}  # id(events) -> dB by which the scene was scaled to its peak
    make_scene, peak, aqa, nlar, captions = (synth.make_scene, synth._peak, synth.aqa_questions,
                                             synth.nlar_questions, synth.captions)

    def heard(cls):  # the class, its sounds' silent tails recorded as they are made
        def generate(rng, dur):
            sound = cls.generate(rng, dur)
            tails[cls.name].append(dur - audible_end(sound))
            return sound
        return replace(cls, generate=generate)

    def watched_scene(rng, classes, length, **kw):
        peaks = []
        synth._peak = lambda x: peaks.append(np.abs(x).max()) or peak(x)
        try:
            audio, events = make_scene(rng, [heard(c) for c in classes], length, **kw)
        finally:
            synth._peak = peak
        scale_db[id(events)] = 20 * np.log10(0.9 / (peaks[-1] + 1e-9))  # the last: the mix, scaled to 0.9
        return audio, events

    def watched_aqa(rng, events, vocabulary):
        questions = aqa(rng, events, vocabulary)
        count["AQA"] += len(questions)
        count["AQA tie"] += sum(ambiguous_aqa(q, events) for q, _ in questions)
        return questions

    def watched_nlar(rng, ev1, ev2, k=3):
        questions = nlar(rng, ev1, ev2, k)
        for q, a in questions:
            count["NLAR"] += 1
            if q.startswith("Do the two recordings start"):  # a tie for first that allows both answers
                count["NLAR tie"] += len({x == y for x in openers(ev1) for y in openers(ev2)}) > 1
            if q.endswith("louder?"):
                x = q[len("In which recording is the "):-len(" louder?")]
                level = [max(e.gain_db for e in ev if e.label == x) + scale_db.get(id(ev), np.nan) for ev in (ev1, ev2)]
                said = level[0] - level[1] if a == "first" else level[1] - level[0]
                count["louder"] += 1
                count["louder, the files say the other"] += said < 0
                count["louder, the files say the other by 3 dB"] += said <= -3
        return questions

    def watched_captions(rng, events, k=5):
        written = captions(rng, events, k)
        if len({e.label for e in events}) > 1:
            ordering = sum(bool(ORDER_WORDS.search(c)) for c in written)
            count["captions ordering several kinds"] += ordering
            count["captions ordering several kinds, false"] += ordering * interleaved(events)
        return written

    taken = []  # the AQA questions the stand-in LLM's corpus takes: the first three of each scene's

    def corpus_aqa(rng, events, vocabulary):
        questions = aqa(rng, events, vocabulary)
        taken.extend(questions[:3])
        return questions

    watched = watched_scene, watched_aqa, watched_nlar, watched_captions
    with tempfile.TemporaryDirectory() as folder:
        try:
            synth.make_scene, synth.aqa_questions, synth.nlar_questions, synth.captions = watched
            synth.generate(folder)
            synth.make_scene, synth.aqa_questions, synth.nlar_questions, synth.captions = make_scene, corpus_aqa, \
                nlar, captions
            synth.lm_corpus(folder, "train", 0)
        finally:
            synth.make_scene, synth.aqa_questions, synth.nlar_questions, synth.captions = make_scene, aqa, nlar, \
                captions

    print(f"ties: AQA {count['AQA tie']} of {count['AQA']} questions ({count['AQA tie'] / count['AQA']:.1%}), "
          f"NLAR {count['NLAR tie']} of {count['NLAR']}, ask about an order that two sounds share")
    print(f"loudness: of {count['louder']} NLAR 'louder' questions the written files say the other clip's is louder "
          f"in {count['louder, the files say the other']}, by 3 dB or more in "
          f"{count['louder, the files say the other by 3 dB']}")
    every = [t for ts in tails.values() for t in ts]
    print(f"silent tails: {sum(t >= synth.GRID for t in every)} of {len(every)} sounds end 0.1 s or more before "
          "their annotated offset; the worst classes (mean / largest tail, s):")
    for name, ts in sorted(tails.items(), key=lambda kv: -np.mean(kv[1]))[:5]:
        print(f"  {name:<10} {np.mean(ts):.2f} / {max(ts):.2f}  ({sum(t >= synth.GRID for t in ts)} of {len(ts)})")
    print(f"caption order: {count['captions ordering several kinds, false']} of "
          f"{count['captions ordering several kinds']} captions that order several kinds of sound order them "
          "falsely (their occurrences interleave)")
    forms = collections.Counter(a if a in ("yes", "no") else "one word" for _, a in taken)
    print(f"the stand-in LLM's corpus (train): {len(taken)} AQA documents, answered {dict(forms)}")

if __name__ == "__main__":
    main()

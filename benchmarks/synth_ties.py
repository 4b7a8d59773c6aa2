"""How many of the synthetic benchmark's order questions have no single right answer because two kinds of sound
start at the same moment (onsets lie on a 100 ms grid): "Which sound is heard first?", "Which sound starts last?",
"Does the X start before the Y?" (AQA) and "Do the two recordings start with the same sound?" (NLAR). The benchmark is
generated again into a temporary folder (about 25 s) with its question writers watched; every split is counted.
    python benchmarks/synth_ties.py
"""

import collections
import tempfile

from apt_min import synth


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


def main():
    counts = collections.defaultdict(lambda: [0, 0])  # task -> [questions, ambiguous]
    aqa, nlar = synth.aqa_questions, synth.nlar_questions

    def watched_aqa(rng, events, vocabulary):
        questions = aqa(rng, events, vocabulary)
        for q, _ in questions:
            counts["AQA"][0] += 1
            counts["AQA"][1] += ambiguous_aqa(q, events)
        return questions

    def watched_nlar(rng, ev1, ev2, k=3):
        questions = nlar(rng, ev1, ev2, k)
        for q, _ in questions:
            counts["NLAR"][0] += 1
            if q.startswith("Do the two recordings start"):  # ambiguous if the sounds tied for first allow both answers
                answers = {a == b for a in openers(ev1) for b in openers(ev2)}
                counts["NLAR"][1] += len(answers) > 1
        return questions

    synth.aqa_questions, synth.nlar_questions = watched_aqa, watched_nlar
    with tempfile.TemporaryDirectory() as folder:
        synth.generate(folder)
    for task, (n, bad) in counts.items():
        print(f"{task}: {bad} of {n} questions ({bad / n:.1%}) ask about an order that two sounds share")


if __name__ == "__main__":
    main()

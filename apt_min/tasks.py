"""The eight tasks as text (paper §3.3 and appendix A.2): prompts, answer formats, and parsers for model output.

An `Example` is what the model sees and must say: `segments`, a list of ("audio", path) and ("text", str) in order
(and, in the "list" few-shot layout, ("label", str): text the aligner does not read as an instruction, and
("turn", "") where the user's turn ends in a chat format), and the `answer`. Each task builder takes ground truth and
returns one; with an `rng` it draws one of the task's paraphrases (training), without one it uses the first
(evaluation). Answer formats:

    tagging      "bell, siren"                      counting  "3"
    captioning   "A bell rings twice, then ..."     sed       "0.5s-1.2s; 3.0s-3.6s"   (times to 0.1 s)
    aqa, nlar    a short answer                     ter       "bell, siren"
    fewshot      support clips each followed by "This is a sound of {label}.", the query by "This is a sound of";
                 the answer is the label. Layout "list" instead: an instruction, the end of the user's turn, then
                 each support clip followed directly by "{label}.", the query clip last (the answer comes next)

Parsers read generated text back; they tolerate spacing, case, trailing punctuation and number words, and return
None / [] for output they cannot read — never an exception.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from apt_min.errors import SettingError

TASKS = ("tagging", "captioning", "aqa", "sed", "ter", "counting", "fewshot", "nlar")

PROMPTS = {  # the first of each is the evaluation prompt
    "tagging": ["Summarize the audio with key words.", "List the sound events in the audio with key words.",
                "What sound events can be heard? Answer with key words.", "Tag the audio with its sound events."],
    "captioning": ["Describe the audio clip concisely.", "Summarize the audio succinctly.",
                   "Write a short caption for the audio.", "What happens in the audio? Answer in one sentence."],
    "sed": ["When does {label} happen?", "At what times can {label} be heard?",
            "Give the start and end times of {label}."],
    "ter": ["What happens between {start}s and {end}s?", "Which sounds occur from {start}s to {end}s?",
            "What can be heard between {start}s and {end}s?"],
    "counting": ["How many times does {label} occur?", "Count the occurrences of {label}.",
                 "How often can {label} be heard?"],
    "aqa": ["{question}"],
    "nlar": ["{question}"],
    "fewshot": ["This is a sound of {label}."],
}
FEWSHOT_QUERY = "This is a sound of"
FEWSHOT_LIST_INSTRUCTION = "Each sound is followed by its name. Name the last sound."
FEWSHOT_LAYOUTS = ("paper", "list")
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
MULTIPLES = {"once": 1, "twice": 2, "thrice": 3}
TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
NONE = {"no", "none", "never"}  # "no times", "never": a count of zero
_NUMBER = re.compile(rf"\b(?:({'|'.join(TENS)})(?:[\s-]+({'|'.join(NUMBER_WORDS[1:10])}))?"  # 21: tens, unit
                     rf"|({'|'.join(NUMBER_WORDS)}))\b")  # or one word, zero to twenty


@dataclass
class Example:
    task: str
    segments: list[tuple[str, str]]  # ("audio", path) | ("text", str) | ("label", str) | ("turn", ""), in order
    answer: str  # what the model is trained to say (the first reference, where there are several)
    target: dict = field(default_factory=dict)  # ground truth for the metrics: labels, segments, count, references


def prompt(task: str, rng: random.Random | None, **fields) -> str:
    """One of the task's prompts, its fields filled: drawn with an rng (training), the first without (evaluation)."""
    options = PROMPTS[task]
    return (rng.choice(options) if rng else options[0]).format(**fields)


def label_text(name: str) -> str:
    """How a class name reads in a prompt: AudioSet's "Male speech, man speaking" and ESC-50's "chirping_birds"
    become "male speech, man speaking" and "chirping birds"."""
    return name.replace("_", " ").strip().lower()


def fmt_time(t: float) -> str:
    return f"{t:.1f}"


# ------------------------------------------------------------------------------------------------------- answers


def format_labels(labels) -> str:
    return ", ".join(label_text(x) for x in labels)


def format_segments(segments) -> str:
    return "; ".join(f"{fmt_time(a)}s-{fmt_time(b)}s" for a, b in segments)


def format_count(n: int) -> str:
    return str(n)


def in_digits(text: str) -> str:
    """`text` (lower case) with its number words as digits: "twenty-one" and "twenty one" -> "21", "two" -> "2"."""
    def value(m):
        tens, unit, word = m.groups()
        if word:
            return str(NUMBER_WORDS.index(word))
        return str(TENS[tens] + (NUMBER_WORDS.index(unit) if unit else 0))
    return re.sub(_NUMBER, value, text)


def normalize_answer(text: str) -> str:
    """For exact-match scoring (AQA, NLAR): lower case, number words as digits, no punctuation or articles."""
    words = re.sub(r"[^\w\s]", " ", in_digits(text.lower())).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def parse_labels(text: str, vocabulary=None) -> list[str]:
    """Labels named in `text`. With a vocabulary, the known names found in it (longest first, so "male speech, man
    speaking" is not read as two labels), in order of appearance; without one, the text split at commas."""
    text = text.lower()
    if vocabulary is None:
        return [p.strip(" .;") for p in re.split(r"[,;]| and ", text) if p.strip(" .;")]
    found, taken = [], [False] * len(text)
    for name in sorted(vocabulary, key=lambda n: (-len(n), n)):  # longest first; ties in one order, every run
        for m in re.finditer(r"(?<!\w)" + re.escape(label_text(name)) + r"(?!\w)", text):
            if not any(taken[m.start():m.end()]):
                taken[m.start():m.end()] = [True] * (m.end() - m.start())
                found.append((m.start(), name))
    return list(dict.fromkeys(name for _, name in sorted(found)))


def parse_segments(text: str) -> list[tuple[float, float]]:
    """ "0.5s-1.2s; 3s to 3.6 s" -> [(0.5, 1.2), (3.0, 3.6)] (also .5, sec, secs, second); pairs that end before
    they start are left out."""
    num = r"(\d+(?:\.\d+)?|\.\d+)\s*(?:s(?:ec(?:ond)?s?)?)?"
    pairs = re.findall(num + r"\s*(?:-|–|—|to|until)\s*" + num, in_digits(text.lower()))
    return [(float(a), float(b)) for a, b in pairs if float(a) <= float(b)]


def parse_count(text: str) -> int | None:
    """The first number in `text`, as digits, number words ("twenty-one", "twenty one") or once/twice/thrice; else
    zero for no / none / never ("no, three times" is 3); None when there is none."""
    words = re.findall(r"\d+|[a-z]+", in_digits(text.lower()))  # "two-fold" reads as two
    for word in words:
        if word.isdigit():
            return int(word)
        if word in MULTIPLES:
            return MULTIPLES[word]
    return 0 if any(word in NONE for word in words) else None


# ------------------------------------------------------------------------------------------------------ builders


def tagging(audio: str, labels, rng=None) -> Example:
    return Example("tagging", [("audio", audio), ("text", prompt("tagging", rng))], format_labels(labels),
                   {"labels": list(labels)})


def captioning(audio: str, references, rng=None) -> Example:
    """references: one caption (training) or several (evaluation: all are scored)."""
    refs = [references] if isinstance(references, str) else list(references)
    return Example("captioning", [("audio", audio), ("text", prompt("captioning", rng))], refs[0],
                   {"references": refs})


def aqa(audio: str, question: str, answers) -> Example:
    """answers: one, or the annotators' several; the most frequent normalised one is trained and scored."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    norm = [normalize_answer(a) for a in answers]
    best = max(dict.fromkeys(norm), key=norm.count)
    return Example("aqa", [("audio", audio), ("text", prompt("aqa", None, question=question))],
                   answers[norm.index(best)].strip().rstrip(".").lower(), {"answer": best})


def sed(audio: str, label: str, segments, rng=None) -> Example:
    segments = sorted(segments)
    return Example("sed", [("audio", audio), ("text", prompt("sed", rng, label=label_text(label)))],
                   format_segments(segments), {"label": label, "segments": segments})


def labels_between(events, start: float, end: float, min_overlap: float = 0.1) -> list[str]:
    """Labels of the events (label, onset, offset) that overlap [start, end] by at least min_overlap seconds (an
    event shorter than that: by its whole length, so a short event is in the window it defines), in order of
    onset."""
    hits = sorted((on, lab) for lab, on, off in events
                  if min(off, end) - max(on, start) >= min(min_overlap, off - on) - 1e-9)
    return list(dict.fromkeys(lab for _, lab in hits))


def ter(audio: str, events, start: float, end: float, rng=None) -> Example:
    labels = labels_between(events, start, end)
    text = prompt("ter", rng, start=fmt_time(start), end=fmt_time(end))
    return Example("ter", [("audio", audio), ("text", text)], format_labels(labels), {"labels": labels})


def counting(audio: str, label: str, n: int, rng=None) -> Example:
    return Example("counting", [("audio", audio), ("text", prompt("counting", rng, label=label_text(label)))],
                   format_count(n), {"label": label, "count": n})


def fewshot(support, query_audio: str, query_label: str, layout: str = "paper") -> Example:
    """support: (audio, label) pairs in the order they are shown. layout "paper": each clip followed by the
    sentence that names it (the paper's interleaving; each clip is aligned under that sentence, the query under "This
    is a sound of"). layout "list" (beyond the paper): the episode as a list the model continues, each support clip
    directly followed by its label and the query clip last, so the position that must produce the answer is the
    query's own last prompt vector, as each label follows its clip's (the pattern a small LLM's copying heads
    follow); every clip is aligned under the same (empty) instruction, so that query and supports are encoded alike."""
    if layout not in FEWSHOT_LAYOUTS:
        raise SettingError(f"few-shot layout {layout!r}: expected one of {FEWSHOT_LAYOUTS}")
    if layout == "list":
        segments = [("text", FEWSHOT_LIST_INSTRUCTION), ("turn", "")]
        for audio, label in support:
            segments += [("audio", audio), ("label", f"{label_text(label)}.\n")]
        segments.append(("audio", query_audio))
    else:
        segments = []
        for audio, label in support:
            segments += [("audio", audio), ("text", PROMPTS["fewshot"][0].format(label=label_text(label)))]
        segments += [("audio", query_audio), ("text", FEWSHOT_QUERY)]
    return Example("fewshot", segments, label_text(query_label),
                   {"label": query_label, "choices": list(dict.fromkeys(lab for _, lab in support)),
                    "support": list(support), "query": query_audio})


def nlar(audio_1: str, audio_2: str, question: str, answer: str) -> Example:
    return Example("nlar", [("audio", audio_1), ("audio", audio_2), ("text", question)], answer.strip(),
                   {"answer": normalize_answer(answer)})

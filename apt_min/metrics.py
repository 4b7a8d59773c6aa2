"""Metrics, each written out and checked in the tests against the implementation people cite (paper §4, Tables
3-6): scikit-learn's average precision, pycocoevalcap's BLEU, ROUGE-L and CIDEr-D.

    mean_average_precision(scores (N, C), labels (N, C))  -> macro mAP over the classes that have a positive
    caption_tokens(text)                                  -> PTB-style tokens: lower case, punctuation dropped
    bleu(references, hypotheses)                          -> [BLEU-1, ..., BLEU-4], corpus level
    rouge_l(references, hypotheses)                       -> mean ROUGE-L (LCS F-measure, beta 1.2)
    cider_d(references, hypotheses)                       -> mean CIDEr-D (tf-idf n-grams, clipped, length penalty)
    mcnemar_exact(b, c)                                   -> two-sided p of two systems' paired right/wrong answers

Captions go in as plain strings; references[i] is the list of references of hypotheses[i].

Below them, each task's scoring (`score_tagging`, `score_captions`, `score_exact`, `score_fewshot`, `score_sed` with
`segment_f1`, `score_ter`, `score_counting`): generated answers and the task's examples in, metric rows out.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

from apt_min.tasks import format_labels, normalize_answer, parse_count, parse_labels, parse_segments

# ----------------------------------------------------------------------------------------------------- tagging


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve as a step function: the sum over score thresholds (tied scores form
    one threshold) of precision at that threshold times the recall it adds. scores, labels: (N,)."""
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order].astype(float)
    last_of_tie = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]  # index of each threshold's last item
    true_pos = np.cumsum(labels)[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall_gain = np.diff(np.r_[0.0, true_pos]) / labels.sum()
    return float((precision * recall_gain).sum())


def mean_average_precision(scores, labels) -> float:
    """Macro mAP: the mean over classes of each class's AP; classes with no positive example are left out (their
    AP is undefined). scores, labels: (N, C)."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels)
    aps = [average_precision(scores[:, c], labels[:, c]) for c in range(labels.shape[1]) if labels[:, c].any()]
    return float(np.mean(aps)) if aps else float("nan")


# ----------------------------------------------------------------------------------------------------- captions

_PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
# PTB writes brackets as -LRB- etc.; the COCO code lower-cases before comparing with its (upper-case) punctuation
# list, so they stay in as tokens: kept here the same way
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# typographic quotes, dashes and ellipsis read as PTB reads them (checked one by one against it): quotes and the
# ellipsis dropped, a dash splitting what it joins ("2\u20133" -> "2 3"), the apostrophe kept in contractions
_TYPOGRAPHIC = str.maketrans({"\u2018": "`", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": " -- ",
                              "\u2014": " -- ", "\u2026": "..."})
# words PTB keeps with their period (checked one by one against it), and the fused words it splits
_ABBREVIATIONS = ("mr mrs ms dr st jr sr vs etc inc co ltd jan feb mar apr jun jul aug sep sept oct nov dec mt ft lt "
                  "sgt gen col prof rev sq ave blvd rd dept est cf al").split()
_FUSED = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"), "wanna": ("wan", "na"),
          "lemme": ("lem", "me"), "gimme": ("gim", "me")}
_ATOM = r"(?:\d+(?::\d+)+|\d+(?:[.,]\d+)+|[a-z0-9]+(?:'[a-z]+)?)"  # 10:30, 3.5 and 5,000, words (o'clock)
_TOKEN = re.compile("|".join([
    r"'n'", r"n't", r"'(?:s|re|ve|ll|d|m)\b",  # rock 'n' roll; the contractions split off below
    r"[a-z](?:\.[a-z])+\.?(?![a-z0-9])",  # letters and periods: e.g. u.s. t.v. a.m
    r"(?:" + "|".join(_ABBREVIATIONS) + r")\.(?![a-z0-9])", r"no\.(?=\s*\d)",  # mr. etc. ; no. 5
    r"[a-z][a-z0-9]*(?:\.[a-z][a-z0-9]*)+",  # words joined by a period, no space: barks.then
    _ATOM + r"(?:[-/]" + _ATOM + r")*",  # hyphen and slash compounds stay one token: high-pitched, 2-3, and/or
    r"[!?]{2,}", r"\.\.\.", r"--+", r"[^\sa-z0-9]",  # !! and ?! stay, as PTB keeps them; any other symbol alone
]))


def caption_tokens(text: str) -> list[str]:
    """Tokens as the COCO caption evaluation sees them (its PTB tokenizer, lower-cased, punctuation removed):
    contractions split the Penn Treebank way ("don't" -> "do n't", "dog's" -> "dog 's", "cannot" -> "can not"),
    compounds kept whole ("high-pitched", "2-3", "chirp/tweet", "10:30", "3.5"), abbreviations with their periods
    ("e.g.", "mr."), quotes (typographic ones too) dropped. Equal to the PTB tokenizer on the tests' captions; it
    still differs on forms captions hardly hold (a <tag>, a quote closed inside a word, initials such as "j. s. bach").
    """
    text = text.lower().translate(_TYPOGRAPHIC)
    text = re.sub(r"([a-z])n't\b", r"\1 n't", text)
    text = re.sub(r"'(s|re|ve|ll|d|m)\b", r" '\1", text)
    text = text.replace("'n'", " 'n' ")
    tokens = []
    for t in _TOKEN.findall(text):
        t = "--" if t.startswith("--") else t  # a longer dash is a dash
        if t not in _PUNCTUATION:
            tokens.extend(_FUSED.get(t, (_BRACKETS.get(t, t),)))
    return tokens


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def bleu(references, hypotheses, n: int = 4) -> list[float]:
    """Corpus BLEU-1..n (Papineni et al. 2002) as the COCO evaluation computes it: clipped n-gram counts summed
    over the corpus, each hypothesis's reference length the closest one (the shorter on a tie), brevity penalty
    on the totals; tiny constants keep an empty match from dividing by zero."""
    correct, guess, hyp_len, ref_len = [0] * n, [0] * n, 0, 0
    for refs, hyp in zip(references, hypotheses):
        h = caption_tokens(hyp)
        rs = [caption_tokens(r) for r in refs]
        best = Counter()
        for r in rs:
            best |= _ngrams(r, n)  # the largest count of each n-gram in any one reference
        for gram, count in _ngrams(h, n).items():
            correct[len(gram) - 1] += min(count, best[gram])
        for k in range(n):
            guess[k] += max(0, len(h) - k)
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + 1e-15) / (guess[k] + 1e-9)
        scores.append(product ** (1 / (k + 1)))
    ratio = (hyp_len + 1e-15) / (ref_len + 1e-9)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [s * penalty for s in scores]


def _lcs(a, b) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(references, hypotheses, beta: float = 1.2) -> float:
    """ROUGE-L (Lin 2004) as the COCO evaluation computes it: per hypothesis, the best LCS precision and the best
    LCS recall over its references, combined as an F-measure weighting recall by beta; averaged."""
    scores = []
    for refs, hyp in zip(references, hypotheses):
        h = caption_tokens(hyp)
        lcs = [(_lcs(caption_tokens(r), h), len(caption_tokens(r))) for r in refs]
        p = max((m / len(h) if h else 0.0) for m, _ in lcs)
        r = max((m / n if n else 0.0) for m, n in lcs)
        scores.append((1 + beta**2) * p * r / (r + beta**2 * p) if p and r else 0.0)
    return float(np.mean(scores))


def cider_d(references, hypotheses, n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015), as the COCO evaluation computes it: n-grams weighted by tf-idf, with the
    document frequencies taken from the references of this corpus; per n, the cosine between hypothesis and each
    reference with the hypothesis counts clipped at the reference's, times a Gaussian penalty on the length
    difference; averaged over n and references, times 10; averaged over the corpus."""
    refs = [[_ngrams(caption_tokens(r), n) for r in rs] for rs in references]
    hyps = [_ngrams(caption_tokens(h), n) for h in hypotheses]
    df = Counter(gram for rs in refs for gram in set().union(*rs))
    log_docs = math.log(len(refs))

    def vectors(counts):
        vec = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_docs - math.log(max(1.0, df[gram])))
        norms = [math.sqrt(sum(v * v for v in d.values())) for d in vec]
        return vec, norms, sum(tf for gram, tf in counts.items() if len(gram) == 2)  # the reference code's length

    scores = []
    for rs, h in zip(refs, hyps):
        vh, nh, lh = vectors(h)
        total = np.zeros(n)
        for r in rs:
            vr, nr, lr = vectors(r)
            for k in range(n):
                dot = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                cos = dot / (nh[k] * nr[k]) if nh[k] and nr[k] else dot
                total[k] += cos * math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
        scores.append(total.mean() / len(rs) * 10.0)
    return float(np.mean(scores))


# ------------------------------------------------------------------------------------------------ significance


def mcnemar_exact(b: int, c: int) -> float:
    """The exact two-sided McNemar test of two systems scored on the same questions: b questions only the first gets
    right, c only the second (those both get right or both wrong say nothing of which is better). If neither were
    better, each of the b + c would go either way as a fair coin: the p-value is the chance of a split at least as
    uneven as min(b, c) against the rest, on either side (1.0 for an even split). Checked against scipy's binomtest."""
    b, c = int(b), int(c)  # numpy's integers would overflow in 2 ** n
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


# ------------------------------------------------------------------------------------------------- task scores
# Each turns a task's answers (plain strings, as generated) into rows (metric, value, baseline, protocol), the
# baseline being a trivial answer scored on the same examples. tests/test_evaluate.py checks them on hand-worked
# answers, with labels written as the real data sets write them.


def _row(metric, value, baseline, protocol):
    return [(metric, value, baseline, protocol)]


def majority(answers):
    """The most frequent answer (the first seen among equals)."""
    return Counter(answers).most_common(1)[0][0]


def label_matrix(examples, classes) -> np.ndarray:
    """(clips, classes) bool: which classes each tagging example carries."""
    return np.array([[c in ex.target["labels"] for c in classes] for ex in examples])


def score_tagging(examples, outputs, classes):
    """The generated answer read against the class list: is it exactly the clip's label set?"""
    truth = [frozenset(ex.target["labels"]) for ex in examples]
    exact = np.mean([set(parse_labels(o, classes)) == t for o, t in zip(outputs, truth)])
    fixed = majority(truth)
    return _row("exact label set", exact, np.mean([t == fixed for t in truth]),
                "generated answer parsed against the class list (baseline: the most frequent label set)")


def score_captions(examples, outputs, baseline_caption: str):
    """Corpus BLEU-1..4, ROUGE-L and CIDEr-D against all references of each clip (COCO caption evaluation), the
    baseline giving `baseline_caption` for every clip."""
    refs = [ex.target["references"] for ex in examples]
    base = [baseline_caption] * len(examples)
    how = "COCO caption evaluation against all of a clip's references (baseline: the most frequent training " \
          "caption for every clip)"
    b, bb = bleu(refs, outputs), bleu(refs, base)
    rows = [(f"BLEU-{k + 1}", b[k], bb[k], how) for k in range(4)]
    return rows + _row("ROUGE-L", rouge_l(refs, outputs), rouge_l(refs, base), how) + \
        _row("CIDEr-D", cider_d(refs, outputs), cider_d(refs, base), how)


def spider(rows) -> list:
    """SPIDEr, the paper's headline caption metric: the mean of CIDEr-D and SPICE, from a caption table's rows; a row
    saying it is unavailable when SPICE is (its own row says why)."""
    got = {metric: value for metric, value, _, _ in rows}
    if not np.isfinite(got.get("SPICE", float("nan"))):
        return _row("SPIDEr", float("nan"), None, "SPIDEr unavailable: it needs SPICE (see its row)")
    return _row("SPIDEr", (got["CIDEr-D"] + got["SPICE"]) / 2, None, "(CIDEr-D + SPICE) / 2")


def score_exact(examples, outputs, yes_no: bool = False, always: str | None = None):
    """Normalised exact match (AQA, NLAR), beside always giving the most frequent answer; with yes_no (Clotho-AQA)
    also on the yes/no questions alone; with `always` (NLAR: "yes", the paper's fixed answer, Table 6) the same
    accuracy once more, beside always giving that answer."""
    truth = [ex.target["answer"] for ex in examples]
    hits = [normalize_answer(o) == t for o, t in zip(outputs, truth)]
    fixed, counts = majority(truth), Counter(truth)
    tied = "".join(f", tied with {a!r}" for a, n in counts.items() if n == counts[fixed] and a != fixed)
    rows = _row("accuracy", np.mean(hits), np.mean([t == fixed for t in truth]),
                f"normalised exact match (baseline: always {fixed!r}, the most frequent answer{tied})")
    if always is not None:
        rows += _row(f"accuracy vs always {always!r}", np.mean(hits), np.mean([t == always for t in truth]),
                     f"(baseline: always {always!r}, the paper's fixed answer)")
    yn = [i for i, t in enumerate(truth) if t in ("yes", "no")] if yes_no else []
    if yn:
        fixed = majority([truth[i] for i in yn])
        rows += _row("accuracy, yes/no questions", np.mean([hits[i] for i in yn]),
                     np.mean([truth[i] == fixed for i in yn]), f"(baseline: always {fixed!r})")
    return rows


def named_label(output: str, episode):
    """The first of a few-shot episode's labels that the generated answer names, or None."""
    return next(iter(parse_labels(output, episode.target["choices"])), None)


def score_fewshot(episodes, outputs, setting):
    """Accuracy of the episode label each generated answer names, and of the label the LLM ranked first
    (episode.target["ranked"]), beside chance; where episodes carry a prototypical network's answer
    (episode.target["prototype"]), the generated accuracy once more, beside that network's. `setting` names the
    rows ("accuracy 5-way 5-shot")."""
    n_way = len(episodes[0].target["choices"])
    generated = np.mean([named_label(o, ep) == ep.target["label"] for o, ep in zip(outputs, episodes)])
    rows = _row(setting, generated, 1 / n_way, f"{len(episodes)} fixed episodes; the answer is the episode label it "
                "names (baseline: chance)")
    rows += _row(f"{setting}, ranked", np.mean([ep.target["ranked"] == ep.target["label"] for ep in episodes]),
                 1 / n_way, "the same episodes; the answer is the episode label the LLM finds most likely to come "
                 "next (baseline: chance)")
    if all("prototype" in ep.target for ep in episodes):
        prototype = np.mean([ep.target["prototype"] == ep.target["label"] for ep in episodes])
        rows += _row(f"{setting} vs a prototypical network", generated, prototype,
                     "the generated answers, beside the nearest class mean of the frozen encoder's max-pooled features "
                     "(a prototypical network, nothing trained) on the same episodes")
    return rows


def segment_f1(pred, ref, iou=0.5):
    """Matched segments (IoU >= iou, each segment in one match at most, as many matches as the segments allow: a
    maximum bipartite matching, so the order of the predictions never changes the count) over predicted and over
    reference segments: (matched, predicted, reference) counts, summed over queries for
    F1 = 2 matched / (predicted + reference)."""
    def overlap(a, b, c, d):
        inter, union = max(0.0, min(b, d) - max(a, c)), max(b, d) - min(a, c)
        return union > 0 and inter / union >= iou

    fits = [[j for j, (c, d) in enumerate(ref) if overlap(a, b, c, d)] for a, b in pred]
    owner = {}  # reference -> the prediction it is matched with

    def match(i, tried) -> bool:  # find prediction i a reference, moving earlier matches along where that frees one
        for j in fits[i]:
            if j not in tried:
                tried.add(j)
                if j not in owner or match(owner[j], tried):
                    owner[j] = i
                    return True
        return False

    return sum(match(i, set()) for i in range(len(pred))), len(pred), len(ref)


def score_sed(examples, outputs, durations=None):
    """Segment F1 at IoU >= 0.5 over all segments of all queries, beside answering the whole clip every time: 0 s to
    each clip's duration (seconds, one per example), or without durations to the latest end among the references."""
    def f1(preds):
        m, p, r = (sum(x) for x in zip(*[segment_f1(s, ex.target["segments"]) for s, ex in zip(preds, examples)]))
        return 2 * m / (p + r) if p + r else 0.0

    if durations is None:
        durations = [max(b for ex in examples for _, b in ex.target["segments"])] * len(examples)
    whole = [[(0.0, d)] for d in durations]
    return _row("segment F1", f1([parse_segments(o) for o in outputs]), f1(whole),
                "IoU >= 0.5, over all segments (baseline: the whole clip for every query)")


def score_ter(examples, outputs, vocabulary):
    """Exact set of labels: the labels of `vocabulary` (the data set's class names, written as it writes them:
    "Male speech, man speaking", "chirping_birds") that the answer names, against the window's labels."""
    truth = [frozenset(ex.target["labels"]) for ex in examples]
    got = [frozenset(parse_labels(o, vocabulary)) for o in outputs]
    fixed = majority(truth)
    return _row("accuracy", np.mean([g == t for g, t in zip(got, truth)]), np.mean([t == fixed for t in truth]),
                f"exact set of labels (baseline: always {format_labels(sorted(fixed))!r})")


def score_counting(examples, outputs):
    """Accuracy of the count read from the answer, and its mean absolute error (an unreadable answer counts as 0),
    beside always answering the most frequent count."""
    truth = np.array([ex.target["count"] for ex in examples])
    got = np.array([parse_count(o) if parse_count(o) is not None else -1 for o in outputs])
    fixed = majority(truth.tolist())
    rows = _row("accuracy", np.mean(got == truth), np.mean(truth == fixed), f"(baseline: always {fixed})")
    rows += _row("mean absolute error", float(np.mean(np.abs(np.where(got < 0, 0, got) - truth))),
                 float(np.mean(np.abs(truth - fixed))), "unreadable answers count as 0 (lower is better)")
    return rows

"""Metrics, each written out and checked in the tests against the implementation people cite (paper §4;
../shared/DESIGN.md §7): scikit-learn's average precision, pycocoevalcap's BLEU, ROUGE-L and CIDEr-D.

    mean_average_precision(scores (N, C), labels (N, C))  -> macro mAP over the classes that have a positive
    caption_tokens(text)                                  -> PTB-style tokens: lower case, punctuation dropped
    bleu(references, hypotheses)                          -> [BLEU-1, ..., BLEU-4], corpus level
    rouge_l(references, hypotheses)                       -> mean ROUGE-L (LCS F-measure, beta 1.2)
    cider_d(references, hypotheses)                       -> mean CIDEr-D (tf-idf n-grams, clipped, length penalty)

Captions go in as plain strings; references[i] is the list of references of hypotheses[i].
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

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


def caption_tokens(text: str) -> list[str]:
    """Tokens as the COCO caption evaluation sees them (its PTB tokenizer, lower-cased, punctuation removed):
    words, numbers and contractions split the Penn Treebank way ("don't" -> "do n't", "dog's" -> "dog 's")."""
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"([a-z])n't\b", r"\1 n't", text)
    text = re.sub(r"'(s|re|ve|ll|d|m)\b", r" '\1", text)
    tokens = re.findall(r"n't|'[a-z]+|[a-z0-9]+(?:[.,][0-9]+)*|\.\.\.|--|[^\sa-z0-9]", text)
    return [_BRACKETS.get(t, t) for t in tokens if t not in _PUNCTUATION]


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

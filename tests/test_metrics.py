"""Metrics against the implementations people cite: scikit-learn's AP, pycocoevalcap's BLEU / ROUGE-L / CIDEr-D
and its Stanford PTB tokenizer, scipy's exact binomial test (McNemar's)."""

import shutil

import numpy as np
import pytest

from apt_min import metrics

CAPTIONS = [  # (references, hypothesis), in the style of AudioCaps / Clotho
    (["A man speaks while a dog barks in the distance.", "A dog barks, then a man talks.",
      "Someone speaking and a dog barking", "A man is talking as a dog barks twice.", "Dog barking and male speech"],
     "A dog barks and a man speaks."),
    (["Rain falls on a tin roof.", "Heavy rain is falling on a metal roof", "Rain pours down steadily.",
      "The sound of rain on a roof.", "Steady rainfall on a roof"], "Rain is falling on a roof."),
    (["A car engine idles and then revs up.", "An engine is idling before accelerating",
      "A vehicle's engine runs and revs", "An engine revs loudly", "A motor idles, then revs."],
     "A car's engine revs up and doesn't stop."),
    (["Birds chirp in the morning.", "Several birds are singing.", "Birds chirping loudly outdoors",
      "Birdsong fills the air", "Many birds tweet and chirp"], "Birds."),
]


def test_map_equals_scikit_learn():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    for trial in range(20):
        labels = rng.random((60, 9)) < 0.2
        labels[rng.integers(0, 60, 9), np.arange(9)] = True  # every class has a positive
        scores = rng.random((60, 9))
        if trial % 2:
            scores = np.round(scores, 1)  # ties
        ours = metrics.mean_average_precision(scores, labels)
        assert abs(ours - average_precision_score(labels, scores, average="macro")) < 1e-12
    labels[:, 0] = False  # a class without positives is left out of the mean, not counted as 0
    assert metrics.mean_average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels[:, 1:], scores[:, 1:], average="macro"))


def test_map_of_hard_decisions_and_of_no_positives():
    """Scores given as yes/no decisions (booleans, all ties within each) are ranked as numbers: the AP scikit-learn
    gives them; a set where no class has a positive has no mAP (nan), not 0."""
    from sklearn.metrics import average_precision_score

    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0]], dtype=bool)
    decided = np.array([[1, 0], [1, 1], [0, 1], [0, 0], [1, 1]], dtype=bool)
    assert metrics.mean_average_precision(decided, labels) == pytest.approx(
        average_precision_score(labels, decided, average="macro"))
    assert np.isnan(metrics.mean_average_precision(np.random.default_rng(0).random((5, 2)), np.zeros((5, 2), bool)))


def test_mcnemar_equals_scipy_binomial_test():
    from scipy.stats import binomtest  # scikit-learn's own dependency

    for b, c in [(42, 21), (21, 42), (60, 48), (0, 5), (5, 0), (7, 7), (1, 0), (0, 0), (250, 190), (3, 11)]:
        expected = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
        assert metrics.mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12, abs=1e-300)
    assert metrics.mcnemar_exact(42, 21) < 0.05 < metrics.mcnemar_exact(60, 48)
    counts = np.array([True] * 70 + [False] * 41)  # counts as numpy sums give them
    assert metrics.mcnemar_exact(counts.sum(), (~counts).sum()) == pytest.approx(binomtest(41, 111, 0.5).pvalue)


def _coco(refs, hyps):
    return ({i: [" ".join(metrics.caption_tokens(r)) for r in rs] for i, rs in enumerate(refs)},
            {i: [" ".join(metrics.caption_tokens(h))] for i, h in enumerate(hyps)})


# BLEU's corner cases, each a corpus of its own (the brevity penalty is the corpus's): hypotheses longer than their
# references, repeating n-grams more often than any one reference holds them, as often as all of them together
# (clipped at the largest count in one reference, not the sum); and a hypothesis exactly between two reference
# lengths (the shorter is taken, whichever comes first)
LONGER = [(["a dog barks", "the dog barks loudly"], "a dog barks a dog barks"),
          (["rain falls on a roof", "rain on the roof"], "rain rain rain falls on the roof today")]
BETWEEN = [(["one bell rings twice", "one bell rings twice then stops"], "one bell rings twice loudly")]
BETWEEN_LONGER_FIRST = [(refs[::-1], hyp) for refs, hyp in BETWEEN]


def test_caption_metrics_equal_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    for corpus in (LONGER, BETWEEN, BETWEEN_LONGER_FIRST):
        refs, hyps = [r for r, _ in corpus], [h for _, h in corpus]
        ref_bleu, _ = Bleu(4).compute_score(*_coco(refs, hyps), verbose=0)
        assert np.allclose(metrics.bleu(refs, hyps), ref_bleu, atol=1e-9), corpus
    refs, hyps = [r for r, _ in CAPTIONS], [h for _, h in CAPTIONS]
    gts, res = _coco(refs, hyps)
    ref_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert np.allclose(metrics.bleu(refs, hyps), ref_bleu, atol=1e-9)
    assert metrics.rouge_l(refs, hyps) == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert metrics.cider_d(refs, hyps) == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)
    # a perfect hypothesis scores higher than the model's on every metric
    perfect = [r[0] for r in refs]
    assert metrics.cider_d(refs, perfect) > metrics.cider_d(refs, hyps)
    assert metrics.bleu(refs, perfect)[3] > metrics.bleu(refs, hyps)[3]


# captions written as people write them (AudioCaps and Clotho hold these forms): compounds, abbreviations, times,
# quotes, contractions, fused words, runs of ! and ?, brackets and other symbols
WRITTEN = [
    'A high-pitched beep sounds, followed by a low-pitched hum.',
    'A man speaks, e.g. giving a speech, then a dog barks.', 'At 10:30 a bell rings.', "'Hello' says a woman",
    'A person cannot stop coughing', 'Wow!! A loud bang', "A car's engine revs & a horn honks",
    'Birds chirp/tweet in the background', 'People talk @ a party, 50% louder', 'A kid yells "mom" twice',
    "rock 'n' roll music plays", 'An 18-wheeler drives by', 'A T.V. plays', 'Mr. Smith talks',
    "Someone's gonna sneeze and wanna go, gotta run", 'A dog barks...and barks', "The dogs' barks echo",
    'The bell rang at 3 p.m.', "A man says 'I'm done'", '5,000 people cheer', 'A 1.5-second tone',
    'back-and-forth sawing', 'Something is being hit (repeatedly)', 'A motor whirs -- then stops',
    'A man speaks - then a woman', 'hmm... a bee buzzes', "A woman: 'Stop!'", 'A clock tick-tocks',
    'Something beeps?? then stops!', 'An engine starts up, then revs 2-3 times',
    'Birds chirping, a rooster crows (cock-a-doodle-doo)', "It's raining; there're thunderclaps",
    "She'd say they'll come and we've gone", "A bell rings at 12:00 o'clock", 'The U.S. anthem plays',
    'Rain falls on a tin roof;wind blows', 'A sound at 3.5kHz', 'a $5 bill is crumpled', "cats' and dogs' noises",
    'e.g., birds', 'etc. and so on', 'A voice over a P.A. system', "Don't, won't, can't",
    'a no. 5 bus, approx. 5 min.', 'barks.then stops', 'A 20-something man a.k.a. Dr. Who',
    'a pre- and post-war siren --- wow!?', '[beep] {click}', "rock'n'roll plays",
    # typographic quotes, dashes and ellipsis, as typed by word processors and phones
    "A dog\u2019s bark, it\u2019s loud and doesn\u2019t stop", "\u201cHello\u201d says a woman",
    "\u2018Hello\u2019 says a woman", "A dog barks \u2013 then stops", "barks\u2014then stops",
    "a dog barks 2\u20133 times", "wait\u2026what", "she said \u201cI can\u2019t\u201d\u2026",
    "rock \u2018n\u2019 roll", "the dogs\u2019 barks",
    "the Dr.Who theme plays", "a crowd in St.Louis cheers",  # an abbreviation joined to a word: one token
]

# words PTB keeps with their period, written out here so that the comparison with PTB below holds each of them
ABBREVIATIONS = ("mr mrs ms dr st jr sr vs etc inc co ltd jan feb mar apr jun jul aug sep sept oct nov dec mt ft lt "
                 "sgt gen col prof rev sq ave blvd rd dept est cf al").split()


def test_written_captions_are_split_as_ptb_splits_them():
    """What the PTB comparison below checks, in five cases that hold without Java."""
    assert metrics.caption_tokens("A high-pitched beep, e.g. at 10:30; it cannot stop!!") == [
        "a", "high-pitched", "beep", "e.g.", "at", "10:30", "it", "can", "not", "stop", "!!"]
    assert metrics.caption_tokens("'Hello,' says Mr. Smith's dog (twice).") == [
        "hello", "says", "mr.", "smith", "'s", "dog", "-lrb-", "twice", "-rrb-"]
    assert metrics.caption_tokens("A 1.5-second tone - then 2,000 clicks...") == ["a", "1.5-second", "tone", "then",
                                                                                   "2,000", "clicks"]
    typed = "rock'n'roll \u201cWow\u201d \u2013 a dog\u2019s \u2018woof\u2019 \u2014 2\u20133 times\u2026"  # typed
    assert metrics.caption_tokens(typed) == ["rock", "'n'", "roll", "wow", "a", "dog", "'s", "woof", "2", "3", "times"]
    assert metrics.caption_tokens("The Dr.Who theme") == ["the", "dr.who", "theme"]  # not "dr." "who"


@pytest.mark.skipif(shutil.which("java") is None, reason="the reference PTB tokenizer needs Java")
def test_tokens_equal_the_ptb_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = [t for refs, hyp in CAPTIONS for t in (*refs, hyp)]
    texts += ["It's a bird's song -- isn't it?", "Two (2) dogs bark; one whines...", "A 3.5 second beep, then 10 more"]
    texts += WRITTEN
    texts += [f"a man says {word}. then a dog barks" for word in ABBREVIATIONS]  # each kept with its period
    texts += [f"they {word} go now" for word in ("cannot", "gonna", "gotta", "wanna", "lemme", "gimme")]  # split
    ref = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    for i, t in enumerate(texts):
        assert metrics.caption_tokens(t) == ref[i][0].split(), t

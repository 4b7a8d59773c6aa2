"""Where APT-tiny's counting fails: in the LLM's answer, or already in what the aligner can tell from the audio?

APT-tiny answers "How many times does {label} occur?" with "2" nearly always (the majority answer). Here the LLM is
taken out of the loop, on the benchmark's counting examples (train split to fit, test split to score):

(a) the trained aligner, still conditioned on the question as in APT, with a 4-way classifier (1-4 times) on its
    mean-pooled query outputs (--concat: on all of them side by side) instead of the LLM; aligner and classifier
    are trained on the counting answers;
(b) the same with one classifier per class, picked by the asked label, so the question no longer has to steer the
    aligner to the right events;
(c) a reference that is not APT: a small 1-D CNN over the clip's log-mel frames that predicts every class's count
    at once, trained on the same clips, which shows how much of the answer the benchmark's audio gives away at
    this training-set size;
(d) the same CNN over the frozen encoder's patch tokens (each time step: its 8 frequency patches side by side),
    which shows how much of it survives the encoder.

If (a) and (b) stay near the majority answer while (c) and (d) do clearly better, the count is in the encoder's
features but the tiny aligner cannot read it out, whatever the LLM does with its queries.

    python benchmarks/probe_counting.py [--preset small] [--run_dir R] [--steps 800] [--concat] [--key=value ...]
    (5 min on 2 cores; any setting of apt_min/config.py can follow; a batch larger than the training set is the set)
"""

import argparse
import copy
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from apt_min import data
from apt_min.audio import load_fbank
from apt_min.build import ensure_tokenizer, load_apt
from apt_min.config import load_config
from apt_min.errors import MissingFileError, clean_exit, whole_number

EVALS = 4  # evaluations per run; the result is the mean of the last three (single evaluations are noisy)


class AlignerProbe(nn.Module):
    """The aligner's query outputs, mean-pooled (or side by side), into count logits: one classifier, or one per
    class."""

    def __init__(self, aligner, classes: list[str] | None, concat: bool = False):
        super().__init__()
        self.aligner, self.classes, self.concat = aligner, {c: i for i, c in enumerate(classes or [])}, concat
        width = aligner.config.hidden_size * (aligner.config.num_queries if concat else 1)
        self.head = nn.Linear(width, 4 * max(1, len(self.classes)))

    def forward(self, windows, ids, mask, labels):
        queries = self.aligner.instruct(windows, ids, mask)  # (B, Q, H)
        logits = self.head(queries.flatten(1) if self.concat else queries.mean(1))  # (B, 4 or 4 * classes)
        if self.classes:
            which = torch.tensor([self.classes[x] for x in labels])
            logits = logits.view(len(labels), -1, 4)[torch.arange(len(labels)), which]
        return logits


def fit_aligner_probe(probe, tok, feats, train, test, steps, batch, seed):
    def logits(exs):
        windows = torch.cat([feats[ex.segments[0][1]] for ex in exs]).float()
        ids, mask = tok.pad([tok.encode(ex.segments[1][1], bos=False) for ex in exs])
        return probe(windows, ids, mask, [ex.target["label"] for ex in exs])

    def target(exs):
        return torch.tensor([ex.target["count"] - 1 for ex in exs])

    torch.manual_seed(seed)
    rng, opt, accs = random.Random(seed), torch.optim.AdamW(probe.parameters(), lr=3e-4), []
    for step in range(1, steps + 1):
        exs = rng.sample(train, min(batch, len(train)))
        loss = F.cross_entropy(logits(exs), target(exs))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % (steps // EVALS) == 0:
            probe.eval()
            with torch.no_grad():
                pred = torch.cat([logits(test[i:i + 64]).argmax(-1) for i in range(0, len(test), 64)])
            probe.train()
            accs.append((pred == target(test)).float().mean().item())
    return accs


def fit_cnn(train, test, steps, batch, seed, frames_of):
    """Fit a counter of every class from a clip's frames (frames_of(path): (T, C)): three 1-D convolutions over
    time, pooled; -> its test accuracy at each evaluation."""
    classes = sorted({ex.target["label"] for ex in train})
    index = {c: i for i, c in enumerate(classes)}

    def table(exs):
        by_clip = {}
        for ex in exs:
            by_clip.setdefault(ex.segments[0][1], []).append((index[ex.target["label"]], ex.target["count"] - 1))
        paths = sorted(by_clip)
        frames = torch.stack([frames_of(p) for p in paths]).transpose(1, 2)  # (N, C, T)
        return frames, [by_clip[p] for p in paths]

    (xtr, ytr), (xte, yte) = table(train), table(test)
    torch.manual_seed(seed)
    pool = [nn.MaxPool1d(2)] if xtr.shape[2] > 64 else []  # log-mel frames (10 ms) are pooled, patches (160 ms) not
    conv = [nn.Conv1d(xtr.shape[1], 128, 5, padding=2), nn.GELU(), *pool, nn.Conv1d(128, 128, 5, padding=2),
            nn.GELU(), *pool, nn.Conv1d(128, 128, 5, padding=2), nn.GELU()]
    net = nn.Sequential(*conv, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(128, 4 * len(classes)))
    opt, rng, accs = torch.optim.AdamW(net.parameters(), lr=1e-3), np.random.default_rng(seed), []

    def logits_targets(x, y, rows):
        out = net(x[rows]).view(len(rows), len(classes), 4)
        pairs = [(b, c, k) for b, r in enumerate(rows) for c, k in y[r]]
        b, c, k = (torch.tensor(v) for v in zip(*pairs))
        return out[b, c], k

    for step in range(1, steps + 1):
        logits, k = logits_targets(xtr, ytr, rng.choice(len(xtr), min(batch, len(xtr)), replace=False))
        loss = F.cross_entropy(logits, k)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % (steps // EVALS) == 0:
            with torch.no_grad():
                logits, k = logits_targets(xte, yte, np.arange(len(xte)))
            accs.append((logits.argmax(-1) == k).float().mean().item())
    return accs


@clean_exit("probe_counting.py")
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--run_dir", help="the trained run (default: the preset's)")
    ap.add_argument("--steps", type=whole_number(EVALS), default=800,
                    help=f"training steps of each aligner probe (the CNN: twice); at least {EVALS}, one per evaluation")
    ap.add_argument("--batch", type=whole_number(1), default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concat", action="store_true", help="(a), (b): the queries side by side instead of averaged")
    args, rest = ap.parse_known_args()  # and any setting of apt_min/config.py as --key=value
    cfg = load_config(args.preset, rest + ([f"--run_dir={args.run_dir}"] if args.run_dir else []))
    checkpoint = cfg.stage_dir("2") / "final"
    if not (checkpoint / "apt.json").is_file():
        raise MissingFileError(f"{checkpoint}: no trained APT; run the default chain first (README, Quickstart)")
    tok = ensure_tokenizer(cfg)
    apt = load_apt(cfg, checkpoint, "cpu")
    train = data.examples("counting", cfg.data_root, "train", rng=random.Random(args.seed))
    test = data.examples("counting", cfg.data_root, "test")
    feats, _ = apt.encode_clips(sorted({ex.segments[0][1] for ex in train + test}), strict=True)
    truth = [ex.target["count"] for ex in test]
    common = Counter(ex.target["count"] for ex in train).most_common(1)[0][0]
    results = [(f"always {common} (the most frequent training answer)", [np.mean([t == common for t in truth])])]
    metrics = Path(cfg.run_dir) / "eval" / "metrics_counting.json"
    apt_acc = next((r["apt"] for r in json.loads(metrics.read_text()) if r["metric"] == "accuracy"), None) \
        if metrics.is_file() else None  # (none in a "not run" file)
    if apt_acc is not None:
        results.append((f"APT-{args.preset}, the LLM's answer (evaluate.py --task counting)", [apt_acc]))
    classes = sorted({ex.target["label"] for ex in train})
    for name, per_class in (("(a) trained aligner + one 4-way classifier, question-conditioned", None),
                            ("(b) trained aligner + a classifier per asked class", classes)):
        probe = AlignerProbe(copy.deepcopy(apt.aligner).float().train(), per_class, args.concat)
        results.append((name, fit_aligner_probe(probe, tok, feats, train, test, args.steps, args.batch, args.seed)))
        print(f"{name}: test accuracy {results[-1][1]}", flush=True)
    n_time = cfg.target_length // apt.encoder.config.patch_size
    for name, frames_of in (
            ("(c) reference, not APT: a 1-D CNN over the log-mel frames, every class at once",
             lambda p: load_fbank(p, cfg.target_length)[0]),
            ("(d) the same CNN over the frozen encoder's patch tokens",
             lambda p: feats[p][0].float().reshape(n_time, -1))):
        results.append((name, fit_cnn(train, test, 2 * args.steps, args.batch, args.seed, frames_of)))
        print(f"{name}: test accuracy {results[-1][1]}", flush=True)
    print(f"\ncounting, {len(test)} test questions of the synthetic benchmark ({len(train)} to train)")
    print(f"{'accuracy':>8}  what")
    for name, accs in results:
        print(f"{np.mean(accs[-3:]):8.3f}  {name}")


if __name__ == "__main__":
    main()

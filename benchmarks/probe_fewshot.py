"""Does APT-tiny classify few-shot by matching the query to the support clips, or only by recognising classes it
was trained on?

4-way 1-shot episodes (tiny's stage 2 trains these; small's, 2- to 5-way 1- to 3-shot) on held-out clips, three ways,
each answered by generation (the label it names) and by ranking (the episode label whose "This is a sound of {label}."
the LLM finds most likely):

(1) training classes, held-out clips, their real names: recognition alone can answer;
(2) the same classes with a made-up name per episode: only matching the query to a support clip can answer;
(3) the 12 novel classes (the ESC-50-style set; what evaluate.py --task esc50 scores): only matching can answer.

A model that matches scores well above chance (0.25) in (2) and (3), not only in (1).

    python benchmarks/probe_fewshot.py [--preset small] [--run_dir R] [--episodes 100] [--key=value ...]
    (tiny: seconds on 2 cores; any setting of apt_min/config.py, such as --fewshot_layout=list, can follow)

A pool too small for a 4-way 1-shot episode (4 classes of at least 2 clips) has its line say so; the others still run.
"""

import argparse
import random

import numpy as np

from apt_min import data
from apt_min.build import ensure_tokenizer, load_apt
from apt_min.config import load_config
from apt_min.errors import MissingFileError, clean_exit
from apt_min.evaluation import answer_and_rank
from apt_min.metrics import named_label


def score(apt, episodes):
    """(generation accuracy, ranking accuracy, a few generated answers), as evaluate.py --task esc50 scores them."""
    feats, _ = apt.encode_clips([v for ep in episodes for k, v in ep.segments if k == "audio"], strict=True)
    outputs = [answer_and_rank(apt, ep, feats) for ep in episodes]
    named = [named_label(o, ep) == ep.target["label"] for o, ep in zip(outputs, episodes)]
    ranked = [ep.target["ranked"] == ep.target["label"] for ep in episodes]
    return np.mean(named), np.mean(ranked), outputs[:3]


@clean_exit("probe_fewshot.py")
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--run_dir", help="the trained run (default: the preset's)")
    ap.add_argument("--episodes", type=int, default=100)
    args, rest = ap.parse_known_args()  # and any setting of apt_min/config.py as --key=value
    cfg = load_config(args.preset, rest + ([f"--run_dir={args.run_dir}"] if args.run_dir else []))
    checkpoint = cfg.stage_dir("2") / "final"
    if not (checkpoint / "apt.json").is_file():
        raise MissingFileError(f"{checkpoint}: no trained APT; run the default chain first (README, Quickstart)")
    ensure_tokenizer(cfg)
    apt = load_apt(cfg, checkpoint, "cpu")
    held_out = data.single_label_pool(cfg.data_root, "test", strict=True)
    novel = data.esc50_pool(cfg.data_root, strict=True)
    print(f"4-way 1-shot, {args.episodes} episodes each; chance 0.250")
    print(f"{'named':>6} {'ranked':>6}  episodes (a few generated answers)")
    for what, pool, rename in (("(1) training classes, held-out clips, real names", held_out, False),
                               ("(2) the same, a made-up name per class and episode", held_out, True),
                               ("(3) the novel classes", novel, False)):
        rng = random.Random(f"probe/{what}")
        try:
            episodes = [data.fewshot_episode(pool, 4, 1, rng, rename=rename, layout=cfg.fewshot_layout)
                        for _ in range(args.episodes)]
        except data.DataError as e:  # this data set's pool is too small (a miniature's test split, say)
            print(f"{'-':>6} {'-':>6}  {what}: none ({e})", flush=True)
            continue
        named, ranked, some = score(apt, episodes)
        print(f"{named:6.3f} {ranked:6.3f}  {what} {some}", flush=True)


if __name__ == "__main__":
    main()

"""A preset's training chain, end to end: `python train.py --stage 0`, then lm (tiny only), 1 and 2 (the small
preset: mae first), each in a fresh process, as a user runs them. Prints the wall time of each stage and its
validation numbers before and after training. Time a fresh --run_dir: a run folder's feature cache (and the
synthetic data, once generated) spare later chains the encoder's and the generator's work.
    python benchmarks/bench_chain.py [--preset=small] [--run_dir=...] [any other --key=value for train.py]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from apt_min.config import load_config
from apt_min.errors import SettingError

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--preset", default="tiny")
    args, extra = ap.parse_known_args()  # the rest: train.py's settings
    preset = args.preset
    try:
        cfg = load_config(preset, extra)  # the settings given too: they decide which stages the chain has
    except SettingError as e:
        raise SystemExit(f"bench_chain.py [--preset=P] [--key=value ...]: {e}") from None
    total = 0.0
    for stage in cfg.chain():
        t = time.time()
        done = subprocess.run([sys.executable, "train.py", "--stage", stage, "--preset", preset, *extra], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:  # train.py's own last words (its error, or a bug's traceback), not a bare exit status
            raise SystemExit(f"bench_chain.py: stage {stage} failed (exit status {done.returncode}):\n"
                             + "\n".join(done.stderr.strip().splitlines()[-15:]))
        seconds = time.time() - t
        total += seconds
        evals = [json.loads(line) for line in (ROOT / cfg.stage_dir(stage) / "log.jsonl").read_text().splitlines()]
        evals = [e for e in evals if any(k.startswith("val") or k.endswith("_r1") for k in e)]
        first, last = evals[0], evals[-1]
        shown = ", ".join(f"{k} {first[k]:.3f} -> {last[k]:.3f}" for k in first if k != "step")
        print(f"stage {stage:>2}: {seconds:6.1f} s   validation (step {first['step']} -> {last['step']}): {shown}")
    print(f"whole chain: {total / 60:.1f} min (the synthetic data, if absent, is generated inside stage "
          f"{cfg.chain()[0]})")


if __name__ == "__main__":
    main()

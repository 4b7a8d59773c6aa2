"""How many queries (acoustic prompt vectors per clip) the aligner should have: for each count, stage 0 then stage 1
at a short budget, from the same frozen encoder, each stage in a fresh process. Prints stage 1's validation loss and
AQA accuracy beside each count's time, so the preset's `num_queries` is chosen by measurement.

The runs go to {run_dir}/sweep-queries/q{N}/; they share the preset run's encoder (for the small preset, run
`python train.py --stage mae --preset small` first), its feature cache (the encoder's output does not depend on
the query count) and, for the tiny preset, its stand-in LLM (run `python train.py --stage lm` first).
    python benchmarks/sweep_queries.py [--preset small] [--counts 8,16,32] [--steps_0 300] [--steps_1 150]
                                       [--key=value ...]   (any setting of apt_min/config.py, given to every run)
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from apt_min.config import load_config, stage_folder
from apt_min.errors import MissingFileError, clean_exit, whole_number

ROOT = Path(__file__).resolve().parents[1]


def counts(text: str) -> list[int]:
    """--counts: whole numbers of at least 1, separated by commas ("8,16,32")."""
    try:
        return [whole_number(1)(c) for c in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected query counts of at least 1, separated by commas, got {text!r}") \
            from None


@clean_exit("sweep_queries.py")
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--counts", type=counts, default="8,16,32", help="query counts, separated by commas")
    ap.add_argument("--steps_0", type=whole_number(1), default=300)
    ap.add_argument("--steps_1", type=whole_number(1), default=150)
    args, rest = ap.parse_known_args()  # and any setting of apt_min/config.py as --key=value
    cfg = load_config(args.preset, rest)
    base = ROOT / cfg.run_dir
    encoder = base / "encoder.safetensors"
    if cfg.encoder_init == "mae" and not encoder.is_file():
        raise MissingFileError(f"{encoder}: no pretrained encoder; run `python train.py --stage mae --preset "
                               f"{args.preset}` first")
    if not cfg.llm_path and not (base / "llm").is_dir():
        raise MissingFileError(f"{base / 'llm'}: no stand-in LLM; run `python train.py --stage lm --preset "
                               f"{args.preset}` first")
    print(f"{args.preset}: stage 0 {args.steps_0} steps, stage 1 {args.steps_1} steps per count")
    print(f"{'queries':>7} {'stage 0 s':>9} {'stage 1 s':>9} {'a2t R@1':>8} {'val loss':>8} {'AQA acc':>8}")
    for count in args.counts:
        run = base / "sweep-queries" / f"q{count}"
        run.mkdir(parents=True, exist_ok=True)
        for shared in ("encoder.safetensors", "features", "llm"):
            if (base / shared).exists() and not (run / shared).exists():
                (run / shared).symlink_to((base / shared).resolve())
        seconds = []
        for stage in ("0", "1"):
            t = time.time()
            done = subprocess.run([sys.executable, "train.py", "--stage", stage, "--preset", args.preset, *rest,
                                   f"--run_dir={run}", f"--num_queries={count}", f"--steps_0={args.steps_0}",
                                   f"--steps_1={args.steps_1}", "--eval_every=100000", "--save_every=100000"],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode:  # train.py's own last words, not a bare exit status
                raise SystemExit(f"sweep_queries.py: {count} queries, stage {stage} failed (exit status "
                                 f"{done.returncode}):\n" + "\n".join(done.stderr.strip().splitlines()[-15:]))
            seconds.append(time.time() - t)
        last = {}
        for stage in ("0", "1"):
            for line in (run / stage_folder(stage) / "log.jsonl").read_text().splitlines():
                entry = json.loads(line)
                last |= {k: v for k, v in entry.items() if k.startswith("val") or k.endswith("_r1")}
        print(f"{count:7d} {seconds[0]:9.1f} {seconds[1]:9.1f} {last['a2t_r1']:8.3f} {last['val_loss']:8.3f} "
              f"{last['val_aqa_accuracy']:8.3f}", flush=True)


if __name__ == "__main__":
    main()

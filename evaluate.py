"""Evaluate APT on every task with the paper's protocols (§4, Tables 1-6).

PLACEHOLDER until the evaluation issue (#7) lands: no task is evaluated yet, and this script says so and exits
with status 2 rather than printing numbers it has not measured.
"""

import argparse


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True)
    args = ap.parse_args()
    raise SystemExit(f"evaluate.py --task {args.task}: evaluation is not implemented yet (issue #7).")


if __name__ == "__main__":
    main()

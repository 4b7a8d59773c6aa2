"""Print evaluate.py's metrics as the README's markdown results table.
    python evaluate.py --task all && python benchmarks/results_table.py [runs/tiny/eval]
"""

import json
import math
import sys
from pathlib import Path

TASKS = ("audioset", "audiocaps", "clotho", "clotho_aqa", "esc50", "nlar", "sed", "ter", "count")


def main():
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny/eval")
    print("| task | metric | APT-tiny | baseline | above baseline? | protocol (baseline) |")
    print("|---|---|---|---|---|---|")
    for task in TASKS:
        file = folder / f"metrics_{task}.json"
        if not file.is_file():
            continue
        for row in json.loads(file.read_text()):
            apt = "—" if row["apt"] is None or math.isnan(row["apt"]) else f"{row['apt']:.3f}"
            base = "" if row["baseline"] is None else f"{row['baseline']:.3f}"
            verdict = ""
            if row["baseline"] is not None and apt != "—":
                lower_is_better = "error" in row["metric"]
                better = row["apt"] < row["baseline"] if lower_is_better else row["apt"] > row["baseline"]
                verdict = "yes" if better else "**no**"
            print(f"| {task} | {row['metric']} | {apt} | {base} | {verdict} | {row['protocol']} |")


if __name__ == "__main__":
    main()

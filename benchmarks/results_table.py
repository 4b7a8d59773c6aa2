"""Print evaluate.py's metrics as the README's markdown results table.
    python evaluate.py --task all && python benchmarks/results_table.py [runs/tiny/eval [APT-tiny]]

"clear margin?" says yes when APT beats the baseline by at least a tenth of the baseline's value and by at least
0.02, "barely" when it beats it by less, and no otherwise.
"""

import argparse
import json
import math
import sys
from pathlib import Path

TASKS = ("audioset", "audiocaps", "clotho", "clotho_aqa", "esc50", "nlar", "sed", "ter", "counting")


def margin(apt: float, baseline: float, lower_is_better: bool = False) -> str:
    gain = baseline - apt if lower_is_better else apt - baseline
    if gain <= 0:
        return "**no**"
    return "yes" if gain >= max(0.1 * abs(baseline), 0.02) else "barely"


def runs_mixed(folder: Path) -> str:
    """"" when every task's metrics in `folder` were made by one evaluate.py call's settings (their made_{task}.json
    files: checkpoint, data root, --limit, episodes, captioning's decoding), else what differs, or which metrics have
    no made file to say: a table drawn from several runs would read as one model's."""
    tasks = [t for t in TASKS if (folder / f"metrics_{t}.json").is_file()]  # the table's (not AVQA's: its own)
    unknown = [t for t in tasks if not (folder / f"made_{t}.json").is_file()]
    if unknown:
        return f"no made_{{task}}.json says how {', '.join(unknown)} was made"
    made = {t: json.loads((folder / f"made_{t}.json").read_text()) for t in tasks}
    keys = sorted({k for m in made.values() for k in m})
    differ = [k for k in keys if len({json.dumps(m.get(k), sort_keys=True) for m in made.values()}) > 1]
    return "; ".join(f"{k}: " + ", ".join(f"{task} {m.get(k)}" for task, m in made.items()) for k in differ)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default="runs/tiny/eval", help="evaluate.py's --out")
    ap.add_argument("name", nargs="?", default="APT-tiny", help="the model's column heading")
    args = ap.parse_args()
    folder, name = Path(args.folder), args.name
    if mixed := runs_mixed(folder):
        print(f"note: the metrics in {folder} come from different runs ({mixed})", file=sys.stderr)
    print(f"| task | metric | {name} | baseline | clear margin? | protocol (baseline) |")
    print("|---|---|---|---|---|---|")
    for task in TASKS:
        file = folder / f"metrics_{task}.json"
        if not file.is_file():
            continue
        above = None  # a protocol is named once, on the first of the rows that share it
        for row in json.loads(file.read_text()):
            protocol, above = ("" if row["protocol"] == above else row["protocol"]), row["protocol"]
            apt = "—" if row["apt"] is None or math.isnan(row["apt"]) else f"{row['apt']:.3f}"
            apt = str(row["apt"]) if isinstance(row["apt"], int) else apt  # a count: clips scored
            base = "" if row["baseline"] is None else f"{row['baseline']:.3f}"
            verdict = ""
            if row["baseline"] is not None and apt != "—":
                verdict = margin(row["apt"], row["baseline"], lower_is_better="error" in row["metric"])
            print(f"| {task} | {row['metric']} | {apt} | {base} | {verdict} | {protocol} |")


if __name__ == "__main__":
    main()

"""Two jobs on one CPU: torch gives every process one thread per core, so a second job started beside a training run
(an evaluation, a notebook, another stage) puts two threads on each core, and the threads of one process, which wait
for each other at every operation, keep waiting for one the other process has pushed aside. This times stage 0's
training (examples/s, as train.py logs it: training alone, not validation) for one job alone, two at once with the
default threads, two at once each given half the cores (OMP_NUM_THREADS), and with waiting threads put to sleep
rather than spinning (OMP_WAIT_POLICY=PASSIVE: alone and two at once), each beside the job alone.
    python benchmarks/bench_two_jobs.py [--steps 150] [--run_dir runs/two-jobs] [any --key=value for train.py]
A first, untimed run reads the clips through the encoder, whose features the timed runs share (same seed: the same
clips), so that all of them time training only. The thread settings of the shell it is started from (OMP_NUM_THREADS,
OMP_WAIT_POLICY, MKL_NUM_THREADS) are not passed on: each row sets its own.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("warmup", "alone", "alone-passive", "default-a", "default-b", "split-a", "split-b", "passive-a", "passive-b")
THREADS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")  # left to each setting, not inherited


def start(base: Path, name: str, steps: int, extra: list, env: dict | None = None) -> subprocess.Popen:
    run = base / name
    run.mkdir(parents=True)
    if name != "warmup":  # the warm-up run's encoder and feature cache, shared
        for part in ("encoder.safetensors", "features"):
            (run / part).symlink_to((base / "warmup" / part).resolve())
    command = [sys.executable, "train.py", "--stage", "0", f"--steps_0={steps}", "--eval_every=1000000",
               f"--run_dir={run}", *extra]
    with open(run / "output.txt", "w") as out:  # a file, not a pipe nobody reads while the other job runs
        return subprocess.Popen(command, cwd=ROOT, env=environment(env), stdout=out, stderr=subprocess.STDOUT)


def environment(env: dict | None = None) -> dict:
    return {k: v for k, v in os.environ.items() if k not in THREADS} | (env or {})


def speed(base: Path, name: str, job: subprocess.Popen) -> float:
    """The job's training speed, examples/s over its whole run (its last log record); its error if it failed."""
    if job.wait():
        said = (base / name / "output.txt").read_text().replace("\r", "\n").strip().splitlines()
        raise SystemExit(f"bench_two_jobs.py: run {name} failed (exit status {job.returncode}):\n"
                         + "\n".join(said[-15:]))
    records = [json.loads(line) for line in (base / name / "stage0" / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "examples_per_s" in r][-1]["examples_per_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--run_dir", default=str(ROOT / "runs" / "two-jobs"), help="a folder of the benchmark's own")
    args, extra = ap.parse_known_args()
    base = Path(args.run_dir).resolve()  # (train.py runs from the repository root)
    if base.exists() and not {p.name for p in base.iterdir()} <= set(RUNS):
        raise SystemExit(f"bench_two_jobs.py: {base} holds more than this benchmark's runs; it would be emptied "
                         "(--run_dir chooses another folder)")
    shutil.rmtree(base, ignore_errors=True)
    asked = [sys.executable, "-c", "import torch; print(torch.get_num_threads())"]  # torch's own default
    cores = int(subprocess.run(asked, env=environment(), capture_output=True, text=True, check=True).stdout)
    speed(base, "warmup", start(base, "warmup", args.steps, extra))
    alone = speed(base, "alone", start(base, "alone", args.steps, extra))
    passive = {"OMP_WAIT_POLICY": "PASSIVE"}  # waiting threads sleep rather than spin
    print(f"stage 0, {args.steps} steps, threads per process by default: {cores}")
    print(f"{'one job alone':<50} {alone:7.1f} examples/s")
    alone_passive = speed(base, "alone-passive", start(base, "alone-passive", args.steps, extra, passive))
    print(f"{'one job alone, OMP_WAIT_POLICY=PASSIVE':<50} {alone_passive:7.1f} examples/s: "
          f"{alone_passive / alone:.2f}x the job alone")
    half = max(1, cores // 2)
    for tag, label, env in (("default", f"{cores} threads each (the default)", {}),
                            ("split", f"OMP_NUM_THREADS={half} each", {"OMP_NUM_THREADS": str(half)}),
                            ("passive", "OMP_WAIT_POLICY=PASSIVE each", passive)):
        jobs = {name: start(base, name, args.steps, extra, env) for name in (f"{tag}-a", f"{tag}-b")}
        each = [speed(base, name, job) for name, job in jobs.items()]
        print(f"{'two at once, ' + label:<50} {each[0]:7.1f} and {each[1]:.1f} examples/s: "
              f"each {sum(each) / 2 / alone:.2f}x the job alone, both together {sum(each) / alone:.2f}x")


if __name__ == "__main__":
    main()

"""What decode_threads buys a training step whose features are not cached (the paper preset): model.ReadAhead
decodes each step's files at once in its threads and the next step's while the step trains. The training step on
the GPU is stood in for by a wait that leaves the CPU free, as a GPU step does (its length: --step_ms, by default
the time one thread takes to decode a batch, where overlapping can at best halve a step). The same batches of
ten-second 44.1 kHz stereo files (as real downloads often are: resampled on the way) go through the loop three ways,
timed per step: decoded here on the training thread (no read-ahead), by ReadAhead with one thread, and with
--threads.
    python benchmarks/bench_read_ahead.py [--batch 8] [--steps 10] [--threads N] [--step_ms MS]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import downloads_like  # noqa: E402

from apt_min.audiomae import AudioMAEConfig  # noqa: E402
from apt_min.model import ReadAhead, decode_clips  # noqa: E402


def seconds_per_step(batches, config, step_s: float, ahead: ReadAhead | None) -> float:
    """The loop of training: decode this step's clips (taking what was read ahead), start the next step's, train."""
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        decode_clips(batch, config, strict=True, ahead=ahead)
        if ahead and i + 1 < len(batches):
            ahead.start(batches[i + 1])
        time.sleep(step_s)  # the step on the GPU: the CPU is free meanwhile
    return (time.perf_counter() - start) / len(batches)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=max(2, min(8, (os.cpu_count() or 1) - 1)))
    ap.add_argument("--step_ms", type=float, help="the stand-in GPU step (default: one thread's decode of a batch)")
    args = ap.parse_args()
    config = AudioMAEConfig()  # the paper's 10.24 s windows
    with tempfile.TemporaryDirectory() as folder:
        files = downloads_like(folder, args.batch * args.steps, step_hz=37)  # a file per clip: none decoded twice
        batches = [files[i:i + args.batch] for i in range(0, len(files), args.batch)]
        decode_clips(batches[0][:1], config)  # warm-up (resampling kernels)
        t = time.perf_counter()
        decode_clips(batches[0], config)
        decode_s = time.perf_counter() - t
        step_s = args.step_ms / 1000 if args.step_ms is not None else decode_s
        print(f"batch {args.batch}, {args.steps} steps; decoding a batch here: {decode_s * 1e3:.0f} ms; the stand-in "
              f"GPU step: {step_s * 1e3:.0f} ms")
        here = seconds_per_step(batches, config, step_s, None)
        print(f"{'decoded on the training thread':<40} {here * 1e3:7.0f} ms a step")
        for threads in (1, args.threads):
            took = seconds_per_step(batches, config, step_s, ReadAhead(config, threads))
            print(f"{f'ReadAhead, {threads} thread(s)':<40} {took * 1e3:7.0f} ms a step: {here / took:.2f}x")


if __name__ == "__main__":
    main()

"""What the shared prefix buys a training step: under SmolLM2's chat template every example opens with the same
24-token system turn, which the frozen LLM now runs once (llama.SharedPrefix) instead of in every row.

Real training steps of the small preset (its trained APT: your run, else the release; SmolLM2 fetched if absent),
forward + backward on batches drawn as stage 1 and stage 2 draw them, in the precision the run would use; each batch
timed with the prefix shared and with it recomputed in every row, the two alternating; the mean step over the same
batches (a stage's time is their sum: long few-shot steps count as they weigh), and the ratio (>1: faster). The two
ways' losses on each batch are compared too: the largest difference is printed beside the times.
    python benchmarks/bench_shared_prefix.py [--batches 24] [--checkpoint DIR] [--key=value ...]
    (any setting of apt_min/config.py on top of the small preset's; --checkpoint: another APT than the run's own)
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train.py, at the repository's root
import train  # noqa: E402
from apt_min import data
from apt_min.build import fetch_known_llm, load_apt, resolve_precision
from apt_min.config import load_config
from apt_min.errors import clean_exit, whole_number
from apt_min.release import resolve_checkpoint


@clean_exit("bench_shared_prefix.py")
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=whole_number(1), default=24)
    ap.add_argument("--checkpoint", help="an APT folder (default: the run's own, else the release)")
    args, rest = ap.parse_known_args()
    cfg = load_config("small", rest)
    fetch_known_llm(cfg)
    apt = load_apt(cfg, resolve_checkpoint(cfg, args.checkpoint)).train()
    autocast, _, _ = train.amp_settings(cfg, torch.device("cpu"))
    print(f"small preset, {resolve_precision(cfg, torch.device('cpu'))}, batch {cfg.batch_size}, "
          f"prefix {len(apt.prefix_ids())} tokens, threads {torch.get_num_threads()}")
    for stage in ("1", "2"):
        ratios = train.parse_ratios(cfg.task_ratios, train.STAGES[stage]["ratios"])
        pools = train.training_pools(cfg, stage, [t for t, w in ratios.items() if w > 0])
        sampler = data.TaskSampler(pools, ratios, cfg.batch_size, seed=1)
        times, worst = {True: [], False: []}, 0.0
        for i in range(args.batches + 1):  # the first batch warms up and is not counted
            _, batch = sampler.next_batch()
            feats, _ = apt.encode_clips([v for ex in batch for k, v in ex.segments if k == "audio"])
            losses = {}
            for share in (True, False) if i % 2 else (False, True):
                apt.share_prefix = share
                torch.manual_seed(i)  # the same dropout in both ways
                t = time.perf_counter()
                with autocast():
                    loss, n = apt(*data.collate(batch), feats)
                mean = loss / n
                mean.backward()
                apt.zero_grad(set_to_none=True)
                if i:
                    times[share].append(time.perf_counter() - t)
                losses[share] = mean.item()
            worst = max(worst, abs(losses[True] - losses[False]))
        full, shared = statistics.mean(times[False]), statistics.mean(times[True])
        print(f"stage {stage} step: prefix in every row {full:.3f} s | shared {shared:.3f} s ({full / shared:.2f}x); "
              f"losses differ by at most {worst:.1e}")


if __name__ == "__main__":
    main()

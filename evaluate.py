"""Evaluate a trained APT on each task with the paper's protocols (§4, Tables 3-6), beside trivial baselines.

    python evaluate.py --task audiocaps                      (the tiny chain's result, on the synthetic benchmark)
    python evaluate.py --task all --limit 200
    python evaluate.py --task esc50 --preset paper --data-root data --checkpoint runs/paper/stage2/final

Tasks (apt_min/evaluation.py, EVALUATIONS): audioset (tagging), audiocaps and clotho (captioning), clotho_aqa, esc50
(few-shot), nlar, sed (query-based detection), ter (temporal retrieval), counting. Each writes predictions (JSON
lines: audio, prompt, output, reference), metrics (JSON) and what made them (made_{task}.json) under --out, and prints
a table whose every row names its protocol, beside a trivial baseline computed on the same data (chance, majority or
fixed answer). Any config setting can follow as --key=value.

Real copies of the data sets always miss some clips: a clip that is listed but not on disk, or that cannot be decoded,
is skipped and counted (--strict aborts instead). The table's last row per task says on how many clips the scores
stand and how many were lost, and missing_{task}.txt in --out lists those files with why. A split that lists nothing,
or has nothing left to score, is an error naming its data (with --task all: that task's row, the others run, and a
last line says how many were not run, exiting with status 1); every error about the user's files or settings is one
line, without a traceback.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from apt_min import data
from apt_min.build import ensure_av_data, ensure_data, ensure_tokenizer, load_apt, load_apt_blip2, vision_side
from apt_min.config import load_config
from apt_min.errors import MissingFileError, SettingError, clean_exit, whole_number
from apt_min.evaluation import CAPTION, EVALUATIONS, Options, avqa_coverage_row, coverage_row, eval_avqa, evaluate
from apt_min.model import APT
from apt_min.release import resolve_checkpoint
from apt_min.tasks import label_text


def write_results(out: Path, name, examples, rows, outputs, refs, coverage: data.Coverage | None = None,
                  made: dict | None = None):
    """predictions_{name}.jsonl (each example's clips, prompt, output and reference), metrics_{name}.json, made_
    {name}.json (what made them: `made`, the checkpoint and options) and, where clips were lost, missing_{name}.txt
    (one per line: path, tab, why)."""
    with open(out / f"predictions_{name}.jsonl", "w") as f:
        for i, (o, r) in enumerate(zip(outputs, refs)):
            ex = examples[i]
            record = {"id": i, "output": o, "reference": r}
            record |= {"ranked": label_text(ex.target["ranked"])} if "ranked" in ex.target else {}
            record |= {"audio": [v for k, v in ex.segments if k == "audio"],
                       "prompt": " ".join(v for k, v in ex.segments if k in ("text", "label"))}
            f.write(json.dumps(record) + "\n")
    write_metrics(out, name, rows, coverage, made)


def write_metrics(out: Path, name, rows, coverage: data.Coverage | None, made: dict | None = None):
    (out / f"metrics_{name}.json").write_text(json.dumps(
        [{"metric": m, "apt": v, "baseline": b, "protocol": p} for m, v, b, p in rows], indent=1))
    if made is not None:  # so that a folder holding several runs' files can tell them apart (results_table.py)
        (out / f"made_{name}.json").write_text(json.dumps(made, indent=1))
    missing = out / f"missing_{name}.txt"
    if coverage and coverage.lines():
        missing.write_text("".join(line + "\n" for line in coverage.lines()))
    else:
        missing.unlink(missing_ok=True)  # none lost this time: no stale list from an earlier run


def default_out(cfg, checkpoint: Path, given: bool) -> Path:
    """Where results go without --out, so that evaluating another APT does not write over the run's own: {run_dir}/eval
    for the run's own APT (or the preset's release, standing in for it); for a --checkpoint, the eval folder of the run
    it belongs to: {run}/eval for a run's stage-2 APT, {run}/eval-{stage folder} for another stage's
    (runs/paper/caption_ft-audiocaps/final: runs/paper/eval-caption_ft-audiocaps), and {run_dir}/eval-{its name} for
    a folder of its own (a release: runs/small/eval-apt-small)."""
    if not given:
        return Path(cfg.run_dir) / "eval"
    checkpoint = checkpoint.resolve()  # (--checkpoint=final, given from inside its stage folder)
    if checkpoint.name == "final":
        run, stage = checkpoint.parent.parent, checkpoint.parent.name
        return run / ("eval" if stage == "stage2" else f"eval-{stage}")
    return Path(cfg.run_dir) / f"eval-{checkpoint.name}"


@clean_exit("evaluate.py")
def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # as train.py
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Any setting of apt_min/config.py can follow as --key=value.")
    ap.add_argument("--task", required=True, choices=[*EVALUATIONS, "all", "avqa"],
                    help="all: every audio task; avqa: APT-BLIP-2 (the APT plugged into the vision side)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--data-root", help="a data folder in the real layouts (default: the preset's)")
    ap.add_argument("--checkpoint", help="a trained APT folder (default: {run_dir}/stage2/final, else the preset's "
                    "release)")
    ap.add_argument("--limit", type=whole_number(0), default=0, help="evaluate at most this many examples per task "
                    "(0: all; few-shot: --episodes)")
    ap.add_argument("--episodes", type=whole_number(1), default=Options.episodes, help="few-shot episodes per setting")
    ap.add_argument("--batch-size", type=whole_number(1), default=Options.batch_size)
    ap.add_argument("--out", help="where predictions and metrics go (default: {run_dir}/eval; with --checkpoint, "
                    "the eval folder of the run it belongs to: default_out)")
    ap.add_argument("--num-beams", type=whole_number(1), default=CAPTION["num_beams"],
                    help="captioning beams (APT code: 5)")
    ap.add_argument("--repetition-penalty", type=float, default=CAPTION["repetition_penalty"],
                    help="captioning repetition penalty (APT code: 1.5)")
    ap.add_argument("--max-new-tokens", type=whole_number(1), default=CAPTION["max_new_tokens"],
                    help="captioning length limit")
    ap.add_argument("--strict", action="store_true", help="abort on a listed clip that is missing or cannot be "
                    "decoded (default: skip it, count it and list it in missing_{task}.txt)")
    args, rest = ap.parse_known_args(argv)
    if any(a.split("=", 1)[0] == "--batch_size" for a in rest):  # a setting: it parses, but would pass unread
        print(f"--batch_size is training's batch size, which evaluation does not read; evaluation batches "
              f"--batch-size={args.batch_size} examples", file=sys.stderr)
    cfg = load_config(args.preset, rest + ([f"--data_root={args.data_root}"] if args.data_root else []))
    checkpoint = resolve_checkpoint(cfg, args.checkpoint)  # given, the user's own run, or the preset's release
    if not (checkpoint / "apt.json").is_file():  # checked before anything is generated or loaded
        raise SystemExit(f"{checkpoint}: no trained APT there; train one (python train.py --stage "
                         f"{', '.join(cfg.chain())}, in turn) or pass --checkpoint")
    meta = APT.read_meta(checkpoint)  # a broken description is said before anything loads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    opts = Options(batch_size=args.batch_size, limit=args.limit, episodes=args.episodes, checkpoint=checkpoint,
                   strict=args.strict or cfg.strict_audio,
                   caption=CAPTION | {"num_beams": args.num_beams, "repetition_penalty": args.repetition_penalty,
                                      "max_new_tokens": args.max_new_tokens})
    out = Path(args.out) if args.out else default_out(cfg, checkpoint, given=bool(args.checkpoint))
    if (out.exists() or out.is_symlink()) and not out.is_dir():  # a file, or a link to nothing
        raise SettingError(f"{out}: not a folder; the predictions and metrics need one (--out chooses)")
    out.mkdir(parents=True, exist_ok=True)
    if args.task == "avqa":
        return run_avqa(cfg, checkpoint, opts, out, device)
    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in rest if a.startswith("--")}  # settings typed here
    trained = meta.get("config", {}).get("fewshot_layout")
    if trained and trained != cfg.fewshot_layout and "fewshot_layout" not in given:
        print(f"few-shot episodes laid out as {checkpoint} was trained on them: fewshot_layout={trained} "
              f"(the {cfg.preset} preset's is {cfg.fewshot_layout}; --fewshot_layout chooses)")
        cfg.fewshot_layout = trained
    for key in ("prompt_format", "instruction_bos", "long_audio"):  # the APT's own, whatever the settings say
        if key in given and key in meta and getattr(cfg, key) != meta[key]:
            print(f"--{key}={getattr(cfg, key)} is not used: {checkpoint} is evaluated as it was trained, "
                  f"{key}={meta[key]}")
    ensure_data(cfg)
    ensure_tokenizer(cfg)
    apt = load_apt(cfg, checkpoint, device)
    made = {"checkpoint": str(checkpoint.resolve()), "preset": cfg.preset, "data_root": str(cfg.data_root),
            "limit": args.limit, "episodes": args.episodes, "captioning": opts.caption}
    report, not_run = [], []
    for name in EVALUATIONS if args.task == "all" else [args.task]:
        try:
            examples, rows, outputs, refs = evaluate(name, apt, cfg, opts)
        except (data.DataError, MissingFileError) as e:  # a task's data absent or unusable: with --task all the
            if args.task != "all" or opts.strict:       # others still run, and its row says why
                raise
            (out / f"predictions_{name}.jsonl").unlink(missing_ok=True)  # no earlier run's answers left beside it
            write_metrics(out, name, [("not run", None, None, str(e))], None, made)
            report.append((name, "not run", None, None, str(e)))
            not_run.append(name)
            continue
        rows.append(coverage_row(name, examples, opts.coverage, opts))  # on how many clips; what was lost
        write_results(out, name, examples, rows, outputs, refs, opts.coverage, made)
        report += [(name, *row) for row in rows]
    print_report(report, out)
    if not_run:
        raise SystemExit(f"evaluate.py: {len(not_run)} of {len(EVALUATIONS)} tasks not run ({', '.join(not_run)}): "
                         "their data is missing or unusable (each one's row says why; --strict stops at the first)")


def print_report(report, out: Path, width: int = 32):
    """The table: a task's rows that share a protocol name it once, on the first of them (the metrics JSON names it
    on every row)."""
    print(f"\n{'task':<11} {'metric':<{width}} {'APT':>8} {'baseline':>9}  protocol")
    above = None
    for name, m, v, b, p in report:
        base = "" if b is None else f"{b:9.3f}"
        value = f"{v:8d}" if isinstance(v, int) else "       —" if v is None else f"{v:8.3f}"  # a count, a score
        print(f"{name:<11} {m:<{width}} {value} {base:>9}  {'' if (name, p) == above else p}")
        above = (name, p)
    print(f"\npredictions and metrics written to {out}/")


def run_avqa(cfg, checkpoint: Path, opts: Options, out: Path, device):
    """APT-BLIP-2 on AVQA: the APT plugged, untrained further, into the vision side (a real InstructBLIP with
    --vision_path, else the embedded default's, from `train.py --stage vision`), in the three modes."""
    vision_side(cfg)  # there, before the synthetic videos are made for nothing
    ensure_av_data(cfg)  # the synthetic videos, for the presets that run on them (real data is never touched)
    model = load_apt_blip2(cfg, checkpoint, device)
    coverage = data.Coverage()
    items = data.avqa_items(cfg.data_root, "test", cfg.avqa_frames, opts.strict, coverage=coverage)
    rows, records = eval_avqa(model, items, opts, coverage=coverage)
    rows.append(avqa_coverage_row(records, coverage))
    with open(out / "predictions_avqa.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    made = {"checkpoint": str(checkpoint.resolve()), "preset": cfg.preset, "data_root": str(cfg.data_root),
            "limit": opts.limit, "vision_path": cfg.vision_path, "avqa_frames": cfg.avqa_frames,
            "avqa_blocks_apart": cfg.avqa_blocks_apart}
    write_metrics(out, "avqa", rows, coverage, made)
    print_report([("avqa", *row) for row in rows], out, width=44)


if __name__ == "__main__":
    sys.exit(main())

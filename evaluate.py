"""Evaluate a trained APT on each task with the paper's protocols (§4, Tables 3-6; ../shared/DESIGN.md §7).

    python evaluate.py --task audiocaps                      (the tiny chain's result, on the synthetic benchmark)
    python evaluate.py --task all --limit 200
    python evaluate.py --task esc50 --preset paper --data-root data --checkpoint runs/paper/stage2/final

Tasks: audioset (tagging), audiocaps and clotho (captioning), clotho_aqa, esc50 (few-shot), nlar, sed (query-based
detection), ter (temporal retrieval), count. Each writes predictions (JSON lines: audio, prompt, output, reference) and
metrics (JSON) under --out, and prints a table whose every row names its protocol, beside a trivial baseline computed
on the same data (chance, majority or fixed answer). Any config setting can follow as --key=value.
"""

import argparse
import json
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from apt_min import data, metrics, synth
from apt_min.aligner import Aligner
from apt_min.build import ensure_tokenizer, load_apt
from apt_min.config import load_config
from apt_min.tasks import (
    FEWSHOT_QUERY,
    format_labels,
    label_text,
    normalize_answer,
    parse_count,
    parse_labels,
    parse_segments,
)

TASKS = ("audioset", "audiocaps", "clotho", "clotho_aqa", "esc50", "nlar", "sed", "ter", "count")
SHORT = {"max_new_tokens": 12}  # greedy for short answers
CAPTION = {"max_new_tokens": 40, "num_beams": 5, "repetition_penalty": 1.5}  # the public APT code's decoding


def caption_options(args) -> dict:
    """Captioning's decoding: CAPTION, with the command line's choices."""
    return CAPTION | {"num_beams": args.num_beams, "repetition_penalty": args.repetition_penalty,
                      "max_new_tokens": args.max_new_tokens}


def generate(apt, examples, batch_size, options, desc):
    """Outputs for every example (batched; clips that cannot be read raise, naming the file)."""
    out = []
    for i in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False, dynamic_ncols=True):
        chunk = examples[i:i + batch_size]
        out += apt.generate([ex.segments for ex in chunk], **options)
    return out


def stage0_aligner(cfg, apt):
    """The stage-0 aligner (its text branch scores tagging answers in the paper's protocol), or None."""
    folder = Path(cfg.run_dir) / "stage0" / "final"
    if not (folder / "aligner.json").is_file():
        return None
    return Aligner.load(folder).eval().to(apt.proj.weight.device)


def rows(name, ours, baseline, what):
    return [(name, ours, baseline, what)]


# ---------------------------------------------------------------------------------------------------------- tasks
# Each task: eval_<task> generates the model's answers, score_<task> turns answers into metric rows. The scoring
# functions take plain strings, so they can be checked on hand-worked answers (tests/test_evaluate.py).


def score_tagging(examples, outputs, classes):
    """The generated answer read against the class list: is it exactly the clip's label set?"""
    truth = [frozenset(ex.target["labels"]) for ex in examples]
    exact = np.mean([set(parse_labels(o, classes)) == t for o, t in zip(outputs, truth)])
    fixed = majority(truth)
    return rows("exact label set", exact, np.mean([t == fixed for t in truth]),
                "generated answer parsed against the class list (baseline: the most frequent label set)")


def label_matrix(examples, classes) -> np.ndarray:
    """(clips, classes) bool: which classes each clip carries."""
    return np.array([[c in ex.target["labels"] for c in classes] for ex in examples])


def eval_tagging(apt, cfg, args, examples):
    classes = list(data.read_class_labels(Path(cfg.data_root) / data.LAYOUT["audioset"]["classes"]).values())
    labels = label_matrix(examples, classes)
    outputs = generate(apt, examples, args.batch_size, SHORT | {"max_new_tokens": 40}, "tagging")
    table = []
    chance = metrics.mean_average_precision(np.random.default_rng(0).random(labels.shape), labels)
    aligner, tok = stage0_aligner(cfg, apt), apt.tokenizer
    if aligner is not None:  # (1) the paper's protocol: text embeddings of the answer and of every class name
        with torch.no_grad():
            def embed(texts):
                ids, mask = tok.pad([tok.encode(t, eos=True) for t in texts])
                return aligner.encode_text(ids.to(aligner.temp.device), mask.to(aligner.temp.device))
            scores = (embed(outputs) @ embed([label_text(c) for c in classes]).T).cpu().numpy()
        table += rows("mAP", metrics.mean_average_precision(scores, labels), chance,
                      "paper protocol: answer and class names embedded by the stage-0 aligner's text branch, cosine "
                      "(baseline: random scores)")
    else:
        table += rows("mAP", float("nan"), None, "paper protocol unavailable: no stage-0 aligner in run_dir")
    # (2) LLM likelihood of "This is a sound of {class}." for every class
    scores = np.zeros(labels.shape)
    feats, _ = apt.encode_clips([ex.segments[0][1] for ex in examples], strict=True)
    for i, ex in enumerate(tqdm(examples, desc="tagging likelihood", leave=False, dynamic_ncols=True)):
        prompt = [ex.segments[0], ("text", FEWSHOT_QUERY)]
        scores[i] = apt.choice_logprob(prompt, [f"{label_text(c)}." for c in classes], feats).cpu().numpy()
    table += rows("mAP", metrics.mean_average_precision(scores, labels), chance,
                  'LLM likelihood of "This is a sound of {class}." per class (baseline: random scores)')
    table += score_tagging(examples, outputs, classes)
    return table, outputs, [ex.answer for ex in examples]


def score_captions(examples, outputs, baseline_caption: str, java: bool = True):
    """Corpus BLEU-1..4, ROUGE-L and CIDEr-D against all references of each clip (COCO caption evaluation), the
    baseline giving `baseline_caption` for every clip; METEOR and SPICE (Java) where they can run."""
    refs = [ex.target["references"] for ex in examples]
    base = [baseline_caption] * len(examples)
    table = []
    b, bb = metrics.bleu(refs, outputs), metrics.bleu(refs, base)
    for k in range(4):
        table += rows(f"BLEU-{k + 1}", b[k], bb[k], "corpus BLEU, COCO caption evaluation (baseline: the most "
                      "frequent training caption for every clip)" if k == 0 else "")
    table += rows("ROUGE-L", metrics.rouge_l(refs, outputs), metrics.rouge_l(refs, base), "")
    table += rows("CIDEr-D", metrics.cider_d(refs, outputs), metrics.cider_d(refs, base), "")
    for name, value, why in java_metrics(refs, outputs) if java else []:
        table += rows(name, value, None, why)
    return table


def eval_captioning(apt, cfg, args, examples, source):
    outputs = generate(apt, examples, args.batch_size, caption_options(args), f"captioning ({source})")
    train = data.examples("captioning", cfg.data_root, "train", source=source, rng=random.Random(0))
    fixed = Counter(ex.answer for ex in train).most_common(1)[0][0]  # the most frequent training caption
    return score_captions(examples, outputs, fixed), outputs, [ex.target["references"][0] for ex in examples]


def spice_jars() -> Path | None:
    """Where pycocoevalcap's SPICE looks for the Stanford CoreNLP 3.6.0 jars, when they are not there (None when
    they are). Without them, SPICE would try to download them: we never let it."""
    import pycocoevalcap.spice as spice

    lib = Path(spice.__file__).parent / "lib"
    jars = [lib / f"stanford-corenlp-3.6.0{s}.jar" for s in ("", "-models")]
    return None if all(j.is_file() for j in jars) else lib


def java_metrics(refs, outputs):
    """METEOR and SPICE run in Java through pycocoevalcap where it is installed; SPICE also needs the Stanford
    CoreNLP jars, which are fetched once with `python -m pycocoevalcap.spice.get_stanford_models` on a machine with
    network (evaluation itself never downloads anything). Otherwise each row says why it is absent."""
    if shutil.which("java") is None:
        return [(m, float("nan"), f"{m} unavailable: Java is not installed") for m in ("METEOR", "SPICE")]
    try:
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.spice.spice import Spice
    except ImportError:
        why = "pycocoevalcap is not installed (pip install pycocoevalcap)"
        return [(m, float("nan"), f"{m} unavailable: {why}") for m in ("METEOR", "SPICE")]
    gts = {i: [" ".join(metrics.caption_tokens(r)) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(metrics.caption_tokens(o))] for i, o in enumerate(outputs)}
    out = []
    try:
        out.append(("METEOR", float(Meteor().compute_score(gts, res)[0]), "METEOR 1.5 (Java, pycocoevalcap)"))
    except Exception as e:  # the Java process can fail in many ways; the row says how
        out.append(("METEOR", float("nan"), f"METEOR unavailable: {e}"))
    if spice_jars() is not None:
        out.append(("SPICE", float("nan"), "SPICE unavailable: pycocoevalcap's spice/lib lacks the Stanford CoreNLP "
                    "3.6.0 jars (python -m pycocoevalcap.spice.get_stanford_models fetches them, with network)"))
        return out
    try:
        out.append(("SPICE", float(Spice().compute_score(gts, res)[0]), "SPICE (Java, pycocoevalcap)"))
    except Exception as e:
        out.append(("SPICE", float("nan"), f"SPICE unavailable: {str(e)[:120]}"))
    return out


def majority(answers):
    return Counter(answers).most_common(1)[0][0]


def score_exact(examples, outputs, name):
    """Normalised exact match (AQA, NLAR), beside always giving the most frequent answer; Clotho-AQA also on its
    yes/no questions alone."""
    truth = [ex.target["answer"] for ex in examples]
    hits = [normalize_answer(o) == t for o, t in zip(outputs, truth)]
    fixed = majority(truth)
    table = rows("accuracy", np.mean(hits), np.mean([t == fixed for t in truth]),
                 f"normalised exact match (baseline: always {fixed!r}, the most frequent answer)")
    if name == "clotho_aqa":
        yn = [i for i, t in enumerate(truth) if t in ("yes", "no")]
        if yn:
            fixed = majority([truth[i] for i in yn])
            table += rows("accuracy, yes/no questions", np.mean([hits[i] for i in yn]),
                          np.mean([truth[i] == fixed for i in yn]), f"(baseline: always {fixed!r})")
    return table


def eval_exact(apt, args, examples, name):
    outputs = generate(apt, examples, args.batch_size, SHORT, name)
    return score_exact(examples, outputs, name), outputs, [ex.target["answer"] for ex in examples]


def eval_fewshot(apt, cfg, args):
    pool = data.esc50_pool(cfg.data_root, strict=True)
    table, outputs, refs, shown = [], [], [], []
    for n_way, k_shot in ((5, 5), (12, 5), (4, 1)):
        name = f"accuracy {n_way}-way {k_shot}-shot"
        eligible = sum(len(clips) > k_shot for clips in pool.values())
        if eligible < n_way:
            table += rows(name, float("nan"), 1 / n_way, f"not run: needs {n_way} classes with more than {k_shot} "
                          f"clips; this pool has {eligible}")
            continue
        rng = random.Random(f"esc50/{n_way}/{k_shot}")  # fixed episodes
        episodes = [data.fewshot_episode(pool, n_way, k_shot, rng) for _ in range(args.episodes)]
        got = generate(apt, episodes, max(1, args.batch_size // 4), SHORT, f"{n_way}-way {k_shot}-shot")
        for ep in tqdm(episodes, desc=f"{n_way}-way {k_shot}-shot likelihood", leave=False, dynamic_ncols=True):
            ep.target["ranked"] = rank_labels(apt, ep)  # written beside the generated answer
        table += score_fewshot(episodes, got, name)
        outputs += got
        refs += [ep.answer for ep in episodes]
        shown += episodes
    return shown, (table, outputs, refs)


def score_fewshot(episodes, outputs, name):
    """Accuracy of the episode label each generated answer names, and of the label the LLM ranked first
    (episode.target["ranked"]), beside chance."""
    n_way = len(episodes[0].target["choices"])
    table = rows(name, np.mean([named_label(o, ep) == ep.target["label"] for o, ep in zip(outputs, episodes)]),
                 1 / n_way, f"{len(episodes)} fixed episodes; the answer is the episode label it names "
                 "(baseline: chance)")
    table += rows(f"{name}, ranked", np.mean([ep.target["ranked"] == ep.target["label"] for ep in episodes]),
                  1 / n_way, 'the same episodes; the answer is the label whose "This is a sound of {label}." is '
                  "most likely to the LLM (baseline: chance)")
    return table


def named_label(output: str, episode):
    """The first of the episode's labels the generated answer names, or None."""
    return next(iter(parse_labels(output, episode.target["choices"])), None)


def rank_labels(apt, episode):
    """The episode label the LLM finds most likely after the query: the closed-set protocol, beside generation.
    It asks less of the LLM than naming the label (the candidates are given), but as much of the matching."""
    choices = episode.target["choices"]
    feats, _ = apt.encode_clips([v for k, v in episode.segments if k == "audio"], strict=True)
    scores = apt.choice_logprob(episode.segments, [f"{label_text(c)}." for c in choices], feats)
    return choices[int(scores.argmax())]


def segment_f1(pred, ref, iou=0.5):
    """Matched segments (IoU >= iou, each reference used once) over predicted and over reference segments."""
    matched, used = 0, set()
    for a, b in pred:
        for j, (c, d) in enumerate(ref):
            inter, union = max(0.0, min(b, d) - max(a, c)), max(b, d) - min(a, c)
            if j not in used and union > 0 and inter / union >= iou:
                used.add(j)
                matched += 1
                break
    return matched, len(pred), len(ref)


def score_sed(examples, outputs):
    """Segment F1 at IoU >= 0.5 over all segments of all queries, beside answering the whole clip every time."""
    def f1(preds):
        m, p, r = (sum(x) for x in zip(*[segment_f1(s, ex.target["segments"]) for s, ex in zip(preds, examples)]))
        return 2 * m / (p + r) if p + r else 0.0

    end = max(b for ex in examples for _, b in ex.target["segments"])
    return rows("segment F1", f1([parse_segments(o) for o in outputs]), f1([[(0.0, end)]] * len(examples)),
                "IoU >= 0.5, over all segments (baseline: the whole clip for every query)")


def eval_sed(apt, args, examples):
    outputs = generate(apt, examples, args.batch_size, SHORT | {"max_new_tokens": 40}, "sed")
    return score_sed(examples, outputs), outputs, [ex.answer for ex in examples]


def score_ter(examples, outputs, vocabulary):
    """Exact set of labels: the labels of `vocabulary` (the data set's class names, written as it writes them:
    "Male speech, man speaking", "chirping_birds") that the answer names, against the window's labels."""
    truth = [frozenset(ex.target["labels"]) for ex in examples]
    got = [frozenset(parse_labels(o, vocabulary)) for o in outputs]
    fixed = majority(truth)
    return rows("accuracy", np.mean([g == t for g, t in zip(got, truth)]), np.mean([t == fixed for t in truth]),
                f"exact set of labels (baseline: always {format_labels(sorted(fixed))!r})")


def eval_ter(apt, cfg, args, examples):
    outputs = generate(apt, examples, args.batch_size, SHORT | {"max_new_tokens": 30}, "ter")
    names = data.read_mid_to_name(Path(cfg.data_root) / data.LAYOUT["audioset"]["names"]).values()
    vocabulary = {*names, *(label for ex in examples for label in ex.target["labels"])}
    return score_ter(examples, outputs, vocabulary), outputs, [ex.answer for ex in examples]


def score_count(examples, outputs):
    """Accuracy of the count read from the answer, and its mean absolute error (an unreadable answer counts as 0),
    beside always answering the most frequent count."""
    truth = np.array([ex.target["count"] for ex in examples])
    got = np.array([parse_count(o) if parse_count(o) is not None else -1 for o in outputs])
    fixed = majority(truth.tolist())
    table = rows("accuracy", np.mean(got == truth), np.mean(truth == fixed), f"(baseline: always {fixed})")
    table += rows("mean absolute error", float(np.mean(np.abs(np.where(got < 0, 0, got) - truth))),
                  float(np.mean(np.abs(truth - fixed))), "unreadable answers count as 0 (lower is better)")
    return table


def eval_count(apt, args, examples):
    outputs = generate(apt, examples, args.batch_size, SHORT, "count")
    return score_count(examples, outputs), outputs, [ex.answer for ex in examples]


def evaluate(task, apt, cfg, args):
    root, limit = cfg.data_root, args.limit or None
    if task == "audioset":
        exs = data.examples("tagging", root, "test", strict=True)[:limit]
        return exs, eval_tagging(apt, cfg, args, exs)
    if task in ("audiocaps", "clotho"):
        exs = data.examples("captioning", root, "test", source=task, strict=True)[:limit]
        return exs, eval_captioning(apt, cfg, args, exs, task)
    if task == "clotho_aqa":
        exs = data.examples("aqa", root, "test", strict=True)[:limit]
        return exs, eval_exact(apt, args, exs, task)
    if task == "nlar":
        exs = data.examples("nlar", root, "test", strict=True)[:limit]
        return exs, eval_exact(apt, args, exs, task)
    if task == "esc50":
        return eval_fewshot(apt, cfg, args)
    kind = {"sed": "sed", "ter": "ter", "count": "counting"}[task]
    exs = data.examples(kind, root, "test", strict=True)[:limit]
    if task == "ter":
        return exs, eval_ter(apt, cfg, args, exs)
    return exs, {"sed": eval_sed, "count": eval_count}[task](apt, args, exs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Any setting of apt_min/config.py can follow as --key=value.")
    ap.add_argument("--task", required=True, choices=[*TASKS, "all"])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--data-root", help="a data folder in the real layouts (default: the preset's)")
    ap.add_argument("--checkpoint", help="a trained APT folder (default: {run_dir}/stage2/final)")
    ap.add_argument("--limit", type=int, default=0, help="evaluate at most this many examples per task")
    ap.add_argument("--episodes", type=int, default=100, help="few-shot episodes per setting")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", help="where predictions and metrics go (default: {run_dir}/eval)")
    ap.add_argument("--num-beams", type=int, default=CAPTION["num_beams"], help="captioning beams (APT code: 5)")
    ap.add_argument("--repetition-penalty", type=float, default=CAPTION["repetition_penalty"],
                    help="captioning repetition penalty (APT code: 1.5)")
    ap.add_argument("--max-new-tokens", type=int, default=CAPTION["max_new_tokens"], help="captioning length limit")
    args, rest = ap.parse_known_args(argv)
    try:
        cfg = load_config(args.preset, rest + ([f"--data_root={args.data_root}"] if args.data_root else []))
    except ValueError as e:
        raise SystemExit(f"evaluate.py: {e}") from None
    checkpoint = Path(args.checkpoint or Path(cfg.run_dir) / "stage2" / "final")
    if not (checkpoint / "apt.json").is_file():  # checked before anything is generated or loaded
        raise SystemExit(f"{checkpoint}: no trained APT there; train one (python train.py --stage 0, lm, 1, 2) "
                         "or pass --checkpoint")
    if cfg.preset == "tiny":
        synth.generate(cfg.data_root, cfg.seed, cfg.synth_scale)  # the embedded default, written on first use
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ensure_tokenizer(cfg)
    apt = load_apt(cfg, checkpoint, device)
    out = Path(args.out or Path(cfg.run_dir) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    report = []
    for task in TASKS if args.task == "all" else [args.task]:
        examples, (table, outputs, refs) = evaluate(task, apt, cfg, args)
        with open(out / f"predictions_{task}.jsonl", "w") as f:
            for i, (o, r) in enumerate(zip(outputs, refs)):
                ex = examples[i] if i < len(examples) else None
                record = {"id": i, "output": o, "reference": r}
                if ex is not None:
                    record |= {"ranked": label_text(ex.target["ranked"])} if "ranked" in ex.target else {}
                    record |= {"audio": [v for k, v in ex.segments if k == "audio"],
                               "prompt": " ".join(v for k, v in ex.segments if k == "text")}
                f.write(json.dumps(record) + "\n")
        (out / f"metrics_{task}.json").write_text(json.dumps(
            [{"metric": m, "apt": v, "baseline": b, "protocol": p} for m, v, b, p in table], indent=1))
        report += [(task, *row) for row in table]
    print(f"\n{'task':<11} {'metric':<32} {'APT':>8} {'baseline':>9}  protocol")
    for task, m, v, b, p in report:
        base = "" if b is None else f"{b:9.3f}"
        print(f"{task:<11} {m:<32} {v:8.3f} {base:>9}  {p}")
    print(f"\npredictions and metrics written to {out}/")


if __name__ == "__main__":
    sys.exit(main())

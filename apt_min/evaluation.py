"""Evaluating a trained APT task by task, with the paper's protocols (§4, Tables 3-6), each beside a trivial
baseline computed on the same data.

    EVALUATIONS[name]                    -> (task, its data set's options): what `evaluate.py --task name` runs
    evaluate(name, apt, cfg, opts)       -> (examples, rows, outputs, references)
    rows: (metric, value, baseline, protocol), as apt_min.metrics' task scores give them

Names are the data sets' (audioset, audiocaps, clotho, clotho_aqa, esc50, nlar) or, for the tasks read from
AudioSet's strong labels, the task's (sed, ter, counting). Every task's evaluation has one signature:
`eval_<task>(apt, cfg, name, examples, opts) -> (rows, outputs, references)`. Model output is generated here; turning
it into numbers is apt_min.metrics'. The protocols that need the model are public functions: `text_branch_scores`
(the paper's tagging protocol), `likelihood_scores`, `rank_labels` and `answer_and_rank` (the closed-set protocols;
the last also generates, from the same pass).
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from apt_min import audio, data, metrics
from apt_min.aligner import STAGE0_HEADS, Aligner
from apt_min.config import stage_folder
from apt_min.model import decode_clips
from apt_min.tasks import FEWSHOT_QUERY, label_text

log = logging.getLogger("apt_min")

SHORT = {"max_new_tokens": 12}  # greedy for short answers
CAPTION = {"max_new_tokens": 40, "num_beams": 5, "repetition_penalty": 1.5}  # the public APT code's decoding
FEWSHOT_SETTINGS = ((5, 5), (12, 5), (4, 1))  # (ways, shots): ESC-50 in the paper's Table 5, and stage 2's own


def progress(items, desc: str):
    """A progress bar on a terminal; none where output is not one (a notebook, a log file, CI)."""
    return tqdm(items, desc=desc, leave=False, dynamic_ncols=True, disable=None)


@dataclass
class Options:
    batch_size: int = 16
    limit: int = 0  # at most this many test examples per task (0: all)
    episodes: int = 100  # few-shot episodes per setting
    caption: dict = field(default_factory=lambda: dict(CAPTION))  # captioning's decoding
    checkpoint: Path | None = None  # the APT evaluated; the stage-0 aligner is looked for in its run folder
    coverage: data.Coverage | None = None  # set by evaluate: what the last evaluation's data listed and lost
    pools: list | None = None  # set by examples_for: the few-shot pools its episodes were drawn from (fewshot_pools)
    strict: bool = False  # a listed clip that is missing or unreadable raises, instead of being skipped and counted


def generate(apt, examples, options: dict, batch_size: int = 16, desc: str = "generating") -> list[str]:
    """The model's answer to every example, in batches (a clip that cannot be read raises, naming the file)."""
    out = []
    for i in progress(range(0, len(examples), batch_size), desc):
        out += apt.generate([ex.segments for ex in examples[i:i + batch_size]], **options)
    return out


# ------------------------------------------------------------------------------------- protocols needing the model


def prototype_label(episode, feats: dict) -> str:
    """A prototypical network (Snell et al., 2017) on the frozen encoder, the few-shot experts' kind of baseline
    (paper Table 5): each clip is its features max-pooled over windows and patches (a mean is dominated by the
    background that fills most of a clip: on the synthetic novel classes it scores at chance); each label's
    prototype is the mean of its support clips'; the query takes the label of the nearest prototype (Euclidean).
    Nothing trains."""
    def pooled(path):
        return feats[path].float().amax((0, 1))
    support = {}
    for path, label in episode.target["support"]:
        support.setdefault(label, []).append(pooled(path))
    labels = list(support)
    prototypes = torch.stack([torch.stack(support[label]).mean(0) for label in labels])  # (ways, D)
    distances = (prototypes - pooled(episode.target["query"])).pow(2).sum(-1)
    return labels[int(distances.argmin())]


def stage0_aligner(checkpoint: Path, device, words: torch.Tensor | None = None) -> Aligner | None:
    """The stage-0 aligner of the run that `checkpoint` (run/stageN/final) belongs to, or for a continuation run
    (--start_from) of the run it continued (release.history follows it back), or None: none there, one that is not
    the APT's own (same_stage0_heads), or a release, which stands alone (its stage-0 heads are dropped). `words`:
    the LLM's embedding table, for an aligner that reads its words there (aligner_words=llm)."""
    from apt_min.release import history

    checkpoint = Path(checkpoint)
    folder = checkpoint.resolve().parent.parent / stage_folder("0") / "final"
    if not (folder / "aligner.json").is_file() and not (checkpoint / "SHA256SUMS").is_file():
        made = history(checkpoint)
        if made and made[0]["stage"] == "0":
            folder = Path(made[0]["run_dir"]) / stage_folder("0") / "final"
    if not (folder / "aligner.json").is_file():
        return None
    aligner = Aligner.load(folder).eval().to(device)
    if not same_stage0_heads(checkpoint, aligner):  # stage 0 run again there since, or another run's folder now
        log.warning("%s: the stage-0 aligner in %s is not the one this APT was trained from (its stage-0 heads "
                    "differ); the paper's tagging protocol is not run", checkpoint, folder)
        return None
    if aligner.config.llm_words and words is not None:
        aligner.attach_llm_words(words)
    return aligner


def same_stage0_heads(checkpoint: Path, aligner: Aligner) -> bool:
    """Whether `aligner` is the stage-0 aligner the APT in `checkpoint` was trained from: stages 1 and 2 leave the
    stage-0 heads (aligner.STAGE0_HEADS: the contrastive projections, temperature, matching and caption heads) as
    stage 0 made them, so they must be equal. A continuation of a release never is (a release drops them)."""
    from safetensors import safe_open

    own = {k: p for k, p in aligner.named_parameters() if k.startswith(STAGE0_HEADS)}
    with safe_open(str(checkpoint / "apt.safetensors"), "pt") as f:
        saved = set(f.keys())
        heads = [k for k in own if f"aligner.{k}" in saved]
        return bool(heads) and all(torch.equal(f.get_tensor(f"aligner.{k}").float(), own[k].detach().float().cpu())
                                   for k in heads)


@torch.no_grad()
def text_branch_scores(aligner: Aligner, tokenizer, answers: list[str], classes: list[str]) -> np.ndarray:
    """The paper's tagging protocol (§4.2): the generated answer and every class name embedded by the stage-0
    aligner's text branch; a class's score is the cosine of the two. (answers, classes)."""
    def embed(texts):
        ids, mask = tokenizer.pad([tokenizer.encode(t, eos=True) for t in texts])
        return aligner.encode_text(ids.to(aligner.temp.device), mask.to(aligner.temp.device))
    return (embed(answers) @ embed([label_text(c) for c in classes]).T).cpu().numpy()


def likelihood_scores(apt, examples, classes: list[str]) -> np.ndarray:
    """The closed-set protocol: a class's score for a clip is the LLM's log-likelihood of "This is a sound of
    {class}." after the clip. (examples, classes)."""
    scores = np.zeros((len(examples), len(classes)))
    feats, _ = apt.encode_clips([ex.segments[0][1] for ex in examples], strict=True)
    for i, ex in enumerate(progress(examples, "tagging likelihood")):
        prompt = [ex.segments[0], ("text", FEWSHOT_QUERY)]
        scores[i] = apt.choice_logprob(prompt, [f"{label_text(c)}." for c in classes], feats).cpu().numpy()
    return scores


def rank_labels(apt, episode) -> str:
    """The episode label the LLM finds most likely after the query: the closed-set protocol, beside generation.
    It asks less of the LLM than naming the label (the candidates are given), but as much of the matching."""
    choices = episode.target["choices"]
    feats, _ = apt.encode_clips(data.clips_of([episode]), strict=True)
    scores = apt.choice_logprob(episode.segments, [f"{label_text(c)}." for c in choices], feats)
    return choices[int(scores.argmax())]


def answer_and_rank(apt, episode, feats) -> str:
    """The episode's generated answer (greedy, as generate gives it); the label the LLM ranks first is written
    into episode.target["ranked"]. One pass of the episode's prompt serves both."""
    choices = episode.target["choices"]
    said, scores = apt.answer_and_rank(episode.segments, [f"{label_text(c)}." for c in choices], feats,
                                       SHORT["max_new_tokens"])
    episode.target["ranked"] = choices[int(scores.argmax())]
    return said


def java_missing() -> str | None:
    """Why METEOR and SPICE cannot run here at all (None when Java and pycocoevalcap are there)."""
    if shutil.which("java") is None:
        return "Java is not installed"
    try:
        import pycocoevalcap.meteor  # noqa: F401
        import pycocoevalcap.spice  # noqa: F401
    except ImportError:
        return "pycocoevalcap is not installed (pip install pycocoevalcap)"
    return None


def spice_missing() -> str | None:
    """Why SPICE cannot run here (None when it can): besides Java and pycocoevalcap it needs the Stanford CoreNLP
    3.6.0 jars in pycocoevalcap's spice/lib, which it would otherwise try to download: we never let it."""
    if why := java_missing():
        return why
    import pycocoevalcap.spice as spice

    lib = Path(spice.__file__).parent / "lib"
    if all((lib / f"stanford-corenlp-3.6.0{s}.jar").is_file() for s in ("", "-models")):
        return None
    return ("pycocoevalcap's spice/lib lacks the Stanford CoreNLP 3.6.0 jars (python -m "
            "pycocoevalcap.spice.get_stanford_models fetches them, with network)")


def java_metrics(refs, outputs):
    """METEOR and SPICE run in Java through pycocoevalcap where it is installed; SPICE also needs the Stanford
    CoreNLP jars, which are fetched once with `python -m pycocoevalcap.spice.get_stanford_models` on a machine with
    network (evaluation itself never downloads anything). Otherwise each row says why it is absent."""
    if why := java_missing():
        return [(m, float("nan"), None, f"{m} unavailable: {why}") for m in ("METEOR", "SPICE")]
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.spice.spice import Spice

    gts = {i: [" ".join(metrics.caption_tokens(r)) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(metrics.caption_tokens(o))] for i, o in enumerate(outputs)}
    out = []
    try:
        out.append(("METEOR", float(Meteor().compute_score(gts, res)[0]), None, "METEOR 1.5 (Java, pycocoevalcap)"))
    except Exception as e:  # the Java process can fail in many ways; the row says how
        out.append(failed_row("METEOR", e))
    if (why := spice_missing()) is not None:
        out.append(("SPICE", float("nan"), None, f"SPICE unavailable: {why}"))
        return out
    try:
        out.append(("SPICE", float(Spice().compute_score(gts, res)[0]), None, "SPICE (Java, pycocoevalcap)"))
    except Exception as e:
        out.append(failed_row("SPICE", e))
    return out


def failed_row(metric: str, error: Exception) -> tuple:
    """A NaN row whose protocol says why the Java run failed: the error's start, 120 characters at most (a Java
    traceback would fill the table), or its type where it has no message."""
    return metric, float("nan"), None, f"{metric} unavailable: {str(error)[:120] or type(error).__name__}"


# ---------------------------------------------------------------------------------------------------------- tasks


def audioset_classes(cfg) -> list[str]:
    root = Path(cfg.data_root)
    return list(data.read_class_labels(root / data.layout_of(root)["audioset"]["classes"]).values())


def eval_tagging(apt, cfg, name, examples, opts):
    classes = audioset_classes(cfg)
    labels = metrics.label_matrix(examples, classes)
    outputs = generate(apt, examples, SHORT | {"max_new_tokens": 40}, opts.batch_size, "tagging")
    chance = metrics.mean_average_precision(np.random.default_rng(0).random(labels.shape), labels)
    aligner = (stage0_aligner(opts.checkpoint, apt.proj.weight.device, apt.llm.model.embed_tokens.weight)
               if opts.checkpoint else None)
    if aligner is not None:
        scores = text_branch_scores(aligner, apt.tokenizer, outputs, classes)
        rows = [("mAP", metrics.mean_average_precision(scores, labels), chance,
                 "paper protocol: answer and class names embedded by the stage-0 aligner's text branch, cosine "
                 "(baseline: random scores)")]
    else:
        rows = [("mAP", float("nan"), None, "paper protocol unavailable: no stage-0 aligner of the checkpoint's run "
                 "(none in its run folder or the run it continued, or one another stage 0 wrote since)")]
    rows += [("mAP", metrics.mean_average_precision(likelihood_scores(apt, examples, classes), labels), chance,
              'LLM likelihood of "This is a sound of {class}." per class (baseline: random scores)')]
    rows += metrics.score_tagging(examples, outputs, classes)
    return rows, outputs, [ex.answer for ex in examples]


def eval_captioning(apt, cfg, name, examples, opts):
    # the baseline, the most frequent training caption, read first: a missing training file is told before generating
    fixed = metrics.majority(data.caption_texts(cfg.data_root, "train", name))
    outputs = generate(apt, examples, opts.caption, opts.batch_size, f"captioning ({name})")
    rows = metrics.score_captions(examples, outputs, fixed)
    rows += java_metrics([ex.target["references"] for ex in examples], outputs)
    rows += metrics.spider(rows)
    return rows, outputs, [ex.target["references"][0] for ex in examples]


def eval_exact(apt, cfg, name, examples, opts):
    """AQA and NLAR: a short answer, scored by normalised exact match."""
    outputs = generate(apt, examples, SHORT, opts.batch_size, name)
    rows = metrics.score_exact(examples, outputs, yes_no=name == "clotho_aqa", always="yes" if name == "nlar" else None)
    return rows, outputs, [ex.target["answer"] for ex in examples]


def eval_fewshot(apt, cfg, name, episodes, opts):
    """Each setting's episodes (examples carry target["setting"] = (classes, ways, shots), classes "novel" or
    "training"): the label the generated answer names, the label the LLM ranks first (written into each episode's
    target as "ranked") and a prototypical network's answer on the same episodes."""
    rows, outputs = [], []
    for classes, pool in opts.pools:  # as examples_for read them: missing clips skipped (or, strict, an error)
        for n_way, k_shot in FEWSHOT_SETTINGS:
            setting = f"accuracy {n_way}-way {k_shot}-shot" + (", training classes" if classes == "training" else "")
            eps = [ep for ep in episodes if ep.target["setting"] == (classes, n_way, k_shot)]
            if not eps:
                why = (f"needs {n_way} classes with more than {k_shot} clips; this pool has "
                       f"{eligible_classes(pool, k_shot)}" if eligible_classes(pool, k_shot) < n_way else
                       "every episode held a clip that could not be decoded (missing_esc50.txt lists them)")
                rows += [(setting, float("nan"), 1 / n_way, f"not run: {why}")]
                continue
            feats, _ = apt.encode_clips(data.clips_of(eps), strict=True)
            got = [answer_and_rank(apt, ep, feats) for ep in progress(eps, f"{n_way}-way {k_shot}-shot {classes}")]
            for ep in eps:
                ep.target["prototype"] = prototype_label(ep, feats)
            rows += metrics.score_fewshot(eps, got, setting)
            outputs += got
    return rows, outputs, [ep.answer for ep in episodes]


def eval_sed(apt, cfg, name, examples, opts):
    # room for every segment: an event heard four times is about 44 tokens; real strong labels hold more
    outputs = generate(apt, examples, SHORT | {"max_new_tokens": 96}, opts.batch_size, "sed")
    durations = {path: audio.duration(path) for path in {ex.segments[0][1] for ex in examples}}
    return (metrics.score_sed(examples, outputs, [durations[ex.segments[0][1]] for ex in examples]), outputs,
            [ex.answer for ex in examples])


def eval_ter(apt, cfg, name, examples, opts):
    outputs = generate(apt, examples, SHORT | {"max_new_tokens": 30}, opts.batch_size, "ter")
    root = Path(cfg.data_root)
    names = data.read_mid_to_name(root / data.layout_of(root)["audioset"]["names"]).values()
    vocabulary = {*names, *(label for ex in examples for label in ex.target["labels"])}
    return metrics.score_ter(examples, outputs, vocabulary), outputs, [ex.answer for ex in examples]


def eval_counting(apt, cfg, name, examples, opts):
    outputs = generate(apt, examples, SHORT, opts.batch_size, "counting")
    return metrics.score_counting(examples, outputs), outputs, [ex.answer for ex in examples]


EVALUATIONS = {  # name -> (task, options of data.examples)
    "audioset": ("tagging", {}),
    "audiocaps": ("captioning", {"source": "audiocaps"}),
    "clotho": ("captioning", {"source": "clotho"}),
    "clotho_aqa": ("aqa", {}),
    "esc50": ("fewshot", {}),
    "nlar": ("nlar", {}),
    "sed": ("sed", {}),
    "ter": ("ter", {}),
    "counting": ("counting", {}),
}
EVALUATORS = {"tagging": eval_tagging, "captioning": eval_captioning, "aqa": eval_exact, "nlar": eval_exact,
              "fewshot": eval_fewshot, "sed": eval_sed, "ter": eval_ter, "counting": eval_counting}


def eval_avqa(model, items: list[dict], opts: Options, modes=None, coverage: data.Coverage | None = None):
    """AVQA (paper §4.4, Table 7) with APT-BLIP-2 (blip2.APTBLIP2): four-way accuracy in each mode (audio-visual,
    video only, audio only) by three protocols: the option the model names after AVQA's prompt (the paper's), the
    likeliest option's text after that prompt, and the likeliest after the question alone (cloze: the options not
    listed, for an LLM too small to read an option list); beside the fixed-answer baseline (always the most frequent
    answer position; chance is 0.25); whether audio + video beats each sense alone beyond luck (the exact McNemar
    test's p on the questions one gets right and the other wrong); and both likelihoods by what each question
    needs (AVQA's question_relation; the synthetic set's Both / View / Sound). A video whose clip or a frame cannot
    be decoded is skipped and recorded in `coverage` (opts.strict: an error; `avqa_coverage_row` says how many
    were scored and lost).
    Returns (rows, records)."""
    from apt_min.blip2 import MODES
    from apt_min.vision import ImageError

    modes, coverage = list(modes or MODES), coverage or data.Coverage()
    items = items[:opts.limit] if opts.limit else items
    bad = unreadable(model.apt, [it["audio"] for it in items], opts.strict)
    coverage.unreadable |= bad
    records = []
    for item in progress([it for it in items if it["audio"] not in bad], "avqa"):
        try:
            pixels = torch.stack([model.blip.processing(f) for f in item["frames"]])
        except ImageError as e:
            if opts.strict:
                raise
            coverage.unreadable[str(Path(item["frames"][0]).parent)] = str(e)
            continue
        answers = model.answer(item["question"], item["options"], modes, pixels, item["audio"])
        records.append({"video_name": item["video"], "question": item["question"], "options": item["options"],
                        "answer": item["answer"], "relation": item["relation"],
                        **{m: {"said": a.said, "named": a.named, "ranked": int(a.scores.argmax()),
                               "cloze": int(a.cloze.argmax())} for m, a in answers.items()}})
    if not records:
        raise data.DataError(f"avqa: nothing to score: of the {len(coverage.listed)} videos listed, "
                             f"{len(coverage.missing)} lack their frames or audio and {len(coverage.unreadable)} "
                             f"cannot be decoded (e.g. {coverage.lines()[:2]})")
    positions = [r["answer"] for r in records]
    fixed = metrics.majority(positions)  # the most frequent position (the first seen among equals)
    baseline = sum(p == fixed for p in positions) / len(records)
    hows = {"named": "option named", "ranked": "option likelihood", "cloze": "cloze likelihood"}
    rows, protocol = [], f"4-way accuracy over {len(records)} questions (baseline: always option {fixed})"
    for mode in modes:
        for key, how in hows.items():
            acc = sum(r[mode][key] == r["answer"] for r in records) / len(records)
            rows.append((f"{mode}, {how}", acc, baseline, protocol))
    for other in [m for m in ("video", "audio") if "audio-visual" in modes and m in modes]:
        for key, how in hows.items():  # is audio + video better than one sense alone, beyond luck?
            b = sum(r["audio-visual"][key] == r["answer"] != r[other][key] for r in records)
            c = sum(r[other][key] == r["answer"] != r["audio-visual"][key] for r in records)
            rows.append((f"audio-visual vs {other}, {how}: p", metrics.mcnemar_exact(b, c), None,
                         f"exact two-sided McNemar test: right with audio + video only {b}, with {other} only {c}"))
    protocol = "questions that need the picture and the sound (Both), the picture (View), the sound (Sound)"
    for key in ("ranked", "cloze"):
        for relation in sorted({r["relation"] for r in records} - {""}):
            part = [r for r in records if r["relation"] == relation]
            for mode in modes:
                acc = sum(r[mode][key] == r["answer"] for r in part) / len(part)
                rows.append((f"{mode}, {hows[key]}, {relation} ({len(part)})", acc, None, protocol))
    return rows, records


def avqa_coverage_row(records, coverage: data.Coverage) -> tuple:
    """("videos scored", how many videos the scored questions are on, None, what the test data listed and lost)."""
    videos = len({r["video_name"] for r in records})
    lost = len(coverage.missing) + len(coverage.unreadable)
    return ("videos scored", videos, None, f"{len(records)} questions on {videos} videos; the test data lists "
            f"{len(coverage.listed)} videos' clips or frames: {len(coverage.missing)} missing, "
            f"{len(coverage.unreadable)} unreadable" + (" (listed in missing_avqa.txt)" if lost else ""))


def eligible_classes(pool: dict, k_shot: int) -> int:
    """How many classes of a few-shot pool can give K supports and a query."""
    return len(data.fillable_classes(pool, k_shot))


def fewshot_pools(cfg, strict: bool = True, coverage: data.Coverage | None = None) -> list[tuple[str, dict]]:
    """The clips few-shot episodes are drawn from, by class: ESC-50's (the paper's Table 5; on the synthetic benchmark
    twelve classes never trained on; on the real sets all of ESC-50's clips, its 50 classes under its own names, which
    WavCaps' blacklist keeps out of its FreeSound subset) and held-out test clips of the training classes under their
    real names (where recognising the class can answer, as a reference for how much of the novel-class score matching
    must earn)."""
    return [("novel", data.esc50_pool(cfg.data_root, strict=strict, coverage=coverage)),
            ("training", data.single_label_pool(cfg.data_root, "test", strict=strict, coverage=coverage))]


def examples_for(name, cfg, opts, coverage: data.Coverage | None = None) -> list:
    """The test split of an evaluation (clips not on disk skipped and recorded in `coverage`, or with opts.strict an
    error); for few-shot, fixed episodes of every setting each pool allows."""
    task, options = EVALUATIONS[name]
    if task != "fewshot":
        found = data.examples(task, cfg.data_root, "test", strict=opts.strict, coverage=coverage, **options)
        return found[:opts.limit or None]
    episodes, opts.pools = [], fewshot_pools(cfg, opts.strict, coverage)
    for classes, pool in opts.pools:
        for n_way, k_shot in FEWSHOT_SETTINGS:
            if eligible_classes(pool, k_shot) >= n_way:
                # fixed episodes (the novel classes' seed string as it has always been, so earlier results compare)
                rng = random.Random(f"esc50/{n_way}/{k_shot}" + ("/training" if classes == "training" else ""))
                for _ in range(opts.episodes):
                    ep = data.fewshot_episode(pool, n_way, k_shot, rng, layout=cfg.fewshot_layout)
                    ep.target["setting"] = (classes, n_way, k_shot)
                    episodes.append(ep)
    return episodes


def unreadable(apt, paths, strict: bool = False, chunk: int = 64) -> dict:
    """{path: why} for the clips that cannot be decoded (strict: the first one raises, naming the file). With a
    feature cache the clips are encoded here and their features kept, so scoring reads them; without one
    (feature_cache=off) they are only decoded here, and encoded once, when scored."""
    bad, kept, paths = {}, apt.cache is not None, list(dict.fromkeys(paths))  # a clip of several questions: once
    for i in range(0, len(paths), chunk):
        some = paths[i:i + chunk]
        bad |= dict((apt.encode_clips(some, strict) if kept else
                     decode_clips(some, apt.encoder.config, strict, apt.read_ahead))[1])
    return bad


def readable(apt, examples, coverage: data.Coverage, strict: bool = False) -> list:
    """The examples whose every clip decodes; the clips that do not are recorded in `coverage` with why, and their
    examples dropped (strict: the first one raises, naming the file)."""
    bad = unreadable(apt, data.clips_of(examples), strict)
    coverage.unreadable |= bad
    return [ex for ex in examples if not any(v in bad for k, v in ex.segments if k == "audio")]


def coverage_row(name, examples, coverage: data.Coverage, opts: Options) -> tuple:
    """("clips scored", how many distinct clips the scored examples hold, None, what the split listed and what of it
    was missing or unreadable, and where those are listed)."""
    lost, scored = len(coverage.missing) + len(coverage.unreadable), len(data.clips_of(examples))
    text = (f"scored on {scored} clips; the test data lists {len(coverage.listed)}: "
            f"{len(coverage.missing)} missing, {len(coverage.unreadable)} unreadable")
    text += f" (listed in missing_{name}.txt)" if lost else ""
    unused = len(coverage.listed) - lost - scored  # few-shot: the fixed episodes need not draw every clip
    text += f"; {unused} drawn into no episode" if unused > 0 and EVALUATIONS[name][0] == "fewshot" else ""
    text += "; --limit took the first examples" if opts.limit and EVALUATIONS[name][0] != "fewshot" else ""
    return ("clips scored", scored, None, text)


def evaluate(name, apt, cfg, opts: Options):
    """One evaluation: (examples, rows, outputs, references). Clips that are missing or cannot be decoded are
    skipped (opts.strict: an error) and counted in `opts.coverage` (evaluate.py adds its `coverage_row` to the
    table). Nothing left to score is an error naming the data."""
    coverage = data.Coverage()
    examples = readable(apt, examples_for(name, cfg, opts, coverage), coverage, opts.strict)
    opts.coverage = coverage
    if not examples:
        raise data.DataError(f"{name}: nothing to score under {cfg.data_root}: of the {len(coverage.listed)} clips "
                             f"its test data lists, {len(coverage.missing)} are missing and {len(coverage.unreadable)} "
                             f"unreadable (e.g. {coverage.lines()[:2]})")
    rows, outputs, refs = EVALUATORS[EVALUATIONS[name][0]](apt, cfg, name, examples, opts)
    return examples, rows, outputs, refs

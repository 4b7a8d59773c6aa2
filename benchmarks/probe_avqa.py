"""What each side of APT-BLIP-2 tells the LLM, before any multiple choice: where the objects a video shows, or the
sounds it holds, rank among all 24 names the LLM could say.

For each synthetic AVQA video (`apt_min/synth_av.py`), every name of the training classes is scored as the whole
answer (its log-likelihood after the prompt, EOS not counted), and the ranks of the heard objects (audio only: the
APT) and of the pictured objects (video only: the vision side) are averaged; chance is 11.5 (0 = first). Three
prompts: the APT's tagging prompt (or "What objects are in the picture?" for the pictures), the question alone
("Which object can be heard?" / "... seen?"), and AVQA's prompt with its four options listed. A side that ranks its
objects well after the first two but not after the third carries what the question needs, and loses it to the
option list (the tiny stand-in LLM never read one: README, Results, APT-BLIP-2).

Then whether the LLM combines the two sides, on the questions that need both ("Which object in the picture is making a
sound?", asked alone: cloze). Their four options are the answer (pictured and heard), an object only pictured, one
only heard and one neither, so the likeliest option says what the LLM followed: a side that it reads picks a pictured
(or heard) option far above half the time; combining both picks the answer. Each mode's rates of a pictured, a heard
and the right option, for video only, audio only, audio + video in AVQA's order and reversed, and with another video's
picture or sound put first (the LLM told of two clips or two pictures, the question not saying which).

Third, what the picture does to the sound: on 75 questions of each kind (cloze), how often the right option is the
likeliest with the sound alone, the picture alone, both (in AVQA's order, with the preset's attention), both with the
picture cut to one frame or its prompts halved, the sound after a picture that says nothing (the mean of all the
questions' visual prompts), each block named in the text before it, and the picture after the sound. On questions
only the sound answers, none of the options is pictured, so a picture that costs accuracy there does so by drowning
the sound, not by pointing elsewhere.

Fourth, the most any two sides could give the LLM: each question's pictured and heard objects told in words before
it (no soft prompts; "The picture shows a bell and a drum. The sound is of a drum and a hiss.", or as lists, "Seen:
bell, drum. Heard: drum, hiss."), all questions, the question alone (cloze) and AVQA's prompt: what the LLM itself
makes of both senses' content, a ceiling for audio + video over each sense alone (exact McNemar p of both against
each).

    python benchmarks/probe_avqa.py [--preset small] [--videos 60] [--both 150] [--each 75] [--parts 1,2,3,4]
                                    [--key=value ...]
    (after --stage vision; 3 min for tiny on 2 cores, 10-15 for small, the fourth part 9 more)
"""

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from apt_min import data, metrics, synth, tasks
from apt_min.blip2 import avqa_prompt
from apt_min.build import load_apt_blip2
from apt_min.config import load_config
from apt_min.errors import clean_exit
from apt_min.release import resolve_checkpoint


def mean_rank(apt, segments, feats, names, wanted) -> list[int]:
    scores = apt.choice_logprob(segments, names, feats)
    order = [names[i] for i in scores.argsort(descending=True)]
    return [order.index(n) for n in wanted]


@clean_exit("probe_avqa.py")
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--videos", type=int, default=60)
    ap.add_argument("--both", type=int, default=150, help="questions that need both senses, for the second part")
    ap.add_argument("--each", type=int, default=75, help="questions of each kind, for the third part")
    ap.add_argument("--parts", default="1,2,3", help="which parts to run, of 1, 2, 3 and 4")
    ap.add_argument("--checkpoint", help="another APT (with --encoder_checkpoint=... where it needs another encoder); "
                                         "default: the preset's run, else its release")
    args, rest = ap.parse_known_args()
    parts = {p.strip() for p in args.parts.split(",")}
    if not parts or not parts <= {"1", "2", "3", "4"}:
        raise SystemExit(f"--parts={args.parts}: name parts 1, 2, 3 and 4, separated by commas")
    cfg = load_config(args.preset, rest)  # any setting as --key=value (--run_dir=... probes another run)
    model = load_apt_blip2(cfg, resolve_checkpoint(cfg, args.checkpoint))
    truth = {q["video_name"]: q for q in json.loads((Path(cfg.data_root) / "avqa" / "val_qa.json").read_text())}
    every = data.avqa_items(cfg.data_root, "test", cfg.avqa_frames, True)
    if "1" in parts:
        first_part(model, every[:args.videos], truth, args.preset)
    if "2" in parts:
        both = [i for i in every if i["relation"] == "Both"]
        rates = sides_followed(model, both[:args.both], truth)
        print(f"questions that need both, asked alone ({min(len(both), args.both)}): how often the likeliest option "
              f"is pictured, heard, right (chance 0.50, 0.50, 0.25)")
        for mode, (pictured, heard, right) in rates.items():
            print(f"  {mode:<27} pictured {pictured:.3f}  heard {heard:.3f}  right {right:.3f}")
    if "3" in parts:
        kinds = {k: [i for i in every if i["relation"] == k][:args.each] for k in ("Sound", "Both", "View")}
        kinds = {k: v for k, v in kinds.items() if v}  # a kind the data has no question of is left out
        if not kinds:
            raise SystemExit("the third part needs questions with a relation (Sound, Both, View); these have none")
        right = picture_and_sound(model, kinds, model.blip.qformer.config.num_queries)
        print("right, asked alone (cloze; chance 0.25): " + "  ".join(f"{k} ({len(v)})" for k, v in kinds.items()))
        for variant, rates in right.items():
            print(f"  {variant:<42} " + "  ".join(f"{rates[k]:.3f}" for k in kinds))
    if "4" in parts:
        print(f"each question's objects told in words, all {len(every)} questions: right overall and by what the "
              f"question needs; exact McNemar p of both senses against each alone")
        masks = {k: np.array([i["relation"] == k for i in every]) for k in sorted({i["relation"] for i in every})}
        for phrasing in WORDS:
            for listed in (False, True):
                right = told_in_words(model, every, truth, phrasing, listed)
                p = {m: metrics.mcnemar_exact(sum(right["both"] & ~right[m]), sum(right[m] & ~right["both"]))
                     for m in ("picture", "sound")}
                print(f"  {phrasing}, {'AVQA prompt' if listed else 'cloze'}: " + "  ".join(
                    f"{m} {right[m].mean():.3f}" for m in ("picture", "sound", "both")) +
                    f"  (p against the picture {p['picture']:.3f}, the sound {p['sound']:.3f})")
                for kind, at in masks.items():
                    print(f"    {kind:<6} ({at.sum()}) " + "  ".join(f"{m} {right[m][at].mean():.3f}" for m in right))


def first_part(model, items, truth, preset: str):
    """The first part (module docstring): the heard and the pictured objects' mean rank among all names, printed."""
    apt, names = model.apt, [c.name for c in synth.TRAIN_CLASSES]
    heard_prompts = {"tagging prompt": tasks.prompt("tagging", random.Random(0)),
                     "question alone": "Which object can be heard?", "AVQA's prompt": None}
    seen_prompts = {"tagging prompt": "What objects are in the picture?",
                    "question alone": "Which object can be seen?", "AVQA's prompt": None}
    ranks = {(side, k): [] for side in ("heard", "pictured") for k in heard_prompts}
    with torch.no_grad():
        for item in items:
            video = truth[item["video"]]
            feats = apt.encode_clips([item["audio"]], strict=True)[0]
            pixels = frames(model, item)
            for k in heard_prompts:
                prompt = heard_prompts[k] or avqa_prompt(item["question"], item["options"])
                ranks["heard", k] += mean_rank(apt, [("audio", item["audio"]), ("text", prompt)], feats, names,
                                               video["heard"])
                prompt = seen_prompts[k] or avqa_prompt(item["question"], item["options"])
                visual = model.blip.frame_prompts(pixels, prompt)
                ranks["pictured", k] += mean_rank(apt, [("prompts", visual), ("text", prompt)], {}, names,
                                                  video["pictured"])
    print(f"{preset}: mean rank among {len(names)} names (0 = first; chance {(len(names) - 1) / 2}), "
          f"{len(items)} videos")
    for (side, k), r in ranks.items():
        print(f"  {side:<9} objects, {k:<15} {np.mean(r):5.2f}")


MIXES = {"video only": "V", "audio only": "A", "audio + video": "VA", "video after audio": "AV",
         "audio after another video": "vA", "video after another video": "vV",
         "audio after another clip": "aA", "video after another clip": "aV"}  # v, a: the previous question's


def sides_followed(model, items, truth) -> dict[str, np.ndarray]:
    """The second part (module docstring): {mode: [how often the likeliest option is pictured, heard, right]} over
    `items`, questions that need both senses (data.avqa_items); truth: val_qa.json's records by video name."""
    apt, picks = model.apt, {m: np.zeros(3) for m in MIXES}
    with torch.no_grad():
        prev = items[-1]
        for item in items:
            video, q = truth[item["video"]], item["question"]
            feats = apt.encode_clips([item["audio"], prev["audio"]], strict=True)[0]
            parts = {"V": ("prompts", model.blip.frame_prompts(frames(model, item), q)), "A": ("audio", item["audio"]),
                     "v": ("prompts", model.blip.frame_prompts(frames(model, prev), q)), "a": ("audio", prev["audio"])}
            for mode, code in MIXES.items():
                scores = apt.choice_logprob([parts[c] for c in code] + [("text", q)], item["options"], feats,
                                            model.blocks_apart)
                said = item["options"][int(scores.argmax())]
                right = item["options"][item["answer"]]
                picks[mode] += [said in video["pictured"], said in video["heard"], said == right]
            prev = item
    return {mode: counts / len(items) for mode, counts in picks.items()}


def picture_and_sound(model, kinds: dict[str, list], per_frame: int) -> dict[str, dict[str, float]]:
    """The third part (module docstring): {variant: {kind: how often the right option is the likeliest}}, each
    question asked alone (cloze); kinds: {relation: data.avqa_items}; per_frame: visual prompts per frame."""
    apt, asked = model.apt, [(kind, item) for kind, items in kinds.items() for item in items]
    with torch.no_grad():  # each question's own (the visual aligner reads the question)
        seen = [model.blip.frame_prompts(frames(model, item), item["question"]) for _, item in asked]
    full = max(len(v) for v in seen)  # a video with fewer frames extracted than asked for has fewer prompts
    blank = torch.stack([v for v in seen if len(v) == full]).mean(0)  # a picture that says nothing: their mean
    right = {}
    with torch.no_grad():
        for (kind, item), visual in zip(asked, seen):
            feats = apt.encode_clips([item["audio"]], strict=True)[0]
            for name, parts in variants(item, visual, blank, per_frame).items():
                scores = apt.choice_logprob(parts, item["options"], feats, model.blocks_apart)
                right.setdefault(name, dict.fromkeys(kinds, 0.0))[kind] += \
                    (int(scores.argmax()) == item["answer"]) / len(kinds[kind])
    return right


def variants(item, visual: torch.Tensor, blank: torch.Tensor, per_frame: int) -> dict[str, list]:
    """The third part's sequences of one question, asked alone: visual, its frames' prompts (F * Q, D); blank, a
    picture that says nothing, of the same shape."""
    sound, question = ("audio", item["audio"]), ("text", item["question"])
    return {"audio only": [sound, question],
            "video only": [("prompts", visual), question],
            "audio + video": [("prompts", visual), sound, question],
            "audio + video, one frame": [("prompts", visual[:per_frame]), sound, question],
            "audio + video, the visual prompts halved": [("prompts", 0.5 * visual), sound, question],
            "audio after a picture that says nothing": [("prompts", blank), sound, question],
            "audio + video, each block named before it": [("text", "The picture:"), ("prompts", visual),
                                                          ("text", "The sound:"), sound, question],
            "video after audio": [sound, ("prompts", visual), question]}


def _sentences(seen, heard):
    said = [synth.and_list([synth.an(n) for n in names]) for names in (seen, heard)]
    return f"The picture shows {said[0]}.", f"The sound is of {said[1]}."


WORDS = {"sentences": _sentences,
         "lists": lambda seen, heard: ("Seen: " + ", ".join(seen) + ".", "Heard: " + ", ".join(heard) + ".")}


def in_words(video: dict, phrasing: str) -> dict[str, str]:
    """The fourth part's words in place of each side: {"picture", "sound", "both": the text before the question};
    video: the question's val_qa.json record (its pictured and heard objects)."""
    seen, heard = WORDS[phrasing](video["pictured"], video["heard"])
    return {"picture": seen, "sound": heard, "both": f"{seen} {heard}"}


def told_in_words(model, items, truth, phrasing: str, listed: bool) -> dict[str, np.ndarray]:
    """The fourth part (module docstring): {"picture", "sound", "both": whether each of `items` is answered right}
    with its objects told in words (in_words) before the question alone, or before AVQA's prompt (listed)."""
    right = {m: [] for m in ("picture", "sound", "both")}
    with torch.no_grad():
        for item in items:
            question = avqa_prompt(item["question"], item["options"]) if listed else item["question"]
            for m, told in in_words(truth[item["video"]], phrasing).items():
                scores = model.apt.choice_logprob([("text", f"{told} {question}")], item["options"], {})
                right[m].append(int(scores.argmax()) == item["answer"])
    return {m: np.array(r) for m, r in right.items()}


def frames(model, item) -> torch.Tensor:
    return torch.stack([model.blip.processing(f) for f in item["frames"]])


if __name__ == "__main__":
    main()

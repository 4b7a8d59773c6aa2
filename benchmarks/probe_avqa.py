"""What each side of APT-BLIP-2 tells the LLM, before any multiple choice: where the objects a video shows, or the
sounds it holds, rank among all 24 names the LLM could say.

For each synthetic AVQA video (`apt_min/synth_av.py`), every name of the training classes is scored as the whole
answer (its log-likelihood after the prompt, EOS not counted), and the ranks of the heard objects (audio only: the
APT) and of the pictured objects (video only: the vision side) are averaged; chance is 11.5 (0 = first). Three
prompts: the APT's tagging prompt (or "What objects are in the picture?" for the pictures), the question alone
("Which object can be heard?" / "... seen?"), and AVQA's prompt with its four options listed. A side that ranks its
objects well after the first two but not after the third carries what the question needs, and loses it to the
option list (the tiny stand-in LLM never read one: README, Results, APT-BLIP-2).

Then whether the LLM combines the two sides, on the questions that need both ("Which object is making a sound?",
asked alone: cloze). Their four options are the answer (pictured and heard), an object only pictured, one only heard
and one neither, so the likeliest option says what the LLM followed: a side that it reads picks a pictured (or heard)
option far above half the time; combining both picks the answer. Each mode's rates of a pictured, a heard and the
right option, for video only, audio only, audio + video in AVQA's order and reversed, and with another video's
picture or sound put first (the LLM told of two clips or two pictures, the question not saying which).

    python benchmarks/probe_avqa.py [--preset small] [--videos 60] [--both 150] [--key=value ...]
                                    (after --stage vision; 2 min for tiny on 2 cores, 5-10 for small)
"""

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from apt_min import data, synth, tasks
from apt_min.blip2 import avqa_prompt
from apt_min.build import load_apt_blip2
from apt_min.config import load_config
from apt_min.release import resolve_checkpoint


def mean_rank(apt, segments, feats, names, wanted) -> list[int]:
    scores = apt.choice_logprob(segments, names, feats)
    order = [names[i] for i in scores.argsort(descending=True)]
    return [order.index(n) for n in wanted]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--videos", type=int, default=60)
    ap.add_argument("--both", type=int, default=150, help="questions that need both senses, for the second part")
    args, rest = ap.parse_known_args()
    cfg = load_config(args.preset, rest)  # any setting as --key=value (--run_dir=... probes another run)
    model = load_apt_blip2(cfg, resolve_checkpoint(cfg, None))
    apt, names = model.apt, [c.name for c in synth.TRAIN_CLASSES]
    truth = {q["video_name"]: q for q in json.loads((Path(cfg.data_root) / "avqa" / "val_qa.json").read_text())}
    items = data.avqa_items(cfg.data_root, "test", cfg.avqa_frames, True)[:args.videos]
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
    print(f"{args.preset}: mean rank among {len(names)} names (0 = first; chance {(len(names) - 1) / 2}), "
          f"{len(items)} videos")
    for (side, k), r in ranks.items():
        print(f"  {side:<9} objects, {k:<15} {np.mean(r):5.2f}")
    both = [i for i in data.avqa_items(cfg.data_root, "test", cfg.avqa_frames, True) if i["relation"] == "Both"]
    rates = sides_followed(model, both[:args.both], truth)
    print(f"questions that need both, asked alone ({min(len(both), args.both)}): how often the likeliest option is "
          f"pictured, heard, right (chance 0.50, 0.50, 0.25)")
    for mode, (pictured, heard, right) in rates.items():
        print(f"  {mode:<27} pictured {pictured:.3f}  heard {heard:.3f}  right {right:.3f}")


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


def frames(model, item) -> torch.Tensor:
    return torch.stack([model.blip.processing(f) for f in item["frames"]])


if __name__ == "__main__":
    main()

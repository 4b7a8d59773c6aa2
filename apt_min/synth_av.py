"""The embedded audio-visual default (APT-BLIP-2, paper §4.4): synthetic videos whose pictured objects are the sources
of the synthetic sounds, with AVQA-style questions, and the image-text pairs the small vision side learns from.

Each of the 24 training sound classes gets a look, one of six shapes in one of four colours (`LOOKS`: a bell is a
red circle). A picture is a pale, noisy background with a few such objects; a video is a few frames of one picture
whose objects drift a little, paired with a sound scene (`synth.make_scene`) in which some pictured objects sound,
one stays silent and one sound comes from outside the picture. Each video has one question of AVQA's form, four
options, whose answer needs

    both   "Which object in the picture        pictured AND heard (distractors: pictured but silent, heard but not
            is making a sound?"                pictured, neither), so picture alone or sound alone leaves two
    view   "Which object can be seen?"         the silent pictured one (distractors: neither seen nor heard x 3), so
                                               the picture alone answers and the sound says nothing
    sound  "Which object can be heard?"        the one heard but not pictured (distractors: neither x 3), so the sound
                                               alone answers and the picture says nothing

in AVQA's own layout, with the frames and audio extracted as `data.py` documents for the real set:

    avqa/val_qa.json                         [{id, video_name, video_id, question_text, multi_choice, answer,
                                               question_relation (Both | View | Sound), question_type}]
    avqa/frames/{video_name}/{k:02d}.jpg     the frames, in time order
    avqa/audio/{video_name}.wav              16 kHz mono
    vision/pictures_val.json                 [{"frames": [...], "objects": [...]}]: the vision stage's validation
    vision/pictures/*.png                    pictures (it draws its training pictures fresh, `random_picture`)

No question or picture here is ever seen by the APT, which is trained on sound alone; the vision side sees pictures
and their object names, never a sound. `python -m apt_min.synth_av --out data/synth` (a second run does nothing).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
from pathlib import Path

import numpy as np

from apt_min import synth
from apt_min.errors import ForeignDataError, clean_exit

VERSION = 3  # 2: View and Sound questions without the other sense's distractor; 3: "in the picture"
SIZE = 64  # pixels, square
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = {"red": (215, 45, 45), "green": (40, 160, 70), "blue": (45, 85, 215), "yellow": (225, 190, 25)}
LOOKS = {c.name: look for c, look in zip(synth.TRAIN_CLASSES, itertools.product(SHAPES, COLOURS))}
QUESTIONS = {"both": "Which object in the picture is making a sound?",  # not the one heard off the picture
             "view": "Which object can be seen?", "sound": "Which object can be heard?"}
RELATION = {"both": "Both", "view": "View", "sound": "Sound"}
KINDS = ("both", "both", "view", "sound")  # half the questions need both


# -------------------------------------------------------------------------------------------------------- pictures


def draw_shape(draw, shape: str, box, fill):
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "star":
        angles = np.linspace(-np.pi / 2, 3 * np.pi / 2, 11)[:-1]
        radii = [r if i % 2 == 0 else r * 0.45 for i in range(10)]
        draw.polygon([(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)], fill=fill)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle((cx - w, y0, cx + w, y1), fill=fill)
        draw.rectangle((x0, cy - w, x1, cy + w), fill=fill)


CELL = 16  # pictures are a 4 x 4 grid of cells; one object per cell, near its centre


def layout(rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
    """Places for n objects: (x, y, size) boxes in distinct cells of the grid, each 11-14 pixels and off centre by
    at most a pixel. An object then lies almost wholly within one 16-pixel patch of a ViT that cuts the picture on
    the same grid (drawn, its outline and a pixel of drift reach into the next cell in a quarter of the frames; over
    all frames, 1 % of an object's pixels lie outside its cell, measured on 1 200), so that one patch's token
    carries one object for the frozen ViT and the visual aligner that reads it (a ViT trained from scratch, tried
    before, did not learn the objects in the steps a CPU allows: train.py, TrainVision)."""
    per_row = SIZE // CELL
    cells = rng.choice(per_row * per_row, size=n, replace=False)
    boxes = []
    for c in cells:
        s = int(rng.integers(11, 15))
        x = (c % per_row) * CELL + (CELL - s) // 2 + int(rng.integers(-1, 2))
        y = (c // per_row) * CELL + (CELL - s) // 2 + int(rng.integers(-1, 2))
        boxes.append((max(0, x), max(0, y), s))
    return boxes


def draw_frames(rng: np.random.Generator, objects: list[str], frames: int):
    """The frames (Pillow images) of one picture of `objects`: a pale noisy background, each object in its look,
    drifting up to a pixel from frame to frame."""
    from PIL import Image, ImageDraw

    boxes = layout(rng, len(objects))
    background = rng.integers(185, 250, size=3)
    out = []
    for _ in range(frames):
        pixels = np.clip(background + rng.normal(0, 8, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for name, (x, y, s) in zip(objects, boxes):
            dx, dy = rng.integers(-1, 2, size=2)
            shape, colour = LOOKS[name]
            draw_shape(draw, shape, (x + dx, y + dy, x + dx + s, y + dy + s), COLOURS[colour])
        out.append(image)
    return out


# ----------------------------------------------------------------------------------------------------- questions


def av_question(rng: random.Random, kind: str, pictured: list[str], heard: list[str]):
    """(question, four options, the answer's index) for one video: see the module's table."""
    names = [c.name for c in synth.TRAIN_CLASSES]
    both = [n for n in pictured if n in heard]
    silent = [n for n in pictured if n not in heard]
    offscreen = [n for n in heard if n not in pictured]
    neither = [n for n in names if n not in pictured and n not in heard]
    if kind == "both":
        answer, distractors = rng.choice(both), [rng.choice(silent), rng.choice(offscreen)]
    else:  # one sense answers; the other has nothing to say about any option (no cross-sense trap)
        answer, distractors = rng.choice(silent if kind == "view" else offscreen), []
    options = [answer, *distractors, *rng.sample(neither, 4 - 1 - len(distractors))]
    rng.shuffle(options)
    return QUESTIONS[kind], options, options.index(answer)


def make_video(rng: np.random.Generator, trng: random.Random, length: float, frames: int):
    """One video: (frames, audio, pictured objects, heard objects). Pictured: one or two that sound and one that is
    silent; heard: those, and one more from outside the picture."""
    names = [c.name for c in synth.TRAIN_CLASSES]
    chosen = trng.sample(names, 4)
    sounding = chosen[:trng.choice((1, 2))]
    silent, offscreen = chosen[2], chosen[3]
    pictured = sounding + [silent]
    trng.shuffle(pictured)
    heard = sounding + [offscreen]
    audio, _ = synth.make_scene(rng, [synth.BY_NAME[n] for n in heard], length, n_types=(len(heard), len(heard)))
    return draw_frames(rng, pictured, frames), audio, pictured, heard


# ------------------------------------------------------------------------------------------- the vision stage's tasks

PICTURE_TASKS = ("objects", "describe", "choose", "yesno")


def random_picture(rng: random.Random) -> dict:
    """A fresh picture record, its frames drawn in memory: the vision stage draws one per training example (the visual
    aligner sees a new picture at every example instead of learning a fixed set by heart; drawing one takes about a
    millisecond)."""
    objects = rng.sample([c.name for c in synth.TRAIN_CLASSES], rng.choice((1, 2, 3)))
    frames = draw_frames(np.random.default_rng(rng.getrandbits(32)), objects, rng.choice((1, 2)))
    return {"frames": frames, "objects": objects}


def picture_example(record: dict, kind: str, rng: random.Random) -> tuple[list, str, str, str]:
    """One example of the vision stage from a picture record: (its frames (paths or images), the prompt, the answer,
    the picture's description, which the stage's picture-text losses pair it with).
    objects: "What objects are in the picture?" -> "bell, drum" (as tagging answers); describe: "Describe the
    picture." -> "A picture of a bell and a drum."; choose: AVQA's prompt for "Which object can be seen?" over one
    pictured and three absent objects -> the pictured one's name; yesno: "Is there a drum in the picture?"."""
    from apt_min.blip2 import avqa_prompt

    objects, frames = record["objects"], record["frames"]
    absent = [c.name for c in synth.TRAIN_CLASSES if c.name not in objects]
    description = f"A picture of {synth.and_list([synth.an(o) for o in objects])}."
    if kind == "objects":
        return frames, "What objects are in the picture?", ", ".join(objects), description
    if kind == "describe":
        return frames, "Describe the picture.", description, description
    if kind == "choose":
        answer = rng.choice(objects)
        options = [answer, *rng.sample(absent, 3)]
        rng.shuffle(options)
        return frames, avqa_prompt(QUESTIONS["view"], options), answer, description
    if kind == "yesno":
        there = rng.random() < 0.5
        name = rng.choice(objects if there else absent)
        return frames, f"Is there {synth.an(name)} in the picture?", "yes" if there else "no", description
    raise ValueError(f"unknown picture task {kind!r}; one of {PICTURE_TASKS}")


# -------------------------------------------------------------------------------------------------------- writing


def generate(out: str | Path, seed: int = 0, videos: int = 300, pictures: int = 200, frames: int = 4,
             length: float = 5.12) -> Path:
    """Write the audio-visual set under `out` (beside the synthetic benchmark: out/avqa, out/vision) unless the same
    arguments already wrote it (then return at once). One that older versions of this module or of synth wrote is
    written again; one of the same versions but other arguments is refused, as synth.generate refuses."""
    out = Path(out)
    args = {"version": VERSION, "synth": synth.VERSION, "seed": seed, "videos": videos, "pictures": pictures,
            "frames": frames, "length": length}  # synth's version: the scenes its audio is made of
    manifest = out / "avqa" / "synth_av.json"
    written = json.loads(manifest.read_text()).get("args") if manifest.is_file() else None
    if written == args:
        return out
    if written and (written.get("version"), written.get("synth")) == (VERSION, synth.VERSION):
        synth.refuse_to_replace(out, written, args)
    ours = manifest.is_file() or (out / "synth.json").is_file()  # written here, or inside the synthetic benchmark
    # (an older version, interrupted, wrote its manifest last)
    for folder in (out / "avqa", out / "vision"):
        if not ours and folder.is_dir() and any(folder.iterdir()):  # real AVQA, say: never replaced
            raise ForeignDataError(f"{folder}: holds files but {manifest} is missing, so it is not the synthetic "
                                   "audio-visual set written here; refusing to replace it (generate into another "
                                   "folder)")
    for folder in (out / "avqa", out / "vision"):
        if folder.exists():
            shutil.rmtree(folder)
    manifest.parent.mkdir(parents=True)  # marked as ours from the start: an interrupted run is replaced by the next
    manifest.write_text(json.dumps({"args": None, "incomplete": "being written, or interrupted"}))
    rng, trng = np.random.default_rng(seed + 7), random.Random(seed + 7)

    items = []
    for i in range(videos):
        name = f"synth{i:05d}_000000"  # AVQA's video names are VGGSound's: {YTID}_{start:06d}
        images, audio, pictured, heard = make_video(rng, trng, length, frames)
        for k, image in enumerate(images):
            path = out / "avqa" / "frames" / name / f"{k:02d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, quality=95)
        synth.write_wav(out / "avqa" / "audio" / f"{name}.wav", audio)
        kind = KINDS[i % len(KINDS)]
        question, options, answer = av_question(trng, kind, pictured, heard)
        items.append({"id": i, "video_name": name, "video_id": i, "question_text": question,
                      "multi_choice": options, "answer": answer, "question_relation": RELATION[kind],
                      "question_type": "Which", "pictured": pictured, "heard": heard})
    (out / "avqa" / "val_qa.json").write_text(json.dumps(items, indent=1))

    records = []  # validation pictures (the vision stage draws its training pictures fresh: random_picture)
    for i in range(pictures):
        record = random_picture(trng)
        paths = []
        for k, image in enumerate(record["frames"]):
            path = out / "vision" / "pictures" / f"val{i:05d}_{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            paths.append(str(path.relative_to(out)))
        records.append({"frames": paths, "objects": record["objects"]})
    (out / "vision" / "pictures_val.json").write_text(json.dumps(records, indent=1))
    manifest.write_text(json.dumps({"args": args, "looks": LOOKS}, indent=1))
    return out


@clean_exit("python -m apt_min.synth_av")
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/synth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--videos", type=int, default=300)
    args = ap.parse_args(argv)
    generate(args.out, args.seed, args.videos)
    print(f"wrote {args.out}/avqa and {args.out}/vision")


if __name__ == "__main__":
    main()

"""The embedded default data: a synthetic sound-scene benchmark with exact ground truth for every task.

No real data set can be downloaded in the places this project first runs, and a learner wants the whole pipeline
working before fetching terabytes. So it generates, deterministically from a seed:

- 36 procedural sound-event classes (bell, siren, knock, rain, ...), each a small generator with random pitch,
  duration, envelope and timbre; 24 are used for training and 12 are *novel*, kept for few-shot evaluation;
- scenes (5.12 s by default) of 1-4 event types, each occurring 1-4 times at known onsets, over background noise;
- text for every task: five captions per clip, AQA questions, NLAR questions over pairs of clips;

and writes all of it in the real data sets' own formats (as `data.py`'s readers document them), so that the readers
in `data.py` and `evaluate.py --task audiocaps` serve real and synthetic data alike:

    audio/Y{ytid}.wav                       scenes shared by the AudioSet-, AudioCaps- and NLAR-style files
    audioset/{balanced_train,eval}_segments.csv, class_labels_indices.csv, mid_to_display_name.tsv,
             audioset_{train,eval}_strong.tsv
    audiocaps/{train,val,test}.csv
    clotho/clotho_captions_{development,validation,evaluation}.csv + clotho/{split}/*.wav (names with spaces)
    clotho_aqa/clotho_aqa_{train,val,test}.csv + clotho_aqa/audio_files/*.wav
    esc50/meta/esc50.csv + esc50/audio/*.wav (novel classes only, 5 folds)
    nlar/nlar_{train,val,test}.json

    python -m apt_min.synth --out data/synth [--seed 0] [--scale 1.0]   (a second identical run does nothing)
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import math
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apt_min.data import LAYOUT
from apt_min.errors import ForeignDataError, SettingError, clean_exit

SR = 16000
GRID = 0.1  # onsets and durations lie on a 100 ms grid: exact, readable answers
VERSION = 2  # bump when the generated content changes (2: README, The synthetic benchmark, version 2)
CLOTHO_SPLITS = LAYOUT["clotho"]["splits"]  # our split -> the folder and file name Clotho gives it


# ------------------------------------------------------------------------------------------------ sound generators
# Each takes a numpy Generator and a duration in seconds and returns a mono signal with peak 1.


def _t(dur):
    return np.arange(int(round(dur * SR))) / SR


def _env(n, attack=0.01, release=0.05):
    """A linear attack/release envelope over n samples."""
    a, r = min(n, max(1, int(attack * SR))), min(n, max(1, int(release * SR)))
    env = np.ones(n)
    env[:a] *= np.linspace(0, 1, a)
    env[n - r:] *= np.linspace(1, 0, r)
    return env


def _decay(n, rate):
    return np.exp(-rate * np.arange(n) / SR)


def _noise(rng, n, color="white"):
    x = rng.standard_normal(n)
    if color == "white":
        return x
    spectrum = np.fft.rfft(x)
    f = np.maximum(np.fft.rfftfreq(n, 1 / SR), 1.0)
    spectrum /= np.sqrt(f) if color == "pink" else f
    return np.fft.irfft(spectrum, n)


def _band(rng, n, lo, hi):
    """Noise band-limited to [lo, hi] Hz."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spectrum[(f < lo) | (f > hi)] = 0
    return np.fft.irfft(spectrum, n)


def _sweep(t, f0, f1):
    return np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1] + 1e-9)))


def _pulses(rng, dur, count, make):
    """`count` copies of make(rng) spread evenly over dur."""
    out = np.zeros(len(_t(dur)))
    for k in range(count):
        p = make(rng)
        i = int(k * len(out) / count)
        out[i:i + len(p)] += p[:len(out) - i]
    return out


def _peak(x):
    return x / (np.abs(x).max() + 1e-9)


def bell(rng, d):
    t, f = _t(d), rng.uniform(500, 1200)
    return sum(a * np.sin(2 * np.pi * f * r * t) for a, r in ((1, 1), (0.6, 2.76), (0.4, 5.4))) * _decay(len(t), 4)


def siren(rng, d):
    t, f = _t(d), rng.uniform(600, 900)
    return np.sin(2 * np.pi * np.cumsum(f + 250 * np.sin(2 * np.pi * rng.uniform(0.8, 1.5) * t)) / SR) * _env(len(t))


def upsweep(rng, d):
    t = _t(d)
    return _sweep(t, rng.uniform(200, 500), rng.uniform(2000, 4000)) * _env(len(t))


def downsweep(rng, d):
    t = _t(d)
    return _sweep(t, rng.uniform(2000, 4000), rng.uniform(200, 500)) * _env(len(t))


def knock(rng, d):
    def one(rng):
        n = int(0.08 * SR)
        return np.sin(2 * np.pi * rng.uniform(120, 220) * _t(0.08)) * _decay(n, 60) + 0.3 * _band(rng, n, 200, 2000) * \
            _decay(n, 90)
    return _pulses(rng, d, int(rng.integers(2, 4)), one)


def hum(rng, d):
    t, f = _t(d), rng.choice([50.0, 60.0]) * rng.uniform(0.98, 1.02)
    return sum(np.sin(2 * np.pi * f * k * t) / k for k in range(1, 8)) * _env(len(t), 0.05, 0.1)


def rain(rng, d):
    n = len(_t(d))
    drops = (rng.random(n) < 0.004) * rng.standard_normal(n) * 4
    return (_band(rng, n, 1000, 7000) * 0.4 + np.convolve(drops, _decay(200, 900), "same")) * _env(n, 0.1, 0.1)


def clicks(rng, d):
    return _pulses(rng, d, int(rng.integers(6, 12)), lambda rng: _band(rng, 80, 2000, 7500) * _decay(80, 400))


def beep(rng, d):
    t = _t(d)
    return np.sin(2 * np.pi * rng.uniform(800, 2000) * t) * _env(len(t), 0.005, 0.005)


def whistle(rng, d):
    t, f = _t(d), rng.uniform(1800, 3000)
    return np.sin(2 * np.pi * np.cumsum(f + 40 * np.sin(2 * np.pi * 6 * t)) / SR) * _env(len(t), 0.05, 0.05)


def drum(rng, d):
    def one(rng):
        t = _t(0.25)
        return np.sin(2 * np.pi * np.cumsum(rng.uniform(80, 140) * np.exp(-t * 8) + 40) / SR) * _decay(len(t), 14)
    return _pulses(rng, d, int(rng.integers(1, 3)), one)


def buzzer(rng, d):
    t = _t(d)
    return np.sign(np.sin(2 * np.pi * rng.uniform(150, 300) * t)) * 0.5 * _env(len(t))


def wind(rng, d):
    t = _t(d)
    return _band(rng, len(t), 100, 900) * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.3, 0.8) * t)) * \
        _env(len(t), 0.3, 0.3)


def engine(rng, d):
    t, f = _t(d), rng.uniform(30, 60)
    saw = 2 * ((f * t) % 1) - 1
    return (saw + 0.3 * _band(rng, len(t), 50, 400)) * (0.8 + 0.2 * np.sin(2 * np.pi * 4 * t)) * _env(len(t), 0.2)


def birdsong(rng, d):
    def one(rng):
        t = _t(rng.uniform(0.05, 0.1))
        return _sweep(t, rng.uniform(2500, 3500), rng.uniform(4000, 6000)) * np.hanning(len(t))
    return _pulses(rng, d, int(rng.integers(3, 7)), one)


def bark(rng, d):
    def one(rng):
        t = _t(0.18)
        f = rng.uniform(300, 500) * np.exp(-t * 3)
        phase = 2 * np.pi * np.cumsum(f) / SR
        return (sum(np.sin(k * phase) / k for k in range(1, 6)) + 0.3 * _band(rng, len(t), 500, 3000)) * \
            np.hanning(len(t))
    return _pulses(rng, d, int(rng.integers(1, 3)), one)


def alarm(rng, d):
    t, f = _t(d), rng.uniform(700, 1000)
    return np.sin(2 * np.pi * np.where((t * 4) % 1 < 0.5, f, f * 1.25) * t) * _env(len(t))


def gong(rng, d):
    t, f = _t(d), rng.uniform(80, 150)
    return sum(np.sin(2 * np.pi * f * r * t) / r for r in (1, 1.48, 2.03, 2.77, 3.6)) * _decay(len(t), 2) * \
        _env(len(t), 0.005, 0.2)


def drip(rng, d):
    def one(rng):
        t = _t(0.06)
        return _sweep(t, rng.uniform(600, 900), rng.uniform(1500, 2200)) * _decay(len(t), 60)
    return _pulses(rng, d, int(rng.integers(2, 5)), one)


def static(rng, d):
    n = len(_t(d))
    return rng.standard_normal(n) * _env(n, 0.005, 0.005)


def hiss(rng, d):
    n = len(_t(d))
    return _band(rng, n, 5000, 7900) * _env(n, 0.1, 0.1)


def rumble(rng, d):
    n = len(_t(d))
    return _band(rng, n, 20, 150) * _env(n, 0.2, 0.2)


def ticktock(rng, d):
    def one(rng):
        return np.concatenate([_band(rng, 60, 3000, 6000) * _decay(60, 300), np.zeros(int(0.22 * SR)),
                               _band(rng, 60, 1000, 2500) * _decay(60, 300)])
    return _pulses(rng, d, max(1, int(d / 0.55)), one)


def trill(rng, d):
    t = _t(d)
    return np.sin(2 * np.pi * rng.uniform(1000, 1600) * t) * (np.sin(2 * np.pi * rng.uniform(12, 20) * t) > 0) * \
        _env(len(t))


def horn(rng, d):
    t, f = _t(d), rng.uniform(250, 450)
    return sum(np.sin(2 * np.pi * f * k * t) / k**0.7 for k in range(1, 9)) * _env(len(t), 0.04, 0.08)


def organ(rng, d):
    t, f = _t(d), rng.uniform(200, 330)
    return sum(np.sin(2 * np.pi * f * r * t) for r in (1, 1.26, 1.5, 2)) * _env(len(t), 0.08, 0.15)


def pluck(rng, d):
    n, period = len(_t(d)), int(SR / rng.uniform(150, 500))
    buf, out = rng.uniform(-1, 1, period), np.zeros(n)
    for i in range(n):  # Karplus-Strong
        out[i] = buf[i % period]
        buf[i % period] = 0.996 * 0.5 * (buf[i % period] + buf[(i + 1) % period])
    return out


def zap(rng, d):
    t = _t(d)
    return np.sign(_sweep(t, rng.uniform(3000, 5000), rng.uniform(100, 300))) * _decay(len(t), 3) * _env(len(t))


def ringtone(rng, d):
    t, f = _t(d), rng.uniform(900, 1400)
    on = ((t * 5) % 1) < 0.6
    return (np.sin(2 * np.pi * f * t) + np.sin(2 * np.pi * f * 1.2 * t)) * on * _env(len(t))


def crackle(rng, d):
    n = len(_t(d))
    sparks = (rng.random(n) < 0.002) * rng.standard_normal(n) * 5
    return np.convolve(sparks, _band(rng, 100, 1000, 6000) * _decay(100, 200), "same")


def warble(rng, d):
    t, f = _t(d), rng.uniform(500, 800)
    return np.sin(2 * np.pi * np.cumsum(f * (1 + 0.15 * np.sin(2 * np.pi * 8 * t))) / SR) * _env(len(t))


def heartbeat(rng, d):
    def one(rng):
        t = _t(0.12)
        thump = np.sin(2 * np.pi * rng.uniform(45, 70) * t) * np.hanning(len(t))
        return np.concatenate([thump, np.zeros(int(rng.uniform(0.12, 0.2) * SR)), 0.7 * thump])
    return _pulses(rng, d, max(1, int(d / 0.8)), one)


def laser(rng, d):
    t = _t(d)
    return sum(_sweep(t, k * rng.uniform(1500, 2500), k * 300) / k for k in (1, 2, 3)) * _decay(len(t), 5)


def chime(rng, d):
    out = np.zeros(len(_t(d)))
    for _ in range(4):
        i = int(rng.uniform(0, 0.5) * len(out))
        t = _t(d)[: len(out) - i]
        out[i:] += np.sin(2 * np.pi * rng.uniform(2000, 3500) * t) * _decay(len(t), 6)
    return out


def sonar(rng, d):
    t, f = _t(d), rng.uniform(1000, 1500)
    ping = np.sin(2 * np.pi * f * t) * _decay(len(t), 5)
    echo = np.roll(ping, int(0.25 * SR)) * 0.4
    echo[: int(0.25 * SR)] = 0
    return ping + echo


def flutter(rng, d):
    t = _t(d)
    return _band(rng, len(t), 300, 3000) * (np.sin(2 * np.pi * rng.uniform(15, 25) * t) > 0.3) * _env(len(t))


@dataclass(frozen=True)
class SoundClass:
    name: str  # one word: also the answer of single-word questions
    verb: str  # what it does, for captions: "a bell rings"
    generate: callable
    duration: tuple[float, float]  # seconds, drawn on the GRID


CLASSES = [SoundClass(*c) for c in [
    ("bell", "rings", bell, (0.6, 1.2)), ("siren", "wails", siren, (1.0, 2.0)),
    ("upsweep", "rises", upsweep, (0.3, 0.8)), ("downsweep", "falls", downsweep, (0.3, 0.8)),
    ("knock", "sounds", knock, (0.4, 0.8)), ("hum", "drones", hum, (1.0, 2.0)),
    ("rain", "patters", rain, (1.0, 2.0)), ("clicks", "tick", clicks, (0.5, 1.0)),
    ("beep", "sounds", beep, (0.2, 0.4)), ("whistle", "blows", whistle, (0.5, 1.0)),
    ("drum", "beats", drum, (0.3, 0.6)), ("buzzer", "buzzes", buzzer, (0.4, 0.8)),
    ("wind", "blows", wind, (1.0, 2.0)), ("engine", "runs", engine, (1.0, 2.0)),
    ("birdsong", "chirps", birdsong, (0.6, 1.2)), ("bark", "sounds", bark, (0.3, 0.6)),
    ("alarm", "rings", alarm, (0.8, 1.5)), ("gong", "resonates", gong, (1.0, 1.8)),
    ("drip", "drips", drip, (0.4, 0.8)), ("static", "crackles", static, (0.3, 0.7)),
    ("hiss", "hisses", hiss, (0.5, 1.0)), ("rumble", "rumbles", rumble, (1.0, 2.0)),
    ("ticktock", "ticks", ticktock, (1.1, 1.7)), ("trill", "trills", trill, (0.4, 0.9)),
    # novel classes: never in any training file; only the ESC-50-style few-shot set has them
    ("horn", "honks", horn, (0.4, 0.9)), ("organ", "plays", organ, (0.8, 1.5)),
    ("pluck", "twangs", pluck, (0.4, 0.8)), ("zap", "zaps", zap, (0.2, 0.4)),
    ("ringtone", "rings", ringtone, (1.0, 1.6)), ("crackle", "crackles", crackle, (0.8, 1.5)),
    ("warble", "warbles", warble, (0.5, 1.0)), ("heartbeat", "thumps", heartbeat, (0.8, 1.6)),
    ("laser", "fires", laser, (0.2, 0.5)), ("chime", "chimes", chime, (0.8, 1.4)),
    ("sonar", "pings", sonar, (0.6, 1.0)), ("flutter", "flutters", flutter, (0.5, 1.0)),
]]
TRAIN_CLASSES, NOVEL_CLASSES = CLASSES[:24], CLASSES[24:]
LONGEST = max(c.duration[1] for c in CLASSES)  # seconds: the shortest scene that holds every sound
BY_NAME = {c.name: c for c in CLASSES}


def mid(name: str) -> str:
    """A Freebase-style machine id, as AudioSet labels its classes: /m/syn_bell."""
    return f"/m/syn_{name}"


# --------------------------------------------------------------------------------------------------------- scenes


@dataclass
class Event:
    label: str
    onset: float
    offset: float
    gain_db: float  # the sound's peak in the written file, in dB of full scale


def in_band(x: np.ndarray) -> float:
    """RMS of x above 20 Hz, the lowest frequency the filter banks see (brown noise holds most of its power below)."""
    spectrum = np.fft.rfft(x)
    spectrum[np.fft.rfftfreq(len(x), 1 / SR) < 20] = 0
    return float(np.sqrt(np.mean(np.fft.irfft(spectrum, len(x)) ** 2)))


FRAME = 160  # 10 ms: the filter banks' hop (audio.FRAME_SHIFT; this module stays free of torch)


def heard_span(sound: np.ndarray, floor: float) -> tuple[float, float] | None:
    """(start, end) in seconds from the sound's first sample, rounded outward to the grid, of the 10 ms frames in
    which the sound stands above `floor` (the background's RMS); None where it never does."""
    frames = len(sound) // FRAME
    rms = np.sqrt(np.mean(sound[:frames * FRAME].reshape(frames, FRAME) ** 2, axis=1))
    loud = np.flatnonzero(rms > floor)
    if not len(loud):
        return None
    start, end = loud[0] * FRAME / SR, (loud[-1] + 1) * FRAME / SR
    return math.floor(start / GRID + 1e-6) * GRID, min(math.ceil(end / GRID - 1e-6) * GRID, len(sound) / SR)


def make_scene(rng: np.random.Generator, classes, length: float, n_types=(1, 4), n_times=(1, 4)):
    """Draw a scene: 1-4 event types, each 1-4 times, never overlapping itself, over background noise. Returns
    (audio, events). Each event is annotated where its sound is heard above the background (a knock's last pulse
    may end well before the slot drawn for it; a sound the background drowns is drawn again), no two events start
    at the same moment (so "which first", "which last" and "before" always have one answer), and gain_db is the
    sound's peak level in the written file, after the scene is scaled to its peak."""
    n = int(round(length * SR))
    background = _peak(_noise(rng, n, rng.choice(["white", "pink", "brown"]))) * 10 ** (-rng.uniform(10, 30) / 20) * 0.3
    floor = in_band(background)
    types = rng.choice(len(classes), size=int(rng.integers(n_types[0], n_types[1] + 1)), replace=False)
    events, audio, onsets = [], np.zeros(n), set()
    for i in types:
        cls = classes[i]
        taken = []
        for _ in range(int(rng.integers(n_times[0], n_times[1] + 1))):
            for _try in range(50):
                dur = round(rng.uniform(*cls.duration) / GRID) * GRID
                # on the grid, and never past the end (rounding up could pass it where length is off the grid)
                onset = min(round(rng.uniform(0, length - dur) / GRID), math.floor((length - dur) / GRID + 1e-6)) * GRID
                if not all(onset >= b + GRID or onset + dur <= a - GRID for a, b in taken):
                    continue
                gain_db = float(rng.uniform(-12, 0))
                sound = _peak(cls.generate(rng, dur)) * 10 ** (gain_db / 20)
                span = heard_span(sound, floor)
                if span is not None and round(onset + span[0], 3) not in onsets:
                    break
            else:
                continue  # no room left for another occurrence
            taken.append((onset, onset + dur))
            start = int(round(onset * SR))
            audio[start:start + len(sound)] += sound[: n - start]
            onsets.add(round(onset + span[0], 3))
            events.append(Event(cls.name, round(onset + span[0], 3), round(onset + span[1], 3), gain_db))
    audio += background
    scale = 0.9 / (np.abs(audio).max() + 1e-9)
    events = [Event(e.label, e.onset, e.offset, round(e.gain_db + 20 * math.log10(scale), 2)) for e in events]
    events.sort(key=lambda e: (e.onset, e.label))
    return (audio * scale).astype(np.float32), events


def write_wav(path: Path, audio: np.ndarray, rate: int = SR):
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, rate, subtype="PCM_16")


# ----------------------------------------------------------------------------------------------------------- text

TIMES = {1: "once", 2: "twice", 3: "three times", 4: "four times"}


def counts(events) -> dict[str, int]:
    out = {}
    for e in events:
        out[e.label] = out.get(e.label, 0) + 1
    return out


def an(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def interleaved(events) -> bool:
    """Whether the kinds of sound take turns (bell, hum, bell): then no order of kinds is true of the scene."""
    runs = [label for label, _ in itertools.groupby(e.label for e in events)]  # events in onset order
    return len(runs) != len(set(runs))


def and_list(words) -> str:
    """"a, b and c": words joined as a sentence lists them."""
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def captions(rng: random.Random, events, k: int = 5) -> list[str]:
    """k different captions of a scene, naming its kinds of sound in order of first appearance. Captions that say
    so ("then", "in that order") only where that order is true: several kinds, each heard in one stretch."""
    order = list(dict.fromkeys(e.label for e in events))
    n = counts(events)
    acts = [f"{an(x)} {BY_NAME[x].verb}" for x in order]  # "a bell rings"
    times = [f"{an(x)} {BY_NAME[x].verb} {TIMES[n[x]]}" for x in order]  # "a bell rings twice"
    nouns = [an(x) for x in order]
    counted = [a if n[x] == 1 else f"{a} {TIMES[n[x]]}" for a, x in zip(nouns, order)]  # "a bell twice"
    if len(order) > 1 and not interleaved(events):
        styles = [
            lambda: ", then ".join(times) + ".",
            lambda: "You can hear " + " and ".join(counted) + ", in that order.",
            lambda: ", followed by ".join(nouns) + ", over background noise.",
            lambda: "First " + ", next ".join(acts) + ".",
            lambda: "A recording in which " + " and ".join(times) + ".",
            lambda: "; ".join(f"{a} is heard {TIMES[n[x]]}" for a, x in zip(nouns, order)) + ".",
            lambda: "The sounds of " + ", ".join(order) + " in sequence.",
        ]
    else:  # one kind, or kinds that take turns: no word of order
        styles = [
            lambda: and_list(times) + ".",
            lambda: "You can hear " + and_list(counted) + ".",
            lambda: and_list(nouns) + " over background noise.",
            lambda: "A recording in which " + " and ".join(times) + ".",
            lambda: "; ".join(f"{a} is heard {TIMES[n[x]]}" for a, x in zip(nouns, order)) + ".",
            lambda: "The sounds of " + and_list(order) + ".",
            lambda: "Background noise with " + and_list(counted) + ".",
        ]
    return [_cap(styles[i]()) for i in rng.sample(range(len(styles)), k)]


def _cap(s):
    return s[0].upper() + s[1:]


class AnswerBalance:
    """Keeps each form of question from leaning to one answer over a split: a question is taken only while its
    answer is among the least given of its form's answers so far, so that the form alone tells nothing."""

    def __init__(self):
        self.given = {}  # form -> {answer: times given}

    def fits(self, form: str, answer: str) -> bool:
        given = self.given.setdefault(form, dict.fromkeys(FORM_ANSWERS[form], 0))
        return given[answer] == min(given.values())

    def take(self, form: str, answer: str):
        self.given[form][answer] += 1


FORM_ANSWERS = {  # the closed answer sets of the yes/no and which-recording forms, which AnswerBalance evens out
    "present": ("yes", "no"), "either": ("yes", "no"), "repeated": ("yes", "no"), "before": ("yes", "no"),
    "contains": ("first", "second", "both"), "more often": ("first", "second", "equal"),
    "longer": ("first", "second", "equal"), "louder": ("first", "second"), "same start": ("yes", "no"),
    "share": ("yes", "no"), "more kinds": ("first", "second", "equal"),
}


def _take(rng: random.Random, candidates, k: int, balance: AnswerBalance | None) -> list[tuple[str, str]]:
    """k of (form, question, answer) in random order, each taken only where balance says its answer fits."""
    candidates = rng.sample(candidates, len(candidates))
    taken = []
    for form, q, a in candidates:
        if len(taken) == k:
            break
        if balance is None or balance.fits(form, a):
            taken.append((q, a))
            if balance is not None:
                balance.take(form, a)
    return taken


def aqa_questions(rng: random.Random, events, vocabulary,
                  balance: AnswerBalance | None = None) -> list[tuple[str, str]]:
    """Clotho-AQA style: four yes/no questions and two single-word ones per clip (fewer yes/no where `balance`, the
    split's, refuses the rest), in random order, with their answers."""
    present = list(dict.fromkeys(e.label for e in events))
    absent = [c for c in vocabulary if c not in present]
    n, first = counts(events), {}
    for e in events:
        first.setdefault(e.label, e.onset)
    yes_no = [("present", f"Is there {an(x)} in the recording?", "yes") for x in present]
    yes_no += [("present", f"Is there {an(x)} in the recording?", "no")
               for x in rng.sample(absent, min(3, len(absent)))]  # a small vocabulary (a tiny split's) has few
    for x in present if absent else []:  # one present and one absent, named in either order; or two absent
        pair = [x, rng.choice(absent)]
        rng.shuffle(pair)
        yes_no.append(("either", f"Is there {an(pair[0])} or {an(pair[1])}?", "yes"))
    for _ in range(2 if len(absent) >= 2 else 0):
        x, y = rng.sample(absent, 2)
        yes_no.append(("either", f"Is there {an(x)} or {an(y)}?", "no"))
    yes_no += [("repeated", f"Does the {x} occur more than once?", "yes" if n[x] > 1 else "no") for x in present]
    yes_no += [("before", f"Does the {x} start before the {y}?", "yes" if first[x] < first[y] else "no")
               for x in present for y in present if x != y]
    word = [("count", f"How many times does the {x} occur?", ["zero", "one", "two", "three", "four"][n[x]])
            for x in present]
    word += [("first", "Which sound is heard first?", events[0].label),
             ("last", "Which sound starts last?", events[-1].label)]  # the kind of the last onset
    questions = _take(rng, yes_no, 4, balance) + _take(rng, word, 2, None)
    rng.shuffle(questions)
    return questions


def nlar_questions(rng: random.Random | None, ev1, ev2, k: int = 3,
                   balance: AnswerBalance | None = None) -> list[tuple[str, str]]:
    """k questions that need both clips (all of them when rng is None): presence, frequency, duration, loudness and
    order; closed-set answers, taken where `balance` (the split's) lets them. Swapping the clips turns "first" into
    "second" and back; the other answers stay."""
    n1, n2 = counts(ev1), counts(ev2)
    labels = sorted(set(n1) | set(n2))
    qs = []
    for x in labels:
        where = {(True, True): "both", (True, False): "first", (False, True): "second"}[(x in n1, x in n2)]
        qs.append(("contains", f"Which recording contains the {x}?", where))
        more = "equal" if n1.get(x, 0) == n2.get(x, 0) else ("first" if n1.get(x, 0) > n2.get(x, 0) else "second")
        qs.append(("more often", f"In which recording does the {x} occur more often?", more))
        if x in n1 and x in n2:
            d1 = round(sum(e.offset - e.onset for e in ev1 if e.label == x), 1)
            d2 = round(sum(e.offset - e.onset for e in ev2 if e.label == x), 1)
            qs.append(("longer", f"In which recording does the {x} last longer in total?",
                       "equal" if d1 == d2 else ("first" if d1 > d2 else "second")))
            g1 = max(e.gain_db for e in ev1 if e.label == x)
            g2 = max(e.gain_db for e in ev2 if e.label == x)
            if abs(g1 - g2) >= 3:  # only where the difference is clearly audible
                qs.append(("louder", f"In which recording is the {x} louder?", "first" if g1 > g2 else "second"))
    qs.append(("same start", "Do the two recordings start with the same sound?",
               "yes" if ev1[0].label == ev2[0].label else "no"))
    qs.append(("share", "Do the recordings share any sound?", "yes" if set(n1) & set(n2) else "no"))
    qs.append(("more kinds", "Which recording has more kinds of sound?",
               "equal" if len(n1) == len(n2) else ("first" if len(n1) > len(n2) else "second")))
    return [(q, a) for _, q, a in qs] if rng is None else _take(rng, qs, k, balance)


# --------------------------------------------------------------------------------------------------------- writing


@dataclass
class Sizes:
    """Clips per split (train, val, test); `scaled` multiplies them all."""
    scenes: tuple[int, int, int] = (2000, 200, 200)  # the AudioSet/AudioCaps-style pool
    clotho: tuple[int, int, int] = (400, 100, 100)  # Clotho / Clotho-AQA-style scenes
    esc_per_class: int = 40  # ESC-50-style clips per novel class, spread over 5 folds
    nlar: tuple[int, int, int] = (1000, 100, 100)  # NLAR: a third of the questions (three to a pair, or fewer)

    def scaled(self, s: float) -> Sizes:
        def r(split):
            return tuple(max(2, round(v * s)) for v in split)

        return Sizes(r(self.scenes), r(self.clotho), max(7, round(self.esc_per_class * s)), r(self.nlar))


def ytid(rng: random.Random) -> str:
    """An 11-character YouTube-style id; some begin with '-', as real ones do."""
    chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return "".join(rng.choice(chars) for _ in range(11))


def holds_other_data(out: str | Path) -> bool:
    """Whether `out` is a folder with something in it but no synth.json: data this module did not write (a real
    data set, say), which it must never replace."""
    out = Path(out)
    return out.is_dir() and any(out.iterdir()) and not (out / "synth.json").is_file()


def generate(out: str | Path, seed: int = 0, scale: float = 1.0, length: float = 5.12) -> Path:
    """Write the benchmark under `out` unless the same arguments already wrote it there (then return at once).
    One that an older VERSION of this module wrote, or whose writing was interrupted, is written again; one written
    with another seed, scale or length is refused (other runs read it: another benchmark goes to a folder of its
    own), and so is a folder that holds anything else."""
    out = Path(out)
    if length < LONGEST:
        raise SettingError(f"a scene of {length} s cannot hold the longest sound ({LONGEST} s); give --length of at "
                           f"least {LONGEST}")
    if holds_other_data(out):
        raise ForeignDataError(f"{out}: holds files but no synth.json, so it is not a synthetic benchmark written "
                              "here; refusing to replace it (generate into an empty or new folder)")
    args = {"version": VERSION, "seed": seed, "scale": scale, "length": length}
    manifest = out / "synth.json"
    written = json.loads(manifest.read_text()).get("args") if manifest.is_file() else None
    if written == args:
        return out
    if written and written.get("version") == VERSION:  # the same version, other arguments
        refuse_to_replace(out, written, args)
    build(out, seed, scale, length)
    return out


def refuse_to_replace(out: Path, written: dict, wanted: dict):
    """A SettingError: `out` holds data this module (or synth_av) wrote with other arguments, which runs read (every
    argument but the versions, which the caller has found equal, is named where it differs)."""
    differ = [k for k in wanted if k not in ("version", "synth") and written.get(k) != wanted[k]]
    was, now = (", ".join(f"{k} {a[k]}" for k in differ) for a in (written, wanted))
    suffix = "-".join(f"{k}{wanted[k]}" for k in differ)
    raise SettingError(f"{out}: holds the synthetic benchmark written with {was}, which other runs read; {now} is "
                       f"another benchmark: give it a folder of its own (e.g. --data_root={out}-{suffix}), or remove "
                       f"{out} to replace it (a run reads the one its --synth_seed and --synth_scale name)")


def build(out: str | Path, seed: int = 0, scale: float = 1.0, length: float = 5.12) -> dict:
    """Write the whole benchmark under `out` (replacing what is there), deterministic in (seed, scale, length).
    Returns the ground truth it wrote, for tests: {"pool", "clotho", "esc50", "nlar"}."""
    out = Path(out)
    args = {"version": VERSION, "seed": seed, "scale": scale, "length": length}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)  # marked as ours from the start: an interrupted run is replaced by the next, not refused
    (out / "synth.json").write_text(json.dumps({"args": None, "incomplete": "being written, or interrupted"}))
    sizes = Sizes().scaled(scale)
    rng, trng = np.random.default_rng(seed), random.Random(seed)
    names = [c.name for c in TRAIN_CLASSES]
    splits = ("train", "val", "test")

    # the AudioSet / AudioCaps / strong-label pool
    pool = {s: [] for s in splits}
    used = set()
    for split, count in zip(splits, sizes.scenes):
        for _ in range(count):
            yid = ytid(trng)
            while yid in used:
                yid = ytid(trng)
            used.add(yid)
            audio, events = make_scene(rng, TRAIN_CLASSES, length)
            write_wav(out / "audio" / f"Y{yid}.wav", audio)
            pool[split].append((yid, events, captions(trng, events)))
    _write_audioset(out / "audioset", pool, length)
    _write_audiocaps(out / "audiocaps", pool, trng)

    # Clotho and Clotho-AQA style: their own scenes, file names with spaces
    clotho = {s: [] for s in splits}
    for split, count in zip(splits, sizes.clotho):
        balance = AnswerBalance()
        for i in range(count):
            audio, events = make_scene(rng, TRAIN_CLASSES, length)
            name = f"synthetic scene {split} {i:04d}.wav"
            clotho[split].append((name, events, captions(trng, events), aqa_questions(trng, events, names, balance)))
            path = out / "clotho" / CLOTHO_SPLITS[split] / name
            write_wav(path, audio)
            _link(path, out / "clotho_aqa" / "audio_files" / name)  # Clotho-AQA reuses Clotho's audio
    _write_clotho(out, clotho, trng)

    # ESC-50 style: the novel classes, one class per 5 s clip, 5 folds
    rows = []
    for target, cls in enumerate(NOVEL_CLASSES):
        for k in range(sizes.esc_per_class):
            fold, src, take = k % 5 + 1, 100000 + target * 1000 + k, "ABCDE"[k // 5 % 5]
            audio, _ = make_scene(rng, [cls], 5.0, n_types=(1, 1), n_times=(1, 2))
            fname = f"{fold}-{src}-{take}-{target}.wav"
            write_wav(out / "esc50" / "audio" / fname, audio)
            rows.append([fname, fold, target, cls.name, "False", src, take])
    rows.sort(key=lambda r: (r[1], r[0]))
    _write_csv(out / "esc50" / "meta" / "esc50.csv",
               [["filename", "fold", "target", "category", "esc10", "src_file", "take"], *rows])

    # NLAR: pairs of pool clips of the same split, about three questions a pair, their answers balanced per form
    # (so more pairs than `count`, at most three times as many, make up the 3 * count questions)
    nlar = {}
    for split, count in zip(splits, sizes.nlar):
        items = nlar[split] = []
        balance = AnswerBalance()
        for _ in range(3 * count):
            if len(items) >= 3 * count:
                break
            (y1, e1, _), (y2, e2, _) = trng.sample(pool[split], 2)
            for q, a in nlar_questions(trng, e1, e2, k=min(3, 3 * count - len(items)), balance=balance):
                items.append({"audio_1": f"Y{y1}.wav", "audio_2": f"Y{y2}.wav", "question": q, "answer": a})
        if len(items) < 3 * count:  # the balance refused too many of the pairs' questions: say so, keep what was made
            warnings.warn(f"NLAR {split}: {len(items)} of the {3 * count} questions asked for; the {3 * count} pairs "
                          "drawn could not give more with their answers balanced", stacklevel=2)
        path = out / "nlar" / f"nlar_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(items, indent=1))

    (out / "synth.json").write_text(json.dumps({"args": args, "classes": [c.name for c in CLASSES],
                                               "novel": [c.name for c in NOVEL_CLASSES]}, indent=1))
    return {"pool": pool, "clotho": clotho, "esc50": rows, "nlar": nlar}


def _link(src: Path, dst: Path):
    """A hard link where the file system allows it, else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copyfile(src, dst)


def _write_csv(path: Path, rows, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", **{k: v for k, v in kw.items() if k == "encoding"}) as f:
        csv.writer(f, lineterminator=kw.get("lineterminator", "\n")).writerows(rows)


def _write_audioset(root: Path, pool, length):
    root.mkdir(parents=True, exist_ok=True)
    (root / "class_labels_indices.csv").write_text(  # the real file quotes every display name
        "index,mid,display_name\n" + "".join(f'{i},{mid(c.name)},"{c.name.capitalize()}"\n'
                                             for i, c in enumerate(TRAIN_CLASSES)))
    (root / "mid_to_display_name.tsv").write_text("".join(f"{mid(c.name)}\t{c.name.capitalize()}\n"
                                                          for c in TRAIN_CLASSES))
    for split, fname, strong in (("train", "balanced_train_segments.csv", "audioset_train_strong.tsv"),
                                 ("test", "eval_segments.csv", "audioset_eval_strong.tsv")):
        rows, positives = [], 0
        tsv = ["segment_id\tstart_time_seconds\tend_time_seconds\tlabel\n"]
        for yid, events, _ in pool[split]:
            labels = [mid(x) for x in dict.fromkeys(e.label for e in events)]
            rows.append(f'{yid}, 0.000, {length:.3f}, "{",".join(labels)}"\n')
            positives += len(labels)
            tsv += [f"{yid}_0\t{e.onset:.3f}\t{e.offset:.3f}\t{mid(e.label)}\n" for e in events]
        (root / fname).write_text("".join([
            "# Segments csv created by apt_min.synth\n",
            f"# num_ytids={len(rows)}, num_segs={len(rows)}, num_unique_labels={len(TRAIN_CLASSES)}, "
            f"num_positive_labels={positives}\n", "# YTID, start_seconds, end_seconds, positive_labels\n", *rows]))
        (root / strong).write_text("".join(tsv))


def _write_audiocaps(root: Path, pool, trng):
    next_id = 1
    for split in ("train", "val", "test"):
        rows = []
        for yid, _, caps in pool[split]:
            for cap in caps[:1] if split == "train" else caps:  # train: one caption per clip; val/test: five
                rows.append([next_id, yid, 0, cap])
                next_id += 1
        if split != "train":
            trng.shuffle(rows)  # a clip's five rows are not adjacent, as in the real files
        _write_csv(root / f"{split}.csv", [["audiocap_id", "youtube_id", "start_time", "caption"], *rows],
                   lineterminator="\r\n")


def _write_clotho(out: Path, clotho, trng):
    for split, name in CLOTHO_SPLITS.items():
        rows = [["file_name"] + [f"caption_{i}" for i in range(1, 6)]]
        rows += [[fname, *caps] for fname, _, caps, _ in clotho[split]]
        _write_csv(out / "clotho" / f"clotho_captions_{name}.csv", rows)
        aqa = [["file_name", "QuestionText", "answer", "confidence"]]
        for fname, _, _, questions in clotho[split]:
            for q, a in questions:
                for variant in (a, a.capitalize(), a + "."):  # three annotators; answers need normalising
                    aqa.append([fname, q, variant, "yes"])
        _write_csv(out / "clotho_aqa" / f"clotho_aqa_{split}.csv", aqa, encoding="latin-1")


# ------------------------------------------------------------------------------------------------ the LLM's text


def describe(events, names: dict | None = None) -> str:
    """A scene as text, events in time order: "bell at 0.1s-0.9s; siren at 1.1s-1.8s." `names` renames labels."""
    from apt_min.tasks import fmt_time

    return "; ".join(f"{(names or {}).get(e.label, e.label)} at {fmt_time(e.onset)}s-{fmt_time(e.offset)}s"
                     for e in events) + "."


def lm_corpus(root: str | Path, split: str, seed: int = 0) -> list[list[str]]:
    """Documents for pretraining the tiny stand-in LLM (`train.py --stage lm`): every task of the benchmark, with
    a text description of each scene (`describe`) where APT will put a clip's acoustic prompts. So the LLM learns
    the language of the tasks and to answer from a described scene; APT later learns to describe the audio.
    Each document is a list of pieces, tokenised one by one as APT tokenises its segments. Few-shot documents
    describe clips with invented code words instead of class names, so the answer must be found by matching the
    query to a support clip, which is what novel classes will need. Built from the files `build` wrote (split:
    "train" or "test", the splits with strong labels)."""
    from apt_min import data, tasks

    root, rng = Path(root), random.Random(f"{seed}/{split}")
    names = data.read_mid_to_name(root / "audioset" / "mid_to_display_name.tsv")
    strong = data.read_strong_labels(root / data.LAYOUT["audioset"]["strong"][split])
    scenes = {ytid: sorted((Event(names[m].lower(), on, off, 0.0) for m, on, off in rows), key=lambda e: e.onset)
              for (ytid, _), rows in strong.items()}
    caps = {}
    for _, ytid, _, caption in data.read_audiocaps(root / "audiocaps" / f"{split}.csv"):
        caps.setdefault(ytid, []).append(caption)
    vocabulary = sorted({e.label for ev in scenes.values() for e in ev})
    docs, aqa_balance, nlar_balance = [], AnswerBalance(), AnswerBalance()
    for ytid, events in scenes.items():
        d, n = describe(events), counts(events)
        label = rng.choice(sorted(n))
        spans = [(e.onset, e.offset) for e in events if e.label == label]
        start, end = rng.choice([(e.onset, e.offset) for e in events])
        triples = [(e.label, e.onset, e.offset) for e in events]
        docs += [
            [d, tasks.prompt("tagging", rng), tasks.format_labels(dict.fromkeys(e.label for e in events))],
            [d, tasks.prompt("sed", rng, label=label), tasks.format_segments(spans)],
            [d, tasks.prompt("counting", rng, label=label), tasks.format_count(n[label])],
            [d, tasks.prompt("ter", rng, start=tasks.fmt_time(start), end=tasks.fmt_time(end)),
             tasks.format_labels(tasks.labels_between(triples, start, end))],
            *([d, tasks.prompt("captioning", rng), c] for c in caps.get(ytid, [])[:2]),
            *([d, q, a] for q, a in aqa_questions(rng, events, vocabulary, aqa_balance)[:3]),
        ]
    ids = sorted(scenes)
    for _ in range(len(ids)):  # NLAR over pairs of described scenes
        a, b = rng.sample(ids, 2)
        docs += [[describe(scenes[a]), describe(scenes[b]), q, ans] for q, ans in
                 nlar_questions(rng, scenes[a], scenes[b], k=2, balance=nlar_balance)]
    single = [ev for ev in scenes.values() if len(counts(ev)) == 1]
    by_label = {}
    for ev in single:
        by_label.setdefault(ev[0].label, []).append(ev)
    eligible = [x for x, evs in by_label.items() if len(evs) >= 2]
    for _ in range(len(ids) // 2 if len(eligible) >= 4 else 0):  # 4-way 1-shot episodes
        labels, code = rng.sample(eligible, 4), {}
        while len(set(code.values())) < len(labels):  # four different code words
            code = {x: "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(3)) for x in labels}
        answer = rng.choice(labels)
        shots = [(x, rng.choice(by_label[x])) for x in labels]
        rng.shuffle(shots)
        doc = []
        for x, ev in shots:
            doc += [describe(ev, code), tasks.PROMPTS["fewshot"][0].format(label=x)]
        shown = dict(shots)[answer]
        query = rng.choice([ev for ev in by_label[answer] if ev is not shown])
        docs.append(doc + [describe(query, code), tasks.FEWSHOT_QUERY, answer])
    rng.shuffle(docs)
    return docs


# ------------------------------------------------------------------------------------------------------------ plot


def plot_scene(wave, events, ax=None, title: str | None = None):
    """A log-mel spectrogram with each event drawn as a labelled box (for the notebooks)."""
    import matplotlib.pyplot as plt
    import torch

    from apt_min.audio import kaldi_fbank

    feats = kaldi_fbank(torch.as_tensor(wave, dtype=torch.float32)).T.numpy()  # (128, frames)
    ax = ax or plt.subplots(figsize=(10, 3))[1]
    ax.imshow(feats, origin="lower", aspect="auto", extent=(0, feats.shape[1] / 100, 0, feats.shape[0]), cmap="magma")
    for i, e in enumerate(events):
        y = 8 + (i % 6) * 20
        ax.add_patch(plt.Rectangle((e.onset, y - 6), e.offset - e.onset, 12, fill=False, color="cyan", lw=1.5))
        ax.text(e.onset, y + 7, e.label, color="cyan", fontsize=8)
    ax.set(xlabel="seconds", ylabel="mel bin", title=title)
    return ax


@clean_exit("python -m apt_min.synth")
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/synth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every split size")
    ap.add_argument("--length", type=float, default=5.12, help="scene length in seconds")
    args = ap.parse_args(argv)
    out = generate(args.out, args.seed, args.scale, args.length)
    digest = hashlib.sha256((out / "synth.json").read_bytes()).hexdigest()[:12]
    print(f"synthetic benchmark in {out} (manifest {digest})")


if __name__ == "__main__":
    main()

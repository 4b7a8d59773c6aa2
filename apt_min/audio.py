"""The audio front end: from a file to the normalised log-mel windows that Audio-MAE reads (paper §3.1, §4.1).

    load(path)          -> (N,) float32 mono waveform at 16 kHz
    duration(path)      -> seconds, from the file's header (SED's whole-clip baseline)
    kaldi_fbank(wave)   -> (F, 128) Kaldi-compatible log-mel filter banks, F = 1 + (N - 400) // 160
    fbank(wave, T)      -> (W, T, 128) normalised windows of T frames (T = 1024: 10.24 s in the paper preset)

A clip longer than one window is never cut short: it becomes W windows, the last one zero-padded, and the caller gets
all of them. The filter banks are written out here (checked against torchaudio.compliance.kaldi.fbank in the tests)
with Audio-MAE's arguments: 25 ms Hanning window, 10 ms shift, 128 mel bins, no energy term, no dither.
"""

from __future__ import annotations

import logging
import math
import struct
from pathlib import Path

import numpy as np
import torch

from apt_min.errors import UserError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms
FFT_SIZE = 512  # the frame zero-padded to the next power of two, as Kaldi does
PREEMPHASIS = 0.97
LOW_FREQ = 20.0  # Kaldi's default lower edge of the first mel filter; the upper edge is Nyquist
NORM_MEAN, NORM_STD = -4.2677393, 4.5689974  # Audio-MAE's AudioSet fbank statistics
_resample_logged: set[int] = set()


class AudioError(UserError, ValueError):
    """An audio file that cannot be used; the message names the file and what is wrong with it."""


def duration(path: str | Path) -> float:
    """A file's length in seconds, from its header (nothing decoded)."""
    import soundfile as sf

    try:
        return sf.info(str(path)).duration
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(f"{path}: not a readable audio file ({e})") from None


def not_a_file(path: str | Path) -> str:
    """What is wrong with an audio path that is not a file: a folder, or nothing at all."""
    return f"{path}: a folder, not an audio file" if Path(path).is_dir() else f"{path}: no such audio file"


def load(path: str | Path) -> torch.Tensor:
    """Read any file soundfile reads (wav, flac, ogg, mp3, ...), average the channels to mono, resample to 16 kHz.
    Returns (N,) float32 in [-1, 1]. Raises AudioError for a missing, empty, unreadable or truncated file and for
    NaN or infinite samples. Silence is fine."""
    import soundfile as sf
    import torchaudio

    path = Path(path)
    if not path.is_file():
        raise AudioError(not_a_file(path))
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (N, channels)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(f"{path}: not a readable audio file ({e})") from None
    if path.suffix.lower() == ".wav":
        _check_wav_complete(path, data.shape[0], data.shape[1])
    if data.shape[0] == 0:
        raise AudioError(f"{path}: holds no samples")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: contains NaN or infinite samples")
    wave = torch.from_numpy(data).mean(dim=1)  # (N,)
    if rate != SAMPLE_RATE:
        if rate not in _resample_logged:
            _resample_logged.add(rate)
            log.info("resampling audio from %d Hz to %d Hz (first seen in %s)", rate, SAMPLE_RATE, path)
        wave = torchaudio.functional.resample(wave, rate, SAMPLE_RATE)
    return wave


def _check_wav_complete(path: Path, frames: int, channels: int):
    """libsndfile quietly reads what is left of a cut-off WAV; compare with the size its header declares."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return  # RF64 / WAVEX variants: trust libsndfile
        while chunk := f.read(8):
            if len(chunk) < 8:
                return
            cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                present = path.stat().st_size - f.tell()
                if size not in (0, 0xFFFFFFFF) and present < size:  # 0 / 0xFFFFFFFF: written by a streaming tool
                    raise AudioError(f"{path}: truncated WAV: the header declares {size} bytes of audio, the file "
                                     f"holds {present} ({frames} frames of {channels} channels were readable)")
                return
            f.seek(size + (size & 1), 1)  # chunks are padded to an even size


def mel_filterbank(num_mel_bins: int = 128) -> torch.Tensor:
    """Kaldi's triangular mel filters over the FFT bins: (num_mel_bins, FFT_SIZE // 2 + 1).
    Triangles are equally spaced on the mel scale 1127 ln(1 + f / 700) between LOW_FREQ and Nyquist; the weights are
    linear in mel (not in Hz), as in Kaldi; the Nyquist bin gets no weight. Computed in float32, in the order
    torchaudio computes it, so the two agree to the last bits."""
    lo, hi = (1127.0 * math.log(1.0 + f / 700.0) for f in (LOW_FREQ, SAMPLE_RATE / 2))
    step = (hi - lo) / (num_mel_bins + 1)
    i = torch.arange(num_mel_bins)[:, None]  # (num_mel_bins, 1)
    left, center, right = lo + i * step, lo + (i + 1) * step, lo + (i + 2) * step
    bins = 1127.0 * (1.0 + torch.arange(FFT_SIZE // 2) * (SAMPLE_RATE / FFT_SIZE) / 700.0).log()  # (256,) in mel
    up, down = (bins - left) / (center - left), (right - bins) / (right - center)
    weights = torch.minimum(up, down).clamp(min=0)  # (num_mel_bins, 256)
    return torch.nn.functional.pad(weights, (0, 1))  # (num_mel_bins, 257)


def kaldi_fbank(wave: torch.Tensor, num_mel_bins: int = 128) -> torch.Tensor:
    """Log-mel filter bank energies of a 16 kHz waveform (N,) -> (F, num_mel_bins), F = 1 + (N - 400) // 160
    (only whole frames, Kaldi's snip_edges). Per frame: remove its DC offset, pre-emphasise (x[i] - 0.97 x[i-1]),
    apply a symmetric Hanning window, zero-pad to 512, take the power spectrum, pool it with the mel filters, log."""
    wave = wave if wave.dtype == torch.float64 else wave.float()  # float64 is kept (the tests use it)
    frames = wave.unfold(0, FRAME_LENGTH, FRAME_SHIFT)  # (F, 400), a view
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # x[-1] := x[0], as Kaldi does
    frames = frames - PREEMPHASIS * previous
    window = torch.hann_window(FRAME_LENGTH, periodic=False, dtype=wave.dtype)  # 0.5 - 0.5 cos(2 pi n / 399)
    power = torch.fft.rfft(frames * window, n=FFT_SIZE).abs().pow(2)  # (F, 257)
    mel = power @ mel_filterbank(num_mel_bins).to(wave.dtype).T  # (F, num_mel_bins)
    return mel.clamp(min=torch.finfo(torch.float32).eps).log()  # Kaldi's floor: float32 epsilon


def fbank(wave: torch.Tensor, target_length: int = 1024, num_mel_bins: int = 128) -> torch.Tensor:
    """Normalised fbank windows of `target_length` frames for a 16 kHz waveform (N,) -> (W, target_length, mel).

    The waveform's mean is removed, as Audio-MAE does. The frames of the whole clip are then split into consecutive
    windows, each computed from just the samples its frames cover (so memory stays bounded for long files); the last
    window is zero-padded and then normalised, as Audio-MAE pads before normalising. A clip of at most one window is
    exactly Audio-MAE's input; a clip shorter than one frame (25 ms) is zero-padded to one frame."""
    wave = wave.float()
    wave = wave - wave.mean()
    if wave.numel() < FRAME_LENGTH:
        wave = torch.nn.functional.pad(wave, (0, FRAME_LENGTH - wave.numel()))
    n_frames = 1 + (wave.numel() - FRAME_LENGTH) // FRAME_SHIFT
    windows = []
    for first in range(0, n_frames, target_length):
        count = min(target_length, n_frames - first)
        start = first * FRAME_SHIFT
        feats = kaldi_fbank(wave[start:start + (count - 1) * FRAME_SHIFT + FRAME_LENGTH], num_mel_bins)  # (count, mel)
        feats = torch.nn.functional.pad(feats, (0, 0, 0, target_length - count))  # (target_length, mel)
        windows.append((feats - NORM_MEAN) / (2 * NORM_STD))
    return torch.stack(windows)  # (W, target_length, mel)


def load_fbank(path: str | Path, target_length: int = 1024, num_mel_bins: int = 128) -> torch.Tensor:
    """File -> (W, target_length, num_mel_bins): `load` then `fbank`."""
    return fbank(load(path), target_length, num_mel_bins)

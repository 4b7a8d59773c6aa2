"""The front end: Kaldi fbank parity with torchaudio, Audio-MAE's normalisation, and every kind of awkward file."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from apt_min import audio
from apt_min.audio import AudioError

KALDI_ARGS = dict(htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
                  num_mel_bins=128, dither=0.0, frame_shift=10)  # Audio-MAE's call


def tone(seconds, rate=16000, freq=440.0, channels=1, amp=0.3):
    t = np.arange(int(seconds * rate)) / rate
    x = amp * np.sin(2 * np.pi * freq * t) + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_kaldi_fbank_matches_torchaudio(dtype, atol):
    for n in (400, 401, 16000, 163840):
        wave = torch.from_numpy(tone(n / 16000)[:, 0]).to(dtype)
        ref = torchaudio.compliance.kaldi.fbank(wave[None], **KALDI_ARGS)
        assert (audio.kaldi_fbank(wave) - ref).abs().max() <= atol


def test_front_end_equals_audio_mae_recipe():
    """One 10 s clip, the way Audio-MAE's data loader prepares it: mean removed, kaldi fbank, zero-padded from 998
    to 1024 frames, then (x - mean) / (2 std)."""
    wave = torch.from_numpy(tone(10.0)[:, 0])
    ref = torchaudio.compliance.kaldi.fbank((wave - wave.mean())[None], **KALDI_ARGS)  # (998, 128)
    ref = torch.nn.functional.pad(ref, (0, 0, 0, 1024 - ref.shape[0]))
    ref = (ref - (-4.2677393)) / (4.5689974 * 2)
    ours = audio.fbank(wave, target_length=1024)
    assert ours.shape == (1, 1024, 128)
    assert (ours[0] - ref).abs().max() <= 1e-5


def test_long_audio_becomes_every_window():
    wave = torch.from_numpy(tone(25.0)[:, 0])  # 2498 frames -> windows of 1024, 1024, 450 (+ padding)
    win = audio.fbank(wave, target_length=1024)
    assert win.shape == (3, 1024, 128)
    # the windows partition the frames of the whole clip: nothing is cut, nothing repeated
    whole = (audio.kaldi_fbank(wave - wave.mean()) - (-4.2677393)) / (4.5689974 * 2)  # (2498, 128)
    assert torch.allclose(win.flatten(0, 1)[:2498], whole, atol=1e-5)
    padded = (0 - (-4.2677393)) / (4.5689974 * 2)
    assert torch.all(win[2, 450:] == padded) and not torch.all(win[2, 449] == padded)


@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"),
                                          ("MP3", "MPEG_LAYER_III")])
def test_formats(tmp_path, fmt, subtype):
    x = tone(1.0)
    f = tmp_path / f"clip.{fmt.lower()}"
    sf.write(f, x, 16000, format=fmt, subtype=subtype)
    wave = audio.load(f)
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert abs(wave.numel() - 16000) <= 1200  # lossy codecs add encoder delay/padding
    if fmt in ("WAV", "FLAC"):
        assert torch.allclose(wave, torch.from_numpy(x[:, 0]), atol=1e-4)


@pytest.mark.parametrize("channels", [2, 8])
def test_channels_are_averaged(tmp_path, channels):
    x = tone(0.5, channels=channels)
    x[:, 0] = 0.0  # channels differ: the mean is not any one of them
    sf.write(tmp_path / "multi.wav", x, 16000, subtype="FLOAT")
    assert torch.allclose(audio.load(tmp_path / "multi.wav"), torch.from_numpy(x.mean(axis=1)), atol=1e-6)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_other_rates_are_resampled(tmp_path, rate, caplog):
    x = tone(1.0, rate=rate, freq=1000.0)
    sf.write(tmp_path / "r.wav", x, rate, subtype="FLOAT")
    with caplog.at_level("INFO", logger="apt_min.audio"):
        wave = audio.load(tmp_path / "r.wav")
    assert wave.numel() == 16000
    ref = torchaudio.functional.resample(torch.from_numpy(x[:, 0]), rate, 16000)
    assert torch.allclose(wave, ref, atol=1e-6)
    peak = torch.fft.rfft(wave).abs().argmax().item()  # 1 Hz per bin for a 1 s clip
    assert peak == 1000


def test_pure_silence_is_fine(tmp_path):
    sf.write(tmp_path / "silence.wav", np.zeros(16000, dtype=np.float32), 16000)
    win = audio.load_fbank(tmp_path / "silence.wav")
    assert win.shape == (1, 1024, 128) and torch.isfinite(win).all()


def test_a_few_samples_are_padded(tmp_path):
    sf.write(tmp_path / "tiny.wav", tone(5 / 16000), 16000)
    win = audio.load_fbank(tmp_path / "tiny.wav", target_length=512)
    assert win.shape == (1, 512, 128) and torch.isfinite(win).all()


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="nowhere.wav: no such audio file"):
        audio.load(tmp_path / "nowhere.wav")


def test_empty_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="empty.wav: empty file"):
        audio.load(tmp_path / "empty.wav")


def test_text_renamed_wav(tmp_path):
    (tmp_path / "notes.wav").write_text("these are not samples\n" * 20)
    with pytest.raises(AudioError, match="notes.wav: not a readable audio file"):
        audio.load(tmp_path / "notes.wav")


def test_truncated_wav(tmp_path):
    sf.write(tmp_path / "full.wav", tone(1.0), 16000, subtype="PCM_16")
    data = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[:len(data) // 2])
    with pytest.raises(AudioError, match=r"cut.wav: truncated WAV: the header declares 32000 bytes"):
        audio.load(tmp_path / "cut.wav")


def test_no_samples(tmp_path):
    sf.write(tmp_path / "zero.wav", np.zeros((0, 1), dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="zero.wav: holds no samples"):
        audio.load(tmp_path / "zero.wav")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_samples(tmp_path, bad):
    x = tone(0.1)
    x[100, 0] = bad
    sf.write(tmp_path / "bad.wav", x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="bad.wav: contains NaN or infinite samples"):
        audio.load(tmp_path / "bad.wav")


def test_ten_minutes_give_59_windows_in_bounded_memory(tmp_path):
    """600 s = 59 999 frames -> 59 windows of 1024. Run in a fresh process so its peak memory is the front end's:
    it must stay near the size of the waveform plus the output, not the size of the whole clip's spectrum."""
    f = tmp_path / "long.wav"
    sf.write(f, tone(600.0), 16000, subtype="PCM_16")
    code = textwrap.dedent(f"""
        import torch
        from apt_min import audio
        def hwm():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
        audio.fbank(torch.zeros(20000))  # warm up the kernels first
        before = hwm()
        win = audio.load_fbank({str(f)!r})
        print(win.shape[0], win.shape[1], win.shape[2], hwm() - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    windows, frames, mels, growth = map(int, out)
    assert (windows, frames, mels) == (59, 1024, 128)
    wave_and_output = 600 * 16000 * 4 + 59 * 1024 * 128 * 4  # 69 MB
    assert growth < 2.5 * wave_and_output, growth  # the whole clip's spectrum at once would need > 4x

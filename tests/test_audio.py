"""The front end: Kaldi fbank parity with torchaudio, Audio-MAE's normalisation, and every kind of awkward file."""

import math
import struct
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
MEAN, STD = -4.2677393, 4.5689974  # Audio-MAE's AudioSet fbank statistics, written out here, not read from audio.py
LSB = 1 / 32768  # one step of 16-bit PCM


def tone(seconds, rate=16000, freq=440.0, channels=1, amp=0.3):
    t = np.arange(int(seconds * rate)) / rate
    x = amp * np.sin(2 * np.pi * freq * t) + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


def normalise(logmel):
    return (logmel - MEAN) / (2 * STD)


def energy_error(ours, ref, normalised=False):
    """The largest difference of two log-mel outputs (..., frames, mel) taken as energies, relative to the largest
    energy of the same frame. A bin's log carries its energy's relative error, and rounding makes that large in
    bins far below the frame's peak (float32 against float64: up to 5e-4 in the log of such bins), so a fixed
    tolerance on the logs would depend on the CPU's rounding; relative to the frame's peak, float32 rounding is
    <= 4.5e-7 and float64 rounding ~1e-15 (measured against float64 runs). Computed in float64."""
    ours, ref = ours.double(), ref.double()
    if normalised:  # back to log-mel: x * 2 std + mean
        ours, ref = ours * (2 * STD) + MEAN, ref * (2 * STD) + MEAN
    e_ours, e_ref = ours.exp(), ref.exp()
    return ((e_ours - e_ref).abs() / e_ref.amax(-1, keepdim=True)).max().item()


# float64 is where exactness is checked (measured 0 here: the same operations as torchaudio's, in the same order);
# float32 gets 1e-5, >= 20x its own rounding against float64, so a CPU that rounds differently still passes
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_kaldi_fbank_matches_torchaudio(dtype, rtol):
    for n in (400, 401, 16000, 163840):
        wave = torch.from_numpy(tone(n / 16000)[:, 0]).to(dtype)
        ref = torchaudio.compliance.kaldi.fbank(wave[None], **KALDI_ARGS)
        ours = audio.kaldi_fbank(wave)
        assert ours.shape == ref.shape and ours.dtype == dtype
        assert energy_error(ours, ref) <= rtol, (n, energy_error(ours, ref))


def test_front_end_equals_audio_mae_recipe():
    """One 10 s clip, the way Audio-MAE's data loader prepares it: mean removed, kaldi fbank, zero-padded from 998
    to 1024 frames, then (x - mean) / (2 std). Measured 0 here; 1e-5 of each frame's peak energy leaves room for
    float32 rounding of the fbank and of the normalisation (together <= 1.5e-6)."""
    wave = torch.from_numpy(tone(10.0)[:, 0])
    ref = torchaudio.compliance.kaldi.fbank((wave - wave.mean())[None], **KALDI_ARGS)  # (998, 128)
    ref = normalise(torch.nn.functional.pad(ref, (0, 0, 0, 1024 - ref.shape[0])))
    ours = audio.fbank(wave, target_length=1024)
    assert ours.shape == (1, 1024, 128)
    assert energy_error(ours[0], ref, normalised=True) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_waveform_of_any_float_type_is_framed_in_float32(dtype):
    """fbank works in float32 whatever the waveform's type: a half or bfloat16 waveform (a GPU pipeline's) gives the
    fbank of its values as float32, not one computed at 3 significant digits; a float64 one, float32 features."""
    wave = torch.from_numpy(tone(1.0)[:, 0]).to(dtype)
    ours = audio.fbank(wave, target_length=128)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, audio.fbank(wave.float(), target_length=128), rtol=0, atol=0)


def test_long_audio_becomes_every_window():
    wave = torch.from_numpy(tone(25.0)[:, 0])  # 2498 frames -> windows of 1024, 1024, 450 (+ padding)
    win = audio.fbank(wave, target_length=1024)
    assert win.shape == (3, 1024, 128)
    # the windows partition the frames of the whole clip: nothing is cut, nothing repeated (measured 0 here; the
    # windows' matrix products have other shapes than the whole clip's, so a CPU may round them differently)
    whole = normalise(audio.kaldi_fbank(wave - wave.mean()))  # (2498, 128)
    assert energy_error(win.flatten(0, 1)[:2498], whole, normalised=True) <= 1e-5
    padded = normalise(0.0)
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
    # the lossy codecs keep the tone: its 440 Hz the strongest frequency, its loudness (RMS) within 10 %
    spectrum = np.abs(np.fft.rfft(wave.numpy()))
    assert abs(np.fft.rfftfreq(wave.numel(), 1 / 16000)[spectrum.argmax()] - 440) < 2
    assert abs(wave.pow(2).mean().sqrt().item() / np.sqrt((x ** 2).mean()) - 1) < 0.1
    if fmt in ("WAV", "FLAC"):
        # 16-bit quantisation: the WAV writer floors x * 32768 (measured 0.99995 LSB), the FLAC one rounds it
        # (0.5 LSB); deterministic integer arithmetic, so 2 LSB is a safe bound
        assert (wave.double() - torch.from_numpy(x[:, 0]).double()).abs().max().item() <= 2 * LSB


def test_an_rf64_file_is_read_as_its_wav(tmp_path):
    """RF64 (a WAV whose sizes may pass 4 GB: its RIFF sizes are placeholders, the real ones in a ds64 chunk) is
    read as libsndfile reads it; the cut-off check, which reads the RIFF sizes, leaves it alone."""
    x = tone(1.0)
    sf.write(tmp_path / "clip.wav", x, 16000, format="RF64", subtype="PCM_16")
    sf.write(tmp_path / "plain.wav", x, 16000, format="WAV", subtype="PCM_16")
    assert (tmp_path / "clip.wav").read_bytes()[:4] == b"RF64"
    assert torch.equal(audio.load(tmp_path / "clip.wav"), audio.load(tmp_path / "plain.wav"))


@pytest.mark.parametrize("channels", [2, 8])
def test_channels_are_averaged(tmp_path, channels):
    x = tone(0.5, channels=channels)
    x[:, 0] = 0.0  # channels differ: the mean is not any one of them
    sf.write(tmp_path / "multi.wav", x, 16000, subtype="FLOAT")
    expected = torch.from_numpy(x.astype(np.float64).mean(axis=1))
    # a float32 mean of up to 8 channels: measured <= 0.82 float32 ulp of the signal's peak; 8 ulp bounds it
    tol = 8 * np.finfo(np.float32).eps * np.abs(x).max()
    assert (audio.load(tmp_path / "multi.wav").double() - expected).abs().max().item() <= tol


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_other_rates_are_resampled(tmp_path, rate, caplog):
    """A pure 1 kHz tone written at another rate must come back as that tone sampled at 16 kHz: compared with the
    analytic sine, not with the resampler's own output, away from the first and last 4 ms where the filter runs off
    the clip. Measured: the windowed-sinc filter's passband ripple leaves <= 4.5e-4 of the amplitude (22.05 kHz;
    8 kHz: 1.7e-4); 2e-3 is 4x that, while a 1 % gain error (1e-2) or a one-sample shift (0.38) fails."""
    amp, freq = 0.3, 1000.0
    x = (amp * np.sin(2 * np.pi * freq * np.arange(rate) / rate)).astype(np.float32)  # 1 s, no noise
    sf.write(tmp_path / "r.wav", x, rate, subtype="FLOAT")
    with caplog.at_level("INFO", logger="apt_min.audio"):
        wave = audio.load(tmp_path / "r.wav")
    assert wave.numel() == 16000
    expected = amp * np.sin(2 * np.pi * freq * np.arange(16000) / 16000)
    edge = 64  # 4 ms
    error = np.abs(wave.double().numpy() - expected)[edge:-edge].max()
    assert error <= 2e-3 * amp, error
    peak = torch.fft.rfft(wave).abs().argmax().item()  # 1 Hz per bin for a 1 s clip
    assert peak == 1000


def test_pure_silence_is_fine(tmp_path):
    """Silence is a valid clip: every bin sits at Kaldi's floor, log(float32 eps), normalised. The expectation is
    computed in float64 from the constants; the float32 front end holds it to 0.1 ulp (measured), 4 ulp allowed."""
    floor = normalise(math.log(torch.finfo(torch.float32).eps))  # -1.2776
    tol = 4 * float(np.spacing(np.float32(abs(floor))))
    n = 400 + 1023 * 160  # exactly 1024 frames: no padding, every value is the floor
    sf.write(tmp_path / "silence.wav", np.zeros(n, dtype=np.float32), 16000)
    win = audio.load_fbank(tmp_path / "silence.wav")
    assert win.shape == (1, 1024, 128)
    assert (win.double() - floor).abs().max().item() <= tol
    # 1 s: 98 frames at the floor, then padding, which is 0 normalised
    sf.write(tmp_path / "second.wav", np.zeros(16000, dtype=np.float32), 16000)
    win = audio.load_fbank(tmp_path / "second.wav").double()
    assert (win[0, :98] - floor).abs().max().item() <= tol
    assert (win[0, 98:] - normalise(0.0)).abs().max().item() <= tol


@pytest.mark.parametrize("n", [5, 300, 399, 400, 401])
def test_a_few_samples_are_padded(tmp_path, n):
    """A clip shorter than one 25 ms frame: its mean removed, zero-padded to one 400-sample frame, then padded to
    the window and normalised. The reference is torchaudio's fbank of that wave. 5 samples sit where the Hann window
    is ~0 (every bin lands on the floor); 300 samples give a real spectrum, and where the padding goes matters;
    399 is one sample short of a frame, 400 and 401 make one frame unpadded."""
    sf.write(tmp_path / "tiny.wav", tone(n / 16000), 16000)
    win = audio.load_fbank(tmp_path / "tiny.wav", target_length=512)
    assert win.shape == (1, 512, 128)
    x = torch.from_numpy(sf.read(tmp_path / "tiny.wav", dtype="float32")[0])  # (n,)
    x = torch.nn.functional.pad(x - x.mean(), (0, max(0, 400 - n)))
    ref = torchaudio.compliance.kaldi.fbank(x[None], **KALDI_ARGS)  # (1, 128)
    ref = normalise(torch.nn.functional.pad(ref, (0, 0, 0, 511)))
    assert energy_error(win[0], ref, normalised=True) <= 1e-5  # measured 0 here


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
    (tmp_path / "cut.wav").write_bytes(data[:-1])  # one byte short: half a sample gone
    with pytest.raises(AudioError, match=r"cut.wav: truncated WAV: the header declares 32000 bytes of audio, the "
                                         r"file holds 31999"):
        audio.load(tmp_path / "cut.wav")
    sf.write(tmp_path / "stereo.wav", tone(1.0, channels=2), 16000, subtype="PCM_16")  # what could be read: said
    (tmp_path / "stereo.wav").write_bytes((tmp_path / "stereo.wav").read_bytes()[:44 + 4 * 1000])
    with pytest.raises(AudioError, match=r"stereo.wav: truncated WAV: the header declares 64000 bytes of audio, the "
                                         r"file holds 4000 \(1000 frames of 2 channels were readable\)"):
        audio.load(tmp_path / "stereo.wav")


def riff_wav(pcm: bytes, info: bytes = b"", data_size: int | None = None) -> bytes:
    """A 16 kHz mono 16-bit WAV written byte by byte: RIFF header, fmt chunk, an optional LIST chunk (padded to an
    even size, as RIFF pads every chunk), then the data chunk with the size given (default: the true one)."""
    body = b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
    if info:
        body += b"LIST" + struct.pack("<I", len(info)) + info + b"\0" * (len(info) & 1)
    body += b"data" + struct.pack("<I", len(pcm) if data_size is None else data_size) + pcm
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_the_wav_check_walks_chunks_as_riff_lays_them_out(tmp_path):
    """The truncation check finds the data chunk behind an odd-sized chunk (and its pad byte), in a file named .WAV
    too; a streaming tool's placeholder size (0xFFFFFFFF: length unknown when the header was written) is no
    truncation."""
    samples = (np.arange(16000) % 200 - 100).astype("<i2")
    whole = riff_wav(samples.tobytes(), info=b"INFOa")  # a 5-byte chunk: one pad byte follows
    (tmp_path / "odd.wav").write_bytes(whole)
    torch.testing.assert_close(audio.load(tmp_path / "odd.wav"), torch.from_numpy(samples / 32768).float())
    for name in ("cut.wav", "CUT.WAV"):
        (tmp_path / name).write_bytes(whole[:-10000])
        with pytest.raises(AudioError, match=f"{name}: truncated WAV: the header declares 32000 bytes of audio, "
                                             "the file holds 22000"):
            audio.load(tmp_path / name)
    (tmp_path / "streamed.wav").write_bytes(riff_wav(samples.tobytes(), data_size=0xFFFFFFFF))
    assert audio.load(tmp_path / "streamed.wav").shape == (16000,)


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
    """600 s = 59 998 frames -> 59 windows of 1024. Run in a fresh process so its peak memory is the front end's:
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
    wave_and_output = 600 * 16000 * 4 + 59 * 1024 * 128 * 4  # 69.6 MB
    # Measured (8 fresh processes, glibc malloc): the windowed front end grows the peak by 117-144 MB, 1.7-2.1x
    # wave_and_output: the float32 read and its mono copy (2 x 38 MB), the mean-removed copy, the 59 windows and
    # their stack (2 x 31 MB). The naive front end (the whole clip's kaldi_fbank at once, then normalised) grows it
    # by 576 MB, 8.3x: copies of the (59 998, 400) frames and the (59 998, 257) complex spectrum. 4x (278 MB) lies
    # between: ~1.9x above the real code's worst run and ~2x below the naive one.
    print(f"peak memory growth {growth / 1e6:.0f} MB = {growth / wave_and_output:.2f} x wave and output")
    assert growth < 4 * wave_and_output, growth


def test_duration_reads_the_header_and_names_a_bad_file(tmp_path):
    """audio.duration (SED's whole-clip baseline): seconds from the header, at the file's own rate."""
    sf.write(str(tmp_path / "a.wav"), np.zeros(24000, dtype=np.float32), 8000)
    assert audio.duration(tmp_path / "a.wav") == 3.0
    (tmp_path / "b.wav").write_bytes(b"not audio")
    with pytest.raises(AudioError, match=r"b.wav: not a readable audio file"):
        audio.duration(tmp_path / "b.wav")


def test_a_folder_is_named_as_one(tmp_path):
    with pytest.raises(AudioError, match=f"{tmp_path}: a folder, not an audio file"):
        audio.load(tmp_path)


def test_a_rate_is_logged_once(tmp_path, caplog, monkeypatch):
    """Resampling is logged the first time each rate is seen, not once per file."""
    monkeypatch.setattr(audio, "_resample_logged", set())
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, np.zeros(1100, dtype=np.float32), 11025)
    with caplog.at_level("INFO", logger="apt_min.audio"):
        for name in ("a.wav", "b.wav", "a.wav"):
            audio.load(tmp_path / name)
    assert [r.getMessage() for r in caplog.records] == [f"resampling audio from 11025 Hz to 16000 Hz (first seen in "
                                                        f"{tmp_path / 'a.wav'})"]


def test_load_fbank_passes_the_number_of_mel_bins(tmp_path):
    """load_fbank(path, T, 64): torchaudio's 64-bin fbank of the mean-removed clip, padded to T and normalised."""
    sf.write(tmp_path / "c.wav", tone(0.5), 16000, subtype="FLOAT")
    x = torch.from_numpy(sf.read(tmp_path / "c.wav", dtype="float32")[0])
    ref = torchaudio.compliance.kaldi.fbank((x - x.mean())[None], **(KALDI_ARGS | {"num_mel_bins": 64}))  # (48, 64)
    ref = normalise(torch.nn.functional.pad(ref, (0, 0, 0, 64 - ref.shape[0])))
    win = audio.load_fbank(tmp_path / "c.wav", target_length=64, num_mel_bins=64)
    assert win.shape == (1, 64, 64)
    assert energy_error(win[0], ref, normalised=True) <= 1e-5

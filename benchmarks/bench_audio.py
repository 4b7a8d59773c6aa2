"""File -> fbank -> Audio-MAE features: clips per second and peak memory, batch 8, on CPU (bf16 on a GPU).

For each encoder size (the paper's ViT-B/16 on 10.24 s windows, and a tiny one on 5.12 s windows) a fresh process
reads 8 ten-second 44.1 kHz stereo files, resamples, computes the fbank windows, and encodes them as one batch.
Printed beside ours, measured in the same run: torchaudio's kaldi.fbank on the same waveforms, and transformers'
ViTModel with the same weights running the same number of blocks (ratios > 1: ours is faster). And the front end
decoded by model.ReadAhead's threads (what decode_threads gives training and evaluation where features are not
cached) against one thread here: --threads, by default what decode_threads=-1 takes on a GPU (one per core but one,
at most 8; at least 2).
    python benchmarks/bench_audio.py [--sizes paper tiny] [--repeats 3] [--threads N]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # encoder config overrides; "tiny" is the tiny preset's encoder (apt_min/config.py)
    "paper": {},
    "tiny": {"target_length": 512, "dim": 128, "depth": 2, "heads": 4},
}

CHILD = r"""
import json, sys, time, torch, torchaudio
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests")
from apt_min import audio
from apt_min.audiomae import AudioMAE, AudioMAEConfig
from apt_min.model import ReadAhead, decode_clips
from benchmarks.common import median_seconds

def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024

files, overrides = json.loads(sys.argv[2]), json.loads(sys.argv[3])
repeats, threads = int(sys.argv[4]), int(sys.argv[5])
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
cfg = AudioMAEConfig(**overrides)
torch.manual_seed(0)
model = AudioMAE(cfg)
with torch.no_grad():  # weights at a realistic scale (this measures speed, not quality)
    for p in model.parameters():
        p.normal_(0, 0.02)
model = model.to(device, dtype)
audio.fbank(torch.zeros(20000), cfg.target_length)  # warm-up
model(torch.zeros(1, cfg.target_length, cfg.num_mel_bins, device=device))
before = hwm()

def ours():
    windows = torch.cat([audio.load_fbank(f, cfg.target_length) for f in files])  # (8 * W, T, 128)
    with torch.no_grad():
        return model(windows.to(device))

t_ours = median_seconds(ours, repeats, warmup=0)
peak = hwm() - before
t_front = median_seconds(lambda: [audio.load_fbank(f, cfg.target_length) for f in files], repeats, warmup=0)
ahead = ReadAhead(cfg, threads)
t_front_threads = median_seconds(lambda: decode_clips(files, cfg, ahead=ahead), repeats)

# references in the same process: torchaudio's fbank; transformers' ViT with the same weights and blocks run
waves = [audio.load(f) for f in files]
kw = dict(htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning", num_mel_bins=128,
          dither=0.0, frame_shift=10)
t_kaldi_ours = median_seconds(lambda: [audio.kaldi_fbank(w - w.mean()) for w in waves], repeats)
t_kaldi_ta = median_seconds(lambda: [torchaudio.compliance.kaldi.fbank((w - w.mean())[None], **kw) for w in waves],
                            repeats)
from test_audiomae import to_hf
blocks = cfg.output_block % cfg.depth + 1
hf = to_hf(model.float().cpu())
hf.layers = hf.layers[:blocks]  # the same blocks ours runs; the final layernorm it adds is negligible
hf, model = hf.to(device, dtype), model.to(device, dtype)
x = torch.cat([audio.load_fbank(f, cfg.target_length) for f in files]).to(device)
with torch.no_grad():
    t_enc_ours = median_seconds(lambda: model(x), repeats)
    t_enc_hf = median_seconds(lambda: hf(x[:, None].to(dtype)), repeats)
print(json.dumps(dict(device=device, dtype=str(dtype), files=len(files), ours_s=t_ours, peak_mib=peak / 2**20,
                      front_s=t_front, threads_s=t_front_threads, kaldi_ours_s=t_kaldi_ours, kaldi_ta_s=t_kaldi_ta,
                      enc_s=t_enc_ours, enc_hf_s=t_enc_hf, windows=x.shape[0], blocks=blocks)))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=max(2, min(8, (os.cpu_count() or 1) - 1)))
    args = ap.parse_args()
    from common import downloads_like

    with tempfile.TemporaryDirectory() as tmp:
        files = downloads_like(tmp, 8)
        for size in args.sizes:
            out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), json.dumps(files), json.dumps(SIZES[size]),
                                  str(args.repeats), str(args.threads)], capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            ms = {k: f"{r[k] * 1e3:.1f} ms" for k in r if k.endswith("_s")}
            print(f"{size:>5} encoder ({r['device']}, {r['dtype']}, {r['windows']} windows, {r['blocks']} blocks run): "
                  f"{r['files'] / r['ours_s']:.2f} clips/s file->features ({r['files']} files in {ms['ours_s']}), "
                  f"peak RSS growth {r['peak_mib']:.0f} MiB | front end {ms['front_s']} for {r['files']} files, "
                  f"{args.threads} decode threads {ms['threads_s']} ({r['front_s'] / r['threads_s']:.2f}x); fbank "
                  f"{ms['kaldi_ours_s']} vs torchaudio {ms['kaldi_ta_s']} ({r['kaldi_ta_s'] / r['kaldi_ours_s']:.2f}x)"
                  f" | encoder {ms['enc_s']} vs transformers ViT {ms['enc_hf_s']} ({r['enc_hf_s'] / r['enc_s']:.2f}x)")


if __name__ == "__main__":
    main()

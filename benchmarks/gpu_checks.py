"""The checks that need a CUDA GPU, in one run (the CPU test suite cannot reach these paths):

1. Numerics on the GPU. Our Llama and Audio-MAE against transformers' LlamaForCausalLM and ViTModel with the same
   weights, each in fp32 (TF32 off) and bf16, every output compared with transformers in fp32 as the reference by
   ||out - ref|| / ||ref||. Ours in bf16 should be about as far from the reference as transformers in bf16 is.
2. train.py on the GPU: the test suite's miniature chain (stage 0, lm, 1, 2) with --precision=auto (bf16 autocast,
   frozen modules stored in bf16), then stage 1 again in fp16 with a GradScaler, in fp32, and in bf16 with the LLM's
   blocks compiled (--compile_llm=true); each run must finish with finite losses, and the bf16 run must change the
   aligner's weights. Then evaluate.py --task all on the bf16 chain's result.
3. The paper preset's stage 0 at a contrastive batch of 400 (the top of the public code's range; issue 17): the
   paper-sized aligner (4 layers, 256 wide, 32 queries) on 400 clips' Audio-MAE tokens (512 x 768 each, random here:
   the encoder is frozen; the paper preset computes them each step, not measured here), ATC + ATM + AGTG forward and
   backward under bf16 autocast and one AdamW step: it must run with finite losses; its time and peak memory are
   printed.

Prints one table at the end.  python benchmarks/gpu_checks.py [--out DIR] [--parts numerics,training,stage0]
(--smoke: the same on the CPU, at stage-0 batch 16: a test of the script, run by tests/test_benchmarks.py)
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import save_random_hf_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # conftest's MINI, test_audiomae's to_hf

from apt_min.audiomae import AudioMAE, AudioMAEConfig
from apt_min.llama import Llama

ROOT = Path(__file__).resolve().parents[1]

ROWS = []
DEVICE = "cuda"  # --smoke: "cpu", to try the script itself without a GPU
A100_GIB = 39.0  # an A100 40GB: 39.6 GiB in all, about 39 left for tensors beside the CUDA context


def row(name, value, ok):
    ROWS.append((name, value, "ok" if ok else "FAIL"))
    print(f"{name}: {value} -> {'ok' if ok else 'FAIL'}", flush=True)


def rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def numerics():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory() as tmp:
        hf = save_random_hf_llama(tmp, hidden=1024, layers=4, heads=16, kv_heads=4, intermediate=2816).to(DEVICE)
        ids = torch.randint(3, 32000, (4, 200), device=DEVICE)
        with torch.no_grad():
            ref = hf(ids).logits
            ours32 = Llama.from_pretrained(tmp, dtype=torch.float32, device=DEVICE)
            e32 = rel(ours32(ids), ref)
            del ours32
            ours16 = Llama.from_pretrained(tmp, dtype=torch.bfloat16, device=DEVICE)
            e16 = rel(ours16(ids), ref)
            h16 = rel(hf.to(torch.bfloat16)(ids).logits, ref)
    row("Llama logits, fp32 on GPU vs transformers fp32 (rel. error)", f"{e32:.1e}", e32 < 1e-5)
    row("Llama logits, bf16: ours vs transformers, both against fp32", f"{e16:.2e} vs {h16:.2e}", e16 < 1.5 * h16)

    from test_audiomae import to_hf  # the weight mapping the CPU parity test uses

    cfg = AudioMAEConfig()  # the paper's ViT-B/16 on 10.24 s windows
    torch.manual_seed(0)
    enc = AudioMAE(cfg)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.02)
    vit = to_hf(enc).to(DEVICE)
    enc = enc.to(DEVICE)
    x = torch.randn(4, cfg.target_length, cfg.num_mel_bins, device=DEVICE)
    block = cfg.output_block % cfg.depth + 1
    with torch.no_grad():
        ref = vit(x[:, None], output_hidden_states=True).hidden_states[block][:, 1:]
        e32 = rel(enc(x), ref)
        e16 = rel(enc.to(torch.bfloat16)(x), ref)
        h16 = rel(vit.to(torch.bfloat16)(x[:, None].bfloat16(), output_hidden_states=True).hidden_states[block][:, 1:],
                  ref)
    row("Audio-MAE features, fp32 on GPU vs transformers ViT fp32", f"{e32:.1e}", e32 < 1e-5)
    row("Audio-MAE features, bf16: ours vs transformers, both against fp32", f"{e16:.2e} vs {h16:.2e}",
        e16 < 1.5 * h16)


def run(args, log):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t = time.time()
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    log.write(f"$ {' '.join(args)}\n{out.stdout}\n{out.stderr}\n")
    log.flush()
    return out.returncode, time.time() - t, (out.stderr.strip().splitlines() or [""])[-1] if out.returncode else ""


def losses(run_dir, stage):
    records = [json.loads(line) for line in (Path(run_dir) / f"stage{stage}" / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def training(out: Path):
    from conftest import MINI
    from safetensors.torch import load_file

    # on the GPU, more steps than the miniature's own (3, 3, 4, 2), which --smoke keeps
    more = ["--steps_0=20", "--steps_lm=20", "--steps_1=30", "--steps_2=20"] if DEVICE == "cuda" else []
    more.append("--save_every=1000")
    with tempfile.TemporaryDirectory() as folder, open(out / "gpu_training.log", "w") as log:
        tmp = Path(folder)
        base = [*MINI, *more, f"--data_root={tmp / 'synth'}"]
        for stage in ("0", "lm", "1", "2"):
            rc, sec, err = run(["train.py", "--stage", stage, *base, f"--run_dir={tmp / 'bf16'}"], log)
            row(f"train.py --stage {stage}, precision auto (bf16) on GPU", f"exit {rc}, {sec:.0f} s {err}", rc == 0)
        traces = {"bf16": losses(tmp / "bf16", 1)}
        for precision in ("fp16", "fp32", "compiled") if DEVICE == "cuda" else ("fp32", "compiled"):
            run_dir = tmp / precision
            run_dir.mkdir()
            for part in ("stage0", "llm"):
                os.symlink(tmp / "bf16" / part, run_dir / part)
            setting = "--compile_llm=true" if precision == "compiled" else f"--precision={precision}"
            if precision == "fp32":  # and the audio decoded by background threads (decode_threads: a GPU's default)
                setting += " --feature_cache=off"
            rc, sec, err = run(["train.py", "--stage", "1", *base, f"--run_dir={run_dir}", *setting.split()], log)
            ok = rc == 0
            if ok:
                trace = traces[precision] = losses(run_dir, 1)
                ok = all(map(math.isfinite, trace))
                err = f"loss {trace[0]:.3f} -> {trace[-1]:.3f}"
            row(f"train.py --stage 1 {setting} on GPU", f"exit {rc}, {sec:.0f} s, {err}", ok)
        trace = traces["bf16"]
        for precision in ("bf16", "fp16", "compiled"):
            if precision in traces and "fp32" in traces:
                a, b = traces[precision][0], traces["fp32"][0]
                what = "bf16, compiled LLM blocks" if precision == "compiled" else precision
                row(f"stage 1, first step's loss: {what} vs fp32 (same batch)", f"{a:.4f} vs {b:.4f}",
                    abs(a - b) < 0.02 * abs(b))
        start = load_file(str(tmp / "bf16" / "stage0" / "final" / "aligner.safetensors"))
        end = load_file(str(tmp / "bf16" / "stage1" / "final" / "apt.safetensors"))
        moved = sum(1 for k, v in end.items() if k.startswith("aligner.") and k[8:] in start
                    and not torch.equal(v.float(), start[k[8:]].float()))
        row("stage 1 in bf16: loss first -> last step; aligner tensors changed", f"{trace[0]:.3f} -> {trace[-1]:.3f}; "
            f"{moved}", moved > 0)
        rc, sec, err = run(["evaluate.py", "--task", "all", "--limit", "8", "--episodes", "4", "--batch-size", "4",
                            *base, f"--run_dir={tmp / 'bf16'}"], log)
        row("evaluate.py --task all on the GPU-trained checkpoint", f"exit {rc}, {sec:.0f} s {err}", rc == 0)


def stage0_at_batch(batch: int = 400, windows: int = 1):
    """One paper-preset stage-0 step at a contrastive batch of `batch` clips of `windows` 10.24 s windows each
    (AudioSet's clips: one; a WavCaps clip up to the paper preset's max_clip_windows, 3, and a batch pads to its
    longest), timed after an untimed step; it must run with finite losses and fit the card (its reserved peak)."""
    from apt_min.aligner import Aligner, stage0_losses
    from apt_min.config import load_config

    cfg = load_config("paper")
    aligner = Aligner(cfg.aligner_config(vocab_size=32000)).to(DEVICE)
    opt = torch.optim.AdamW(aligner.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(batch, 512 * windows, cfg.encoder_dim, generator=g).to(DEVICE)
    ids = torch.randint(3, 32000, (batch, 30), generator=g).to(DEVICE)
    ids[:, 0] = 1
    mask = torch.ones_like(ids, dtype=torch.bool)
    clips = torch.arange(batch, device=DEVICE)

    def one_step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            parts = stage0_losses(aligner, audio, ids, mask, clips, generator=g)
        parts["total"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return parts

    one_step()  # untimed: kernels loaded, memory taken
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    parts = one_step()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    took = time.time() - t0
    finite = all(math.isfinite(v.item()) for v in parts.values())
    if DEVICE == "cuda":
        reserved, card = torch.cuda.max_memory_reserved() / 2**30, torch.cuda.mem_get_info()[1] / 2**30
        fits = reserved <= A100_GIB  # the paper's card (§4.1: three A100s of 40 GB), whatever card runs this
        memory = (f"peak {reserved:.1f} GiB reserved of this card's {card:.0f} GiB; the paper's A100 (40 GB, "
                  f"{A100_GIB} GiB usable): {'fits' if fits else 'does not fit'}")
    else:
        memory, fits = "memory not measured on the CPU", True
    row(f"paper stage 0, one step at batch {batch}, {windows} window(s) a clip (ATC, ATM, AGTG; bf16)",
        f"{took:.2f} s, {memory}, losses " + ", ".join(f"{k} {v.item():.3f}" for k, v in parts.items()),
        finite and fits)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--smoke", action="store_true", help="run on the CPU (a test of this script, not of the GPU)")
    ap.add_argument("--parts", default="numerics,training,stage0", help="which of the three checks to run")
    ap.add_argument("--windows", type=int, default=1, help="stage 0: 10.24 s windows per clip (a long clip: more)")
    ap.add_argument("--batch", type=int, help="stage 0: clips in the contrastive batch (default 400; --smoke: 16)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = "cpu" if args.smoke else DEVICE
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_checks.py needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    parts = args.parts.split(",")
    if unknown := set(parts) - {"numerics", "training", "stage0"}:
        sys.exit(f"--parts: unknown {sorted(unknown)}; choose from numerics, training, stage0")
    if "numerics" in parts:
        numerics()
    if "training" in parts:
        training(out)
    if "stage0" in parts:
        stage0_at_batch(args.batch or (400 if DEVICE == "cuda" else 16), args.windows)
    print("\n| check | result | |\n| --- | --- | --- |")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")
    sys.exit(any(r[2] == "FAIL" for r in ROWS))


if __name__ == "__main__":
    main()

"""One stage-1 training step of APT on a Vicuna-7B-shaped LLM (random weights) in bf16 with gradient checkpointing,
batch 8, on a GPU: peak GPU memory, tokens/s and model-FLOPs utilisation, on one line for each `--keep` setting. Goal:
fits in 24 GB; MFU >= 45 % at the batch a 24 GB card holds (issue 17). `--keep 0,8,16` measures, on the same model,
several numbers of the LLM's last blocks that keep their activations instead of being recomputed (the training setting
grad_checkpointing_keep), and names the fastest that fits a 24 GB card. `--profile` adds where one step's time goes: the
operations that take most of it (torch.profiler), and the device's time by kind (matrix products, attention, fused
kernels, the rest) against the clock, to say what limits the MFU. `--compile` compiles each LLM block (training's
--compile_llm), after timing the uncompiled step at the first setting in the same run, and prints the ratio. (`--small`
runs the same code on a CPU-sized model: a smoke test of the script itself.)

Model FLOPs per token, frozen LLM: forward 2N plus backward to the activations 2N (no weight gradients),
plus attention; the trainable aligner's share is counted the usual way (6 x its parameters per query token).
Recomputation for checkpointing is not counted (that is what makes it *model* FLOPs utilisation); the hardware's
utilisation, printed beside it, counts it, so MFU / hardware utilisation is the share of the work that is not
recomputation.
    python benchmarks/bench_gpu_step.py [--batch 8] [--answer_words 40] [--no-checkpointing] [--keep 0[,N...]]
                                        [--peak_tflops 0] [--compile] [--profile]
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from apt_min.aligner import Aligner, AlignerConfig
from apt_min.audiomae import AudioMAE, AudioMAEConfig
from apt_min.llama import Llama, LlamaConfig
from apt_min.model import APT
from apt_min.tokenizer import Tokenizer, train_sentencepiece

PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200 NVL": 835.0, "H200": 989.0,
               "A100": 312.0}  # dense bf16;
# the first name the device's contains (an H100 SXM is "NVIDIA H100 80GB HBM3")


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU this table knows, by name; None for any other."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


WORDS = "a dog barks while a car passes by and rain falls on a tin roof then a bell rings twice".split()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--answer_words", type=int, default=40, help="answer length: sets the sequence length")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="the GPU's dense bf16 peak (0: from its name, "
                    "PEAK_TFLOPS; 989 where the name is not there)")
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="recompute the LLM blocks in backward (what fits 7B in 24 GB)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each LLM block (a measurement: the step's "
                    "fixed costs are kernel launches, which compiling fuses)")
    ap.add_argument("--profile", action="store_true", help="after timing, profile one step: the top operations")
    ap.add_argument("--keep", default="0", help="comma-separated numbers of the LLM's last blocks kept out of the "
                    "recomputation (grad_checkpointing_keep), each measured in turn")
    ap.add_argument("--card_gib", type=float, default=22.5, help="a setting fits a 24 GB card when torch's memory at "
                    "its peak (reserved) is at most this: a 24 GiB card (RTX 3090 / 4090) less the CUDA context and "
                    "some headroom; an A10 or L4 (about 22.5 GiB in all) needs about 21")
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    keeps = sorted({int(k) for k in args.keep.split(",")})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    llm_cfg = LlamaConfig() if not args.small else LlamaConfig(hidden_size=256, intermediate_size=688,
                                                               num_hidden_layers=2, num_attention_heads=4,
                                                               num_key_value_heads=4)
    if not all(0 <= k <= llm_cfg.num_hidden_layers for k in keeps):
        raise SystemExit(f"--keep {args.keep}: each between 0 and {llm_cfg.num_hidden_layers} (the LLM's blocks)")
    enc_cfg = AudioMAEConfig() if not args.small else AudioMAEConfig(dim=64, depth=2, heads=2)
    with tempfile.TemporaryDirectory() as tmp:
        train_sentencepiece([" ".join(WORDS)] * 50, Path(tmp) / "tokenizer.model", 300)
        tok = Tokenizer(tmp)
    with torch.device("meta"):
        llm = Llama(llm_cfg)
    llm = llm.to(dtype).to_empty(device=device)
    llm.tie_weights()
    with torch.no_grad():
        for p in llm.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    llm.gradient_checkpointing = args.checkpointing
    encoder = AudioMAE(enc_cfg).to(device, dtype)
    aligner = Aligner(AlignerConfig(vocab_size=tok.vocab_size, audio_dim=enc_cfg.dim)).to(device)
    apt = APT(encoder, aligner, llm, tok).to(device)
    params = [p for p in apt.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    # encoder features stand in for the clips: the step measured is the LLM's and the aligner's. With a feature cache
    # the frozen encoder runs once per clip; the paper preset has none (feature_cache=off), so each of its steps also
    # decodes the files, computes their filter banks and runs Audio-MAE, in the training process (on the H100 host:
    # about 47 ms front end and 4 ms encoder for 8 files; results/gpu-h100.md), which this MFU does not include
    feats = {f"clip{i}": torch.randn(1, math.prod(enc_cfg.grid), enc_cfg.dim, dtype=torch.float16)  # as cached
             for i in range(args.batch)}
    batch = [[("audio", k), ("text", "Describe the audio clip concisely.")] for k in feats]
    answers = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(args.answer_words)) for i in range(args.batch)]

    def step():
        with torch.autocast(device, dtype=dtype):
            loss, n = apt(batch, answers, feats)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with torch.no_grad():  # the shapes alone: no graph of the aligner kept through the memory measurement
        x, mask, labels = apt.embed_batch(batch, feats, answers)
    tokens, answered = int(mask.sum()), int((labels != -100).sum())  # logits are computed at the answers only
    V, D = llm_cfg.vocab_size, llm_cfg.hidden_size
    n_head = V * D  # the vocabulary projection (tied or not), run where a loss is taken
    n_llm = sum(p.numel() for p in llm.parameters()) - V * D - (0 if llm_cfg.tie_word_embeddings else n_head)
    L, T = llm_cfg.num_hidden_layers, x.shape[1]
    attention = 4 * L * T * D  # per token, forward: scores and values; backward to both inputs is twice that
    n_aligner = sum(p.numel() for p in aligner.parameters())
    # frozen weights: forward 2N, backward to the activations 2N (no weight gradients); trainable: 6N
    flops = (tokens * (4 * n_llm + 3 * attention) + answered * 4 * n_head
             + 6 * n_aligner * args.batch * aligner.config.num_queries)
    # a recomputed block runs forward again: all of it when compiled (one graph); as written, the recomputation stops
    # once it has what backward needs (checkpoint's early stop), before the frozen down projection, which keeps nothing
    block = llm.model.layers[0]
    per_block = sum(p.numel() for p in block.parameters()) - (0 if args.compile else block.mlp.down_proj.weight.numel())
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if not args.peak_tflops:
        known = peak_tflops(name)
        args.peak_tflops = known or PEAK_TFLOPS["H100"]
        if device == "cuda" and known is None:  # an RTX 4090 or an L4 has a far lower peak: said, not assumed
            print(f"warning: {name!r} is not in PEAK_TFLOPS; MFU below is against an H100 SXM's "
                  f"{args.peak_tflops:.0f} TFLOP/s: give --peak_tflops for this card's dense bf16 peak")
    print(f"device: {name}; LLM {n_llm / 1e9:.2f} B parameters, batch {args.batch}, sequence {T} tokens, "
          f"gradient checkpointing {'on' if args.checkpointing else 'off'}, "
          f"compiled blocks {'yes' if args.compile else 'no'}")
    print(f"counted: {flops} FLOPs a step from {tokens} tokens, {answered} of them answers; LLM {n_llm} parameters "
          f"less its vocabulary projection of {n_head}; aligner {n_aligner}; a recomputed block {per_block}")
    def timed(kept, repeats=3):
        """Seconds per step with `kept` blocks' activations kept, after an untimed step (the allocator takes the
        setting's memory there, not inside the timed steps); the peak memory counters start with it."""
        llm.blocks_kept = kept
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # so that the reserved peak is this setting's own
            torch.cuda.reset_peak_memory_stats()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(repeats):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / repeats

    settings = keeps if args.checkpointing else [L]
    eager = None
    if args.compile:  # the uncompiled step first, in this run, so the compiled one has its reference beside it
        eager = timed(settings[0])  # (its untimed step is the warm-up)
        llm.compile_blocks()
    step()  # warm-up (and compilation)
    results = {}
    for kept in settings:
        seconds = timed(kept)
        recomputed = (L - kept) * tokens * (2 * per_block + 4 * T * D)
        mfu = flops / seconds / (args.peak_tflops * 1e12)
        hfu = (flops + recomputed) / seconds / (args.peak_tflops * 1e12)
        if device == "cuda":
            allocated, reserved = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
            memory = (f"peak GPU memory {allocated:.1f} GiB allocated, {reserved:.1f} GiB reserved (fits a 24 GB "
                      f"card: {'yes' if reserved <= args.card_gib else 'no'})")
        else:
            reserved, memory = 0.0, "peak GPU memory: n/a on the CPU"
        results[kept] = (mfu, reserved, seconds)
        what = f"{L - kept} of {L} blocks recomputed" if args.checkpointing else "nothing recomputed"
        print(f"{what}: {memory}; throughput {tokens / seconds:.0f} tokens/s ({seconds * 1e3:.0f} ms per step); "
              f"MFU {mfu:.1%} (hardware {hfu:.1%}) of {args.peak_tflops:.0f} TFLOP/s")
        if eager is not None and kept == settings[0]:
            print(f"compiled blocks against uncompiled ones, {what}, timed in this run: {eager / seconds:.2f}x "
                  f"({eager * 1e3:.0f} ms uncompiled)")
    fitting = {k: r for k, r in results.items() if r[1] <= args.card_gib} if device == "cuda" else {}
    best = max(fitting or results, key=lambda k: (fitting or results)[k][0])
    which = ("that fits a 24 GB card" if fitting else "measured (none fits a 24 GB card)" if device == "cuda" else
             "measured (memory is not measured on the CPU)")
    mfu = results[best][0]
    verdict = ("met" if mfu >= 0.45 else "not met") if fitting else "not judged: the goal is at a batch that fits"
    print(f"MFU: {mfu:.1%} of {args.peak_tflops:.0f} TFLOP/s (goal: >= 45 % on a 24 GB card: {verdict}), "
          f"the fastest {which}: {L - best if args.checkpointing else 0} of {L} blocks recomputed")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        llm.blocks_kept = best
        kinds = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=kinds) as prof:
            step()
            if device == "cuda":
                torch.cuda.synchronize()
        key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        print(f"\none step, the operations that take most of it (by {key}):")
        print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))
        by_kind = time_by_kind(prof, device)
        busy = sum(by_kind.values())
        clock = results[best][2] * 1e6
        print(f"one step: {clock / 1e3:.0f} ms on the clock (unprofiled), the {device.upper()} busy "
              f"{busy / 1e3:.0f} ms ({busy / clock:.0%}); of that, " +
              ", ".join(f"{k} {v / 1e3:.0f} ms ({v / busy:.0%})" for k, v in by_kind.items()))


KINDS = {  # lower-case pieces of kernel (GPU) or operator (CPU) names; the first kind that matches takes the time
    "attention": ("flash", "fmha", "attention", "sdpa"),
    "matrix products": ("gemm", "nvjet", "xmma", "cutlass", "s16816", "aten::mm", "aten::addmm", "aten::bmm"),
    "fused (compiled)": ("triton",),
}


def time_by_kind(prof, device: str) -> dict[str, float]:
    """A profiled step's self time in microseconds by kind (KINDS, and "other"): the GPU's kernels on a GPU, the
    operators on a CPU. On a GPU their sum against the step's clock time says how busy the GPU was."""
    from torch.autograd import DeviceType

    on_gpu = device == "cuda"
    totals = {k: 0.0 for k in [*KINDS, "other"]}
    for event in prof.key_averages():
        if (event.device_type == DeviceType.CUDA) != on_gpu:
            continue
        if on_gpu and getattr(event, "is_user_annotation", False):  # a record_function span on the GPU's timeline:
            continue  # it covers kernels counted already (the CPU's own spans hold self time of their own)
        time_us = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        name = event.key.lower()
        kind = next((k for k, pieces in KINDS.items() if any(p in name for p in pieces)), "other")
        totals[kind] += time_us
    return totals


if __name__ == "__main__":
    main()

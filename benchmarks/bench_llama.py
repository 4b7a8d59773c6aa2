"""Our Llama against transformers' LlamaForCausalLM, same weights, same thread count, one run:

(a) forward + backward through the frozen model with gradients flowing to inputs_embeds and the loss on the last 16
    positions (what APT training does: soft prompts in, loss on the answer only);
(b) greedy generation with a KV cache, tokens per second.

Prints times and ratios (>1 means ours is faster). On a GPU the same script runs in bf16.
    python benchmarks/bench_llama.py [--size small|7b-layers] [--threads N]
"""

import argparse
import tempfile

import torch
import torch.nn.functional as F
from common import median_seconds, save_random_hf_llama

from apt_min.llama import Llama

SIZES = {  # "small": CPU-sized; "7b-layers": Vicuna-7B's widths, 4 of its 32 layers (for a GPU)
    "small": dict(hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1376),
    "7b-layers": dict(hidden=4096, layers=4, heads=32, kv_heads=32, intermediate=11008),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    with tempfile.TemporaryDirectory() as tmp:
        hf = save_random_hf_llama(tmp, **SIZES[args.size]).to(device, dtype)
        ours = Llama.from_pretrained(tmp, dtype=dtype, device=device)
    for m in (hf, ours):
        m.requires_grad_(False)
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()} size={args.size} {SIZES[args.size]}")

    # (a) forward + backward, frozen weights, gradient to the input embeddings, loss on the last 16 positions
    B, T, V = args.batch, args.seq, hf.config.vocab_size
    ids = torch.randint(3, V, (B, T), device=device)
    embeds = hf.get_input_embeddings()(ids).detach()
    targets = torch.randint(3, V, (B, 16), device=device)
    at = torch.zeros(B, T, dtype=torch.bool, device=device)
    at[:, -16:] = True

    def ours_step():
        x = embeds.clone().requires_grad_(True)
        logits = ours(inputs_embeds=x, logits_at=at)  # (B*16, V)
        F.cross_entropy(logits.float(), targets.reshape(-1)).backward()

    def hf_step(keep):
        x = embeds.clone().requires_grad_(True)
        logits = hf(inputs_embeds=x, logits_to_keep=keep).logits[:, -16:]  # keep=0: all positions
        F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1)).backward()

    t_ours = median_seconds(ours_step, args.repeats)
    t_hf16 = median_seconds(lambda: hf_step(16), args.repeats)
    t_hf = median_seconds(lambda: hf_step(0), args.repeats)
    print(f"(a) fwd+bwd B={B} T={T}: ours {t_ours * 1e3:.1f} ms | transformers, logits_to_keep=16 "
          f"{t_hf16 * 1e3:.1f} ms -> ratio {t_hf16 / t_ours:.2f}x | transformers, all logits (logits_to_keep=0) "
          f"{t_hf * 1e3:.1f} ms -> ratio {t_hf / t_ours:.2f}x")

    # (b) greedy generation, KV cache, no early stop
    n = args.new_tokens
    prompt = ids[:, :64]  # (a shorter --seq: all of it)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        a = ours.generate(prompt, max_new_tokens=n, eos_token_id=-1)
        b = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                        do_sample=False)[:, prompt.shape[1]:]
    agree = (a == b).float().mean().item()
    t_ours = median_seconds(lambda: ours.generate(prompt, max_new_tokens=n, eos_token_id=-1), args.repeats)
    t_hf = median_seconds(lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                              do_sample=False), args.repeats)
    print(f"(b) greedy B={B} prompt={prompt.shape[1]} new={n}: ours {B * n / t_ours:.0f} tok/s | transformers "
          f"{B * n / t_hf:.0f} tok/s -> ratio {t_hf / t_ours:.2f}x (tokens identical: {agree:.0%})")


if __name__ == "__main__":
    main()

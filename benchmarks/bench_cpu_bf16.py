"""bf16 on the CPU, lever by lever: what `precision=auto` decides, and what each choice buys, measured in one run.

(1) the probe train.py uses: a bf16 matrix product against an fp32 one;
(2) a training step of each preset's LLM (the tiny stand-in; SmolLM2-135M's shape): forward + backward with the
    gradient flowing to inputs_embeds, batch 8, 128 positions, logits at 16 (what stages 1 and 2 do), in fp32,
    under bf16 autocast with the frozen weights in fp32, and with them stored in bf16;
(3) evaluation: one forward over a 5-way 5-shot episode's length (450 positions), logits at the last, with the
    weights in fp32 and in bf16.

Times are medians; ratios are against fp32 in the same run (>1: faster). Weights are random: speed does not depend
on their values, so no download is needed.
    python benchmarks/bench_cpu_bf16.py [--repeats 5] [--shapes tiny,small]
"""

import argparse

import torch
import torch.nn.functional as F
from common import median_seconds

from apt_min.build import cpu_bf16_speedup
from apt_min.llama import Llama, LlamaConfig

SHAPES = {  # the tiny preset's stand-in (config.py's llm_* defaults) and SmolLM2-135M-Instruct's config.json
    "tiny": LlamaConfig(vocab_size=1000, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2),
    "small": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True),
}


def train_step(llm, autocast: bool, B=8, T=128, answer=16):
    x0 = torch.randn(B, T, llm.config.hidden_size) * 0.02
    targets = torch.randint(0, llm.config.vocab_size, (B * answer,))
    at = torch.zeros(B, T, dtype=torch.bool)
    at[:, -answer:] = True

    def step():
        x = x0.clone().to(llm.model.embed_tokens.weight.dtype).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = llm(inputs_embeds=x, logits_at=at)
        F.cross_entropy(logits.float(), targets).backward()
    return step


def episode_forward(llm, T=450):
    x = torch.randn(1, T, llm.config.hidden_size).to(llm.model.embed_tokens.weight.dtype) * 0.02
    at = torch.zeros(1, T, dtype=torch.bool)
    at[0, -1] = True

    @torch.no_grad()
    def forward():
        llm(inputs_embeds=x, logits_at=at)
    return forward


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help=f"which LLM shapes, comma-separated: of {', '.join(SHAPES)}")
    args = ap.parse_args()
    if unknown := set(args.shapes.split(",")) - set(SHAPES):
        ap.error(f"--shapes: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SHAPES)}")
    torch.manual_seed(0)
    print(f"threads={torch.get_num_threads()}")
    print(f"(1) probe: a bf16 matrix product runs {cpu_bf16_speedup():.2f}x as fast as fp32 "
          "(precision=auto takes bf16 at >= 1.5)")
    for name in args.shapes.split(","):
        config = SHAPES[name]
        llm = Llama(config).requires_grad_(False).eval()
        fp32 = median_seconds(train_step(llm, False), args.repeats)
        auto = median_seconds(train_step(llm, True), args.repeats)
        ev32 = median_seconds(episode_forward(llm), args.repeats)
        llm.to(torch.bfloat16)
        bf16 = median_seconds(train_step(llm, True), args.repeats)
        ev16 = median_seconds(episode_forward(llm), args.repeats)
        print(f"(2) {name:5} train step: fp32 {fp32:.3f} s | bf16 autocast, fp32 weights {auto:.3f} s "
              f"({fp32 / auto:.2f}x) | bf16 autocast, bf16 weights {bf16:.3f} s ({fp32 / bf16:.2f}x)")
        print(f"(3) {name:5} episode forward: fp32 {ev32:.3f} s | bf16 weights {ev16:.3f} s ({ev32 / ev16:.2f}x)")


if __name__ == "__main__":
    main()

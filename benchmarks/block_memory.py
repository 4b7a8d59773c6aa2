"""What one block of the frozen LLM keeps for its backward pass, per token: the memory that each block left out of
the recomputation costs (training setting grad_checkpointing_keep; bench_gpu_step.py --keep measures the time).

The block runs as in training (bf16 autocast, weights frozen, gradients flowing to its input), once as written and
once compiled (torch.compile, as --compile_llm=true), and every tensor autograd saves is counted once (a tensor all
blocks share, RoPE's cos and sin, is left out; so are the weights). Counted in bf16 values per token per hidden unit,
then in GiB at Vicuna-7B's width for a step of `--batch` sequences of `--seq` tokens, net of the block's input (one
value per hidden unit), which a recomputed block's checkpoint keeps as well: what keeping a block adds. Frozen weights
need no saved inputs for their matrix products, so what is left is the norms' inputs, attention's q, k, v and output,
and the SwiGLU's two branches (and, as written, the SiLU's output and the norms' float32 copies, which compiling
recomputes). Measured on the CPU's kernels and compiler; a GPU's may keep slightly different statistics.
    python benchmarks/block_memory.py [--batch 32] [--seq 170] [--no-compile]
"""

import argparse

import torch

from apt_min.llama import Block, LlamaConfig, rope_cos_sin, rope_frequencies

VICUNA = LlamaConfig()  # Vicuna-7B's shape: hidden 4096, MLP 11008, 32 heads


def saved_per_token(block: Block, cfg: LlamaConfig, batch: int = 2, seq: int = 64) -> float:
    """Bytes autograd keeps for one block's backward, per token, each tensor counted once, shared ones left out."""
    params = {p.data_ptr() for p in block.parameters()}
    positions = torch.arange(seq).expand(batch, seq)
    cos, sin = rope_cos_sin(rope_frequencies(cfg), positions, torch.bfloat16)
    shared = params | {cos.data_ptr(), sin.data_ptr()}
    x = torch.randn(batch, seq, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    kept = {}

    def pack(t):
        if t.data_ptr() not in shared:
            kept[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x, cos, sin, None, True, None, 0)
    y.float().sum().backward()  # (and checks that the saved tensors serve a backward pass)
    return sum(kept.values()) / (batch * seq)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=170, help="tokens a sequence (bench_gpu_step's is 170)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    # Vicuna's proportions at an eighth of its width (the count per hidden unit does not depend on the width)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=100)
    torch.manual_seed(0)
    block = Block(cfg).to(torch.bfloat16).requires_grad_(False)
    print(f"one block, kept for backward: bf16 values per token per hidden unit; GiB at Vicuna-7B's width "
          f"(hidden {VICUNA.hidden_size}), batch {args.batch} x {args.seq} tokens")
    for how in ["as written", "compiled"] if args.compile else ["as written"]:
        if how == "compiled":
            block.compile()
            saved_per_token(block, cfg)  # compiles; the count is the second call's
        units = saved_per_token(block, cfg) / (2 * cfg.hidden_size)
        gib = (units - 1) * 2 * VICUNA.hidden_size * args.batch * args.seq / 2**30
        print(f"{how}: {units:.2f} values per hidden unit, {units - 1:.2f} beyond the block's input: {gib:.2f} GiB "
              "more per block kept")


if __name__ == "__main__":
    main()

"""Shared bits of the benchmark scripts: a timer that takes the median of repeated runs, and a random HF Llama."""

import statistics
import time

import torch


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def save_random_hf_llama(folder, *, hidden, layers, heads, kv_heads, intermediate, vocab=32000,
                         max_shard_size="2GB", seed=0):
    """A randomly initialised transformers LlamaForCausalLM, saved with save_pretrained; returns the HF model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return model

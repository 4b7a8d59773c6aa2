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


def downloads_like(folder, count: int, step_hz: float = 300.0) -> list[str]:
    """`count` ten-second 44.1 kHz stereo 16-bit WAV files, as real downloads often are (resampled on the way in): a
    chirp from 200 + step_hz * i Hz in noise, each its own."""
    import numpy as np
    import soundfile as sf

    rng, files = np.random.default_rng(0), []
    t = np.arange(441000) / 44100
    for i in range(count):
        x = 0.3 * np.sin(2 * np.pi * (200 + step_hz * i) * t * (1 + t / 10)) + 0.05 * rng.standard_normal(t.size)
        files.append(f"{folder}/clip{i}.wav")
        sf.write(files[-1], np.stack([x, 0.8 * x], 1).astype(np.float32), 44100, subtype="PCM_16")
    return files


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

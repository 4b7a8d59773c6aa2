"""Tiny random Hugging Face Llama models, saved the way real checkpoints are, for the parity tests; and a script of
the repository run as a user runs it."""

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args, code: int = 0) -> str:
    """`python *args` from the repository's root, which must exit with `code`: its stdout (for 0), else its stderr."""
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == code, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout if code == 0 else done.stderr


def hf_llama(tmp: Path, *, kv_heads=2, tied=False, vocab=96, seed=0, shards=True, **extra):
    """Build a transformers LlamaForCausalLM with random weights, save it with save_pretrained (forced into several
    safetensors shards), and return (the HF model, the folder). `extra`: more config fields, or others than these."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                                tie_word_embeddings=tied, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2), **extra})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # the default init gives near-uniform logits and repetitive text; these weights give
        for p in model.parameters():  # varied continuations whose top two logits are well apart
            p.normal_(0, 2.5 / p.shape[-1] ** 0.5) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp, max_shard_size="60KB" if shards else "1GB")
    return model, tmp


def assert_close_rel(got, ref, rel: float):
    """max |got - ref| <= rel * max |ref|, computed in float64: the error is judged against the scale of what is
    compared, so one tolerance holds for logits of order 10 and gradients of order 1e-3 alike."""
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, f"shapes differ: {tuple(got.shape)} vs {tuple(ref.shape)}"
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} is more than {rel:g} x the scale {scale:.3g}"


def record_scenes(monkeypatch) -> list:
    """Every synth.make_scene call from now on appends the events it returns to the list given back (the generators
    write the audio and keep only what they need of the events)."""
    from apt_min import synth

    scenes, make_scene = [], synth.make_scene

    def recorded(*args, **kw):
        audio, events = make_scene(*args, **kw)
        scenes.append(events)
        return audio, events

    monkeypatch.setattr(synth, "make_scene", recorded)
    return scenes

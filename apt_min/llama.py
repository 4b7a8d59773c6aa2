"""The frozen LLM of APT: a plain Llama decoder (paper §3.1: frozen; §4.1: Vicuna-7B v1.1, a Llama fine-tune).

This file knows nothing of audio. Soft prompts enter through `inputs_embeds`, exactly like word embeddings do.

    input_ids (B, T) or inputs_embeds (B, T, D)  ->  logits (B, T, V), or (N, V) at N chosen positions

Module names equal the Hugging Face checkpoint keys (`model.layers.3.self_attn.q_proj.weight`, `lm_head.weight`, ...),
so `Llama.from_pretrained` copies a Vicuna folder key for key, and any missing or surplus key is an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from apt_min.checkpoint import CheckpointError, check_keys, checkpoint_tensors, resolve_dtype

# keys found in Llama checkpoints that we drop on purpose: transformers < 4.31 saved the rotary table, which is
# recomputed from config.json here
DROPPED = ("*.rotary_emb.inv_freq",)


@dataclass
class LlamaConfig:
    vocab_size: int = 32000  # defaults: Vicuna-7B (Llama-2-7B shape)
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32  # fewer than num_attention_heads: grouped-query attention
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, {"rope_type": "linear", "factor"} or {"rope_type": "llama3", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_json(cls, file: str | Path) -> LlamaConfig:
        """Read a Hugging Face `config.json` (transformers 4.x or 5.x spelling of the rotary settings)."""
        file = Path(file)
        if not file.is_file():
            raise CheckpointError(f"{file}: config.json not found")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{file}: not valid JSON ({e})") from None
        return cls.from_dict(raw, file)

    @classmethod
    def from_dict(cls, raw: dict, file: str | Path) -> LlamaConfig:
        """The fields of a config.json (or of a `text_config` inside one), read as `from_json` reads them; `file`
        names where they come from in errors."""
        arch = raw.get("architectures") or []
        if raw.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
            raise CheckpointError(f"{file}: model_type={raw.get('model_type')!r}, architectures={arch}: "
                                  "not a Llama architecture (expected model_type 'llama')")
        if raw.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{file}: hidden_act={raw['hidden_act']!r}; Llama uses 'silu'")
        # transformers 5 folds theta and scaling into one dict `rope_parameters`; 4.x had rope_theta + rope_scaling.
        # Where both dicts are given, rope_scaling replaces rope_parameters whole, as transformers 5 reads them
        rope = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise CheckpointError(f"{file}: rope type {kind!r} is not supported (default, linear, llama3 are)")
        need = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        if missing := [k for k in need if k not in raw]:
            raise CheckpointError(f"{file}: missing fields {missing}")
        return cls(
            **{k: raw[k] for k in need},
            num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            head_dim=raw.get("head_dim") or 0,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=None if kind == "default" else {**rope, "rope_type": kind},
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", False),
            mlp_bias=raw.get("mlp_bias", False),
            bos_token_id=raw.get("bos_token_id", 1),
            eos_token_id=raw.get("eos_token_id", 2),
        )


# ----------------------------------------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32 even when the model is held in bf16/fp16, then scale in the model's dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2, in fp32, with the config's long-context scaling applied."""
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)  # (d/2,)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":  # positions divided by `factor` == frequencies divided by it
        return inv_freq / s["factor"]
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between the two
    old_len = s["original_max_position_embeddings"]
    lo, hi, factor = s["low_freq_factor"], s["high_freq_factor"], s["factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    kept = torch.where(wavelen < old_len / hi, inv_freq, blended)
    return torch.where(wavelen > old_len / lo, inv_freq / factor, kept)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions (B, T) -> cos, sin (B, 1, T, d), computed in fp32 and cast to the model dtype."""
    angles = positions[..., None].float() * inv_freq.to(positions.device)  # (B, T, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, d): rotate-half layout pairs i with i + d/2
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def attend(q, k, v, mask: torch.Tensor | None, is_causal: bool, sdpa: bool = True):
    """Softmax attention. q (B, nh, T, hd); k, v (B, nkv, S, hd) with nh a multiple of nkv (grouped-query);
    mask (B, 1, T, S) bool, True where a query may look, or None. Returns (B, nh, T, hd)."""
    if k.shape[1] != q.shape[1]:  # each key/value head serves nh/nkv query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, nh, S, hd)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if sdpa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    # the same computation written out, kept for reading and for the test that checks the fused kernel against it
    T, S = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])  # (B, nh, T, S)
    if is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1).to(v.dtype) @ v


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.attention_bias)
        self.sdpa = True  # False: the written-out path of `attend`

    def forward(self, x, cos, sin, mask, is_causal, cache: KVCache | SharedPrefix | None, layer: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, past + T, hd)
        y = attend(q, k, v, mask, is_causal, self.sdpa)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, is_causal, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """What Hugging Face checkpoints call `model`: embeddings, the blocks, the final norm."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class KVCache:
    """Keys and values of every layer, allocated once for the whole generation: (L, B, nkv, max_len, hd) each."""

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, dtype, device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled so far; Llama.forward advances it after the last layer

    def update(self, layer: int, k, v):
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, rows: torch.Tensor):
        """Keep batch rows `rows` (beam search: the parents of the surviving beams; may repeat rows)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]


class SharedPrefix:
    """The keys and values of a prefix that every row of a batch begins with (an instruct model's system turn), run
    through the frozen LLM once: a forward given it attends to the prefix as if each row began with it, without
    recomputing it. Nothing is ever written into it, so autograd may keep what a training step reads from it."""

    def __init__(self, llm: Llama, ids: torch.Tensor):
        """ids (P,): the prefix's tokens. Run as the batches will be: under the autocast in force, if any."""
        device = ids.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else llm.lm_head.weight.dtype
        cache = KVCache(llm.config, 1, len(ids), dtype, ids.device)
        with torch.no_grad():
            none = torch.zeros(1, len(ids), dtype=torch.bool, device=ids.device)  # no logits: keys and values only
            llm(input_ids=ids[None], cache=cache, logits_at=none)
        self.k, self.v, self.length = cache.k, cache.v, len(ids)  # (L, 1, nkv, P, hd) each

    def update(self, layer: int, k, v):
        """The prefix's keys and values of `layer` before the batch's own: (B, nkv, P + T, hd) each."""
        B = k.shape[0]
        return (torch.cat([self.k[layer].expand(B, -1, -1, -1), k], dim=2),
                torch.cat([self.v[layer].expand(B, -1, -1, -1), v], dim=2))


# ------------------------------------------------------------------------------------------------------------ model


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.blocks_kept = 0  # with checkpointing: the last blocks_kept blocks keep their activations (not recomputed)
        self.tie_weights()

    def compile_blocks(self):
        """torch.compile every block (one compiled graph serves them all: same code, same shapes). Fuses the many
        small kernels of a step, which dominate a frozen 7B's training step at small batches (benchmarks/)."""
        for block in self.model.layers:
            block.compile()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids):
        return self.model.embed_tokens(input_ids)  # (B, T, D)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, logits_at=None,
                cache: KVCache | None = None, prefix: SharedPrefix | None = None, blocks=None):
        """input_ids (B, T) or inputs_embeds (B, T, D); attention_mask (B, past + T), 1 for tokens, 0 for padding
        (left or right); logits_at (B, T) bool: return logits (N, V) at those positions only, else (B, T, V).
        Positions count tokens only, so a left-padded row sees the same positions as the unpadded one.
        prefix: the past is a prefix shared by every row, computed once (training; not with a cache).
        blocks (B, past + T) long, or None: blocks kept apart (causal_padding_mask)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if cache is not None and prefix is not None:
            raise ValueError("pass a cache or a shared prefix, not both")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        past = cache.length if cache is not None else prefix.length if prefix is not None else 0
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: take the fast paths below
        if attention_mask is None:
            positions = torch.arange(past, past + T, device=x.device).expand(B, T)
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        if blocks is not None and blocks.shape != (B, past + T):
            raise ValueError(f"blocks has shape {tuple(blocks.shape)}, expected {(B, past + T)}")
        mask, is_causal = causal_padding_mask(attention_mask, T, past, x.device, blocks)
        cos, sin = rope_cos_sin(rope_frequencies(self.config), positions, x.dtype)
        recomputed = len(self.model.layers) - self.blocks_kept
        for i, block in enumerate(self.model.layers):
            if self.gradient_checkpointing and i < recomputed and torch.is_grad_enabled() and cache is None:
                # keep only each block's input; recompute the block in backward (memory for time)
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, is_causal, prefix, i,
                                                      use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, is_causal, cache or prefix, i)
        if cache is not None:
            cache.length += T
        if logits_at is not None:
            x = x[logits_at]  # (N, D): the vocabulary projection is the costliest matmul; skip unused positions
        return self.lm_head(self.model.norm(x))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype = torch.float32, device="cpu") -> Llama:
        """Load a Hugging Face Llama folder: config.json + model.safetensors, or shards listed in
        model.safetensors.index.json (pytorch_model*.bin is read with weights_only=True where no safetensors exist).
        Tensors are read one at a time straight into the target dtype: no second full copy is held.
        dtype: float32/fp32, bfloat16/bf16, float16/fp16, a torch.dtype, or "auto" (the config's dtype or
        torch_dtype)."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such model directory (expected config.json and *.safetensors)")
        cfg = LlamaConfig.from_json(path / "config.json")
        raw = json.loads((path / "config.json").read_text())
        # "auto": 5.x's "dtype" or 4.x's "torch_dtype"; where a config holds both, "dtype" wins, as in transformers
        dtype = resolve_dtype(dtype, auto=raw.get("dtype") or raw.get("torch_dtype"))
        return cls.from_shards(cfg, checkpoint_tensors(path), dtype, device, path)

    @classmethod
    def from_shards(cls, cfg: LlamaConfig, shards: dict, dtype: torch.dtype, device, path: Path) -> Llama:
        """The model of `cfg` filled from indexed weight files ({file: {key: reader}}, keys as ours), strictly:
        from_pretrained's own folder, or the `language_model.` part of a bigger checkpoint (InstructBLIP's)."""
        with torch.device("meta"):
            model = cls(cfg).to(dtype)
        shapes = {k: tuple(p.shape) for k, p in model.named_parameters(remove_duplicate=False)}
        optional = {"lm_head.weight"} if cfg.tie_word_embeddings else set()  # tied: lm_head.weight is the embedding
        check_keys(shards, shapes, optional, DROPPED, path)
        model.to_empty(device=device)  # allocate, uninitialised; every tensor is filled below
        model.tie_weights()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for entries in shards.values():
                for name, read in entries.items():
                    if name in params and name not in optional:
                        read(params[name])
        return model.eval()

    def save_pretrained(self, folder: str | Path):
        """Write config.json and model.safetensors in Hugging Face's layout (transformers and from_pretrained both
        read it back). The tiny preset's stand-in LLM is stored this way, so it loads through the Vicuna path."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        c = self.config
        rope = {"rope_theta": c.rope_theta, **(c.rope_scaling or {"rope_type": "default"})}
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                  **{k: getattr(c, k) for k in c.__dataclass_fields__ if k not in ("rope_theta", "rope_scaling")},
                  "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "rope_parameters": rope,
                  "torch_dtype": str(self.lm_head.weight.dtype).removeprefix("torch.")}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        if c.tie_word_embeddings:
            state.pop("lm_head.weight")  # the same tensor as the embedding; safetensors refuses shared storage
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})

    # ---------------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, *, max_new_tokens: int = 32,
                 num_beams: int = 1, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, length_penalty: float = 1.0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None, streamer=None) -> torch.Tensor:
        """Continue B left-padded prompts, given as ids or as embeddings (APT's soft prompts). Returns the new
        tokens (B, L), L <= max_new_tokens, each row filled with pad_token_id after its EOS.
        Greedy by default; do_sample: temperature, top-k, top-p sampling; num_beams > 1: beam search.
        Scores follow transformers' generate (repetition penalty, length penalty, beam stopping), so the same
        settings give the same tokens. streamer(tokens (B,)) is called with each new token as it is chosen
        (greedy and sampling; beam search decides only at the end, so it refuses a streamer)."""
        if num_beams > 1 and do_sample:
            raise ValueError("beam search with sampling is not supported; use num_beams=1 or do_sample=False")
        if num_beams > 1 and streamer is not None:
            raise ValueError("beam search settles its tokens only at the end: it cannot stream; use num_beams=1")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {max_new_tokens}")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        if max_new_tokens == 0:  # nothing to say: (B, 0), as beam search gives
            return torch.zeros(B, 0, dtype=torch.long, device=x.device)
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
        elif not attention_mask[:, -1].all():
            raise ValueError("generate expects left padding: the last position of every row must be a token")
        eos = torch.tensor(eos_token_id if eos_token_id is not None else self.config.eos_token_id,
                           device=x.device).reshape(-1)
        pad = int(eos[0]) if pad_token_id is None else pad_token_id
        V = self.config.vocab_size
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=x.device)  # tokens present, for repetition_penalty
        if input_ids is not None:  # column V collects the padding positions and is dropped
            seen[torch.arange(B)[:, None], input_ids.masked_fill(~attention_mask.bool(), V)] = True
        seen = seen[:, :V]
        valid = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=x.device)  # keys that are not padding
        valid[:, :T] = attention_mask.bool()

        cache = KVCache(self.config, B, T + max_new_tokens, x.dtype, x.device)
        last = torch.zeros(B, T, dtype=torch.bool, device=x.device)
        last[:, -1] = True
        logits = self(inputs_embeds=x, attention_mask=valid[:, :T], cache=cache, logits_at=last).float()  # (B, V)
        if num_beams > 1:  # every beam starts from the same prompt: prefill once, then copy rows
            rows = torch.arange(B, device=x.device).repeat_interleave(num_beams)
            cache.reorder(rows)
            valid, seen, logits = valid[rows], seen[rows], logits[rows]

        def step(tokens):  # (R,) one new token per row -> next-token logits (R, V) in fp32
            n = cache.length + 1
            return self(input_ids=tokens[:, None], attention_mask=valid[:, :n], cache=cache)[:, -1].float()

        if num_beams > 1:
            return self._beam_search(logits, step, cache, seen, B, num_beams, max_new_tokens, eos, pad,
                                     repetition_penalty, length_penalty)
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        out = []
        for t in range(max_new_tokens):
            scores = penalize_repeats(logits, seen, repetition_penalty)
            if do_sample:
                probs = top_k_top_p(scores / temperature, top_k, top_p).softmax(-1)
                token = draw(probs, generator)  # (B,)
            else:
                token = scores.argmax(-1)  # (B,)
            token = token.masked_fill(done, pad)
            out.append(token)
            if streamer is not None:
                streamer(token)
            seen[torch.arange(B), token] = True
            done |= torch.isin(token, eos)
            if done.all() or t == max_new_tokens - 1:
                break
            logits = step(token)
        return torch.stack(out, dim=1)  # (B, L)

    def _beam_search(self, logits, step, cache, seen, B, nb, max_new, eos, pad, rep_penalty, length_penalty):
        """Beam search over rows r = b * nb + j. Each step keeps the K best continuations of all beams of a prompt (K =
        max(2, 1 + the number of EOS ids) * nb: 2*nb with one EOS id, so that nb survive however many end): the best nb
        that do not end become the next beams; those among the best nb that end (EOS, or the length limit) compete for
        nb finished slots with score sum(log p) / length**length_penalty. A prompt stops taking finished hypotheses once
        its slots are full and its best running beam, at today's length, scores no better than the worst of them
        (transformers' default, early_stopping=False)."""
        V, dev, ninf = logits.shape[-1], logits.device, float("-inf")
        K = max(2, 1 + len(eos)) * nb  # enough candidates that nb of them can go on even if some end
        run_scores = torch.zeros(B, nb, device=dev)
        run_scores[:, 1:] = ninf  # only beam 0 is live at first: the others are copies of it
        run_tokens = torch.empty(B, nb, 0, dtype=torch.long, device=dev)
        done_scores = torch.full((B, nb), ninf, device=dev)  # -inf: an empty slot
        done_tokens = torch.full((B, nb, max_new), pad, dtype=torch.long, device=dev)
        done_len = torch.zeros(B, nb, dtype=torch.long, device=dev)
        open_ = torch.ones(B, dtype=torch.bool, device=dev)  # still accepting finished hypotheses
        for t in range(max_new):
            logp = penalize_repeats(logits.log_softmax(-1), seen, rep_penalty)  # (B*nb, V)
            cand = (logp.view(B, nb, V) + run_scores[..., None]).view(B, nb * V)
            cand_scores, cand_idx = cand.topk(K)  # (B, K), best first
            parent, token = cand_idx // V, cand_idx % V
            cand_tokens = torch.cat([run_tokens.gather(1, parent[..., None].expand(-1, -1, t)), token[..., None]], 2)
            ends = torch.isin(token, eos) | (t == max_new - 1)  # (B, K)

            # finished: only the best nb candidates may finish; keep the nb best finished hypotheses per prompt
            finishing = ends[:, :nb] & open_[:, None]
            new_scores = (cand_scores[:, :nb] / (t + 1) ** length_penalty).masked_fill(~finishing, ninf)
            new_tokens = F.pad(cand_tokens[:, :nb], (0, max_new - t - 1), value=pad)  # (B, nb, max_new)
            keep = torch.cat([done_scores, new_scores], 1).topk(nb).indices  # (B, nb)
            done_scores = torch.cat([done_scores, new_scores], 1).gather(1, keep)
            done_tokens = torch.cat([done_tokens, new_tokens], 1).gather(1, keep[..., None].expand(-1, -1, max_new))
            done_len = torch.cat([done_len, torch.full_like(done_len, t + 1)], 1).gather(1, keep)

            # running: the nb best candidates that did not end
            live = cand_scores.masked_fill(ends, ninf)
            pick = live.topk(nb).indices  # (B, nb)
            run_scores = live.gather(1, pick)
            run_tokens = cand_tokens.gather(1, pick[..., None].expand(-1, -1, t + 1))
            rows = (torch.arange(B, device=dev)[:, None] * nb + parent.gather(1, pick)).reshape(-1)  # (B*nb,)

            full = done_scores.min(1).values > ninf
            open_ &= ~(full & (run_scores[:, 0] / (t + 1) ** length_penalty <= done_scores.min(1).values))
            if t == max_new - 1 or ends.all() or not open_.any():
                break
            cache.reorder(rows)
            seen = seen[rows]
            seen[torch.arange(B * nb, device=dev), run_tokens[..., -1].reshape(-1)] = True
            logits = step(run_tokens[..., -1].reshape(-1))
        return done_tokens[:, 0, :int(done_len[:, 0].max())]  # (B, L): slots are sorted best first


def causal_padding_mask(attention_mask, T: int, past: int, device, blocks=None):
    """Who may attend to whom, for T new queries after `past` cached positions. Returns (mask, is_causal):
    (None, True) or (None, False) when no tensor is needed, else a (B, 1, T, past + T) bool mask, True = visible.

        key:     p  p  a  b  c       p = padding, a b c = tokens, one row per query token
        a       .  .  x  .  .
        b       .  .  x  x  .
        c       .  .  x  x  x
    A padded query would see nothing and turn the softmax into NaN; it is allowed to see itself instead (its output
    is never used).

    blocks (B, past + T) long, or None: 0 for an ordinary position, k > 0 for the k-th block of soft prompts. A
    position of one block does not see another block's; everything else sees as above (APT-BLIP-2's `blocks_apart`:
    each block reads only the text before it and itself, as in its own training; the text after reads them all):

        key:     t  V  V  A  A  q    t, q = text, V V = one block, A A = another
        A       x  .  .  x  .  .
        A       x  .  .  x  x  .
        q       x  x  x  x  x  x"""
    S = past + T
    if blocks is not None and int(blocks.max()) > 1:  # one block or none: nothing to keep apart
        mask, _ = causal_padding_mask(attention_mask, T, past, device)
        mask = mask if mask is not None else torch.ones(T, S, dtype=torch.bool, device=device).tril(past)[None, None]
        q, k = blocks[:, past:, None].to(device), blocks[:, None, :].to(device)  # (B, T, 1), (B, 1, S)
        return mask & ~((q > 0) & (k > 0) & (q != k))[:, None], False
    if attention_mask is None and T == 1:
        return None, False  # one new token sees all cached keys
    if attention_mask is None and past == 0:
        return None, True
    q_pos = torch.arange(past, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        mask = (mask & attention_mask.bool()[:, None, None, :]) | (k_pos == q_pos)  # (B, 1, T, S)
    return mask, False


def draw(probs, generator=None):
    """One index per row of probs (R, C), drawn on the generator's device (a CPU generator on CUDA rows draws on the
    CPU), so a seeded draw is the same on any device. Returns (R,) on probs' device."""
    on = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(on), 1, generator=generator).squeeze(1).to(probs.device)


def penalize_repeats(scores, seen, penalty: float):
    """Repetition penalty (CTRL, Keskar et al. 2019, as transformers applies it): the score of a token already
    present is divided by `penalty` when positive and multiplied by it when negative. scores, seen: (R, V)."""
    if penalty == 1.0:
        return scores
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def top_k_top_p(scores, top_k: int = 0, top_p: float = 1.0):
    """Set to -inf every score outside the k best (top_k > 0) and outside the smallest set of best tokens whose
    probability reaches top_p (nucleus sampling, Holtzman et al. 2020). The best token always stays. (R, V)."""
    if top_k > 0:
        kth = scores.topk(min(top_k, scores.shape[-1])).values[:, -1:]  # (R, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = scores.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the better tokens already hold top_p of the mass
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return scores

"""The audio aligner: a small BLIP-2 Q-Former (paper §3.1, §3.3; Li et al., BLIP-2, §3.1) and its stage-0 losses.

    audio_feats (B, N, Da) + text ids (B, T)  ->  hidden states (B, Q + T, H)     Q = num_queries learned queries

One stack of BERT-style post-LN layers runs over `[queries ; text]`. Self-attention mixes the two under one of three
masks (the functions below, each drawn); only the query slice cross-attends to the audio, every
`cross_attention_freq`-th layer; queries and text have separate feed-forward weights. Text uses the LLM's tokenizer
with the aligner's own word and position embeddings (or, aligner_words=llm, the LLM's word table through a learned
map, `word_map`); id `vocab_size` is the decoder-start token [DEC].

Uses: stage 0 (`stage0_losses`: ATC + ATM + AGTG), instruction-aware prompts for stages 1-2 (`instruct`), the text
branch alone (`encode_text`, for the tagging protocol). A clip of several windows is aligned window by window
(long_audio="windows"): each window gets its own Q prompts and `model.APT.clip_prompts` concatenates them in time
order, so order survives and every window is what the aligner was trained on; or all at once ("all", the paper's
fixed number of prompts), its queries reading every window's tokens, which carry one position code: the order of
windows is then not seen.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from apt_min.checkpoint import check_keys, safetensors_entries
from apt_min.llama import draw

STAGE0_HEADS = ("audio_proj", "text_proj", "temp", "atm_head", "lm_transform", "lm_decoder")  # trained by stage 0 only
# (the text projection also serves the paper's tagging protocol: evaluation.text_branch_scores. The decoder's weight is
# tied to the aligner's word table, which stages 1 and 2 keep training; aligner_words=llm: no table of its own)


@dataclass
class AlignerConfig:
    vocab_size: int  # the LLM tokenizer's; the word table has one more row, [DEC]
    audio_dim: int = 768  # Audio-MAE ViT-B
    hidden_size: int = 256  # paper preset: BERT-mini size
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    num_queries: int = 32
    cross_attention_freq: int = 2
    max_text_len: int = 512
    contrast_dim: int = 256  # ATC projection
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    llm_words: int = 0  # 0: a word table of its own (BERT's); D: the frozen LLM's (vocab, D) table through a D -> H map
    input_norm_eps: float = 1e-5  # ln_audio's: BLIP-2's ln_vision; InstructBLIP's post_layernorm has 1e-6


# --------------------------------------------------------------------------------------------------------- masks
# Each returns (B, 1, Q + T, Q + T) bool, True where a row (query position) may look at a column (key position).
# text_mask (B, T) is True for real tokens; padded text is never looked at.


def bidirectional_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ATM, and instructions in stages 1-2: everything sees everything.

                 q q q  t t t
        q q q  [ x x x  x x x ]
        t t t  [ x x x  x x x ]
    """
    B, T = text_mask.shape
    keys = torch.cat([text_mask.new_ones(B, num_queries), text_mask], 1)  # (B, Q + T)
    return keys[:, None, None, :].expand(B, 1, num_queries + T, num_queries + T)


def unimodal_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ATC: queries see only queries (and, through cross-attention, the audio); text sees only text.

                 q q q  t t t
        q q q  [ x x x  . . . ]
        t t t  [ . . .  x x x ]
    """
    L = num_queries + text_mask.shape[1]
    is_query = torch.arange(L, device=text_mask.device) < num_queries  # (L,)
    same_side = is_query[:, None] == is_query[None, :]  # (L, L)
    return bidirectional_mask(num_queries, text_mask) & same_side


def multimodal_causal_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """AGTG: queries see only queries; each text token sees all queries and the text up to itself.

                 q q q  t t t
        q q q  [ x x x  . . . ]
        t1     [ x x x  x . . ]
        t2     [ x x x  x x . ]
        t3     [ x x x  x x x ]
    """
    L = num_queries + text_mask.shape[1]
    pos = torch.arange(L, device=text_mask.device)
    query_row = (pos < num_queries)[:, None] & (pos < num_queries)[None, :]
    text_row = (pos >= num_queries)[:, None] & (pos[None, :] <= pos[:, None])  # earlier text, and all queries
    return bidirectional_mask(num_queries, text_mask) & (query_row | text_row)


# -------------------------------------------------------------------------------------------------------- layers


class Attention(nn.Module):
    """Multi-head attention with BERT's post-LN residual: norm(x + out(attend(x, context)))."""

    def __init__(self, cfg: AlignerConfig, context_dim: int):
        super().__init__()
        H = cfg.hidden_size
        self.heads, self.p = cfg.num_heads, cfg.dropout
        self.query, self.key, self.value = nn.Linear(H, H), nn.Linear(context_dim, H), nn.Linear(context_dim, H)
        self.out = nn.Linear(H, H)
        self.norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, context, mask=None):
        B, L, H = x.shape
        split = lambda t: t.view(B, t.shape[1], self.heads, H // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(context)), split(self.value(context))  # (B, h, *, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        return self.norm(x + self.drop(self.out(y.transpose(1, 2).reshape(B, L, H))))


class FeedForward(nn.Module):
    def __init__(self, cfg: AlignerConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.norm(x + self.drop(self.down(F.gelu(self.up(x)))))


class Layer(nn.Module):
    def __init__(self, cfg: AlignerConfig, cross: bool):
        super().__init__()
        self.self_attn = Attention(cfg, cfg.hidden_size)
        self.cross_attn = Attention(cfg, cfg.audio_dim) if cross else None
        self.ffn_query = FeedForward(cfg)
        self.ffn_text = FeedForward(cfg)

    def forward(self, x, audio, mask, Q: int, heard=None):
        x = self.self_attn(x, x, mask)  # (B, Q + T, H)
        queries, text = x[:, :Q], x[:, Q:]
        if self.cross_attn is not None and Q:
            queries = self.cross_attn(queries, audio, heard)  # only the queries hear the audio (its real tokens)
        parts = ([self.ffn_query(queries)] if Q else []) + ([self.ffn_text(text)] if text.shape[1] else [])
        return torch.cat(parts, dim=1)


class Aligner(nn.Module):
    def __init__(self, cfg: AlignerConfig):
        super().__init__()
        self.config = cfg
        H = cfg.hidden_size
        self.dec_id = cfg.vocab_size  # decoder-start token: one extra row of the word table
        self.ln_audio = nn.LayerNorm(cfg.audio_dim, eps=cfg.input_norm_eps)  # on the frozen encoder's output
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_queries, H) * 0.02)
        if cfg.llm_words:  # words as the LLM embeds them, mapped to H (attach_llm_words gives the table); [DEC]
            self.word_map = nn.Linear(cfg.llm_words, H)  # has a row of its own
            self.dec_embedding = nn.Parameter(torch.randn(H) * 0.02)
        else:
            self.word_embeddings = nn.Embedding(cfg.vocab_size + 1, H)
        self.position_embeddings = nn.Embedding(cfg.max_text_len, H)  # text only; queries have no position
        self.embed_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Layer(cfg, cross=i % cfg.cross_attention_freq == 0)
                                    for i in range(cfg.num_layers))
        # stage-0 heads
        self.audio_proj = nn.Linear(H, cfg.contrast_dim)
        self.text_proj = nn.Linear(H, cfg.contrast_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.atm_head = nn.Linear(H, 2)
        self.lm_transform = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.LayerNorm(H, eps=cfg.layer_norm_eps))
        self.lm_decoder = nn.Linear(H, cfg.vocab_size + 1)
        if cfg.llm_words:  # tied to the word vectors as well: computed from the LLM's table in `word_logits`
            del self.lm_decoder.weight
        else:
            self.lm_decoder.weight = self.word_embeddings.weight  # tied, as in BERT
        self.apply(self._init)

    @staticmethod
    def _init(m):  # BERT's initialisation
        if isinstance(m, (nn.Linear, nn.Embedding)) and isinstance(getattr(m, "weight", None), nn.Parameter):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def set_dropout(self, p: float):
        """Every dropout of the aligner at rate p (the config records it, so a saved aligner keeps it)."""
        self.config.dropout = p
        for m in self.modules():
            if isinstance(m, (nn.Dropout, Attention)):
                m.p = p

    # ---------------------------------------------------------------------------------------------------- words

    def attach_llm_words(self, table: torch.Tensor):
        """With llm_words: the frozen LLM's input embedding table (vocab, D), read but never trained or saved here
        (model.APT attaches its LLM's; stage 0 and the tagging protocol read it from the LLM's files)."""
        cfg = self.config
        if tuple(table.shape) != (cfg.vocab_size, cfg.llm_words):
            raise ValueError(f"the aligner reads an LLM word table of shape ({cfg.vocab_size}, {cfg.llm_words}), "
                             f"got {tuple(table.shape)}")
        self.__dict__["llm_table"] = table  # a plain attribute: not a parameter, not in the state dict

    def _llm_table(self) -> torch.Tensor:
        table = self.__dict__.get("llm_table")
        if table is None:
            raise RuntimeError("this aligner reads its words from the LLM's table: call attach_llm_words first")
        return table.detach()

    def embed_words(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T), [DEC] included -> word vectors (B, T, H)."""
        if not self.config.llm_words:
            return self.word_embeddings(ids)
        rows = F.embedding(ids.clamp(max=self.dec_id - 1), self._llm_table()).to(self.word_map.weight.dtype)
        x = self.word_map(rows)
        return torch.where((ids == self.dec_id)[..., None], self.dec_embedding.to(x.dtype), x)

    def word_logits(self, h: torch.Tensor) -> torch.Tensor:
        """AGTG's decoder, tied to the word vectors: (..., H) -> (..., vocab + 1)."""
        if not self.config.llm_words:
            return self.lm_decoder(h)
        table = self.word_map(self._llm_table().to(self.word_map.weight.dtype))  # (V, H)
        table = torch.cat([table, self.dec_embedding[None].to(table.dtype)])
        return F.linear(h, table.to(h.dtype), self.lm_decoder.bias.to(h.dtype))

    def forward(self, audio_feats=None, text_ids=None, text_mask=None, mask_fn=bidirectional_mask, audio_mask=None):
        """audio_feats (B, N, Da) or None (text alone); text_ids, text_mask (B, T) or None (queries alone);
        audio_mask (B, N) bool or None: which audio tokens the queries may hear (clips of different lengths padded
        to one N). Returns the hidden states (B, Q + T, H): query outputs first, then text outputs."""
        parts = []
        if audio_feats is not None:
            audio_feats = self.ln_audio(audio_feats)
            parts.append(self.query_tokens.expand(audio_feats.shape[0], -1, -1))  # (B, Q, H)
        if text_ids is not None:
            T = text_ids.shape[1]
            if T > self.config.max_text_len:
                raise ValueError(f"text of {T} tokens is longer than max_text_len={self.config.max_text_len}")
            pos = self.position_embeddings(torch.arange(T, device=text_ids.device))
            parts.append(self.embed_words(text_ids) + pos)  # (B, T, H)
        Q = parts[0].shape[1] if audio_feats is not None else 0
        x = self.embed_drop(self.embed_norm(torch.cat(parts, dim=1)))  # (B, Q + T, H)
        mask = None
        if text_ids is not None:
            text_mask = torch.ones_like(text_ids, dtype=torch.bool) if text_mask is None else text_mask.bool()
            mask = mask_fn(Q, text_mask)
        heard = None if audio_mask is None else audio_mask.bool()[:, None, None, :]  # (B, 1, 1, N)
        for layer in self.layers:
            x = layer(x, audio_feats, mask, Q, heard)
        return x

    def save(self, folder, extra: dict | None = None):
        """aligner.safetensors (the weights; the tied LM decoder once) and aligner.json (its config, and `extra`)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items() if k != "lm_decoder.weight"}
        save_file(state, str(folder / "aligner.safetensors"))
        (folder / "aligner.json").write_text(json.dumps({"aligner": asdict(self.config), **(extra or {})}))

    @classmethod
    def load(cls, folder, **overrides) -> Aligner:
        """An aligner written by `save`, strictly; `overrides` change config fields that hold no weights (dropout)."""
        folder = Path(folder)
        meta = json.loads((folder / "aligner.json").read_text())
        aligner = cls(AlignerConfig(**{**meta["aligner"], **overrides}))
        entries = safetensors_entries(folder / "aligner.safetensors")
        targets = dict(aligner.named_parameters())
        # the tied LM decoder is the word table (named_parameters lists it once): a file that stores it is refused
        check_keys({folder / "aligner.safetensors": entries}, {k: tuple(p.shape) for k, p in targets.items()}, set(),
                   (), folder)
        with torch.no_grad():
            for k, read in entries.items():
                read(targets[k])
        return aligner

    def instruct(self, audio_feats, instr_ids=None, instr_mask=None, audio_mask=None):
        """Stages 1-2: the queries read the audio and the instruction together (bidirectional), as InstructBLIP's
        Q-Former does. (B, N, Da) + (B, T) -> query outputs (B, Q, H)."""
        return self(audio_feats, instr_ids, instr_mask, bidirectional_mask, audio_mask)[:, :self.config.num_queries]

    def encode_text(self, text_ids, text_mask=None):
        """The text branch alone: the first token's output, projected and L2-normalised. (B, T) -> (B, E)."""
        return F.normalize(self.text_proj(self(None, text_ids, text_mask)[:, 0]), dim=-1)

    def encode_audio(self, audio_feats, audio_mask=None):
        """The query branch alone: every query output, projected and L2-normalised. (B, N, Da) -> (B, Q, E)."""
        return F.normalize(self.audio_proj(self(audio_feats, audio_mask=audio_mask)), dim=-1)


# -------------------------------------------------------------------------------------------------- stage 0 losses


def caption_keys(text_ids, text_mask) -> torch.Tensor:
    """One int64 per caption, equal for equal token sequences (a polynomial hash): lets duplicates be found
    across a batch, and across processes, without comparing variable-length texts. (B, T) -> (B,)"""
    powers = torch.full((text_ids.shape[1],), 1_000_003, dtype=torch.long, device=text_ids.device)
    powers = powers.cumprod(0)  # int64 arithmetic wraps around; the hash stays deterministic
    return (text_ids.masked_fill(~text_mask.bool(), 0) * powers).sum(1) + text_mask.sum(1)


def distributed() -> bool:
    """True under torch.distributed with more than one process: only then do the gathers below communicate."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every process along dim 0 (their batches may differ in size: a process that skipped an
    unreadable clip has fewer pairs); the local slice keeps its gradient (the others are constants). Without
    torch.distributed, x itself."""
    if not distributed():
        return x
    parts = gather_parts(x.detach())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def gather_all(x: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) from every process, concatenated along dim 0, without gradient; dim 1 padded with zeros to the
    longest (texts differ in length between processes). Without torch.distributed, x itself."""
    if not distributed():
        return x
    width = torch.tensor([x.shape[1]], device=x.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    return torch.cat(gather_parts(F.pad(x.detach(), (0, 0) * (x.dim() - 2) + (0, int(width) - x.shape[1]))))


def gather_parts(x: torch.Tensor) -> list[torch.Tensor]:
    """[x of process 0, x of process 1, ...] (no gradient), each at its own length in dim 0; the other dims must
    agree. all_gather needs equal shapes, so each is padded to the longest and cut back after."""
    sizes = batch_sizes(x.shape[0], x.device)
    padded = torch.cat([x, x.new_zeros(max(sizes) - x.shape[0], *x.shape[1:])]).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [p[:n] for p, n in zip(parts, sizes)]


def batch_sizes(n: int, device=None) -> list[int]:
    """Every process's n (its batch size), in rank order; [n] without torch.distributed."""
    if not distributed():
        return [n]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], device=device))
    return [int(k) for k in sizes]


def atc_loss(audio_emb, text_emb, temp, positives, label_smoothing: float = 0.1, across_processes: bool = True):
    """Audio-text contrastive loss. audio_emb (B, Q, E) and text_emb (B, E), L2-normalised, local to this process;
    positives (B, B_all) bool: which gathered pairs are true pairs (the same clip, or the same caption).
    Similarity = the best-matching query / temperature; cross-entropy both ways against the positives.
    across_processes=False: this process's pairs only (B_all = B). Returns (loss, sim_a2t (B, B_all), sim_t2a)."""
    gather = gather_with_grad if across_processes else (lambda x: x)
    audio_all, text_all = gather(audio_emb), gather(text_emb)  # (B_all, Q, E), (B_all, E)
    temp = temp.clamp(0.001, 0.5)
    sim_a2t = torch.einsum("bqe,ce->bcq", audio_emb, text_all).amax(-1) / temp  # (B, B_all)
    sim_t2a = torch.einsum("be,cqe->bcq", text_emb, audio_all).amax(-1) / temp  # (B, B_all)
    targets = positives.float() / positives.sum(1, keepdim=True)
    loss = (F.cross_entropy(sim_a2t, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_t2a, targets, label_smoothing=label_smoothing)) / 2
    return loss, sim_a2t, sim_t2a


def hard_negatives(sim, positives, generator=None):
    """For each row, one column drawn with probability softmax(sim) among the non-positive columns: a negative that
    the model currently finds similar. sim, positives (B, C). Returns (index (B,), valid (B,)); a row whose columns
    are all positive has no negative (valid False)."""
    # the positives left out before the softmax (as BLIP-2): after it, a dominant positive can round every
    # negative's weight to 0 at a low temperature
    weights = sim.detach().float().masked_fill(positives, float("-inf")).softmax(-1)
    valid = (~positives).any(-1)
    weights = torch.where(valid[:, None], weights.nan_to_num(0.0), (~positives).float() + 1.0)  # placeholder rows
    return draw(weights, generator), valid


def stage0_losses(aligner: Aligner, audio_feats, text_ids, text_mask, clip_ids, audio_mask=None, generator=None,
                  atm_negatives: str = "global", across_processes: bool = True) -> dict:
    """ATC + ATM + AGTG on a batch of audio-text pairs (BLIP-2's first stage). audio_feats (B, N, Da);
    text_ids, text_mask (B, T), each caption starting with BOS (its output is the text's summary for ATC) and
    ending with EOS; clip_ids (B,) int64 naming the clip of each pair (several captions of one clip are positives of
    each other). ATC contrasts every pair with those of all processes; ATM's hard negatives come from this process's
    batch (atm_negatives="local") or, as BLIP-2 draws them, from every process's ("global"; the same with one
    process). audio_mask (B, N) bool: which audio tokens are real, where clips of different lengths are padded
    (None: all). across_processes=False: this process's batch alone, whatever the processes (validation, where
    every process holds the same pairs). Returns {"atc", "atm", "agtg", "total"}, scalar tensors."""
    if atm_negatives not in ("local", "global"):
        raise ValueError(f"atm_negatives={atm_negatives!r}: expected local or global")
    Q, text_mask = aligner.config.num_queries, text_mask.bool()
    keys = caption_keys(text_ids, text_mask)
    gather = gather_with_grad if across_processes else (lambda x: x)
    positives = (clip_ids[:, None] == gather(clip_ids)[None, :]) | (keys[:, None] == gather(keys)[None, :])

    # ATC: one pass under the unimodal mask gives both branches: queries that heard only audio, text only text
    h = aligner(audio_feats, text_ids, text_mask, unimodal_mask, audio_mask)
    audio_emb = F.normalize(aligner.audio_proj(h[:, :Q]), dim=-1)  # (B, Q, E)
    text_emb = F.normalize(aligner.text_proj(h[:, Q]), dim=-1)  # (B, E)
    with torch.no_grad():  # the temperature itself kept in BLIP-2's bounds (a clamped copy would lose its gradient
        aligner.temp.clamp_(0.001, 0.5)  # for good once the parameter stepped outside)
    atc, sim_a2t, sim_t2a = atc_loss(audio_emb, text_emb, aligner.temp, positives, across_processes=across_processes)

    # ATM: is this pair a match? positives, plus per pair a hard negative text and a hard negative audio, drawn
    # from this process's pairs or from every process's
    B = audio_feats.shape[0]
    if sim_a2t.shape[1] == B or atm_negatives == "local":
        start = 0 if sim_a2t.shape[1] == B else sum(batch_sizes(B, audio_feats.device)[:dist.get_rank()])
        pool = slice(start, start + B)
        pool_audio, pool_heard, pool_ids, pool_mask = audio_feats, audio_mask, text_ids, text_mask
    else:  # every process's pairs (no gradient flows through them: the audio is frozen features, the text ids)
        pool = slice(None)
        if audio_mask is None:  # clips may still differ in length between processes
            audio_mask = torch.ones(audio_feats.shape[:2], dtype=torch.bool, device=audio_feats.device)
        pool_audio, pool_heard, pool_ids, pool_mask = map(gather_all, (audio_feats, audio_mask, text_ids, text_mask))
    neg_text, ok_t = hard_negatives(sim_a2t[:, pool], positives[:, pool], generator)  # for each audio, a wrong text
    neg_audio, ok_a = hard_negatives(sim_t2a[:, pool], positives[:, pool], generator)  # for each text, a wrong audio
    pad_t, pad_a = pool_ids.shape[1] - text_ids.shape[1], pool_audio.shape[1] - audio_feats.shape[1]  # to the pool's
    ids, mask, audio = F.pad(text_ids, (0, pad_t)), F.pad(text_mask, (0, pad_t)), F.pad(audio_feats, (0, 0, 0, pad_a))
    audio_in = torch.cat([audio, audio[ok_t], pool_audio[neg_audio[ok_a]]])
    ids_in = torch.cat([ids, pool_ids[neg_text[ok_t]], ids[ok_a]])
    mask_in = torch.cat([mask, pool_mask[neg_text[ok_t]], mask[ok_a]])
    heard_in = None
    if audio_mask is not None:
        heard = F.pad(audio_mask, (0, pad_a))
        heard_in = torch.cat([heard, heard[ok_t], pool_heard[neg_audio[ok_a]]])
    labels = (torch.arange(len(audio_in), device=clip_ids.device) < B).long()  # 1 = match
    h = aligner(audio_in, ids_in, mask_in, bidirectional_mask, heard_in)
    atm = F.cross_entropy(aligner.atm_head(h[:, :Q]).mean(1), labels)  # logits averaged over the queries

    # AGTG: generate the caption from the queries; [DEC] replaces BOS; each token sees the queries and earlier text
    dec_ids = text_ids.clone()
    dec_ids[:, 0] = aligner.dec_id
    h = aligner(audio_feats, dec_ids, text_mask, multimodal_causal_mask, audio_mask)
    logits = aligner.word_logits(aligner.lm_transform(h[:, Q:-1]))  # (B, T - 1, V + 1): predicts tokens 1..T-1
    targets = text_ids[:, 1:].masked_fill(~text_mask[:, 1:], -100)
    agtg = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, label_smoothing=0.1)
    return {"atc": atc, "atm": atm, "agtg": agtg, "total": atc + atm + agtg}


# ------------------------------------------------------------------------------------------ stage-0 batches, retrieval


def clip_ids(paths) -> torch.Tensor:
    """One int64 per audio path, equal in every process (CRC-32 of the path): in stage 0 the captions of one clip
    are positives of each other, even when they sit in different processes' batches. (B,)"""
    return torch.tensor([zlib.crc32(p.encode()) for p in paths])


class Stage0Batch(NamedTuple):
    audio_feats: torch.Tensor  # (B, N, Da) float32
    text_ids: torch.Tensor  # (B, T), BOS ... EOS
    text_mask: torch.Tensor  # (B, T) bool
    clip_ids: torch.Tensor  # (B,) int64
    audio_mask: torch.Tensor | None  # (B, N) bool where clips differ in length, else None


def pad_tokens(clip_feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clips' audio tokens, each (N_i, Da) or a whole clip's windows (W_i, N, Da) read as one sequence of W_i * N,
    as one batch (B, max N_i, Da), zero-padded, with the mask (B, max N_i) of the real tokens (None where every clip
    has the same length)."""
    flat = [f.reshape(-1, f.shape[-1]) for f in clip_feats]
    longest = max(len(f) for f in flat)
    if all(len(f) == longest for f in flat):
        return torch.stack(flat), None
    feats = torch.stack([F.pad(f, (0, 0, 0, longest - len(f))) for f in flat])
    return feats, torch.arange(longest)[None] < torch.tensor([len(f) for f in flat])[:, None]


def stage0_batch(captions: list[str], clip_feats: list[torch.Tensor], paths: list[str], tokenizer, device):
    """Audio-text pairs as `stage0_losses` takes them: clip_feats, one per pair (the window the caption is paired
    with (N, Da), or the whole clip's windows (W, N, Da), which the aligner then reads as one sequence), become
    audio_feats (B, N, Da) in float32 (padded, with audio_mask, where clips differ in length); captions become
    text_ids, text_mask (B, T), each with BOS and EOS; paths give the clip ids (B,). A Stage0Batch on `device`."""
    ids, mask = tokenizer.pad([tokenizer.encode(c, eos=True) for c in captions])
    audio_feats, audio_mask = pad_tokens(clip_feats)
    return Stage0Batch(audio_feats.to(device).float(), ids.to(device), mask.to(device), clip_ids(paths).to(device),
                       None if audio_mask is None else audio_mask.to(device))


@torch.no_grad()
def retrieval_similarity(aligner: Aligner, audio_feats, text_ids, text_mask, audio_mask=None) -> torch.Tensor:
    """Every clip's similarity to every caption with the ATC embeddings, as ATC scores a pair: the best-matching
    query's cosine. audio_feats (A, N, Da), text_ids, text_mask (C, T) -> (A, C)."""
    a = aligner.encode_audio(audio_feats, audio_mask)  # (A, Q, E)
    t = aligner.encode_text(text_ids, text_mask)  # (C, E)
    return torch.einsum("aqe,ce->acq", a, t).amax(-1)


def retrieval_r1(aligner: Aligner, audio_feats, text_ids, text_mask, owner, audio_mask=None) -> dict:
    """Audio<->text retrieval by `retrieval_similarity`: captions text_ids, text_mask (C, T), owner (C,) the clip
    each caption describes (a clip may have several). Returns R@1 each way: {"a2t_r1", "t2a_r1"}."""
    sim = retrieval_similarity(aligner, audio_feats, text_ids, text_mask, audio_mask)  # (A, C)
    a2t = (owner[sim.argmax(1)] == torch.arange(sim.shape[0], device=owner.device)).float().mean().item()
    t2a = (sim.argmax(0) == owner).float().mean().item()
    return {"a2t_r1": a2t, "t2a_r1": t2a}

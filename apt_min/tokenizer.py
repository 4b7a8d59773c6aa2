"""Text <-> token ids for the LLM, as Llama does it: BOS at the start of a sequence, EOS closes an answer.

Reads a model folder's `tokenizer.model` (sentencepiece: Vicuna, Llama 1/2) or, where a model ships only that,
`tokenizer.json` (the `tokenizers` package), so any Llama-architecture model on disk can be plugged in.
`train_sentencepiece` builds a Llama-style tokenizer on a corpus (the tiny preset trains one on its synthetic text).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from apt_min.checkpoint import CheckpointError
from apt_min.errors import MissingFileError


class Tokenizer:
    def __init__(self, path: str | Path):
        """path: a model folder, or a tokenizer.model / tokenizer.json file."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        file = next((f for f in (path / "tokenizer.model", path / "tokenizer.json") if f.is_file()), None) \
            if path.is_dir() else (path if path.is_file() else None)
        if file is None:
            raise MissingFileError(f"{path}: no tokenizer.model or tokenizer.json found")
        self.file = file
        if file.suffix == ".model":
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor()
            try:
                self.sp.Load(str(file))
            except (OSError, RuntimeError) as e:
                raise CheckpointError(f"{file}: not a sentencepiece model ({e})") from None
            self.hf = None
            self.vocab_size = self.sp.GetPieceSize()
            self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
            # Llama has no pad token; FastChat (Vicuna's trainer) pads with <unk>. Padding is always masked out.
            self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else max(self.sp.unk_id(), 0)
        else:
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self.hf = HFTokenizer.from_file(str(file))
            except Exception as e:
                raise CheckpointError(f"{file}: not a tokenizers JSON file ({e})") from None
            self.sp = None
            self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
            special = self._special_tokens(folder)
            self.bos_id, self.eos_id = self.hf.token_to_id(special["bos"]), self.hf.token_to_id(special["eos"])
            if self.bos_id is None or self.eos_id is None:
                raise CheckpointError(f"{file}: BOS {special['bos']!r} or EOS {special['eos']!r} is not in the "
                                      "vocabulary")
            pad = self.hf.token_to_id(special["pad"]) if "pad" in special else None
            unk = self.hf.token_to_id(special["unk"]) if "unk" in special else None
            self.pad_id = next(i for i in (pad, unk, self.eos_id) if i is not None)  # <unk>, as with sentencepiece

    @staticmethod
    def _special_tokens(folder: Path) -> dict:
        """BOS/EOS/unk/pad strings from tokenizer_config.json; Llama's <s> and </s> where it is absent."""
        names = {"bos": "<s>", "eos": "</s>"}
        config = folder / "tokenizer_config.json"
        if config.is_file():
            raw = json.loads(config.read_text())
            for key in ("bos", "eos", "unk", "pad"):
                tok = raw.get(f"{key}_token")
                if isinstance(tok, dict):
                    tok = tok.get("content")
                if tok:
                    names[key] = tok
        return names

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.Encode(text) if self.sp is not None else self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        """Text of `ids`, up to the first EOS; BOS, EOS and padding are left out, and so are ids beyond this
        vocabulary (rows an LLM added to its table, as InstructBLIP's Vicuna has [PAD] and <image> after Vicuna's)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        ids = [i for i in ids if i not in (self.bos_id, self.pad_id) and 0 <= i < self.vocab_size]
        return self.sp.Decode(ids) if self.sp is not None else self.hf.decode(ids, skip_special_tokens=True)

    def pad(self, seqs: list[list[int]], side: str = "right"):
        """Stack id lists into (B, T) ids and a (B, T) bool mask, padding on the right (training) or the left
        (generation, so every row ends at its last token)."""
        return pad_ids(seqs, self.pad_id, side)


def pad_ids(seqs: list[list[int]], pad_id: int, side: str = "right"):
    """Id lists -> (B, T) ids padded with pad_id on `side`, and a (B, T) bool mask of the real tokens."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        span = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = True
    return ids, mask


def train_sentencepiece(texts, path: str | Path, vocab_size: int) -> Path:
    """Train a BPE sentencepiece model with Llama's conventions (<unk>=0, <s>=1, </s>=2, no pad, byte fallback,
    digits split, a leading-space marker) on an iterable of strings; write it to `path` (a .model file)."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path

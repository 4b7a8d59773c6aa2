"""APT-BLIP-2 (paper §4.4, Table 7): a trained APT plugged, with no further training, into a frozen InstructBLIP whose
LLM is the one the APT was trained against, so one sequence carries what the model sees, what it hears and the question.

    frames (F, 3, 224, 224) -> ImageEncoder -> (F, 257, Dv) -> visual aligner, read with the prompt -> (F, Q, H)
                            -> proj -> (F * Q, D)                                        [InstructBLIP, frozen]
    audio                   -> the APT: <AUDIO> + (W * Q, D), read with the prompt      [trained against that LLM]
    sequence: [visual queries of each frame][<AUDIO> + acoustic prompts][BOS + prompt]  -> the shared frozen LLM

InstructBLIP's parts are ours, not new code: the image encoder is the ViT of `audiomae.py` with EVA ViT-g's settings
(`vision.py`), its Q-Former is our `Aligner` at InstructBLIP's size (12 layers, 768-d, instruction-aware, with its
own BERT WordPiece tokenizer), its LLM our `Llama`. `InstructBLIP.from_pretrained` reads a Hugging Face InstructBLIP
folder strictly through one name map (`NAME_MAP`). `APTBLIP2` builds the sequences of the three modes the paper
compares (audio-visual, video only, audio only) and answers multiple-choice questions by the option it names and by
the likelihood of each option's text, both after AVQA's prompt, which lists the options, and after the question
alone (the cloze form: an LLM too small to read an option list is scored on what it would say).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from apt_min.aligner import STAGE0_HEADS, Aligner, AlignerConfig
from apt_min.checkpoint import CheckpointError, check_keys, checkpoint_tensors, resolve_dtype, safetensors_entries
from apt_min.llama import Llama, LlamaConfig
from apt_min.model import APT, fingerprint, model_files, same_llm, short
from apt_min.tokenizer import Tokenizer, pad_ids
from apt_min.vision import ImageEncoder, ImageProcessing, ViTConfig

# Hugging Face InstructBLIP key -> ours (the first pattern that matches wins; every stored key must match one)
NAME_MAP = [
    (r"vision_model\.embeddings\.class_embedding", r"vision.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", r"vision.pos_embed"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", r"vision.patch_embed.proj.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"vision.blocks.\1.norm1."),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"vision.blocks.\1.norm2."),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"vision.blocks.\1.attn.qkv."),  # k bias: zeros
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"vision.blocks.\1.attn.proj."),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"vision.blocks.\1.mlp."),
    (r"vision_model\.post_layernorm\.", r"qformer.ln_audio."),  # BLIP-2's ln_vision: the aligner's input norm
    (r"query_tokens", r"qformer.query_tokens"),
    (r"qformer\.embeddings\.word_embeddings\.", r"qformer.word_embeddings."),
    (r"qformer\.embeddings\.position_embeddings\.", r"qformer.position_embeddings."),
    (r"qformer\.embeddings\.layernorm\.", r"qformer.embed_norm."),
    (r"qformer\.encoder\.layer\.(\d+)\.attention\.attention\.", r"qformer.layers.\1.self_attn."),
    (r"qformer\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"qformer.layers.\1.self_attn.out."),
    (r"qformer\.encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"qformer.layers.\1.self_attn.norm."),
    (r"qformer\.encoder\.layer\.(\d+)\.crossattention\.attention\.", r"qformer.layers.\1.cross_attn."),
    (r"qformer\.encoder\.layer\.(\d+)\.crossattention\.output\.dense\.", r"qformer.layers.\1.cross_attn.out."),
    (r"qformer\.encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.", r"qformer.layers.\1.cross_attn.norm."),
    (r"qformer\.encoder\.layer\.(\d+)\.intermediate_query\.dense\.", r"qformer.layers.\1.ffn_query.up."),
    (r"qformer\.encoder\.layer\.(\d+)\.output_query\.dense\.", r"qformer.layers.\1.ffn_query.down."),
    (r"qformer\.encoder\.layer\.(\d+)\.output_query\.LayerNorm\.", r"qformer.layers.\1.ffn_query.norm."),
    (r"qformer\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"qformer.layers.\1.ffn_text.up."),
    (r"qformer\.encoder\.layer\.(\d+)\.output\.dense\.", r"qformer.layers.\1.ffn_text.down."),
    (r"qformer\.encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"qformer.layers.\1.ffn_text.norm."),
    (r"language_projection\.", r"proj."),
    (r"language_model\.", r"llm."),
]
# stored keys we leave out on purpose: position ids older transformers saved as a buffer (recomputed here); the LLM's
# own (a saved rotary table) are Llama's to drop
DROPPED = ("qformer.embeddings.position_ids",)

# transformers writes into config.json only the fields that differ from its defaults; these are its defaults for the
# parts of InstructBLIP-Vicuna-7B that a saved config may therefore leave out
VISION_DEFAULTS = {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39, "num_attention_heads": 16,
                   "image_size": 224, "patch_size": 14, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
                   "qkv_bias": True}
QFORMER_DEFAULTS = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 512,
                    "layer_norm_eps": 1e-12, "cross_attention_frequency": 2, "encoder_hidden_size": 1408,
                    "position_embedding_type": "absolute"}
TEXT_DEFAULTS = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                 "num_hidden_layers": 32, "num_attention_heads": 32, "rms_norm_eps": 1e-6,
                 "max_position_embeddings": 2048}


def rename(key: str) -> str | None:
    for pattern, ours in NAME_MAP:
        if re.match(pattern, key):
            return re.sub(f"^{pattern}", ours, key)
    return None


class QFormerTokenizer:
    """InstructBLIP's Q-Former reads the instruction in BERT's WordPiece (`qformer_tokenizer/` of the checkpoint),
    [CLS] first and [SEP] last, as its processor writes it."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            self.hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.txt").is_file():
            from tokenizers import BertWordPieceTokenizer

            config = folder / "tokenizer_config.json"
            lower = json.loads(config.read_text()).get("do_lower_case", True) if config.is_file() else True
            self.hf = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lower)
        else:
            raise CheckpointError(f"{folder}: no Q-Former tokenizer (tokenizer.json or vocab.txt)")
        self.pad_id = self.hf.token_to_id("[PAD]") or 0

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> ids (B, T) and mask (B, T), right-padded."""
        return pad_ids([self.hf.encode(t).ids for t in texts], self.pad_id)


def train_qformer_tokenizer(texts, folder: str | Path, vocab_size: int = 2000) -> QFormerTokenizer:
    """A lower-cased BERT WordPiece tokenizer for `texts` (the vision stage's stand-in for BERT's own), written to
    folder/tokenizer.json. Its vocabulary is chosen here, the same in every run: BERT's special tokens, each character
    of the texts alone and as a continuation ("##e"), then whole words (as BERT's normaliser and pre-tokeniser split
    them), the most frequent first and ties in alphabetical order, up to vocab_size; a word left out is spelt in
    pieces. (The tokenizers library's WordPiece trainer breaks ties between equally frequent merges in another order
    in every process: the same texts gave another vocabulary, and another vision side, each run.)"""
    from tokenizers import BertWordPieceTokenizer
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from tokenizers.processors import BertProcessing

    normalize, split = BertNormalizer(lowercase=True).normalize_str, BertPreTokenizer().pre_tokenize_str
    counts = Counter(word for text in texts for word, _ in split(normalize(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    words = [w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])) if len(w) > 1]
    vocab += words[:max(0, vocab_size - len(vocab))]
    hf = BertWordPieceTokenizer({token: i for i, token in enumerate(vocab)}, lowercase=True)
    hf.post_processor = BertProcessing(("[SEP]", hf.token_to_id("[SEP]")), ("[CLS]", hf.token_to_id("[CLS]")))
    Path(folder).mkdir(parents=True, exist_ok=True)
    part = Path(folder) / f"tokenizer.json.{os.getpid()}"  # whole or not at all: every process writes the same file
    hf.save(str(part))
    os.replace(part, Path(folder) / "tokenizer.json")
    return QFormerTokenizer(folder)


class InstructBLIP(nn.Module):
    """The frozen image side of InstructBLIP and its LLM: `frame_prompts` turns frames into the LLM's soft prompts."""

    def __init__(self, vit: ViTConfig, qformer: AlignerConfig, llm: Llama, tokenizer: Tokenizer,
                 qformer_tokenizer: QFormerTokenizer, processing: ImageProcessing | None = None):
        super().__init__()
        self.vision = ImageEncoder(vit)
        self.qformer = Aligner(qformer)
        self.proj = nn.Linear(qformer.hidden_size, llm.config.hidden_size)
        self.llm = llm
        self.tokenizer, self.qformer_tokenizer = tokenizer, qformer_tokenizer
        self.processing = processing or ImageProcessing(size=vit.image_size)
        self.requires_grad_(False)
        self.eval()

    def visual_prompts(self, pixels: torch.Tensor, instructions: list[str], tokens=None) -> torch.Tensor:
        """pixels (N, 3, S, S), each frame read with its instruction -> soft prompts (N, Q, D) (with gradients, for
        the vision stage; `tokens`: the frames' ViT tokens (N, 1 + P, Dv), if already computed)."""
        ids, mask = self.qformer_tokenizer(instructions)
        tokens = self.frame_tokens(pixels) if tokens is None else tokens  # (N, 1 + P, Dv)
        device = tokens.device
        queries = self.qformer.instruct(tokens, ids.to(device), mask.to(device))  # (N, Q, H)
        return self.proj(queries)  # (N, Q, D)

    def frame_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, S, S) -> the frozen image encoder's tokens (N, 1 + P, Dv)."""
        return self.vision(pixels.to(self.proj.weight.device, self.proj.weight.dtype))

    @torch.no_grad()
    def frame_prompts(self, pixels: torch.Tensor, instruction: str, tokens=None) -> torch.Tensor:
        """pixels (F, 3, S, S), the frames of one video, each read with the same instruction -> (F * Q, D), frame by
        frame in time order. tokens: the frames' encoder tokens (frame_tokens), if already computed."""
        return self.visual_prompts(pixels, [instruction] * len(pixels), tokens).reshape(-1, self.proj.out_features)

    def vision_state(self) -> dict[str, torch.Tensor]:
        """The vision side without the LLM and the aligner's unused stage-0 heads: what `save_vision` writes."""
        heads = tuple(f"qformer.{h}" for h in STAGE0_HEADS)
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("llm.", *heads))}

    def save_vision(self, folder: str | Path, llm_id: dict, extra: dict | None = None):
        """A vision side trained here (`train.py --stage vision`): vision.safetensors, vision.json (the configs and
        the identity of the LLM it was trained against) and its Q-Former tokenizer."""
        from dataclasses import asdict

        from safetensors.torch import save_file

        folder = Path(folder)
        (folder / "qformer_tokenizer").mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.vision_state().items()},
                  str(folder / "vision.safetensors"))
        self.qformer_tokenizer.hf.save(str(folder / "qformer_tokenizer" / "tokenizer.json"))
        meta = {"vit": asdict(self.vision.config), "qformer": asdict(self.qformer.config),
                "processing": asdict(self.processing), "llm": llm_id, **(extra or {})}
        (folder / "vision.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load_vision(cls, folder: str | Path, llm: Llama, tokenizer: Tokenizer, llm_id: dict) -> InstructBLIP:
        """A vision side written by `save_vision`, around `llm`, which must be the LLM it was trained against."""
        folder = Path(folder)
        if not (folder / "vision.json").is_file():
            raise CheckpointError(f"{folder}: no trained vision side (vision.json); run `python train.py --stage "
                                  "vision` or set --vision_path to an InstructBLIP folder")
        meta = json.loads((folder / "vision.json").read_text())
        if not same_llm(meta["llm"], llm_id, llm):
            raise CheckpointError(f"{folder}: this vision side was trained against the llm {short(meta['llm'])}, "
                                  f"but the llm given is {short(llm_id)}")
        model = cls(ViTConfig(**meta["vit"]), AlignerConfig(**meta["qformer"]), llm, tokenizer,
                    QFormerTokenizer(folder / "qformer_tokenizer"), ImageProcessing(**meta["processing"]))
        targets = dict(model.named_parameters())
        entries = safetensors_entries(folder / "vision.safetensors")
        expected = {k: tuple(v.shape) for k, v in model.vision_state().items()}
        check_keys({folder / "vision.safetensors": entries}, expected, set(), (), folder)
        with torch.no_grad():
            for key, read in entries.items():
                read(targets[key])
        model.identity = llm_id
        return model.to(llm.model.embed_tokens.weight.device).eval()

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: str | torch.dtype = torch.float32,
                        device="cpu") -> InstructBLIP:
        """A Hugging Face InstructBLIP folder (config.json, safetensors shards + index, the LLM's tokenizer,
        qformer_tokenizer/, preprocessor_config.json), loaded strictly: every stored key is renamed by NAME_MAP and
        must fill one of our tensors with its shape; only the aligner's stage-0 heads, which InstructBLIP has not,
        are left out."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder}: not a model folder (config.json missing)")
        raw = json.loads((folder / "config.json").read_text())
        if raw.get("model_type") != "instructblip":
            raise CheckpointError(f"{folder}/config.json: model_type={raw.get('model_type')!r}, not 'instructblip'")
        v = VISION_DEFAULTS | raw.get("vision_config", {})
        q = QFORMER_DEFAULTS | raw.get("qformer_config", {})
        t = TEXT_DEFAULTS | raw.get("text_config", {})
        bad = [f"{name}.{k}={c[k]!r}" for name, c, k, want in (
            ("vision_config", v, "hidden_act", "gelu"), ("vision_config", v, "qkv_bias", True),
            ("qformer_config", q, "hidden_act", "gelu"), ("qformer_config", q, "position_embedding_type", "absolute"))
            if c[k] != want]
        if not raw.get("use_decoder_only_language_model", True):
            bad.append("an encoder-decoder language model")
        if bad:
            raise CheckpointError(f"{folder}/config.json: not an InstructBLIP this code reads ({', '.join(bad)}); "
                                  "it reads EVA-ViT + Q-Former + a Llama")
        vit = ViTConfig(image_size=v["image_size"], patch_size=v["patch_size"], dim=v["hidden_size"],
                        depth=v["num_hidden_layers"], heads=v["num_attention_heads"], hidden=v["intermediate_size"],
                        norm_eps=v["layer_norm_eps"])
        qformer = AlignerConfig(
            vocab_size=q["vocab_size"] - 1, audio_dim=q["encoder_hidden_size"], hidden_size=q["hidden_size"],
            num_layers=q["num_hidden_layers"], num_heads=q["num_attention_heads"],
            intermediate_size=q["intermediate_size"], num_queries=raw.get("num_query_tokens", 32),
            cross_attention_freq=q["cross_attention_frequency"], max_text_len=q["max_position_embeddings"],
            dropout=0.0, layer_norm_eps=q["layer_norm_eps"], input_norm_eps=v["layer_norm_eps"])
        # "auto": the top's "dtype" (5.x) before its "torch_dtype" (4.x), as transformers reads them; else the LLM's
        dtype = resolve_dtype(dtype, auto=raw.get("dtype") or raw.get("torch_dtype") or t.get("torch_dtype"))

        shards, unnamed = {}, []
        for file, entries in checkpoint_tensors(folder).items():
            shards[file] = {}
            for key, entry in entries.items():
                ours = rename(key)
                if ours is None:
                    unnamed.append(key)
                else:
                    shards[file][ours] = entry
        unnamed = [k for k in unnamed if k not in DROPPED]
        if unnamed:
            raise CheckpointError(f"{folder}: keys no part of InstructBLIP reads: {unnamed[:8]}"
                                  + (f" ... ({len(unnamed)} in all)" if len(unnamed) > 8 else ""))
        llm_shards = {f: {k[len("llm."):]: e for k, e in entries.items() if k.startswith("llm.")}
                      for f, entries in shards.items()}
        llm = Llama.from_shards(LlamaConfig.from_dict(t, folder / "config.json"), llm_shards, dtype, device, folder)
        model = cls(vit, qformer, llm, Tokenizer(folder), QFormerTokenizer(folder / "qformer_tokenizer"),
                    ImageProcessing.read(folder))
        rest = {f: {k: e for k, e in entries.items() if not k.startswith("llm.")} for f, entries in shards.items()}
        check_keys(rest, {k: tuple(v.shape) for k, v in model.vision_state().items()}, set(), (), folder)
        model.to(device, dtype)
        targets = dict(model.named_parameters())
        with torch.no_grad():
            for entries in rest.values():
                for key, read in entries.items():
                    read(targets[key])
        model.identity = {"path": str(folder), "fingerprint": fingerprint(*model_files(folder))}
        return model.eval()


# ------------------------------------------------------------------------------------------------------ APT-BLIP-2

# mode -> (the frames, the audio): the three rows of the paper's Table 7
MODES = {"audio-visual": (True, True), "video": (True, False), "audio": (False, True)}
# the public APT code's AVQA prompt (4 options)
AVQA_PROMPT = ("Choose the correct option to the following question: {question} Options: 0 {c0}; 1 {c1}; 2 {c2}; "
               "3 {c3}. Answer:")


def avqa_prompt(question: str, options: list[str]) -> str:
    if len(options) != 4:
        raise ValueError(f"an AVQA question has 4 options, got {len(options)}: {options}")
    return AVQA_PROMPT.format(question=question, **{f"c{i}": c for i, c in enumerate(options)})


class Answer(NamedTuple):
    """One multiple-choice question answered in one mode."""

    named: int  # the option the model names after AVQA's prompt (named_option), -1 for none
    said: str  # what it said there (greedy)
    scores: torch.Tensor  # (N,) log-likelihood of each option's text after AVQA's prompt, which lists the options
    cloze: torch.Tensor  # (N,) the same after the question alone, the options not listed (the cloze form)


def named_option(said: str, options: list[str]) -> int:
    """The option an answer names: its number ("2", "(2) dog"), or the one option it says: the whole answer, else
    the options whose text it contains, where one inside another ("car" in "car horn") counts as the longer; -1 when
    it names none or several (scored as wrong). (Text inside a word counts: "bells" and "raining" name bell and
    rain, and "cartoon" names car.)"""
    if m := re.match(r"\s*\(?([0-9])\b", said):
        return int(m.group(1)) if int(m.group(1)) < len(options) else -1
    text, names = said.strip().lower().rstrip("."), [c.strip().lower() for c in options]
    if text and text in names:  # an empty answer names no option, not an empty one
        return names.index(text)
    hits = [i for i, c in enumerate(names) if c and c in text]
    hits = [i for i in hits if not any(names[i] != names[j] and names[i] in names[j] for j in hits)]
    return hits[0] if len(hits) == 1 else -1


class APTBLIP2:
    """An APT and an InstructBLIP sharing one frozen LLM; nothing here is trained. The APT reads the same prompt as
    the visual Q-Former does (its instruction). The sequence is InstructBLIP's for a real InstructBLIP: soft prompts,
    then BOS and the text (`PROMPT_FORMATS["instructblip"]`); a vision side trained here against an instruct LLM
    (`train.py --stage vision`) uses the APT's own format, the visual queries first inside it."""

    def __init__(self, blip: InstructBLIP, apt: APT, prompt_format: str | None = "instructblip",
                 blocks_apart: bool = False):
        if apt.llm is not blip.llm:
            raise ValueError("the APT must be built around the InstructBLIP's own LLM (APTBLIP2.plug does that)")
        self.blip, self.apt, self.blocks_apart = blip, apt, blocks_apart
        apt.prompt_format = prompt_format or apt.prompt_format  # None: the APT's own
        apt.eval()

    @classmethod
    def plug(cls, blip: InstructBLIP, apt_folder: str | Path, encoder, encoder_id: dict, cache=None,
             prompt_format: str | None = "instructblip", blocks_apart: bool = False) -> APTBLIP2:
        """Load a trained APT around `blip`'s LLM. It must be the LLM the APT was trained against: the same files,
        or the same weights (the APT's weight probe; InstructBLIP holds its Vicuna in its own shards). Otherwise a
        CheckpointError says which LLM the APT needs. blocks_apart: the visual and the acoustic prompts do not see
        each other (config.avqa_blocks_apart)."""
        apt = APT.load(apt_folder, encoder, blip.llm, blip.tokenizer, encoder_id, blip.identity, cache)
        return cls(blip, apt.to(blip.llm.lm_head.weight.device), prompt_format, blocks_apart)  # where the LLM is

    @staticmethod
    def segments(prompt: str, mode: str, visual: torch.Tensor | None = None, audio: str | None = None):
        """The sequence of one question as APT segments: [visual queries of each frame][<AUDIO> + acoustic][prompt].
        visual: the frames' soft prompts (InstructBLIP.frame_prompts); audio: a file path."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {list(MODES)}")
        see, hear = MODES[mode]
        if (see and visual is None) or (hear and audio is None):
            raise ValueError(f"mode {mode!r} needs {'frames' if see and visual is None else 'audio'}")
        return ([("prompts", visual)] if see else []) + ([("audio", audio)] if hear else []) + [("text", prompt)]

    @torch.no_grad()
    def answer(self, question: str, options: list[str], modes=tuple(MODES), frames: torch.Tensor | None = None,
               audio: str | None = None, max_new_tokens: int = 8) -> dict:
        """One multiple-choice question in each of `modes`: {mode: Answer}, asked twice: with AVQA's prompt (the
        option named, and each option's likelihood) and as the question alone (each option's likelihood: cloze).
        frames (F, 3, S, S) as `processing` makes them; the frames and the clip are encoded once for all modes and
        both prompts (the visual and acoustic queries read each prompt as their instruction)."""
        see, hear = any(MODES[m][0] for m in modes), any(MODES[m][1] for m in modes)
        feats = self.apt.encode_clips([audio], strict=True)[0] if hear else {}
        seen = self.blip.frame_tokens(frames) if see else None
        asked = []
        for prompt, tokens in ((avqa_prompt(question, options), max_new_tokens), (question, 0)):
            visual = self.blip.frame_prompts(frames, prompt, seen) if see else None
            asked.append({m: self.apt.answer_and_rank(self.segments(prompt, m, visual, audio), options, feats, tokens,
                                                      self.blocks_apart) for m in modes})
        listed, alone = asked
        return {m: Answer(named_option(listed[m][0], options), listed[m][0], listed[m][1], alone[m][1])
                for m in modes}

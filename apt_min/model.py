"""APT: the frozen audio encoder and the frozen LLM joined by the trainable aligner (paper §3.1-3.2, Figure 1).

    ("audio", path) -> fbank windows -> AudioMAE (frozen) -> features (W, N, Da)         [encode_clips, cached]
    features + the text that follows the clip -> Aligner.instruct -> (W, Q, H) -> proj -> (W*Q, D)
                                                   (long_audio="all", the paper preset: (1, Q, H) -> (Q, D))
    sequence: [BOS] then, in the given order, text tokens or [<AUDIO>, W*Q acoustic embeddings], then the answer + EOS
              (an instruct LLM's chat template around the segments instead of BOS: PROMPT_FORMATS)
    -> Llama (frozen) -> loss on the answer tokens and EOS only / generate()

Trainable: the aligner, `proj`, and `audio_token` (one learned vector, not a vocabulary entry). Only this module
joins the parts; it is the only one that knows both audio and the LLM.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from apt_min import audio
from apt_min.aligner import STAGE0_HEADS, Aligner, AlignerConfig, pad_tokens
from apt_min.audiomae import AudioMAE, AudioMAEConfig
from apt_min.checkpoint import CheckpointError, safetensors_entries
from apt_min.errors import SettingError
from apt_min.llama import KVCache, Llama, SharedPrefix
from apt_min.tokenizer import Tokenizer


def fingerprint(*files) -> str:
    """A short identity for weight files without reading them whole: names, sizes and the first MiB of each."""
    h = hashlib.sha256()
    for f in sorted(Path(f) for f in files):
        h.update(f.name.encode() + str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def encoder_identity(path: str | Path, config: AudioMAEConfig) -> str:
    """An encoder's identity as an APT records it (the feature cache's key, the encoder it was trained against): its
    file's fingerprint; for a released .pth, which holds weights only, with the settings it was read with (the block
    read, the window length and the shape belong to what the APT saw as much as the file does)."""
    identity = fingerprint(path)
    if Path(path).suffix != ".safetensors":
        settings = json.dumps(asdict(config), sort_keys=True)
        identity = hashlib.sha256(f"{identity}|{settings}".encode()).hexdigest()[:16]
    return identity


def model_files(folder: Path) -> list[Path]:
    return sorted([*folder.glob("config.json"), *folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")])


def weight_probe(llm: Llama, n: int = 16) -> list:
    """A few of the LLM's weights at fixed places, as numbers: [[name, flat index, value], ...]. It identifies the
    weights whatever files and dtype hold them: InstructBLIP keeps its Vicuna inside its own shards, in float32, with
    rows added after the vocabulary's (a flat index of the first rows means the same entry in both tables)."""
    params = dict(llm.named_parameters())
    last = llm.config.num_hidden_layers - 1
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             f"model.layers.{last}.mlp.down_proj.weight", "model.norm.weight"]
    probe = []
    for name in names:
        flat = params[name].detach().reshape(-1)
        for k in range(n):
            i = (k * 2_654_435_761 + 12_345) % flat.numel()  # spread over the tensor, the same every time
            probe.append([name, i, float(flat[i])])
    return probe


def same_llm(saved: dict, given: dict, llm: Llama) -> bool:
    """Whether `llm` (identified by `given`) is the LLM a saved part was trained against (identified by `saved`):
    the same files, or, where the saved identity has a weight probe, the same weights (other files may hold the
    same LLM: InstructBLIP keeps its Vicuna in its own shards, blip2.py)."""
    if saved["fingerprint"] == given["fingerprint"]:
        return True
    return "probe" in saved and same_weights(saved["probe"], llm)


def same_weights(probe: list, llm: Llama, rtol: float = 1e-2) -> bool:
    """Whether `llm` holds the probed weights (to bf16 rounding: the same LLM in another dtype still matches)."""
    params = dict(llm.named_parameters())
    if any(name not in params or i >= params[name].numel() for name, i, _ in probe):
        return False
    want = torch.tensor([v for _, _, v in probe], dtype=torch.float64)
    have = torch.tensor([float(params[name].detach().reshape(-1)[i]) for name, i, _ in probe], dtype=torch.float64)
    return bool((have - want).abs().max() <= rtol * want.abs().max())


class FeatureCache:
    """Encoder features per audio file, computed once: one safetensors file each under `folder`, and in memory.
    The key covers the file (path, size, mtime) and `setting`: the front end (window length), the encoder's
    fingerprint and, where not fp32, the dtype it computed in (build.feature_cache), so a changed file, setting,
    encoder or precision is never served stale features."""

    def __init__(self, folder: str | Path, setting: str, memory: bool = True):
        self.folder, self.setting = Path(folder), setting
        self.memory = {} if memory else None

    def _key(self, path: str) -> str:
        st = Path(path).stat()
        return hashlib.sha1(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.setting}".encode()).hexdigest()

    def get(self, path: str) -> torch.Tensor | None:
        key = self._key(path)
        if self.memory is not None and key in self.memory:
            return self.memory[key]
        file = self.folder / key[:2] / f"{key}.safetensors"
        if not file.is_file():
            return None
        entry = safetensors_entries(file)["features"]
        feats = torch.empty(entry.shape, dtype=torch.float16)
        entry(feats)
        if self.memory is not None:
            self.memory[key] = feats
        return feats

    def put(self, path: str, feats: torch.Tensor):
        from safetensors.torch import save_file

        key = self._key(path)
        feats = feats.detach().to("cpu", torch.float16).contiguous()
        file = self.folder / key[:2] / f"{key}.safetensors"
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")  # one per process: DDP ranks may write the same clip at once
        save_file({"features": feats}, str(tmp))
        tmp.replace(file)  # atomic: a reader never sees half a file, and the last writer wins
        if self.memory is not None:
            self.memory[key] = feats


class ReadAhead:
    """Clips decoded (file -> fbank windows, on the CPU) by `threads` background threads: a step's own clips at once,
    and, through `start`, the next step's while this one trains. Where features are not cached (feature_cache=off, the
    paper preset) every step decodes its clips, and on a GPU that front end would otherwise leave it waiting (about 170
    ten-second clips/s on one thread: README, Performance). Only what the next step asks for is kept. What its threads
    decode equals what the calling thread would to rounding: about 1e-5 for a file that is resampled (torchaudio's
    resampling adds up in an order its thread count sets); on this project's CPUs, nothing for a 16 kHz file, though a
    kernel may round differently with another thread count elsewhere."""

    def __init__(self, config: AudioMAEConfig, threads: int):
        self.config, self.started = config, {}  # path -> Future of its windows
        # each pool thread runs torch on one core: the pool spreads the files over the cores, and torch's own threads,
        # several for each of the pool's, would only fight over them. torch keeps that count per thread, but a thread
        # that has not asked for its own yet takes the last one set: this one asks first, and keeps its own
        torch.get_num_threads()
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="read-ahead", initializer=torch.set_num_threads,
                                       initargs=(1,))

    def decode(self, path) -> Future:
        return self.pool.submit(audio.load_fbank, path, self.config.target_length, self.config.num_mel_bins)

    def start(self, paths):
        """Begin decoding the clips of the coming step; any started earlier and not taken since are dropped (and
        cancelled, if not yet under way)."""
        started, self.started = self.started, {p: self.started.get(p) or self.decode(p) for p in dict.fromkeys(paths)}
        for p, job in started.items():
            if p not in self.started:
                job.cancel()

    def take(self, path) -> Future:
        return self.started.pop(path, None) or self.decode(path)


def decode_clips(paths, config: AudioMAEConfig, strict: bool = False, ahead: ReadAhead | None = None):
    """Each file's fbank windows as the encoder reads them: ([(path, (W, T, F))], [(path, error)]). A file that
    cannot be decoded is reported in the second list (strict=True raises instead). ahead: decoded by its threads,
    all at once (what it started earlier is ready or under way), else one after another here."""
    windows, bad = [], []
    jobs = [(p, ahead.take(p)) for p in paths] if ahead else [(p, None) for p in paths]
    for p, job in jobs:
        try:
            windows.append((p, job.result() if job else audio.load_fbank(p, config.target_length, config.num_mel_bins)))
        except (audio.AudioError, OSError) as e:
            if strict:
                raise
            bad.append((p, str(e)))
    return windows, bad


def crop(windows: torch.Tensor, most: int, seed: str) -> torch.Tensor:
    """`most` consecutive windows of a clip's (W, ...), from a start drawn by `seed` (a clip of at most `most`
    windows, or most=0: all of them)."""
    if not most or len(windows) <= most:
        return windows
    start = random.Random(seed).randrange(len(windows) - most + 1)
    return windows[start:start + most]


@torch.no_grad()
def encode_clips(encoder: AudioMAE, paths, cache: FeatureCache | None = None, strict: bool = False,
                 most: int = 0, seed: str = "", ahead: ReadAhead | None = None):
    """Frozen encoder features of each distinct file: ({path: (W, N, Da) float16 on the CPU}, [(path, error)]).
    A file that cannot be used is reported in the second list (strict=True raises instead). most: at most this many
    windows of each clip (training's max_clip_windows), a run drawn by `seed` and the file's path, so that the same
    step of a resumed run crops alike, cached or not; without a cache, the encoder reads only those windows. ahead:
    the files are decoded by its threads (decode_clips)."""
    feats, distinct = {}, list(dict.fromkeys(paths))
    for p in distinct:
        cached = cache.get(p) if cache and Path(p).is_file() else None  # a missing file is reported below
        if cached is not None:
            feats[p] = cached
    todo, bad = decode_clips([p for p in distinct if p not in feats], encoder.config, strict, ahead)
    if not cache:  # (a cache keeps whole clips: cropped below, after it)
        todo = [(p, crop(w, most, f"{seed}|{p}")) for p, w in todo]
    if todo:
        windows = torch.cat([w for _, w in todo]).to(encoder.cls_token.device)  # (sum W, T, F)
        out = torch.cat([encoder(chunk) for chunk in windows.split(32)])  # (sum W, N, Da)
        for (p, _), f in zip(todo, out.split([len(w) for _, w in todo])):
            feats[p] = f.to(torch.float16).cpu()
            if cache:
                cache.put(p, feats[p])
    return {p: crop(f, most, f"{seed}|{p}") for p, f in feats.items()}, bad


# How one example is laid out around its segments for the LLM: what comes before them, what comes after them (then
# the answer and EOS). "plain" is APT's own layout (the paper, for a base LLM such as Vicuna): BOS, the segments, the
# answer. An instruct model expects its chat template: "smollm2-chat" is SmolLM2-Instruct's, rendered for one user
# turn with no system message (its template then inserts its default system message), generation prompt added; its
# EOS is <|im_end|>, which closes the assistant's turn. "after" goes where a ("turn", "") segment marks the end of the
# user's turn (the few-shot "list" layout puts the episode in the assistant's turn), else after the segments.
# "instructblip" is InstructBLIP's (and APT-BLIP-2's, blip2.py): the soft prompts first, then BOS and the text
# ("bos": "text" puts BOS before the first text segment instead of at the start); its BOS is "</s>", Vicuna's EOS
# ("bos_id": "eos"), as InstructBLIP-Vicuna was tuned (LAVIS sets its tokenizer's bos_token to "</s>", and the
# Hugging Face folder's tokenizer_config.json says so).
PROMPT_FORMATS = {
    "plain": {"bos": True, "before": "", "after": ""},
    "instructblip": {"bos": "text", "bos_id": "eos", "before": "", "after": ""},
    "smollm2-chat": {"bos": False,
                     "before": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                               "Face<|im_end|>\n<|im_start|>user\n",
                     "after": "<|im_end|>\n<|im_start|>assistant\n"},
}


class APT(nn.Module):
    def __init__(self, encoder: AudioMAE, aligner: Aligner, llm: Llama, tokenizer: Tokenizer,
                 cache: FeatureCache | None = None, prompt_format: str = "plain", instruction_bos: bool = False,
                 long_audio: str = "windows"):
        """instruction_bos: the aligner reads each clip's instruction after BOS, as it read every stage-0 text (the
        paper preset's way); without, the instruction alone (how the tiny and small APTs were trained). long_audio:
        how a clip longer than one window becomes prompts: "windows", each window its own num_queries prompts, in
        time order (the public APT code's way); "all", the aligner reads every window's tokens at once and gives
        num_queries prompts for the whole clip (the paper's, §3.1)."""
        super().__init__()
        if long_audio not in ("windows", "all"):
            raise SettingError(f"long_audio={long_audio!r}: expected windows or all")
        if prompt_format not in PROMPT_FORMATS:
            raise SettingError(f"unknown prompt format {prompt_format!r}; known: {sorted(PROMPT_FORMATS)}")
        self.encoder, self.aligner, self.llm, self.tokenizer, self.cache = encoder, aligner, llm, tokenizer, cache
        self.read_ahead: ReadAhead | None = None  # decoding clips in background threads (build.read_ahead)
        self.prompt_format, self.instruction_bos, self.long_audio = prompt_format, instruction_bos, long_audio
        self.share_prefix, self._prefixes = True, {}  # training skips the common opening (shared_prefix)
        D = llm.config.hidden_size
        if aligner.config.llm_words:  # the aligner reads words through the LLM's own table
            aligner.attach_llm_words(llm.model.embed_tokens.weight)
        self.proj = nn.Linear(aligner.config.hidden_size, D)
        self.audio_token = nn.Parameter(torch.randn(D) * 0.02)  # <AUDIO>: marks where each clip begins
        for frozen in (encoder, llm):
            frozen.requires_grad_(False)
            frozen.eval()

    @torch.no_grad()
    def start_proj_from_words(self):
        """proj_init=words, before stage 1: the projection starts as the way back of the aligner's word map. The
        aligner (aligner_words=llm) reads an LLM word e as W e + b, W (H, D); the projection becomes c W^T with the
        LLM's mean word as its bias, c chosen so that a query of LayerNorm's size (sqrt(H); H <= D, so W's rows
        span the queries' space) lands at a word's typical distance from that mean. Then a query's projection,
        taken against the LLM's words (each less the mean), scores them as the aligner's own dot product with
        their word vectors does: a query reaches the LLM near the words the aligner finds it like, rather than in
        a random direction several times a word's length (nn.Linear's start)."""
        if not self.aligner.config.llm_words:
            raise SettingError("proj_init=words needs an aligner that reads the LLM's words (aligner_words=llm)")
        table = self.llm.model.embed_tokens.weight.float()
        mean = table.mean(0)
        spread = (table - mean).norm(dim=1).mean()  # a word's typical distance from the mean word
        W = self.aligner.word_map.weight.float()  # (H, D)
        size = torch.linalg.svdvals(W).mean() * W.shape[0] ** 0.5  # |W^T q| for a query q of length sqrt(H)
        self.proj.weight.copy_(W.T * (spread / size))
        self.proj.bias.copy_(mean)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen parts never switch to training behaviour
        self.llm.eval()
        return self

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a trained APT is: the aligner, the projection and <AUDIO> (no encoder, no LLM)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("encoder.", "llm."))}

    # ------------------------------------------------------------------------------------------------- audio

    def encode_clips(self, paths, strict: bool = False, most: int = 0, seed: str = ""):
        return encode_clips(self.encoder, paths, self.cache, strict, most, seed, self.read_ahead)

    # ------------------------------------------------------------------------------------------------ inputs

    def clip_prompts(self, batch, feats) -> list[list[torch.Tensor]]:
        """The acoustic embeddings of every clip of every example, from one aligner pass: (W * Q, D) each, a clip's
        W windows each aligned on its own, in time order (long_audio="windows"), or (Q, D), the aligner reading all
        of a clip's windows at once ("all"; which window came first is not seen there). Each clip's aligner pass is
        conditioned on the text that follows it (the instruction; a "label" segment is not one); a clip with no
        text after it gets BOS alone."""
        tok, jobs = self.tokenizer, []
        for b, segments in enumerate(batch):
            for i, (kind, value) in enumerate(segments):
                if kind == "audio":
                    instruction = next((v for k, v in segments[i + 1:] if k == "text"), "")
                    ids = tok.encode(instruction, bos=self.instruction_bos) or [tok.bos_id]
                    ids = ids[:self.aligner.config.max_text_len]  # a longer one: its beginning, as InstructBLIP
                    # truncates the text its Q-Former reads (the LLM still reads all of it)
                    jobs.append((b, feats[value], ids))
        out = [[] for _ in batch]
        if not jobs:
            return out
        device, dtype = self.proj.weight.device, self.proj.weight.dtype
        if self.long_audio == "all":  # one sequence per clip: every window's tokens, padded to the longest clip
            clips, heard = pad_tokens([f for _, f, _ in jobs])  # (J, max W * N, Da), mask or None
            ids, mask = tok.pad([ids for _, _, ids in jobs])
            queries = self.aligner.instruct(clips.to(device, dtype), ids.to(device), mask.to(device),
                                            None if heard is None else heard.to(device))  # (J, Q, H)
            for (b, _, _), p in zip(jobs, self.proj(queries)):
                out[b].append(p)  # (Q, D)
            return out
        windows = torch.cat([f.to(device, dtype) for _, f, _ in jobs])  # (sum W, N, Da)
        ids, mask = tok.pad([ids for _, clip, ids in jobs for _ in range(len(clip))])  # each window: its clip's text
        queries = self.aligner.instruct(windows, ids.to(device), mask.to(device))  # (sum W, Q, H)
        prompts = self.proj(queries)  # (sum W, Q, D)
        for (b, _, _), p in zip(jobs, prompts.split([len(f) for _, f, _ in jobs])):
            out[b].append(p.reshape(-1, p.shape[-1]))  # (W * Q, D), windows in time order
        return out

    def prefix_ids(self) -> list[int]:
        """The tokens every example begins with under this prompt format: BOS and/or the template's opening."""
        form = PROMPT_FORMATS[self.prompt_format]
        bos = [self.tokenizer.bos_id] if form["bos"] is True else []  # "text": BOS comes later, before the text
        return bos + self.tokenizer.encode(form["before"], bos=False)

    def shared_prefix(self) -> SharedPrefix | None:
        """The common opening of every example (SmolLM2's system turn: 24 tokens), through the frozen LLM once
        per device and autocast setting: training steps then skip those positions. None where it is one token or
        less (plain format: BOS alone) or `share_prefix` is off."""
        if not self.share_prefix:
            return None
        device = self.proj.weight.device
        key = (self.prompt_format, device,
               torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type))
        if key not in self._prefixes:
            ids = self.prefix_ids()
            self._prefixes[key] = SharedPrefix(self.llm, torch.tensor(ids, device=device)) if len(ids) > 1 else None
        return self._prefixes[key]

    def embed_batch(self, batch, feats, answers=None, left_pad: bool = False, after_prefix: bool = False,
                    with_blocks: bool = False):
        """Interleaved input embeddings (B, L, D), mask (B, L) and labels (B, L): -100 except the answer tokens
        and the EOS that closes them. Right padding for training, left padding for generation. after_prefix: leave
        out the prefix_ids every row begins with (a SharedPrefix supplies them). Segments: ("text" | "label", str),
        ("audio", path), ("turn", ""), and ("prompts", (n, D) tensor): soft prompts made by another model (APT-BLIP-2's
        visual queries), placed as they are. with_blocks: also the blocks (B, L) long: 0 for text and padding, k for
        the k-th block of soft prompts in the row (a clip's <AUDIO> and acoustic prompts, or a "prompts" segment)."""
        tok, llm = self.tokenizer, self.llm
        device, dtype = self.proj.weight.device, llm.model.embed_tokens.weight.dtype
        prompts = self.clip_prompts(batch, feats)
        form = PROMPT_FORMATS[self.prompt_format]
        start = [] if after_prefix else self.prefix_ids()
        rows = []
        for b, segments in enumerate(batch):
            pieces, labels, clips = [torch.tensor(start, dtype=torch.long)], [-100] * len(start), iter(prompts[b])
            blocks, block = [0] * len(start), 0  # block: how many blocks of soft prompts so far
            turn_ends = [] if any(k == "turn" for k, _ in segments) else [("turn", "")]  # where the user's turn ends
            framed = [*segments, *turn_ends]
            framed = [("text", form["after"]) if k == "turn" else (k, v) for k, v in framed]
            bos_before_text = form["bos"] == "text"
            text_bos = tok.eos_id if form.get("bos_id") == "eos" else tok.bos_id
            for kind, value in [(k, v) for k, v in framed if not isinstance(v, str) or v]:  # empty text adds nothing
                if kind == "prompts":
                    pieces.append(value)
                    labels += [-100] * len(value)
                    block += 1
                    blocks += [block] * len(value)
                elif kind in ("text", "label"):
                    ids = [text_bos] * bos_before_text + tok.encode(value, bos=False)
                    bos_before_text = False
                    pieces.append(torch.tensor(ids, dtype=torch.long))
                    labels += [-100] * len(ids)
                    blocks += [0] * len(ids)
                else:
                    acoustic = next(clips)
                    pieces.append(torch.cat([self.audio_token[None].to(acoustic.dtype), acoustic]))  # (1 + WQ, D)
                    labels += [-100] * len(pieces[-1])
                    block += 1
                    blocks += [block] * len(pieces[-1])
            if answers is not None:
                ids = tok.encode(answers[b], bos=False) + [tok.eos_id]
                pieces.append(torch.tensor(ids, dtype=torch.long))
                labels += ids
                blocks += [0] * len(ids)
            embeds = [llm.embed(p.to(device)) if p.dtype == torch.long else p for p in pieces]
            rows.append((torch.cat([e.to(device, dtype) for e in embeds]), torch.tensor(labels), torch.tensor(blocks)))
        L = max(len(e) for e, _, _ in rows)
        x = torch.zeros(len(rows), L, rows[0][0].shape[-1], dtype=dtype, device=device)
        mask = torch.zeros(len(rows), L, dtype=torch.bool, device=device)
        labels = torch.full((len(rows), L), -100, dtype=torch.long, device=device)
        blocks = torch.zeros(len(rows), L, dtype=torch.long, device=device)
        for b, (e, lab, blk) in enumerate(rows):
            span = slice(L - len(e), L) if left_pad else slice(0, len(e))
            x[b, span], mask[b, span], labels[b, span], blocks[b, span] = e, True, lab.to(device), blk.to(device)
        return (x, mask, labels, blocks) if with_blocks else (x, mask, labels)

    def _answer_logits(self, batch, answers, feats):
        """Logits (N, V) at the N positions that predict an answer token or EOS, those targets (N,), and the row
        each belongs to (N,)."""
        prefix = self.shared_prefix()
        x, mask, labels = self.embed_batch(batch, feats, answers, after_prefix=prefix is not None)
        at = torch.zeros_like(mask)
        at[:, :-1] = labels[:, 1:] != -100  # positions whose next token is an answer token
        if prefix is not None:
            mask = torch.cat([mask.new_ones(len(mask), prefix.length), mask], dim=1)
        # (N, V): logits only where a loss is taken
        logits = self.llm(inputs_embeds=x, attention_mask=mask, logits_at=at, prefix=prefix)
        return logits, labels[:, 1:][at[:, :-1]], at.nonzero()[:, 0]

    def forward(self, batch, answers, feats):
        """Summed next-token cross-entropy over the answer tokens and EOS, and their count: (loss_sum, n)."""
        logits, targets, _ = self._answer_logits(batch, answers, feats)
        return F.cross_entropy(logits.float(), targets, reduction="sum"), targets.numel()

    @torch.no_grad()
    def choice_logprob(self, segments, answers, feats, blocks_apart: bool = False) -> torch.Tensor:
        """log p(answer | segments) for each of N candidate answers to one example: (N,): the likelihood protocols
        (tagging, few-shot, AVQA's options). A candidate is scored as a continuation, EOS not included, as language
        models are scored on multiple choice; where one candidate's tokens begin another's (AVQA's "car" and "car
        horn"), that one could never score lower, so then every candidate is scored with EOS after it, as a whole
        answer. The sum favours short candidates; the protocols here give theirs a common ending ("bell."). The
        prompt (a few-shot episode is dozens of clips) goes through the aligner and the LLM once, and its keys and
        values serve every candidate."""
        return self.answer_and_rank(segments, answers, feats, max_new_tokens=0, blocks_apart=blocks_apart)[1]

    @torch.no_grad()
    def answer_and_rank(self, segments, answers, feats, max_new_tokens: int = 12,
                        blocks_apart: bool = False) -> tuple[str, torch.Tensor]:
        """One example's greedy answer (what generate says) and choice_logprob's scores (N,) of N candidate answers,
        from one pass of the prompt: a few-shot episode's hundreds of positions are not run twice. blocks_apart: no
        block of soft prompts sees another (llama.causal_padding_mask; APT-BLIP-2's setting); the text sees all."""
        tok, llm = self.tokenizer, self.llm
        x, _, _, blocks = self.embed_batch([segments], feats, with_blocks=True)  # (1, L, D), (1, L)
        seqs = [tok.encode(a, bos=False) for a in answers]
        if not all(seqs):
            raise ValueError(f"an empty candidate answer cannot be scored: {answers}")
        if any(len(a) < len(b) and b[:len(a)] == a for a in seqs for b in seqs):
            seqs = [a + [tok.eos_id] for a in seqs]  # one begins another: compare whole answers
        ids, valid = tok.pad(seqs)  # (N, T), right-padded
        ids, valid = ids.to(x.device), valid.to(x.device)
        N, T = ids.shape
        cache = KVCache(llm.config, 1, x.shape[1] + max(T, max_new_tokens), x.dtype, x.device)
        last = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        last[0, -1] = True
        first = llm(inputs_embeds=x, cache=cache, logits_at=last, blocks=blocks if blocks_apart else None)  # (1, V)
        said, token, prompt = [], first.argmax(-1), cache.length
        for _ in range(max_new_tokens):  # greedy; its keys and values go after the prompt's, which stay as they are
            said.append(int(token))
            if said[-1] == tok.eos_id or len(said) == max_new_tokens:
                break
            token = llm(input_ids=token[:, None], cache=cache)[:, -1].argmax(-1)
        cache.length = prompt  # back to the prompt alone (what greedy wrote after it is overwritten or never read)
        cache.reorder(torch.zeros(N, dtype=torch.long, device=x.device))
        mask = torch.cat([torch.ones(N, cache.length, dtype=torch.bool, device=x.device), valid], 1)
        rest = llm(input_ids=ids, attention_mask=mask, cache=cache)[:, :-1]  # (N, T - 1, V): tokens 1..T-1
        logits = torch.cat([first.expand(N, -1)[:, None], rest], 1).float().log_softmax(-1)  # (N, T, V)
        return tok.decode(said).strip(), (logits.gather(2, ids[..., None]).squeeze(2) * valid).sum(1)

    @torch.no_grad()
    def generate(self, batch, feats=None, **options) -> list[str]:
        """Answer a batch of segment lists; options are Llama.generate's (max_new_tokens, num_beams, ...)."""
        if feats is None:
            feats, _ = self.encode_clips([v for segs in batch for k, v in segs if k == "audio"], strict=True)
        x, mask, _ = self.embed_batch(batch, feats, left_pad=True)
        options.setdefault("eos_token_id", self.tokenizer.eos_id)
        options.setdefault("pad_token_id", self.tokenizer.pad_id)
        ids = self.llm.generate(inputs_embeds=x, attention_mask=mask, **options)
        return [self.tokenizer.decode(row).strip() for row in ids]

    # ---------------------------------------------------------------------------------------------- storing

    def save(self, folder: str | Path, encoder_id: dict, llm_id: dict, extra: dict | None = None):
        """A trained APT as one small directory: apt.safetensors (trainable tensors) and apt.json (the aligner's
        config and the identities of the encoder and LLM it was trained against)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.trainable_state().items()}
        state.pop("aligner.lm_decoder.weight", None)  # the same tensor as the aligner's word embeddings
        save_file(state, str(folder / "apt.safetensors"))
        meta = {"aligner": asdict(self.aligner.config), "prompt_format": self.prompt_format,
                "instruction_bos": self.instruction_bos, "long_audio": self.long_audio, "encoder": encoder_id,
                "llm": llm_id, **(extra or {})}
        (folder / "apt.json").write_text(json.dumps(meta, indent=1))

    @staticmethod
    def read_meta(folder: str | Path, needs=("aligner", "encoder", "llm")) -> dict:
        """A saved APT's description (apt.json), with the entries `needs` names (loading needs all three)."""
        file = Path(folder) / "apt.json"
        if not file.is_file():
            raise CheckpointError(f"{folder}: not a trained APT (apt.json missing)")
        try:
            meta = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or not all(isinstance(meta.get(k), dict) for k in needs) or \
                ("encoder" in needs and "fingerprint" not in meta["encoder"]):
            raise CheckpointError(f"{file}: not a trained APT's description (expected the entries "
                                  f"{', '.join(needs) or 'of one'}, as train.py writes them)")
        return meta

    @classmethod
    def load(cls, folder, encoder, llm, tokenizer, encoder_id: dict, llm_id: dict, cache=None) -> APT:
        """Rebuild a saved APT around the given encoder and LLM, which must be the ones it was trained against."""
        folder = Path(folder)
        meta = cls.read_meta(folder)
        same = {"encoder": meta["encoder"]["fingerprint"] == encoder_id["fingerprint"],
                "llm": same_llm(meta["llm"], llm_id, llm)}
        for what, have in (("encoder", encoder_id), ("llm", llm_id)):
            if not same[what]:
                raise CheckpointError(f"{folder}: this APT was trained against the {what} {short(meta[what])}, but "
                                      f"the {what} given is {short(have)}; load the matching {what}")
        model = cls(encoder, Aligner(AlignerConfig(**meta["aligner"])), llm, tokenizer, cache,
                    meta.get("prompt_format", "plain"), meta.get("instruction_bos", False),
                    meta.get("long_audio", "windows"))
        # a released APT (apt_min.release) leaves out the aligner's stage-0 heads, which answering never uses
        heads = tuple(f"aligner.{h}" for h in STAGE0_HEADS) if meta.get("stage0_heads") is False else ()
        load_trainable(model, folder / "apt.safetensors", heads)
        return model


def short(identity: dict) -> dict:
    """A model's identity for a message: its path and fingerprint (a weight probe is too long to print)."""
    return {k: v for k, v in identity.items() if k != "probe"}


def load_trainable(model: APT, file: Path, left_out: tuple[str, ...] = ()):
    """Copy a trainable-state safetensors file into `model`, strictly: every key of `trainable_state` once, with
    its shape, except the aligner's LM decoder, which is its word table (tied) and is stored only as that, and any
    key starting with one of `left_out` (which keeps its initial value)."""
    from apt_min.checkpoint import check_keys

    targets = {k: v for k, v in model.named_parameters()} | {k: v for k, v in model.named_buffers()}
    expected = {k: tuple(v.shape) for k, v in model.trainable_state().items()
                if k in targets and not (left_out and k.startswith(left_out))}
    entries = safetensors_entries(file)
    check_keys({file: entries}, expected, set(), (), file)
    with torch.no_grad():
        for name, read in entries.items():
            read(targets[name])

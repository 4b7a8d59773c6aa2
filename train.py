"""Train APT (paper §3.3), one stage per run:

    python train.py --stage 0          then --stage lm, --stage 1, --stage 2       (the tiny preset, on a CPU)
    python train.py --stage 1 --preset paper --batch_size=4                      (--key=value overrides any setting)
    torchrun --standalone --nproc_per_node 2 train.py --stage 1                  (DistributedDataParallel)
    python train.py --stage 1 --resume                                           (continue from the last checkpoint)
    python train.py --stage caption_ft --caption_ft_source=clotho                (§4.2: 2 epochs on one caption set)

Read from the top: the STAGES table; each stage as a class that builds what it needs, says what is frozen and what
trains, and gives the loss of one micro-batch (`micro_step`) and its validation; then `fit`, the loop every stage
shares (accumulation, clipping, schedule, logging, validation, checkpoints, resume); then the machinery it uses.

Stage 0 aligns the aligner with audio-text losses (ATC + ATM + AGTG, BLIP-2's first stage); stages 1 and 2 tune it
against the frozen LLM on a multi-task mixture, one task per batch (stage 2 adds few-shot episodes and NLAR);
`--stage caption_ft` tunes stage 2's result (in a run folder without one: the preset's release) on one caption set
alone. Which data sets each stage reads is a setting (caption_sources, tagging_sources, stage0_sources: `sources`).
An error about the user's files or settings ends the run with one line (apt_min/errors.py). `--stage lm` (tiny preset
only) pretrains the small stand-in LLM on the synthetic corpus, the part Vicuna's own pretraining plays; it is frozen
afterwards, like Vicuna. `--stage mae` (small preset) pretrains the encoder as Audio-MAE was, before stage 0;
`--stage vision` trains the embedded default's picture side for APT-BLIP-2.
"""

import argparse
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from apt_min import audio, build, data, synth, synth_av
from apt_min.aligner import STAGE0_HEADS, Aligner, pad_tokens, retrieval_r1, stage0_batch, stage0_losses
from apt_min.audiomae import AudioMAE
from apt_min.build import (
    build_encoder,
    ensure_data,
    ensure_tokenizer,
    feature_cache,
    frozen_dtype,
    load_llm,
)
from apt_min.checkpoint import CheckpointError, check_keys, safetensors_entries
from apt_min.config import STARTS_AFTER, load_config
from apt_min.errors import MissingFileError, SettingError, clean_exit
from apt_min.llama import Llama
from apt_min.mae import MAEDecoder, mae_loss, random_keep
from apt_min.model import APT, ReadAhead, encode_clips, short
from apt_min.tasks import normalize_answer

log = logging.getLogger("train")

STAGES = {  # what each stage trains, with which loss, for how many steps (a config field); the stage each one
    # starts after: config.STARTS_AFTER;
    # ratios: the task mixture, one task per batch (the public APT code's; NLAR's, which it does not give, is ours)
    "lm": {"trains": "the whole stand-in LLM", "loss": "next-token cross-entropy", "steps": "steps_lm"},
    "mae": {"trains": "the encoder and a throw-away decoder (then the encoder is frozen)",
            "loss": "masked-patch reconstruction (Audio-MAE)", "steps": "steps_mae"},
    "0": {"trains": "the aligner (encoder frozen)", "loss": "ATC + ATM + AGTG", "steps": "steps_0"},
    "1": {"trains": "the aligner without its stage-0 heads, the projection and <AUDIO> (encoder and LLM frozen)",
          "loss": "cross-entropy on the answers", "steps": "steps_1",
          "ratios": {"tagging": 1.0, "captioning": 1.0, "aqa": 0.1, "sed": 0.45, "ter": 0.45, "counting": 0.45}},
    "2": {"trains": "the aligner without its stage-0 heads, the projection and <AUDIO> (encoder and LLM frozen)",
          "loss": "cross-entropy on the answers", "steps": "steps_2",
          "ratios": {"tagging": 1.0, "captioning": 1.0, "aqa": 0.1, "sed": 0.45, "ter": 0.45, "counting": 0.45,
                     "fewshot": 0.5, "nlar": 0.5}},
    # §4.2: before the captioning comparison (Table 4) the multi-task APT is fine-tuned on one caption set alone
    "caption_ft": {"trains": "the aligner without its stage-0 heads, the projection and <AUDIO> (encoder and LLM "
                             "frozen), on one caption set (caption_ft_source)",
                   "loss": "cross-entropy on the captions", "steps": "steps_caption_ft",
                   "ratios": {"captioning": 1.0}},
    # APT-BLIP-2's embedded default: the picture side, trained apart from the APT, which is plugged in afterwards
    "vision": {"trains": "a small vision side: the visual aligner and projection (ViT, LLM and APT frozen)",
               "loss": "ATC + ATM + AGTG on picture-description pairs (alone for the first vision_align_steps), "
                       "+ cross-entropy on the answers about pictures",
               "steps": "steps_vision"},
}


# ------------------------------------------------------------------------------------------------------- stages
# Each stage object holds: module (what DistributedDataParallel wraps), params (what trains), sampler (its
# batches), scaler (fp16's GradScaler or None); micro_step(wrapped module, sampler) -> (loss_sum, count, info),
# loss_sum None when this process, or any other, has no usable example this micro-step (all skip it together:
# nothing_to_train); validate() -> {name: value}; finish(metrics) saves the result.


class StandInLLM:
    """--stage lm: the tiny preset's LLM, trained from scratch on the synthetic corpus; every weight trains."""

    def __init__(self, cfg, rank, world, device):
        stage_applies(cfg, "lm")
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.tok = ensure_tokenizer(cfg)
        cfg.stage_dir("lm").mkdir(parents=True, exist_ok=True)
        self.train_docs = [self.encode(d) for d in synth.lm_corpus(cfg.data_root, "train", cfg.seed)]
        self.val_docs = synth.lm_corpus(cfg.data_root, "test", cfg.seed)[:cfg.val_batches * cfg.batch_size]
        torch.manual_seed(cfg.seed)
        self.llm = Llama(cfg.stand_in_llm_config(self.tok)).to(device)
        with torch.no_grad():
            for p in self.llm.parameters():
                if p.ndim >= 2:
                    p.normal_(0, 0.02)
        self.sampler = data.TaskSampler({"lm": self.train_docs}, {"lm": 1.0}, cfg.batch_size * world, cfg.seed)
        self.autocast, self.scaler, _ = amp_settings(cfg, device)  # the LLM trains in fp32 under autocast
        self.module = self.llm
        self.params = dict(self.llm.named_parameters())

    def encode(self, doc):
        """A corpus document (its pieces of text) as one id sequence: BOS, the pieces, EOS; at most 1024 ids."""
        tok = self.tok
        ids = [tok.bos_id] + [i for piece in doc for i in tok.encode(piece, bos=False)] + [tok.eos_id]
        return ids[:1024]

    def loss_sum(self, model, docs):
        """Next-token cross-entropy summed over the real tokens of `docs`, and their number."""
        ids, mask = self.tok.pad(docs)
        ids, mask = ids.to(self.device), mask.to(self.device)
        at = mask[:, 1:].clone()
        with self.autocast():
            logits = model(ids[:, :-1], attention_mask=mask[:, :-1], logits_at=at)
        return F.cross_entropy(logits.float(), ids[:, 1:][at], reduction="sum"), int(at.sum())

    def micro_step(self, model, sampler):
        _, docs = sampler.next_batch()
        mine = docs[self.rank::self.world]
        loss_sum, n = self.loss_sum(model, mine)
        return loss_sum, n, {"examples": len(mine)}

    @torch.no_grad()
    def validate(self):
        total, n = 0.0, 0
        for i in range(0, len(self.val_docs), self.cfg.batch_size):
            s, c = self.loss_sum(self.llm, [self.encode(d) for d in self.val_docs[i:i + self.cfg.batch_size]])
            total, n = total + s.item(), n + c
        hits = 0
        for doc in self.val_docs[:64]:  # quick metric: the answer, generated from the rest of the document
            prompt = self.encode(doc[:-1])[:-1]
            got = self.llm.generate(torch.tensor([prompt], device=self.device), max_new_tokens=64,  # > any answer
                                    eos_token_id=self.tok.eos_id)
            hits += normalize_answer(self.tok.decode(got[0])) == normalize_answer(doc[-1])
        return {"val_loss": total / max(n, 1), "val_answer_accuracy": hits / min(64, len(self.val_docs))}

    def finish(self, metrics):
        folder = Path(self.cfg.resolved_llm_path())
        self.llm.save_pretrained(folder)
        print(f"stand-in LLM saved to {folder}/ (frozen from now on); validation: {metrics}")


class PretrainEncoder:
    """--stage mae (encoder_init=mae: the small preset): the encoder is pretrained by masked autoencoding on the
    training clips' windows (apt_min/mae.py), as Audio-MAE's own weights were, then saved where every later stage
    reads it, frozen. No text and no labels are used: only the training split's audio."""

    def __init__(self, cfg, rank, world, device):
        stage_applies(cfg, "mae")
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.autocast, self.scaler, _ = amp_settings(cfg, device)
        cfg.stage_dir("mae").mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.encoder = AudioMAE(cfg.encoder_config()).to(device).requires_grad_(True)
        self.decoder = MAEDecoder(self.encoder.config).to(device)
        self.module = MaskedAutoencoder(self.encoder, self.decoder)
        self.params = dict(self.module.named_parameters())
        self.train_windows = self.windows("train")
        self.val_windows = self.windows("val")[:cfg.val_batches * cfg.mae_batch_size]
        self.sampler = data.TaskSampler({"windows": list(range(len(self.train_windows)))}, {"windows": 1.0},
                                        cfg.mae_batch_size * world, cfg.seed)

    def windows(self, split) -> torch.Tensor:
        """Every window of every clip of the split's captioning data (caption_sources; for training, tagging's too:
        tagging_sources), as filter banks (n, T, F) in float16 (2 400 training clips: 0.3 GB); a clip that cannot be
        read is skipped and reported. Validation reads the held-out clips of the caption sources that have them
        (AudioCaps', Clotho's; WavCaps has no split)."""
        cfg, captions = self.cfg, sources(self.cfg, "caption_sources")
        if split == "train":
            found = caption_examples(cfg, captions, None) + tagging_examples(cfg, None)
        else:
            found = [ex for name in captions if not name.startswith("wavcaps:")
                     for ex in data.examples("captioning", cfg.data_root, split, source=name)]
        paths = dict.fromkeys(ex.segments[0][1] for ex in found)
        windows = []
        for p in paths:
            try:
                windows.append(audio.load_fbank(p, cfg.target_length, self.encoder.config.num_mel_bins).half())
            except (audio.AudioError, OSError) as e:
                if cfg.strict_audio:
                    raise
                warn([(p, str(e))])
        return torch.cat(present(windows, f"the {split} split's audio (captioning's and tagging's clips)", cfg))

    def micro_step(self, model, sampler):
        _, idx = sampler.next_batch()
        # the masks, drawn by step for the whole global batch; each process takes its windows' own, so that they are
        # masked as one process would mask them
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + sampler.step)
        keep = random_keep(len(idx), self.encoder.num_patches, self.cfg.mask_ratio, g)[self.rank::self.world]
        batch = self.train_windows[idx[self.rank::self.world]].to(self.device).float()
        with self.autocast():
            loss = model(batch, self.cfg.mask_ratio, None, keep.to(self.device))
        return loss, 1, {"examples": len(batch)}

    @torch.no_grad()
    def validate(self):
        g, total = torch.Generator().manual_seed(0), 0.0
        for chunk in self.val_windows.split(self.cfg.mae_batch_size):  # a batch's loss is its windows' mean
            with self.autocast():
                total += self.module(chunk.to(self.device).float(), self.cfg.mask_ratio, g).item() * len(chunk)
        return {"val_loss": total / max(1, len(self.val_windows))}  # every window weighs alike (a short last batch)

    def finish(self, metrics):
        path = Path(self.cfg.run_dir) / "encoder.safetensors"
        self.encoder.requires_grad_(False).eval()
        self.encoder.save(path)
        print(f"stage mae done: the encoder is saved to {path} and frozen from now on; validation: masked-patch "
              f"loss {metrics['val_loss']:.4f}")


class MaskedAutoencoder(nn.Module):
    """One forward = the masked-autoencoding loss, so DistributedDataParallel sees one call per step."""

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, fbank, ratio, generator, keep=None):
        return mae_loss(self.encoder, self.decoder, fbank, ratio, generator, keep)


class AlignStage0:
    """--stage 0: the aligner learns to read the frozen encoder's features on audio-text pairs. Every aligner weight
    trains (the stage-0 heads too); the encoder is frozen (built without gradients)."""

    def __init__(self, cfg, rank, world, device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.tok = ensure_tokenizer(cfg)
        self.autocast, self.scaler, frozen_dtype = amp_settings(cfg, device)
        self.encoder, self.encoder_id = build_encoder(cfg, device, frozen_dtype)
        cfg.stage_dir("0").mkdir(parents=True, exist_ok=True)
        self.cache = feature_cache(cfg, self.encoder_id, frozen_dtype)
        self.ahead = build.read_ahead(cfg, self.encoder, self.cache)
        torch.manual_seed(cfg.seed)
        words = build.llm_embeddings(cfg) if "llm" in (cfg.aligner_init, cfg.aligner_words) else None
        llm_dim = words.shape[1] if cfg.aligner_words == "llm" else 0
        self.aligner = Aligner(cfg.aligner_config(self.tok.vocab_size, llm_dim)).to(device)
        with torch.no_grad():  # the word vectors from the LLM's own ([DEC] keeps its init)
            if cfg.aligner_words == "llm":
                self.aligner.attach_llm_words(words.to(device))
                if cfg.aligner_init == "llm":
                    weight, bias = build.llm_pca_map(words, cfg.aligner_hidden)
                    self.aligner.word_map.weight.copy_(weight)
                    self.aligner.word_map.bias.copy_(bias)
            elif cfg.aligner_init == "llm":
                weight, bias = build.llm_pca_map(words, cfg.aligner_hidden)
                self.aligner.word_embeddings.weight[:self.tok.vocab_size] = words @ weight.T + bias
        pairs = stage0_pairs(cfg, random.Random(cfg.seed))
        self.val = present(data.examples("captioning", cfg.data_root, "val")[:cfg.val_batches * cfg.batch_size],
                           "captioning's validation split", cfg)
        batch = cfg.stage0_batch_size or cfg.batch_size  # one contrastive batch per process (gathered across them)
        self.sampler = data.TaskSampler({"pairs": pairs}, {"pairs": 1.0}, batch * world, cfg.seed)
        self.module = Stage0Losses(self.aligner, cfg.atm_negatives)
        self.params = dict(self.aligner.named_parameters())

    def whole_clips(self, examples, most: int = 0, seed: str = ""):
        """The examples whose clip could be encoded, each clip's features (W, N, Da): every window, since a caption
        describes the whole clip (a 15-30 s Clotho clip spans up to three 10.24 s windows, which the aligner then
        reads as one sequence), or in training at most max_clip_windows of them (`most`, drawn by `seed`), and how
        many were skipped."""
        feats, bad = encode_clips(self.encoder, [ex.segments[0][1] for ex in examples], self.cache,
                                  self.cfg.strict_audio, most, seed, self.ahead)
        warn(bad)
        keep = [ex for ex in examples if ex.segments[0][1] in feats]
        return keep, [feats[ex.segments[0][1]] for ex in keep], len(examples) - len(keep)

    def losses(self, model, examples, generator, together=True, found=None):
        """-> (the three stage-0 losses of a batch, or None when no example is usable; the examples kept; how many were
        skipped). together: a training batch, of which each process holds its share: all processes skip together (under
        DDP all must run the same forwards) and contrast with every process's pairs; else (validation, the same examples
        in every process) this process's batch alone, so the loss does not depend on how many processes ran. found:
        whole_clips(examples) where the caller has it already."""
        keep, clips, skipped = found or self.whole_clips(examples)
        if (nothing_to_train(keep, self.world, self.device) if together else not keep):
            return None, keep, skipped
        batch = stage0_batch([ex.answer for ex in keep], clips, [ex.segments[0][1] for ex in keep], self.tok,
                             self.device)
        with self.autocast():
            return model(*batch, generator, across_processes=together), keep, skipped

    def micro_step(self, model, sampler):
        _, batch = sampler.next_batch()
        mine = batch[self.rank::self.world]
        span = (self.cfg.max_clip_windows, f"{self.cfg.seed}|{sampler.step}")  # long clips: a run of their windows
        found = self.whole_clips(mine, *span)
        read_next(self.ahead, sampler, self.rank, self.world)  # the next step's clips, while this one trains
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + sampler.step)  # hard negatives: by step
        parts, keep, skipped = self.losses(model, mine, g, found=found)
        if parts is None:
            return None, 0, {"examples": 0, "skipped": skipped}
        # count 1: the losses are this process's batch means (AGTG's over its tokens), so processes weigh alike: where
        # one skipped an unreadable clip, its remaining pairs weigh a little more than the others' (not one batch)
        return parts["total"], 1, {**{k: parts[k].item() for k in ("atc", "atm", "agtg")}, "examples": len(keep),
                                   "skipped": skipped}

    @torch.no_grad()
    def validate(self):
        # the loss pairs each clip with its first reference (an evaluation example's answer)
        found = self.whole_clips(self.val)  # encoded once, for the loss and for retrieval
        parts, _, _ = self.losses(self.module, self.val, torch.Generator().manual_seed(0), together=False, found=found)
        keep, clips, _ = found  # retrieval over every reference of each clip
        caps = [(i, c) for i, ex in enumerate(keep) for c in ex.target["references"]]
        ids, mask = self.tok.pad([self.tok.encode(c, eos=True) for _, c in caps])
        owner = torch.tensor([i for i, _ in caps], device=self.device)
        audio_feats, heard = pad_tokens(clips)
        r1 = retrieval_r1(self.aligner, audio_feats.to(self.device).float(), ids.to(self.device),
                          mask.to(self.device), owner, None if heard is None else heard.to(self.device))
        return {"val_loss": parts["total"].item(), **r1}

    def finish(self, metrics):
        final = self.cfg.stage_dir("0") / "final"
        self.aligner.save(final, {"encoder": self.encoder_id})
        print(f"stage 0 done: aligner saved to {final}/; validation retrieval on {len(self.val)} AudioCaps-val clips: "
              f"audio->text R@1 {metrics['a2t_r1']:.3f}, text->audio R@1 {metrics['t2a_r1']:.3f} "
              f"(chance {1 / max(1, len(self.val)):.3f})")


class Stage0Losses(nn.Module):
    """One forward = all three stage-0 losses, so DistributedDataParallel sees one call per step."""

    def __init__(self, aligner, atm_negatives: str = "global"):
        super().__init__()
        self.aligner, self.atm_negatives = aligner, atm_negatives

    def forward(self, audio_feats, ids, mask, clip_ids, audio_mask, generator, across_processes=True):
        return stage0_losses(self.aligner, audio_feats, ids, mask, clip_ids, audio_mask, generator, self.atm_negatives,
                             across_processes)


class TuneAPT:
    """--stage 1 and 2: the aligner (from stage 0, then stage 1) is tuned against the frozen LLM, whose loss on each
    answer is the training signal; the encoder and the LLM stay frozen (APT freezes them itself). --stage
    caption_ft: stage 2's APT fine-tuned the same way on one caption set's training captions for caption_ft_epochs
    passes (paper §4.2: two epochs on AudioCaps, or on Clotho, before Table 4's comparison)."""

    def __init__(self, cfg, stage, rank, world, device):
        self.cfg, self.stage, self.rank, self.world, self.device = cfg, stage, rank, world, device
        self.tok = ensure_tokenizer(cfg)
        self.autocast, self.scaler, frozen_dtype = amp_settings(cfg, device)
        prev = starting_point(cfg, stage)
        encoder, self.encoder_id = build_encoder(cfg, device, frozen_dtype)
        llm, self.llm_id = load_llm(cfg, device, frozen_dtype)
        if cfg.compile_llm:
            llm.compile_blocks()
        cache = feature_cache(cfg, self.encoder_id, frozen_dtype)
        if stage == "1":
            trained_on = json.loads((prev / "aligner.json").read_text()).get("encoder")
            if trained_on and trained_on["fingerprint"] != self.encoder_id["fingerprint"]:
                raise CheckpointError(f"{prev}: stage 0's aligner was trained against the encoder {short(trained_on)}, "
                                      f"but the encoder is now {short(self.encoder_id)}; run stage 0 again with this "
                                      "encoder, or give the settings it was trained with")
            aligner = Aligner.load(prev, dropout=cfg.aligner_dropout)
            torch.manual_seed(cfg.seed)
            model = APT(encoder, aligner, llm, self.tok, cache, cfg.prompt_format, cfg.instruction_bos,
                        cfg.long_audio)
            if cfg.proj_init == "words":
                model.start_proj_from_words()
        else:
            model = APT.load(prev, encoder, llm, self.tok, self.encoder_id, self.llm_id, cache)
            model.aligner.set_dropout(cfg.aligner_dropout)  # a training setting, as in stage 1
            layout = ("prompt_format", "instruction_bos", "long_audio")
            build.name_settings_not_used(prev, "was trained with", {k: getattr(model, k) for k in layout},
                                         {k: getattr(cfg, k) for k in layout}, ": an APT keeps the layout it was "
                                         "trained in")
        build.name_unused_aligner_sizes(cfg, model.aligner, prev)
        self.model = model.to(device)
        self.model.read_ahead = build.read_ahead(cfg, encoder, cache)
        # what trains: the aligner without its stage-0 heads, the projection and <AUDIO>
        for name, p in self.model.aligner.named_parameters():
            p.requires_grad_(not name.startswith(STAGE0_HEADS))
        self.params = {k: p for k, p in self.model.named_parameters() if p.requires_grad}
        self.module = self.model
        cfg.stage_dir(stage).mkdir(parents=True, exist_ok=True)

        root = cfg.data_root
        if stage == "caption_ft":  # one caption set, a whole number of passes over it
            pools = {"captioning": caption_examples(cfg, [cfg.caption_ft_source], random.Random(cfg.seed))}
            ratios = STAGES[stage]["ratios"]
            cfg.steps_caption_ft = cfg.steps_caption_ft or caption_ft_steps(cfg, len(pools["captioning"]), world)
        else:
            ratios = parse_ratios(cfg.task_ratios, STAGES[stage]["ratios"])
            pools = training_pools(cfg, stage, [t for t, weight in ratios.items() if weight > 0])
        self.sampler = data.TaskSampler(pools, ratios, cfg.batch_size * world, cfg.seed)
        # validated on those of these tasks that train (one set to 0 may have no data at all: NLAR's is ours);
        # none of them training, on none (the log then shows the training loss alone)
        val_tasks = [t for t in ("captioning", "aqa", "nlar") if ratios.get(t, 0) > 0]
        per = max(1, cfg.val_batches * cfg.batch_size // max(1, len(val_tasks)))
        source = {"source": cfg.caption_ft_source} if stage == "caption_ft" else {}
        self.val = {t: present(data.examples(t, root, "val", **(source if t == "captioning" else {}))[:per],
                               f"{t}'s validation split", cfg) for t in val_tasks}

    def usable(self, examples, most: int = 0, seed: str = ""):
        """The examples whose every clip could be encoded, and those features (in training at most max_clip_windows
        windows of a clip: `most`, drawn by `seed`)."""
        feats, bad = self.model.encode_clips(data.clips_of(examples), self.cfg.strict_audio, most, seed)
        warn(bad)
        return [ex for ex in examples if all(v in feats for k, v in ex.segments if k == "audio")], feats

    def micro_step(self, model, sampler):
        task, batch = sampler.next_batch()
        mine = batch[self.rank::self.world]
        # a long clip's run of windows (max_clip_windows) for a caption only, which describes the clip as a whole; a
        # time, a count, a question or a class may lie anywhere in it
        most = self.cfg.max_clip_windows if task == "captioning" else 0
        keep, feats = self.usable(mine, most, f"{self.cfg.seed}|{sampler.step}")
        read_next(self.model.read_ahead, sampler, self.rank, self.world)  # the next step's, while this one trains
        if nothing_to_train(keep, self.world, self.device):
            return None, 0, {"examples": 0, "skipped": len(mine) - len(keep)}
        with self.autocast():
            loss_sum, n = model(*data.collate(keep), feats)
        return loss_sum, n, {"task": task, "examples": len(keep), "skipped": len(mine) - len(keep)}

    def validate(self):
        """The answer loss on the validation split of each task, and AQA accuracy by generation; nothing where no
        task with a validation split trains."""
        metrics, bs = {}, self.cfg.batch_size
        if not self.val:
            return metrics
        with torch.no_grad(), self.autocast():
            total, count, heard = 0.0, 0, {}  # heard: the first 64 AQA questions' clips, for their answers below
            for task, exs in self.val.items():
                for i in range(0, len(exs), bs):
                    chunk, feats = self.usable(exs[i:i + bs])
                    heard |= feats if task == "aqa" and i < 64 else {}
                    if not chunk:
                        continue
                    s, n = self.model(*data.collate(chunk), feats)
                    total, count = total + s.item(), count + n
            metrics["val_loss"] = total / max(count, 1)
            if "aqa" not in self.val:
                return metrics
            qa = [ex for ex in self.val["aqa"][:64] if all(v in heard for k, v in ex.segments if k == "audio")]
            got = self.model.generate([ex.segments for ex in qa], heard, max_new_tokens=8) if qa else []
            metrics["val_aqa_accuracy"] = sum(normalize_answer(g) == ex.target["answer"]
                                              for g, ex in zip(got, qa)) / max(1, len(qa))
        return metrics

    def finish(self, metrics):
        final = self.cfg.stage_dir(self.stage) / "final"
        stage = self.stage if self.stage == "caption_ft" else int(self.stage)
        self.model.save(final, self.encoder_id, self.llm_id, {"stage": stage, "config": json.loads(self.cfg.to_json())})
        print(f"stage {self.stage} done: APT saved to {final}/; validation: " +
              ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


class TrainVision:
    """--stage vision (APT-BLIP-2's embedded default): a small vision side of InstructBLIP's shape (a ViT, a visual
    aligner reading its own WordPiece words, a projection) learns to tell the frozen LLM what a picture shows,
    from the synthetic pictures and their object names (synth_av): our stand-in for BLIP-2's own training. The ViT
    is a seeded random one, frozen, as the tiny preset's audio encoder is (BLIP-2 freezes its pretrained ViT; a ViT
    trained here from scratch alongside the aligner did not learn the objects in 1 000 steps, while the aligner
    learns to read a frozen random one's patch tokens); the aligner and the projection train. As BLIP-2 trains its
    Q-Former, two phases: for the first `vision_align_steps` the picture-text losses alone on larger batches
    (`vision_align_batch`; the LLM does not run), then the LLM's answer loss with those losses beside it. It never
    hears a sound. Its sequences are the trained APT's (the same prompt format, built by the same code), with the
    visual queries where a clip's acoustic prompts would go; nothing of the APT trains. The APT, which never saw a
    picture, is plugged in afterwards: `evaluate.py --task avqa`."""

    def __init__(self, cfg, rank, world, device):
        stage_applies(cfg, "vision")
        from apt_min.blip2 import InstructBLIP, avqa_prompt, train_qformer_tokenizer
        from apt_min.release import resolve_checkpoint
        from apt_min.vision import ImageProcessing

        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        checkpoint = resolve_checkpoint(cfg, None)  # the user's own stage-2 APT, else the preset's release
        if not (checkpoint / "apt.json").is_file():
            raise SystemExit(f"--stage vision builds its sequences as the trained APT does, which is not in "
                             f"{checkpoint}/; run `python train.py --stage 2` first")
        if rank == 0:
            build.ensure_av_data(cfg)
        if world > 1:
            dist.barrier()
        root, names = Path(cfg.data_root), [c.name for c in synth.TRAIN_CLASSES]
        if not (root / "vision" / "pictures_val.json").is_file():
            raise MissingFileError(f"{root / 'vision' / 'pictures_val.json'}: not there; --stage vision trains on the "
                                   "synthetic pictures, made only beside the synthetic benchmark (this --data_root "
                                   "holds other data, or the preset reads real data)")
        self.tok = ensure_tokenizer(cfg)
        self.autocast, self.scaler, frozen_dtype = amp_settings(cfg, device)
        encoder, encoder_id = build_encoder(cfg, device, frozen_dtype)
        llm, self.llm_id = load_llm(cfg, device, frozen_dtype)
        self.apt = APT.load(checkpoint, encoder, llm, self.tok, encoder_id, self.llm_id).to(device).eval()
        self.apt.requires_grad_(False)
        self.out = cfg.stage_dir("vision")
        self.out.mkdir(parents=True, exist_ok=True)

        val = json.loads((root / "vision" / "pictures_val.json").read_text())
        for r in val:
            r["frames"] = [str(root / f) for f in r["frames"]]
        rng = random.Random(cfg.seed)
        texts = [text for _ in range(300) for k in synth_av.PICTURE_TASKS  # prompts, answers and descriptions
                 for text in synth_av.picture_example({"frames": [], "objects": rng.sample(names, 3)}, k, rng)[1:]]
        texts += [avqa_prompt(q, names[:4]) for q in synth_av.QUESTIONS.values()] + names  # AVQA's questions too
        qtok = train_qformer_tokenizer(texts, self.out / "qformer_tokenizer", vocab_size=600)
        vit, qformer = cfg.vision_configs(qtok.hf.get_vocab_size())  # its [DEC] row is the one after
        torch.manual_seed(cfg.seed)
        self.blip = InstructBLIP(vit, qformer, llm, self.tok, qtok, ImageProcessing(size=cfg.vision_image))
        self.blip.to(device)
        for name, p in self.blip.named_parameters():  # the aligner (its stage-0 heads too: PictureLoss) and proj
            p.requires_grad_(name.startswith(("qformer.", "proj.")))
        self.module = PictureLoss(self.blip, self.apt, cfg.atm_negatives)
        self.unused_parameters = cfg.vision_align_steps > 0  # DDP: the projection has no gradient while aligning
        self.params = {k: p for k, p in self.module.named_parameters() if p.requires_grad}
        pools = {kind: (lambda r, kind=kind: synth_av.picture_example(synth_av.random_picture(r), kind, r))
                 for kind in synth_av.PICTURE_TASKS}  # a fresh picture for every example, seeded by the step
        self.sampler = data.TaskSampler(pools, dict.fromkeys(synth_av.PICTURE_TASKS, 1.0), cfg.batch_size * world,
                                        cfg.seed)
        vrng = random.Random(cfg.seed + 1)
        self.val = [synth_av.picture_example(r, synth_av.PICTURE_TASKS[i % 4], vrng)
                    for i, r in enumerate(val[:cfg.val_batches * cfg.batch_size])]

    def micro_step(self, model, sampler):
        aligning = sampler.step // self.cfg.grad_accum < self.cfg.vision_align_steps
        task, batch = sampler.next_batch()
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + sampler.step)  # hard negatives: by step
        if aligning:  # first phase: a larger batch of fresh pictures (its own seed by step), no LLM
            rng = random.Random(f"{self.cfg.seed}/align/{sampler.step}/{self.rank}")
            batch = [synth_av.picture_example(synth_av.random_picture(rng), "describe", rng)
                     for _ in range(self.cfg.vision_align_batch)]
        mine = batch if aligning else batch[self.rank::self.world]
        ids = torch.arange(len(mine)) + (sampler.step * self.world + self.rank) * len(mine)  # one id per picture
        with self.autocast():
            if aligning:
                parts = model(mine, ids.to(self.device), g, answer=False)
                return parts["total"], 1, {"task": "align", "examples": len(mine),
                                           **{k: parts[k].item() for k in ("atc", "atm", "agtg")}}
            answer_sum, n, parts = model(mine, ids.to(self.device), g)
        # the answer loss (a mean over its tokens) plus the picture-text losses (batch means), as one sum over n
        info = {"task": task, "examples": len(mine), "answer": (answer_sum / n).item(),
                **{k: parts[k].item() for k in ("atc", "atm", "agtg")}}
        return answer_sum + parts["total"] * n, n, info

    @torch.no_grad()
    def validate(self):
        """The answer loss on validation pictures; how often the pictured object ranks first among four; and where
        the pictured objects rank among all the looks' names (0 = first; chance (n - 1) / 2), asked what the picture
        shows: what the LLM has learned to read from the visual queries."""
        total, count, bs = 0.0, 0, self.cfg.batch_size
        with self.autocast():
            for i in range(0, len(self.val), bs):
                s, n = self.apt(self.module.segments(self.val[i:i + bs]), [ex[2] for ex in self.val[i:i + bs]], {})
                total, count = total + s.item(), count + n
            hits, choices = 0, [ex for ex in self.val if ex[1].startswith("Choose")][:48]
            for example in choices:
                options = re.findall(r"\d (\w+)[;.]", example[1])
                scores = self.apt.choice_logprob(self.module.segments([example])[0], options, {})
                hits += options[int(scores.argmax())] == example[2]
            names, ranks = [c.name for c in synth.TRAIN_CLASSES], []
            for example in [ex for ex in self.val if ex[1] == "What objects are in the picture?"][:48]:
                scores = self.apt.choice_logprob(self.module.segments([example])[0], names, {})
                order = [names[i] for i in scores.argsort(descending=True)]
                ranks += [order.index(o) for o in example[2].split(", ")]
        return {"val_loss": total / max(count, 1), "val_choice_accuracy": hits / max(1, len(choices)),
                "val_object_rank": sum(ranks) / max(1, len(ranks))}

    def finish(self, metrics):
        final = self.out / "final"
        self.blip.save_vision(final, self.llm_id, {"config": json.loads(self.cfg.to_json())})
        print(f"stage vision done: the vision side is saved to {final}/; validation: " +
              ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


class PictureLoss(nn.Module):
    """One forward = the losses of a batch of (frames, prompt, answer, description), so DistributedDataParallel sees
    one call per step. The LLM's loss on the answer, each frame's visual queries read with the prompt and laid out
    as the APT lays out a clip's; and BLIP-2's first-stage losses (`aligner.stage0_losses`: contrastive, matching,
    generation) between the first frame and the picture's description, which teach the aligner to read the frozen
    ViT's tokens far faster than the LLM's loss alone (as BLIP-2, the stage runs them alone first, then beside the
    answer loss: TrainVision). atm_negatives: where the matching loss's hard negatives come from, as in stage 0."""

    def __init__(self, blip, apt, atm_negatives: str):
        super().__init__()
        self.blip, self.apt, self.atm_negatives = blip, apt, atm_negatives

    def pixels(self, examples) -> list[torch.Tensor]:
        """Each example's frames as pixels (F, 3, S, S)."""
        return [torch.stack([self.blip.processing(f) for f in ex[0]]) for ex in examples]

    def segments(self, examples, pixels=None, tokens=None):
        """The examples as APT segments: [visual queries of each frame][prompt]. pixels, tokens: the frames' pixels
        and ViT tokens, if already computed."""
        pixels = pixels or self.pixels(examples)
        counts = [len(p) for p in pixels]
        prompts = [ex[1] for ex, k in zip(examples, counts) for _ in range(k)]
        visual = self.blip.visual_prompts(torch.cat(pixels), prompts, tokens)  # (frames in all, Q, D)
        return [[("prompts", v.reshape(-1, v.shape[-1])), ("text", ex[1])]
                for v, ex in zip(visual.split(counts), examples)]

    def forward(self, examples, picture_ids, generator, answer=True):
        """-> (the answer loss summed over its tokens, their count, the picture-text losses {atc, atm, agtg, total});
        with answer=False, the picture-text losses alone (the first phase: the LLM does not run)."""
        pixels = self.pixels(examples)
        tokens = self.blip.frame_tokens(torch.cat(pixels))  # (frames in all, 1 + P, Dv)
        device = tokens.device
        first = torch.cumsum(torch.tensor([0] + [len(p) for p in pixels[:-1]]), 0).to(device)
        ids, mask = self.blip.qformer_tokenizer([ex[3] for ex in examples])  # [CLS] ... [SEP], as BOS ... EOS
        parts = stage0_losses(self.blip.qformer, tokens[first], ids.to(device), mask.to(device), picture_ids,
                              generator=generator, atm_negatives=self.atm_negatives)
        if not answer:
            return parts
        answer_sum, n = self.apt(self.segments(examples, pixels, tokens), [ex[2] for ex in examples], {})
        return answer_sum, n, parts


# ------------------------------------------------------------------------------------------------------ the loop


def fit(cfg, stage, job, resume, rank, world, out: Path):
    """The training loop every stage shares: accumulation, clipping, schedule, logging, validation, checkpoints,
    resume. `job` is a stage object (above). job.micro_step(wrapped module, sampler) -> (loss_sum, count, info):
    this process's loss summed over its `count` items (tokens, or 1 for a loss that is already a batch mean), and
    info {"examples": int, "skipped": int, "task": name, other name: float (a per-process mean, logged as the mean
    over processes)}; loss_sum None when any process has no usable example, all of them skipping the micro-step
    together (nothing_to_train; info still counts what was skipped).
    Each optimizer step's gradient is that of the mean loss over every item of its grad_accum micro-batches on every
    process: exactly one batch grad_accum * world times as large. job.validate() -> {name: value}. Returns the last
    validation."""
    total = getattr(cfg, STAGES[stage]["steps"])
    unused = getattr(job, "unused_parameters", False)  # parameters some steps give no gradient
    if world > 1:  # DDP over what trains: the frozen encoder and LLM (7 B) are neither broadcast nor synchronised
        frozen = [n for n, p in job.module.named_parameters() if not p.requires_grad]
        DDP._set_params_and_buffers_to_ignore_for_model(job.module, frozen + [n for n, _ in job.module.named_buffers()])
    wrapped = DDP(job.module, find_unused_parameters=unused) if world > 1 else job.module
    opt = make_optimizer(job.params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(cfg, total, warmup_steps(cfg, stage, total)))
    ckpts, step, skipped = Checkpoints(out / "checkpoints", cfg.keep_checkpoints), 0, 0
    if not resume and rank == 0:
        set_aside_previous_run(out)
    if resume:
        step, skipped = restore(ckpts, job, opt, sched, rank, world)
        if rank == 0:
            truncate_log(out / "log.jsonl", step)
    logfile = open(out / "log.jsonl", "a") if rank == 0 else None
    seen, busy, metrics = 0, 0.0, {}  # examples and seconds spent training (not validating or saving)
    if step == 0:  # where validation starts, so the log shows how far training moved it
        log_validation(logfile, stage, 0, validation(job), "before training")
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc=f"stage {stage}", dynamic_ncols=True)
    while step < total:
        started = time.time()
        window, examples, bad = accumulate(cfg, stage, job, wrapped, world, step, ckpts)
        seen, skipped = seen + examples, skipped + bad  # over every process
        lr = sched.get_last_lr()[0]  # the rate this step uses (the schedule moves on inside optimizer_step)
        grad_norm = optimizer_step(cfg, job, opt, sched, window)
        busy += time.time() - started
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            rate = seen / max(busy, 1e-9)
            logs = window.logs()
            record = {"step": step, **{k: round(v, 5) for k, v in logs.items()}, "lr": lr,
                      "grad_norm": round(float(grad_norm), 4), "examples_per_s": round(rate, 2),
                      "skipped_audio": skipped}
            bar.set_postfix(loss=f"{logs.get('loss', 0):.3f}", lr=f"{record['lr']:.2e}", ex_s=f"{rate:.1f}")
            write_record(logfile, record)
        if step % cfg.eval_every == 0 or step == total:
            metrics = validation(job)
            log_validation(logfile, stage, step, metrics)
        if step % cfg.save_every == 0 or step == total:
            state = training_state(step, opt, sched, job, skipped, world)  # in every process: it gathers generators
            if rank == 0:
                ckpts.save(step, job.params, state)
        if world > 1:
            dist.barrier()
    bar.close()
    if logfile:
        logfile.close()
    return metrics or validation(job)  # none yet: resumed from a checkpoint of a finished run


def accumulate(cfg, stage, job, wrapped, world, step, ckpts):
    """Forward and backward over the step's grad_accum micro-batches (stage 0: grad_accum_0, if set). Returns (the
    Window, examples seen, audio skipped), both counted over every process. A non-finite loss, summed over all
    processes so that all of them stop together, ends the run."""
    job.module.train()
    window, seen, skipped = Window(world), 0, 0
    for _ in range(cfg.grad_accum_0 if stage == "0" and cfg.grad_accum_0 else cfg.grad_accum):
        loss_sum, count, info = job.micro_step(wrapped, job.sampler)
        skipped += info.get("skipped", 0)
        if loss_sum is None:  # nothing usable in any process (they skip together)
            continue
        summed = window.add(loss_sum, count, info)
        if not math.isfinite(summed):
            last = ckpts.folder / "latest"
            raise SystemExit(f"stage {stage}: the loss became {summed} at step {step + 1}; stopping. The last good "
                             f"checkpoint is {last.read_text() if last.is_file() else 'none'} in {ckpts.folder}; "
                             "try a lower --lr")
        loss = loss_sum / window.first.clamp(min=1) * world  # DDP averages over processes: times world
        (job.scaler.scale(loss) if job.scaler else loss).backward()
        seen += info.get("examples", 0)
    if world > 1:  # every process runs the same micro-steps, so each reaches this once per step
        counts = torch.tensor([seen, skipped], dtype=torch.float64, device=getattr(job, "device", None))
        dist.all_reduce(counts)
        seen, skipped = (int(c) for c in counts.tolist())
    return window, seen, skipped


def optimizer_step(cfg, job, opt, sched, window) -> torch.Tensor:
    """The window's gradient to the mean over all its items, clipped; one AdamW step; the schedule's next step.
    Returns the gradient norm before clipping. A window in which no micro-batch trained (no usable example in any
    process) has no gradient: the schedule still moves on, the optimizer (and an fp16 loss scaler) does not."""
    if window.first is None:
        with warnings.catch_warnings():  # torch warns of a schedule moved before any optimizer step: on purpose
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
            sched.step()
        return torch.tensor(0.0)
    window.rescale(job.params.values())
    if job.scaler:
        job.scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(job.params.values()), cfg.grad_clip)
    if job.scaler:
        job.scaler.step(opt)
        job.scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return grad_norm


def validation(job) -> dict:
    job.module.eval()
    return job.validate()


def write_record(logfile, record: dict):
    if logfile:
        logfile.write(json.dumps(record) + "\n")
        logfile.flush()


def log_validation(logfile, stage, step, metrics, when=None):
    """A validation into the log (rank 0 only) and onto the screen (none where the stage validates on nothing)."""
    if logfile and metrics:
        write_record(logfile, {"step": step, **metrics})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        tqdm.write(f"stage {stage} {when or f'step {step}'}: {shown}")


def training_state(step, opt, sched, job, skipped, world: int = 1) -> dict:
    """Everything besides the weights that a resumed run needs to continue exactly: optimizer, schedule, scaler,
    sampler and the random generators of every process (each process draws its own dropout; with world > 1 every
    process must call this, as it gathers them)."""
    version, internal, gauss = random.getstate()
    mine = {"torch": torch.get_rng_state(), "py": [version, list(internal), gauss],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    generators = [mine]
    if world > 1:
        generators = [None] * world
        dist.all_gather_object(generators, mine)
    return {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": job.scaler.state_dict() if job.scaler else None, "sampler": job.sampler.state_dict(),
            "rng": generators, "skipped_audio": skipped}


def restore(ckpts, job, opt, sched, rank: int = 0, world: int = 1) -> tuple[int, int]:
    """The last checkpoint's weights and training state into this run, each process's generators its own:
    (its step, the audio skipped so far)."""
    found = ckpts.load({k: tuple(p.shape) for k, p in job.params.items()})
    if found is None:
        raise SystemExit(f"--resume: no checkpoint under {ckpts.folder}")
    weights, state = found
    with torch.no_grad():
        for k, v in weights.items():
            job.params[k].copy_(v)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if job.scaler and state.get("scaler"):
        job.scaler.load_state_dict(state["scaler"])
    job.sampler.load_state_dict(state["sampler"])
    generators = state.get("rng") or [{"torch": state["torch_rng"], "cuda": state.get("cuda_rng"),
                                       "py": state["py_rng"]}]  # a checkpoint written before every process's were
    if len(generators) != world:
        log.warning("%s was written by %d process%s and is resumed by %d: the batches and the random draws are no "
                    "longer those of an uninterrupted run", ckpts.folder, len(generators),
                    "" if len(generators) == 1 else "es", world)
    mine = generators[rank % len(generators)]
    torch.set_rng_state(mine["torch"])
    if mine["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda"])
    version, internal, gauss = mine["py"]
    random.setstate((version, tuple(internal), gauss))
    return state["step"], state["skipped_audio"]


class Window:
    """What one optimizer step accumulates over its grad_accum micro-batches, summed over processes.

    Each micro-batch's loss is backpropagated as loss_sum / N_first * world, N_first being the global item count of
    the window's first micro-batch (with one micro-batch: the plain mean over the global batch). `rescale` then
    multiplies the gradients by N_first / N_window once every count is known, so the step's gradient is that of the
    mean over all N_window items, without holding more than one micro-batch's graph."""

    def __init__(self, world: int):
        self.world, self.first, self.total = world, None, None
        self.tasks, self.means, self.micro = {}, {}, 0

    def add(self, loss_sum: torch.Tensor, count: int, info: dict) -> float:
        """Count one micro-batch; returns its loss summed over all processes."""
        means = {k: v for k, v in info.items() if k not in ("examples", "skipped", "task")}
        packed = torch.tensor([loss_sum.item(), float(count), *means.values()], dtype=torch.float64,
                              device=loss_sum.device)
        if self.world > 1:
            dist.all_reduce(packed)  # sums over processes
        if self.first is None:
            self.first = packed[1].float()
        self.total = packed[:2] if self.total is None else self.total + packed[:2]
        if "task" in info:
            self.tasks[info["task"]] = self.tasks.get(info["task"], 0) + packed[:2]
        for k, v in zip(means, packed[2:].tolist()):
            self.means[k] = self.means.get(k, 0.0) + v / self.world
        self.micro += 1
        return packed[0].item()

    def rescale(self, params):
        if self.first is not None and self.total[1] != self.first:
            factor = (self.first.clamp(min=1) / self.total[1].clamp(min=1)).item()
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(factor)

    def logs(self) -> dict:
        """The window's mean loss over all its items (and per task), and the other values averaged."""
        if self.total is None:
            return {}
        out = {"loss": (self.total[0] / self.total[1].clamp(min=1)).item()}
        out |= {f"loss_{t}": (v[0] / v[1].clamp(min=1)).item() for t, v in self.tasks.items()}
        return out | {k: v / self.micro for k, v in self.means.items()}


def truncate_log(path: Path, step: int):
    """On resume from a checkpoint of `step`: drop the log records written after it (the stopped run may have
    logged a few more steps before it died), so the log holds every step once; a record cut short as the run died
    (a full disk, a kill mid-write) can only be its last line, which goes too."""
    if not path.is_file():
        return

    def record(line):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return {"step": math.inf}  # cut short: after the checkpoint whatever it was

    keep = [line for line in path.read_text().splitlines() if line and record(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def set_aside_previous_run(out: Path):
    """A fresh run (no --resume) where a previous run of the stage left its log and checkpoints: they move to
    {out}/previous/ (replacing an older one there), so the new log holds this run's steps once, and this run's
    checkpoints are not pruned in favour of the previous run's higher-numbered ones."""
    old = [p for p in (out / "log.jsonl", out / "checkpoints") if p.exists()]
    if not old:
        return
    previous = out / "previous"
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir(parents=True)
    for p in old:
        p.rename(previous / p.name)
    print(f"a fresh run: the previous run's {' and '.join(p.name for p in old)} moved to {previous}/ "
          f"(--resume continues a run instead)")


def nothing_to_train(keep: list, world: int, device) -> bool:
    """True when this process, or any other, has no usable example this micro-step: then all of them skip it
    together, since under DDP every process must run the same forwards."""
    empty = torch.tensor(float(not keep), device=device)
    if world > 1:
        dist.all_reduce(empty, op=dist.ReduceOp.MAX)
    return bool(empty.item())

# ---------------------------------------------------------------------------------------------------- machinery


def own_generators(cfg, rank: int):
    """After the job is built (its weights alike in every process), each process its own random draws (dropout):
    process 0 goes on as a single process would, the others are seeded apart."""
    if rank > 0:
        torch.manual_seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)


def setup_distributed():
    """(rank, world size, device): torchrun sets RANK / WORLD_SIZE; gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def amp_settings(cfg, device):
    """(autocast context factory, GradScaler or None, dtype for the frozen modules). precision=auto: bf16 on CUDA
    (fp16 where the card has no native bf16); on a CPU bf16 where cpu_bf16 is set and the CPU computes it natively
    (build.resolve_precision), else fp32.
    Under bf16 the frozen encoder and LLM are held in bf16 too (CPU and CUDA alike): autocast would cast their
    weights to bf16 for every product anyway."""
    dtype = frozen_dtype(cfg, device)  # fp16 on a CPU is a setting error
    if dtype == torch.float32:
        return nullcontext, None, torch.float32
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler, dtype


def warn(bad):
    for _, err in bad:
        log.warning("skipping audio that cannot be used: %s", err)


def read_next(ahead: ReadAhead | None, sampler, rank: int, world: int):
    """Start decoding the clips of this process's share of the sampler's next batch, in the background (where a
    ReadAhead is set: build.read_ahead), while the step just drawn trains."""
    if ahead:
        ahead.start(data.clips_of(sampler.peek()[1][rank::world]))


def training_pools(cfg, stage: str, tasks: list[str]) -> dict:
    """What stage 1 or 2 samples each of `tasks` from (a list, or a function of an rng that draws one); a task left
    out (its ratio 0) reads none of its files."""
    rng, root = random.Random(cfg.seed), cfg.data_root
    pools = {"tagging": tagging_examples(cfg, rng)} if "tagging" in tasks else {}
    pools |= {t: data.examples(t, root, "train", rng=rng) for t in ("aqa", "sed", "ter", "counting") if t in tasks}
    if "captioning" in tasks:
        pools["captioning"] = caption_examples(cfg, sources(cfg, "caption_sources"), rng)
    if stage == "2" and "fewshot" in tasks:
        single = fewshot_pool(cfg)
        # trained as 4-way 1-shot (paper; fewshot_shapes=mixed: 2-5 ways, 1-3 shots, <= 12 supports); a share of the
        # episodes (fewshot_made_up: half in tiny and small, none in paper) with made-up class names, so that
        # answering means matching the query to the supports rather than recognising a known class
        if not 0 <= cfg.fewshot_made_up <= 1:
            raise SystemExit(f"--fewshot_made_up={cfg.fewshot_made_up}: a share of the episodes, from 0 to 1")
        fillable = fillable_shapes(cfg, single)
        pools["fewshot"] = lambda r: data.fewshot_episode(single, *episode_shape(cfg, r, fillable), r,
                                                          rename=r.random() < cfg.fewshot_made_up,
                                                          layout=cfg.fewshot_layout)
    if stage == "2" and "nlar" in tasks:
        pools["nlar"] = data.examples("nlar", root, "train")
    return pools


def present(examples: list, what: str, cfg) -> list:
    """`examples`, or a DataError where none is left: every clip they list was missing (a validation score of
    nothing would read as a perfect 0 loss)."""
    if not examples:
        raise data.DataError(f"{what} under {cfg.data_root}: every clip it lists is missing (the warnings above count "
                             f"them and name the audio path pattern; a {data.LAYOUT_FILE} in the data root names your "
                             "copies' files)")
    return examples


def fewshot_pool(cfg) -> dict[str, list[str]]:
    """What stage 2's few-shot episodes are drawn from: AudioSet's single-label clips by label, over every list
    that tagging_sources names."""
    single = {}
    for source in sources(cfg, "tagging_sources"):
        for label, clips in data.single_label_pool(cfg.data_root, source).items():
            single.setdefault(label, []).extend(clips)
    return single


def sources(cfg, setting: str) -> list[str]:
    """A sources setting (caption_sources, tagging_sources, stage0_sources) as a list; each name is checked, so a
    misspelt one is an error naming the setting rather than a data set silently left out."""
    names = [s.strip() for s in getattr(cfg, setting).split(",") if s.strip()]
    if setting == "tagging_sources":
        segments = data.layout_of(cfg.data_root)["audioset"]["segments"]
        known = sorted(set(segments) - {"train", "test"})  # splits' names, not sources
    else:
        known = ["audiocaps", "clotho", "wavcaps:<subset>"] + ["tagging"] * (setting == "stage0_sources")
    for name in names:
        if name not in known and not (name.startswith("wavcaps:") and "wavcaps:<subset>" in known):
            raise SettingError(f"--{setting}: unknown source {name!r}; known: {', '.join(known)}")
    if not names:
        raise SettingError(f"--{setting} names no source; known: {', '.join(known)}")
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise SettingError(f"--{setting} names {', '.join(twice)} twice: each source's examples would be drawn twice")
    return names


def caption_ft_steps(cfg, captions: int, world: int) -> int:
    """Optimizer steps for caption_ft_epochs passes over `captions` training captions (each step takes
    batch_size * grad_accum * world of them)."""
    return max(1, math.ceil(cfg.caption_ft_epochs * captions / (cfg.batch_size * cfg.grad_accum * world)))


def stage0_pairs(cfg, rng) -> list:
    """Stage 0's audio-text pairs: the captions of each caption source and the tagging answers of the tagging
    sources, as stage0_sources names them (tiny, small: AudioCaps, Clotho, AudioSet; paper: AudioSet, WavCaps)."""
    pairs = []
    for source in sources(cfg, "stage0_sources"):
        pairs += tagging_examples(cfg, rng) if source == "tagging" else caption_examples(cfg, [source], rng)
    return pairs


def caption_examples(cfg, names: list[str], rng) -> list:
    """Training captions of the given sources (audiocaps, clotho, wavcaps:<subset>), one example per caption."""
    return [ex for name in names for ex in data.examples("captioning", cfg.data_root, "train", source=name, rng=rng)]


def tagging_examples(cfg, rng) -> list:
    """Tagging's training examples from AudioSet's segment lists named by tagging_sources."""
    return [ex for name in sources(cfg, "tagging_sources") for ex in data.examples("tagging", cfg.data_root, name,
                                                                                    rng=rng)]


def episode_shapes(cfg) -> list[tuple[int, int]]:
    """Every (ways, shots) a training episode may take: the paper's 4-way 1-shot, or with fewshot_shapes=mixed 2-5
    ways and 1-3 shots (at most 12 support clips), so that the longer episodes of evaluation are not new to the
    model."""
    if cfg.fewshot_shapes == "4x1":
        return [(4, 1)]
    return [(ways, shots) for ways in range(2, 6) for shots in range(1, min(3, 12 // ways) + 1)]


def fillable_shapes(cfg, single: dict[str, list[str]]) -> set[tuple[int, int]]:
    """The episode shapes that the few-shot pool can fill (ways classes with more than shots clips each); the rest
    are named in a warning, and none at all is an error."""
    shapes = episode_shapes(cfg)
    fillable = {(w, k) for w, k in shapes if len(data.fillable_classes(single, k)) >= w}
    if not fillable:
        raise data.DataError(f"stage 2's few-shot pool cannot fill any episode of {shapes} (ways, shots): it has "
                             f"{len(data.fillable_classes(single, 1))} classes with two or more single-label clips")
    if missing := [s for s in shapes if s not in fillable]:
        log.warning("stage 2's few-shot pool has too few classes with enough clips for the episodes %s (ways, "
                    "shots); drawing among the rest", missing)
    return fillable


def episode_shape(cfg, rng: random.Random, fillable: set | None = None) -> tuple[int, int]:
    """(ways, shots) of one training episode (episode_shapes): drawn as before where the pool can fill every shape,
    else drawn again among those it can (`fillable`)."""
    shapes = episode_shapes(cfg)
    if len(shapes) == 1:
        shape = shapes[0]
    else:  # the ways first, then the shots those ways allow (each uniform)
        ways = rng.choice(sorted({w for w, _ in shapes}))
        shape = ways, rng.choice([k for w, k in shapes if w == ways])
    if fillable is not None and shape not in fillable:
        shape = rng.choice(sorted(fillable))
    return shape


def parse_ratios(text: str, base: dict) -> dict:
    """The stage's task mixture with --task_ratios applied ("aqa=0.3,fewshot=1"); tasks of other stages are
    accepted and ignored here, unknown tasks are an error."""
    ratios, known = dict(base), set(STAGES["2"]["ratios"])
    for item in filter(None, text.split(",")):
        task, _, value = item.partition("=")
        task = task.strip()
        if task not in known:
            raise SettingError(f"--task_ratios: unknown task {task!r}; tasks: {', '.join(sorted(known))}")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not 0 <= weight < math.inf:
            raise SettingError(f"--task_ratios: {item.strip()!r}: expected task=weight, a weight of 0 or more")
        if task in ratios:
            ratios[task] = weight
    if not any(ratios.values()):
        raise SettingError(f"--task_ratios={text}: leaves this stage no task to train on (every ratio 0)")
    return ratios


class Checkpoints:
    """step_NNNNNNN/ folders (trainable weights in safetensors + training state) and a `latest` pointer. A
    checkpoint is written under a .tmp name and renamed when complete, and `latest` is replaced atomically
    after that, so a crash while saving leaves the previous checkpoint loadable."""

    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = folder, keep

    def save(self, step: int, weights: dict, state: dict):
        from safetensors.torch import save_file

        final = self.folder / f"step_{step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        torch.save(state, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        pointer = self.folder / "latest.tmp"
        pointer.write_text(final.name)
        pointer.replace(self.folder / "latest")
        for old in sorted(self.folder.glob("step_???????"))[:-self.keep]:
            shutil.rmtree(old)

    def load(self, expected: dict[str, tuple] | None = None):
        """The latest checkpoint's (weights, state), or None; with `expected` ({name: shape}), its weights are
        checked against them before any is read (a run whose settings changed a shape is refused, naming it)."""
        pointer = self.folder / "latest"
        if not pointer.is_file():
            return None
        where = self.folder / pointer.read_text().strip()
        from safetensors.torch import load_file

        if expected is not None:
            file = where / "weights.safetensors"
            check_keys({file: safetensors_entries(file)}, expected, set(), (), where)
        state = torch.load(where / "state.pt", map_location="cpu", weights_only=True)  # a GPU run's optimizer state
        # then goes to each process's own device (Optimizer.load_state_dict), or to a CPU: not all to the saving GPU
        return load_file(str(where / "weights.safetensors")), state


def warmup_steps(cfg, stage: str, total: int) -> int:
    """A stage's warm-up: stage 0's own (warmup_steps_0) if set, caption_ft's own or a tenth of its `total` steps,
    else warmup_steps."""
    if stage == "caption_ft":
        return cfg.warmup_steps_caption_ft or max(1, total // 10)
    return cfg.warmup_steps_0 if stage == "0" and cfg.warmup_steps_0 else cfg.warmup_steps


def cosine_schedule(cfg, total, warmup: int):
    """The learning rate's factor for the step numbered k + 1 (LambdaLR counts from 0): linear warm-up to the full
    rate at the warm-up's last step, then half a cosine down to min_lr_ratio at the run's last step (total), where
    it stays (a run no longer than its warm-up, or of one step, ends warming up or at the full rate)."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step + 1 - max(warmup, 1)) / max(1, total - max(warmup, 1)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def make_optimizer(params: dict[str, nn.Parameter], cfg):
    """AdamW (0.9, 0.999); weight decay on matrices only, not on biases, norms or single vectors."""
    decay = [p for p in params.values() if p.ndim >= 2]
    rest = [p for p in params.values() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))


def starting_apt(cfg, stage: str) -> None:
    """Finds the trained APT a stage starts from before anything is built, so that the encoder and the LLM are the
    ones it was trained against (release.resolve_checkpoint, take_its_parts): --start_from (a release is verified
    and brings its encoder); for caption_ft without a stage 2 of the run's own, the preset's release, which it then
    continues as --start_from would (and says so). (The vision stage resolves its APT itself: TrainVision.)"""
    from apt_min.release import resolve_checkpoint

    if cfg.start_from:
        resolve_checkpoint(cfg, cfg.start_from)
    elif stage == "caption_ft":
        found = resolve_checkpoint(cfg, None)
        if found != cfg.stage_dir("2") / "final":
            log.info("no stage 2 in %s: caption_ft starts from the preset's release, %s", cfg.run_dir, found)
            cfg.start_from = str(found)


def starting_point(cfg, stage: str) -> Path:
    """What stage 1, 2 or caption_ft starts from: the previous stage's result in the run folder, or --start_from
    (main takes it only for stage 2 and caption_ft); its absence is an error saying what to run first."""
    needs = STARTS_AFTER[stage]
    prev = cfg.stage_dir(needs) / "final"
    if cfg.start_from:
        prev = Path(cfg.start_from)
        if not (prev / "apt.json").is_file():
            raise SystemExit(f"--start_from={cfg.start_from}: no trained APT there (no apt.json)")
        if prev.resolve() == (cfg.stage_dir(stage) / "final").resolve():
            raise SystemExit(f"--start_from={cfg.start_from} is where this run saves its result, which would "
                             "overwrite it; continue into another --run_dir")
    elif not (prev / ("aligner.json" if stage == "1" else "apt.json")).is_file():
        raise SystemExit(f"stage {stage} starts from stage {needs}'s result, which is not in {prev}/; run "
                         f"`python train.py --stage {needs}` first (or, for a run that continued another APT, "
                         "give its --start_from again)")
    return prev


def stage_applies(cfg, stage: str):
    """The stages only some presets have are refused where the settings give what they would make (main asks first,
    before any data is generated or any model fetched)."""
    if stage == "lm" and stage not in cfg.chain():  # Config.chain: which presets have the lm and mae stages
        raise SettingError("--stage lm trains the tiny stand-in LLM; with --llm_path set, the LLM is given")
    if stage == "mae" and stage not in cfg.chain():
        raise SettingError("--stage mae pretrains the encoder of a preset with --encoder_init=mae (small) and no "
                           "--encoder_checkpoint")
    if stage == "vision" and cfg.vision_path:
        raise SettingError("--stage vision trains the embedded default's vision side; with --vision_path set, the "
                           "vision side is given")


@clean_exit("train.py")
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Any setting of apt_min/config.py can be given as --key=value.")
    ap.add_argument("--stage", required=True, choices=list(STAGES))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--resume", action="store_true")
    args, rest = ap.parse_known_args(argv)
    cfg = load_config(args.preset, rest)
    for setting in ("caption_sources", "tagging_sources", "stage0_sources"):  # a misspelt source stops any stage
        sources(cfg, setting)
    stage_applies(cfg, args.stage)
    if cfg.start_from and args.stage not in ("2", "caption_ft"):
        raise SystemExit(f"--start_from names a trained APT for stage 2 or caption_ft to continue; stage {args.stage} "
                         "does not start from one")
    if args.resume and not (cfg.stage_dir(args.stage) / "checkpoints" / "latest").is_file():  # before any loading
        raise SystemExit(f"--resume: no checkpoint under {cfg.stage_dir(args.stage) / 'checkpoints'} (a first run of "
                         "the stage: leave out --resume)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.stage in ("2", "caption_ft"):
        starting_apt(cfg, args.stage)
    if args.stage in ("1", "2", "caption_ft"):
        starting_point(cfg, args.stage)  # before the encoder is looked for: a stage 2 resumed without the
        # --start_from it continued would be told to pretrain an encoder into a folder that has none of its own
    rank, world, device = setup_distributed()
    random.seed(cfg.seed)
    if rank == 0:  # what every process reads, made once, before the others look for it (they would write it too)
        ensure_data(cfg)
        if args.stage != "mae":
            ensure_tokenizer(cfg)
            if args.stage not in ("lm", "vision"):  # vision: its APT's encoder (release.resolve_checkpoint)
                build_encoder(cfg, "cpu", torch.float32)  # tiny's: seeded, saved under run_dir on first use
    if world > 1:
        dist.barrier()
    torch.manual_seed(cfg.seed)
    if rank == 0:
        print(f"stage {args.stage} trains {STAGES[args.stage]['trains']}; loss: {STAGES[args.stage]['loss']}")
    if args.stage == "lm":
        job = StandInLLM(cfg, rank, world, device)
    elif args.stage == "mae":
        job = PretrainEncoder(cfg, rank, world, device)
    elif args.stage == "0":
        job = AlignStage0(cfg, rank, world, device)
    elif args.stage == "vision":
        job = TrainVision(cfg, rank, world, device)
    else:
        job = TuneAPT(cfg, args.stage, rank, world, device)
    own_generators(cfg, rank)
    metrics = fit(cfg, args.stage, job, args.resume, rank, world, cfg.stage_dir(args.stage))
    if rank == 0:
        job.finish(metrics)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

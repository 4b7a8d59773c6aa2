"""Presets: `tiny` (the default: CPU-sized, synthetic data, a stand-in LLM trained here), `small` (SmolLM2-135M-
Instruct, a real pretrained LLM from the package index, an encoder MAE-pretrained here, the same data) and `paper`
(Audio-MAE ViT-B/16, a BERT-mini-sized aligner, Vicuna-7B v1.1, 10.24 s windows; paper §3.1 and §4.1).

One flat dataclass holds every setting; a preset is a short dict of the fields it changes; the command line
overrides any field as `--key=value` (type-checked; an unknown key is an error that lists the known ones).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from apt_min.errors import SettingError
from apt_min.tasks import FEWSHOT_LAYOUTS


@dataclass
class Config:
    preset: str = "tiny"
    # where things are
    data_root: str = "data/synth"  # a folder in the real data sets' layouts (apt_min.data.LAYOUT)
    run_dir: str = "runs/tiny"  # stages write stage0/, stage1/, ... here; the tiny LLM goes to llm/
    llm_path: str = ""  # a Hugging Face Llama folder; "" = {run_dir}/llm, written by `--stage lm` (tiny only)
    release: str = ""  # a trained APT committed to the repository (apt_min.release), used where no run exists yet
    encoder_checkpoint: str = ""  # Audio-MAE .pth / .safetensors; "" = the preset makes its own (encoder_init)
    synth_scale: float = 1.0  # size of the synthetic benchmark generated on first use
    synth_seed: int = 0  # the benchmark's own seed (not `seed`: runs of several training seeds share one test set)
    feature_cache: str = "memory"  # the frozen encoder's features of each clip: kept on disk under {run_dir}/features
    # and in memory ("memory": the synthetic benchmark's fit), on disk only ("disk"), or computed each time ("off":
    # paper, where AudioSet's 2 M clips and WavCaps' 0.4 M of a minute on average would take about 4 TB on disk)
    # which data each stage trains on: comma-separated sources, each a file of apt_min.data.LAYOUT
    caption_sources: str = "audiocaps,clotho"  # stages 1-2's captions: audiocaps, clotho, wavcaps:<subset>
    tagging_sources: str = "balanced"  # AudioSet's segment lists for tagging and few-shot: balanced, unbalanced
    stage0_sources: str = "audiocaps,clotho,tagging"  # stage 0's audio-text pairs: caption sources, tagging
    # audio front end and encoder
    target_length: int = 512  # fbank frames per window (5.12 s)
    encoder_dim: int = 128
    encoder_depth: int = 2
    encoder_heads: int = 4
    output_block: int = -2  # penultimate (paper); the public APT code used the last (-1)
    encoder_init: str = "random"  # without a checkpoint: "random" (seeded, tiny) or "mae" (--stage mae pretrains it)
    mask_ratio: float = 0.8  # --stage mae: the share of each window's patches hidden from the encoder (Audio-MAE's)
    mae_batch_size: int = 64  # --stage mae: windows per batch
    # aligner
    aligner_hidden: int = 128
    aligner_layers: int = 2
    aligner_heads: int = 4
    aligner_intermediate: int = 512
    num_queries: int = 16
    aligner_dropout: float = 0.1
    aligner_words: str = "own"  # the aligner's word vectors: a table of its own, or "llm": the LLM's table, mapped
    aligner_init: str = "random"  # or "llm": its word vectors start as the LLM's, reduced by PCA (stage 0)
    proj_init: str = "random"  # or "words" (aligner_words=llm): the projection starts as the way back of the
    # aligner's word map, so a query reaches the LLM near the words the aligner finds it like (stage 1; ours)
    prompt_format: str = "plain"  # how an example is laid out for the LLM (apt_min.model.PROMPT_FORMATS)
    instruction_bos: bool = False  # stages 1-2: the aligner reads BOS before the instruction, as stage 0's texts
    long_audio: str = "windows"  # a clip of several windows: each window its own prompts, or "all" at once (paper)
    # training reads at most this many windows (target_length frames: 10.24 s in paper, 5.12 s in tiny and small) of a
    # captioned clip (stage 0's pairs, stages 1-2's captioning; the other tasks' answers may lie anywhere in a clip), a
    # run of them drawn at random for each step (0: the whole clip; evaluation always reads whole clips). Paper preset:
    # 3 (30.72 s: AudioSet, AudioCaps and Clotho clips whole; a WavCaps clip averages about a minute, some last many,
    # and a batch pads every clip to its longest)
    max_clip_windows: int = 0
    # APT-BLIP-2 (blip2.py): the vision side an APT is plugged into, and AVQA
    vision_path: str = ""  # an InstructBLIP folder (Hugging Face layout), or a vision side trained here (--stage
    # vision: its vision/final folder); "" = {run_dir}/vision/final
    avqa_frames: int = 2  # frames per video, evenly spaced over those extracted (the public APT code: 10 at 1 fps)
    # the visual and the acoustic prompts kept apart: neither block attends to the other, the text after reads both
    # (ours, for a small LLM: each block then reaches the LLM as in its own training; the paper: plain causal, False)
    avqa_blocks_apart: bool = False
    vision_image: int = 64  # --stage vision: the small ViT's picture size, patch, width, depth and heads
    vision_patch: int = 16  # the synthetic pictures put one object per 16-pixel cell (synth_av.layout)
    vision_dim: int = 128
    vision_depth: int = 1  # a seeded random ViT, frozen (as tiny's audio encoder): one block keeps its tokens apart
    vision_heads: int = 4
    vision_queries: int = 8  # visual queries per frame (InstructBLIP: 32)
    steps_vision: int = 4000  # in all: the first vision_align_steps align pictures and texts without the LLM
    vision_align_steps: int = 500  # BLIP-2's first stage (contrastive, matching, generation), then its second
    vision_align_batch: int = 64  # pictures per alignment step and process (only the ViT and the aligner run)
    # the tiny stand-in LLM (ignored when llm_path names a real model)
    llm_vocab: int = 1000
    llm_hidden: int = 192
    llm_layers: int = 4
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_intermediate: int = 512
    # optimisation (paper §4.1: Adam, 2 000 warm-up steps then cosine; the peak 1e-4, AdamW (0.9, 0.999), weight
    # decay 0.05 and floor 0.1x as BLIP-2's code)
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    warmup_steps_0: int = 0  # stage 0's own warm-up (0: warmup_steps); the public APT code: 5 000, 2 000 after
    warmup_steps_caption_ft: int = 0  # caption_ft's (0: a tenth of its steps; its few thousand steps are no place
    # for the 2 000 of the paper's long runs, which would leave it warming up to the end)
    stage0_batch_size: int = 0  # stage 0's batch per process, one contrastive batch (0: batch_size)
    grad_accum_0: int = 0  # stage 0's micro-batches a step (0: grad_accum); paper: 1, a step one contrastive batch
    atm_negatives: str = "global"  # stage 0's (and the vision stage's) ATM hard negatives from every process's
    # batch (BLIP-2), or "local"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    steps_lm: int = 600
    steps_mae: int = 1500
    steps_0: int = 600
    steps_1: int = 2500
    steps_2: int = 1500
    steps_caption_ft: int = 0  # --stage caption_ft: 0 = caption_ft_epochs passes over caption_ft_source's captions
    caption_ft_epochs: float = 2.0  # paper §4.2: two epochs on AudioCaps, or on Clotho, before Table 4
    caption_ft_source: str = "audiocaps"  # or clotho; the result goes to {run_dir}/caption_ft-{source}/
    start_from: str = ""  # stage 2 / caption_ft: a trained APT folder to start from instead of the previous stage's
    # result (stage 2 continued with another task mixture: how the small release was made, README; ours)
    precision: str = "auto"  # auto: bf16 autocast on CUDA (fp16 on a card without native bf16), fp32 on CPU;
    # or bf16 / fp16 (GradScaler, CUDA) / fp32
    cpu_bf16: bool = False  # with precision=auto: bf16 autocast on a CPU that computes bf16 natively (probed)
    task_ratios: str = ""  # e.g. "aqa=0.3,nlar=1": changes the stage's task mixture (train.py STAGES)
    fewshot_layout: str = "paper"  # few-shot episodes as the paper interleaves them, or "list" (apt_min.tasks.fewshot)
    fewshot_shapes: str = "4x1"  # stage 2's episodes: 4-way 1-shot (paper) or "mixed" (2-5 ways, 1-3 shots, <= 12)
    fewshot_made_up: float = 0.5  # stage 2's episodes with made-up class names (the paper's: none, its real labels)
    grad_checkpointing: bool = False  # recompute the LLM blocks in backward (how 7B fits on a 24 GB card)
    grad_checkpointing_keep: int = 0  # with it, the LLM's last N blocks keep their activations instead: less
    # recomputation for more memory (benchmarks/bench_gpu_step.py --keep finds the N a card holds)
    compile_llm: bool = False  # torch.compile the frozen LLM's blocks for training (7B on an H100: 1.7x per step)
    # background threads decoding audio files where features are not cached (feature_cache=off): a step's clips at
    # once and the next step's while this one trains (model.ReadAhead). -1: on a GPU, one per CPU core (of the
    # process's share, under torchrun) but one, at most 8; on the CPU none (they would take the cores a training step
    # uses). 0: none
    decode_threads: int = -1
    seed: int = 0  # the run's: initialisation, dropout, sampling order (the data's: synth_seed)
    # bookkeeping
    log_every: int = 25
    eval_every: int = 500
    save_every: int = 500
    keep_checkpoints: int = 2
    val_batches: int = 8
    strict_audio: bool = False  # a corrupt audio file raises instead of being skipped and counted

    @property
    def synthetic_data(self) -> bool:
        """Whether the preset runs on the synthetic benchmark, generated on first use (tiny, small)."""
        return self.preset != "paper"

    def resolved_llm_path(self) -> str:
        return self.llm_path or f"{self.run_dir}/llm"

    def chain(self) -> list[str]:
        """The train.py stages that make this preset's APT, in order: `mae` where the encoder is pretrained here
        (small), 0, `lm` where the LLM is the stand-in trained here (tiny; before stage 0 where the aligner reads the
        LLM's words from the start), 1, 2."""
        mae = self.encoder_init == "mae" and not self.encoder_checkpoint
        lm = [] if self.llm_path else ["lm"]
        early = "llm" in (self.aligner_words, self.aligner_init)
        return ["mae"] * mae + lm * early + ["0"] + lm * (not early) + ["1", "2"]

    # each component's own config, from these settings (the one place the mapping is written)

    def encoder_config(self):
        from apt_min.audiomae import AudioMAEConfig

        return AudioMAEConfig(target_length=self.target_length, dim=self.encoder_dim, depth=self.encoder_depth,
                              heads=self.encoder_heads, output_block=self.output_block)

    def aligner_config(self, vocab_size: int, llm_dim: int = 0):
        """llm_dim: the LLM's width, which an aligner reading the LLM's word table (aligner_words=llm) needs."""
        from apt_min.aligner import AlignerConfig

        return AlignerConfig(vocab_size=vocab_size, audio_dim=self.encoder_dim, hidden_size=self.aligner_hidden,
                             num_layers=self.aligner_layers, num_heads=self.aligner_heads,
                             intermediate_size=self.aligner_intermediate, num_queries=self.num_queries,
                             dropout=self.aligner_dropout, llm_words=llm_dim if self.aligner_words == "llm" else 0)

    def vision_configs(self, qformer_vocab: int):
        """--stage vision: the small ViT and the visual aligner (the audio aligner's shape, its own words)."""
        from apt_min.aligner import AlignerConfig
        from apt_min.vision import ViTConfig

        vit = ViTConfig(image_size=self.vision_image, patch_size=self.vision_patch, dim=self.vision_dim,
                        depth=self.vision_depth, heads=self.vision_heads, hidden=4 * self.vision_dim)
        qformer = AlignerConfig(vocab_size=qformer_vocab, audio_dim=self.vision_dim, hidden_size=self.aligner_hidden,
                                num_layers=self.aligner_layers, num_heads=self.aligner_heads,
                                intermediate_size=self.aligner_intermediate, num_queries=self.vision_queries,
                                dropout=self.aligner_dropout, input_norm_eps=1e-6)
        return vit, qformer

    def stand_in_llm_config(self, tokenizer):
        """The tiny preset's stand-in LLM, sized by the llm_* settings, for `tokenizer`."""
        from apt_min.llama import LlamaConfig

        return LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=self.llm_hidden,
                           intermediate_size=self.llm_intermediate, num_hidden_layers=self.llm_layers,
                           num_attention_heads=self.llm_heads, num_key_value_heads=self.llm_kv_heads,
                           max_position_embeddings=2048, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)

    def stage_dir(self, stage: str) -> Path:
        """Where train.py's `stage` writes its log, checkpoints and result (final/) in this run."""
        return Path(self.run_dir) / stage_folder(stage, self.caption_ft_source)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


STARTS_AFTER = {"1": "0", "2": "1", "caption_ft": "2"}  # the stage whose result each one starts from (vision: an APT,
# the run's stage 2 or the release: release.resolve_checkpoint)


def stage_folder(stage: str, caption_ft_source: str = "") -> str:
    """The folder of its run that a training stage writes (everything that looks for a stage's result reads it here)."""
    named = {"lm": "llm-train", "mae": "encoder-train", "vision": "vision",
             "caption_ft": f"caption_ft-{caption_ft_source}"}
    return named.get(stage, f"stage{stage}")


WAVCAPS = "wavcaps:AudioSet_SL,wavcaps:BBC_Sound_Effects,wavcaps:FreeSound,wavcaps:SoundBible"  # its 4 subsets

PRESETS = {
    "tiny": {},
    # SmolLM2-135M-Instruct, a real pretrained LLM that a CPU runs (python -m apt_min.weights smollm2, fetched on
    # first use); the tiny preset's data; an encoder of the tiny's width, 4 blocks, pretrained by masked
    # autoencoding (--stage mae); an aligner of the paper's shape (4 layers, cross-attention every second one) at
    # 128 wide with 8 queries per clip (benchmarks/README.md: the query count), reading its words through SmolLM2's
    # own table; stage 2 weighted to episodes of several shapes, laid out as lists (each support clip directly
    # followed by its label: tasks.fewshot); the steps fit the chain under an hour on 2 cores (README, Performance);
    # APT-BLIP-2 keeps the visual and the acoustic prompts apart (SmolLM2 loses much of the sound behind the picture
    # otherwise: README, Results, APT-BLIP-2)
    "small": dict(
        preset="small", run_dir="runs/small", llm_path="weights/smollm2-135m-instruct", release="weights/apt-small",
        encoder_depth=4, encoder_init="mae", aligner_hidden=128, aligner_layers=4, aligner_heads=4,
        aligner_intermediate=512, num_queries=8, aligner_words="llm", aligner_init="llm", prompt_format="smollm2-chat",
        cpu_bf16=True, batch_size=8, lr=5e-4, steps_mae=800, steps_0=400, steps_1=700, steps_2=500,
        task_ratios="fewshot=3,aqa=0.3", fewshot_shapes="mixed", fewshot_layout="list", steps_vision=2000,
        avqa_blocks_apart=True, log_every=25, eval_every=200, save_every=200,
    ),
    "paper": dict(
        preset="paper", data_root="data", run_dir="runs/paper", llm_path="weights/vicuna-7b-v1.1",
        encoder_checkpoint="weights/audiomae/finetuned.pth", target_length=1024, encoder_dim=768, encoder_depth=12,
        encoder_heads=12, aligner_hidden=256, aligner_layers=4, aligner_heads=4, aligner_intermediate=1024,
        num_queries=32, batch_size=8, grad_accum=4, lr=1e-4, warmup_steps=2000, steps_0=100_000, steps_1=100_000,
        steps_2=50_000, log_every=50, eval_every=5000, save_every=5000, grad_checkpointing=True,
        vision_path="weights/instructblip-vicuna-7b", avqa_frames=10, fewshot_made_up=0.0,
        # the paper's data (§3.3, Table 1): captions from WavCaps beside AudioCaps and Clotho, AudioSet's 2 M clips,
        # and stage 0 on AudioSet + WavCaps; stage 0's own warm-up, a step of one contrastive batch of its own, BOS
        # as in stage 0
        caption_sources="audiocaps,clotho," + WAVCAPS, tagging_sources="balanced,unbalanced",
        stage0_sources="tagging," + WAVCAPS, warmup_steps_0=5000, stage0_batch_size=128, grad_accum_0=1,
        instruction_bos=True, long_audio="all", feature_cache="off", max_clip_windows=3,
    ),
}


def _parse(name: str, kind: str, text: str):
    """`text` as the field's type (the annotations are strings: "int", "float", "str", "bool")."""
    if kind == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingError(f"--{name}: expected true or false, got {text!r}")
    try:
        return {"int": int, "float": float, "str": str}[kind](text)
    except ValueError:
        raise SettingError(f"--{name}: expected {kind}, got {text!r}") from None


CHOICES = {  # the settings that name one of a few ways; anything else is an error before a run starts
    "encoder_init": ("random", "mae"), "aligner_words": ("own", "llm"), "aligner_init": ("random", "llm"),
    "proj_init": ("random", "words"),
    "prompt_format": ("plain", "smollm2-chat", "instructblip"), "precision": ("auto", "bf16", "fp16", "fp32"),
    "fewshot_layout": FEWSHOT_LAYOUTS, "fewshot_shapes": ("4x1", "mixed"), "atm_negatives": ("global", "local"),
    "long_audio": ("windows", "all"), "caption_ft_source": ("audiocaps", "clotho"),
    "feature_cache": ("memory", "disk", "off"),
}


AT_LEAST_ONE = ("batch_size", "grad_accum", "log_every", "eval_every", "save_every", "keep_checkpoints", "val_batches",
                "steps_lm", "steps_mae", "steps_0", "steps_1", "steps_2", "steps_vision", "mae_batch_size",
                "vision_align_batch")
AT_LEAST_ZERO = ("grad_accum_0", "stage0_batch_size", "steps_caption_ft", "warmup_steps", "warmup_steps_0",
                 "warmup_steps_caption_ft", "max_clip_windows")  # 0: the default they name


def load_config(preset: str = "tiny", overrides: list[str] | dict | None = None) -> Config:
    """The preset, then `--key=value` strings (or a dict) on top. Unknown presets and keys, and values outside a
    setting's CHOICES, are errors."""
    if preset not in PRESETS:
        raise SettingError(f"unknown preset {preset!r}{_near(preset, PRESETS, repr)}; presets: {sorted(PRESETS)}")
    cfg = Config(**PRESETS[preset])
    kinds = {f.name: f.type for f in dataclasses.fields(Config)}
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides or []]
    for key, value in items:
        key = key.replace("-", "_")
        if key not in kinds:
            raise SettingError(f"unknown setting --{key}{_near(key, kinds, '--{}'.format)}; "
                               f"known: {', '.join(sorted(kinds))}")
        setattr(cfg, key, _parse(key, kinds[key], value) if isinstance(value, str) else value)
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise SettingError(f"--{key}={getattr(cfg, key)!r}: expected one of {', '.join(allowed)}")
    for keys, least in ((AT_LEAST_ONE, 1), (AT_LEAST_ZERO, 0)):  # 0 would divide by zero, train nothing, keep
        for key in keys:  # every checkpoint; below 0 would count backwards
            if getattr(cfg, key) < least:
                raise SettingError(f"--{key}={getattr(cfg, key)}: expected at least {least}")
    if not -cfg.encoder_depth <= cfg.output_block < cfg.encoder_depth:
        raise SettingError(f"--output_block={cfg.output_block}: expected a block of the encoder's {cfg.encoder_depth} "
                           f"(-{cfg.encoder_depth} to {cfg.encoder_depth - 1}; -1 the last, -2 the penultimate)")
    for key in ("run_dir", "data_root"):  # folders: a file there would fail deep inside, with a traceback
        if Path(getattr(cfg, key)).is_file():
            raise SettingError(f"--{key}={getattr(cfg, key)}: a file; expected a folder")
    if cfg.decode_threads < -1:
        raise SettingError(f"--decode_threads={cfg.decode_threads}: expected -1 (as the device suits), 0 or more")
    if cfg.grad_checkpointing_keep < 0:
        raise SettingError(f"--grad_checkpointing_keep={cfg.grad_checkpointing_keep}: expected a number of blocks, "
                           ">= 0")
    if cfg.grad_clip <= 0:  # clip_grad_norm_ at 0 zeroes every gradient, below 0 turns them round
        raise SettingError(f"--grad_clip={cfg.grad_clip}: expected a gradient norm above 0")
    if not cfg.caption_ft_epochs > 0:  # 0 or below (or nan) took one step of caption_ft, silently
        raise SettingError(f"--caption_ft_epochs={cfg.caption_ft_epochs}: expected a number of passes above 0")
    if not 0 <= cfg.vision_align_steps < cfg.steps_vision:
        raise SettingError(f"--vision_align_steps={cfg.vision_align_steps} with --steps_vision={cfg.steps_vision}: "
                           "the vision stage needs steps with the LLM after its alignment steps")
    for width, heads in (("encoder_dim", "encoder_heads"), ("aligner_hidden", "aligner_heads"),
                         ("llm_hidden", "llm_heads"), ("vision_dim", "vision_heads")):  # (a reshape would fail)
        if getattr(cfg, heads) < 1 or getattr(cfg, width) % getattr(cfg, heads):
            raise SettingError(f"--{heads}={getattr(cfg, heads)}: the heads split --{width}={getattr(cfg, width)} "
                               "evenly; expected a divisor of it")
    if (cfg.llm_hidden // cfg.llm_heads) % 2:
        raise SettingError(f"--llm_hidden={cfg.llm_hidden}: with --llm_heads={cfg.llm_heads} a head is "
                           f"{cfg.llm_hidden // cfg.llm_heads} wide; rotary positions turn pairs of features, so the "
                           "stand-in LLM needs an even width per head")
    if cfg.llm_kv_heads < 1 or cfg.llm_heads % cfg.llm_kv_heads:
        raise SettingError(f"--llm_kv_heads={cfg.llm_kv_heads}: each key/value head serves a whole number of the "
                           f"--llm_heads={cfg.llm_heads}; expected a divisor of it")
    if cfg.target_length < 16 or cfg.target_length % 16:
        raise SettingError(f"--target_length={cfg.target_length}: filter-bank frames a window, cut into 16-frame "
                           "patches; expected a multiple of 16 (Audio-MAE: 1024, 10.24 s)")
    if not 0 <= cfg.aligner_dropout < 1:
        raise SettingError(f"--aligner_dropout={cfg.aligner_dropout}: expected a probability, from 0 to below 1")
    if cfg.proj_init == "words" and cfg.aligner_words != "llm":
        raise SettingError("--proj_init=words starts the projection from the aligner's map of the LLM's words, "
                           "which only --aligner_words=llm has")
    return cfg


def _near(name: str, known, show) -> str:
    """' (did you mean X?)' for the known name closest to a mistyped one, or '' where none is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {show(close[0])}?)" if close else ""


def _split(option: str) -> tuple[str, str]:
    if not option.startswith("--") or "=" not in option:
        raise SettingError(f"expected --key=value, got {option!r}")
    key, value = option[2:].split("=", 1)
    return key, value


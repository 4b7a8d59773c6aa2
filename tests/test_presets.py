"""The presets: overrides are type-checked, and the paper preset's parts fit together at full size (on the meta
device: shapes only, no memory, no download)."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from apt_min.aligner import Aligner, AlignerConfig
from apt_min.audiomae import AudioMAE, AudioMAEConfig
from apt_min.config import load_config
from apt_min.errors import MissingFileError, SettingError
from apt_min.llama import Llama, LlamaConfig
from apt_min.model import APT
from apt_min.tokenizer import Tokenizer, train_sentencepiece


def test_a_setting_that_names_one_of_a_few_ways_is_checked_before_anything_runs():
    from apt_min.config import CHOICES
    from apt_min.errors import SettingError

    for preset in ("tiny", "small", "paper"):
        load_config(preset)  # every preset's own values are among the choices
    for key, allowed in CHOICES.items():
        with pytest.raises(SettingError, match=f"--{key}='nonsense': expected one of {', '.join(allowed)}"):
            load_config("tiny", [f"--{key}=nonsense"])


def test_overrides():
    cfg = load_config("paper", ["--batch_size=2", "--grad_checkpointing=false", "--lr=3e-5"])
    assert (cfg.batch_size, cfg.grad_checkpointing, cfg.lr, cfg.num_queries) == (2, False, 3e-5, 32)
    with pytest.raises(ValueError, match="unknown setting --batchsize"):
        load_config("tiny", ["--batchsize=2"])
    with pytest.raises(ValueError, match="--grad_checkpointing: expected true or false"):
        load_config("tiny", ["--grad_checkpointing=maybe"])
    with pytest.raises(ValueError, match="unknown preset 'huge'; presets"):  # nothing close: no guess
        load_config("huge")
    for on, off in (("true", "false"), ("yes", "no"), ("1", "0"), ("on", "off"), ("True", "OFF")):
        # the small preset's own values: grad_checkpointing off, cpu_bf16 on
        cfg = load_config("small", [f"--grad-checkpointing={on}", f"--cpu-bf16={off}"])
        assert cfg.grad_checkpointing and not cfg.cpu_bf16
    assert load_config("tiny", ["--warmup-steps-0=7"]).warmup_steps_0 == 7  # dashes as in --max-new-tokens


def test_each_presets_training_chain():
    """The stages that make a preset's APT: tiny trains its stand-in LLM, small pretrains its encoder, paper does
    neither; given an encoder checkpoint, small does not pretrain one, given an LLM, tiny trains none; an aligner
    that reads the LLM's words needs the stand-in before stage 0, and says so where it is not there."""
    from apt_min.build import llm_embeddings

    assert load_config("tiny").chain() == ["0", "lm", "1", "2"]
    assert load_config("small").chain() == ["mae", "0", "1", "2"]
    assert load_config("paper").chain() == ["0", "1", "2"]
    assert load_config("small", {"encoder_checkpoint": "e.safetensors"}).chain() == ["0", "1", "2"]
    assert load_config("tiny", {"llm_path": "weights/some-llm"}).chain() == ["0", "1", "2"]
    assert load_config("tiny", {"encoder_init": "mae"}).chain() == ["mae", "0", "lm", "1", "2"]
    for words in ({"aligner_words": "llm"}, {"aligner_init": "llm"}):
        assert load_config("tiny", words).chain() == ["lm", "0", "1", "2"]
        assert load_config("small", {"aligner_words": "own", "aligner_init": "random"}).chain() == ["mae", "0", "1",
                                                                                                      "2"]
        with pytest.raises(MissingFileError, match=r"llm: no LLM there yet, and the aligner reads its words \("
                                                   r"--aligner_words or --aligner_init llm\); run `python train.py "
                                                   r"--stage lm` first"):
            llm_embeddings(load_config("tiny", {**words, "run_dir": "/nonexistent/run"}))


def test_a_mistyped_name_is_answered_with_the_closest_known_one():
    with pytest.raises(SettingError, match=r"unknown setting --stepz_0 \(did you mean --steps_0\?\); known: "):
        load_config("tiny", ["--stepz_0=3"])
    with pytest.raises(SettingError, match=r"--num_query \(did you mean --num_queries\?\)"):
        load_config("tiny", {"num_query": 3})
    with pytest.raises(SettingError, match=r"unknown preset 'tinny' \(did you mean 'tiny'\?\); presets: "):
        load_config("tinny")
    with pytest.raises(SettingError, match=r"unknown setting --qwerty; known: aligner_dropout, "):
        load_config("tiny", ["--qwerty=1"])


def test_each_setting_reaches_its_own_components_field():
    """Every size setting goes to its own component's config (the presets share numbers between components, so a
    setting passed to the wrong one would go unseen); each setting naming one of a few ways takes each of them."""
    from apt_min.config import CHOICES

    cfg = load_config("tiny", ["--target_length=256", "--encoder_dim=96", "--encoder_depth=3", "--encoder_heads=6",
                               "--output_block=-3", "--aligner_hidden=80", "--aligner_layers=5", "--aligner_heads=10",
                               "--aligner_intermediate=72", "--num_queries=7", "--aligner_dropout=0.25",
                               "--vision_dim=48", "--vision_depth=2", "--vision_heads=3", "--vision_queries=5",
                               "--llm_hidden=112", "--llm_layers=3", "--llm_heads=7", "--llm_kv_heads=1",
                               "--llm_intermediate=144"])
    e = cfg.encoder_config()
    assert (e.target_length, e.dim, e.depth, e.heads, e.output_block) == (256, 96, 3, 6, -3)
    a = cfg.aligner_config(vocab_size=300)
    assert (a.vocab_size, a.audio_dim, a.hidden_size, a.num_layers, a.num_heads, a.intermediate_size, a.num_queries,
            a.dropout) == (300, 96, 80, 5, 10, 72, 7, 0.25)
    vit, q = cfg.vision_configs(qformer_vocab=200)
    assert (vit.dim, vit.depth, vit.heads) == (48, 2, 3)
    assert (q.vocab_size, q.audio_dim, q.hidden_size, q.num_layers, q.num_heads, q.num_queries) == (
        200, 48, 80, 5, 10, 5)
    m = cfg.stand_in_llm_config(SimpleNamespace(vocab_size=300, bos_id=1, eos_id=2))
    assert (m.vocab_size, m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads,
            m.intermediate_size) == (300, 112, 3, 7, 1, 144)
    assert CHOICES == {
        "encoder_init": ("random", "mae"), "aligner_words": ("own", "llm"), "aligner_init": ("random", "llm"),
        "proj_init": ("random", "words"), "prompt_format": ("plain", "smollm2-chat", "instructblip"),
        "precision": ("auto", "bf16", "fp16", "fp32"), "fewshot_layout": ("paper", "list"),
        "fewshot_shapes": ("4x1", "mixed"), "atm_negatives": ("global", "local"), "long_audio": ("windows", "all"),
        "caption_ft_source": ("audiocaps", "clotho"), "feature_cache": ("memory", "disk", "off")}
    for key, ways in CHOICES.items():
        for way in ways:  # (proj_init=words needs the aligner to read the LLM's words)
            assert getattr(load_config("tiny", ["--aligner_words=llm", f"--{key}={way}"]), key) == way


def test_the_tiny_encoder_is_the_seeds(tmp_path):
    """Without a checkpoint, tiny's encoder is drawn from the run's seed: the same in every run of that seed."""
    from apt_min.build import build_encoder

    def encoder(run, seed):
        return build_encoder(load_config("tiny", [f"--run_dir={tmp_path / run}", f"--seed={seed}",
                                                  "--encoder_dim=32"]), "cpu", torch.float32)[0].state_dict()

    a, b, c = encoder("a", 0), encoder("b", 0), encoder("c", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


def test_settings_that_would_train_nothing_are_refused():
    """A gradient clip at or below 0 (every gradient zeroed, or turned round), caption_ft passes at or below 0 (it
    took one step whatever they said) and a vision stage with no step after its alignment steps (its projection would
    never train) are setting errors, before anything runs."""
    from apt_min.errors import SettingError

    for clip in ("0", "-1"):
        with pytest.raises(SettingError, match=f"--grad_clip={float(clip)}: expected a gradient norm above 0"):
            load_config("tiny", [f"--grad_clip={clip}"])
    for epochs in ("0", "-2", "nan"):  # caption_ft would take one step whatever that said
        with pytest.raises(SettingError, match=f"--caption_ft_epochs={float(epochs)}: expected a number of passes"):
            load_config("tiny", [f"--caption_ft_epochs={epochs}"])
    assert load_config("tiny", ["--caption_ft_epochs=0.5"]).caption_ft_epochs == 0.5
    with pytest.raises(SettingError, match="--vision_align_steps=500 with --steps_vision=500: the vision stage"):
        load_config("tiny", ["--steps_vision=500", "--vision_align_steps=500"])
    assert load_config("tiny", ["--steps_vision=501", "--vision_align_steps=500"]).steps_vision == 501
    for option in ("--save_every=0", "--log_every=0", "--grad_accum=0", "--keep_checkpoints=0", "--steps_1=0",
                   "--batch_size=0", "--grad_accum_0=-1", "--warmup_steps=-5", "--eval_every=0", "--val_batches=0",
                   *(f"--steps_{s}=0" for s in ("lm", "mae", "0", "2", "vision")), "--mae_batch_size=0",
                   "--vision_align_batch=0", "--stage0_batch_size=-1", "--warmup_steps_0=-1", "--max_clip_windows=-1",
                   "--steps_caption_ft=-1", "--warmup_steps_caption_ft=-1"):  # modulo by 0, no step, every
        with pytest.raises(SettingError, match=f"{option}: expected at least"):  # checkpoint kept, none trained
            load_config("tiny", [option])
    with pytest.raises(SettingError, match=r"--decode_threads=-2: expected -1 \(as the device suits\), 0 or more"):
        load_config("tiny", ["--decode_threads=-2"])
    assert load_config("tiny", ["--decode_threads=0", "--max_clip_windows=0"]).decode_threads == 0
    assert load_config("tiny", ["--grad_accum_0=0", "--steps_caption_ft=0"]).grad_accum_0 == 0  # 0: the default
    with pytest.raises(SettingError, match=r"--output_block=12: expected a block of the encoder's 12 \(-12 to 11;"):
        load_config("paper", ["--output_block=12"])
    assert load_config("paper", ["--output_block=-12"]).output_block == -12


def test_shapes_that_would_fail_at_the_first_forward_are_refused_before_anything_runs():
    """Heads that do not split the width, key/value heads that do not split the heads, a window that is no whole
    number of 16-frame patches and a dropout outside [0, 1) failed deep inside a reshape or a module's constructor;
    each is a setting error naming it, and every preset's own values pass."""
    from apt_min.errors import SettingError

    for option, said in (("--aligner_heads=3", "the heads split --aligner_hidden=128 evenly"),
                         ("--encoder_heads=3", "the heads split --encoder_dim=128 evenly"),
                         ("--llm_heads=5", "the heads split --llm_hidden=192 evenly"),
                         ("--vision_heads=0", "the heads split --vision_dim=128 evenly"),
                         ("--llm_kv_heads=3", "serves a whole number of the --llm_heads=4"),
                         ("--llm_hidden=196", "an even width per head"),
                         ("--target_length=500", "expected a multiple of 16"),
                         ("--aligner_dropout=1.5", "expected a probability"),
                         ("--aligner_dropout=1.0", "expected a probability")):
        with pytest.raises(SettingError, match=rf"^{option}: .*{re.escape(said)}"):
            load_config("tiny", [option])
    for preset in ("tiny", "small", "paper"):
        load_config(preset, [])
    assert load_config("tiny", ["--aligner_heads=8", "--target_length=1024"]).aligner_heads == 8


def test_a_folder_setting_that_names_a_file_is_refused(tmp_path, capsys):
    """--run_dir and --data_root name folders; a file there failed deep inside (NotADirectoryError), as did
    evaluate.py's --out."""
    import evaluate
    from apt_min.errors import SettingError

    file = tmp_path / "clip.wav"
    file.write_bytes(b"RIFF")
    for key in ("run_dir", "data_root"):
        with pytest.raises(SettingError, match=rf"^--{key}={re.escape(str(file))}: a file; expected a folder"):
            load_config("tiny", [f"--{key}={file}"])
    release = str(Path(__file__).resolve().parents[1] / "weights" / "apt-small")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    for out in (file, tmp_path / "link"):  # a file, or a link to nothing
        with pytest.raises(SystemExit, match=rf"evaluate.py: error: {re.escape(str(out))}: not a folder; the "):
            evaluate.main(["--task", "audiocaps", "--out", str(out), "--checkpoint", release, "--preset", "small"])


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
def test_evaluation_holds_the_frozen_parts_in_the_runs_precision(monkeypatch):
    """frozen_dtype: bf16 and fp16 as the precision says (fp16 was held in bf16), fp32 else; auto on a GPU: bf16
    where the card computes it natively, else fp16 (a V100 or T4, where bf16 would be emulated; train.amp_settings
    then scales the loss); fp16 on a CPU is the setting error training gives."""
    from apt_min.build import frozen_dtype
    from apt_min.errors import SettingError
    from train import amp_settings

    assert frozen_dtype(load_config("tiny", ["--precision=fp16"]), "cuda") == torch.float16
    assert frozen_dtype(load_config("tiny", ["--precision=bf16"]), "cpu") == torch.bfloat16
    assert frozen_dtype(load_config("tiny", ["--precision=fp32"]), "cuda") == torch.float32
    native = {}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",  # a V100 says True where emulation counts
                        lambda including_emulation=True: including_emulation or native["bf16"])
    native["bf16"] = True  # an A100, H100
    assert frozen_dtype(load_config("tiny", []), "cuda") == torch.bfloat16
    native["bf16"] = False  # a V100, T4
    assert frozen_dtype(load_config("tiny", []), "cuda") == torch.float16
    _, scaler, dtype = amp_settings(load_config("tiny", []), torch.device("cuda"))
    assert dtype == torch.float16 and isinstance(scaler, torch.amp.GradScaler)
    with pytest.raises(SettingError, match="--precision=fp16 needs a CUDA device"):
        frozen_dtype(load_config("tiny", ["--precision=fp16"]), "cpu")


def test_a_pth_encoders_identity_covers_the_block_it_is_read_at(tmp_path):
    """A released Audio-MAE .pth holds weights only: which block APT reads (output_block) and its shape come from
    the settings. Reading another block is another encoder: another feature-cache key and another fingerprint (which
    APT.load compares: an APT trained against the first is refused with the second). The same settings give the same
    identity."""
    from apt_min.build import build_encoder, feature_cache

    torch.save({"model": AudioMAE(AudioMAEConfig(target_length=64, dim=32, depth=2, heads=2)).state_dict()},
               tmp_path / "finetuned.pth")

    def identity(block):
        cfg = load_config("tiny", [f"--encoder_checkpoint={tmp_path / 'finetuned.pth'}", "--target_length=64",
                                   "--encoder_dim=32", "--encoder_depth=2", "--encoder_heads=2",
                                   f"--output_block={block}", f"--run_dir={tmp_path / 'run'}"])
        _, encoder_id = build_encoder(cfg, "cpu", torch.float32)
        return encoder_id, feature_cache(cfg, encoder_id).setting

    (penultimate, key), (last, other_key) = identity(-2), identity(-1)
    assert penultimate["fingerprint"] != last["fingerprint"] and key != other_key
    assert identity(-2) == (penultimate, key)


def test_grad_checkpointing_keep_reaches_the_llm_and_is_checked(tmp_path):
    """--grad_checkpointing_keep=N: the LLM the stages load keeps its last N blocks' activations; a negative N, or
    more blocks than the LLM has, is a setting error before anything trains."""
    from helpers import hf_llama

    from apt_min.build import load_llm
    from apt_min.errors import SettingError

    _, folder = hf_llama(tmp_path, shards=False)  # 3 blocks
    cfg = load_config("tiny", [f"--llm_path={folder}", "--grad_checkpointing=true", "--grad_checkpointing_keep=2"])
    llm, _ = load_llm(cfg, "cpu", torch.float32)
    assert (llm.gradient_checkpointing, llm.blocks_kept) == (True, 2)
    assert load_llm(load_config("tiny", [f"--llm_path={folder}", "--grad_checkpointing_keep=3"]), "cpu",
                    torch.float32)[0].blocks_kept == 3  # every block kept: no recomputation at all
    assert load_llm(load_config("tiny", [f"--llm_path={folder}"]), "cpu", torch.float32)[0].blocks_kept == 0
    with pytest.raises(SettingError, match=f"--grad_checkpointing_keep=4: the LLM in {folder} has 3 blocks"):
        load_llm(load_config("tiny", [f"--llm_path={folder}", "--grad_checkpointing_keep=4"]), "cpu", torch.float32)
    with pytest.raises(SettingError, match="--grad_checkpointing_keep=-1: expected a number of blocks, >= 0"):
        load_config("tiny", ["--grad_checkpointing_keep=-1"])


def test_paper_preset_fits_together_at_full_size(tmp_path):
    cfg = load_config("paper")
    train_sentencepiece(["Describe the audio clip concisely. A dog barks."] * 50, tmp_path / "tokenizer.model", 300)
    tok = Tokenizer(tmp_path)
    with torch.device("meta"):
        encoder = AudioMAE(AudioMAEConfig(target_length=cfg.target_length, dim=cfg.encoder_dim,
                                          depth=cfg.encoder_depth, heads=cfg.encoder_heads))
        llm = Llama(LlamaConfig())  # Vicuna-7B's shape
        aligner = Aligner(AlignerConfig(vocab_size=32000, audio_dim=cfg.encoder_dim, hidden_size=cfg.aligner_hidden,
                                        num_layers=cfg.aligner_layers, num_heads=cfg.aligner_heads,
                                        intermediate_size=cfg.aligner_intermediate, num_queries=cfg.num_queries))
        apt = APT(encoder, aligner, llm, tok)
        windows = torch.empty(2, cfg.target_length, 128)
        feats = encoder(windows)
        assert feats.shape == (2, 512, 768)  # 10.24 s -> 64 x 8 patches of ViT-B
        batch = [[("audio", "a.wav"), ("text", "Describe the audio clip concisely.")],
                 [("audio", "b.wav"), ("audio", "a.wav"), ("text", "Describe the audio clip concisely.")]]
        clips = {"a.wav": feats[:1], "b.wav": feats[1:]}
        x, mask, labels = apt.embed_batch(batch, clips, ["A dog barks.", "A dog barks."])
        assert x.shape[-1] == 4096 and mask.shape == labels.shape
        assert x.shape[1] == 1 + 2 * (1 + 32) + len(tok.encode("Describe the audio clip concisely.", bos=False)) + \
            len(tok.encode("A dog barks.", bos=False)) + 1
        logits = llm(inputs_embeds=x)  # (masks and logits_at need real values; the shapes are what is checked)
        assert logits.shape == (2, x.shape[1], 32000)
    trainable = sum(p.numel() for p in apt.parameters() if p.requires_grad)
    assert 10e6 < trainable < 30e6  # the aligner, its projection and <AUDIO>: a small fraction of the 7B LLM


def test_the_paper_preset_reads_as_the_paper_and_the_public_code(tmp_path):
    """Where `paper` departs from tiny and small (issue 17): the AudioSet-fine-tuned encoder, read at its penultimate
    block (§3.1); WavCaps in the caption mixture and stage 0, AudioSet's 2 M clips (§4.1, the public code's data);
    stage 0's own contrastive batch and 5 000-step warm-up (2 000 after); ATM negatives from every process
    (BLIP-2); BOS before each instruction, as before every stage-0 text; a long clip read whole (§3.1; in training
    at most 3 windows of it, ours); the real labels only in few-shot episodes; two caption fine-tuning epochs
    (§4.2)."""
    cfg, tiny = load_config("paper"), load_config("tiny")
    assert cfg.encoder_checkpoint.endswith("audiomae/finetuned.pth") and cfg.output_block == -2
    assert cfg.caption_sources.split(",")[:2] == ["audiocaps", "clotho"] and cfg.caption_sources.count("wavcaps:") == 4
    assert cfg.stage0_sources.startswith("tagging,wavcaps:") and cfg.tagging_sources == "balanced,unbalanced"
    assert (cfg.stage0_batch_size, cfg.warmup_steps_0, cfg.warmup_steps) == (128, 5000, 2000)
    assert (cfg.atm_negatives, cfg.instruction_bos, cfg.long_audio, cfg.fewshot_made_up) == ("global", True, "all", 0)
    assert cfg.max_clip_windows == 3 and tiny.max_clip_windows == 0  # training: at most 30.72 s of a clip (ours)
    assert (cfg.caption_ft_epochs, cfg.caption_ft_source) == (2.0, "audiocaps")
    # the shapes: Audio-MAE ViT-B/16 on 10.24 s (768 wide, 12 blocks of 12 heads); the aligner BERT-mini sized (4
    # layers, 256 wide, 4 heads), 32 queries; Vicuna-7B; the recipe: peak lr 1e-4 after 2 000 warm-up steps, the
    # public code's batch of 8 x 4 accumulated
    assert (cfg.target_length, cfg.encoder_dim, cfg.encoder_depth, cfg.encoder_heads) == (1024, 768, 12, 12)
    assert (cfg.aligner_layers, cfg.aligner_hidden, cfg.aligner_heads, cfg.aligner_intermediate) == (4, 256, 4, 1024)
    assert (cfg.num_queries, cfg.llm_path, cfg.lr, cfg.batch_size, cfg.grad_accum) == (
        32, "weights/vicuna-7b-v1.1", 1e-4, 8, 4)
    assert (cfg.weight_decay, cfg.min_lr_ratio, cfg.grad_clip) == (0.05, 0.1, 1.0)  # AdamW's decay; cosine down to
    # 0.1 x the peak; gradients clipped to norm 1
    # tiny and small keep what their committed results were trained with
    assert (tiny.instruction_bos, tiny.long_audio, tiny.caption_sources) == (False, "windows", "audiocaps,clotho")


def test_an_untrained_apt_from_a_config_alone(tmp_path):
    """build.untrained_apt needs no file and no synthetic data: every part takes its sizes from the config, the
    same seed gives the same weights, and only the aligner, the projection and <AUDIO> train."""
    from apt_min.build import untrained_apt

    train_sentencepiece(["A dog barks twice.", "Describe the audio clip concisely.", "Rain falls on a roof."] * 50,
                        tmp_path / "tokenizer.model", 300)  # byte fallback alone takes 259 ids
    tok = Tokenizer(tmp_path)
    cfg = load_config("tiny", {"llm_hidden": 64, "llm_layers": 2, "aligner_layers": 2, "num_queries": 8})
    apt = untrained_apt(cfg, tok)
    e, a, m = apt.encoder.config, apt.aligner.config, apt.llm.config
    assert (e.target_length, e.dim, e.depth, e.heads, e.output_block) == (512, 128, 2, 4, -2)  # the tiny preset's
    assert (a.vocab_size, a.audio_dim, a.hidden_size, a.num_layers, a.num_heads, a.intermediate_size, a.num_queries,
            a.dropout) == (tok.vocab_size, 128, 128, 2, 4, 512, 8, 0.1) and len(apt.aligner.layers) == 2
    assert (m.vocab_size, m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads,
            m.intermediate_size, m.bos_token_id, m.eos_token_id) == (tok.vocab_size, 64, 2, 4, 2, 512, 1, 2)
    assert apt.aligner.query_tokens.shape == (1, 8, cfg.aligner_hidden)
    assert apt.proj.weight.shape == (64, cfg.aligner_hidden)
    trainable = {k.split(".")[0] for k, p in apt.named_parameters() if p.requires_grad}
    assert trainable == {"aligner", "proj", "audio_token"}
    again = untrained_apt(cfg, tok)
    assert all(torch.equal(a, b) for a, b in zip(apt.state_dict().values(), again.state_dict().values()))
    feats = {"a.wav": apt.encoder(torch.randn(1, cfg.target_length, 128))}
    x, mask, _ = apt.embed_batch([[("audio", "a.wav"), ("text", "Describe the audio clip concisely.")]], feats)
    assert x.shape == (1, 1 + 1 + 8 + len(tok.encode("Describe the audio clip concisely.", bos=False)), 64)
    cfg.prompt_format = "smollm2-chat"
    assert untrained_apt(cfg, tok).prompt_format == "smollm2-chat"


def test_the_data_a_run_makes_follow_its_synth_seed_and_train_split(tmp_path, monkeypatch):
    """The synthetic benchmark and the audio-visual set beside it are drawn with --synth_seed, not the run's --seed
    (several training seeds share one test set), at --synth_scale; the tiny tokenizer learns from the train split's
    corpus only (never the test split's text) at --llm_vocab."""
    from apt_min import build, synth, synth_av

    made = []
    monkeypatch.setattr(synth, "generate", lambda out, seed, scale: made.append(("synth", seed, scale)))
    monkeypatch.setattr(synth_av, "generate", lambda out, seed, videos, pictures: made.append(("av", seed, videos)))
    build.ensure_av_data(load_config("tiny", [f"--data_root={tmp_path / 'synth'}", "--seed=5", "--synth_seed=1",
                                              "--synth_scale=0.1"]))
    assert made == [("synth", 1, 0.1), ("av", 1, 30)]
    read, trained = [], []
    monkeypatch.setattr(synth, "lm_corpus", lambda root, split, seed: read.append((split, seed)) or [["a b"]])
    monkeypatch.setattr(build, "train_sentencepiece", lambda pieces, path, vocab: trained.append((list(pieces), vocab)))
    monkeypatch.setattr(build, "Tokenizer", lambda folder: folder)
    (tmp_path / "run" / "llm").mkdir(parents=True)
    build.ensure_tokenizer(load_config("tiny", [f"--run_dir={tmp_path / 'run'}", "--seed=3", "--llm_vocab=300"]))
    assert read == [("train", 3)] and trained == [(["a b"], 300)]


def test_settings_are_read_whole_and_checked_at_both_ends():
    """A value may hold "=" itself (task_ratios); an option without its leading "--" is refused as one (not read from
    its third character on); a number that is not the setting's type is a setting error naming it; each range check
    refuses its lower end too: a block before the encoder's first, negative alignment steps or dropout, no key/value
    head, a window of no patch."""
    from apt_min.errors import SettingError

    assert load_config("tiny", ["--task_ratios=aqa=0.3,nlar=1"]).task_ratios == "aqa=0.3,nlar=1"
    for option in ("xxlr=1e-4", "lr=1e-4"):
        with pytest.raises(SettingError, match=f"expected --key=value, got '{option}'"):
            load_config("tiny", [option])
    with pytest.raises(SettingError, match=r"^--batch_size: expected int, got '2.5'$"):
        load_config("tiny", ["--batch_size=2.5"])
    with pytest.raises(SettingError, match=r"^--output_block=-13: expected a block of the encoder's 12 \(-12 to 11"):
        load_config("paper", ["--output_block=-13"])
    for option, said in (("--vision_align_steps=-1", "the vision stage needs steps"),
                         ("--aligner_dropout=-0.1", "expected a probability"),
                         ("--llm_kv_heads=0", "expected a divisor of it"),
                         ("--target_length=0", "expected a multiple of 16")):
        with pytest.raises(SettingError, match=rf"^{option}[: ].*{re.escape(said)}"):
            load_config("tiny", [option])
    # rotary positions need an even width per head, nothing more: 24 wide in 4 heads is 6 a head
    assert load_config("tiny", ["--llm_hidden=24", "--llm_heads=4"]).llm_hidden == 24


def test_the_visual_side_and_the_word_source_follow_the_settings():
    """The visual aligner takes the audio aligner's feed-forward width and dropout (only its queries and input differ),
    reads the frozen ViT through InstructBLIP's 1e-6 post-layernorm eps, over a ViT whose MLP is 4x its width (ViT's);
    the aligner reads the LLM's word table only with aligner_words=llm."""
    cfg = load_config("tiny", ["--aligner_intermediate=72", "--aligner_dropout=0.25", "--vision_dim=48",
                               "--vision_heads=3"])
    vit, q = cfg.vision_configs(qformer_vocab=200)
    assert (vit.hidden, q.intermediate_size, q.dropout, q.input_norm_eps) == (4 * 48, 72, 0.25, 1e-6)
    assert load_config("tiny").aligner_config(300, llm_dim=64).llm_words == 0
    assert load_config("tiny", ["--aligner_words=llm"]).aligner_config(300, llm_dim=64).llm_words == 64


def test_each_stage_writes_where_the_readme_says_and_starts_from_the_one_before():
    """README: a stage's result in {run_dir}/stage<N>/final/, the stand-in LLM's log in llm-train/, caption
    fine-tuning in caption_ft-{source}/ (README's runs/paper/caption_ft-audiocaps/final); the chain 0 -> 1 -> 2 ->
    caption_ft (DESIGN §3; §4.2 fine-tunes the multi-task APT of stage 2)."""
    from apt_min.config import STARTS_AFTER, stage_folder

    cfg = load_config("tiny", ["--run_dir=runs/x", "--caption_ft_source=clotho"])
    assert [cfg.stage_dir(s) for s in ("0", "2", "lm", "caption_ft")] == [
        Path("runs/x/stage0"), Path("runs/x/stage2"), Path("runs/x/llm-train"), Path("runs/x/caption_ft-clotho")]
    assert stage_folder("caption_ft", "audiocaps") == "caption_ft-audiocaps"
    assert STARTS_AFTER == {"1": "0", "2": "1", "caption_ft": "2"}


def test_the_paper_presets_other_choices_read_as_documented():
    """docs/choices.md: ten AVQA frames (the public code: one a second of a 10 s clip), plain prompts (the paper's,
    for Vicuna), 4-way 1-shot episodes laid out as the paper's; README: InstructBLIP-Vicuna-7B in
    weights/instructblip-vicuna-7b/; WavCaps's four subsets as its release names them (data.LAYOUT); real data, not the
    synthetic benchmark's folder; gradient checkpointing on (how 7B trains on one card); Audio-MAE's 80 % mask
    (README, mae.py)."""
    from apt_min import data
    from apt_min.config import WAVCAPS

    cfg, tiny = load_config("paper"), load_config("tiny")
    assert (cfg.avqa_frames, cfg.prompt_format, cfg.fewshot_shapes, cfg.fewshot_layout) == (10, "plain", "4x1", "paper")
    assert cfg.vision_path == "weights/instructblip-vicuna-7b"
    assert sorted(s.removeprefix("wavcaps:") for s in WAVCAPS.split(",")) == sorted(data.LAYOUT["wavcaps"]["names"])
    assert not cfg.synthetic_data and cfg.data_root != tiny.data_root
    assert cfg.grad_checkpointing and not tiny.grad_checkpointing
    assert cfg.mask_ratio == tiny.mask_ratio == 0.8


def test_a_runs_own_encoder_is_kept_in_the_dtype_asked_and_never_made_where_it_should_be_there(tmp_path, caplog):
    """build_encoder: the encoder in the dtype asked; a run's encoder, once saved, is the run's: another
    --encoder_dim is named in a warning and not used; create=False (evaluation) is an error where the run has none,
    and makes none."""
    import logging

    from apt_min.build import build_encoder

    run = tmp_path / "run"
    cfg = load_config("tiny", [f"--run_dir={run}", "--encoder_dim=32"])
    with pytest.raises(MissingFileError, match=r"encoder.safetensors: the tiny preset's encoder is not there; run "):
        build_encoder(cfg, "cpu", torch.float32, create=False)
    assert not (run / "encoder.safetensors").exists()
    encoder, _ = build_encoder(cfg, "cpu", torch.bfloat16)
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
    with caplog.at_level(logging.WARNING):
        encoder, _ = build_encoder(load_config("tiny", [f"--run_dir={run}", "--encoder_dim=64"]), "cpu", torch.float32)
    assert encoder.config.dim == 32
    assert f"{run / 'encoder.safetensors'} was built with dim=32; the settings' dim=64 are not used" in caplog.text


def test_the_llm_folder_is_checked_and_known_by_its_weights(tmp_path):
    """load_llm: no LLM yet says how to get one (the stand-in: --stage lm; a --llm_path: download it); the LLM's
    fingerprint covers its weights, not only its config."""
    from helpers import hf_llama

    from apt_min.build import load_llm

    with pytest.raises(MissingFileError, match=r"no LLM there yet; run `python train.py --stage lm` first"):
        load_llm(load_config("tiny", [f"--run_dir={tmp_path / 'run'}"]), "cpu", torch.float32)
    with pytest.raises(MissingFileError, match=r"no LLM there yet; download it \(Hugging Face layout\) into that "
                                               r"folder$"):
        load_llm(load_config("tiny", [f"--llm_path={tmp_path}"]), "cpu", torch.float32)
    ids = [load_llm(load_config("tiny", [f"--llm_path={hf_llama(tmp_path / str(seed), seed=seed, shards=False)[1]}"]),
                    "cpu", torch.float32)[1]["fingerprint"] for seed in (0, 1)]
    assert ids[0] != ids[1]  # the same config.json, other weights


def test_the_tokenizer_of_a_given_llm_is_read_never_trained(tmp_path, monkeypatch, caplog):
    """--llm_path: its tokenizer.model or tokenizer.json (SmolLM2's) is read; none there is an error, not a
    tokenizer trained into the user's folder; the stand-in's llm_vocab is not named against it (it is ignored where
    llm_path names a model)."""
    import logging

    from apt_min import build

    monkeypatch.setattr(build, "train_sentencepiece", lambda *a: pytest.fail("a tokenizer was trained"))
    monkeypatch.setattr(build, "Tokenizer", lambda folder: folder)
    with pytest.raises(MissingFileError, match=r"no tokenizer.model or tokenizer.json; download the LLM \(Hugging "
                                               r"Face layout\) into it, or point --llm_path at the LLM's folder"):
        build.ensure_tokenizer(load_config("tiny", [f"--llm_path={tmp_path}"]))
    (tmp_path / "tokenizer.json").write_text("{}")
    assert build.ensure_tokenizer(load_config("tiny", [f"--llm_path={tmp_path}"])) == tmp_path
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"")
    (tmp_path / "tokenizer_settings.json").write_text('{"llm_vocab": 300}')  # a run's llm/ folder, given as llm_path
    with caplog.at_level(logging.WARNING):
        build.ensure_tokenizer(load_config("tiny", [f"--llm_path={tmp_path}", "--llm_vocab=500"]))
    assert "not used" not in caplog.text


def test_only_the_synthetic_presets_write_data_and_never_over_real_data(tmp_path, monkeypatch):
    """ensure_data / ensure_av_data: the paper preset reads data, never generates any; a folder of real data under a
    synthetic preset's --data_root is read as it is (no benchmark written over it, no error); the audio-visual set's
    pictures follow --synth_scale (200 at scale 1, at least 8)."""
    from apt_min import build, synth, synth_av

    made = []
    monkeypatch.setattr(synth, "generate", lambda out, seed, scale: made.append(("synth", scale)))
    monkeypatch.setattr(synth_av, "generate", lambda out, seed, videos, pictures: made.append(("av", videos, pictures)))
    build.ensure_av_data(load_config("paper", [f"--data_root={tmp_path / 'empty'}"]))
    assert made == []
    real = tmp_path / "real"
    real.mkdir()
    (real / "audiocaps").mkdir()
    build.ensure_av_data(load_config("tiny", [f"--data_root={real}"]))
    assert made == []
    build.ensure_av_data(load_config("tiny", [f"--data_root={tmp_path / 'a'}", "--synth_scale=0.1"]))
    build.ensure_av_data(load_config("tiny", [f"--data_root={tmp_path / 'b'}", "--synth_scale=0.01"]))
    assert made == [("synth", 0.1), ("av", 30, 20), ("synth", 0.01), ("av", 8, 8)]


def test_a_trained_aligners_every_size_is_named_against_the_settings(caplog):
    """name_unused_aligner_sizes: each of the five sizes stage 0 fixes (width, layers, heads, feed-forward, queries)
    that the settings ask otherwise is named."""
    import logging

    from apt_min.build import name_unused_aligner_sizes

    aligner = SimpleNamespace(config=AlignerConfig(vocab_size=10, hidden_size=64, num_layers=3, num_heads=2,
                                                   intermediate_size=96, num_queries=5))
    with caplog.at_level(logging.WARNING):
        name_unused_aligner_sizes(load_config("tiny"), aligner, "ckpt")
    assert ("ckpt holds an aligner of aligner_hidden=64, aligner_layers=3, aligner_heads=2, aligner_intermediate=96, "
            "num_queries=5; the settings' aligner_hidden=128, aligner_layers=2, aligner_heads=4, "
            "aligner_intermediate=512, num_queries=16 are not used") in caplog.text


def test_the_llms_words_are_reduced_to_their_top_principal_directions():
    """llm_pca_map on a table whose spread is known by hand: words spread 4, 3, 2, 1 along the first four axes (the
    rest constant 5): a width of 2 keeps the two widest axes, widest first, centred, scaled to std 0.02."""
    from apt_min.build import llm_pca_map

    torch.manual_seed(0)
    n = 4000
    table = torch.full((n, 6), 5.0)
    table[:, :4] = torch.randn(n, 4) * torch.tensor([4.0, 3.0, 2.0, 1.0]) + 7.0
    weight, bias = llm_pca_map(table, 2)
    reduced = table @ weight.T + bias
    assert reduced.mean(0).abs().max() < 1e-4  # centred
    assert abs(reduced.std().item() - 0.02) < 1e-4
    directions = weight / weight.norm(dim=1, keepdim=True)
    assert torch.allclose(directions.abs(), torch.eye(6)[:2], atol=0.05)  # axis 0 (spread 4), then axis 1 (3)
    assert reduced[:, 0].std() > 1.2 * reduced[:, 1].std()
    with pytest.raises(ValueError, match="the aligner is 7 wide, wider than the LLM's embeddings"):
        llm_pca_map(table, 7)


def test_the_cpu_bf16_probe_is_fp32s_best_time_over_bf16s(monkeypatch):
    """cpu_bf16_speedup: how much faster bf16 multiplies than fp32, each timed by its best run after a warm-up: on a
    clock where fp32's best timed product takes 3 and bf16's 1, 3x (fp32's untimed warm-up the quickest of all, bf16's
    the slowest)."""
    from apt_min import build

    clock = [0.0]
    takes = {torch.float32: iter([1, 4, 3, 5, 3, 6]), torch.bfloat16: iter([9, 2, 1, 7, 1, 1])}

    def product(a, b):
        clock[0] += next(takes[a.dtype])
        return a  # nothing computed

    monkeypatch.setattr(torch.Tensor, "__matmul__", product)
    monkeypatch.setattr(build, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    build.cpu_bf16_speedup.cache_clear()
    try:
        assert build.cpu_bf16_speedup(8) == 3.0
    finally:
        build.cpu_bf16_speedup.cache_clear()


def test_each_entry_points_help_shows_its_whole_docstring(capsys):
    """--help prints the script's docstring whole, laid out as written (its example commands on their own lines),
    not a first line cut at its wrap."""
    import evaluate
    import train
    from apt_min import __main__ as cli

    for main, doc in ((train.main, train.__doc__), (evaluate.main, evaluate.__doc__),
                      (lambda argv: cli.main(["ask", *argv]), cli.__doc__)):
        with pytest.raises(SystemExit) as done:
            main(["--help"])
        assert done.value.code == 0
        shown = capsys.readouterr().out
        for line in doc.strip().splitlines():
            assert line in shown, line


SCRIPTS = sorted(f"benchmarks.{p.stem}" for p in (Path(__file__).parents[1] / "benchmarks").glob("*.py")
                 if p.stem not in ("__init__", "common")) + [f"apt_min.{m}" for m in ("audiomae", "release", "synth",
                                                                                     "synth_av", "weights")]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_scripts_help_says_what_it_does_and_runs_nothing_else(name, monkeypatch, capsys):
    """Each benchmark and module script answers --help with its docstring, laid out as written, and does nothing
    more (a script that took --help as a folder name, or ran its benchmark, would not)."""
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))  # as when run: `from common import`
    module = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [f"{name.split('.')[1]}.py", "--help"])
    with pytest.raises(SystemExit) as done:
        module.main()
    assert done.value.code == 0
    doc = module.main.__doc__ if name == "apt_min.audiomae" else module.__doc__
    shown = capsys.readouterr().out
    assert all(line in shown for line in doc.strip().splitlines()[:3]), shown

"""The presets: overrides are type-checked, and the paper preset's parts fit together at full size (on the meta
device: shapes only, no memory, no download)."""

import pytest
import torch

from apt_min.aligner import Aligner, AlignerConfig
from apt_min.audiomae import AudioMAE, AudioMAEConfig
from apt_min.config import load_config
from apt_min.llama import Llama, LlamaConfig
from apt_min.model import APT
from apt_min.tokenizer import Tokenizer, train_sentencepiece


def test_overrides():
    cfg = load_config("paper", ["--batch_size=2", "--grad_checkpointing=false", "--lr=3e-5"])
    assert (cfg.batch_size, cfg.grad_checkpointing, cfg.lr, cfg.num_queries) == (2, False, 3e-5, 32)
    with pytest.raises(ValueError, match="unknown setting --batchsize"):
        load_config("tiny", ["--batchsize=2"])
    with pytest.raises(ValueError, match="--grad_checkpointing: expected true or false"):
        load_config("tiny", ["--grad_checkpointing=maybe"])
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        load_config("huge")


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

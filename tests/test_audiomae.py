"""The Audio-MAE encoder against transformers' ViTModel, and loading released-format checkpoints."""

import argparse
import math
import re

import pytest
import torch

from apt_min.audiomae import AudioMAE, AudioMAEConfig, sincos_position_table
from apt_min.checkpoint import CheckpointError

SMALL = dict(dim=64, depth=3, heads=4)  # paper grid (1024 x 128 -> 64 x 8 patches), narrow and shallow

# our key -> transformers ViTModel key (transformers 5.x names); {} is the block index; qkv is split in three below
TO_HF = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "blocks.{}.norm1.weight": "layers.{}.layernorm_before.weight",
    "blocks.{}.norm1.bias": "layers.{}.layernorm_before.bias",
    "blocks.{}.attn.proj.weight": "layers.{}.attention.o_proj.weight",
    "blocks.{}.attn.proj.bias": "layers.{}.attention.o_proj.bias",
    "blocks.{}.norm2.weight": "layers.{}.layernorm_after.weight",
    "blocks.{}.norm2.bias": "layers.{}.layernorm_after.bias",
    "blocks.{}.mlp.fc1.weight": "layers.{}.mlp.fc1.weight",
    "blocks.{}.mlp.fc1.bias": "layers.{}.mlp.fc1.bias",
    "blocks.{}.mlp.fc2.weight": "layers.{}.mlp.fc2.weight",
    "blocks.{}.mlp.fc2.bias": "layers.{}.mlp.fc2.bias",
}


def random_encoder(**kw):
    model = AudioMAE(AudioMAEConfig(**{**SMALL, **kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 / math.sqrt(p[0].numel())) if p.dim() > 1 else p.normal_(0, 0.1)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                p.add_(1.0)
        model.pos_embed.normal_(0, 0.1)  # a checkpoint's table is read as stored: every row matters (CLS's too)
    return model


def run_to_release(tmp_path, state: dict, meta: dict | None = None, **settings):
    """A run folder as training leaves it for apt_min.release: a random encoder (3 blocks, the penultimate read) at
    run/encoder.safetensors, `state` as stage 2's APT weights and an apt.json that records the encoder as training
    does, with `meta` beside it; returns the encoder, the run, its stage-2 folder, the settings and the record."""
    import json

    from safetensors.torch import save_file

    from apt_min.build import build_encoder
    from apt_min.config import load_config

    model = random_encoder()
    c = model.config
    run = tmp_path / "run"
    final = run / "stage2" / "final"
    final.mkdir(parents=True)
    model.save(run / "encoder.safetensors")
    save_file(state, str(final / "apt.safetensors"))
    settings = {"preset": "tiny", "run_dir": str(run), **settings, "encoder_dim": c.dim, "encoder_depth": c.depth,
                "encoder_heads": c.heads, "target_length": c.target_length}
    _, named = build_encoder(load_config("tiny", settings), "cpu", torch.float32)  # as training records it
    (final / "apt.json").write_text(json.dumps({"stage": "2", "aligner": {}, "llm": {}, "encoder": named,
                                                **(meta or {}), "config": settings}))
    return model, run, final, settings, named


def to_hf(model):
    from transformers import ViTConfig, ViTModel

    c = model.config
    hf = ViTModel(ViTConfig(hidden_size=c.dim, num_hidden_layers=c.depth, num_attention_heads=c.heads,
                            intermediate_size=int(c.dim * c.mlp_ratio), image_size=(c.target_length, c.num_mel_bins),
                            patch_size=c.patch_size, num_channels=1, layer_norm_eps=1e-6, qkv_bias=True,
                            hidden_act="gelu"), add_pooling_layer=False).eval()
    ours = model.state_dict()
    theirs = {"layernorm.weight": torch.ones(c.dim), "layernorm.bias": torch.zeros(c.dim)}  # final norm: unused
    for i in range(c.depth):
        for kind in ("weight", "bias"):
            q, k, v = ours[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)  # fused rows: queries, keys, values
            theirs |= {f"layers.{i}.attention.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v))}
    for src, dst in TO_HF.items():
        for i in range(c.depth) if "{}" in src else [None]:
            theirs[dst.format(i)] = ours[src.format(i)]
    hf.load_state_dict(theirs, strict=True)
    return hf


# Errors relative to the output's scale (max |ref| 6.6-9.2). float64 is where exactness is checked: measured
# <= 5.8e-16; 1e-12 leaves a wide margin and still catches, e.g., LayerNorm's eps at 1e-5 instead of 1e-6 (~5e-6).
# float32 is the dtype in use: measured 0 here (the same kernels run), while float32 rounding alone is 4.5e-7 of the
# scale against float64, so 1e-5 holds on a CPU whose kernels round differently.
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("output_block", [-2, -1, 0])
def test_matches_transformers_vit(output_block, dtype, rtol):
    model = random_encoder(output_block=output_block)
    hf = to_hf(model)
    model, hf = model.to(dtype), hf.to(dtype)
    fbank = torch.randn(2, 1024, 128, dtype=dtype)
    with torch.no_grad():
        ours = model(fbank)  # (2, 512, 64)
        ref = hf(fbank[:, None], output_hidden_states=True).hidden_states[output_block % 3 + 1][:, 1:]
    assert ours.shape == (2, 512, 64) and ours.dtype == dtype
    error = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert error <= rtol, error


def test_position_table_layout():
    """Checked in float64 against the stored float32 table: rounding to float32 moves a value in [-1, 1] by at most
    2^-25, so 2^-24 is a 2x margin; frequencies off by 5e-7 of their value (base 10000.01) already fail."""
    cfg = AudioMAEConfig(dim=8)  # grid (64 time, 8 freq); 2 frequencies per sin/cos half
    table = sincos_position_table(cfg)
    assert table.shape == (513, 8) and table.dtype == torch.float32 and torch.all(table[0] == 0)
    omega = torch.tensor([1.0, 0.01], dtype=torch.float64)  # 10000 ** (-i / 2)
    for k in (0, 7, 8, 100, 511):  # row 1 + k encodes (k mod 64, k div 64), the released models' layout
        a, b = k % 64, k // 64
        expected = torch.cat([torch.sin(a * omega), torch.cos(a * omega), torch.sin(b * omega), torch.cos(b * omega)])
        assert (table[1 + k].double() - expected).abs().max().item() <= 2.0**-24, k
    # at ViT-B's width (192 frequencies 10000^(-i/192) per quarter) too: computed in float64 and rounded once, as
    # Audio-MAE's numpy table is (angles up to 63 rad: float32 frequencies would be off by some 4e-6)
    table = sincos_position_table(AudioMAEConfig()).double()
    omega = 10000.0 ** (-torch.arange(192, dtype=torch.float64) / 192)
    for k in (1, 63, 64, 300, 511):
        a, b = k % 64, k // 64
        expected = torch.cat([torch.sin(a * omega), torch.cos(a * omega), torch.sin(b * omega), torch.cos(b * omega)])
        assert (table[1 + k] - expected).abs().max().item() <= 2.0**-24, k


def test_other_grids():
    model = random_encoder(target_length=512, num_mel_bins=64)
    assert model.num_patches == 32 * 4 and model.pos_embed.shape == (1, 129, 64)
    assert model(torch.randn(1, 512, 64)).shape == (1, 128, 64)
    with pytest.raises(ValueError, match=r"expected fbank windows of shape \(B, 512, 64\)"):
        model(torch.randn(1, 1024, 128))
    with pytest.raises(ValueError, match=r"expected fbank windows of shape \(B, 512, 64\)"):
        model(torch.randn(1, 520, 64))  # half a patch too long: the patching would drop the last 8 frames unsaid
    with pytest.raises(ValueError, match=r"expected fbank windows of shape \(B, 512, 64\), got \(1, 512, 72\)"):
        model(torch.randn(1, 512, 72))  # half a patch too many bins, likewise
    # the MLP's width is dim x mlp_ratio, whatever the ratio
    wide = AudioMAE(AudioMAEConfig(dim=32, depth=1, heads=2, mlp_ratio=2.5, output_block=0)).blocks[0].mlp
    assert (wide.fc1.out_features, wide.fc2.in_features) == (80, 80)


def test_the_default_is_audio_maes_vit_b_over_10_s():
    """AudioMAEConfig() is the released encoder's shape (ViT-B/16 over 1024 x 128 fbank frames): the converter
    (`python -m apt_min.audiomae`) reads a .pth with it, and heads, unlike depth or width, leave every weight's shape
    unchanged, so a wrong count would load without complaint."""
    cfg = AudioMAEConfig()
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.hidden) == (768, 12, 12, 4.0, 3072)
    assert (cfg.target_length, cfg.num_mel_bins, cfg.patch_size, cfg.grid) == (1024, 128, 16, (64, 8))
    for bad in (dict(num_mel_bins=120), dict(target_length=1000)):
        with pytest.raises(ValueError, match="must be multiples of patch_size=16"):
            AudioMAE(AudioMAEConfig(**SMALL, **bad))


def test_output_block_must_be_one_of_the_blocks():
    for block in (-3, -1, 0, 2):
        assert AudioMAE(AudioMAEConfig(dim=32, depth=3, heads=2, output_block=block)).config.output_block == block
    for block in (-4, 3):
        with pytest.raises(ValueError, match=f"output_block={block} is outside the 3 blocks"):
            AudioMAE(AudioMAEConfig(dim=32, depth=3, heads=2, output_block=block))


def test_initialisation_is_audio_maes():
    """A fresh encoder (the tiny preset's) starts as Audio-MAE's: Xavier-uniform matrices (the patch projection as a
    matrix), zero biases, CLS drawn with std 0.02, LayerNorms at identity."""
    torch.manual_seed(0)
    model = AudioMAE(AudioMAEConfig(dim=256, depth=2, heads=4))
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert not p.any(), name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name != "cls_token":
            w = p.reshape(p.shape[0], -1)
            bound = math.sqrt(6 / sum(w.shape))
            assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), name
    assert model.cls_token.std().item() == pytest.approx(0.02, rel=0.2)


def test_frozen():
    model = random_encoder()
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def released_checkpoint(model, path, extra=True):
    """A file shaped like Audio-MAE's finetuned.pth / pretrained.pth: tensors under "model", plus the keys APT
    drops and the training-arguments Namespace these checkpoints carry."""
    state = dict(model.state_dict())
    if extra:
        c = model.config
        state |= {"head.weight": torch.randn(527, c.dim), "head.bias": torch.zeros(527),
                  "fc_norm.weight": torch.ones(c.dim), "fc_norm.bias": torch.zeros(c.dim),
                  "norm.weight": torch.ones(c.dim), "norm.bias": torch.zeros(c.dim),
                  "mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, c.dim),
                  "decoder_blocks.0.attn.qkv.weight": torch.randn(96, 32)}
    torch.save({"model": state, "epoch": 32, "args": argparse.Namespace(model="vit_base_patch16")}, path)
    return path


def test_released_checkpoint_loads_strictly(tmp_path):
    model = random_encoder()
    cfg = model.config
    loaded = AudioMAE.from_checkpoint(released_checkpoint(model, tmp_path / "finetuned.pth"), cfg)
    fbank = torch.randn(1, 1024, 128)
    assert torch.equal(loaded(fbank), model(fbank))
    # the converter: one safetensors file that carries its config; no pickle on later loads
    loaded.save(tmp_path / "encoder.safetensors")
    again = AudioMAE.from_checkpoint(tmp_path / "encoder.safetensors")
    assert again.config == cfg and torch.equal(again(fbank), model(fbank))


def test_missing_key_is_named(tmp_path):
    model = random_encoder()
    path = released_checkpoint(model, tmp_path / "ck.pth")
    ck = torch.load(path, weights_only=False)
    del ck["model"]["blocks.1.attn.qkv.bias"]
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match=r"ck.pth.*missing keys: blocks\.1\.attn\.qkv\.bias"):
        AudioMAE.from_checkpoint(path, model.config)


def test_unexpected_and_misshaped_keys_are_named(tmp_path):
    model = random_encoder()
    path = released_checkpoint(model, tmp_path / "ck.pth")
    ck = torch.load(path, weights_only=False)
    ck["model"]["blocks.0.attn.rel_pos"] = torch.zeros(3)
    ck["model"]["blocks.0.attn.q_norm.weight"] = torch.ones(16)  # a ViT with normed queries is not Audio-MAE's
    ck["model"]["blocks.2.mlp.fc1.weight"] = torch.zeros(10, 64)
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.0\.attn\.q_norm\.weight, "
                                              r"blocks\.0\.attn\.rel_pos.*wrong shapes: "
                                              r"blocks\.2\.mlp\.fc1\.weight in ck.pth: expected \(256, 64\)"):
        AudioMAE.from_checkpoint(path, model.config)


def test_pickle_with_an_arbitrary_object_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would run on load",))

    torch.save({"model": {"cls_token": torch.zeros(1)}, "hook": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth: cannot be read as a weights-only torch checkpoint"):
        AudioMAE.from_checkpoint(tmp_path / "evil.pth")


def test_a_git_lfs_pointer_and_the_converters_mistakes_are_named(tmp_path, monkeypatch):
    """A repository cloned without its LFS files leaves pointers where the weights should be: named as such. The
    converters' command lines end in one line naming the file, not a traceback."""
    import sys

    from apt_min import audiomae, release

    (tmp_path / "finetuned.pth").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    with pytest.raises(CheckpointError, match="finetuned.pth: a Git LFS pointer, not the weights"):
        AudioMAE.from_checkpoint(tmp_path / "finetuned.pth")
    monkeypatch.setattr(sys, "argv", ["audiomae", str(tmp_path / "finetuned.pth"), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="python -m apt_min.audiomae: error: .*finetuned.pth: a Git LFS pointer"):
        audiomae.main()
    with pytest.raises(SystemExit, match="python -m apt_min.release: error: .*no-run/stage2/final: no trained APT"):
        release.main([str(tmp_path / "no-run"), str(tmp_path / "out")])


def test_the_converter_writes_the_released_encoder_with_its_settings(tmp_path, monkeypatch, capsys):
    """`python -m apt_min.audiomae IN.pth OUT.safetensors` reads the .pth with AudioMAEConfig()'s settings (the
    released encoder's; here its sizes shrunk to SMALL, nothing else changed) and writes them with the weights: the
    paper's penultimate block (-2), every tensor as read."""
    import dataclasses
    import sys

    from apt_min import audiomae

    model = random_encoder()
    released_checkpoint(model, tmp_path / "finetuned.pth")
    read = AudioMAE.from_checkpoint
    monkeypatch.setattr(AudioMAE, "from_checkpoint", lambda path, cfg=None: read(
        path, dataclasses.replace(cfg or AudioMAEConfig(), **SMALL)))
    monkeypatch.setattr(sys, "argv", ["audiomae", str(tmp_path / "finetuned.pth"), str(tmp_path / "enc.safetensors")])
    audiomae.main()
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'enc.safetensors'}"
    monkeypatch.setattr(sys, "argv", ["audiomae", "--help"])  # its help says what it does: main's docstring
    with pytest.raises(SystemExit):
        audiomae.main()
    assert "IN.pth OUT.safetensors: convert a released checkpoint once." in " ".join(capsys.readouterr().out.split())
    back = read(tmp_path / "enc.safetensors")
    assert back.config == AudioMAEConfig(**SMALL) and back.config.output_block == -2
    for key, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nothing.pth: no such checkpoint file"):
        AudioMAE.from_checkpoint(tmp_path / "nothing.pth")


def test_half_precision_forward():
    """A bf16 encoder (the float input is cast to its dtype) must give the fp32 encoder's output to within bf16's
    precision, not merely finite values: the error's norm relative to the output's norm. Measured 5.4-5.6e-3 (about
    1.4 bf16 eps, 2^-7) over 4 seeds, on AVX-512 bf16 kernels and with them switched off (ONEDNN_MAX_CPU_ISA=AVX2,
    ATEN_CPU_CAPABILITY=avx2 or default); 2e-2 is ~3.5x that. Dropping the position table in bf16 gives 0.67."""
    model = random_encoder()
    fbank = torch.randn(1, 1024, 128)
    ref = model(fbank)  # fp32
    out = model.to(torch.bfloat16)(fbank)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    error = ((out.float() - ref).norm() / ref.norm()).item()
    assert error <= 2e-2, error


def test_a_release_of_a_pth_encoder_reads_the_block_the_run_read(tmp_path):
    """apt_min.release.pack cuts the encoder after the block the APT read: for a .pth (weights only) that block is
    the run's setting (here the last, the public APT code's choice), which apt.json keeps; read with the defaults
    (the penultimate) the release would hand the APT other features under a fingerprint of its own. The encoder's
    identity is the one training records (build_encoder: the file with the settings it was read with)."""
    import json

    from safetensors.torch import save_file

    from apt_min import release
    from apt_min.build import build_encoder
    from apt_min.config import load_config

    model = random_encoder(output_block=-1)
    c = model.config
    pth = released_checkpoint(model, tmp_path / "finetuned.pth")
    final = tmp_path / "run" / "stage2" / "final"
    final.mkdir(parents=True)
    save_file({"audio_token": torch.zeros(4)}, str(final / "apt.safetensors"))
    settings = {"preset": "paper", "encoder_dim": c.dim, "encoder_depth": c.depth, "encoder_heads": c.heads,
                "target_length": c.target_length, "output_block": -1, "encoder_checkpoint": str(pth)}
    _, trained_on = build_encoder(load_config("paper", settings), "cpu", torch.float32)
    described = {"aligner": {}, "llm": {}, "encoder": trained_on}  # as a run's apt.json
    (final / "apt.json").write_text(json.dumps({**described, "config": settings}))
    release.pack(tmp_path / "run", tmp_path / "out")
    cut = AudioMAE.from_checkpoint(tmp_path / "out" / "encoder.safetensors")
    with torch.no_grad():  # the run's encoder as the release stores it: in bf16
        for t in [*model.parameters(), *model.buffers()]:
            t.copy_(t.bfloat16().float())
    fbank = torch.randn(1, c.target_length, 128)
    assert cut.config.depth == c.depth  # every block: the last one is read
    torch.testing.assert_close(cut(fbank), model(fbank), rtol=1e-5, atol=1e-5)
    (final / "apt.json").write_text(json.dumps(described))
    with pytest.raises(CheckpointError, match=r"apt.json: no 'config' to say how the run read its encoder"):
        release.pack(tmp_path / "run", tmp_path / "out2")


def test_a_pth_encoders_identity_holds_the_settings_it_was_read_with(tmp_path):
    """A released .pth holds weights only: the block read comes from the settings, so the same file read with
    another output_block gives other features and is another encoder to an APT (the feature cache's key, the encoder
    it was trained against); read twice alike, it is the same one, and another file read alike is another. A
    .safetensors file carries its settings: its identity is its file's fingerprint."""
    from apt_min.build import build_encoder
    from apt_min.config import load_config
    from apt_min.model import fingerprint

    model = random_encoder(output_block=-1)
    c = model.config
    pth = released_checkpoint(model, tmp_path / "finetuned.pth")
    shape = {"encoder_dim": c.dim, "encoder_depth": c.depth, "encoder_heads": c.heads, "target_length": c.target_length}

    def identity(checkpoint, block):
        cfg = load_config("paper", {**shape, "encoder_checkpoint": str(checkpoint), "output_block": block})
        return build_encoder(cfg, "cpu", torch.float32)[1]

    last, penultimate = identity(pth, -1), identity(pth, -2)
    assert last["path"] == penultimate["path"] == str(pth)
    assert last["fingerprint"] != penultimate["fingerprint"]
    assert fingerprint(pth) not in (last["fingerprint"], penultimate["fingerprint"])
    assert identity(pth, -1) == last
    other = released_checkpoint(random_encoder(output_block=-1), tmp_path / "other.pth")
    assert identity(other, -1)["fingerprint"] != last["fingerprint"]  # other weights, the same settings
    saved = tmp_path / "encoder.safetensors"
    model.save(saved)
    assert identity(saved, -2)["fingerprint"] == fingerprint(saved)


def test_a_release_keeps_what_answering_reads_in_bf16_and_lists_each_file_as_sha256sum_does(tmp_path):
    """apt_min.release.pack with a .safetensors encoder (3 blocks, the penultimate read) and a run whose settings say
    another block (a .safetensors file carries its own, as training read it): the encoder is cut after block 2 of 3
    and gives the file's features (bf16-rounded); apt.safetensors keeps every tensor but the stage-0 heads, in bf16;
    apt.json names the cut encoder with its fingerprint and where it was cut from, no stage-0 heads, and the APT's
    making; SHA256SUMS is exactly what `sha256sum apt.safetensors encoder.safetensors apt.json` prints; a run whose
    apt.json names no encoder path is named, and so is an encoder file that is no longer the one the APT was trained
    against (pretrained again, say), before anything is written."""
    import hashlib
    import json

    from safetensors.torch import load_file

    from apt_min import release
    from apt_min.aligner import STAGE0_HEADS
    from apt_min.model import fingerprint

    kept = {"audio_token": torch.randn(8), "aligner.query_tokens": torch.randn(4, 8), "proj.weight": torch.randn(8, 8)}
    heads = {f"aligner.{h}.weight": torch.randn(3) for h in STAGE0_HEADS}
    model, run, final, settings, named = run_to_release(tmp_path, kept | heads, {"stage0_heads": True}, steps_2=7,
                                                        output_block=-1)
    c = model.config
    out = tmp_path / "out"
    sums = release.pack(run, out)

    state = load_file(out / "apt.safetensors")
    assert state.keys() == kept.keys() and all(torch.equal(state[k], v.bfloat16()) for k, v in kept.items())
    cut = AudioMAE.from_checkpoint(out / "encoder.safetensors")
    assert (cut.config.depth, cut.pos_embed.dtype) == (2, torch.float32)  # stored in bf16, read back as float32
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "encoder.safetensors").values())
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.copy_(t.bfloat16().float())
    fbank = torch.randn(1, c.target_length, 128)
    torch.testing.assert_close(cut(fbank), model(fbank), rtol=1e-5, atol=1e-5)
    meta = json.loads((out / "apt.json").read_text())
    assert meta["encoder"] == {"path": str(out / "encoder.safetensors"),
                               "fingerprint": fingerprint(out / "encoder.safetensors"), "cut_from": named}
    assert meta["stage0_heads"] is False and meta["made_by"] == release.history(final) != []
    digests = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in release.FILES}
    assert sums == digests
    assert (out / "SHA256SUMS").read_text() == "".join(f"{digests[n]}  {n}\n" for n in
                                                       ("apt.safetensors", "encoder.safetensors", "apt.json"))
    written = (out / "SHA256SUMS").read_text()  # edited by hand: a line of spaces, a line indented or with a
    (out / "SHA256SUMS").write_text(" " + written.replace("\n", " \n", 1) + "   \n")  # trailing space: still verified
    release.verify(out)
    (out / "SHA256SUMS").write_text(written)
    (final / "apt.json").write_text(json.dumps({"stage": "2", "aligner": {}, "llm": {}, "encoder": named,
                                                "stage0_heads": True, "config": settings}))
    random_encoder(dim=c.dim).save(run / "encoder.safetensors")  # the run's encoder made again: other weights
    with pytest.raises(CheckpointError, match=rf"^{re.escape(named['path'])}: not the encoder {re.escape(str(final))} "
                                              r"was trained against \(its fingerprint is [0-9a-f]{16}, .*apt.json "
                                              rf"records {named['fingerprint']}\)"):
        release.pack(run, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    (final / "apt.json").write_text(json.dumps({"aligner": {}, "llm": {}, "encoder": {"fingerprint": "x"}}))
    with pytest.raises(CheckpointError, match=r"apt.json: names no encoder path to cut the release's encoder from"):
        release.pack(run, tmp_path / "out2")


def test_the_release_command_prints_each_files_checksum_and_size(tmp_path, capsys):
    """`python -m apt_min.release RUN OUT` packs the run's APT into OUT (made, its parents too) and prints one line
    per file of the release, in SHA256SUMS's order: the file's sha256, its name and its size in MB."""
    import hashlib

    from apt_min import release

    _, run, _, _, _ = run_to_release(tmp_path, {"audio_token": torch.randn(8)})
    out = tmp_path / "releases" / "new" / "apt-tiny"
    release.main([str(run), str(out)])
    files = ("apt.safetensors", "encoder.safetensors", "apt.json")
    sizes = {n: (out / n).stat().st_size for n in files}
    assert sizes["encoder.safetensors"] > 10_000  # so that its size in MB is not 0.00
    assert capsys.readouterr().out.splitlines() == [
        f"{hashlib.sha256((out / n).read_bytes()).hexdigest()}  {n}  ({sizes[n] / 1e6:.2f} MB)" for n in files]


def test_settings_a_safetensors_encoder_overrides_are_named(tmp_path, caplog):
    """A .safetensors encoder carries its config: --output_block or --target_length given beside it are not used,
    and a warning says so (a release's encoder, cut after the block it reads, is the same block and says nothing)."""
    import logging

    from apt_min.build import build_encoder
    from apt_min.config import load_config

    random_encoder().save(tmp_path / "enc.safetensors")  # 3 blocks, the penultimate read
    settings = {"encoder_checkpoint": str(tmp_path / "enc.safetensors"), "encoder_dim": 64, "encoder_heads": 4,
                "encoder_depth": 3, "target_length": 1024}
    with caplog.at_level(logging.WARNING):
        build_encoder(load_config("tiny", settings), "cpu", torch.float32)
        assert "not used" not in caplog.text
        build_encoder(load_config("tiny", {**settings, "output_block": -1}), "cpu", torch.float32)
    assert "enc.safetensors carries its own encoder settings (block read 1); the settings' block read 2 are not" \
        in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # its width and window too (heads must split the width they ask)
        build_encoder(load_config("tiny", {**settings, "encoder_dim": 32, "target_length": 512}), "cpu", torch.float32)
    assert ("carries its own encoder settings (dim 64, target_length 1024); the settings' dim 32, target_length 512 "
            "are not used") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # and its heads
        build_encoder(load_config("tiny", {**settings, "encoder_heads": 8}), "cpu", torch.float32)
    assert "carries its own encoder settings (heads 4); the settings' heads 8 are not used" in caplog.text

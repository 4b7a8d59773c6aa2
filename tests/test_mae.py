"""The encoder's masked-autoencoding pretraining (apt_min/mae.py, `train.py --stage mae`): patches in the encoder's
order, the encoder on kept patches only, the loss on hidden patches only, and a loss that training lowers."""

import pytest
import torch

from apt_min import mae
from apt_min.audiomae import AudioMAE, AudioMAEConfig

CFG = AudioMAEConfig(target_length=64, num_mel_bins=32, dim=24, depth=2, heads=2, output_block=-1)


def windows(n=4, seed=0):
    return torch.randn(n, CFG.target_length, CFG.num_mel_bins, generator=torch.Generator().manual_seed(seed))


def test_patches_are_cut_in_the_encoders_token_order():
    """Target k is the patch whose embedding is the encoder's token k: the conv's output equals the patches times
    its kernel, row for row."""
    torch.manual_seed(0)
    enc, x = AudioMAE(CFG), windows()
    conv = enc.patch_embed.proj
    by_conv = enc.patch_embed(x[:, None])  # (B, N, D)
    by_hand = mae.patchify(x, CFG.patch_size) @ conv.weight.reshape(CFG.dim, -1).T + conv.bias
    torch.testing.assert_close(by_hand, by_conv, rtol=1e-5, atol=1e-5)
    t, f, p = 2, 1, CFG.patch_size  # one patch by coordinates: time index 2, frequency index 1
    k = t * (CFG.num_mel_bins // p) + f
    torch.testing.assert_close(mae.patchify(x, p)[0, k], x[0, t * p:(t + 1) * p, f * p:(f + 1) * p].reshape(-1))


def test_every_window_keeps_its_own_random_fifth():
    keep = mae.random_keep(6, 40, 0.8, torch.Generator().manual_seed(1))
    assert keep.shape == (6, 8)
    assert all(len(set(row.tolist())) == 8 for row in keep)
    assert len({tuple(sorted(row.tolist())) for row in keep}) == 6
    assert mae.random_keep(3, 8, 0.8).shape == (3, 2)  # round(1.6): the nearest count, not the one below
    assert mae.random_keep(3, 8, 0.99).shape == (3, 1)  # round(0.08) is 0, but a window always keeps one patch


def test_the_encoder_on_every_patch_kept_is_the_encoder():
    """With nothing hidden and the patches in order, the kept-patch path is AudioMAE.forward (all its blocks), CLS
    with its position row added as there (zeros in the sin-cos table, but a loaded `pos_embed` is what it holds)."""
    torch.manual_seed(0)
    enc, x = AudioMAE(CFG), windows()
    enc.pos_embed[:, 0] = torch.randn(CFG.dim)
    every = torch.arange(enc.num_patches).expand(len(x), -1)
    torch.testing.assert_close(mae.encode_kept(enc, x, every), enc(x), rtol=1e-5, atol=1e-5)


def test_hidden_patches_never_reach_the_encoder():
    """Changing the spectrogram under a hidden patch changes nothing the encoder returns."""
    torch.manual_seed(0)
    enc, x = AudioMAE(CFG), windows(1)
    keep = mae.random_keep(1, enc.num_patches, 0.75, torch.Generator().manual_seed(2))
    hidden = next(k for k in range(enc.num_patches) if k not in keep[0].tolist())
    nf, p = CFG.num_mel_bins // CFG.patch_size, CFG.patch_size
    t, f = divmod(hidden, nf)
    y = x.clone()
    y[0, t * p:(t + 1) * p, f * p:(f + 1) * p] += 5.0
    torch.testing.assert_close(mae.encode_kept(enc, y, keep), mae.encode_kept(enc, x, keep))


def test_the_decoder_puts_each_kept_token_in_its_place_and_knows_where_each_hidden_one_is():
    """Every hidden patch is the same mask token until the decoder adds its position: its predictions for hidden
    patches differ from place to place. The kept patches' tokens go to their own places: the same keep set in
    another order predicts the same patches."""
    torch.manual_seed(0)
    enc, x = AudioMAE(CFG), windows(1)
    dec = mae.MAEDecoder(CFG)
    keep = mae.random_keep(1, enc.num_patches, 0.75, torch.Generator().manual_seed(4))
    pred = dec(mae.encode_kept(enc, x, keep), keep)[0]  # (N, P)
    hidden = [k for k in range(enc.num_patches) if k not in keep[0].tolist()]
    assert (pred[hidden[0]] - pred[hidden[1:]]).abs().amax(-1).min() > 1e-3
    shuffled = keep[:, torch.randperm(keep.shape[1])]
    torch.testing.assert_close(dec(mae.encode_kept(enc, x, shuffled), shuffled)[0], pred, rtol=1e-5, atol=1e-5)


def test_the_decoder_reads_the_encoder_through_its_final_norm():
    """The encoder's tokens reach the decoder through Audio-MAE's final LayerNorm (`norm`, which the released
    encoder does not use): with that norm's scale at zero, what the encoder says no longer matters."""
    torch.manual_seed(0)
    enc, dec = AudioMAE(CFG), mae.MAEDecoder(CFG)
    keep = mae.random_keep(1, enc.num_patches, 0.75, torch.Generator().manual_seed(4))
    a, b = (mae.encode_kept(enc, windows(1, seed), keep) for seed in (1, 2))
    assert not torch.allclose(dec(a, keep), dec(b, keep))
    with torch.no_grad():
        dec.encoder_norm.weight.zero_()
    torch.testing.assert_close(dec(a, keep), dec(b, keep))


def test_the_decoder_by_hand_at_a_width_of_its_own():
    """A decoder of another width, depth and number of heads than its encoder, in float64, against its steps done
    by hand: Audio-MAE's final norm (eps 1e-6) on the encoder's tokens and a linear map to the decoder's width; the
    mask token in every hidden place and each kept token in its own; the fixed sin-cos table at the decoder's width,
    patch k's row for patch k (CLS's row left out); each of its `depth` blocks in turn; a norm (eps 1e-6); a linear
    map to each patch's 16 x 16 values. The encoder's tokens are tiny (variance 1e-8), so that the eps counts."""
    from torch.nn.functional import layer_norm

    from apt_min.audiomae import sincos_position_table

    torch.manual_seed(0)
    dim, depth, heads, n = 16, 3, 4, 8
    dec = mae.MAEDecoder(CFG, dim=dim, depth=depth, heads=heads).double()
    assert len(dec.blocks) == depth and [b.attn.heads for b in dec.blocks] == [heads] * depth
    keep = mae.random_keep(2, n, 0.75, torch.Generator().manual_seed(5))
    tokens = 1e-4 * torch.randn(2, 2, CFG.dim, dtype=torch.float64)
    norm = dec.encoder_norm
    x = layer_norm(tokens, (CFG.dim,), norm.weight, norm.bias, eps=1e-6) @ dec.embed.weight.T + dec.embed.bias
    full = dec.mask_token.expand(2, n, dim).clone()
    for b in range(2):
        for j, k in enumerate(keep[b].tolist()):
            full[b, k] = x[b, j]
    table = sincos_position_table(AudioMAEConfig(target_length=CFG.target_length, num_mel_bins=CFG.num_mel_bins,
                                                 dim=dim))
    full = full + table[1:].double()
    for block in dec.blocks:
        full = block(full)
    want = layer_norm(full, (dim,), dec.norm.weight, dec.norm.bias, eps=1e-6) @ dec.pred.weight.T + dec.pred.bias
    assert want.shape == (2, n, CFG.patch_size ** 2)
    torch.testing.assert_close(dec(tokens, keep), want, rtol=1e-12, atol=1e-12)


def test_the_decoders_defaults_are_two_blocks_at_the_encoders_width_as_audio_maes_blocks_are():
    """Left to its defaults (as train.py makes it), the decoder is two blocks at the encoder's width and number of
    heads, each Audio-MAE's (MLP 4 x the width, norms at eps 1e-6); its mask token is drawn as Audio-MAE draws it,
    normal with std 0.02."""
    dec = mae.MAEDecoder(CFG)
    assert len(dec.blocks) == 2 and dec.embed.out_features == CFG.dim
    for block in dec.blocks:
        assert block.attn.heads == CFG.heads and block.mlp.fc1.out_features == 4 * CFG.dim
        assert block.norm1.eps == block.norm2.eps == 1e-6
    torch.manual_seed(0)
    wide = mae.MAEDecoder(CFG, dim=4096, depth=0).mask_token
    assert abs(wide.mean().item()) < 2e-3 and abs(wide.std().item() - 0.02) < 2e-3
    # the loss's masking ratio left out is Audio-MAE's 0.8: of 20 patches, 4 kept (0.75 would keep 5)
    cfg = AudioMAEConfig(target_length=160, num_mel_bins=32, dim=24, depth=1, heads=2, output_block=-1)
    enc, x = AudioMAE(cfg), torch.randn(2, 160, 32)
    dec = mae.MAEDecoder(cfg)

    def loss(*ratio):
        return mae.mae_loss(enc, dec, x, *ratio, generator=torch.Generator().manual_seed(3))

    assert loss() == loss(0.8) != loss(0.75)


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_the_loss_is_taken_on_hidden_patches_only_against_normalised_patches(scale):
    """Audio-MAE's norm_pix_loss: each patch less its mean, over the root of its (unbiased) variance plus 1e-6; on
    quiet windows (scale 1e-3, variance near 1e-6) that 1e-6 is half the denominator."""
    torch.manual_seed(0)
    enc, x = AudioMAE(CFG), scale * windows()
    dec = mae.MAEDecoder(CFG)
    got = mae.mae_loss(enc, dec, x, 0.75, torch.Generator().manual_seed(3))
    keep = mae.random_keep(len(x), enc.num_patches, 0.75, torch.Generator().manual_seed(3))
    pred = dec(mae.encode_kept(enc, x, keep), keep)
    target = mae.patchify(x, CFG.patch_size)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()  # norm_pix
    errors = []
    for b in range(len(x)):
        for k in range(enc.num_patches):
            if k not in keep[b].tolist():
                errors.append(((pred[b, k] - target[b, k]) ** 2).mean())
    torch.testing.assert_close(got, torch.stack(errors).mean(), rtol=1e-4, atol=1e-5)


def test_training_lowers_the_loss_on_structured_spectrograms():
    """Windows made of a few repeated shapes: 60 steps take the held-out masked loss well below its start."""
    g = torch.Generator().manual_seed(0)
    shapes = torch.randn(3, 1, CFG.num_mel_bins, generator=g)  # a spectral shape per "class", constant over time

    def batch(n):
        pick = torch.randint(3, (n,), generator=g)
        return shapes[pick].expand(-1, CFG.target_length, -1) + 0.1 * torch.randn(n, CFG.target_length,
                                                                                   CFG.num_mel_bins, generator=g)

    torch.manual_seed(0)
    enc = AudioMAE(CFG).requires_grad_(True)
    dec = mae.MAEDecoder(CFG)
    params = [*enc.parameters(), *dec.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    held_out = batch(16)

    def loss():
        with torch.no_grad():
            return mae.mae_loss(enc, dec, held_out, 0.8, torch.Generator().manual_seed(9)).item()

    before = loss()
    for _ in range(60):
        mae.mae_loss(enc, dec, batch(16), 0.8, g).backward()
        opt.step()
        opt.zero_grad()
    assert loss() < 0.7 * before


def test_a_preset_that_pretrains_its_encoder_asks_for_the_stage(tmp_path):
    from apt_min.build import build_encoder
    from apt_min.config import load_config
    from apt_min.errors import MissingFileError

    cfg = load_config("small", {"run_dir": str(tmp_path)})
    with pytest.raises(MissingFileError, match=r"encoder.safetensors: the encoder is not pretrained yet; run `python "
                                               r"train.py --stage mae` first"):  # never made at random
        build_encoder(cfg, "cpu", torch.float32)
    assert not (tmp_path / "encoder.safetensors").exists()


def test_the_loss_under_autocast_is_the_loss():
    """Training runs the stage under autocast (bf16 or fp16 on a GPU): the decoder embeds the encoder's tokens in
    the lower precision while its mask token stays a float32 parameter (cast to the tokens' dtype), and the loss is
    float32 and the float32 one, to well within bf16's precision (here on the CPU)."""
    torch.manual_seed(0)
    enc, dec, x = AudioMAE(CFG), mae.MAEDecoder(CFG), windows()
    want = mae.mae_loss(enc, dec, x, 0.8, torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mae.mae_loss(enc, dec, x, 0.8, torch.Generator().manual_seed(1))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=0)


def test_the_decoder_follows_an_encoder_of_another_patch_size():
    """An encoder cut into 8 x 8 patches (not Audio-MAE's 16): the decoder places and predicts patches of that size."""
    cfg = AudioMAEConfig(target_length=32, num_mel_bins=16, patch_size=8, dim=24, depth=1, heads=2, output_block=-1)
    enc, dec, x = AudioMAE(cfg), mae.MAEDecoder(cfg), windows()[:, :32, :16]
    keep = mae.random_keep(len(x), enc.num_patches, 0.75, torch.Generator().manual_seed(0))
    pred = dec(mae.encode_kept(enc, x, keep), keep)
    assert enc.num_patches == 8 and pred.shape == (len(x), 8, 64) == mae.patchify(x, 8).shape
    assert torch.isfinite(mae.mae_loss(enc, dec, x, 0.75, torch.Generator().manual_seed(0)))

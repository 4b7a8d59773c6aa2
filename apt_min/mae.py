"""How the frozen encoder is made: masked autoencoding on spectrograms (Audio-MAE, Huang et al., "Masked Autoencoders
that Listen", §3), the self-supervised pretraining that produced Audio-MAE's released `pretrained.pth`. APT itself
never trains the encoder (paper §3.1); the `small` preset makes its own encoder this way on the training clips
(`python train.py --stage mae`), so that "a frozen pretrained encoder" is true there too.

    fbank windows (B, T, F) -> patches (B, N, 16*16); keep a random 20 % of each window's patches
    encoder (all its blocks) on the kept patches (B, N_keep, D)
    -> norm, decoder width, a learned mask token in every dropped place, positions, decoder blocks
    -> each patch's 256 values, predicted; loss: mean squared error on the dropped patches only, against each
       patch normalised by its own mean and variance (Audio-MAE's norm_pix_loss)

Audio-MAE's decoder is 16 blocks of 512 with local (shifted-window) attention; ours is two plain blocks at the
encoder's width, enough for 5 s synthetic windows. The masking is Audio-MAE's unstructured one at ratio 0.8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from apt_min.audiomae import AudioMAE, AudioMAEConfig, Block, sincos_position_table


def patchify(fbank: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, T, F) -> (B, N, patch * patch), patches in the encoder's order (time-major: k = t * n_freq + f)."""
    B, T, Fq = fbank.shape
    x = fbank.reshape(B, T // patch, patch, Fq // patch, patch).permute(0, 1, 3, 2, 4)
    return x.reshape(B, (T // patch) * (Fq // patch), patch * patch)


def random_keep(batch: int, n: int, ratio: float, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """For each of `batch` windows, the indices of the round(n * (1 - ratio)) patches kept, in a random order
    (B, n_keep). Independent for each window, as Audio-MAE masks."""
    n_keep = max(1, int(round(n * (1 - ratio))))
    noise = torch.rand(batch, n, generator=generator).to(device)
    return noise.argsort(dim=1)[:, :n_keep]


class MAEDecoder(nn.Module):
    """Reconstructs every patch from the encoder's tokens of the kept ones (the part thrown away after pretraining)."""

    def __init__(self, enc: AudioMAEConfig, dim: int | None = None, depth: int = 2, heads: int | None = None):
        super().__init__()
        dim, heads = dim or enc.dim, heads or enc.heads
        self.config = AudioMAEConfig(target_length=enc.target_length, num_mel_bins=enc.num_mel_bins,
                                     patch_size=enc.patch_size, dim=dim, depth=depth, heads=heads)
        self.encoder_norm = nn.LayerNorm(enc.dim, eps=1e-6)  # Audio-MAE's `norm`, at the end of its encoder
        self.embed = nn.Linear(enc.dim, dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.register_buffer("pos_embed", sincos_position_table(self.config)[None, 1:], persistent=False)  # (1,N,d)
        self.blocks = nn.ModuleList(Block(dim, heads, self.config.hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, enc.patch_size ** 2)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """tokens (B, N_keep, D) of the patches `keep` (B, N_keep) -> every patch predicted (B, N, patch^2)."""
        x = self.embed(self.encoder_norm(tokens))  # (B, N_keep, d)
        B, _, d = x.shape
        full = self.mask_token.to(x.dtype).expand(B, self.pos_embed.shape[1], d).clone()  # (B, N, d)
        full.scatter_(1, keep[..., None].expand(-1, -1, d), x)
        full = full + self.pos_embed
        for block in self.blocks:
            full = block(full)
        return self.pred(self.norm(full))


def encode_kept(encoder: AudioMAE, fbank: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The encoder, every block of it, on the kept patches only (B, N_keep, D): CLS and positions as in
    AudioMAE.forward, the dropped patches never entering."""
    x = encoder.patch_embed(fbank[:, None]) + encoder.pos_embed[:, 1:]  # (B, N, D)
    x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, N_keep, D)
    cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for block in encoder.blocks:
        x = block(x)
    return x[:, 1:]


def mae_loss(encoder: AudioMAE, decoder: MAEDecoder, fbank: torch.Tensor, ratio: float = 0.8,
             generator: torch.Generator | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The masked-autoencoding loss of a batch of windows (B, T, F): mean squared error over the dropped patches'
    values, each patch normalised to zero mean and unit variance (a scalar). keep: the patches each window keeps
    (B, N_keep), where the caller drew them (under torchrun, its share of the global batch's; `ratio` and
    `generator` then go unused); else they are drawn here."""
    target = patchify(fbank, encoder.config.patch_size)  # (B, N, P)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    if keep is None:
        keep = random_keep(fbank.shape[0], target.shape[1], ratio, generator, fbank.device)
    pred = decoder(encode_kept(encoder, fbank, keep), keep)
    dropped = torch.ones(target.shape[:2], dtype=torch.bool, device=fbank.device)
    dropped.scatter_(1, keep, False)
    return F.mse_loss(pred[dropped], target[dropped])

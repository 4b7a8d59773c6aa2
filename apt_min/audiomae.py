"""The frozen audio encoder: Audio-MAE's ViT-B/16 (paper §3.1 and §4.1; Huang et al., "Masked Autoencoders that
Listen").

    fbank windows (B, T, F) = (B, 1024, 128)  ->  patch tokens of one block (B, T/16 * F/16, D) = (B, 512, 768)

The spectrogram is an image of one channel, time down and mel bins across, cut into 16x16 patches (64 x 8 for 10.24 s),
each projected to D; a CLS token leads; a fixed 2D sine-cosine table gives positions; pre-LN transformer blocks follow.
APT reads the patch tokens (CLS dropped) of one block: the paper takes the penultimate, the public APT code took the
last, so it is `AudioMAEConfig.output_block`. Module names follow the released checkpoints (timm's), so
`pretrained.pth` / `finetuned.pth` load key for key; the keys APT does not use are dropped by an explicit list.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from apt_min.checkpoint import CheckpointError, check_keys, safetensors_entries, safetensors_header, torch_entries
from apt_min.errors import clean_exit

# keys of the released checkpoints that APT does not use: the AudioSet classifier (527 x 768) and the norms that feed it
# (finetuned.pth), the final norm, the MAE decoder and its mask token (pretrained.pth)
DROPPED = ("head.*", "fc_norm.*", "norm.*", "decoder_*", "mask_token")


@dataclass
class AudioMAEConfig:
    target_length: int = 1024  # fbank frames per window (1024 x 10 ms = 10.24 s)
    num_mel_bins: int = 128
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    output_block: int = -2  # whose patch tokens are returned: -2 penultimate (paper §3.1), -1 last (public APT code)

    @property
    def hidden(self) -> int:  # the MLP's width
        return int(self.dim * self.mlp_ratio)

    @property
    def grid(self) -> tuple[int, int]:
        return self.target_length // self.patch_size, self.num_mel_bins // self.patch_size  # (time, frequency)


def sincos_position_table(cfg: AudioMAEConfig) -> torch.Tensor:
    """Audio-MAE's fixed position table (1 + N, D): a zero row for CLS, then one row per patch in the order the
    patches are flattened (index k = t * n_freq + f). Half of each row is sin/cos of one coordinate at D/4
    frequencies 10000^(-i / (D/4)), the other half of a second coordinate.

    The released models build the table on a grid of shape (n_freq, n_time) — the image sizes swapped — and read it
    in patch order; so row k encodes (k mod n_time) in its first half and (k div n_time) in its second, not (t, f).
    The checkpoints were trained with exactly this table, so it is reproduced here, not "corrected"."""
    n_time, n_freq = cfg.grid
    k = torch.arange(n_time * n_freq, dtype=torch.float64)
    omega = 1.0 / 10000 ** (torch.arange(cfg.dim // 4, dtype=torch.float64) / (cfg.dim // 4))  # (D/4,)

    def encode(pos):  # (N,) -> (N, D/2)
        angles = pos[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(k % n_time), encode(torch.div(k, n_time, rounding_mode="floor"))], dim=1)
    return torch.cat([torch.zeros(1, cfg.dim, dtype=torch.float64), table]).float()  # (1 + N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # fused, with bias
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, hd)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as timm's default


class Block(nn.Module):
    """A pre-LN ViT block. Audio-MAE's (ViT-B: 768-d, 12 heads, MLP 3072) and, in `vision.py`, EVA ViT-g's
    (1408-d, 16 heads, MLP 6144) are this same block."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x):  # (B, C, H, W): a spectrogram (B, 1, T, F), an image (B, 3, 224, 224)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, H/p, W/p) -> (B, N, D), rows first (time-major)


class AudioMAE(nn.Module):
    """Frozen from construction (no gradients, eval mode): APT never trains it."""

    def __init__(self, cfg: AudioMAEConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or AudioMAEConfig()
        if cfg.target_length % cfg.patch_size or cfg.num_mel_bins % cfg.patch_size:
            raise ValueError(f"target_length={cfg.target_length} and num_mel_bins={cfg.num_mel_bins} must be "
                             f"multiples of patch_size={cfg.patch_size}")
        if not -cfg.depth <= cfg.output_block < cfg.depth:
            raise ValueError(f"output_block={cfg.output_block} is outside the {cfg.depth} blocks")
        self.patch_embed = PatchEmbed(1, cfg.dim, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.register_buffer("pos_embed", sincos_position_table(cfg)[None])  # (1, 1 + N, D), saved with the weights
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.hidden) for _ in range(cfg.depth))
        self._init()
        self.requires_grad_(False)
        self.eval()

    def _init(self):
        """Audio-MAE's initialisation: Xavier-uniform for the patch projection (as a matrix) and every Linear,
        zero biases, CLS ~ N(0, 0.02). Released weights overwrite it; a randomly initialised encoder (the tiny
        preset) keeps it, and with it patch content that outweighs the position table."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_patches(self) -> int:
        return math.prod(self.config.grid)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """fbank (B, target_length, num_mel_bins), normalised as audio.fbank returns it -> (B, N, D)."""
        cfg = self.config
        if fbank.shape[1:] != (cfg.target_length, cfg.num_mel_bins):
            raise ValueError(f"expected fbank windows of shape (B, {cfg.target_length}, {cfg.num_mel_bins}), "
                             f"got {tuple(fbank.shape)}")
        x = self.patch_embed(fbank[:, None].to(self.cls_token.dtype))  # (B, N, D)
        x = x + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + N, D)
        last = cfg.output_block % cfg.depth
        for block in self.blocks[:last + 1]:  # the blocks after the chosen one are never run
            x = block(x)
        return x[:, 1:]  # (B, N, D): CLS dropped

    # ----------------------------------------------------------------------------------------------------- weights

    @classmethod
    def from_checkpoint(cls, path: str | Path, cfg: AudioMAEConfig | None = None) -> AudioMAE:
        """Load a released Audio-MAE checkpoint (`pretrained.pth` / `finetuned.pth`: the tensors under "model") with
        torch.load(weights_only=True), or a `.safetensors` file written by `save` (its config travels inside).
        Keys in DROPPED are left out on purpose; any other missing, unexpected or mis-shaped key is an error."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint file")
        if path.suffix == ".safetensors":
            entries = safetensors_entries(path)
            saved = json.loads(safetensors_header(path)[1].get("audiomae_config", "{}"))
            cfg = cfg or AudioMAEConfig(**saved)
        else:
            entries = torch_entries(path, subkey="model")
            cfg = cfg or AudioMAEConfig()
        model = cls(cfg)
        targets = dict(model.named_parameters()) | dict(model.named_buffers())
        check_keys({path: entries}, {k: tuple(t.shape) for k, t in targets.items()}, set(), DROPPED, path)
        with torch.no_grad():
            for name, read in entries.items():
                if name in targets:
                    read(targets[name])
        return model

    def save(self, path: str | Path):
        """Write the encoder's weights and config to one .safetensors file, so later loads need no pickle at all."""
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"audiomae_config": json.dumps(asdict(self.config))})


@clean_exit("python -m apt_min.audiomae")
def main():
    """python -m apt_min.audiomae IN.pth OUT.safetensors: convert a released checkpoint once."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    args = ap.parse_args()
    AudioMAE.from_checkpoint(args.checkpoint).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

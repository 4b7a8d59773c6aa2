"""The frozen image encoder of APT-BLIP-2 (paper §4.4): InstructBLIP's EVA ViT-g/14, and how frames become pixels.

    a video frame (any size, RGB)  ->  pixels (3, 224, 224)  ->  tokens (1 + 256, 1408)

The encoder is the ViT of `audiomae.py` with other settings: the same pre-LN `Block`, with three colour channels, 14 px
patches on a 16 x 16 grid, 39 blocks of width 1408 (EVA ViT-g/14 has 40; BLIP-2 drops the last), a learned position
table, and every token kept, CLS included: the visual aligner cross-attends to all 257. Its biases: EVA has query and
value biases only; InstructBLIP's checkpoint stores them fused with zeros for the keys, which our fused `qkv.bias` reads
as it is. The norm after the last block belongs, in our split, to the visual aligner (its `ln_audio`, BLIP-2's
`ln_vision`), as the audio side's does.

`ImageProcessing` is BLIP's image transform (InstructBLIP's `preprocessor_config.json`): RGB, bicubic resize to
224 x 224 with Pillow, scaled to [0, 1], normalised by CLIP's mean and std.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from apt_min.audiomae import Block, PatchEmbed
from apt_min.checkpoint import CheckpointError
from apt_min.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ViTConfig:
    image_size: int = 224  # defaults: EVA ViT-g/14 as InstructBLIP-Vicuna-7B uses it
    patch_size: int = 14
    channels: int = 3
    dim: int = 1408
    depth: int = 39
    heads: int = 16
    hidden: int = 6144  # the MLP's width
    norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ImageEncoder(nn.Module):
    """Frozen from construction (no gradients, eval mode), as APT-BLIP-2 never trains it; the `vision` stage of the
    embedded default keeps a small seeded random one frozen throughout and trains only the visual aligner and its
    projection (`train.py --stage vision`)."""

    def __init__(self, cfg: ViTConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or ViTConfig()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size={cfg.image_size} is not a multiple of patch_size={cfg.patch_size}")
        self.patch_embed = PatchEmbed(cfg.channels, cfg.dim, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + cfg.num_patches, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.hidden, cfg.norm_eps) for _ in range(cfg.depth))
        self.requires_grad_(False)
        self.eval()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S), as `ImageProcessing` makes them -> every token of the last block (B, 1 + N, D), CLS
        first."""
        cfg = self.config
        if pixels.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"expected images of shape (B, {cfg.channels}, {cfg.image_size}, {cfg.image_size}), "
                             f"got {tuple(pixels.shape)}")
        x = self.patch_embed(pixels.to(self.cls_token.dtype))  # (B, N, D), rows of patches first
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1 + N, D)
        for block in self.blocks:
            x = block(x)
        return x


# ------------------------------------------------------------------------------------------------------ pixels


class ImageError(UserError, ValueError):
    """An image file that cannot be read; the message names it."""


@dataclass
class ImageProcessing:
    """BLIP's evaluation transform; `read` takes the values of a `preprocessor_config.json`."""
    size: int = 224
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    rescale: float = 1 / 255
    resample: int = 3  # Pillow's BICUBIC

    @classmethod
    def read(cls, folder: str | Path) -> ImageProcessing:
        """From a Hugging Face model folder's preprocessor_config.json (BLIP's defaults where it is absent)."""
        file = Path(folder) / "preprocessor_config.json"
        if not file.is_file():
            return cls()
        raw = json.loads(file.read_text())
        size = raw.get("size", {})
        if isinstance(size, dict) and "width" in size and size.get("height") != size["width"]:
            shape = (f"{size['height']} x {size['width']} (height x width)" if "height" in size
                     else f"width {size['width']} and no height")
            raise CheckpointError(f"{file}: an image size of {shape}; the vision encoder reads square images, as "
                                  "BLIP's processing makes them")
        size = size.get("height", size.get("shortest_edge", 224)) if isinstance(size, dict) else size
        return cls(size=int(size), mean=tuple(raw.get("image_mean", CLIP_MEAN)),
                   std=tuple(raw.get("image_std", CLIP_STD)), rescale=float(raw.get("rescale_factor", 1 / 255)),
                   resample=int(raw.get("resample", 3)))

    def __call__(self, image) -> torch.Tensor:
        """A Pillow image, or a path to an image file -> pixels (3, size, size) float32."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            try:
                with Image.open(image) as im:
                    image = im.convert("RGB")
            except (OSError, ValueError) as e:  # missing, unreadable or not an image: name the file
                raise ImageError(f"{image}: cannot be read as an image ({e})") from None
        image = image.convert("RGB").resize((self.size, self.size), resample=self.resample)
        x = np.asarray(image, dtype=np.float32) * self.rescale  # (S, S, 3)
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(x.transpose(2, 0, 1).copy())  # (3, S, S)

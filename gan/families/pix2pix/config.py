"""pix2pix's config sections, each a dataclass validating itself: ``model`` (the two networks, compared on
resume) and ``loss`` (the objective: which GAN loss, and the L1 weight)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from gan.config import ConfigError, _check
from gan.families.gan.losses import LOSSES

NORMS = ("instance", "batch", "none")


@dataclass
class Pix2PixConfig:
    img_size: int = 256  # a power of two >= 16; the U-Net has log2(img_size) down and up blocks (8 at 256)
    in_channels: int = 3  # channels of the input image (A)
    out_channels: int = 3  # channels of the output / target image (B)
    g_channels: int = 64  # U-Net width of the outermost block (ngf)
    d_channels: int = 64  # PatchGAN width of the first conv (ndf)
    d_layers: int = 3  # PatchGAN stride-2 convs; 3 gives the 70x70 receptive field
    # instance (default): per-sample statistics, so a batch split over any number of ranks trains the same
    # (BatchNorm is not synced across GPUs), and it is what the paper's batch size 1 amounts to.
    # batch: the reference implementation's default (per-rank statistics under DDP).
    norm: str = "instance"
    dropout: float = 0.5  # in the U-Net's innermost 8x-width up blocks (the paper's noise), 0 = off
    d_spectral_norm: bool = False  # spectral norm on the PatchGAN's convs

    def __post_init__(self):
        _check(self.img_size >= 16 and self.img_size & (self.img_size - 1) == 0, "model.img_size",
               f"{self.img_size} is not a power of two >= 16 (e.g. 32, 64, 256): the U-Net halves it down to 1x1")
        _check(self.in_channels >= 1 and self.out_channels >= 1, "model.in_channels/out_channels", "must be >= 1")
        _check(self.g_channels > 0 and self.d_channels > 0, "model.g_channels/d_channels", "must be > 0")
        _check(1 <= self.d_layers and 2 ** (self.d_layers + 2) <= self.img_size, "model.d_layers",
               f"must be >= 1 and leave the PatchGAN at least 2x2 outputs at {self.img_size} px")
        _check(self.norm in NORMS, "model.norm", f"'{self.norm}' is not one of: {', '.join(NORMS)}")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")

    @property
    def num_downs(self) -> int:
        return int(math.log2(self.img_size))


@dataclass
class Pix2PixLossConfig:
    gan_loss: str = "ns"  # any registered GAN loss (gan.families.gan.losses.LOSSES); ns is the reference's "vanilla"
    lambda_l1: float = 100.0  # weight of the L1 term in G's loss

    def __post_init__(self):
        _check(self.gan_loss in LOSSES, "loss.gan_loss",
               f"unknown GAN loss '{self.gan_loss}'. Valid names: {', '.join(sorted(LOSSES))}")
        _check(self.lambda_l1 >= 0 and math.isfinite(self.lambda_l1), "loss.lambda_l1", "must be a finite number >= 0")


__all__ = ["Pix2PixConfig", "Pix2PixLossConfig", "ConfigError", "NORMS"]

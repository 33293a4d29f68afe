"""The GAN family's config sections: ``model`` (the architecture) and ``loss`` (the adversarial
objective and its regularisers). Same keys as ever, so every recipe, sweep and override is unchanged."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gan.config import _check


@dataclass
class ModelConfig:
    name: str = "cdcgan"  # registered architecture (gan.families.gan.models.MODELS): cdcgan | sngan | biggan
    z_dim: int = 100
    num_classes: int = 10
    img_channels: int = 3
    img_size: int = 32
    g_channels: int = 64  # base width of G
    d_channels: int = 64  # base width of D
    d_conditioning: str = "projection"  # cdcgan D: "projection" or "concat"
    g_spectral_norm: bool = False  # spectral norm on G's conv/linear/embedding layers
    d_spectral_norm: bool = False  # spectral norm on D's conv/linear/embedding layers
    upsample: str = "deconv"  # cdcgan G: "deconv" (transposed conv) or "nearest" (upsample + conv)
    shared_dim: int = 128  # biggan: size of the shared class embedding
    hier_z: bool = True  # biggan: split z across the G blocks
    attn_res: int = 0  # self-attention at this resolution in G and D (0 = none; BigGAN uses 16)
    init: str = "default"  # default (the architecture's own) | dcgan | ortho | xavier | normal
    d_backbone: str = ""  # "" = the architecture's own D; "googlenet" = torchvision GoogLeNet backbone
    backbone_weights: str = ""  # local torchvision GoogLeNet state_dict (nothing is downloaded)

    def __post_init__(self):
        _check(self.z_dim > 0, "model.z_dim", "must be > 0")
        _check(self.num_classes >= 1, "model.num_classes", "must be >= 1")
        _check(self.img_channels in (1, 3), "model.img_channels", "must be 1 or 3")
        _check(self.img_size >= 8 and self.img_size & (self.img_size - 1) == 0 or self.img_size == 28,
               "model.img_size", "must be a power of two >= 8, or 28")
        _check(self.g_channels > 0 and self.d_channels > 0, "model.g_channels/d_channels", "must be > 0")
        _check(self.d_conditioning in ("projection", "concat"), "model.d_conditioning",
               f"'{self.d_conditioning}' is not one of: projection, concat")
        _check(self.upsample in ("deconv", "nearest"), "model.upsample",
               f"'{self.upsample}' is not one of: deconv, nearest")
        _check(self.shared_dim > 0, "model.shared_dim", "must be > 0")
        _check(self.attn_res == 0 or (self.attn_res >= 4 and self.attn_res & (self.attn_res - 1) == 0),
               "model.attn_res", "must be 0 (off) or a power of two >= 4")
        _check(self.attn_res <= self.img_size, "model.attn_res",
               f"attention resolution {self.attn_res} is larger than the image ({self.img_size}); "
               f"use 0 or a resolution <= model.img_size")
        _check(self.init in ("default", "dcgan", "ortho", "xavier", "normal"), "model.init",
               f"'{self.init}' is not one of: default, dcgan, ortho, xavier, normal")
        _check(self.d_backbone in ("", "googlenet"), "model.d_backbone",
               f"'{self.d_backbone}' is not one of: '' (own D), googlenet")
        if self.backbone_weights:
            _check(self.d_backbone != "", "model.backbone_weights", "is only used with model.d_backbone=googlenet")
            _check(Path(self.backbone_weights).is_file(), "model.backbone_weights",
                   f"file not found: {self.backbone_weights}. Point it at a local torchvision GoogLeNet "
                   f"state_dict (e.g. googlenet-1378be20.pth), or leave it empty to train the backbone from scratch")


@dataclass
class LossConfig:
    name: str = "ns"  # registered adversarial loss (gan.families.gan.losses.LOSSES): ns | hinge | wgan_gp | lsgan
    gp_weight: float = 10.0  # wgan_gp: gradient penalty weight
    r1_gamma: float = 0.0  # R1 penalty on real data, gamma/2 * |grad D(x)|^2 (0 = off)
    r1_every: int = 16  # lazy regularisation: R1 every k D steps, weighted by k
    label_smoothing: float = 0.0  # one-sided: real targets become 1 - s (ns, lsgan)
    instance_noise: float = 0.0  # std of Gaussian noise added to D's inputs at step 0
    instance_noise_steps: int = 0  # linear decay of that std to 0 over these G steps (0 = constant)
    diffaug: str = ""  # DiffAugment policy on D's inputs: comma list of color, translation, cutout

    def __post_init__(self):
        _check(bool(self.name), "loss.name", "must name a loss")
        _check(self.gp_weight >= 0, "loss.gp_weight", "must be >= 0")
        _check(self.r1_gamma >= 0, "loss.r1_gamma", "must be >= 0")
        _check(self.r1_every >= 1, "loss.r1_every", "must be >= 1")
        _check(0 <= self.label_smoothing < 0.5, "loss.label_smoothing", "must be in [0, 0.5)")
        _check(self.label_smoothing == 0 or self.name in ("ns", "lsgan"), "loss.label_smoothing",
               f"one-sided label smoothing needs targets; loss '{self.name}' has none (use ns or lsgan, or 0)")
        _check(self.instance_noise >= 0, "loss.instance_noise", "must be >= 0")
        _check(self.instance_noise_steps >= 0, "loss.instance_noise_steps", "must be >= 0")
        bad = [p for p in self.diffaug_policy if p not in ("color", "translation", "cutout")]
        _check(not bad, "loss.diffaug", f"unknown DiffAugment op(s) {bad}; valid: color, translation, cutout")

    @property
    def diffaug_policy(self) -> list[str]:
        return [p.strip() for p in self.diffaug.split(",") if p.strip()]

"""pix2pix's networks, after pytorch-CycleGAN-and-pix2pix (``unet_256`` and the ``basic`` PatchGAN).

``UNet``: ``log2(img_size)`` down blocks (stride-2 4x4 convs, widths ngf, 2ngf, 4ngf, then 8ngf) to a 1x1
bottleneck, and as many up blocks (4x4 transposed convs), each fed the previous up block's output
concatenated with the skip from the down block at its resolution. At 256 px that is the reference's 8 and
8; 32 px gets 5 and 5. Dropout sits where the reference puts it: in the 8ngf up blocks between the
innermost one and the four outer levels (3 of them at 256 px, none at 32). Output: tanh, in [-1, 1].

``PatchGAN``: D on the input and an output (or target) image concatenated along channels, scoring each
overlapping patch; with 3 stride-2 layers every output logit sees a 70x70 input patch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm

from gan.families.pix2pix.config import Pix2PixConfig

SN_EPS = 1e-6  # as the GAN's layers: torch's 1e-12 default is below bf16/fp16 resolution


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels)  # the reference's: no affine, no running statistics
    return nn.Identity()


def _width(base: int, level: int) -> int:
    return base * min(2 ** level, 8)


class UNet(nn.Module):
    def __init__(self, cfg: Pix2PixConfig):
        super().__init__()
        n, ngf, bias = cfg.num_downs, cfg.g_channels, cfg.norm != "batch"  # BatchNorm brings its own bias
        w = [_width(ngf, i) for i in range(n)]  # channels after down block i
        downs, ups = [], []
        for i in range(n):
            conv = nn.Conv2d(cfg.in_channels if i == 0 else w[i - 1], w[i], 4, 2, 1, bias=bias)
            if i == 0:
                downs.append(conv)
            else:
                downs.append(nn.Sequential(nn.LeakyReLU(0.2), conv,
                                           norm_layer(cfg.norm, w[i]) if i < n - 1 else nn.Identity()))
            c_in = w[i] if i == n - 1 else 2 * w[i]  # innermost: no skip to concatenate
            if i == 0:
                ups.append(nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(c_in, cfg.out_channels, 4, 2, 1), nn.Tanh()))
            else:
                drop = 4 <= i <= n - 2 and cfg.dropout > 0
                ups.append(nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(c_in, w[i - 1], 4, 2, 1, bias=bias),
                                         norm_layer(cfg.norm, w[i - 1]),
                                         nn.Dropout(cfg.dropout) if drop else nn.Identity()))
        self.downs, self.ups = nn.ModuleList(downs), nn.ModuleList(ups)  # index i = resolution level i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        x = self.ups[-1](skips[-1])
        for i in range(len(self.ups) - 2, -1, -1):
            x = self.ups[i](torch.cat([skips[i], x], dim=1))
        return x


def pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What the PatchGAN sees: the input image and an output (or target) image, concatenated on channels."""
    return torch.cat([a, b], dim=1)


class PatchGAN(nn.Module):
    def __init__(self, cfg: Pix2PixConfig):
        super().__init__()
        ndf, n, bias = cfg.d_channels, cfg.d_layers, cfg.norm != "batch"
        sn = (lambda m: spectral_norm(m, eps=SN_EPS)) if cfg.d_spectral_norm else (lambda m: m)
        layers: list[nn.Module] = [sn(nn.Conv2d(cfg.in_channels + cfg.out_channels, ndf, 4, 2, 1)), nn.LeakyReLU(0.2)]
        for i in range(1, n + 1):  # n - 1 more stride-2 convs, then one with stride 1
            layers += [sn(nn.Conv2d(_width(ndf, i - 1), _width(ndf, i), 4, 2 if i < n else 1, 1, bias=bias)),
                       norm_layer(cfg.norm, _width(ndf, i)), nn.LeakyReLU(0.2)]
        layers.append(sn(nn.Conv2d(_width(ndf, n), 1, 4, 1, 1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: :func:`pair` (input, output) -> a map of patch logits (N, 1, H', W'). ``y`` (a label) is
        ignored; it is there so that the GAN's loss objects can call D(x, y)."""
        return self.net(x)


def build_networks(cfg: Pix2PixConfig) -> dict[str, nn.Module]:
    return {"G": UNet(cfg), "D": PatchGAN(cfg)}

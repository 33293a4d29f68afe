"""Discriminator on torchvision's GoogLeNet (model.d_backbone=googlenet).

The backbone is ``torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True,
transform_input=False)`` run up to inception5b (1024 channels, total stride 32); its classifier
(dropout + fc) is dropped so every parameter takes part in the forward (DDP requires it). Head:
mean-pooled features -> linear logit + class projection <embed(y), features>.
Input: images in [-1, 1], which is the range torchvision's pretrained GoogLeNet expects after
its own ``transform_input`` (so we feed them unchanged); 1-channel images are repeated to 3 and
images under 32x32 are resized (bilinear) to 32 so the last feature map is at least 1x1.
``model.backbone_weights`` loads a local torchvision GoogLeNet state_dict into the backbone
(its fc/aux heads are ignored); anything missing, extra or misshapen is a ConfigError. Nothing
is ever downloaded. Loaded weights are kept by a later ``model.init`` (only the head is re-initialised).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import googlenet

from gan.config import ConfigError
from gan.families.gan.config import ModelConfig

MIN_SIZE = 32  # GoogLeNet halves the map 5 times
_STAGES = ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
           "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
           "inception5a", "inception5b")
_IGNORED = ("fc.", "aux1.", "aux2.")  # heads in torchvision's file that this D does not use


class GoogLeNetDiscriminator(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.img_channels, self.img_size = cfg.img_channels, cfg.img_size
        self.backbone = googlenet(weights=None, aux_logits=False, init_weights=True, transform_input=False)
        self.backbone.fc = nn.Identity()  # unused: our head replaces the ImageNet classifier
        self.backbone.dropout = nn.Identity()
        self.linear = nn.Linear(1024, 1)
        self.embed = nn.Embedding(cfg.num_classes, 1024)
        nn.init.normal_(self.linear.weight, 0.0, 0.01)
        nn.init.zeros_(self.linear.bias)
        nn.init.normal_(self.embed.weight, 0.0, 0.01)
        if cfg.backbone_weights:
            load_backbone(self.backbone, cfg.backbone_weights)
            self.backbone.keep_init = True  # a later model.init leaves pretrained weights alone

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if min(x.shape[2:]) < MIN_SIZE:
            x = F.interpolate(x, size=(MIN_SIZE, MIN_SIZE), mode="bilinear", align_corners=False)
        for name in _STAGES:
            x = getattr(self.backbone, name)(x)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(1)


def _few(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_backbone(backbone: nn.Module, path: str) -> None:
    """Load a torchvision GoogLeNet state_dict from a local file, or raise a ConfigError that
    names the file and the keys/shapes that don't fit."""
    where = f"config key 'model.backbone_weights': {path}"
    if not Path(path).is_file():
        raise ConfigError(f"{where}: file not found (nothing is downloaded; give a local torchvision "
                          f"GoogLeNet state_dict, e.g. googlenet-1378be20.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle, zip and unpickling errors alike)
        raise ConfigError(f"{where}: not a readable torch state_dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{where}: expected a state_dict (name -> tensor) of torchvision's GoogLeNet, "
                          f"got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith(_IGNORED)}
    own = backbone.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches (file vs model): {_few(shapes)}")
    if problems:
        raise ConfigError(f"{where} does not match torchvision's GoogLeNet: " + "; ".join(problems))
    backbone.load_state_dict(state, strict=False)

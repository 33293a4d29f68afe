"""A small CIFAR-10 classifier (ResNet-9 style) used for metrics that work offline.

``cls_acc`` (does G draw the class it was asked for?) and ``cls_fd`` (a Frechet distance in this
network's penultimate feature space) need no download: the weights are trained by
``benchmarks/train_classifier.py`` on the real CIFAR-10 training shards and committed in
``gan/metrics/assets/``. The Frechet distance here is NOT Inception FID and must never be reported
as FID; its scale is this network's own.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_WEIGHTS = ASSETS / "cifar10_classifier.safetensors"


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c, c), _conv_bn(c, c))

    def forward(self, x):
        return x + self.body(x)


class ResNet9(nn.Module):
    """prep -> [conv, pool, residual] -> [conv, pool] -> [conv, pool, residual] -> global max pool
    -> features (``widths[-1]`` dims) -> linear logits. Input: float (B, 3, 32, 32) in [-1, 1]."""

    def __init__(self, widths=(32, 64, 128, 256), num_classes: int = 10, in_channels: int = 3,
                 logit_scale: float = 0.125):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.widths, self.num_classes, self.logit_scale = tuple(widths), num_classes, logit_scale
        self.body = nn.Sequential(
            _conv_bn(in_channels, w0),
            _conv_bn(w0, w1), nn.MaxPool2d(2), _Residual(w1),
            _conv_bn(w1, w2), nn.MaxPool2d(2),
            _conv_bn(w2, w3), nn.MaxPool2d(2), _Residual(w3),
            nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.fc = nn.Linear(w3, num_classes, bias=False)

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)) * self.logit_scale

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.fc(f) * self.logit_scale


# ---------------------------------------------------------------------------- files


class ClassifierError(ValueError):
    """A classifier weights file that is missing or does not fit: the message names the file."""


def save_classifier(model: ResNet9, path: str | Path, info: dict, half: bool = True) -> Path:
    """Weights as safetensors (fp16 by default, to stay small) with the architecture and the recipe /
    measured accuracy in the metadata (``info``, JSON). Written atomically."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    state = {k: (v.detach().cpu().to(dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
             for k, v in model.state_dict().items()}
    arch = {"name": "resnet9", "widths": list(model.widths), "num_classes": model.num_classes,
            "in_channels": model.body[0][0].in_channels, "logit_scale": model.logit_scale}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"arch": json.dumps(arch), "info": json.dumps(info)})
    os.replace(tmp, path)
    return path


def read_classifier_info(path: str | Path) -> tuple[dict, dict]:
    """(arch, info) from a weights file's metadata, without loading the tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ClassifierError(f"classifier weights not found: {path}. Train them with "
                              f"`python benchmarks/train_classifier.py --out {path}` (CIFAR-10 shards needed)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a weights file"
        raise ClassifierError(f"{path} is not a safetensors classifier file ({e})") from None
    if "arch" not in meta:
        raise ClassifierError(f"{path} has no 'arch' metadata; it was not written by save_classifier")
    return json.loads(meta["arch"]), json.loads(meta.get("info", "{}"))


def load_classifier(path: str | Path = DEFAULT_WEIGHTS, device="cpu") -> tuple[ResNet9, dict]:
    """The eval-mode fp32 classifier and its info (recipe, classes, test accuracy, ...)."""
    from safetensors.torch import load_file

    arch, info = read_classifier_info(path)
    if arch.get("name") != "resnet9":
        raise ClassifierError(f"{path}: unknown classifier architecture {arch.get('name')!r}")
    model = ResNet9(tuple(arch["widths"]), arch["num_classes"], arch.get("in_channels", 3),
                    arch.get("logit_scale", 0.125))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False), info

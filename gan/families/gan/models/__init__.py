"""Generators and discriminators, registered by name and built from a ModelConfig."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from gan.config import ConfigError
from gan.families.gan.config import ModelConfig

# name -> factory(cfg, build_d=True) returning (G, D); with build_d=False, (G, None): the D is
# replaced (model.d_backbone), so it is neither built nor checked (e.g. for model.attn_res)
MODELS: dict[str, Callable[..., tuple[nn.Module, nn.Module | None]]] = {}


def register(name: str):
    def deco(factory):
        MODELS[name] = factory
        return factory
    return deco


def build_models(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """The architecture's (G, D), then, in order: the D backbone swap (model.d_backbone), the
    init override (model.init != default), spectral norm (model.g_/d_spectral_norm; after init,
    since it normalises the weights it finds)."""
    if cfg.name not in MODELS:
        raise ConfigError(f"config key 'model.name': unknown architecture '{cfg.name}'. "
                          f"Valid names: {', '.join(sorted(MODELS))}")
    if cfg.d_backbone not in ("", "googlenet"):
        raise ConfigError(f"config key 'model.d_backbone': '{cfg.d_backbone}' is not one of: '' (own D), googlenet")
    G, D = MODELS[cfg.name](cfg, build_d=not cfg.d_backbone)
    if cfg.d_backbone == "googlenet":
        D = GoogLeNetDiscriminator(cfg)
    if cfg.init != "default":
        apply_init(G, cfg.init)
        apply_init(D, cfg.init)
    if cfg.g_spectral_norm:
        apply_spectral_norm(G)
    if cfg.d_spectral_norm:
        apply_spectral_norm(D)
    return G, D


from gan.families.gan.models import biggan, cdcgan, sngan  # noqa: E402,F401  (register "biggan", "cdcgan", "sngan")
from gan.families.gan.models.googlenet_d import GoogLeNetDiscriminator  # noqa: E402
from gan.families.gan.models.layers import apply_init, apply_spectral_norm  # noqa: E402

"""Generators and discriminators, registered by name and built from a ModelConfig."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from gan.config import ConfigError, ModelConfig

# name -> factory(cfg) returning (G, D)
MODELS: dict[str, Callable[[ModelConfig], tuple[nn.Module, nn.Module]]] = {}


def register(name: str):
    def deco(factory):
        MODELS[name] = factory
        return factory
    return deco


def build_models(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    if cfg.name not in MODELS:
        raise ConfigError(f"config key 'model.name': unknown architecture '{cfg.name}'. "
                          f"Valid names: {', '.join(sorted(MODELS))}")
    return MODELS[cfg.name](cfg)


from gan.models import cdcgan  # noqa: E402,F401  (registers "cdcgan")

#!/usr/bin/env python
"""The config loader's errors side by side with kept libraries: our hand-written loader (gan.config),
OmegaConf structured configs, pydantic (TypeAdapter over the same dataclasses, extra keys forbidden)
and tyro (the same dataclasses as a command line). Each gets the same bad (and one good) overrides on
the same sections (optim, train and the GAN's model) and prints what the user would read.

    python benchmarks/config_errors.py            # libraries that are not installed are reported as such

The sections' own __post_init__ checks run under every library (they build the dataclasses), so an
invalid value reads alike everywhere; the differences are in unknown keys, types and YAML parsing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gan.config import ConfigError, OptimConfig, TrainConfig, load_config  # noqa: E402
from gan.families.gan.config import ModelConfig  # noqa: E402

CASES = {
    "unknown key (typo)": ["optim.lr_dd=1e-4"],
    "unknown section": ["optimizer.lr_d=1e-4"],
    "wrong type": ["train.batch_size=abc"],
    "invalid value": ["optim.lr_d=-1"],
    "valid: 'no' for a str key": ["train.mixed_precision=no"],
}


@dataclasses.dataclass
class Exp:
    """The sections compared (the spine's optim and train, the GAN's model)."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)


def ours(overrides):
    cfg = load_config(None, overrides)
    return cfg.train.mixed_precision


def omegaconf_structured(overrides):
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(Exp), OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_object(cfg).train.mixed_precision  # builds the dataclasses: __post_init__ runs


def pydantic_adapter(overrides):
    import yaml
    from pydantic import ConfigDict, TypeAdapter

    values: dict = {}
    for item in overrides:
        key, _, text = item.partition("=")
        *path, last = key.split(".")
        node = values
        for p in path:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(text)
    for cls in (Exp, OptimConfig, TrainConfig, ModelConfig):  # unknown keys refused, as ours are
        cls.__pydantic_config__ = ConfigDict(extra="forbid")
    try:
        return TypeAdapter(Exp).validate_python(values).train.mixed_precision
    finally:
        for cls in (Exp, OptimConfig, TrainConfig, ModelConfig):
            del cls.__pydantic_config__


def tyro_cli(overrides):
    import tyro

    args = []
    for item in overrides:
        key, _, text = item.partition("=")
        args += [f"--{key}", text]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            return tyro.cli(Exp, args=args).train.mixed_precision
    except SystemExit:
        lines = [line.strip("│╭╮╰╯─ ") for line in err.getvalue().splitlines()]
        raise RuntimeError(" ".join(t for t in lines if t and not t.startswith("For full helptext"))) from None


LOADERS = {"gan.config (ours)": ours, "OmegaConf structured": omegaconf_structured,
           "pydantic TypeAdapter": pydantic_adapter, "tyro": tyro_cli}


def attempt(fn, overrides) -> str:
    try:
        value = fn(overrides)
    except ModuleNotFoundError as e:
        return f"(not installed: {e.name})"
    except (ConfigError, Exception) as e:  # noqa: BLE001 - the point is to show each library's error
        text = " ".join(str(e).split())
        return f"{type(e).__name__}: {text[:400]}"
    return f"accepted: train.mixed_precision={value!r}"


def main() -> int:
    for case, overrides in CASES.items():
        print(f"## {case}: {' '.join(overrides)}")
        for name, fn in LOADERS.items():
            print(f"- {name}: {attempt(fn, overrides)}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

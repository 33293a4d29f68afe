"""Atomic, self-describing checkpoints on top of ``Accelerator.save_state``.

Layout: ``RUN/checkpoints/step-XXXXXXXX/`` holds Accelerate's state (G, D as safetensors, both
optimizers, the fp16 scaler, every rank's RNG state, the registered custom objects: EMA G,
schedulers, train state with the data stream position) plus ``meta.json`` (step, world size and
the resolved config). A checkpoint is written under a hidden ``.tmp-`` name and renamed into place
only when every rank has finished writing, so a crash at any moment leaves the newest complete
checkpoint loadable, and an existing checkpoint is never replaced by a partial one.

``save``/``load`` are collectives: every rank calls them. Only rank 0 renames and prunes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from safetensors.torch import save as safetensors_bytes

from gan.io import fsync_dir, write_file_atomic, write_json_atomic

_NAME = re.compile(r"^step-(\d{8})$")
META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that can't be used: the message names the path and the fix."""


def ckpt_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (a run's checkpoints/ dir), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}. Pass an existing checkpoints/step-XXXXXXXX "
                              f"directory, or --resume auto to continue from the newest one in the run directory")
    if not (path / META).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {META}); pass a checkpoints/step-XXXXXXXX "
                              f"directory written by launch/train.py")
    return json.loads((path / META).read_text())


def save(accelerator, root: str | Path, step: int, meta: dict, keep: int, extra=None) -> Path:
    """Collective. Writes ``root/step-XXXXXXXX`` atomically and keeps the newest ``keep``.
    ``extra(dir)``, run on every rank after Accelerate's state, writes what lives outside it
    (DeepSpeed engines: gan.backends)."""
    root = Path(root)
    tmp, final = root / f".tmp-{ckpt_name(step)}", root / ckpt_name(step)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if extra is not None:
        extra(tmp)
    accelerator.wait_for_everyone()  # every rank's RNG file is in place
    if accelerator.is_main_process:
        write_json_atomic(tmp / META, {**meta, "step": step, "world_size": accelerator.num_processes})
        fsync_dir(tmp)
        old = None
        if final.exists():  # same step saved again (e.g. after a resume): swap, never delete first
            old = root / f".old-{ckpt_name(step)}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for stale in list_checkpoints(root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: str | Path, extra=None) -> dict:
    """Collective. Restores everything ``save`` wrote and returns the checkpoint's meta."""
    meta = read_meta(path)
    accelerator.load_state(str(path))
    if extra is not None:
        extra(Path(path))
    return meta


def export_generator(out_dir: str | Path, g_ema, model_cfg: dict, step: int) -> None:
    """Rank 0: a small inference export, EMA G weights (safetensors) + the model config to build it.
    No pickled modules: ``gan.models.build_models(ModelConfig(**model.json['model']))`` rebuilds it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in g_ema.state_dict().items()}
    write_file_atomic(out / "G_ema.safetensors", safetensors_bytes(state, metadata={"step": str(step)}))
    write_json_atomic(out / "model.json", {"model": model_cfg, "step": step})

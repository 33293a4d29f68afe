"""Checkpoints on top of ``Accelerator.save_state``: what goes in, how it is written, and whether a
checkpoint can be resumed under the config given. The file layout is :mod:`gan.rundir`'s.

A checkpoint holds the family's networks (safetensors; the GAN: G, D), their optimizers, the fp16
scaler, every rank's RNG state and the named custom parts (the EMA copy, train state with the data
stream position, every network's schedule), plus ``meta.json`` (step, world size, family, network
names, resolved config, every file's size and sha256). Parts are named after the networks
(gan.rundir.parts_of), so the GAN's are G, D, opt_G, opt_D, ema, train_state, sched_G, sched_D. It is written under a
hidden ``.tmp-`` name, sealed and renamed into place only when every rank has written its part, so a
crash at any moment leaves the newest complete checkpoint loadable.

``save``/``load`` are collectives: every rank calls them. Only rank 0 seals, renames and prunes.
"""
from __future__ import annotations

import dataclasses
import errno
import shutil
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from gan.dist import any_rank
from gan.io import write_file_atomic, write_json_atomic
from gan.rundir import (META, NETS, CheckpointError, RunDir, RunDirError,  # noqa: F401
                        ema_weights_name, engine_model_file, part_file, parts_of, step_of, read_meta, seal, verify)

# Settings a resume can't change: the data stream position, the per-rank RNG states and the optimizer
# state are only meaningful under the values they were written with. Everything else in the config
# takes effect from the resumed step on (see gan.optim.apply_config).
FIXED_ON_RESUME = ("train.batch_size", "train.seed", "data.num_workers", "optim.name", "train.mixed_precision")


class SaveError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk); the previous one is still the newest."""


def register(accelerator, names: tuple, **parts) -> None:
    """Register the custom checkpoint parts by name, in the order of ``names`` (gan.rundir.parts_of:
    that order fixes their files); a part given as None is not one (no EMA copy)."""
    parts = {k: v for k, v in parts.items() if v is not None}
    if set(parts) != set(names):
        raise ValueError(f"checkpoint parts must be exactly {names}, got {sorted(parts)}")
    accelerator.register_for_checkpointing(*(parts[name] for name in names))


def _disk_full(error: BaseException | None, where: Path, expected: int) -> bool:
    e = error
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        e = e.__cause__ or e.__context__
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return False
    # torch.save reports a short write as "basic_ios::clear: iostream error", without errno
    return error is not None and free < max(1 << 20, expected)


def _save_error(run: RunDir, tmp: Path, error: BaseException | None, expected: int) -> SaveError:
    if error is None:
        return SaveError(f"checkpoint {tmp.name} could not be written on another rank (see its log); the newest "
                         f"checkpoint is still {run.latest_checkpoint()}")
    newest = run.latest_checkpoint()
    keep = f"the newest checkpoint is still {newest}" if newest else "no checkpoint was written"
    if _disk_full(error, tmp.parent, expected):
        free = shutil.disk_usage(tmp.parent).free
        return SaveError(f"no space left on device while writing checkpoint {tmp} ({free / 2**20:.1f} MiB free); "
                         f"{keep}. Free some space (or lower checkpoint.keep), then run again with --resume auto")
    return SaveError(f"could not write checkpoint {tmp}: {type(error).__name__}: {error}; {keep}")


def _size(path: Path | None) -> int:
    try:
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path else 0
    except OSError:
        return 0


def save(accelerator, run: RunDir, step: int, meta: dict, keep: int, extra=None) -> Path:
    """Collective. Writes ``step-X`` atomically and keeps it plus the newest ``keep - 1`` before it.
    Raises SaveError on every rank if any rank failed (nothing partial stays behind). ``extra(dir)``,
    run on every rank after Accelerate's state, writes what lives outside it (DeepSpeed's engines)."""
    tmp, main = run.tmp_checkpoint(step), accelerator.is_main_process
    expected = _size(run.latest_checkpoint())
    error = None
    if main:
        try:
            run.checkpoints.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        except OSError as e:
            error = e
    accelerator.wait_for_everyone()
    if error is None:
        try:
            accelerator.save_state(str(tmp))
            if extra is not None:
                extra(tmp)
        except Exception as e:  # noqa: BLE001 - reported below, on every rank
            error = e
    failed, = any_rank([error is not None], accelerator.device)  # also: every rank's RNG file is in place
    final = run.checkpoint(step)
    if not failed and main:
        nets, ema = meta.get("nets", NETS), meta.get("ema", True)
        models, optimizers, custom = parts_of(nets, ema)
        try:
            seal(tmp, {**meta, "step": step, "world_size": accelerator.num_processes,
                       "parts": {name: part_file(name, nets, ema) for name in
                                 (custom if extra is not None else models + optimizers + custom)}})
            run.publish(tmp, step)
            run.prune(keep, final)
        except OSError as e:
            error = e
    failed, = any_rank([error is not None], accelerator.device)
    if failed:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(run, tmp, error, expected)
    return final


def load(accelerator, path: str | Path, extra=None) -> dict:
    """Collective. Restores everything ``save`` wrote and returns the checkpoint's meta."""
    meta = read_meta(path)
    accelerator.load_state(str(path))
    if extra is not None:
        extra(Path(path))
    return meta


def ema_state(path: Path, meta: dict) -> dict:
    """The EMA network's weights in checkpoint ``path`` (``meta``: its meta.json): the ``ema`` part's "model"."""
    f = Path(path) / meta.get("parts", {}).get("ema", part_file("ema"))
    if not f.is_file():
        raise CheckpointError(f"{path} has no {f.name} (the EMA network); it was not written by launch/train.py")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)["model"]
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"could not read the EMA network from {f}: {e}") from None


def trained_state(path: Path, meta: dict, net: str) -> dict:
    """Network ``net``'s weights as training left them in checkpoint ``path`` (``meta``: its meta.json):
    Accelerate's safetensors part (DDP), or the DeepSpeed engine's module weights (:func:`engine_model_file`;
    in the precision the engine ran them, fp32 unless train.mixed_precision made it bf16 or fp16)."""
    from safetensors.torch import load_file

    deepspeed = backend_of(meta) == "deepspeed"
    f = Path(path) / (engine_model_file(net) if deepspeed else
                      meta.get("parts", {}).get(net) or part_file(net, meta.get("nets", NETS), meta.get("ema", True)))
    if not f.is_file():
        raise CheckpointError(f"{path} has no {f.relative_to(path)} (the trained {net} network); it was not "
                              f"written by launch/train.py")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)["module"] if deepspeed else load_file(str(f))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"could not read the trained {net} network from {f}: {e}") from None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def backend_of(meta: dict) -> str:
    """The backend a checkpoint was written by (checkpoints from before train.backend: ddp)."""
    return meta.get("backend") or meta.get("config", {}).get("train", {}).get("backend") or "ddp"


def _resume_hint(path: Path, family: str) -> str:
    """How to resume the ``family`` checkpoint at ``path`` (RUN/checkpoints/step-X): with the config the run
    saved (RUN/config.yaml, when it is that family's), else with one of the family's recipes. ``family=X``
    on another family's config would not do: that config's sections hold the other family's keys."""
    import yaml

    run = path.parent.parent
    saved = RunDir(run).config
    try:
        ok = (yaml.safe_load(saved.read_text()) or {}).get("family", "gan") == family
    except (OSError, yaml.YAMLError, AttributeError):
        ok = False
    if ok:
        return f"resume it with the config it was trained with: `--config {saved} --run-dir {run} --resume auto`"
    recipes = []
    for f in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        try:
            if (yaml.safe_load(f.read_text()) or {}).get("family", "gan") == family:
                recipes.append(f"configs/{f.name}")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
    return (f"resume it with a config of the {family} family ({', '.join(recipes) or 'family=' + family}, with "
            f"the settings of {path / META}'s \"config\") and `--run-dir {run} --resume auto`")


def check_resume(path: Path, meta: dict, cfg, world_size: int) -> list[str]:
    """Raise CheckpointError if ``cfg`` can't continue the checkpoint at ``path`` exactly (another
    architecture, world size or one of FIXED_ON_RESUME). Returns the changed keys that take effect
    from the resumed step on, as "key: old -> new" lines."""
    family = meta.get("family") or meta.get("config", {}).get("family") or "gan"  # before families: the GAN
    if family != cfg.family:
        raise CheckpointError(f"checkpoint {path} holds a {family} model and this run trains family={cfg.family}; "
                              f"{_resume_hint(path, family)}, or start a new --run-dir for the {cfg.family}")
    written_by = backend_of(meta)
    if written_by != cfg.train.backend:
        layout = "ZeRO partitions, one file per rank" if written_by == "deepspeed" else "whole, in Accelerate's files"
        raise CheckpointError(
            f"checkpoint {path} was written by the {written_by} backend and this run uses train.backend="
            f"{cfg.train.backend}. Resume it with train.backend={written_by}; it can't be converted in place (the "
            f"optimizer states are laid out differently: {layout}). Its EMA G export (RUN/export/) works with "
            f"either backend; to switch, start a new --run-dir")
    saved = _flat(meta.get("config", {}))
    ours = _flat(cfg.to_dict())
    from gan.startup import resolve_precision_source  # "auto" compared as this launch resolves it
    for d in (saved, ours):
        if "train.mixed_precision" in d:
            d["train.mixed_precision"] = resolve_precision_source(d["train.mixed_precision"])[0]
    arch = [f"model.{k}: checkpoint {saved.get(f'model.{k}')!r}, config {v!r}"
            for k, v in dataclasses.asdict(cfg.model).items() if saved.get(f"model.{k}") != v]
    if arch:
        raise CheckpointError(f"checkpoint {path} was written for a different architecture ({'; '.join(arch)}). "
                              f"Resume with the config saved in {path / META}, or start a new --run-dir")
    fixed = [f"{k}: checkpoint {saved[k]!r}, now {ours.get(k)!r}" for k in FIXED_ON_RESUME
             if k in saved and saved[k] != ours.get(k)]
    if meta.get("world_size", world_size) != world_size:
        fixed.insert(0, f"world size (processes): checkpoint {meta['world_size']}, now {world_size}")
    if fixed:
        raise CheckpointError(
            f"checkpoint {path} can't be resumed exactly under these settings ({'; '.join(fixed)}): the data "
            f"position, per-rank random states and optimizer state depend on them. Resume with the checkpoint's "
            f"values (launch as many processes as before; its config is in {path / META}), or start a new "
            f"--run-dir")
    return [f"{k}: {saved[k]!r} -> {v!r}" for k, v in ours.items() if k in saved and saved[k] != v]


def export_generator(out_dir: str | Path, ema_net, model_cfg: dict, step: int, family: str = "gan",
                     net: str = "G") -> None:
    """Rank 0: a small inference export, the EMA copy of network ``net`` (safetensors, ``<net>_ema.safetensors``)
    + ``model.json`` (family, network, model config, step) to rebuild it. No pickled modules:
    ``gan.metrics.load_generator`` rebuilds it through the family (``build_networks()[net]``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in ema_net.state_dict().items()}
    write_file_atomic(out / ema_weights_name(net), safetensors_bytes(state, metadata={"step": str(step)}))
    write_json_atomic(out / "model.json", {"family": family, "net": net, "model": model_cfg, "step": step})
    for stale in out.glob("*_ema.safetensors"):  # another network's (a directory reused by another family)
        if stale.name != ema_weights_name(net):
            stale.unlink(missing_ok=True)


def export_ema(out_dir: str | Path, ema_net, cfg, step: int) -> None:
    """Rank 0: :func:`export_generator` of a run's EMA network, named after its family's ``ema`` network."""
    import dataclasses

    from gan.family import get_family

    export_generator(out_dir, ema_net, dataclasses.asdict(cfg.model), step, cfg.family, get_family(cfg.family).ema)


def resume_point(run: RunDir, resume: str | None, cfg, world_size: int, writer: bool) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (None: a fresh start) and what to tell the user about it. Raises
    CheckpointError/RunDirError with the fix. ``writer``: this is rank 0, holding the run's lock, so it
    may set damaged checkpoints aside; every rank picks the same checkpoint from the same files."""
    notes: list[str] = []
    if resume is None:
        existing = sorted(p.name for p in run.checkpoints.glob("step-*") if step_of(p) is not None) \
            if run.checkpoints.is_dir() else []
        if existing:
            raise RunDirError(
                f"run directory {run.root} already holds checkpoints of a run (newest: {existing[-1]}, step "
                f"{step_of(existing[-1])}); nothing was changed. Pass --resume auto to continue it, --resume "
                f"{run.checkpoints / existing[-1]} to continue from a given one, or a new --run-dir to start over")
        return None, notes
    if resume == "auto":
        path, skipped = run.newest_valid()
        if path is None and skipped:
            raise CheckpointError(f"no checkpoint in {run.checkpoints} verifies: {'; '.join(skipped)}. Resume "
                                  f"from a copy you trust (--resume PATH), or start a new --run-dir")
        for line in skipped:
            notes.append(f"warning: skipped a damaged checkpoint: {line}")
        if writer and path is not None:
            for p in run.list_checkpoints():
                if p.name > path.name:
                    notes.append(f"moved the damaged checkpoint {p.name} aside to {run.set_aside(p)}")
        if path is None:
            return None, notes
        meta = verify(path)
    else:
        path = Path(resume)
        meta = verify(path)
        newer = [p.name for p in run.list_checkpoints() if p.name > path.name]
        if newer and path.resolve().parent == run.checkpoints.resolve():
            raise RunDirError(f"--resume {path}: {run.checkpoints} holds newer checkpoints ({', '.join(newer)}); "
                              f"continuing from an older one would mix two histories in one run directory. Use "
                              f"--resume auto, or start a new --run-dir with --resume {path}")
    changed = check_resume(path, meta, cfg, world_size)
    if changed:
        notes.append(f"resuming {path.name} with changed settings, in effect from step {meta.get('step')} on: "
                     + "; ".join(changed))
    return path, notes


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint in a run's ``checkpoints/`` directory ``root`` (see RunDir.latest_checkpoint)."""
    return RunDir(Path(root).parent).latest_checkpoint()

"""The run directory's on-disk contract, in one place: every path, the lock, ``status.json``,
``metrics.jsonl``, and the list / verify / prune of checkpoints. Other modules ask here for a path.

    RUN/.lock                  held (flock) by the training process of rank 0; holds its host and PID
    RUN/config.yaml            the resolved config of the latest start
    RUN/status.json            state (running | finished | preempted | failed), step, error, note
    RUN/metrics.jsonl          one JSON row per log interval (and per evaluation)
    RUN/samples/step-XXXXXXXX.png
    RUN/checkpoints/step-XXXXXXXX/   one complete checkpoint: the PARTS files + meta.json
    RUN/checkpoints/damaged-step-XXXXXXXX/   a checkpoint that failed verification (kept, never used)
    RUN/export/                G_ema.safetensors + model.json of the newest checkpoint
    RUN/best/, RUN/best.json   the EMA G of the best evaluation so far

A checkpoint is written as ``checkpoints/.tmp-step-X``, sealed (every file fsynced, then ``meta.json``
with each file's size and sha256) and renamed into place. Pruning renames to ``.trash-step-X`` before
deleting, so an interrupted prune never leaves a half-deleted checkpoint under a checkpoint's name;
the next start removes the hidden leftovers (:meth:`RunDir.clean_leftovers`). Nothing here calls a
collective.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import re
import shutil
import socket
from pathlib import Path

from gan.io import fsync_dir, sha256_file, write_json_atomic, write_text_atomic

META = "meta.json"
# The checkpoint parts by name -> the file Accelerate's save_state writes for each. Models and
# optimizers are numbered in the order they were passed to prepare(); custom objects in the order of
# register_for_checkpointing (gan.checkpoint.register keeps that order): use these names, not indices.
# They are named after the family's networks (gan.family.checkpoint_parts); these are the GAN's, and
# the names of a checkpoint whose meta.json records no "nets" (written before families).
NETS = ("G", "D")


def parts_of(nets=NETS, ema: bool = True) -> tuple[tuple, tuple, tuple]:
    """(models, optimizers, custom parts) of a checkpoint of the networks ``nets``, in their order."""
    nets = tuple(nets)
    custom = (("ema",) if ema else ()) + ("train_state",) + tuple(f"sched_{n}" for n in nets)
    return nets, tuple(f"opt_{n}" for n in nets), custom


MODELS, OPTIMIZERS, CUSTOM = parts_of()
SCALER_FILE = "scaler.pt"
EMA_WEIGHTS = "G_ema.safetensors"  # in RUN/export/ and RUN/best/, beside model.json (the GAN's; see ema_weights_name)
_NAME = re.compile(r"^step-(\d{8})$")
_HIDDEN = re.compile(r"^\.(tmp|trash|old)-(step-\d{8})$")


def ema_weights_name(net: str = "G") -> str:
    """The export file of the EMA copy of network ``net`` (a family's ``ema``): ``G_ema.safetensors`` for
    the GAN and pix2pix, ``vae_ema.safetensors`` for the VAE."""
    return f"{net}_ema.safetensors"


def ema_weights(directory: Path) -> Path:
    """The EMA weights in an export directory (RUN/export, RUN/best): the one ``*_ema.safetensors`` there,
    else (none yet) the GAN's name, for messages."""
    found = sorted(directory.glob("*_ema.safetensors")) if directory.is_dir() else []
    return found[0] if found else directory / EMA_WEIGHTS


def part_file(name: str, nets=NETS, ema: bool = True) -> str:
    """File name of a named checkpoint part of a checkpoint of ``nets`` (see :func:`parts_of`)."""
    models, optimizers, custom = parts_of(nets, ema)
    for names, fmt in ((models, "model{}.safetensors"), (optimizers, "optimizer{}.bin")):
        if name in names:
            i = names.index(name)
            return fmt.format(f"_{i}" if i else "")
    if name in custom:
        return f"custom_checkpoint_{custom.index(name)}.pkl"
    raise KeyError(f"unknown checkpoint part {name!r}; known: {', '.join(models + optimizers + custom)}")


def engine_model_file(net: str) -> str:
    """The file in a DeepSpeed checkpoint that holds network ``net``'s weights (rank 0 writes it; ZeRO-1/2
    partition only the optimizer state, one ``zero_pp_rank_R_mp_rank_00_optim_states.pt`` per rank beside it)."""
    return f"deepspeed/{net}/mp_rank_00_model_states.pt"


def rng_file(rank: int) -> str:
    return f"random_states_{rank}.pkl"


def required_files(world_size: int, backend: str = "ddp", nets=NETS, ema: bool = True) -> list[str]:
    """Files every checkpoint of networks ``nets`` must hold (scaler.pt only with fp16, so not listed).
    Under DeepSpeed the engines hold the networks and their optimizers (gan.backends.DeepSpeedBackend.save):
    one weights file and one optimizer partition per rank for each."""
    models, optimizers, custom = parts_of(nets, ema)
    ranks = [rng_file(r) for r in range(world_size)]
    if backend == "deepspeed":
        engines = [f for net in models for f in [engine_model_file(net)] + [
            f"deepspeed/{net}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)]]
        return engines + [part_file(n, nets, ema) for n in custom] + ranks
    return [part_file(n, nets, ema) for n in models + optimizers + custom] + ranks


class CheckpointError(ValueError):
    """A checkpoint that can't be used: the message names the file and the fix."""


class RunDirError(RuntimeError):
    """The run directory can't be used as asked (in use, or holds another run): the message says why."""


def ckpt_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: str | Path) -> int | None:
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------- checkpoint files


def seal(ckpt: Path, meta: dict) -> None:
    """Fsync every file in ``ckpt``, then write ``meta.json`` listing each one's size and sha256.
    ``meta.json`` is written last: a directory without it is not a checkpoint."""
    files = {}
    for p in sorted(ckpt.rglob("*")):  # DeepSpeed's engines write into subdirectories
        if p.name == META or not p.is_file():
            continue
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        files[p.relative_to(ckpt).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    for d in sorted({p.parent for p in ckpt.rglob("*") if p.is_file()}, reverse=True):
        fsync_dir(d)
    write_json_atomic(ckpt / META, {**meta, "files": files})
    fsync_dir(ckpt)


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}. Pass an existing checkpoints/step-XXXXXXXX "
                              f"directory, or --resume auto to continue from the newest one in the run directory")
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {META}); pass a checkpoints/step-XXXXXXXX "
                              f"directory written by launch/train.py")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path} is damaged ({e}); resume from another checkpoint") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} is damaged (not a JSON object); resume from another checkpoint")
    return meta


def verify(path: str | Path) -> dict:
    """The checkpoint's meta after checking every file against its recorded size and sha256 and that
    every part (and every rank's RNG state) is there. Raises CheckpointError naming the file."""
    path = Path(path)
    meta = read_meta(path)
    files = meta.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{path / META} has no file checksums (written by an older version, or damaged); "
                              f"it can't be verified. Resume from a checkpoint written by this version")
    try:
        world_size = int(meta["world_size"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path / META} is damaged (no world_size); resume from another checkpoint") from None
    nets, ema = meta.get("nets", NETS), meta.get("ema", True)  # before families: the GAN's
    for name in required_files(world_size, meta.get("backend", "ddp"), nets, ema):
        if name not in files:
            raise CheckpointError(f"{path / name} is not recorded in {path / META}: the checkpoint is incomplete; "
                                  f"resume from another checkpoint")
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing from checkpoint {path}; resume from another checkpoint")
        size = f.stat().st_size
        if size != rec.get("size"):
            raise CheckpointError(f"{f} is damaged: {size} bytes, {rec.get('size')} when written; resume from "
                                  f"another checkpoint")
        if sha256_file(f) != rec.get("sha256"):
            raise CheckpointError(f"{f} is damaged: its sha256 differs from the one recorded when it was written; "
                                  f"resume from another checkpoint")
    return meta


# ---------------------------------------------------------------------------- the lock


_HELD: dict[Path, int] = {}  # lock file -> fd held by this process (one flock per open file description)


def _read_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"PID {info['pid']} on host {info['host']} (since {info.get('since', '?')})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its host and PID yet)"


# ---------------------------------------------------------------------------- the directory


class RunDir:
    """Paths and rank-0 bookkeeping of one run directory. Reading is safe from any process; the
    writing methods are for rank 0 of the run that holds the lock."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # paths
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def status_file(self) -> Path:
        return self.root / "status.json"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def export_weights(self) -> Path:
        return ema_weights(self.export)

    @property
    def best_weights(self) -> Path:
        return ema_weights(self.best)

    @property
    def best_json(self) -> Path:
        return self.root / "best.json"

    @property
    def metrics_json(self) -> Path:
        """launch/evaluate.py's merged results."""
        return self.root / "metrics.json"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def sample_png(self, step: int) -> Path:
        return self.samples / f"{ckpt_name(step)}.png"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / ckpt_name(step)

    def tmp_checkpoint(self, step: int) -> Path:
        return self.checkpoints / f".tmp-{ckpt_name(step)}"

    # checkpoints
    def list_checkpoints(self) -> list[Path]:
        """Checkpoints (``step-X`` with meta.json), oldest first. Not verified: see :meth:`newest_valid`."""
        root = self.checkpoints
        if not root.is_dir():
            return []
        found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / META).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest_checkpoint(self) -> Path | None:
        found = self.list_checkpoints()
        return found[-1] if found else None

    def newest_valid(self) -> tuple[Path | None, list[str]]:
        """The newest checkpoint that verifies, and one line per newer one skipped (path: why)."""
        skipped = []
        for path in reversed(self.list_checkpoints()):
            try:
                verify(path)
                return path, skipped
            except CheckpointError as e:
                skipped.append(str(e))
        return None, skipped

    def set_aside(self, path: Path) -> Path:
        """Rename a checkpoint that failed verification to ``damaged-step-X`` (kept, never used again)."""
        dest = path.with_name(f"damaged-{path.name}")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(path, dest)
        fsync_dir(path.parent)
        return dest

    def publish(self, tmp: Path, step: int) -> Path:
        """Rename a sealed ``.tmp-step-X`` into place; an existing ``step-X`` (same step saved again) is
        swapped out first, never deleted before the new one is in place."""
        final = self.checkpoint(step)
        old = self.checkpoints / f".old-{final.name}"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(self.checkpoints)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def prune(self, keep: int, written: Path) -> list[Path]:
        """Keep ``written`` and the newest ``keep - 1`` checkpoints older than it; newer ones (there are
        none unless someone copied them in) are never touched. Each goes to ``.trash-`` before deletion."""
        older = [p for p in self.list_checkpoints() if p.name < written.name]
        doomed = older[:max(0, len(older) - (keep - 1))]
        for p in doomed:
            trash = p.with_name(f".trash-{p.name}")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(p, trash)
        if doomed:
            fsync_dir(self.checkpoints)
        for p in doomed:
            shutil.rmtree(p.with_name(f".trash-{p.name}"), ignore_errors=True)
        return doomed

    def clean_leftovers(self) -> list[str]:
        """What a crash (or a full disk) left behind: partial saves (``.tmp-``) and interrupted prunes
        (``.trash-``) are removed; a swap interrupted between its renames (``.old-`` without its
        ``step-X``) is put back. Call only while holding the lock. Returns what was done, one line each."""
        done = []
        if not self.checkpoints.is_dir():
            return done
        for p in sorted(self.checkpoints.iterdir()):
            m = _HIDDEN.match(p.name)
            if not m:
                continue
            kind, final = m.group(1), p.with_name(m.group(2))
            if kind == "old" and not final.exists() and (p / META).is_file():
                os.replace(p, final)
                done.append(f"restored {final} from an interrupted save")
            else:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                done.append(f"removed {p} ({'partial save' if kind == 'tmp' else 'interrupted prune'})")
        fsync_dir(self.checkpoints)
        return done

    # the lock
    def lock(self) -> None:
        """Take the run directory for this process (rank 0 of a run) until it exits. Raises RunDirError
        naming the holder if another live process has it. A lock left by a dead process is released
        by the OS (flock), so it is simply taken over."""
        path = self.lock_file.resolve()
        if path in _HELD:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise RunDirError(f"can't lock {path}: its filesystem does not support file locks ({e.strerror}); "
                                  f"put the run directory on one that does (Lustre: mount with -o flock)") from None
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            raise RunDirError(f"run directory {self.root} is in use by {_read_holder(path)}: one run directory "
                              f"takes one training run. Wait for it to end (or stop it), or pass another "
                              f"--run-dir") from None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if not current:  # a refused start removed this file after we opened it (unlock): lock the path anew
            os.close(fd)
            return self.lock()
        _HELD[path] = fd
        self._write_holder(fd)

    def unlock(self) -> None:
        """Give up the lock this process holds (nothing if it holds none) and remove ``.lock``: a start
        refused after :meth:`lock` leaves the directory as it found it. The file goes first, while still
        locked, so another process never takes a file that is about to vanish (:meth:`lock` checks)."""
        fd = _HELD.pop(self.lock_file.resolve(), None)
        if fd is None:
            return
        try:
            self.lock_file.unlink(missing_ok=True)
        finally:
            os.close(fd)

    @staticmethod
    def _write_holder(fd: int) -> None:
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
            os.fsync(fd)
        except OSError:
            pass  # a full disk: the lock still holds, only the holder's name is missing

    def holds_lock(self) -> bool:
        return self.lock_file.resolve() in _HELD

    # status and metrics (rank 0)
    def write_status(self, state: str, step: int, max_steps: int, error: str | None = None, **fields) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.status_file, {"state": state, "step": step, "max_steps": max_steps,
                                             "updated": _now(), "error": error, **fields})

    def read_status(self) -> dict | None:
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return None

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, step: int) -> int:
        """Drop the rows after ``step`` (written after the checkpoint a run resumes from, so they are
        written again). Returns how many were dropped."""
        path = self.metrics_file
        if not path.is_file():
            return 0
        lines = path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                if int(json.loads(line).get("step", 0)) > step:
                    continue
            except (ValueError, TypeError, AttributeError):
                continue  # a torn last line of a crashed run
            keep.append(line)
        if len(keep) != len(lines):
            write_text_atomic(path, "".join(x + "\n" for x in keep))
        return len(lines) - len(keep)

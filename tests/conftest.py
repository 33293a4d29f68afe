"""Shared fixtures.

``tiny_shards``: a small real shard set (dataset "tiny10", 10 classes, 3x32x32, 240 samples in 3 raw
shards of 80) built with data_shards; each class has its own colour so a conditional model has
something to learn. ``tiny_shards_gray28``: the same idea at 1x28x28 (Fashion-MNIST-like, 120 samples).
Both are session-scoped and read-only: copy them before changing anything.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # import this checkout's packages even when pytest is run as a script
    sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_images(n: int, channels: int, size: int, num_classes: int = 10, seed: int = 0):
    """Distinct uint8 images (N, C, H, W) whose mean colour depends on the class, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    palette = rng.integers(40, 216, size=(num_classes, channels, 1, 1))
    yy, xx = np.mgrid[0:size, 0:size]
    ramp = ((xx + yy) * (60.0 / (2 * size)))[None]  # a soft diagonal gradient
    noise = rng.integers(-30, 31, size=(n, channels, size, size))
    imgs = palette[labels] + ramp[None] + noise
    return np.clip(imgs, 0, 255).astype(np.uint8), labels.astype(np.int64)


def build_tiny(out: Path, n: int, channels: int, size: int, shard_size: int, name: str,
               encoding: str = "raw", split: str = "train") -> Path:
    from data_shards import array_source, build_shards

    imgs, labels = tiny_images(n, channels, size)
    src = array_source(name, [f"class{k}" for k in range(10)], imgs, labels)
    build_shards(src, out, split, name, encoding=encoding, shard_size=shard_size, log=None)
    return out


def train_cmd(run_dir, shards, *overrides, resume=None) -> list[str]:
    """The command line of a launch/train.py run of configs/debug_cpu.yaml on ``shards``."""
    cmd = [sys.executable, "launch/train.py", "--config", "configs/debug_cpu.yaml", "--run-dir", str(run_dir)]
    if resume:
        cmd += ["--resume", str(resume)]
    return cmd + [f"data.shards={shards}", *overrides]


def train_debug(run_dir, shards, *overrides, resume=None, env=None, timeout=300, check=True):
    """Run :func:`train_cmd` in a subprocess (``env`` added to this one's); with ``check``, it must succeed."""
    r = subprocess.run(train_cmd(run_dir, shards, *overrides, resume=resume), cwd=REPO, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check:
        assert r.returncode == 0, f"train failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


def fit_in_process(cfg, run, resume=None) -> list[dict]:
    """Train ``cfg`` into ``run`` in this process through the trainer (preflight, fit, close), as
    launch/train.py does; it must finish. Returns the rows of the run's metrics.jsonl."""
    from gan.trainer import Trainer, preflight

    t = Trainer(cfg, run, preflight(cfg, run, resume))
    try:
        assert t.fit() == "finished"
    finally:
        t.close()
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def preempt_one_rank(proc: subprocess.Popen, run, timeout: float = 300) -> tuple[str, str]:
    """Once ``proc`` (torchrun of launch/train.py, stdout/stderr piped) has logged a step into ``run``,
    send SIGUSR2 to ONE of its ranks (the ranks must agree among themselves) and wait for the end.
    Returns (stdout, stderr); the process is killed if anything goes wrong."""
    import time

    import psutil

    try:
        deadline = time.time() + timeout
        while not (Path(run) / "metrics.jsonl").is_file():  # training is under way
            assert proc.poll() is None and time.time() < deadline, "no step was logged"
            time.sleep(0.05)
        # torchrun's own children are the ranks (their loader workers, forked, share the command line)
        ranks = [p for p in psutil.Process(proc.pid).children() if "launch/train.py" in " ".join(p.cmdline())]
        assert len(ranks) == 2, ranks
        ranks[-1].send_signal(signal.SIGUSR2)
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def ddp_data_check(shards, out, *args) -> list[dict]:
    """tests/ddp_data_check.py on 2 gloo ranks (torchrun) over ``shards``, batch 16, 3 epochs, plus ``args``;
    returns each rank's JSON report (what its stream yielded)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ddp_data_check.py"), "--shards", str(shards), "--out", str(out),
           "--batch-size", "16", "--epochs", "3", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"2-rank data run {' '.join(args)} hung (timeout): {e.stdout}\n{e.stderr}")
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads((Path(out) / f"rank{k}.json").read_text()) for k in (0, 1)]


def load_cli(name: str):
    """launch/<name>.py as a module, to call its main() in this process."""
    spec = importlib.util.spec_from_file_location(f"{name}_cli", REPO / "launch" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Directory of a 10-class 3x32x32 shard set (240 samples, 3 shards); pass as data.shards."""
    return build_tiny(tmp_path_factory.mktemp("tiny_shards") / "shards", 240, 3, 32, 80, "tiny10")


@pytest.fixture(scope="session")
def tiny_shards_gray28(tmp_path_factory) -> Path:
    """Directory of a 10-class 1x28x28 shard set (120 samples, 2 shards)."""
    return build_tiny(tmp_path_factory.mktemp("tiny_shards_gray28") / "shards", 120, 1, 28, 60, "tiny10-gray")


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory, tiny_shards) -> Path:
    """A tiny classifier for the tiny10 classes, trained by benchmarks/train_classifier.py itself."""
    d = tmp_path_factory.mktemp("tiny_classifier")
    out = d / "cls.safetensors"
    r = subprocess.run([sys.executable, "benchmarks/train_classifier.py", "--train-shards", str(tiny_shards),
                        "--test-shards", str(tiny_shards), "--widths", "8,8,16,16", "--epochs", "2",
                        "--batch-size", "32", "--out", str(out), "--work", str(d / "work")],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    return out

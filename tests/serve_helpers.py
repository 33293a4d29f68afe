"""A real launch/serve.py process on 127.0.0.1 (a free port), always stopped."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*args: str, timeout: float = 180):
    """Start ``launch/serve.py ARGS --host 127.0.0.1 --port P``, wait for /health, yield the base URL; stop it."""
    with server_process(*args, timeout=timeout) as (url, _):
        yield url


@contextlib.contextmanager
def server_process(*args: str, timeout: float = 180, cpus: set[int] | None = None):
    """:func:`running_server`, yielding ``(url, subprocess.Popen)``; ``cpus``: run it on those cores only."""
    port = free_port()
    pin = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
    cmd = [*pin, sys.executable, "launch/serve.py", *args, "--host", "127.0.0.1", "--port", str(port)]
    with serving(cmd, port, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout) as proc:
        yield f"http://127.0.0.1:{port}", proc


@contextlib.contextmanager
def serving(cmd: list[str], port: int, cwd, env: dict, timeout: float = 180):
    """Start the server command ``cmd`` (in its own process group), wait until 127.0.0.1:``port``/health
    answers 200, yield the process; stop the group on the way out. A server that exits first is an error
    with its output."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {proc.stdout.read()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer /health within {timeout} s")
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# ---------------------------------------------------------------------------- tiny runs of the other families
SMALL = ["data.num_workers=0", "data.dataset=", "train.max_steps=2", "train.batch_size=8", "train.mixed_precision=no",
         "log.with=", "log.progress=false", "log.sample_every=100", "checkpoint.every=2"]


def train_recipe(run: Path, recipe: str, shards: Path, *overrides: str) -> Path:
    """launch/train.py --config RECIPE on ``shards`` for 2 steps, tiny widths (``overrides``); must succeed."""
    r = subprocess.run([sys.executable, "launch/train.py", "--config", recipe, "--run-dir", str(run),
                        f"data.shards={shards}", *SMALL, *overrides], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, f"train failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return run


def vae_run(run: Path, shards: Path) -> Path:
    """A 2-step run of configs/cifar10_vae.yaml (class-conditional decoder) on 3x32x32 shards."""
    return train_recipe(run, "configs/cifar10_vae.yaml", shards, "model.channels=8", "model.latent_dim=16")


def sketch_pairs(root: Path, n: int = 24) -> Path:
    """Paired shards built as the README's pix2pix recipe builds them (``data_shards build --source paired
    --derive sketch``) from a folder of ``n`` 32x32 photos: 1-channel sketches in, 3-channel photos out."""
    import numpy as np
    from PIL import Image

    from conftest import tiny_images

    imgs, labels = tiny_images(n, 3, 32)
    for i, (img, y) in enumerate(zip(imgs, labels)):
        d = root / "photos" / f"class{y}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(d / f"{i:03d}.png")
    out = root / "shards"
    r = subprocess.run([sys.executable, "-m", "data_shards", "build", "--source", "paired", "--derive", "sketch",
                        "--root", str(root / "photos"), "--split", "train", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def pix2pix_run(run: Path, shards: Path) -> Path:
    """A 2-step run of configs/cifar10_sketch_pix2pix.yaml (sketch 1 channel -> photo 3 channels, 32 px)."""
    return train_recipe(run, "configs/cifar10_sketch_pix2pix.yaml", shards, "val.shards=", "val.pictures=2",
                        "model.g_channels=4", "model.d_channels=4")


def png(array, mode: str | None = None) -> bytes:
    """A PNG of a uint8 array (H, W) or (H, W, C)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG")
    return buf.getvalue()

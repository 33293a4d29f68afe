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
    proc = subprocess.Popen([*pin, sys.executable, "launch/serve.py", *args, "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {proc.stdout.read()}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer /health within {timeout} s")
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

"""The serving image: build docker/serve.Dockerfile and smoke-test it (GET /health, POST /generate) where a
container engine runs; otherwise skip with the reason."""
from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request

import pytest

from conftest import REPO
from serve_helpers import free_port


def engine() -> str:
    """The first of docker/podman whose `info` succeeds, else skip saying why."""
    reasons = []
    for name in ("docker", "podman"):
        if not shutil.which(name):
            reasons.append(f"{name} is not installed")
            continue
        r = subprocess.run([name, "info"], capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            return name
        reasons.append(f"`{name} info` failed: {((r.stderr or r.stdout).strip().splitlines() or [''])[-1]}")
    pytest.skip("no container engine runs here (" + "; ".join(reasons) + ")")


@pytest.mark.slow
def test_serving_image_builds_and_answers(tmp_path, tiny_shards):
    eng = engine()
    # Base images must already be in the local store: the test never pulls from a container registry.
    dockerfile = REPO / "docker" / "serve.Dockerfile"
    bases = [line.split()[1] for line in dockerfile.read_text().splitlines() if line.upper().startswith("FROM ")]
    missing = [b for b in bases if subprocess.run([eng, "image", "inspect", b], capture_output=True,
                                                  timeout=60).returncode != 0]
    if missing:
        pytest.skip(f"{eng} runs, but the base image(s) {', '.join(missing)} are not in its local store and "
                    f"tests pull nothing from a container registry; `{eng} pull {missing[0]}` where one is reachable")
    r = subprocess.run([eng, "build", "-f", str(dockerfile), "-t", "gan-serve:test", "."], cwd=REPO,
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    from conftest import train_debug
    from gan.export import export

    train_debug(tmp_path / "run", tiny_shards, "train.max_steps=5")
    export(tmp_path / "run", tmp_path / "art")
    port = free_port()
    name = f"gan-serve-test-{port}"
    subprocess.run([eng, "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", "-v", f"{tmp_path / 'art'}:/model:ro",
                    "gan-serve:test", "--artifact", "/model"], check=True, timeout=300)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except OSError:
                time.sleep(1)
        req = urllib.request.Request(url + "/generate", data=b'{"class": 1, "n": 4, "seed": 3}',
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/png"
    finally:
        subprocess.run([eng, "rm", "-f", name], capture_output=True, timeout=120)

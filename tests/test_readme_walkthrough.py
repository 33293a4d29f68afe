"""The README's command sequences, run as written, one family at a time, in a fresh directory.

A fenced block just after ``<!-- walkthrough: FAMILY -->`` in README.md belongs to FAMILY's sequence;
the family's blocks, in README order, are what a newcomer types: build the shards, train, resume,
evaluate, sample, export, serve, one request. Each command runs in a fresh directory (``repo/``
holding links to this checkout's launch/ and configs/, this checkout on PYTHONPATH, the test's python
first on PATH) beside ``shared/data/cifar10-jpeg.tar.gz``: 20 train and 10 test images per class of
the real shared copy, in its layout, so the commands' own paths (``../shared/data/...``) hold and every
shard build and evaluation is small. What else is changed, and what is not run, is in REWRITES,
TRAIN_TINY, TINY_MODELS and SKIP below, nothing else; a command that exits non-zero fails the test
("refused as written"), and a request must answer a PNG.
"""
from __future__ import annotations

import collections
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA
from serve_helpers import free_port, serving

CIFAR_JPEG = SHARED_DATA / "cifar10-jpeg.tar.gz"
FAMILIES = ("gan", "vae", "pix2pix")
PER_CLASS = {"train": 20, "test": 10}  # images per class of the tiny copy: more than a batch (8), seconds to build

# (pattern, replacement, why): applied to every command, in this order. {port} is a free port.
REWRITES = [
    (r" \[[^\]]*\]", "", "an optional part [in brackets] of a synopsis is left out"),
    (r"--num-samples \d+", "--num-samples 100", "evaluate 100 generated images, not 10,000"),
    (r"--num \d+", "--num 10", "export 10 pictures, not 10,000"),
    (r"metrics\.every=\d+", "metrics.every=2", "evaluate in training within the tiny run's steps"),
    (r"--port 8000", "--port {port}", "a free port"),
    (r"localhost:8000", "127.0.0.1:{port}", "the server started on that port"),
]
# appended to every launch/train.py command, and train.max_steps=2 more than the run directory's last command
# asked for (so a resume trains 2 more steps)
TRAIN_TINY = {
    "log.every=1": "a metrics.jsonl row per step",
    "checkpoint.every=2": "a checkpoint per 2 steps, so a resume has one to continue from",
    "data.num_workers=2": "the recipes' 4 loader workers on a 2-core machine, halved (still workers)",
    "train.batch_size=8": "small steps (the tiny data set has 200 images)",
    "log.progress=false": "no progress bar in the captured output",
}
TINY_MODELS = {  # appended to the training commands of these recipes: narrow networks
    "configs/cifar10_cdcgan.yaml": "model.g_channels=16 model.d_channels=16",
    "configs/cifar10_vae.yaml": "model.channels=8 model.latent_dim=16",
    "configs/cifar10_sketch_pix2pix.yaml": "model.g_channels=8 model.d_channels=8",
}
# (pattern, why): a command matching one is not run. Every rule must match some marked command.
SKIP = [
    (r"--multi_gpu|--num_processes 8", "needs a node of GPUs"),
    (r"--inception-weights", "needs torch-fidelity's Inception weights file"),
    (r"^pip install", "installs packages (the test's environment has them)"),
    (r"runs/biggan", "a run of another recipe, which the sequence does not train"),
    (r"--best", "needs RUN/best, which in-training evaluation writes; the GAN's sequence turns none on"),
]


def strip_comment(line: str) -> str:
    """The line without its shell comment (a # at the start or after a space, never inside quotes)."""
    cmd = re.sub(r"(^|\s)#.*$", "", line).strip()
    assert shlex.split(cmd) == shlex.split(line, comments=True), f"a # inside quotes: {line}"
    return cmd


def sequences(text: str) -> dict[str, list[str]]:
    """{family: its marked blocks' commands in order}: continuation lines joined, comments dropped."""
    seqs: dict[str, list[str]] = collections.defaultdict(list)
    for family, body in re.findall(r"<!-- walkthrough: (\S+) -->\n```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            if cmd := strip_comment(line):
                seqs[family].append(cmd)
    return dict(seqs)


def skipped(cmd: str) -> str | None:
    return next((why for pattern, why in SKIP if re.search(pattern, cmd)), None)


def rewrite(cmd: str, port: int, steps: collections.Counter) -> str:
    """``cmd`` as run: REWRITES, then TRAIN_TINY (+ TINY_MODELS, + the next train.max_steps) on training."""
    for pattern, repl, _ in REWRITES:
        cmd = re.sub(pattern, repl.format(port=port), cmd)
    if "launch/train.py" in cmd:
        config = re.search(r"--config (\S+)", cmd).group(1)
        run = re.search(r"--run-dir (\S+)", cmd)
        run_dir = run.group(1) if run else f"runs/{Path(config).stem}"
        if "--dry-run" not in cmd:
            steps[run_dir] += 2
        cmd += f" {' '.join(TRAIN_TINY)} {TINY_MODELS.get(config, '')} train.max_steps={max(steps[run_dir], 2)}"
    return cmd


@pytest.fixture(scope="module")
def readme_sequences() -> dict[str, list[str]]:
    return sequences((REPO / "README.md").read_text())


def test_every_family_has_a_walkthrough_and_every_rule_is_used(readme_sequences):
    assert sorted(readme_sequences) == sorted(FAMILIES)
    for family, cmds in readme_sequences.items():
        ran = [c for c in cmds if not skipped(c)]
        for step in ("launch/train.py", "--resume auto", "launch/evaluate.py", "launch/sample.py",
                     "launch/export.py", "launch/serve.py", "curl "):
            assert any(step in c for c in ran), f"{family}'s README sequence runs no {step!r}"
        assert ran.index(next(c for c in ran if "launch/serve.py" in c)) < ran.index(
            next(c for c in ran if c.startswith("curl "))), f"{family}: a request before the server"
    every = [c for cmds in readme_sequences.values() for c in cmds]
    for pattern, _ in SKIP:
        assert any(re.search(pattern, c) for c in every), f"SKIP rule {pattern!r} matches no marked command"
    for pattern, _, _ in REWRITES:
        assert any(re.search(pattern, c) for c in every), f"REWRITES rule {pattern!r} matches no marked command"
    for config in TINY_MODELS:
        assert any(config in c for c in every), f"TINY_MODELS names {config}, which no marked command trains"


@pytest.fixture(scope="module")
def tiny_cifar_jpeg(tmp_path_factory) -> Path:
    """shared/data/cifar10-jpeg.tar.gz: the first PER_CLASS images of each class and split of the real copy."""
    if not CIFAR_JPEG.is_file():
        pytest.skip(f"the README's sequences read {CIFAR_JPEG}, which is absent here")
    out = tmp_path_factory.mktemp("shared") / "data" / CIFAR_JPEG.name
    out.parent.mkdir(parents=True)
    with tarfile.open(CIFAR_JPEG) as src, tarfile.open(out, "w:gz") as dst:
        for m in src:
            parts = m.name.split("/")  # cifar10-jpeg/{train,test}/<class>/NNNN.jpg
            if not m.isfile() or int(Path(m.name).stem) < PER_CLASS[parts[1]]:
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    return out


def run(cmd: str, doc: str, cwd: Path, env: dict) -> None:
    r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode:
        pytest.fail(f"documented command refused (exit {r.returncode}):\n  {doc}\nrun as:\n  {cmd}\n"
                    f"{(r.stdout + r.stderr)[-3000:]}")


def check_png(cmd: str, cwd: Path) -> None:
    out = cwd / re.search(r"-o (\S+)", cmd).group(1)
    body = out.read_bytes()
    assert body.startswith(b"\x89PNG\r\n\x1a\n"), f"{cmd}\nanswered no PNG: {body[:500]!r}"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_readme_sequence_runs_as_written(family, readme_sequences, tiny_cifar_jpeg, tmp_path):
    if not shutil.which("curl"):
        pytest.skip("the README's requests are curl commands; curl is not installed")
    cwd = tmp_path / "repo"
    cwd.mkdir()
    (tmp_path / "shared").symlink_to(tiny_cifar_jpeg.parents[1])
    for name in ("launch", "configs"):
        (cwd / name).symlink_to(REPO / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GAN_METRICS_CACHE": str(tmp_path / "cache"),
           "GAN_METRICS_NO_DOWNLOAD": "1"}
    port, steps = free_port(), collections.Counter()
    with contextlib.ExitStack() as server:
        for doc in readme_sequences[family]:
            if skipped(doc):
                continue
            cmd = rewrite(doc, port, steps)
            if "launch/serve.py" in cmd:  # in the background until the sequence ends (or the next server)
                server.close()
                try:
                    server.enter_context(serving(["bash", "-c", f"exec {cmd}"], port, cwd=cwd, env=env))
                except RuntimeError as e:
                    pytest.fail(f"documented command refused:\n  {doc}\nrun as:\n  {cmd}\n{e}")
            else:
                run(cmd, doc, cwd, env)
                if cmd.startswith("curl "):
                    check_png(cmd, cwd)

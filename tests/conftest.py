"""Shared fixtures.

``tiny_shards``: a small real shard set (dataset "tiny10", 10 classes, 3x32x32, 240 samples in 3 raw
shards of 80) built with data_shards; each class has its own colour so a conditional model has
something to learn. ``tiny_shards_gray28``: the same idea at 1x28x28 (Fashion-MNIST-like, 120 samples).
``tiny_pairs``: paired shards (input, target) for pix2pix, 3x64x64. All are session-scoped and
read-only: copy them before changing anything.

Runs on 2 gloo ranks: :func:`train_cmd` with ``ranks=2`` (torchrun), :func:`train_2ranks`; the backends
compared against DDP (:data:`BACKENDS`) and :func:`assert_zero_matches_ddp`. A run's EMA network and
its checkpoint's trained one loaded by hand: :func:`ema_and_trained`; evaluate.py's results of the two kept
apart: :func:`assert_nets_kept_apart`.
"""
from __future__ import annotations

import importlib.util
import json
import math
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


TWO_RANKS_ENV = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}  # gloo on the CPU, one thread per rank
BACKENDS = {  # the overrides of each backend a ZeRO run is compared on (fp32, same seed and data)
    "ddp": [],
    "zero1": ["train.backend=deepspeed", "deepspeed.stage=1"],
    "zero2": ["train.backend=deepspeed", "deepspeed.stage=2", "deepspeed.config=configs/deepspeed/zero2.json"],
}


def train_cmd(run_dir, shards, *overrides, resume=None, config="configs/debug_cpu.yaml", ranks=1) -> list[str]:
    """The command line of a launch/train.py run of ``config`` on ``shards``; ``ranks`` > 1: under
    torchrun (--standalone), one process per rank."""
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    cmd = [*launcher, "launch/train.py", "--config", str(config), "--run-dir", str(run_dir)]
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


def train_2ranks(run_dir, shards, *overrides, resume=None, config="configs/debug_cpu.yaml", code=0,
                 timeout=600) -> subprocess.CompletedProcess:
    """:func:`train_cmd` on 2 gloo ranks (torchrun, ACCELERATE_USE_CPU=1); it must exit with ``code``."""
    r = subprocess.run(train_cmd(run_dir, shards, *overrides, resume=resume, config=config, ranks=2), cwd=REPO,
                       capture_output=True, text=True, timeout=timeout, env={**os.environ, **TWO_RANKS_ENV})
    assert r.returncode == code, f"exit {r.returncode}, wanted {code}:\n{r.stdout}\n{r.stderr[-6000:]}"
    return r


def metrics_rows(run_dir) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# Metrics of the same samples evaluated on 1 and 2 ranks (and against a one-process reference that takes
# every sample in one batch). The networks run in float32 on batches of other shapes, so a feature can
# differ in its last bits (2^-24 relative per rounding, a few dozen roundings deep); the metrics are float64
# means of those values, or well-conditioned functions of their float64 moments (Frechet distances of
# distributions that are well apart, KID, IS), so their relative error stays within a small multiple of
# ~1e-7. Measured (the max over every metric of every evaluation test: tests/test_metrics.py and
# tests/test_family_eval.py, 1 and 2 ranks; pytest -rP prints it): 1.0e-7 (isc_std) under the default CPU
# kernels, 6.6e-8 under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2; 1e-5 is 100 times the largest.
EVAL_REL = 1e-5


def assert_metrics_close(got: dict, ref: dict, what: str, rel: float = EVAL_REL) -> None:
    """Every metric of ``got`` within ``rel`` (relative) of ``ref``'s, the same keys; prints the largest
    relative difference (pytest -rP shows it), the figure that backs :data:`EVAL_REL`."""
    assert set(got) == set(ref), (what, sorted(got), sorted(ref))
    worst = max((abs(got[k] - ref[k]) / max(abs(ref[k]), 1e-300), k) for k in ref)
    print(f"{what}: largest relative difference {worst[0]:.2e} ({worst[1]}), tolerance {rel:.0e}")
    assert got == pytest.approx(ref, rel=rel), (what, worst)


def adam_drift_bound(lr: float, betas, steps: int) -> float:
    """An upper bound on |w_a - w_b| after ``steps`` Adam steps (rate ``lr``, ``betas``) of two runs from the
    same weights whose gradients differ in any way at all (e.g. by float32 rounding): each step moves a
    weight by lr * m_hat / (sqrt(v_hat) + eps), and by Cauchy-Schwarz over the bias-corrected moments

        |m_hat_t| / sqrt(v_hat_t) <= (1 - b1) / (1 - b1^t) * sqrt((1 - b2^t) / (1 - b2)) * sqrt(sum_{k<t} (b1^2 / b2)^k)

    (1 at t = 1; 1.0068 at t = 4 for betas (0.9, 0.999), 1.23 for (0.5, 0.999)), whatever the gradients.
    The two runs' steps can point opposite ways (a weight whose true gradient is ~0, e.g. a conv bias that a
    BatchNorm removes: its gradient is rounding noise whose sign flips between runs), hence 2 * lr per unit
    of that bound, summed over the steps."""
    b1, b2 = betas
    per_step = [(1 - b1) / (1 - b1 ** t) * math.sqrt((1 - b2 ** t) / (1 - b2))
                * math.sqrt(sum((b1 * b1 / b2) ** k for k in range(t))) for t in range(1, steps + 1)]
    return 2 * lr * sum(per_step)


# Losses of a ZeRO run against DDP's (relative). A loss moves with every weight through the network, so it
# has no useful closed-form bound (the weights do: adam_drift_bound); this is the measured spread of runs
# that differ only in rounding, times 10. The 4-step 2-rank runs of these tests under DDP with the default
# CPU kernels against DDP with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (docs/testing.md) differ
# by at most 5.1e-4 (the VAE's Loss/VAE/kl at step 3; the GAN 2.6e-4, pix2pix 1e-7). ZeRO-1/-2 against DDP
# were identical here under both. The export of those same runs: the VAE's weights 7.3e-3 apart (a conv
# bias before a BatchNorm; adam_drift_bound 8.0e-3), its BatchNorm statistics 1.1e-3; the GAN's 7.5e-4 and
# 9.3e-5 (bound 1.8e-3); pix2pix 5.7e-4 and 0 (bound 1.8e-3).
ZERO_LOSS_REL = 5e-3


def assert_zero_matches_ddp(runs: dict, losses, nets, ema: str, family: str, steps: int = 4) -> None:
    """``runs``: {backend: (run_dir, CompletedProcess)} for every :data:`BACKENDS` key, the same fp32 run of
    ``steps`` steps (logged every step, checkpointed at the last) on 2 ranks. ZeRO's bucketed
    reduce(-scatter) and its optimizer step over flat partitions round otherwise than DDP's all-reduce
    and per-tensor step: each of ``losses`` within :data:`ZERO_LOSS_REL` of DDP's at every step; the
    replicas (``nets`` and the EMA copy of ``ema``) identical on both ranks; the checkpoint of the
    deepspeed backend and ``family``, with one model file and one optimizer partition per rank for each
    network; the same exported EMA network as DDP's: keys, shapes, dtypes, equal BatchNorm batch counts,
    and values within :func:`adam_drift_bound` of ``ema``'s optimizer (optim.lr_g/betas_g of the run's
    config). The EMA is a convex combination of the initial weights (equal) and G's weights after each
    step, so it inherits their bound. BatchNorm running statistics (copied from G, or recomputed for the
    EMA's weights: the GAN) have no closed-form bound; they move with the weights that feed them (the
    bias before the layer shifts running_mean by less than its own difference) and are held to the same
    bound, which the measurements beside ZERO_LOSS_REL support with room to spare. The trained ``ema`` network
    as launch/evaluate.py --net trained loads it (DeepSpeed: from the engine's files) is held to the same bound
    against DDP's, and differs from the EMA copy (the EMA has averaged)."""
    import torch
    import yaml
    from safetensors.torch import load_file

    from gan.metrics.run import load_generator
    from gan.rundir import RunDir

    names = [*nets, f"{ema}_ema"]
    replicas = f"replica check: {', '.join(names[:-1])} and {names[-1]} identical on all 2 ranks"
    ddp = metrics_rows(runs["ddp"][0])
    assert [r["step"] for r in ddp] == list(range(1, steps + 1))
    optim = yaml.safe_load(RunDir(runs["ddp"][0]).config.read_text())["optim"]
    assert (optim["name"], optim["lr_schedule"]) == ("adam", "constant"), optim  # what the bound assumes
    bound = adam_drift_bound(optim["lr_g"], optim["betas_g"], steps)  # ema's net: G, or the VAE (lr_g too)
    export = RunDir(runs["ddp"][0]).export_weights
    assert export.name == f"{ema}_ema.safetensors", export
    e_ddp = load_file(str(export))
    t_ddp = load_generator(runs["ddp"][0], net="trained").G.state_dict()
    for name in (b for b in BACKENDS if b != "ddp"):
        run, r = runs[name]
        assert replicas in r.stdout, r.stdout  # the trainer's check_replicas raises otherwise
        got = metrics_rows(run)
        assert [x["step"] for x in got] == list(range(1, steps + 1))
        for a, b in zip(ddp, got):
            for k in losses:
                assert b[k] == pytest.approx(a[k], rel=ZERO_LOSS_REL), (name, a["step"], k, a[k], b[k])
        last = Path(run) / "checkpoints" / f"step-{steps:08d}"
        meta = json.loads((last / "meta.json").read_text())
        assert (meta["family"], meta["nets"], meta["backend"], meta["world_size"]) == (family, list(nets), "deepspeed", 2)
        for net in nets:
            assert {p.name for p in (last / "deepspeed" / net).iterdir()} == {
                "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "zero_pp_rank_1_mp_rank_00_optim_states.pt"}, (name, net)
        e_ds = load_file(str(RunDir(run).export / export.name))
        assert e_ddp.keys() == e_ds.keys()
        for k in e_ddp:
            assert e_ds[k].shape == e_ddp[k].shape and e_ds[k].dtype == e_ddp[k].dtype, (name, k)
            if k.endswith("num_batches_tracked"):
                assert torch.equal(e_ds[k], e_ddp[k]), (name, k)
                continue
            diff = (e_ds[k].double() - e_ddp[k].double()).abs().max().item()
            assert diff <= bound, f"{name} {k}: |ZeRO - DDP| = {diff:.3g} > {bound:.3g} (adam_drift_bound)"
        t_ds = load_generator(run, net="trained").G.state_dict()
        assert t_ds.keys() == t_ddp.keys() and any(not torch.equal(t_ds[k], e_ds[k]) for k in t_ds)
        for k in t_ddp:
            diff = (t_ds[k].double() - t_ddp[k].double()).abs().max().item()
            assert diff <= bound, f"{name} trained {k}: |ZeRO - DDP| = {diff:.3g} > {bound:.3g} (adam_drift_bound)"


def ema_and_trained(run: Path, step: int):
    """(the EMA network as launch/evaluate.py loads it, the checkpoint's trained network loaded by hand: the
    family's network built afresh, with the weights file that meta.json's parts name for it)."""
    from safetensors.torch import load_file

    from gan.metrics.run import load_generator

    g = load_generator(run)
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    part = json.loads((ckpt / "meta.json").read_text())["parts"][g.family.ema]
    trained = g.family.build_networks()[g.family.ema].eval().requires_grad_(False)
    trained.load_state_dict(load_file(str(ckpt / part)))
    return g, trained


def assert_nets_kept_apart(run: Path, label: str, ema: dict, trained: dict) -> None:
    """RUN/metrics.json holds each network's evaluation under its own label, saying which it measured, and an
    artifact of that step (RUN/export) counts the EMA's alone; the two networks measured differently (the
    EMA has averaged): some metric by more than 1e-4 of its value, ten times the most (EVAL_REL) that the
    tests let two evaluations of the same weights differ."""
    from gan.export import run_metrics

    assert (ema["net"], trained["net"]) == ("ema", "trained")
    evals = json.loads((run / "metrics.json").read_text())["evaluations"]
    assert (evals[label]["net"], evals[f"{label}-trained"]["net"]) == ("ema", "trained")
    assert evals[label]["metrics"] == ema["metrics"] and evals[f"{label}-trained"]["metrics"] == trained["metrics"]
    assert run_metrics(run, "export", ema["step"]) == ema["metrics"]
    assert any(abs(trained["metrics"][k] - v) > 1e-4 * abs(v) for k, v in ema["metrics"].items()), (ema, trained)


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
def tiny_pairs(tmp_path_factory) -> Path:
    """Paired shards for pix2pix: 48 pairs (x, 255 - x) of 3x64x64 noise images, 3 classes, 5 shards."""
    from test_paired import inverted_pairs

    return inverted_pairs(tmp_path_factory.mktemp("tiny_pairs") / "shards", size=64)


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


@pytest.fixture(scope="session")
def standin_inception(tmp_path_factory) -> Path:
    """torch-fidelity's FeatureExtractorInceptionV3 architecture with random values, saved as a state dict:
    the shapes of the real pt_inception-2015-12-05 file, none of its knowledge. Its convolutions get
    kaiming_normal_ weights: with PyTorch's default init the features are nearly constant (FID ~1e-15
    between any two image sets), and a comparison of values could not fail."""
    from unittest import mock

    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    path = tmp_path_factory.mktemp("standin") / "standin-inception.pth"
    torch.save(model.state_dict(), path)
    return path

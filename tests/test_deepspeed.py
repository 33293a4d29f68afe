"""train.backend=deepspeed: G and D as two ZeRO-1/2 engines, on 2 CPU ranks (torchrun + gloo).

Real runs of configs/debug_cpu.yaml through launch/train.py; DeepSpeed picks its CPU accelerator.
Tolerance against DDP: in fp32, with the same seed and data, ZeRO's bucketed reduce(-scatter) and its
step over flat partitions may round otherwise than DDP; the bounds and their measurements are in
conftest.assert_zero_matches_ddp (adam_drift_bound for the weights, ZERO_LOSS_REL for the losses).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import BACKENDS, REPO, adam_drift_bound, assert_zero_matches_ddp, preempt_one_rank, train_cmd, train_debug
from conftest import TWO_RANKS_ENV as ENV
from conftest import metrics_rows as rows
from conftest import train_2ranks as train2

pytest.importorskip("deepspeed")

LOSSES = ("Loss/D/main", "Loss/G/main")
cmd2 = functools.partial(train_cmd, ranks=2)  # launch/train.py on 2 ranks (torchrun, gloo)


def ckpt(run_dir, step) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def engine_tensors(path: Path) -> dict:
    """Every tensor DeepSpeed saved for G and D (weights, each rank's optimizer partition) plus the EMA G."""
    out = {}

    def walk(prefix, obj):
        if torch.is_tensor(obj):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)

    files = sorted((path / "deepspeed").glob("*/*.pt"))
    assert {f.parent.name for f in files} == {"G", "D"} and len(files) == 6, files  # model + 2 ranks' optimizer, each
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=False)
        keep = {k: state[k] for k in ("module", "optimizer_state_dict", "base_optimizer_state",
                                      "single_partition_of_fp32_groups") if k in state}
        walk(f"{f.parent.name}/{f.name}", keep)
    for k, v in load_file(str(path.parents[1] / "export" / "G_ema.safetensors")).items():
        out[f"export/{k}"] = v
    return out


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory, tiny_shards):
    """The same 4-step fp32 run under DDP, ZeRO-1 and ZeRO-2 (checkpoint at step 4)."""
    root = tmp_path_factory.mktemp("ds")
    common = ["train.max_steps=4", "log.every=1", "checkpoint.every=100"]
    return {name: (root / name, train2(root / name, tiny_shards, *common, *extra)) for name, extra in BACKENDS.items()}


def test_adam_drift_bound_holds_and_is_reached_step_by_step():
    """conftest.adam_drift_bound, against torch's Adam (float64): two runs whose gradients are opposite, of
    every scale, end within it; the gradients in proportion to (b1/b2)^(t-i) make step t as long as the
    bound allows, so no smaller bound holds."""
    lr, steps = 1e-3, 6

    def run(grads, betas):
        w = torch.zeros(grads.shape[1], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([w], lr=lr, betas=betas)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        return w.detach()

    torch.manual_seed(0)
    grads = torch.randn(steps, 4096, dtype=torch.float64) * torch.logspace(-6, 3, 4096, dtype=torch.float64)
    for betas in ((0.9, 0.999), (0.5, 0.999)):
        b1, b2 = betas
        assert (run(grads, betas) - run(-grads, betas)).abs().max() <= adam_drift_bound(lr, betas, steps)
        for t in range(1, steps + 1):
            worst = torch.tensor([[(b1 / b2) ** (t - i)] for i in range(1, t + 1)], dtype=torch.float64)
            step = (run(worst, betas) - run(worst[:-1], betas)).abs().item()
            want = (adam_drift_bound(lr, betas, t) - adam_drift_bound(lr, betas, t - 1)) / 2
            assert step == pytest.approx(want, rel=1e-6), (betas, t)  # eps = 1e-8 against sqrt(v_hat) ~ 1


@pytest.mark.numerics
@pytest.mark.slow
def test_zero_trains_and_matches_ddp(fp32_runs):
    assert_zero_matches_ddp(fp32_runs, LOSSES, nets=("G", "D"), ema="G", family="gan")


@pytest.mark.slow
def test_zero2_preempt_and_exact_resume(tmp_path, tiny_shards):
    """SIGUSR2 to one rank: both ranks agree, checkpoint the engines' partitioned states and exit 0
    ("preempted"); the resumed run ends bit for bit where an uninterrupted one does (weights, both
    ranks' optimizer partitions, EMA export)."""
    straight, pre = tmp_path / "straight", tmp_path / "pre"
    steps = ["train.backend=deepspeed", "deepspeed.stage=2", "train.max_steps=30", "checkpoint.every=100",
             "train.stop_check_every=1", "log.every=1"]
    train2(straight, tiny_shards, *steps)
    proc = subprocess.Popen(cmd2(pre, tiny_shards, *steps), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **ENV})
    out, err = preempt_one_rank(proc, pre)
    assert proc.returncode == 0, err[-6000:]
    status = json.loads((pre / "status.json").read_text())
    assert status["state"] == "preempted" and 0 < status["step"] < 30, (status, out)
    assert (ckpt(pre, status["step"]) / "deepspeed" / "G" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    r = train2(pre, tiny_shards, *steps, resume="auto")
    assert f"at step {status['step']}" in r.stdout
    assert json.loads((pre / "status.json").read_text())["state"] == "finished"
    a, b = engine_tensors(ckpt(straight, 30)), engine_tensors(ckpt(pre, 30))
    assert a.keys() == b.keys() and any(k.startswith("G/zero_pp_rank_1") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def fp16_supported() -> bool:
    """DeepSpeed's own answer for this machine (its CPU accelerator: oneDNN fp16 kernels, e.g. AVX-512 FP16/AMX)."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


@pytest.mark.slow
def test_bf16_penalties_attention(tmp_path, tiny_shards):
    """bf16 (DeepSpeed's bf16) with WGAN-GP, n_dis=2 and self-attention on ZeRO-2."""
    bf16 = tmp_path / "bf16"
    r = train2(bf16, tiny_shards, "train.backend=deepspeed", "train.mixed_precision=bf16", "loss.name=wgan_gp",
               "optim.n_dis=2", "model.attn_res=16", "train.max_steps=3", "log.every=1")  # attention: a 0-dim weight
    assert "replica check" in r.stdout
    assert all("Loss/D/gp" in x and isinstance(x["Loss/G/main"], float) for x in rows(bf16))


@pytest.mark.slow
@pytest.mark.skipif(not fp16_supported(), reason="DeepSpeed's accelerator reports no fp16 on this machine (on CPU: "
                    "torch.ops.mkldnn._is_mkldnn_fp16_supported() is false); the refusal is tested instead")
def test_fp16_loss_scaling_offload(tmp_path, tiny_shards):
    """fp16 (dynamic loss scaling, skipped steps counted) with lazy R1, clipping and the optimizer offloaded to the
    CPU on ZeRO-1."""
    fp16 = tmp_path / "fp16"
    train2(fp16, tiny_shards, "train.backend=deepspeed", "deepspeed.stage=1", "train.mixed_precision=fp16",
           "loss.r1_gamma=1", "loss.r1_every=2", "optim.grad_clip=1.0", "deepspeed.offload_optimizer=true",
           "train.max_steps=4", "log.every=1", "train.on_nonfinite=stop")
    got = rows(fp16)
    assert any("Loss/D/r1" in x for x in got) and all("Mixed/fp16_skipped" in x for x in got)
    # the loss scale starts at 2^16 and overflows at first: those steps are skipped and counted, not errors
    assert got[0]["Mixed/fp16_skipped"] > 0 and got[-1]["Mixed/fp16_skipped"] < 1
    state = torch.load(ckpt(fp16, 4) / "custom_checkpoint_1.pkl", weights_only=False)
    assert state["fp16_skipped"] > 0 and state["skipped_nonfinite"] == 0


def test_fp16_refused_where_unsupported(tmp_path, tiny_shards):
    """A machine without fp16 (faked for every process of the launch by a sitecustomize that makes oneDNN report
    no fp16, which is what DeepSpeed's CPU accelerator asks): refused before any work, exit 2, naming bf16 or no;
    not a ValueError traceback from deepspeed.initialize on each rank."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import torch\ntorch.ops.mkldnn._is_mkldnn_fp16_supported = lambda: False\n")
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    run = tmp_path / "run"
    r = train_debug(run, tiny_shards, "train.backend=deepspeed", "train.mixed_precision=fp16", "train.max_steps=2",
                    env={**ENV, "PYTHONPATH": path}, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: config key 'train.mixed_precision': fp16 is not supported") and "bf16 or no" in last
    assert "Traceback" not in r.stderr and not (run / "checkpoints").exists()


# ------------------------------------------------------------------ refused, before any work


@pytest.mark.parametrize("overrides, match", [
    (["deepspeed.stage=3"], "deepspeed.stage.*use 1 or 2"),
    (["optim.name=rmsprop"], "rmsprop with train.backend=deepspeed is refused"),
    (["train.compile=true"], "train.compile.*refused"),
    (["deepspeed.config=nowhere.json"], "deepspeed.config.*file not found: nowhere.json"),
])
def test_refused_combinations(overrides, match):
    from gan.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(REPO / "configs/debug_cpu.yaml", ["train.backend=deepspeed", *overrides])


def test_bad_deepspeed_json(tmp_path):
    from gan.config import ConfigError, load_config

    def load(text, *extra):
        f = tmp_path / "ds.json"
        f.write_text(text)
        return load_config(REPO / "configs/debug_cpu.yaml", ["train.backend=deepspeed", f"deepspeed.config={f}", *extra])

    with pytest.raises(ConfigError, match="is not valid JSON"):
        load('{"zero_optimization": {"stage": 2,}')
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load("[1, 2]")
    with pytest.raises(ConfigError, match=r"sets 'optimizer' \(set optim.*'fp16' \(set train.mixed_precision=fp16"):
        load('{"optimizer": {"type": "Adam"}, "fp16": {"enabled": true}}')
    with pytest.raises(ConfigError, match="zero_optimization.stage=1 but deepspeed.stage=2"):
        load('{"zero_optimization": {"stage": 1}}')
    for shipped, stage in (("zero1.json", 1), ("zero2.json", 2)):
        cfg = load_config(REPO / "configs/debug_cpu.yaml", ["train.backend=deepspeed", f"deepspeed.stage={stage}",
                                                           f"deepspeed.config=configs/deepspeed/{shipped}"])
        assert cfg.deepspeed.settings()["zero_optimization"]["stage"] == stage


def test_deepspeed_not_installed(monkeypatch):
    import importlib.util

    from gan.config import ConfigError, load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match=r"deepspeed is not installed.*gan-train\[deepspeed\].*train.backend=ddp"):
        load_config(REPO / "configs/debug_cpu.yaml", ["train.backend=deepspeed"])
    load_config(REPO / "configs/debug_cpu.yaml", [])  # DDP doesn't need it


@pytest.mark.slow
def test_resume_across_backends_is_refused(fp32_runs, tiny_shards, tmp_path):
    """A DDP checkpoint under DeepSpeed and the reverse, and ZeRO partitions on another world size:
    exit 2 before any work, naming the fix."""
    from gan.checkpoint import CheckpointError
    from gan.config import load_config
    from gan.trainer import preflight

    def check(run, backend, match, world="2"):
        cfg = load_config(REPO / "configs/debug_cpu.yaml", [f"data.shards={tiny_shards}", f"train.backend={backend}"])
        os.environ["WORLD_SIZE"] = world
        try:
            with pytest.raises(CheckpointError, match=match):
                preflight(cfg, run, "auto")
        finally:
            del os.environ["WORLD_SIZE"]

    # the CLI first: the in-process preflights below lock the run directories for this process
    r = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/debug_cpu.yaml", "--run-dir",
                        str(fp32_runs["ddp"][0]), "--resume", "auto", f"data.shards={tiny_shards}",
                        "train.backend=deepspeed"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **ENV})
    assert r.returncode == 2 and "written by the ddp backend" in r.stderr, r.stderr[-3000:]
    check(fp32_runs["ddp"][0], "deepspeed", "written by the ddp backend.*Resume it with train.backend=ddp.*can't be converted")
    check(fp32_runs["zero2"][0], "ddp", "written by the deepspeed backend.*train.backend=deepspeed.*ZeRO partitions")
    check(fp32_runs["zero1"][0], "deepspeed", r"world size \(processes\): checkpoint 2, now 1", world="1")

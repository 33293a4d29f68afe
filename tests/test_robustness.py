"""Never lose a run: exact resume with loader workers (also after kill -9), every
rank exits, a stalled peer or a dead launcher ends the run, divergence stops it, damaged shards are
named, and the command line refuses bad input before any work. Real shards, real processes, real gloo."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import load_cli, train_cmd
from conftest import train_debug as train

ROOT = Path(__file__).resolve().parents[1]
DDP_ENV = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cli():
    return load_cli("train")


def ckpt(run_dir, step):
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def contents(path: Path) -> dict:
    """Every tensor of a checkpoint (weights, optimizers, EMA, schedulers, train state, every rank's RNG)."""
    out = {}
    for f in sorted(path.iterdir()):
        if f.suffix == ".safetensors":
            out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
        elif f.suffix in (".bin", ".pkl"):
            out[f.name] = torch.load(f, map_location="cpu", weights_only=False)
    return out


def assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            if k != "train_seconds":  # wall-clock, the one thing a resume need not repeat
                assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a) or type(a).__module__ == "numpy":
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(a: Path, b: Path, step: int):
    assert_same(contents(ckpt(a, step)), contents(ckpt(b, step)))
    from gan.rundir import RunDir

    wa, wb = RunDir(a).export_weights, RunDir(b).export_weights  # the family's <net>_ema.safetensors
    assert wa.name == wb.name and wa.read_bytes() == wb.read_bytes()


def torchrun(run_dir, shards, *overrides, resume=None) -> list[str]:
    cmd = train_cmd(run_dir, shards, *overrides, resume=resume)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cmd[1:]]


def run_ddp(run_dir, shards, *overrides, resume=None, timeout=300):
    r = subprocess.run(torchrun(run_dir, shards, *overrides, resume=resume), cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, **DDP_ENV})
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process ended ({proc.returncode}) while waiting for {what}")
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def status(run_dir) -> dict:
    return json.loads((Path(run_dir) / "status.json").read_text())


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
    except (FileNotFoundError, IndexError):
        return False


# ------------------------------------------------------------------ 1. exact resume with loader workers


def test_exact_resume_with_loader_workers(tmp_path, tiny_shards):
    """data.num_workers=2 (the recipes use 4): 4 steps + --resume auto + 4 steps == 8 straight, bit for
    bit. The DataLoader drew its workers' base seed from the global torch RNG when its iterator was
    made, after a resume had restored that RNG, so the noise of the two runs differed. The EMA runs the
    rampup schedule with a ramp steep enough to weigh every step, so its decay depends on the images
    seen, which the checkpoint holds and the resumed run continues from."""
    common = ["checkpoint.every=4", "data.num_workers=2", "data.hflip=true", "data.translate=0.125",
              "ema.schedule=rampup", "ema.rampup=0.5"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(straight, tiny_shards, "train.max_steps=8", *common)
    train(split, tiny_shards, "train.max_steps=4", *common)
    r = train(split, tiny_shards, "train.max_steps=8", *common, resume="auto")
    assert "at step 4" in r.stdout
    assert_same_run(straight, split, 8)
    ema = torch.load(ckpt(split, 8) / json.loads((ckpt(split, 8) / "meta.json").read_text())["parts"]["ema"],
                     weights_only=False)
    assert (ema["num_updates"], ema["images_seen"]) == (8, 8 * 8)  # debug_cpu: batch 8, one rank


def test_kill9_at_a_random_moment_then_resume_is_exact(tmp_path, tiny_shards):
    """kill -9 (trainer and loader workers) at a random moment, then --resume auto: the run ends exactly
    as one that was never interrupted."""
    common = ["train.max_steps=12", "checkpoint.every=2", "checkpoint.keep=2", "data.num_workers=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(straight, tiny_shards, *common)
    proc = subprocess.Popen(train_cmd(killed, tiny_shards, *common), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: (killed / "metrics.jsonl").is_file(), 180, "the first logged step", proc)
        delay = random.uniform(0.0, 1.5)  # within the remaining steps (a debug step takes ~0.1 s)
        time.sleep(delay)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    at = sorted(p.name for p in (killed / "checkpoints").glob("step-*"))
    r = train(killed, tiny_shards, *common, resume="auto")
    assert "finished at step 12" in r.stdout, (delay, at, r.stdout)
    assert_same_run(straight, killed, 12)


@pytest.mark.slow
def test_two_rank_exact_resume_with_loader_workers(tmp_path, tiny_shards):
    common = ["checkpoint.every=4", "data.num_workers=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_ddp(straight, tiny_shards, "train.max_steps=8", *common)
    run_ddp(split, tiny_shards, "train.max_steps=4", *common)
    r = run_ddp(split, tiny_shards, "train.max_steps=8", *common, resume="auto")
    assert "at step 4" in r.stdout
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ckpt(split, 8).iterdir()}
    assert_same_run(straight, split, 8)


# ------------------------------------------------------------------ 4, 10. every rank exits; stalls and dead launchers


@pytest.mark.slow
def test_two_process_run_exits_every_time(tmp_path, tiny_shards):
    """A finished 2-rank gloo run used to hang at exit in ~1 of 6-12 runs (a gloo process group left
    to the interpreter's exit). Twice in a row, each must end, both ranks, well inside the timeout."""
    for i in range(2):
        run = tmp_path / f"ddp{i}"
        r = run_ddp(run, tiny_shards, "train.max_steps=6", "checkpoint.every=3", timeout=240)
        assert "finished at step 6" in r.stdout and status(run)["state"] == "finished"


def test_teardown_restores_signal_handlers(tmp_path, tiny_shards):
    from gan.config import load_config
    from gan.trainer import StopRequest, Trainer

    StopRequest.uninstall()  # as a fresh process has it (earlier in-process tests may have installed it)
    before = signal.getsignal(signal.SIGTERM)
    cfg = load_config(ROOT / "configs/debug_cpu.yaml", [f"data.shards={tiny_shards}", "train.max_steps=1"])
    t = Trainer(cfg, tmp_path / "run")
    assert t.fit() == "finished"
    assert signal.getsignal(signal.SIGTERM) == StopRequest._handler
    t.close()
    assert signal.getsignal(signal.SIGTERM) == before
    assert t.nets is None and t.accelerator._models == []


@pytest.mark.slow
def test_stalled_rank_fails_the_run_within_the_collective_timeout(tmp_path, tiny_shards):
    """SIGSTOP on rank 1: rank 0 gives up after train.collective_timeout and exits non-zero, saying that
    another rank stalled; status.json says the same."""
    run = tmp_path / "run"
    proc = subprocess.Popen(torchrun(run, tiny_shards, "train.max_steps=100000", "checkpoint.every=100000",
                                     "log.every=1", "train.collective_timeout=20"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **DDP_ENV}, start_new_session=True)
    stopped = None
    try:
        wait_for(lambda: (run / "metrics.jsonl").is_file(), 180, "the first logged step", proc)
        workers = children(proc.pid)
        assert len(workers) == 2, workers
        stopped = max(workers)  # started second: rank 1
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.time()
        wait_for(lambda: status(run)["state"] == "failed", 240, "rank 0 to give up")
        waited = time.time() - t0
        os.kill(stopped, signal.SIGKILL)  # (torchrun would, 30 s after its SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode != 0
    assert "error: rank 0 at step" in err and "another rank stalled" in err, err[-3000:]
    assert "train.collective_timeout=20" in status(run)["error"], status(run)
    assert waited >= 15, waited  # it did wait for the peer (the upper bound is the wait above)


@pytest.mark.slow
def test_workers_end_when_the_launcher_is_killed(tmp_path, tiny_shards):
    """kill -9 of torchrun: both workers get SIGTERM from the kernel (PR_SET_PDEATHSIG), checkpoint
    together and exit, as on a preemption; none keeps training as an orphan."""
    run = tmp_path / "run"
    proc = subprocess.Popen(torchrun(run, tiny_shards, "train.max_steps=100000", "checkpoint.every=100000",
                                     "log.every=1"),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **DDP_ENV}, start_new_session=True)
    workers = []
    try:
        wait_for(lambda: (run / "metrics.jsonl").is_file(), 180, "the first logged step", proc)
        workers = children(proc.pid)
        assert len(workers) == 2, workers
        proc.kill()
        proc.wait(timeout=30)
        wait_for(lambda: not any(alive(w) for w in workers), 180, "the orphaned workers to exit")
    finally:
        for w in workers:
            if alive(w):
                os.kill(w, signal.SIGKILL)
    st = status(run)
    assert st["state"] == "preempted" and ckpt(run, st["step"]).is_dir(), st


# ------------------------------------------------------------------ 5. divergence


@pytest.mark.parametrize("extra", [[], ["train.mixed_precision=bf16", "train.on_nonfinite=skip"],
                                   ["optim.name=rmsprop"]], ids=["fp32", "bf16-skip", "rmsprop"])
def test_divergence_ends_nonzero_and_no_checkpoint_holds_it(cli, capsys, tmp_path, tiny_shards, extra):
    """lr=1e4 blows the weights up (finite): the run used to end "finished" with losses ~1e10 and weights
    ~1e24. Now it stops non-zero, status.json says why, and no checkpoint holds a diverged state."""
    run = tmp_path / "run"
    args = ["optim.lr_d=1e4", "optim.lr_g=1e4", "train.max_steps=10", "checkpoint.every=1", *extra]
    if any("mixed_precision" in a for a in extra):  # Accelerate's precision is fixed once per process
        r = train(run, tiny_shards, *args, check=False)
        code, err = r.returncode, r.stderr
    else:
        code = cli.main(["--config", "configs/debug_cpu.yaml", "--run-dir", str(run), f"data.shards={tiny_shards}",
                         *args])
        err = capsys.readouterr().err
    assert code == 1 and "error:" in err and ("diverging" in err or "max_grad_norm" in err), err
    st = status(run)
    assert st["state"] == "failed" and "DivergenceError" in st["error"] and st["step"] < 10, st
    for c in (run / "checkpoints").glob("step-*"):
        for f in ("model.safetensors", "model_1.safetensors"):
            for k, v in load_file(str(c / f)).items():
                assert torch.isfinite(v).all() and v.abs().max() <= 1e4, (c.name, f, k)


def test_fp16_without_a_grad_scaler_is_refused(tmp_path, tiny_shards):
    """Accelerate gives no GradScaler on a CPU: fp16 would train without loss scaling (lr=1e30 made every
    weight, the EMA and the export NaN), so it is refused before any work."""
    r = train(tmp_path / "run", tiny_shards, "train.mixed_precision=fp16", "optim.lr_d=1e30", "optim.lr_g=1e30",
              check=False)  # a process of its own: Accelerate's precision is fixed once per process
    code, err = r.returncode, r.stderr
    assert code == 2 and "fp16 needs a gradient scaler" in err and "bf16" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_skip_policy_never_checkpoints_nonfinite_weights(tmp_path, tiny_shards):
    """on_nonfinite=skip: an update that makes a weight inf (finite gradient, overflowing step) is caught
    before the next checkpoint, which is not written; the last good one stays the newest."""
    from gan import checkpoint
    from gan.config import load_config
    from gan.trainer import NonFiniteError, Trainer

    cfg = load_config(ROOT / "configs/debug_cpu.yaml", [f"data.shards={tiny_shards}", "train.max_steps=2",
                                                         "checkpoint.every=2", "log.every=100",
                                                         "train.on_nonfinite=skip"])
    t = Trainer(cfg, tmp_path / "run")
    assert t.fit() == "finished"
    t.cfg.train.max_steps = 4
    step = t.train_step

    def overflowing_step():
        step()
        if t.state.step == 3:
            with torch.no_grad():
                next(t.nets["D"].parameters()).view(-1)[0] = float("inf")
    t.train_step = overflowing_step
    with pytest.raises(NonFiniteError, match="non-finite weights in D"):
        t.fit()
    t.close()
    assert checkpoint.latest_checkpoint(tmp_path / "run" / "checkpoints") == ckpt(tmp_path / "run", 2)
    assert status(tmp_path / "run")["state"] == "failed"


# ------------------------------------------------------------------ 7. damaged shards


@pytest.fixture
def deadline():
    """Fail (instead of hanging the suite) if the test body runs past 120 s: the bug was an endless loop."""
    def expired(*_):
        raise TimeoutError("still running after 120 s: the loader is looping for ever")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def shard_copy(tmp_path, tiny_shards):
    d = tmp_path / "shards"
    shutil.copytree(tiny_shards, d)
    return d


@pytest.mark.parametrize("damage", ["zero-filled", "truncated", "all-zero"])
def test_damaged_shards_are_refused_before_step_0(cli, capsys, tmp_path, shard_copy, damage, deadline):
    names = sorted(p.name for p in shard_copy.glob("*.tar"))
    for name in names if damage == "all-zero" else names[1:2]:
        f = shard_copy / name
        size = f.stat().st_size
        f.write_bytes(bytes(size) if damage != "truncated" else f.read_bytes()[:size // 2])
    code = cli.main(["--config", "configs/debug_cpu.yaml", "--run-dir", str(tmp_path / "run"),
                     f"data.shards={shard_copy}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert names[1] in err and f"python -m data_shards verify {shard_copy}" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def _flip_a_header(shard: Path) -> None:
    """Garble the name of a member in the middle of a shard (what a bad disk block does)."""
    data = bytearray(shard.read_bytes())
    off = 512 * 40  # a header of a later sample: the start-up checks read the first and the last blocks
    while not data[off:off + 8].strip(b"\0").isdigit():
        off += 512
    data[off:off + 4] = b"\xff\xfe\xfd\xfc"
    shard.write_bytes(bytes(data))


def test_shard_damaged_mid_run_stops_naming_it_with_workers(tmp_path, shard_copy):
    """A shard that passes the start-up checks but can't be parsed (flipped bytes in a header) stops
    training with its name and the fix, from inside a DataLoader worker (data.num_workers=2)."""
    for shard in shard_copy.glob("*.tar"):
        _flip_a_header(shard)
    run = tmp_path / "run"
    r = train(run, shard_copy, "data.num_workers=2", "train.max_steps=20", check=False, timeout=180)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "corrupt tar header" in r.stderr and "train-00000" in r.stderr, r.stderr
    assert "python -m data_shards verify" in r.stderr and "UnicodeDecodeError" not in r.stderr
    # the error itself, as the worker raised it, not torch's "Caught ShardError in DataLoader worker process N ...
    # Original Traceback" wrapper: status.json and the last line on stderr name the shard
    last = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: {re.escape(str(shard_copy))}/train-00000\d\.tar: corrupt tar header at byte \d+.*", last)
    error = status(run)["error"]
    assert status(run)["state"] == "failed" and error.startswith(f"ShardError: {shard_copy}/train-00000"), error
    assert "\n" not in error and "DataLoader worker" not in error + r.stderr and "Original Traceback" not in error


def test_all_zero_shards_never_spin(shard_copy, deadline):
    """Past the start-up checks (a stream built directly), zero-filled shards raise instead of looping
    for ever at step 0, with workers too."""
    from gan.config import DataConfig
    from gan.data import ShardError, TrainStream

    for f in shard_copy.glob("*.tar"):
        f.write_bytes(bytes(f.stat().st_size))
    stream = TrainStream(DataConfig(shards=str(shard_copy), num_workers=2, shuffle_buffer=8), batch_size=8)
    with pytest.raises(ShardError, match="no samples in this shard"):
        next(iter(stream))
    stream.close()


# ------------------------------------------------------------------ 11. the command line


def test_overrides_anywhere_on_the_line(cli, capsys, tiny_shards):
    code = cli.main(["optim.lr_d=1e-3", "--config", "configs/debug_cpu.yaml", "train.seed=3", "--dry-run",
                     "--run-dir", "/nonexistent/x", "log.every=7"])
    out = capsys.readouterr().out
    assert code == 0 and "lr_d: 0.001" in out and "seed: 3" in out and "every: 7" in out


@pytest.mark.parametrize("override,words", [("loss.name=hing", "hing"), ("model.name=stylegan2", "stylegan2"),
                                            ("metrics.metrics=fdi", "fdi"), ("train.seed=-1", "train.seed"),
                                            ("optim.lr_g=inf", "optim.lr_g"), ("optim.lr_d=.nan", "optim.lr_d")])
def test_dry_run_checks_every_name_and_value(cli, capsys, override, words):
    code = cli.main(["--config", "configs/debug_cpu.yaml", "--dry-run", override])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and words in err, err


def test_empty_config_file_is_an_error(cli, capsys, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert cli.main(["--config", str(empty), "--dry-run"]) == 2
    assert "is empty" in capsys.readouterr().err


def test_batch_larger_than_the_data_set_is_refused(cli, capsys, tmp_path, tiny_shards):
    code = cli.main(["--config", "configs/debug_cpu.yaml", "--run-dir", str(tmp_path / "run"),
                     f"data.shards={tiny_shards}", "train.batch_size=241"])
    err = capsys.readouterr().err
    assert code == 2 and "train.batch_size" in err and "240 samples" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()

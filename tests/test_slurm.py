"""Sweeps and preemption against a real (one-node, CPU) Slurm started by the tests themselves.

The session fixture installs Debian's slurm-wlm + munge if missing (apt-get, as root), starts
munged, slurmctld and slurmd with a generated slurm.conf in a temporary directory, and stops them
all afterwards. Skipped, with the reason, only where Slurm can't be installed.
"""
from __future__ import annotations

import csv
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slurm_cluster import SlurmCluster, SlurmUnavailable

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def slurm():
    try:
        cluster = SlurmCluster.start(log=lambda m: print(f"[slurm fixture] {m}", file=sys.stderr))
    except SlurmUnavailable as e:
        pytest.skip(f"no Slurm for the Slurm tests: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def shards(tiny_shards):
    return Path(tiny_shards)


def _env():
    return {"GAN_PYTHON": sys.executable, "GAN_REPO": str(ROOT)}


def wait_done(cluster: SlurmCluster, prefix: str, timeout: float) -> None:
    """Wait until no job whose id starts with ``prefix`` is left. A requeued job waits
    REQUEUE_DELAY_S (the test cluster's cred_expire) and then Slurm starts it by itself; it is never
    forced to start earlier (see tests/slurm_cluster.py). A held job never starts: fail at once."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        mine = [j for j in cluster.jobs() if j[0] == prefix or j[0].startswith(prefix + "_")]
        if not mine:
            return
        held = [j for j in mine if "held" in j[2].lower()]
        if held:
            pytest.fail(f"job(s) held by Slurm: {held}\n{cluster.run(['scontrol', 'show', 'job'], check=False).stdout}"
                        f"\n{cluster.logs()}")
        time.sleep(1)
    pytest.fail(f"jobs {prefix} still queued after {timeout:.0f} s: {cluster.jobs()}\n"
                f"{cluster.run(['scontrol', 'show', 'job'], check=False).stdout}\n"
                f"{cluster.run(['sinfo', '-R'], check=False).stdout}\n{cluster.logs()}")


def array_job_of(out: Path, timeout: float = 60) -> str:
    """The array job id that slurm/sweep.sh recorded in OUT/submissions.txt."""
    deadline = time.time() + timeout
    f = out / "submissions.txt"
    while time.time() < deadline:
        if f.is_file() and f.read_text().strip():
            return f.read_text().strip().splitlines()[-1].split()[0]
        time.sleep(0.5)
    pytest.fail(f"slurm/sweep.sh recorded no submission in {f}")


def submit_and_signal(cluster: SlurmCluster, shards: Path, run: Path, *overrides, cpus: int = 1,
                      env: dict | None = None) -> tuple[str, Path]:
    """sbatch one debug run of slurm/train.sbatch (log beside RUN), wait for its first logged step,
    then send USR2 to its batch shell as a time limit would. Returns (job id, log file)."""
    log = run.parent / "job.log"
    r = cluster.run(["sbatch", "--parsable", f"--cpus-per-task={cpus}", f"--output={log}", "slurm/train.sbatch",
                     "--config", "configs/debug_cpu.yaml", "--run-dir", str(run), f"data.shards={shards}",
                     "checkpoint.every=100000", "log.every=1", "log.sample_every=100000", *overrides],
                    cwd=ROOT, env={**_env(), **(env or {})})
    job = r.stdout.strip().split(";")[0]
    deadline = time.time() + 180
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.2)
    assert (run / "metrics.jsonl").is_file(), log.read_text() if log.is_file() else "no job log"
    cluster.run(["scancel", "--signal=USR2", "--batch", job])
    return job, log


def task_logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted((out / "logs").glob("*.log")))


# ---------------------------------------------------------------------------- A: a sweep


def test_sweep_array_runs_every_point_and_summarises(slurm, shards, tmp_path):
    """`sbatch slurm/sweep.sh configs/sweeps/debug_cpu.yaml`: a submitter job submits the array;
    every task trains, checkpoints and finishes; the summary lists them all."""
    out = tmp_path / "sweep"
    r = slurm.run(["sbatch", "--parsable", f"--output={tmp_path / 'submit.log'}", "slurm/sweep.sh",
                   "configs/sweeps/debug_cpu.yaml", "--out", str(out), "--set", f"data.shards={shards}"],
                  cwd=ROOT, env=_env())
    submitter = r.stdout.strip().split(";")[0]
    wait_done(slurm, submitter, 120)
    job = array_job_of(out)
    wait_done(slurm, job, 420)

    manifest = json.loads((out / "sweep.json").read_text())
    tasks = manifest["tasks"]
    assert len(tasks) >= 3
    detail = task_logs(out) + (tmp_path / "submit.log").read_text()
    for t in tasks:
        run = Path(t["run_dir"])
        status = json.loads((run / "status.json").read_text())
        assert status["state"] == "finished" and status["step"] == status["max_steps"] == 6, (t["name"], detail)
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
        assert (run / "export" / "G_ema.safetensors").is_file()
        log = out / "logs" / f"{job}_{t['index']}.log"
        assert "end rc=0 state=finished action=done" in log.read_text()
        cfg = (run / "config.yaml").read_text()
        assert f"n_dis: {t['overrides']['optim.n_dis']}" in cfg

    r = slurm.run([sys.executable, "launch/sweep_summary.py", str(out)], cwd=ROOT)
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [row["name"] for row in rows] == [t["name"] for t in tasks]
    assert {row["status"] for row in rows} == {"finished"}
    assert all(row["final Loss/D/main"] and row["final Loss/G/main"] for row in rows)
    md = (out / "summary.md").read_text()
    assert f"{len(tasks)} finished" in md and all(t["name"] in md for t in tasks)
    assert (out / "summary.png").stat().st_size > 1000


def test_failing_task_does_not_stop_the_others(slurm, shards, tmp_path):
    """A grid point that fails at start-up (images of the wrong size for the shards) fails alone;
    the summary marks it failed and the other point finished."""
    sweep = tmp_path / "mixed.yaml"
    sweep.write_text(f"base: {ROOT / 'configs/debug_cpu.yaml'}\n"
                     "grid:\n  model.img_size: [32, 16]\n"
                     "overrides: {train.max_steps: 4, checkpoint.every: 2}\n")
    out = tmp_path / "out"
    r = slurm.run(["bash", "slurm/sweep.sh", str(sweep), "--out", str(out), "--set", f"data.shards={shards}"],
                  cwd=ROOT, env=_env())
    assert "submitted array job" in r.stdout
    job = array_job_of(out)
    wait_done(slurm, job, 300)
    slurm.run([sys.executable, "launch/sweep_summary.py", str(out)], cwd=ROOT)
    rows = {row["model.img_size"]: row for row in csv.DictReader(open(out / "summary.csv"))}
    assert rows["32"]["status"] == "finished", task_logs(out)
    assert rows["16"]["status"] == "failed", task_logs(out)
    assert "rc=2" in rows["16"]["detail"]
    assert "image" in (out / "logs" / f"{job}_1.log").read_text().lower()


# ---------------------------------------------------------------------------- A: sweeps of the other families


@pytest.fixture(scope="module")
def sketch_pairs(tmp_path_factory) -> tuple[Path, Path]:
    """(train, val) paired shards built as configs/cifar10_sketch_pix2pix.yaml says: `data_shards build
    --source paired --derive sketch` over folders of 3x32x32 images (1-channel sketch -> 3-channel photo)."""
    from PIL import Image

    from conftest import tiny_images
    from data_shards.__main__ import main as data_shards

    root = tmp_path_factory.mktemp("sketch_pairs")
    imgs, labels = tiny_images(64, 3, 32, seed=3)
    out = []
    for split, idx in (("train", range(48)), ("test", range(48, 64))):
        for i in idx:
            folder = root / "photos" / split / f"class{labels[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(imgs[i].transpose(1, 2, 0)).save(folder / f"{i:03d}.png")
        rc = data_shards(["build", "--source", "paired", "--derive", "sketch", "--root", str(root / "photos" / split),
                          "--split", split, "--out", str(root / split)])
        assert rc == 0
        out.append(root / split)
    return out[0], out[1]


def run_family_sweep(cluster: SlurmCluster, sweep: str, out: Path, *sets: str) -> list[dict]:
    """`bash slurm/sweep.sh SWEEP --out OUT --set ...` on the cluster; every task must train its 6 steps,
    checkpoint and finish. Returns the manifest's tasks, each with its metrics.jsonl rows under "rows"."""
    r = cluster.run(["bash", "slurm/sweep.sh", sweep, "--out", str(out), *(a for s in sets for a in ("--set", s))],
                    cwd=ROOT, env=_env())
    assert "submitted array job" in r.stdout, r.stdout + r.stderr
    job = array_job_of(out)
    wait_done(cluster, job, 420)
    tasks = json.loads((out / "sweep.json").read_text())["tasks"]
    assert len(tasks) == 2
    for t in tasks:
        run = Path(t["run_dir"])
        status = json.loads((run / "status.json").read_text()) if (run / "status.json").is_file() else {}
        assert status.get("state") == "finished" and status["step"] == status["max_steps"] == 6, \
            (t["name"], task_logs(out))
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
        assert "end rc=0 state=finished action=done" in (out / "logs" / f"{job}_{t['index']}.log").read_text()
        t["meta"] = json.loads((run / "checkpoints" / "step-00000006" / "meta.json").read_text())
        t["rows"] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in t["rows"]] == list(range(1, 7))
    cluster.run([sys.executable, "launch/sweep_summary.py", str(out)], cwd=ROOT)
    return tasks


def check_family_summary(out: Path, tasks: list[dict], key: str, family: str, losses: tuple[str, ...]) -> None:
    """One finished row per task with its swept value and the family's final losses; no other family's."""
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [row[key] for row in rows] == [str(t["overrides"][key]) for t in tasks]
    assert {row["status"] for row in rows} == {"finished"}
    for row, t in zip(rows, tasks):
        for loss in losses:
            assert float(row[f"final {loss}"]) == pytest.approx(t["rows"][-1][loss])  # the CSV holds repr(float): exact
    columns = [c for c in rows[0] if c.startswith(("final ", "best "))]
    assert sorted(columns) == sorted(f"final {loss}" for loss in {k for t in tasks for r in t["rows"] for k in r
                                                                  if k.startswith("Loss/")})
    md = (out / "summary.md").read_text()
    assert f"(family {family})" in md and "2 finished" in md and "No evaluation metrics" in md
    assert (out / "summary.png").stat().st_size > 1000


def test_vae_sweep_over_beta(slurm, tiny_shards_gray28, tmp_path):
    """configs/sweeps/debug_cpu_vae.yaml (loss.beta 0.5 and 2) on the cluster: each task trains the VAE with
    its own beta (the logged KL weight is beta and the loss is recon + beta * KL at every step); the
    summary has the VAE's losses and nothing of the GAN's."""
    out = tmp_path / "sweep"
    tasks = run_family_sweep(slurm, "configs/sweeps/debug_cpu_vae.yaml", out,
                             f"data.shards={tiny_shards_gray28}", "data.dataset=")
    assert [t["overrides"]["loss.beta"] for t in tasks] == [0.5, 2.0]
    for t in tasks:
        beta = t["overrides"]["loss.beta"]
        assert t["meta"]["family"] == "vae" and t["meta"]["nets"] == ["vae"]
        for r in t["rows"]:
            assert r["VAE/kl_weight"] == beta
            # float32 terms >= 0 summed in the loss and again here: a few 2^-24 (6e-8) relative; 1e-5 is ample
            assert r["Loss/VAE/total"] == pytest.approx(r["Loss/VAE/recon"] + beta * r["Loss/VAE/kl"], rel=1e-5)
    check_family_summary(out, tasks, "loss.beta", "vae", ("Loss/VAE/total", "Loss/VAE/recon", "Loss/VAE/kl"))


def test_pix2pix_sweep_over_lambda_l1(slurm, sketch_pairs, tmp_path):
    """configs/sweeps/debug_cpu_pix2pix.yaml (loss.lambda_l1 10 and 100) on the cluster, on sketch -> photo
    pairs with held-out val pairs: each task's G loss is adversarial + its own lambda * L1 at every step;
    the summary has pix2pix's G and D losses and nothing of the VAE's."""
    train, val = sketch_pairs
    out = tmp_path / "sweep"
    tasks = run_family_sweep(slurm, "configs/sweeps/debug_cpu_pix2pix.yaml", out,
                             f"data.shards={train}", f"val.shards={val}")
    assert [t["overrides"]["loss.lambda_l1"] for t in tasks] == [10.0, 100.0]
    for t in tasks:
        lam = t["overrides"]["loss.lambda_l1"]
        assert t["meta"]["family"] == "pix2pix" and t["meta"]["nets"] == ["G", "D"]
        for r in t["rows"]:
            # float32 terms >= 0 summed in the loss and again here: a few 2^-24 (6e-8) relative; 1e-5 is ample
            assert r["Loss/G/total"] == pytest.approx(r["Loss/G/main"] + lam * r["Loss/G/l1"], rel=1e-5)
        assert sorted(p.name for p in (Path(t["run_dir"]) / "samples").iterdir())  # input | output | target
    check_family_summary(out, tasks, "loss.lambda_l1", "pix2pix", ("Loss/G/total", "Loss/G/l1", "Loss/D/main"))


def test_family_sweep_with_a_key_of_another_family_submits_nothing(slurm, tmp_path):
    """A VAE sweep over pix2pix's loss.lambda_l1 is refused by slurm/sweep.sh before sbatch: the error names
    the VAE's loss keys and the family that owns the key; no array job, no run directory."""
    sweep = tmp_path / "wrong.yaml"
    sweep.write_text(f"base: {ROOT / 'configs/fashion_mnist_vae.yaml'}\ngrid:\n  loss.lambda_l1: [10.0, 100.0]\n")
    before = {j[0] for j in slurm.jobs()}
    r = slurm.run(["bash", "slurm/sweep.sh", str(sweep), "--out", str(tmp_path / "out")], cwd=ROOT, env=_env(),
                  check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "unknown config key 'loss.lambda_l1'" in r.stderr and "loss.beta, loss.kl_warmup_steps" in r.stderr
    assert "key of family pix2pix" in r.stderr
    assert "submitted" not in r.stdout and not (tmp_path / "out").exists()
    assert {j[0] for j in slurm.jobs()} <= before


# ---------------------------------------------------------------------------- B: preemption


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def preempted_at(run: Path, steps: int) -> int:
    """The step of the preemption checkpoint (periodic checkpoints are off in these runs)."""
    found = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert len(found) == 2 and found[-1] == steps, found
    return found[0]


def checkpoint_contents(ckpt: Path) -> dict:
    """Every tensor and value of a checkpoint directory (models, optimizers, EMA, train state,
    RNG states), except meta.json (it holds the config, which differs in checkpoint.keep) and the
    wall-clock the training loop has run (train.max_minutes' counter)."""
    out = {}
    for f in sorted(ckpt.iterdir()):
        if f.suffix == ".safetensors":
            obj = load_file(str(f))
        elif f.suffix in (".bin", ".pkl", ".pt"):
            try:
                obj = torch.load(f, map_location="cpu", weights_only=False)
            except (pickle.UnpicklingError, RuntimeError):
                obj = pickle.loads(f.read_bytes())
        else:
            continue
        for k, v in _flatten(obj):
            if not k.endswith("/train_seconds"):
                out[f"{f.name}{k}"] = v
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{k} differs"
        elif isinstance(x, np.ndarray):
            assert np.array_equal(x, y), f"{k} differs"
        else:
            assert x == y, f"{k} differs: {x!r} vs {y!r}"


def test_preempted_task_checkpoints_requeues_and_resumes_exactly(slurm, shards, tmp_path):
    """Two array tasks, identical training (they differ only in checkpoint.keep). Task 1 gets
    USR2 on its batch shell (what --signal=B:USR2@120 does before a time limit): it checkpoints,
    requeues itself as <array>_1 and resumes with --resume auto. Task 0 runs straight through and
    is not disturbed. Both end with the same weights, optimizer, EMA and RNG states, and task 1's
    metrics.jsonl has every step exactly once, with the same losses."""
    steps = 400
    sweep = tmp_path / "preempt.yaml"
    sweep.write_text(f"base: {ROOT / 'configs/debug_cpu.yaml'}\n"
                     "grid:\n  checkpoint.keep: [2, 3]\n"
                     f"overrides: {{train.max_steps: {steps}, checkpoint.every: 100000, log.every: 1,"
                     " log.sample_every: 100000}\n"
                     "slurm: {cpus-per-task: 1}\n")
    out = tmp_path / "out"
    slurm.run(["bash", "slurm/sweep.sh", str(sweep), "--out", str(out), "--set", f"data.shards={shards}"],
              cwd=ROOT, env=_env())
    job = array_job_of(out)
    tasks = json.loads((out / "sweep.json").read_text())["tasks"]
    straight, pre = Path(tasks[0]["run_dir"]), Path(tasks[1]["run_dir"])

    deadline = time.time() + 180
    while time.time() < deadline and not (pre / "metrics.jsonl").is_file():
        time.sleep(0.2)
    assert (pre / "metrics.jsonl").is_file(), task_logs(out)
    slurm.run(["scancel", "--signal=USR2", "--batch", f"{job}_1"])
    wait_done(slurm, job, 420)

    log1 = (out / "logs" / f"{job}_1.log").read_text()
    log0 = (out / "logs" / f"{job}_0.log").read_text()
    assert "USR2: asking training to checkpoint" in log1, log1
    assert "end rc=0 state=preempted action=requeue" in log1, log1
    assert f"requeueing {job}_1" in log1
    assert "restart=1" in log1, log1  # it ran again ...
    stop = preempted_at(pre, steps)
    assert 0 < stop < steps, log1
    assert f"at step {stop}" in log1.split("restart=1")[1], log1  # ... from where it stopped
    assert log1.rstrip().endswith("end rc=0 state=finished action=done"), log1
    assert "USR2" not in log0 and "restart=1" not in log0, log0  # the other task was left alone

    for run in (straight, pre):
        status = json.loads((run / "status.json").read_text())
        assert status["state"] == "finished" and status["step"] == steps
    rows = [json.loads(line) for line in (pre / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # no step lost, none done twice
    ref = {json.loads(line)["step"]: json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()}
    for r in rows:
        for k in ("Loss/D/main", "Loss/G/main"):
            assert r[k] == ref[r["step"]][k], (r["step"], k)
    final = f"step-{steps:08d}"
    assert_same(checkpoint_contents(straight / "checkpoints" / final), checkpoint_contents(pre / "checkpoints" / final))
    assert_same(load_file(str(straight / "export" / "G_ema.safetensors")),
                load_file(str(pre / "export" / "G_ema.safetensors")))

    slurm.run([sys.executable, "launch/sweep_summary.py", str(out)], cwd=ROOT)
    assert {row["status"] for row in csv.DictReader(open(out / "summary.csv"))} == {"finished"}


def test_multi_process_run_through_accelerate_is_preempted_and_resumes(slurm, shards, tmp_path):
    """A single (non-array) run with two ranks started by `accelerate launch` inside srun (on CPU:
    GPUS_PER_NODE=2 with ACCELERATE_USE_CPU=1, gloo). USR2 on the batch shell reaches both ranks
    (the launcher ignores it), they checkpoint together, the job requeues itself under its plain
    job id and resumes; every step is logged exactly once."""
    steps, run = 300, tmp_path / "run"
    job, log = submit_and_signal(slurm, shards, run, f"train.max_steps={steps}", cpus=2,
                                 env={"GPUS_PER_NODE": "2", "ACCELERATE_USE_CPU": "1"})
    wait_done(slurm, job, 420)
    text = log.read_text()
    assert "processes=2" in text and "accelerate.commands.launch" in text and "--multi_gpu" in text
    assert f"requeueing {job} " in text and "restart=1" in text, text
    stop = preempted_at(run, steps)
    assert 0 < stop < steps, text
    assert f"at step {stop}" in text.split("restart=1")[1], text  # resumed where it stopped
    assert text.rstrip().endswith("end rc=0 state=finished action=done"), text
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))


def test_requeue_cap_stops_with_the_checkpoint(slurm, shards, tmp_path):
    """GAN_MAX_REQUEUES: a job already requeued that many times (here 0) is not requeued again; it
    ends as preempted with its checkpoint and says how to continue."""
    run = tmp_path / "run"
    job, log = submit_and_signal(slurm, shards, run, "train.max_steps=100000", env={"GAN_MAX_REQUEUES": "0"})
    wait_done(slurm, job, 300)
    text = log.read_text()
    assert f"not requeueing {job}: it was requeued 0 times (GAN_MAX_REQUEUES=0)" in text, text
    assert "restart=1" not in text and text.rstrip().endswith("end rc=0 state=preempted action=stopped"), text
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "preempted" and (run / "checkpoints" / f"step-{status['step']:08d}").is_dir()

"""Sweep files, grids, run names, slurm/sweep.sh and train.sbatch plumbing, and the summary.
Fast: no Slurm and no training (fake sbatch/scontrol/trainer where a command is needed)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gan.config import load_config
from gan.sweep import (SweepError, format_value, grid_points, load_sweep, main as sweep_main, plan,
                       run_names, sbatch_args)
from gan.sweep_summary import collect, direction, read_metrics, summarize

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_cpu.yaml"


def sweep_file(tmp_path, **body) -> Path:
    body.setdefault("base", str(DEBUG))
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(body, sort_keys=False))
    return p


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    return {**env, "GAN_PYTHON": sys.executable, **extra}


# ---------------------------------------------------------------------------- sweep files


@pytest.mark.parametrize("name,size,family", [("debug_cpu", 4, "gan"), ("cifar10_lr", 12, "gan"),
                                              ("debug_cpu_vae", 2, "vae"), ("cifar10_vae_beta", 4, "vae"),
                                              ("debug_cpu_pix2pix", 2, "pix2pix"),
                                              ("cifar10_sketch_pix2pix_l1", 4, "pix2pix")])
def test_shipped_sweeps_are_valid(name, size, family):
    s = load_sweep(ROOT / "configs" / "sweeps" / f"{name}.yaml", max_array_size=None)
    assert s.size == size >= 2 and s.base.is_file()
    assert s.max_concurrent and s.family == family
    assert plan(s)["family"] == family


@pytest.mark.parametrize("body,match", [
    (dict(grdi={"optim.lr_d": [1e-4]}), r"unknown key 'grdi'.*Did you mean 'grid'"),
    (dict(grid={}), r"'grid' is empty"),
    (dict(), r"'grid' is empty"),
    (dict(grid={"optim.lr_d": []}), r"'optim.lr_d' has an empty list"),
    (dict(grid={"optim.lr_d": 1e-4}), r"must map to a list"),
    (dict(grid={"optim.lr_d": [1e-4, 1e-4]}), r"lists 0.0001 twice"),
    (dict(base="nope/missing.yaml", grid={"optim.lr_d": [1e-4]}), r"'base' config not found: nope/missing.yaml"),
    (dict(base=None, grid={"optim.lr_d": [1e-4]}), r"'base' must name"),
    (dict(grid={"optim.lr_x": [1e-4]}), r"unknown config key 'optim.lr_x'.*optim.lr_d"),
    (dict(grid={"optimizer.lr_d": [1e-4]}), r"unknown config key 'optimizer'"),
    (dict(grid={"optim.n_dis": [1, 0]}), r"grid point optim.n_dis=0: .*optim.n_dis.*>= 1"),
    (dict(grid={"optim.n_dis": ["two"]}), r"optim.n_dis.*type int"),
    (dict(grid={"optim.lr_d": [1e-4]}, overrides={"optim.lr_d": 2e-4}), r"both swept in 'grid' and fixed"),
    (dict(grid={"optim.lr_d": [1e-4]}, overrides={"train.max_stepz": 3}), r"unknown config key 'train.max_stepz'"),
    (dict(grid={"optim.lr_d": [1e-4]}, overrides="x"), r"'overrides' must be a mapping"),
    (dict(grid={"optim.lr_d": [1e-4]}, max_concurrent=0), r"'max_concurrent' must be a positive integer"),
    (dict(grid={"optim.lr_d": [1e-4]}, slurm={"array": "0-3"}), r"'array' is set by slurm/sweep.sh"),
    (dict(grid={"optim.lr_d": [1e-4]}, slurm={"output": "x"}), r"'output' is set by slurm/sweep.sh"),
    (dict(grid={"optim.lr_d": [1e-4]}, slurm=["--time=1"]), r"'slurm' must be a mapping"),
])
def test_bad_sweep_files_fail_with_the_key(tmp_path, body, match):
    with pytest.raises(SweepError, match=match):
        load_sweep(sweep_file(tmp_path, **body), max_array_size=None)


VAE = str(ROOT / "configs" / "fashion_mnist_vae.yaml")
PIX2PIX = str(ROOT / "configs" / "cifar10_sketch_pix2pix.yaml")


@pytest.mark.parametrize("base,grid,match", [
    # a key of another family: the family's own keys of that section, and who owns it
    (VAE, {"loss.lambda_l1": [10.0]}, r"\(family vae\): grid point loss.lambda_l1=10.0: unknown config key "
     r"'loss.lambda_l1'. Valid keys here: loss.beta, loss.kl_warmup_steps, loss.obs_std \('loss.lambda_l1' is a "
     r"key of family pix2pix"),
    (PIX2PIX, {"loss.beta": [1.0]}, r"Valid keys here: loss.gan_loss, loss.lambda_l1 \('loss.beta' is a key of "
     r"family vae"),
    (PIX2PIX, {"model.z_dim": [64]}, r"Valid keys here: model.img_size, .*'model.z_dim' is a key of family gan"),
    (VAE, {"loss.betta": [1.0]}, r"unknown config key 'loss.betta'. Did you mean: loss.beta\?"),
    (VAE, {"model.latent": [8]}, r"Did you mean: model.latent_dim\?"),
    # spine keys the family never reads: every point would train the same run
    (VAE, {"optim.lr_d": [1e-4, 2e-4]}, r"family vae does not read 'optim.lr_d'.* e.g. optim.lr_g\. Keys of family "
     r"vae's own sections: model.img_size, .*loss.beta, loss.kl_warmup_steps, loss.obs_std, val.shards$"),
    (VAE, {"optim.n_dis": [1, 2]}, r"family vae does not read 'optim.n_dis'"),
    (PIX2PIX, {"optim.n_dis": [1, 2]}, r"family pix2pix does not read 'optim.n_dis'.*loss.lambda_l1, val.shards"),
    (PIX2PIX, {"log.samples_per_class": [2, 4]}, r"family pix2pix does not read 'log.samples_per_class'"),
    # values, and the family's own checks (registered names, what it has not wired)
    (VAE, {"loss.beta": [1.0, -1.0]}, r"grid point loss.beta=-1.0: config key 'loss.beta': must be a finite number"),
    (PIX2PIX, {"loss.gan_loss": ["ns", "hingee"]}, r"grid point loss.gan_loss=hingee: .*unknown GAN loss 'hingee'"),
    (VAE, {"metrics.metrics": ["psnr", "cls_acc"]}, r"grid point metrics.metrics=cls_acc: .*unknown metric\(s\) "
     r"'cls_acc' for family vae; valid metrics: bits_per_dim, recon_mse, psnr, ssim, kl, fid"),
])
def test_family_sweeps_refuse_keys_and_values_the_family_does_not_take(tmp_path, base, grid, match):
    with pytest.raises(SweepError, match=match):
        load_sweep(sweep_file(tmp_path, base=base, grid=grid), max_array_size=None)


def test_family_sweep_of_a_key_that_every_family_reads(tmp_path):
    s = load_sweep(sweep_file(tmp_path, base=VAE, grid={"optim.lr_g": [1e-3, 2e-3], "model.latent_dim": [8, 16]}),
                   max_array_size=None)
    assert s.family == "vae" and s.size == 4
    assert run_names(grid_points(s.grid))[-1] == "lr_g=0.002,latent_dim=16"


def test_not_yaml_and_not_found(tmp_path):
    with pytest.raises(SweepError, match="not found"):
        load_sweep(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: [unclosed\n")
    with pytest.raises(SweepError, match="not valid YAML"):
        load_sweep(bad)


def test_grid_too_large_for_the_array_limit(tmp_path):
    f = sweep_file(tmp_path, grid={"optim.lr_d": [1e-4, 2e-4], "optim.n_dis": [1, 2]})
    with pytest.raises(SweepError, match=r"4 points but this cluster's MaxArraySize is 3"):
        load_sweep(f, max_array_size=3)
    assert load_sweep(f, max_array_size=4).size == 4


def test_base_relative_to_the_sweep_file(tmp_path):
    (tmp_path / "exp.yaml").write_text(f"base: {ROOT / 'configs' / 'base.yaml'}\ntrain: {{max_steps: 7}}\n")
    s = load_sweep(sweep_file(tmp_path, base="exp.yaml", grid={"optim.n_dis": [1, 2]}), max_array_size=None)
    assert s.base == (tmp_path / "exp.yaml").resolve()


def test_grid_order_and_overrides_read_back(tmp_path):
    f = sweep_file(tmp_path, grid={"optim.lr_d": [1e-5, 4e-4], "optim.n_dis": [1, 2, 3]},
                   overrides={"train.max_steps": 6})
    s = load_sweep(f, max_array_size=None, extra_overrides=["data.shards=/x/y"])
    pts = grid_points(s.grid)
    assert len(pts) == 6 and pts[0] == {"optim.lr_d": 1e-5, "optim.n_dis": 1} and pts[1]["optim.n_dis"] == 2
    m = plan(s)
    for t in m["tasks"]:
        a = t["args"]
        assert a[:6] == ["--config", str(DEBUG), "--run-dir", t["run_dir"], "--resume", "auto"]
        cfg = load_config(DEBUG, a[6:])
        assert cfg.optim.lr_d == t["overrides"]["optim.lr_d"] and cfg.optim.n_dis == t["overrides"]["optim.n_dis"]
        assert cfg.train.max_steps == 6 and cfg.data.shards == "/x/y"
        assert Path(t["run_dir"]).parent == (Path.cwd() / "runs" / "sweeps" / "s").resolve()


@pytest.mark.parametrize("key,value", [
    ("optim.lr_d", 1e-5), ("optim.lr_d", 0.0001), ("optim.lr_g", 2.0e-4), ("optim.n_dis", 3),
    ("train.deterministic", True), ("train.deterministic", False), ("loss.name", "ns"),
    ("train.mixed_precision", "no"), ("data.shards", "/data/with space/x"), ("data.color_jitter", 0.5),
])
def test_format_value_round_trips_through_the_config(key, value):
    cfg = load_config(DEBUG, [f"{key}={format_value(value)}"])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value


def test_unquoted_yaml_no_in_a_grid_fails_before_submission(tmp_path):
    f = sweep_file(tmp_path, grid={"train.mixed_precision": [False, "bf16"]})  # what `[no, bf16]` reads as
    with pytest.raises(SweepError, match="train.mixed_precision"):
        load_sweep(f, max_array_size=None)


# ---------------------------------------------------------------------------- run names


def test_run_names_are_readable_unique_and_stable():
    pts = grid_points({"optim.lr_d": [1e-4, 4e-4], "optim.n_dis": [1, 2]})
    names = run_names(pts)
    assert names[0] == "lr_d=0.0001,n_dis=1" and len(set(names)) == 4
    assert run_names(pts) == names  # stable


def test_run_names_keep_full_keys_when_the_last_part_is_ambiguous():
    pts = grid_points({"optim.lr": [1], "ema.lr": [2]})
    assert run_names(pts) == ["optim.lr=1,ema.lr=2"]


def test_run_names_are_filesystem_safe():
    pts = grid_points({"data.shards": ["/data/a b", "/data/a_b", "../x", "A", "a"], "loss.name": ["ns"]})
    names = run_names(pts)
    assert len({n.lower() for n in names}) == len(names)  # unique, even on case-insensitive filesystems
    for n in names:
        assert "/" not in n and " " not in n and not n.startswith(".") and len(n) < 140
    long = run_names([{"loss.name": "x" * 500}])[0]
    assert len(long) <= 130


# ---------------------------------------------------------------------------- sbatch arguments, CLI


def test_sbatch_args(tmp_path):
    f = sweep_file(tmp_path, grid={"optim.n_dis": [1, 2, 3]}, max_concurrent=2,
                   slurm={"time": "01:00:00", "gpus_per_node": 1, "exclusive": True, "qos": None})
    m = plan(load_sweep(f, out=tmp_path / "o", max_array_size=None))
    a = sbatch_args(m)
    assert a[0] == "--array=0-2%2" and f"--output={tmp_path / 'o' / 'logs' / '%A_%a.log'}" in a
    assert "--time=01:00:00" in a and "--gpus-per-node=1" in a and "--exclusive" in a
    assert not any(x.startswith("--qos") for x in a)


def test_task_command_prints_nul_separated_args(tmp_path, capsys):
    f = sweep_file(tmp_path, grid={"optim.n_dis": [1, 2]})
    assert sweep_main(["plan", str(f), "--out", str(tmp_path / "o")]) == 0
    manifest = tmp_path / "o" / "sweep.json"
    assert manifest.is_file() and (tmp_path / "o" / "logs").is_dir()
    capsys.readouterr()
    assert sweep_main(["task", str(manifest), "1"]) == 0
    args = capsys.readouterr().out.split("\0")[:-1]
    assert args[-1] == "optim.n_dis=2" and "--resume" in args
    assert sweep_main(["task", str(manifest), "2"]) == 2
    assert "outside the sweep's 0..1" in capsys.readouterr().err


def fake_bin(tmp_path, max_array=1001) -> Path:
    """sbatch that records its arguments; scontrol that reports MaxArraySize."""
    b = tmp_path / "bin"
    b.mkdir()
    (b / "sbatch").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/sbatch.args\necho "4242;gantest"\n')
    (b / "scontrol").write_text(f'#!/bin/sh\necho "MaxArraySize            = {max_array}"\n')
    for f in b.iterdir():
        f.chmod(0o755)
    return b


def sweep_sh(*args, path_prefix=None, cwd=ROOT):
    env = clean_env()
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return subprocess.run(["bash", str(ROOT / "slurm" / "sweep.sh"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_sweep_sh_dry_run_prints_grid_and_commands(tmp_path):
    r = sweep_sh("configs/sweeps/debug_cpu.yaml", "--dry-run", "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert "4 grid point(s)" in r.stdout and "lr_d=0.0004,n_dis=2" in r.stdout
    assert "sbatch --array=0-3%2" in r.stdout and "launch/train.py --config" in r.stdout
    assert "--resume auto" in r.stdout and not (tmp_path / "o").exists()


def test_sweep_sh_submits_one_array(tmp_path):
    b = fake_bin(tmp_path)
    r = sweep_sh("configs/sweeps/debug_cpu.yaml", "--out", tmp_path / "o", "--set", "data.shards=/s",
                 "--", "--qos=high", path_prefix=b)
    assert r.returncode == 0, r.stderr
    assert "submitted array job 4242: 4 task(s)" in r.stdout
    args = (tmp_path / "sbatch.args").read_text().splitlines()
    assert args[:3] == ["--parsable", "--array=0-3%2", "--job-name=sweep-debug_cpu"]
    assert "--qos=high" in args and "--time=00:15:00" in args
    assert args[-3:] == [str(ROOT / "slurm" / "train.sbatch"), "--sweep", str(tmp_path / "o" / "sweep.json")]
    assert (tmp_path / "o" / "submissions.txt").read_text().startswith("4242 ")


@pytest.mark.parametrize("case", ["unknown", "empty", "nobase", "toolarge", "badvalue", "otherfamily", "unread"])
def test_sweep_sh_bad_input_submits_nothing(tmp_path, case):
    b = fake_bin(tmp_path, max_array=3)
    body = {"unknown": dict(grid={"optim.lr_d": [1e-4]}, gird=1),
            "otherfamily": dict(base=VAE, grid={"loss.lambda_l1": [1.0, 10.0]}),
            "unread": dict(base=PIX2PIX, grid={"optim.n_dis": [1, 2]}),
            "empty": dict(grid={}),
            "nobase": dict(base="missing.yaml", grid={"optim.lr_d": [1e-4]}),
            "toolarge": dict(grid={"optim.lr_d": [1e-4, 2e-4], "optim.n_dis": [1, 2]}),
            "badvalue": dict(grid={"optim.n_dis": [0]})}[case]
    r = sweep_sh(sweep_file(tmp_path, **body), "--out", tmp_path / "o", path_prefix=b)
    assert r.returncode == 2 and "error:" in r.stderr
    assert not (tmp_path / "sbatch.args").exists() and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- train.sbatch without Slurm

FAKE_TRAINER = r'''
import json, os, signal, sys, time
args = sys.argv[1:]
run = args[args.index("--run-dir") + 1]
os.makedirs(run, exist_ok=True)
def status(s):
    open(os.path.join(run, "status.json"), "w").write(json.dumps({"state": s, "step": 1, "max_steps": 9}))
stop = []
time.sleep(float(os.environ.get("FAKE_INIT_S", "0")))  # start-up: USR2 still ignored (inherited)
signal.signal(signal.SIGUSR2, lambda *a: stop.append(1))
open(os.path.join(run, "argv.json"), "w").write(json.dumps(args))
status("running")
for _ in range(600):
    if stop:
        status("preempted"); sys.exit(0)
    if os.environ.get("FAKE_FINISH"):
        status("finished"); sys.exit(0)
    time.sleep(0.05)
sys.exit(3)
'''


def fake_python(tmp_path) -> Path:
    (tmp_path / "trainer.py").write_text(FAKE_TRAINER)
    py = tmp_path / "py"
    py.write_text(f'''#!/bin/sh
if [ "$1" = launch/train.py ]; then shift; exec {sys.executable} {tmp_path / "trainer.py"} "$@"; fi
if [ "$1" = -m ] && [ "$2" = accelerate.commands.launch ]; then printf "%s\\n" "$@" > {tmp_path}/accel.args; exit 0; fi
exec {sys.executable} "$@"
''')
    py.chmod(0o755)
    return py


def test_train_sbatch_forwards_usr2_and_stops_cleanly_outside_slurm(tmp_path):
    py = fake_python(tmp_path)
    run = tmp_path / "run"
    p = subprocess.Popen(["bash", "slurm/train.sbatch", "--config", str(DEBUG), "--run-dir", str(run)],
                         cwd=ROOT, env=clean_env(GAN_PYTHON=str(py), GPUS_PER_NODE="0"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and not (run / "status.json").is_file():
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGUSR2)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0, out
    assert json.loads((run / "status.json").read_text())["state"] == "preempted"
    assert "USR2: asking training to checkpoint" in out and out.rstrip().endswith("action=stopped")
    assert json.loads((run / "argv.json").read_text())[-2:] == ["--resume", "auto"]


def test_train_sbatch_repeats_a_stop_request_that_came_during_start_up(tmp_path):
    py = fake_python(tmp_path)
    run = tmp_path / "run"
    p = subprocess.Popen(["bash", "slurm/train.sbatch", "--config", str(DEBUG), "--run-dir", str(run)],
                         cwd=ROOT, env=clean_env(GAN_PYTHON=str(py), GPUS_PER_NODE="0", FAKE_INIT_S="1.5",
                                                 GAN_RESIGNAL_S="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)  # the trainer is still starting: this USR2 alone would be lost
    p.send_signal(signal.SIGUSR2)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0 and json.loads((run / "status.json").read_text())["state"] == "preempted", out
    assert out.count("USR2: asking") == 1  # the fake trains until stopped: "preempted" shows the repeat arrived


def test_train_sbatch_needs_a_run_dir_and_reports_failures(tmp_path):
    py = fake_python(tmp_path)
    r = subprocess.run(["bash", "slurm/train.sbatch", "--config", str(DEBUG)], cwd=ROOT,
                       env=clean_env(GAN_PYTHON=str(py)), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "pass --run-dir" in r.stderr
    r = subprocess.run(["bash", "slurm/train.sbatch", "--config", str(DEBUG), "--run-dir", str(tmp_path / "r")],
                       cwd=ROOT, env=clean_env(GAN_PYTHON=str(py), GPUS_PER_NODE="0", FAKE_FINISH="1"),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("end rc=0 state=finished action=done"), r.stdout


def test_train_sbatch_gpu_launch_line(tmp_path):
    py = fake_python(tmp_path)
    r = subprocess.run(["bash", "slurm/train.sbatch", "--config", str(DEBUG), "--run-dir", str(tmp_path / "r"),
                        "optim.n_dis=2"], cwd=ROOT,
                       env=clean_env(GAN_PYTHON=str(py), GPUS_PER_NODE="4", MASTER_PORT="29999"),
                       capture_output=True, text=True, timeout=30)
    a = (tmp_path / "accel.args").read_text().splitlines()
    opt = {a[i]: a[i + 1] for i in range(len(a) - 1) if a[i].startswith("--")}
    assert opt["--num_machines"] == "1" and opt["--num_processes"] == "4" and opt["--machine_rank"] == "0"
    assert opt["--main_process_ip"] == "127.0.0.1" and opt["--main_process_port"] == "29999"
    assert opt["--rdzv_backend"] == "c10d" and "--multi_gpu" in a
    assert a[a.index("launch/train.py"):] == ["launch/train.py", "--config", str(DEBUG), "--run-dir",
                                              str(tmp_path / "r"), "optim.n_dis=2", "--resume", "auto"]
    assert "processes=4" in r.stdout


# ---------------------------------------------------------------------------- summary


def test_direction_of_metrics():
    assert direction("Eval/fid") == "min" and direction("Eval/fid50k_full") == "min"
    assert direction("Eval/kid_mean") == "min" and direction("Eval/frechet_inception_distance") == "min"
    assert direction("Eval/isc_mean") == "max" and direction("Eval/inception_score") == "max"
    assert direction("Eval/precision") == "max" and direction("Eval/recall") == "max"
    assert direction("Eval/acc") == "max" and direction("Eval/isc_std") is None
    assert direction("Loss/D/main") is None and direction("Timing/img_per_s") is None
    # the trainer's metric names (gan.metrics.names)
    assert direction("Eval/isc") == "max" and direction("Eval/kid") == "min" and direction("Eval/kid_std") is None
    assert direction("Eval/cls_fd") == "min" and direction("Eval/cls_acc") == "max" and direction("Eval/f_score") == "max"
    assert direction("Eval/cls_acc/airplane") is None  # per-class: not compared
    # the VAE's and pix2pix's evaluation measures; KL has no better side, losses none either
    assert direction("Eval/psnr") == "max" and direction("Eval/ssim") == "max"
    assert direction("Eval/recon_mse") == "min" and direction("Eval/l1") == "min" and direction("Eval/mse") == "min"
    assert direction("Eval/bits_per_dim") == "min" and direction("Eval/kl") is None
    assert direction("Loss/G/l1") is None and direction("Loss/VAE/recon") is None and direction("VAE/kl_weight") is None


def test_read_metrics_merges_steps_and_skips_a_torn_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 2, "Loss/G/main": 1.0}\n{"step": 4, "Loss/G/main": 2.0}\n'
                 '{"step": 4, "Eval/fid": 50.0}\n{"step": 4, "Loss/G/main": 3.0}\n{"step": 6, "Loss/G/ma')
    rows = read_metrics(p)
    assert [(r["step"], r["Loss/G/main"]) for r in rows] == [(2, 1.0), (4, 3.0)] and rows[1]["Eval/fid"] == 50.0


def _write_run(run: Path, state=None, metrics=(), error=None):
    run.mkdir(parents=True)
    if state:
        (run / "status.json").write_text(json.dumps({"state": state, "step": 4, "max_steps": 8, "error": error}))
    with open(run / "metrics.jsonl", "w") as f:
        for m in metrics:
            f.write(json.dumps(m) + "\n")


def test_summary_statuses_best_and_files(tmp_path):
    f = sweep_file(tmp_path, grid={"optim.n_dis": [1, 2, 3, 4, 5, 6, 7]})
    out = tmp_path / "o"
    assert sweep_main(["plan", str(f), "--out", str(out)]) == 0
    tasks = json.loads((out / "sweep.json").read_text())["tasks"]
    run = [Path(t["run_dir"]) for t in tasks]
    logs = out / "logs"
    m = [{"step": 2, "Loss/D/main": 1.5, "Loss/G/main": 0.7, "Eval/fid": 40.0, "Eval/isc_mean": 3.0,
          "Eval/cls_acc/airplane": 0.5},
         {"step": 4, "Loss/D/main": 1.2, "Loss/G/main": 0.9, "Eval/fid": 30.0, "Eval/isc_mean": 2.5},
         {"step": 6, "Loss/D/main": 1.1, "Loss/G/main": 1.0, "Eval/fid": 35.0, "Eval/isc_mean": 2.0}]
    _write_run(run[0], "finished", m)                                     # 0 finished
    _write_run(run[1], "failed", m[:1], error="NonFiniteError: loss is nan")  # 1 failed (trainer)
    _write_run(run[2], "running", m[:2])                                  # 2 killed hard: log says so
    (logs / "77_2.log").write_text("[train.sbatch] 2026-01-01T00:00:00Z start job=77_2 restart=0\n"
                                   "slurmstepd: error: *** JOB 78 ON n1 CANCELLED AT 2026-01-01T01:00:00 "
                                   "DUE TO TIME LIMIT ***\n")
    _write_run(run[3], "preempted", m[:2])                                # 3 waiting for its requeue
    (logs / "77_3.log").write_text("[train.sbatch] 2026-01-01T00:00:00Z start job=77_3 restart=0\n"
                                   "[train.sbatch] end rc=0 state=preempted action=requeue\n"
                                   "slurmstepd: error: *** JOB 79 ON n1 CANCELLED AT x DUE TO JOB REQUEUE ***\n")
    _write_run(run[4], "running", m[:2])                                  # 4 running
    (logs / "77_5.log").write_text("[train.sbatch] 2026-01-01T00:00:00Z start job=77_5 restart=0\n"
                                   "error: shards not found\n[train.sbatch] end rc=2 state= action=failed\n")
    # 5: failed before the trainer made its run dir; 6: never started -> missing
    paths = summarize(out)
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [r["status"] for r in rows] == ["finished", "failed", "failed", "preempted", "running", "failed", "missing"]
    assert [r["optim.n_dis"] for r in rows] == ["1", "2", "3", "4", "5", "6", "7"]
    assert "NonFiniteError" in rows[1]["detail"] and "time limit" in rows[2]["detail"]
    assert "requeued" in rows[3]["detail"] and "rc=2" in rows[5]["detail"]
    r0 = rows[0]
    assert float(r0["best Eval/fid"]) == 30.0 and r0["best Eval/fid step"] == "4"
    assert float(r0["best Eval/isc_mean"]) == 3.0 and r0["best Eval/isc_mean step"] == "2"
    assert float(r0["final Eval/fid"]) == 35.0 and float(r0["final Loss/G/main"]) == 1.0
    assert not any("airplane" in k for k in r0)  # per-class metrics stay out of the table
    md = paths["md"].read_text()
    assert "7 grid point(s): 1 finished, 3 failed, 1 preempted, 1 running, 1 missing" in md
    assert "Best Eval/fid: 30" in md and md.count("\n| ") == 8
    assert paths["png"].stat().st_size > 1000


def test_summary_of_a_vae_sweep(tmp_path):
    """The VAE's losses and its evaluation measures, each ranked the way it is better (PSNR, SSIM up; the
    reconstruction error and bits/dim down; KL not ranked); the family in the title; no GAN column."""
    f = sweep_file(tmp_path, base=VAE, grid={"loss.beta": [0.5, 2.0]})
    out = tmp_path / "o"
    assert sweep_main(["plan", str(f), "--out", str(out)]) == 0
    runs = [Path(t["run_dir"]) for t in json.loads((out / "sweep.json").read_text())["tasks"]]
    losses = [{"step": s, "Loss/VAE/total": 300.0 - s, "Loss/VAE/recon": 290.0 - s, "Loss/VAE/kl": 5.0 + s,
               "VAE/kl_weight": 0.5, "GradNorm/vae": 10.0} for s in (1, 2, 3, 4)]
    def ev(step, psnr, ssim, mse, bpd, kl):
        return {"step": step, "Eval/psnr": psnr, "Eval/ssim": ssim, "Eval/recon_mse": mse, "Eval/bits_per_dim": bpd,
                "Eval/kl": kl}

    _write_run(runs[0], "finished", losses + [ev(2, 20.0, 0.5, 0.02, 5.0, 9.0), ev(4, 18.0, 0.6, 0.03, 4.5, 7.0)])
    _write_run(runs[1], "finished", losses + [ev(4, 19.0, 0.4, 0.01, 6.0, 3.0)])
    for r in runs:
        (r / "config.yaml").write_text("family: vae\n")
    paths = summarize(out)
    rows = list(csv.DictReader(open(paths["csv"])))
    r0 = rows[0]
    assert float(r0["best Eval/psnr"]) == 20.0 and r0["best Eval/psnr step"] == "2"
    assert float(r0["best Eval/ssim"]) == 0.6 and float(r0["best Eval/recon_mse"]) == 0.02
    assert float(r0["best Eval/bits_per_dim"]) == 4.5 and float(r0["final Eval/kl"]) == 7.0
    assert float(r0["final Loss/VAE/recon"]) == 286.0 and "best Eval/kl" not in r0
    assert not any(k in c for c in r0 for k in ("Loss/D", "Loss/G", "fid", "VAE/kl_weight", "GradNorm"))
    md = paths["md"].read_text()
    assert md.startswith("# Sweep summary: o (family vae)")
    assert "Best Eval/psnr: 20 (beta=0.5, step 2)" in md and "Best Eval/recon_mse: 0.01 (beta=2.0, step 4)" in md
    assert "No evaluation metrics" not in md

    for r in runs:  # losses only (metrics.every=0, as the VAE and pix2pix train today)
        (r / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in losses))
    md = summarize(out)["md"].read_text()
    assert "No evaluation metrics in these runs" in md and "Best" not in md


def test_summary_without_manifest_finds_run_dirs(tmp_path):
    _write_run(tmp_path / "a", "finished", [{"step": 1, "Loss/G/main": 1.0}])
    _write_run(tmp_path / "b", "running", [])
    (tmp_path / "not-a-run").mkdir()
    rows, keys = collect(tmp_path)
    assert keys == [] and [(r.name, r.status) for r in rows] == [("a", "finished"), ("b", "running")]


def test_summary_cli_errors(tmp_path):
    r = subprocess.run([sys.executable, "launch/sweep_summary.py", str(tmp_path / "nope")], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "sweep directory not found" in r.stderr


def test_summary_of_a_task_past_its_requeue_cap(tmp_path):
    from gan.sweep_summary import run_status

    _write_run(tmp_path / "r", "preempted")
    status, detail = run_status(tmp_path / "r", {"end": (0, "preempted", "stopped")})
    assert status == "preempted" and "not requeued (GAN_MAX_REQUEUES reached): resubmit the sweep" in detail

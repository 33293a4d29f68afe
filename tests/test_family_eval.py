"""Evaluation and pictures of the VAE and pix2pix families on real tiny shards: their metrics during
training (Eval/* rows and scalars, RUN/best, the best by the family's metric), launch/evaluate.py on 1 and
2 gloo ranks with the same values as a one-process computation over every sample at once (rel. 1e-5),
launch/sample.py's modes per family, and the family's metric names in the config.

FID uses a stand-in Inception file: torch-fidelity's architecture with Kaiming-normal convolutions, so its
features vary from image to image and a FID computed from them can be compared (with PyTorch's default
init every image gets nearly the same features and any two sets have FID ~1e-15)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (REPO, assert_metrics_close, assert_nets_kept_apart, ema_and_trained, fit_in_process, load_cli,
                      tiny_images)
from test_paired import inverted_pairs

VAE_METRICS = "bits_per_dim,recon_mse,psnr,ssim,kl"  # + fid where Inception runs (slow on a CPU)
P2P_METRICS = "l1,psnr,ssim"


def _env(tmp: Path, **extra) -> dict:
    return {**os.environ, "TORCH_HOME": str(tmp / "torch-home"), "GAN_METRICS_CACHE": str(tmp / "cache"),
            "GAN_METRICS_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)] if tag in ea.Tags()["scalars"] else []


def _evaluate(run: Path, out: Path, tmp: Path, *args, ranks: int = 1) -> dict:
    """launch/evaluate.py on ``run`` in 1 process or under torchrun on ``ranks`` gloo ranks; the --out JSON."""
    cmd = [sys.executable, "launch/evaluate.py"] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
         "launch/evaluate.py"]
    r = subprocess.run([*cmd, "--run-dir", str(run), "--out", str(out), *map(str, args)], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env=_env(tmp, ACCELERATE_USE_CPU="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------- the VAE


@pytest.fixture(scope="module")
def vae_data(tmp_path_factory, tiny_shards) -> tuple[Path, Path]:
    """(training shards, held-out shards): tiny10's 240 images, and 16 other images of the same classes."""
    from data_shards import array_source, build_shards

    imgs, labels = tiny_images(16, 3, 32, seed=1)
    val = tmp_path_factory.mktemp("vae-val") / "shards"
    build_shards(array_source("tiny10", [f"class{k}" for k in range(10)], imgs, labels), val, "test", "tiny10",
                 shard_size=6, log=None)
    return tiny_shards, val


def _vae_cfg(train, val, *overrides):
    from gan.config import load_config

    return load_config(None, ["family=vae", f"data.shards={train}", f"val.shards={val}", "data.num_workers=2",
                              "train.batch_size=16", "train.mixed_precision=no", "log.progress=false",
                              "log.with=tensorboard",
                              "log.every=1", "log.sample_every=4", "checkpoint.every=4", "log.samples_per_class=2",
                              "model.channels=8", "model.latent_dim=16", "model.conditional=true", "optim.lr_g=2e-3",
                              "optim.betas_g=[0.9,0.999]", *overrides])


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, vae_data) -> Path:
    """An 8-step conditional VAE run with loader workers, evaluated every 4 steps on the held-out split.
    Read-only: copy before writing."""
    root = tmp_path_factory.mktemp("vae-run")
    cfg = _vae_cfg(*vae_data, "train.max_steps=8", "metrics.every=4", f"metrics.metrics={VAE_METRICS}",
                   "metrics.batch_size=8", f"metrics.cache_dir={root / 'cache'}")
    fit_in_process(cfg, root / "run")
    return root / "run"


def test_vae_training_evaluates_on_the_held_out_split_and_keeps_the_best(vae_run):
    """metrics.every for the VAE: Eval/* rows and TensorBoard scalars of every metric at steps 4 and 8, and
    RUN/best holds the EMA VAE of the lowest bits/dim (the default best_metric: the first metric)."""
    evals = [r for r in _rows(vae_run) if "Eval/bits_per_dim" in r]
    assert [r["step"] for r in evals] == [4, 8]
    for r in evals:
        assert {f"Eval/{k}" for k in VAE_METRICS.split(",")} <= set(r)
        assert all(np.isfinite(r[f"Eval/{k}"]) for k in VAE_METRICS.split(","))
        assert 0 < r["Eval/recon_mse"] < 4 and r["Eval/kl"] >= 0 and 0 < r["Eval/bits_per_dim"] < 20
    assert [s for s, _ in _scalars(vae_run, "Eval/psnr")] == [4, 8]
    best = json.loads((vae_run / "best.json").read_text())
    assert best["metric"] == "bits_per_dim" and best["value"] == min(r["Eval/bits_per_dim"] for r in evals)
    assert best["weights"] == "best/vae_ema.safetensors" and (vae_run / "best/vae_ema.safetensors").is_file()
    assert json.loads((vae_run / "best/model.json").read_text())["step"] == best["step"]


def _vae_reference(run: Path, val: Path, inception: Path, n: int) -> dict:
    """The VAE's metrics as one process computes them over every sample at once: every held-out image in one
    batch, every prior sample's features at once, np.cov and torch-fidelity's FID formula."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    from gan.data import eval_batches
    from gan.families.vae.evaluation import per_sample_measures
    from gan.metrics.collective import balanced_labels, eval_noise, generate
    from gan.metrics.core import EVAL_SEED
    from gan.metrics.fidelity import features
    from gan.metrics.frechet import gaussian_stats
    from gan.metrics.run import load_generator

    g = load_generator(run)
    m = g.cfg.model
    x, y = next(iter(eval_batches(val, 1000)))
    out = {k: float(v.mean()) for k, v in per_sample_measures(g.G, x, y, g.cfg.loss.obs_std, EVAL_SEED).items()}
    fake = generate(lambda z, c: g.family.generate(g.G, z, c), eval_noise(n, m.latent_dim, EVAL_SEED),
                    balanced_labels(n, m.num_classes), n, "cpu")
    real = ((x + 1) * 127.5).round().to(torch.uint8)
    stats = [gaussian_stats(features(t, ("2048",), inception, "cpu", 50)["2048"]) for t in (fake, real)]
    out["fid"] = float(fid_statistics_to_metric(*({"mu": mu, "sigma": s} for mu, s in stats), False)
                       ["frechet_inception_distance"])
    return out


@pytest.mark.numerics
@pytest.mark.slow
def test_vae_evaluate_on_one_and_two_gloo_ranks(vae_run, vae_data, standin_inception, tmp_path):
    """launch/evaluate.py on a VAE run: 1 process and 2 gloo ranks (loader workers, each held-out image on
    one rank) give the one-process values within 1e-5; RUN/metrics.json and Eval/* scalars are written."""
    run = tmp_path / "run"
    shutil.copytree(vae_run, run)
    args = ["--metrics", VAE_METRICS + ",fid", "--num-samples", 10, "--batch-size", 8,
            "--inception-weights", standin_inception]
    two = _evaluate(run, tmp_path / "two.json", tmp_path, *args, ranks=2)
    one = _evaluate(run, tmp_path / "one.json", tmp_path, *args)
    ref = _vae_reference(run, vae_data[1], standin_inception, 10)
    assert set(one["metrics"]) == set(two["metrics"]) == set(ref) == set(VAE_METRICS.split(",")) | {"fid"}
    assert_metrics_close(one["metrics"], ref, "vae, 1 rank")  # EVAL_REL: float32 features, other batch shapes
    assert_metrics_close(two["metrics"], ref, "vae, 2 ranks")
    assert two["details"]["processes"] == 2
    entry = json.loads((run / "metrics.json").read_text())["evaluations"]["step-00000008"]
    assert_metrics_close(entry["metrics"], ref, "vae, metrics.json")
    real = entry["details"]["psnr"]["real"]
    assert real["held_out"] is True and real["count"] == 16 and real["split"] == "test"
    assert entry["details"]["fid"]["extractor"]["official"] is False
    assert [s for s, _ in _scalars(run, "Eval/bits_per_dim")][-1] == 8


def test_vae_evaluate_max_real_measures_the_first_n_held_out_images(vae_run, tmp_path):
    """--max-real 7 of 16 held-out images in shards of 6: 7 images measured (the first shard and one of the
    second), and said so; the values are those of those 7 images."""
    from gan.data import eval_batches
    from gan.families.vae.evaluation import per_sample_measures
    from gan.metrics.core import EVAL_SEED
    from gan.metrics.run import load_generator

    run = tmp_path / "run"
    shutil.copytree(vae_run, run)
    got = _evaluate(run, tmp_path / "out.json", tmp_path, "--metrics", VAE_METRICS, "--max-real", 7,
                    "--batch-size", 4)
    assert got["details"]["real"]["count"] == 7 and got["details"]["measured"] == 7
    g = load_generator(run)
    x, y = next(iter(eval_batches(g.cfg.val.shards, 7)))
    ref = per_sample_measures(g.G, x, y, g.cfg.loss.obs_std, EVAL_SEED)
    # float64 sums of float32 per-sample values; batches of 4 vs 7 change only float32 kernel rounding (~1e-7)
    assert got["metrics"] == pytest.approx({k: float(v.mean()) for k, v in ref.items()}, rel=1e-6)


def test_real_statistics_say_what_they_compute_once_and_are_cached(tmp_path, capsys, tiny_shards):
    """A cache miss of real-data statistics (minutes for 50,000 images on a CPU) is said in one line on stderr:
    what, of how many images, of which shards, and where it is kept; a hit says nothing. In-training
    evaluation shows its bars as training does (log.progress)."""
    from gan.config import load_config
    from gan.metrics import heldout
    from gan.metrics.training import request_from_config

    weights, cache = tmp_path / "w.pth", tmp_path / "cache"
    weights.write_bytes(b"any extractor file")  # only its hash enters the cache key here
    calls = []

    def compute():
        calls.append(1)
        return {"inc.real.2048.n": np.array(240.0)}

    for _ in range(2):
        assert heldout.cached_moments(tiny_shards, "real", weights, cache, compute, 0, 240)["inc.real.2048.n"] == 240
    assert calls == [1]
    assert capsys.readouterr().err == (f"evaluation: computing the real statistics (Inception features) of 240 "
                                       f"images of {tiny_shards} (once: cached for next time under {cache})\n")
    heldout.cached_moments(tiny_shards, "real", weights, cache, compute, 7, 7)  # the first 7: their own entry
    assert calls == [1, 1] and "of 7 images" in capsys.readouterr().err
    for progress in (True, False):
        cfg = load_config(None, [f"data.shards={tiny_shards}", f"log.progress={str(progress).lower()}"])
        assert request_from_config(cfg).progress is progress


def test_vae_sample_modes(vae_run, tmp_path, capsys):
    """grid (prior samples, a row per class), recon (input row over output row), interp (two held-out
    images and the latent path), curves, export (a PNG folder); a GAN mode is refused naming the VAE's."""
    run = tmp_path / "run"
    shutil.copytree(vae_run, run)
    sample = load_cli("sample").main
    cell = 32 + 2
    for mode, num, size in [("grid", 3, (3 * cell + 2, 10 * cell + 2)), ("recon", 5, (5 * cell + 2, 2 * cell + 2)),
                            ("interp", 4, (6 * cell + 2, cell + 2))]:
        assert sample(["--run", str(run), "--mode", mode, "--num", str(num)]) == 0, capsys.readouterr().err
        with Image.open(run / "samples" / f"{mode}-step-00000008.png") as img:
            w, h = img.size
            assert h == size[1] and w >= size[0], (mode, img.size)  # grid: class names left of the rows
    assert sample(["--run", str(run), "--mode", "curves"]) == 0
    assert (run / "samples" / "curves.png").is_file()
    assert sample(["--run", str(run), "--mode", "export", "--num", "12", "--class", "3", "--out",
                   str(tmp_path / "e")]) == 0
    assert len(list((tmp_path / "e").glob("*.png"))) == 12
    assert (tmp_path / "e" / "labels.csv").read_text().splitlines()[1] == "000000.png,3,class3"
    capsys.readouterr()
    assert sample(["--run", str(run), "--mode", "classvar"]) == 2
    assert "its modes: grid, recon, interp, curves, export" in capsys.readouterr().err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run), size_guidance={"images": 0})
    ea.Reload()
    assert {"Sample/recon", "Sample/interp", "Sample/grid", "Sample/curves"} <= set(ea.Tags()["images"])


def test_vae_recon_picture_is_the_held_out_input_over_its_reconstruction(vae_run, vae_data, tmp_path, capsys):
    from gan.metrics.run import load_generator

    out = tmp_path / "recon.png"
    assert load_cli("sample").main(["--run", str(vae_run), "--mode", "recon", "--num", "3", "--out", str(out),
                                    "--no-tensorboard"]) == 0
    grid = torch.from_numpy(np.array(Image.open(out))).permute(2, 0, 1)
    from gan.data import eval_batches

    x, y = next(iter(eval_batches(vae_data[1], 3)))
    g = load_generator(vae_run)
    u8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    assert torch.equal(grid[:, 2:34, 2:34], u8(x[0]))  # top row: the first held-out image
    assert torch.equal(grid[:, 36:68, 36:68], u8(g.G.reconstruct(x, y)[1]))  # bottom row: reconstructions


def evaluate_both_nets(src, metrics: str, tmp_path):
    """A copy of the run ``src`` evaluated with --net trained, then with the default EMA: (run, trained, ema)."""
    run = tmp_path / "run"
    shutil.copytree(src, run)
    args = ["--metrics", metrics, "--batch-size", 4, "--no-tensorboard"]
    trained = _evaluate(run, tmp_path / "trained.json", tmp_path, *args, "--net", "trained")
    return run, trained, _evaluate(run, tmp_path / "ema.json", tmp_path, *args)


def test_vae_evaluate_and_sample_either_network(vae_run, vae_data, tmp_path, capsys):
    """--net trained measures the checkpoint's trained VAE: the values of its weights loaded by hand; the EMA's
    entry stays apart and is the artifact's; each recon picture is drawn by its own network and says which."""
    from gan.data import eval_batches
    from gan.families.vae.evaluation import per_sample_measures
    from gan.metrics.core import EVAL_SEED

    run, trained, ema = evaluate_both_nets(vae_run, VAE_METRICS, tmp_path)
    g, G = ema_and_trained(run, 8)
    x, y = next(iter(eval_batches(vae_data[1], 1000)))
    for net, got in ((G, trained), (g.G, ema)):
        ref = per_sample_measures(net, x, y, g.cfg.loss.obs_std, EVAL_SEED)
        # float64 sums of float32 per-sample values; batches of 4 vs 16 change only float32 kernel rounding (~1e-7)
        assert got["metrics"] == pytest.approx({k: float(v.mean()) for k, v in ref.items()}, rel=1e-6)
    assert_nets_kept_apart(run, "step-00000008", ema, trained)
    sample = load_cli("sample").main
    x, y = next(iter(eval_batches(vae_data[1], 3)))
    u8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    for net, name, G_net in (("trained", "recon-step-00000008-trained.png", G),
                             ("ema", "recon-step-00000008.png", g.G)):
        assert sample(["--run", str(run), "--mode", "recon", "--num", "3", "--net", net, "--no-tensorboard"]) == 0
        grid = torch.from_numpy(np.array(Image.open(run / "samples" / name))).permute(2, 0, 1)
        assert torch.equal(grid[:, 36:68, 36:68], u8(G_net.reconstruct(x, y)[1])), net  # bottom row: its outputs


def test_vae_metric_names_are_the_family_s(vae_data):
    from gan.config import ConfigError
    from gan.metrics.training import check_setup

    with pytest.raises(ConfigError, match="'cls_acc' for family vae; valid metrics: bits_per_dim, recon_mse, psnr, "
                                          "ssim, kl, fid"):
        _vae_cfg(*vae_data, "metrics.metrics=psnr,cls_acc")
    with pytest.raises(ConfigError, match="metrics.best_metric.*'kl' is not a ranked metric.*one of: psnr$"):
        _vae_cfg(*vae_data, "metrics.metrics=kl,psnr", "metrics.best_metric=kl")
    assert _vae_cfg(*vae_data, "metrics.metrics=kl,psnr").metrics.best_metric == "psnr"  # kl has no better side
    assert _vae_cfg(*vae_data, "metrics.metrics=kl").metrics.best_metric == ""  # nothing to pick the best by
    cfg = _vae_cfg(*vae_data, "model.recon=bce")
    assert cfg.metrics.metrics == "recon_mse,psnr,ssim,kl"  # the default leaves out what bce has not
    with pytest.raises(ConfigError, match="bits_per_dim needs model.recon=mse"):
        check_setup(_vae_cfg(*vae_data, "model.recon=bce", "metrics.every=2", "metrics.metrics=bits_per_dim"))
    with pytest.raises(ConfigError, match="Inception weights"):
        check_setup(_vae_cfg(*vae_data, "metrics.every=2", "metrics.metrics=fid",
                             "metrics.inception_weights=/nonexistent.pth"))


# ---------------------------------------------------------------------------- pix2pix


P2P = ["model.img_size=32", "model.g_channels=4", "model.d_channels=4", "val.pictures=3", "train.batch_size=8",
       "train.mixed_precision=no", "data.num_workers=2", "data.shuffle_buffer=16", "log.progress=false",
       "log.with=", "log.every=1", "log.sample_every=2", "checkpoint.every=2", "ema.warmup_steps=0"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, Path]:
    """(48 training pairs (x, 255 - x) of 3x32x32 noise, 12 held-out pairs), as test_pix2pix_family builds them."""
    root = tmp_path_factory.mktemp("p2p")
    return inverted_pairs(root / "train", size=32), inverted_pairs(root / "val", n=12, size=32, shard_size=5)


@pytest.fixture(scope="module")
def p2p_run(tmp_path_factory, pairs) -> Path:
    """A 4-step pix2pix run with loader workers, evaluated every 2 steps (l1, psnr, ssim; best by psnr)."""
    from gan.config import load_config

    root = tmp_path_factory.mktemp("p2p-run")
    cfg = load_config(None, ["family=pix2pix", f"data.shards={pairs[0]}", f"val.shards={pairs[1]}", *P2P,
                             "train.max_steps=4", "metrics.every=2", f"metrics.metrics={P2P_METRICS}",
                             "metrics.best_metric=psnr", "metrics.batch_size=8", "log.with=tensorboard"])
    fit_in_process(cfg, root / "run")
    return root / "run"


def test_pix2pix_training_evaluates_the_validation_pairs_and_keeps_the_best(p2p_run):
    evals = [r for r in _rows(p2p_run) if "Eval/l1" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert {f"Eval/{k}" for k in P2P_METRICS.split(",")} <= set(r)
        assert 0 < r["Eval/l1"] < 2 and -1 <= r["Eval/ssim"] <= 1
    assert [s for s, _ in _scalars(p2p_run, "Eval/ssim")] == [2, 4]
    best = json.loads((p2p_run / "best.json").read_text())
    assert best["metric"] == "psnr" and best["value"] == max(r["Eval/psnr"] for r in evals)  # higher is better
    assert (p2p_run / "best/G_ema.safetensors").is_file()


def _p2p_reference(run: Path, val: Path, inception: Path) -> dict:
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    from gan.data import eval_batches
    from gan.families.pix2pix.evaluation import per_sample_measures
    from gan.metrics.fidelity import features
    from gan.metrics.frechet import gaussian_stats
    from gan.metrics.run import load_generator
    from gan.viz import to_uint8

    g = load_generator(run)
    a, b, _ = next(iter(eval_batches(val, 1000)))
    values, fake = per_sample_measures(g.G, a, b)
    out = {k: float(values[k].mean()) for k in ("l1", "psnr", "ssim")}
    stats = [gaussian_stats(features(to_uint8(t), ("2048",), inception, "cpu", 50)["2048"]) for t in (fake, b)]
    out["fid"] = float(fid_statistics_to_metric(*({"mu": mu, "sigma": s} for mu, s in stats), False)
                       ["frechet_inception_distance"])
    return out


@pytest.mark.numerics
@pytest.mark.slow
def test_pix2pix_evaluate_on_one_and_two_gloo_ranks(p2p_run, pairs, standin_inception, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(p2p_run, run)
    args = ["--metrics", P2P_METRICS + ",fid", "--batch-size", 8, "--inception-weights", standin_inception]
    two = _evaluate(run, tmp_path / "two.json", tmp_path, *args, ranks=2)
    one = _evaluate(run, tmp_path / "one.json", tmp_path, *args)
    ref = _p2p_reference(run, pairs[1], standin_inception)
    assert set(one["metrics"]) == set(two["metrics"]) == set(ref)
    assert_metrics_close(one["metrics"], ref, "pix2pix, 1 rank")  # EVAL_REL: float32 features, other batch shapes
    assert_metrics_close(two["metrics"], ref, "pix2pix, 2 ranks")
    entry = json.loads((run / "metrics.json").read_text())["evaluations"]["step-00000004"]
    assert entry["details"]["l1"]["real"]["count"] == 12 and entry["details"]["l1"]["real"]["held_out"] is True
    # the targets' feature moments of each part are cached: one entry for 1 rank, one per rank for 2
    assert len(list((tmp_path / "cache").glob("heldout-*.npz"))) == 3
    assert [s for s, _ in _scalars(run, "Eval/l1")][-1] == 4


def test_pix2pix_evaluate_max_real_measures_the_first_n_pairs(p2p_run, tmp_path):
    """--max-real 7 of 12 validation pairs in shards of 5: 7 pairs measured, and said so."""
    run = tmp_path / "run"
    shutil.copytree(p2p_run, run)
    got = _evaluate(run, tmp_path / "out.json", tmp_path, "--max-real", 7, "--batch-size", 4)
    assert got["details"]["real"]["count"] == 7 and got["details"]["measured"] == 7


def test_pix2pix_sample_modes(p2p_run, pairs, tmp_path, capsys):
    from gan.data import eval_batches
    from gan.metrics.run import load_generator
    from gan.viz import to_uint8

    sample = load_cli("sample").main
    out = tmp_path / "t.png"
    assert sample(["--run", str(p2p_run), "--mode", "triplets", "--num", "4", "--out", str(out),
                   "--no-tensorboard"]) == 0, capsys.readouterr().err
    grid = torch.from_numpy(np.array(Image.open(out))).permute(2, 0, 1)
    assert tuple(grid.shape[1:]) == (4 * 34 + 2, 3 * 34 + 2)
    a, b, _ = next(iter(eval_batches(pairs[1], 4)))
    g = load_generator(p2p_run)
    with torch.no_grad():
        fake = to_uint8(g.G(a))
    assert torch.equal(grid[:, 36:68, 2:34], to_uint8(a[1])) and torch.equal(grid[:, 36:68, 36:68], fake[1])
    assert torch.equal(grid[:, 36:68, 70:102], to_uint8(b[1]))
    folder = tmp_path / "outputs"
    assert sample(["--run", str(p2p_run), "--mode", "export", "--out", str(folder), "--no-tensorboard"]) == 0
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 12  # every held-out pair (fewer than the default 1000)
    assert torch.equal(torch.from_numpy(np.array(Image.open(pngs[0]))).permute(2, 0, 1), fake[0])
    capsys.readouterr()
    assert sample(["--run", str(p2p_run), "--mode", "grid"]) == 2
    assert "the pix2pix family has no such picture; its modes: triplets, curves, export" in capsys.readouterr().err


def test_pix2pix_evaluate_and_sample_either_network(p2p_run, pairs, tmp_path):
    """--net trained measures the checkpoint's trained G (the values of its weights loaded by hand), kept apart
    from the EMA's entry; the triplets picture of each is drawn by its own G and says which."""
    from gan.data import eval_batches
    from gan.families.pix2pix.evaluation import per_sample_measures
    from gan.viz import to_uint8

    run, trained, ema = evaluate_both_nets(p2p_run, P2P_METRICS, tmp_path)
    g, G = ema_and_trained(run, 4)
    a, b, _ = next(iter(eval_batches(pairs[1], 1000)))
    for net, got in ((G, trained), (g.G, ema)):
        values, _ = per_sample_measures(net, a, b)
        # float64 means of float32 per-sample values; batches of 4 vs 12 change only float32 kernel rounding (~1e-7)
        assert got["metrics"] == pytest.approx({k: float(values[k].mean()) for k in P2P_METRICS.split(",")}, rel=1e-6)
    assert_nets_kept_apart(run, "step-00000004", ema, trained)
    sample = load_cli("sample").main
    for net, name, G_net in (("trained", "triplets-step-00000004-trained.png", G),
                             ("ema", "triplets-step-00000004.png", g.G)):
        assert sample(["--run", str(run), "--mode", "triplets", "--num", "2", "--net", net, "--no-tensorboard"]) == 0
        grid = torch.from_numpy(np.array(Image.open(run / "samples" / name))).permute(2, 0, 1)
        with torch.no_grad():
            assert torch.equal(grid[:, 36:68, 36:68], to_uint8(G_net(a[:2]))[1]), net  # the middle column: its output


def test_pix2pix_metric_names_are_the_family_s(pairs):
    from gan.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="'bits_per_dim' for family pix2pix; valid metrics: l1, psnr, ssim, fid"):
        load_config(None, ["family=pix2pix", f"data.shards={pairs[0]}", "metrics.metrics=l1,bits_per_dim"])
    cfg = load_config(None, ["family=pix2pix", f"data.shards={pairs[0]}"])
    assert (cfg.metrics.metrics, cfg.metrics.best_metric) == ("l1,psnr,ssim", "l1")

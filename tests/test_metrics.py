"""Evaluation (gan.metrics, launch/evaluate.py) on CPU: tiny runs, a tiny classifier, and a stand-in
Inception weights file (torch-fidelity's architecture, random values: the pipeline and the output
format are checked, never the numbers)."""
from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_metrics_close, assert_nets_kept_apart, ema_and_trained, load_cli, train_debug

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [f"class{k}" for k in range(10)]


def _env(tmp: Path, **extra) -> dict:
    """No Inception weights in torch.hub's cache, a private stats cache, one thread."""
    return {**os.environ, "TORCH_HOME": str(tmp / "torch-home"), "GAN_METRICS_CACHE": str(tmp / "cache"),
            "GAN_METRICS_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1", **extra}


def train(run_dir: Path, shards: Path, *overrides, check=True):
    return train_debug(run_dir, shards, *overrides, check=check, env={"OMP_NUM_THREADS": "1"})


def evaluate(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "launch/evaluate.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_shards) -> Path:
    """A 6-step debug run on tiny_shards (checkpoints step-5 and step-6). Read-only: copy before writing."""
    run = tmp_path_factory.mktemp("tiny_run") / "run"
    train(run, tiny_shards, "train.max_steps=6")
    return run


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


# ---------------------------------------------------------------------------- units


def test_metric_names_and_counts():
    from gan.metrics.names import better, count_problems, keys_of, parse_metrics

    assert parse_metrics(" fid, cls_acc ,fid") == ["fid", "cls_acc"]
    with pytest.raises(ValueError, match="unknown metric.*'fidd'.*valid metrics: fid, isc, kid, prc, cls_acc, cls_fd"):
        parse_metrics("fidd,cls_acc")
    assert keys_of(["isc", "prc"]) == ["isc", "isc_std", "precision", "recall", "f_score"]
    assert better("fid", 3.0, 4.0) and not better("cls_acc", 0.3, 0.4) and better("cls_fd/cat", 1.0, 2.0)
    problems = count_problems(["kid", "isc"], 50, kid_subset_size=100, isc_splits=60)
    assert len(problems) == 2 and "kid_subset_size=100" in problems[0] and "isc_splits=60" in problems[1]
    assert count_problems(["cls_fd"], 15, 1000, 10, num_classes=10)


def test_frechet_distance_known_values():
    from gan.metrics.frechet import frechet_distance, gaussian_stats

    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 4))
    mu, sigma = gaussian_stats(a)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    # N(0, I) vs N(1, 4I) in 4-d: |1|^2 * 4 + 4 * (1 + 4 - 2 * 2) = 8
    assert frechet_distance(np.zeros(4), np.eye(4), np.ones(4), 4 * np.eye(4)) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_update_best_and_patience():
    from gan.config import load_config
    from gan.metrics.training import update_best

    cfg = load_config(ROOT / "configs/debug_cpu.yaml", ["metrics.every=1", "metrics.patience=2",
                                                          "metrics.metrics=cls_fd,cls_acc"])
    assert cfg.metrics.best_metric == "cls_fd"  # the first key by default
    best: dict = {}
    seq = [(1, 5.0, True, False), (2, 4.0, True, False), (3, 4.5, False, False), (4, float("nan"), False, True)]
    for step, v, improved, stop in seq:
        got = update_best(best, {"cls_fd": v, "cls_acc": 0.1}, cfg, step)
        assert got[:2] == (improved, stop), (step, got)
    assert best["value"] == 4.0 and best["step"] == 2 and best["stale"] == 2
    assert "metrics.patience=2" in got[2]


def test_metrics_config_validation():
    from gan.config import ConfigError, load_config

    for override, words in [("metrics.metrics=fid,bogus", "valid metrics: fid, isc, kid, prc, cls_acc, cls_fd"),
                            ("metrics.best_metric=fid", "metrics.best_metric"),
                            ("metrics.patience=3", "metrics.every"),
                            ("metrics.every=-1", "metrics.every"),
                            ("metrics.num_samples=20", "kid_subset_size")]:
        extra = ["metrics.metrics=kid"] if "num_samples" in override else []
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
            load_config(ROOT / "configs/debug_cpu.yaml", [*extra, override])


@pytest.mark.numerics
def test_classifier_file_roundtrip(tmp_path):
    from gan.metrics.classifier import ResNet9, load_classifier, save_classifier

    torch.manual_seed(0)
    m = ResNet9((8, 8, 16, 16)).eval()
    path = save_classifier(m, tmp_path / "c.safetensors", {"classes": CLASSES, "test_accuracy": 0.5})
    loaded, info = load_classifier(path)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    f0, l0 = m.features_and_logits(x)
    f1, l1 = loaded.features_and_logits(x)
    assert info["classes"] == CLASSES and f1.shape == (4, 16) and l1.shape == (4, 10)
    # Stored in fp16: each weight and statistic rounded by at most 2^-11 of itself (10-bit mantissa), so to
    # first order each of the L layers that hold some moves the logits by at most 2^-11 of their scale.
    # Measured: 4.2e-4 of max|logit| (5 seeds; default and avx2 CPU kernels alike); the bound L * 2^-11 with L = 17 is 8.3e-3.
    layers = sum(1 for mod in m.modules() if any(True for _ in mod.parameters(recurse=False)))
    bound = layers * 2.0 ** -11 * l0.abs().max().item()
    assert (l1 - l0).abs().max().item() <= bound, ((l1 - l0).abs().max().item(), bound)


def test_committed_classifier_is_small_and_labelled():
    from gan.metrics.classifier import DEFAULT_WEIGHTS, read_classifier_info

    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip("classifier weights not committed yet")
    assert DEFAULT_WEIGHTS.stat().st_size < 5 * 2**20
    arch, info = read_classifier_info(DEFAULT_WEIGHTS)
    assert info["classes"][:2] == ["airplane", "automobile"] and 0 < info["test_accuracy"] <= 1
    assert "recipe" in info and info["epochs_done"] >= 1


def test_generation_is_balanced_and_world_size_independent():
    from gan.metrics.collective import balanced_labels, eval_noise, generate_slice, rank_range

    assert balanced_labels(25, 10).bincount().tolist() == [3] * 5 + [2] * 5
    assert [rank_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 10)]
    G = lambda z, y: torch.tanh(z[:, :3, None, None].expand(-1, 3, 4, 4) + y[:, None, None, None])  # noqa: E731
    images, labels = generate_slice(G, 7, 5, 3, seed=1, batch_size=3, device="cpu")
    assert images.dtype == torch.uint8 and images.shape == (7, 3, 4, 4) and labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert torch.equal(eval_noise(7, 5, 1), eval_noise(7, 5, 1))


# ---------------------------------------------------------------------------- evaluate.py, offline metrics


def test_evaluate_cls_end_to_end(run_copy, tiny_classifier, tmp_path):
    env = _env(tmp_path)
    r = evaluate("--run", run_copy, "--metrics", "cls_acc,cls_fd", "--num-samples", 40, "--batch-size", 16,
                 "--classifier", tiny_classifier, env=env)
    assert r.returncode == 0, r.stderr
    assert "generate: 100%" in r.stderr and "classifier features: 100%" in r.stderr  # progress bars, stdout stays JSON
    printed = json.loads(r.stdout)
    doc = json.loads((run_copy / "metrics.json").read_text())
    entry = doc["evaluations"]["step-00000006"]
    assert doc["format"] == 1 and entry["step"] == 6 and entry["source"].endswith("checkpoints/step-00000006")
    m = entry["metrics"]
    assert m == printed["metrics"]
    assert 0.0 <= m["cls_acc"] <= 1.0 and m["cls_fd"] >= 0.0 and math.isfinite(m["cls_fd"])
    assert {f"cls_acc/{c}" for c in CLASSES} | {f"cls_fd/{c}" for c in CLASSES} <= set(m)
    det = entry["details"]["cls_fd"]
    assert det["num_samples"] == 40 and det["classifier"]["path"] == str(tiny_classifier)
    assert det["real"]["count"] == 240 and det["real"]["dataset"] == "tiny10"
    assert list((tmp_path / "cache").glob("cls-*.npz"))  # real statistics cached

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run_copy), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("Eval/cls_fd")] == [6]

    # another evaluation of another checkpoint merges into the same file
    r = evaluate("--run", run_copy, "--checkpoint", run_copy / "checkpoints/step-00000005", "--metrics", "cls_acc",
                 "--num-samples", 20, "--classifier", tiny_classifier, env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads((run_copy / "metrics.json").read_text())
    assert set(doc["evaluations"]) == {"step-00000005", "step-00000006"}
    assert "cls_fd" in doc["evaluations"]["step-00000006"]["metrics"]


@pytest.mark.numerics
def test_evaluate_export_and_same_as_checkpoint(run_copy, tiny_classifier, tmp_path):
    """The export (EMA G as safetensors) and the checkpoint's EMA give the same numbers."""
    args = ["--metrics", "cls_acc,cls_fd", "--num-samples", 20, "--classifier", tiny_classifier, "--no-tensorboard"]
    a = evaluate("--run", run_copy, *args, env=_env(tmp_path))
    b = evaluate("--run", run_copy, "--checkpoint", run_copy / "export/G_ema.safetensors", *args, env=_env(tmp_path))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    # the same weights through the same code: approx only spares the last bits of a float64 mean
    assert json.loads(a.stdout)["metrics"] == pytest.approx(json.loads(b.stdout)["metrics"])


def test_real_against_itself_is_the_floor(tiny_shards, tiny_classifier, tmp_path):
    out = tmp_path / "floor.json"
    r = evaluate("--fake-shards", tiny_shards, "--real-shards", tiny_shards, "--metrics", "cls_fd,cls_acc",
                 "--classifier", tiny_classifier, "--out", out, env=_env(tmp_path))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    # the same images: distance 0, up to float64 sqrtm residue (~1e-12 of the trace)
    assert res["metrics"]["cls_fd"] == pytest.approx(0.0, abs=1e-6)
    assert res["metrics"]["cls_acc"] == pytest.approx(res["details"]["offline"]["real_cls_acc"])


def _reference_cls(run: Path, classifier: Path, shards: Path, n: int, G=None) -> dict:
    """cls_acc and cls_fd as one process computed them before evaluation was split over ranks: every
    sample's features at once, np.cov, the Frechet distance (per class too); of ``G``, else the run's EMA G."""
    from gan.metrics.classifier import load_classifier
    from gan.metrics.collective import balanced_labels, eval_noise, generate
    from gan.metrics.core import EVAL_SEED
    from gan.metrics.frechet import frechet_distance, gaussian_stats
    from gan.metrics.offline import classify
    from gan.metrics.realdata import load_shard_images
    from gan.metrics.run import load_generator

    g = load_generator(run)
    m = g.cfg.model
    y = balanced_labels(n, m.num_classes)
    images = generate(G or g.G, eval_noise(n, m.z_dim, EVAL_SEED), y, 8, "cpu")
    model = load_classifier(classifier)[0]
    feats, preds = classify(model, images, 8, "cpu")
    real_images, real_labels = load_shard_images(shards)
    real_feats, _ = classify(model, real_images, 64, "cpu")
    out = {"cls_acc": float((preds == y).double().mean()),
           "cls_fd": frechet_distance(*gaussian_stats(feats), *gaussian_stats(real_feats))}
    for k, name in enumerate(CLASSES):
        out[f"cls_acc/{name}"] = float((preds[y == k] == k).double().mean())
        out[f"cls_fd/{name}"] = frechet_distance(*gaussian_stats(feats[y == k]),
                                                 *gaussian_stats(real_feats[real_labels == k]))
    return out


@pytest.mark.numerics
def test_evaluate_the_trained_generator(run_copy, tiny_classifier, tiny_shards, tmp_path):
    """--net trained measures the checkpoint's trained G: the values of its model.safetensors loaded by hand;
    printed, in metrics.json and in TensorBoard (Eval/trained/*) apart from the EMA's, which stays the export's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["--run", run_copy, "--metrics", "cls_acc,cls_fd", "--num-samples", 45, "--batch-size", 8,
            "--classifier", tiny_classifier]
    t, e = evaluate(*args, "--net", "trained", env=_env(tmp_path)), evaluate(*args, env=_env(tmp_path))
    assert t.returncode == 0 and e.returncode == 0, t.stderr + e.stderr
    trained, ema = json.loads(t.stdout), json.loads(e.stdout)
    _, G = ema_and_trained(run_copy, 6)
    ref = _reference_cls(run_copy, tiny_classifier, tiny_shards, 45, G)
    assert_metrics_close(trained["metrics"], ref, "trained G, 1 rank")  # EVAL_REL: float32 features, other batches
    assert_nets_kept_apart(run_copy, "step-00000006", ema, trained)
    ea = EventAccumulator(str(run_copy), size_guidance={"scalars": 0})
    ea.Reload()
    assert [s.value for s in ea.Scalars("Eval/trained/cls_fd")] == [pytest.approx(trained["metrics"]["cls_fd"])]
    assert [s.value for s in ea.Scalars("Eval/cls_fd")] == [pytest.approx(ema["metrics"]["cls_fd"])]


def test_trained_net_needs_a_checkpoint(run_copy, capsys):
    """--net trained with an export (the EMA alone), with a damaged checkpoint, or in a run whose only weights
    are the export: one line, exit 2, nothing written; an unknown --net is argparse's exit 2."""
    before = _snapshot(run_copy)
    export = run_copy / "export/G_ema.safetensors"
    rc, out = _run_cli(capsys, "--run", run_copy, "--net", "trained", "--checkpoint", export)
    assert rc == 2 and out.err.count("\n") == 1 and f"{export} is an export" in out.err, out.err
    assert "pass --checkpoint RUN/checkpoints/step-XXXXXXXX, or drop --net trained" in out.err
    part = run_copy / "checkpoints/step-00000005/model.safetensors"  # the trained G, read only once verified
    part.write_bytes(part.read_bytes()[:-1] + bytes([part.read_bytes()[-1] ^ 1]))
    rc, out = _run_cli(capsys, "--run", run_copy, "--net", "trained", "--checkpoint", part.parent)
    assert rc == 2 and f"{part} is damaged" in out.err, out.err
    shutil.rmtree(run_copy / "checkpoints")
    rc, out = _run_cli(capsys, "--run", run_copy, "--net", "trained")
    assert rc == 2 and "has no checkpoint that verifies, only the export" in out.err, out.err
    with pytest.raises(SystemExit) as e:
        _run_cli(capsys, "--run", run_copy, "--net", "raw")
    assert e.value.code == 2 and "invalid choice: 'raw' (choose from 'ema', 'trained')" in capsys.readouterr().err
    assert {k: v for k, v in _snapshot(run_copy).items() if not k.startswith("checkpoints/")} == \
        {k: v for k, v in before.items() if not k.startswith("checkpoints/")}


def _on_two_then_one_process(run, common: list, tmp_path: Path, timeout: int = 600) -> tuple[dict, dict]:
    """launch/evaluate.py with the arguments ``common`` under torchrun on 2 gloo CPU processes, then in one
    process (sharing the metrics cache): (the one-process metrics, the 2-process report)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "launch/evaluate.py", "--run-dir", str(run), "--out", str(tmp_path / "two.json"), *map(str, common)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=_env(tmp_path, ACCELERATE_USE_CPU="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["details"]["processes"] == 2
    one = evaluate("--run", run, "--out", tmp_path / "one.json", *common, env=_env(tmp_path), timeout=timeout)
    assert one.returncode == 0, one.stderr
    return json.loads((tmp_path / "one.json").read_text())["metrics"], two


@pytest.mark.numerics
@pytest.mark.slow
def test_two_process_gloo_evaluation(run_copy, tiny_classifier, tiny_shards, tmp_path):
    """torchrun, 2 CPU processes (gloo): each rank measures its own slice and only sums cross ranks; 1 and 2
    processes give the values of the one-process computation on all samples at once (rel. 1e-5), and a
    second evaluation reads each rank's real statistics from the cache."""
    common = ["--metrics", "cls_acc,cls_fd", "--num-samples", 45, "--batch-size", 8, "--classifier", tiny_classifier,
              "--no-tensorboard"]
    one, two = _on_two_then_one_process(run_copy, common, tmp_path)
    ref = _reference_cls(run_copy, tiny_classifier, tiny_shards, 45)
    assert set(one) == set(two["metrics"]) == set(ref)
    assert_metrics_close(one, ref, "cls, 1 rank")  # EVAL_REL: float32 features, other batch shapes
    assert_metrics_close(two["metrics"], ref, "cls, 2 ranks")
    # real statistics: one cache entry per slice (the whole set for 1 rank, two halves for 2 ranks)
    assert len(list((tmp_path / "cache").glob("cls-*.npz"))) == 3


@pytest.mark.slow
def test_a_rank_that_dies_during_evaluation_ends_every_rank(run_copy, tmp_path):
    """Rank 1 dies in the middle of its part (a per-sample measure that exits): rank 0 does not wait for
    it but ends with the PeerError training uses, naming what happened."""
    script = tmp_path / "die.py"
    script.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from gan.metrics.per_sample import register\n"
        "def die(images, labels):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        os._exit(3)\n"
        "    return images.float().mean((1, 2, 3))\n"
        "register('die', die, higher_is_better=True)\n"
        "from conftest import load_cli\n"
        "sys.exit(load_cli('evaluate').main(sys.argv[1:]))\n")
    # torchrun SIGTERMs the surviving rank when it sees rank 1 gone; under load that could come before rank 0
    # reaches its collective and reports. A slow monitor leaves rank 0 the time to end by itself.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--monitor-interval", "15",
           "--nproc_per_node", "2", str(script),
           "--run-dir", str(run_copy), "--metrics", "die", "--num-samples", "20", "--no-tensorboard"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=_env(tmp_path, ACCELERATE_USE_CPU="1"))
    assert r.returncode != 0
    assert re.search(r"error: rank 0 during evaluation: another rank died", r.stderr), r.stderr
    assert not (run_copy / "metrics.json").exists()


def test_per_sample_measures_are_means_over_every_sample(run_copy, tmp_path, monkeypatch):
    """A registered per-sample measure is a metric name; its value is the float64 mean over all samples."""
    from gan.metrics import names, per_sample
    from gan.metrics.collective import balanced_labels, eval_noise, generate
    from gan.metrics.core import EVAL_SEED, EvalRequest, evaluate_generator
    from gan.metrics.run import load_generator

    monkeypatch.setattr(per_sample, "MEASURES", {})
    monkeypatch.setattr(names, "METRICS", dict(names.METRICS))
    monkeypatch.setattr(names, "HIGHER_IS_BETTER", set(names.HIGHER_IS_BETTER))
    per_sample.register("brightness", lambda x, y: x.double().mean((1, 2, 3)), higher_is_better=True)
    with pytest.raises(ValueError, match="taken"):
        per_sample.register("fid", lambda x, y: x, higher_is_better=False)
    g = load_generator(run_copy)
    m = g.cfg.model
    req = EvalRequest(names="brightness", num_samples=13, real_shards=g.cfg.data.shards, batch_size=4)
    values, _ = evaluate_generator(g.G, m.z_dim, m.num_classes, m.img_channels, m.img_size, req, "cpu")
    images = generate(g.G, eval_noise(13, m.z_dim, EVAL_SEED), balanced_labels(13, m.num_classes), 13, "cpu")
    assert values == {"brightness": pytest.approx(float(images.double().mean()), rel=1e-12)}
    assert names.better("brightness", 2.0, 1.0)
    assert per_sample.means({"a": torch.tensor([1.0, 2.0, 4.0])}) == {"a": pytest.approx(7 / 3)}


# ---------------------------------------------------------------------------- torch-fidelity path


@pytest.mark.slow
def test_inception_path_with_standin_weights(run_copy, standin_inception, tmp_path):
    """fid, isc, kid, prc through torch-fidelity with generated uint8 images as a Dataset, offline."""
    env = _env(tmp_path, OMP_NUM_THREADS="2")
    r = evaluate("--run", run_copy, "--metrics", "fid,isc,kid,prc", "--num-samples", 20, "--kid-subset-size", 10,
                 "--isc-splits", 2, "--max-real", 30, "--batch-size", 25, "--inception-weights", standin_inception,
                 env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    entry = json.loads((run_copy / "metrics.json").read_text())["evaluations"]["step-00000006"]
    assert set(entry["metrics"]) == {"fid", "isc", "isc_std", "kid", "kid_std", "precision", "recall", "f_score"}
    assert all(isinstance(v, float) for v in entry["metrics"].values())
    det = entry["details"]["fid"]
    assert det["extractor"]["name"] == "inception-v3-compat" and det["extractor"]["official"] is False
    assert det["weights_path"] == str(standin_inception) and det["real"]["count"] == 30
    assert entry["details"]["kid"]["kid_subset_size"] == 10 and entry["details"]["isc"]["isc_splits"] == 2
    cached = list((tmp_path / "cache").glob("inception-*.npz"))
    assert cached, "real features are cached under the manifest + extractor key"


def _reference_fidelity(run: Path, weights: Path, shards: Path, n: int, max_real: int, batch: int,
                        kid_subset_size: int, isc_splits: int) -> dict:
    """fid, isc, kid and prc as torch-fidelity computes them in one process, from the same images: its own
    calculate_metrics on the generated samples and the first ``max_real`` real images (KID's subsets and
    IS's shuffle from its default rng_seed, as gan.metrics leaves them)."""
    import torch_fidelity

    from gan.metrics.collective import balanced_labels, eval_noise, generate
    from gan.metrics.core import EVAL_SEED
    from gan.metrics.fidelity import EXTRACTOR, ImagesDataset
    from gan.metrics.realdata import load_shard_images
    from gan.metrics.run import load_generator

    g = load_generator(run)
    m = g.cfg.model
    fake = generate(g.G, eval_noise(n, m.z_dim, EVAL_SEED), balanced_labels(n, m.num_classes), batch, "cpu")
    real = load_shard_images(shards, max_real)[0]
    out = torch_fidelity.calculate_metrics(
        input1=ImagesDataset(fake), input2=ImagesDataset(real), fid=True, isc=True, kid=True, prc=True,
        feature_extractor=EXTRACTOR, feature_extractor_weights_path=str(weights), kid_subset_size=kid_subset_size,
        isc_splits=isc_splits, batch_size=batch, cuda=False, cache=False, save_cpu_ram=True, verbose=False)
    keys = {"frechet_inception_distance": "fid", "inception_score_mean": "isc", "inception_score_std": "isc_std",
            "kernel_inception_distance_mean": "kid", "kernel_inception_distance_std": "kid_std",
            "precision": "precision", "recall": "recall", "f_score": "f_score"}
    return {ours: float(out[theirs]) for theirs, ours in keys.items()}


@pytest.mark.numerics
@pytest.mark.slow
def test_fidelity_metrics_on_1_and_2_ranks_match_torch_fidelity(run_copy, standin_inception, tiny_shards, tmp_path):
    """fid, isc, kid and prc of the same samples (25, split 13/12 over 2 gloo ranks) against 30 real images:
    1 process and 2 processes (each extracts features of its own slice; FID's moments are summed, the
    rows IS/KID/precision-recall need are gathered in sample order) give torch-fidelity's own values
    computed in one process (rel. 1e-5); KID's random subsets are drawn alike everywhere."""
    common = ["--metrics", "fid,isc,kid,prc", "--num-samples", 25, "--max-real", 30, "--kid-subset-size", 10,
              "--isc-splits", 2, "--batch-size", 10, "--inception-weights", standin_inception, "--no-tensorboard",
              "--no-progress"]
    one, two = _on_two_then_one_process(run_copy, common, tmp_path, timeout=900)
    ref = _reference_fidelity(run_copy, standin_inception, tiny_shards, 25, 30, 10, 10, 2)
    assert set(one) == set(two["metrics"]) == set(ref)
    assert ref["fid"] > 1e-3 and ref["kid_std"] > 0 and ref["isc"] > 1.0  # values that vary with the images
    assert_metrics_close(one, ref, "fidelity, 1 rank")  # EVAL_REL: float32 features, other batch shapes
    assert_metrics_close(two["metrics"], ref, "fidelity, 2 ranks")


# ---------------------------------------------------------------------------- bad input, nothing overwritten


def _run_cli(capsys, *args):
    rc = load_cli("evaluate").main([str(a) for a in args])
    return rc, capsys.readouterr()


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("GAN_METRICS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GAN_METRICS_NO_DOWNLOAD", "1")


def _snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_missing_inception_weights_is_clear(run_copy, capsys, offline_env):
    before = _snapshot(run_copy)
    rc, out = _run_cli(capsys, "--run", run_copy, "--metrics", "fid", "--num-samples", 20)
    assert rc == 2
    for words in ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05",
                  "https://github.com/toshas/torch-fidelity/releases/download/", "--inception-weights"):
        assert words in out.err, out.err
    assert _snapshot(run_copy) == before

    rc, out = _run_cli(capsys, "--run", run_copy, "--metrics", "fid", "--num-samples", 20,
                       "--inception-weights", run_copy / "nope.pth")
    assert rc == 2 and f"Inception weights file not found: {run_copy / 'nope.pth'}" in out.err
    garbage = run_copy.parent / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    rc, out = _run_cli(capsys, "--run", run_copy, "--metrics", "isc", "--num-samples", 20, "--isc-splits", 2,
                       "--inception-weights", garbage)
    assert rc == 2 and "could not be read as Inception weights" in out.err
    assert _snapshot(run_copy) == before


def test_failed_download_is_clear_and_leaves_nothing(tmp_path, monkeypatch):
    """With no file anywhere, one download into torch.hub's cache is tried; offline it fails clearly."""
    import urllib.error
    import urllib.request

    from gan.metrics import MetricError
    from gan.metrics.fidelity import INCEPTION_FILE, resolve_inception_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv("GAN_METRICS_NO_DOWNLOAD", raising=False)
    tried = []

    def offline(url, timeout=None):
        tried.append(url)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(MetricError, match="download failed .*Name or service not known.*--inception-weights"):
        resolve_inception_weights(None)
    assert tried and tried[0].endswith(INCEPTION_FILE)
    assert list((tmp_path / "th" / "hub" / "checkpoints").iterdir()) == []  # no partial file left
    # a download that completes with the wrong bytes is refused and leaves nothing either
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"not the weights" * 99999))
    with pytest.raises(MetricError, match="download failed .*sha256"):
        resolve_inception_weights(None)
    assert list((tmp_path / "th" / "hub" / "checkpoints").iterdir()) == []
    # a file already in torch.hub's cache is used as it is, no download
    (tmp_path / "th" / "hub" / "checkpoints" / INCEPTION_FILE).write_bytes(b"x")
    assert resolve_inception_weights(None).name == INCEPTION_FILE and len(tried) == 1


def test_unknown_metric_lists_valid(run_copy, capsys, offline_env):
    rc, out = _run_cli(capsys, "--run", run_copy, "--metrics", "fid,sharpness")
    assert rc == 2 and "'sharpness'" in out.err and "valid metrics: fid, isc, kid, prc, cls_acc, cls_fd" in out.err
    assert not (run_copy / "metrics.json").exists()


def test_too_few_samples(run_copy, capsys, offline_env):
    rc, out = _run_cli(capsys, "--run", run_copy, "--metrics", "kid", "--num-samples", 50)
    assert rc == 2 and "kid_subset_size=1000" in out.err and "--kid-subset-size" in out.err
    rc, out = _run_cli(capsys, "--run", run_copy, "--metrics", "isc", "--num-samples", 5)
    assert rc == 2 and "isc_splits=10" in out.err
    rc, out = _run_cli(capsys, "--run", run_copy, "--metrics", "cls_fd", "--num-samples", 10)
    assert rc == 2 and "2 samples per class" in out.err
    # more real images needed than the shards hold (tiny10: 240)
    rc, out = _run_cli(capsys, "--run", run_copy, "--metrics", "kid", "--num-samples", 300, "--kid-subset-size", 250,
                       "--inception-weights", run_copy / "unused.pth")
    assert rc == 2 and "240" in out.err
    assert not (run_copy / "metrics.json").exists()


def test_run_without_checkpoints(tmp_path, tiny_run, capsys, offline_env):
    run = tmp_path / "empty-run"
    run.mkdir()
    shutil.copy(tiny_run / "config.yaml", run / "config.yaml")
    rc, out = _run_cli(capsys, "--run", run, "--metrics", "cls_acc")
    assert rc == 2 and "no complete checkpoint" in out.err and str(run) in out.err
    rc, out = _run_cli(capsys, "--run", tmp_path / "nothing-here")
    assert rc == 2 and "run directory not found" in out.err
    rc, out = _run_cli(capsys, "--run", tmp_path)
    assert rc == 2 and "no config.yaml" in out.err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_checkpoint_of_another_architecture(run_copy, tmp_path, tiny_shards, capsys, offline_env):
    other = tmp_path / "other"
    train(other, tiny_shards, "train.max_steps=1", "model.g_channels=16")
    before = _snapshot(run_copy)
    rc, out = _run_cli(capsys, "--run", run_copy, "--checkpoint", other / "checkpoints/step-00000001",
                       "--metrics", "cls_acc")
    assert rc == 2 and "different architecture" in out.err and "model.g_channels" in out.err
    rc, out = _run_cli(capsys, "--run", run_copy, "--checkpoint", other / "export/G_ema.safetensors",
                       "--metrics", "cls_acc")
    assert rc == 2 and "different architecture" in out.err
    assert _snapshot(run_copy) == before


def test_classifier_of_other_classes(run_copy, capsys, offline_env, tmp_path):
    from gan.metrics.classifier import ResNet9, save_classifier

    path = save_classifier(ResNet9((8, 8, 8, 8)), tmp_path / "c.safetensors",
                           {"classes": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                        "ship", "truck"]})
    rc, out = _run_cli(capsys, "--run", run_copy, "--metrics", "cls_acc", "--num-samples", 20, "--classifier", path)
    assert rc == 2 and "trained on classes" in out.err and "class0" in out.err
    rc, out = _run_cli(capsys, "--run", run_copy, "--metrics", "cls_acc", "--num-samples", 20, "--classifier",
                       tmp_path / "missing.safetensors")
    assert rc == 2 and "classifier weights not found" in out.err
    assert not (run_copy / "metrics.json").exists()


def test_damaged_metrics_json_is_not_overwritten(run_copy, tiny_classifier, capsys, offline_env):
    (run_copy / "metrics.json").write_text("{half")
    rc, out = _run_cli(capsys, "--run", run_copy, "--metrics", "cls_acc", "--num-samples", 20,
                       "--classifier", tiny_classifier, "--no-tensorboard")
    assert rc == 2 and "not valid JSON" in out.err
    assert (run_copy / "metrics.json").read_text() == "{half"


# ---------------------------------------------------------------------------- during training


def test_training_evaluates_keeps_best_and_stops_early(tmp_path, tiny_shards, tiny_classifier):
    run = tmp_path / "run"
    r = train(run, tiny_shards, "train.max_steps=40", "checkpoint.every=100", "metrics.every=2",
              "metrics.num_samples=20", f"metrics.classifier={tiny_classifier}", f"metrics.cache_dir={tmp_path / 'c'}",
              "metrics.metrics=cls_fd,cls_acc", "metrics.patience=1", "ema.decay=0.0", "optim.lr_g=0.05")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "Eval/cls_fd" in row]
    assert evals and all("Eval/cls_acc" in row and "Eval/cls_fd/class3" in row for row in evals)
    status = json.loads((run / "status.json").read_text())
    best = json.loads((run / "best.json").read_text())
    assert best["metric"] == "cls_fd" and best["value"] == min(row["Eval/cls_fd"] for row in evals)
    assert (run / "best" / "G_ema.safetensors").is_file() and json.loads((run / "best/model.json").read_text())["step"] == best["step"]
    # patience=1: the first evaluation that does not improve stops the run (20 improvements in a row
    # would be needed to reach step 40)
    assert status["state"] == "finished" and status["step"] < 40
    assert "early stop" in status["note"] and "early stop" in r.stdout and f"finished at step {status['step']}" in r.stdout
    # the best/early-stop record is in the checkpoint (TrainState), so it survives a resume
    state = torch.load(next((run / "checkpoints").iterdir()) / "custom_checkpoint_1.pkl", weights_only=False)
    assert state["eval_best"]["value"] == best["value"]


def test_training_refuses_missing_weights_before_work(tmp_path, tiny_shards):
    run = tmp_path / "run"
    r = train_debug(run, tiny_shards, "metrics.every=2", "metrics.metrics=fid", "metrics.num_samples=20",
                    env=_env(tmp_path), check=False)
    assert r.returncode == 2 and "--inception-weights" in r.stderr and "metrics.inception_weights" in r.stderr
    assert not (run / "checkpoints").exists()


@pytest.mark.slow
def test_two_process_training_evaluation_decides_alike(tmp_path, tiny_shards, tiny_classifier):
    """torchrun, 2 CPU processes: evaluation inside training on every rank, same early-stop step on both
    (a rank that stopped alone would hang the other in its next collective)."""
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "launch/train.py",
           "--config", "configs/debug_cpu.yaml", "--run-dir", str(run), f"data.shards={tiny_shards}",
           "train.max_steps=30", "metrics.every=2", "metrics.num_samples=25", f"metrics.classifier={tiny_classifier}",
           "metrics.patience=1", "ema.decay=0.0", "optim.lr_g=0.05"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=_env(tmp_path, ACCELERATE_USE_CPU="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] < 30 and "early stop" in status["note"]
    assert "replica check: G, D and G_ema identical on all 2 ranks" in r.stdout
    assert json.loads((run / "best.json").read_text())["metric"] == "cls_fd"


@pytest.mark.slow
def test_two_process_error_on_rank0_reaches_every_rank(run_copy, tmp_path):
    """A missing classifier file is found on rank 0; rank 1 gets the same error instead of waiting forever."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "launch/evaluate.py", "--run-dir", str(run_copy), "--metrics", "cls_acc", "--num-samples", "20",
           "--classifier", str(tmp_path / "missing.safetensors")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=_env(tmp_path, ACCELERATE_USE_CPU="1"))
    assert r.returncode != 0
    assert r.stderr.count("classifier weights not found") == 2, r.stderr
    assert not (run_copy / "metrics.json").exists()

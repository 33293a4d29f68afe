"""The VAE family's parts: networks at each resolution, the reparameterization trick, the loss terms
against hand computations, the KL warm-up, bits/dim, per-sample image measures and the pictures."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from gan.config import ConfigError
from gan.families.vae.config import VAEConfig, VAELossConfig
from gan.families.vae.losses import (bce_recon, bits_per_dim, gaussian_nll, kl_divergence, kl_weight, mse_recon,
                                     neg_elbo_bits_per_dim, vae_loss)
from gan.families.vae.networks import VAE, reparameterize
from gan.families.vae.pictures import curves_png, interpolation_grid, prior_grid, reconstruction_grid
from gan.metrics.image_pairs import image_measures, mse_per_sample, psnr_per_sample, ssim_per_sample
from gan.viz import save_png


def tiny(**kw) -> VAEConfig:
    return VAEConfig(**{"channels": 4, "latent_dim": 8, **kw})


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (64, 3)])
@pytest.mark.parametrize("conditional", [False, True])
def test_shapes_at_each_resolution(size, channels, conditional):
    torch.manual_seed(0)
    vae = VAE(tiny(img_size=size, img_channels=channels, conditional=conditional))
    x, y = torch.rand(3, channels, size, size) * 2 - 1, torch.tensor([0, 3, 9])
    h, mu, logvar = vae(x, y if conditional else None)
    assert h.shape == x.shape and mu.shape == logvar.shape == (3, 8)
    img = vae.to_image(h)
    assert img.min() >= -1 and img.max() <= 1
    assert vae.sample(5, torch.arange(5) if conditional else None).shape == (5, channels, size, size)


def test_default_latent_is_128():
    vae = VAE(VAEConfig())
    assert vae.encoder.fc_mu.out_features == vae.encoder.fc_logvar.out_features == 128


def test_conditional_decoder_uses_the_label_and_needs_it():
    torch.manual_seed(0)
    vae = VAE(tiny(conditional=True)).eval()
    z = torch.randn(1, 8).repeat(2, 1)
    a, b = vae.decode(z, torch.tensor([1, 2]))
    assert not torch.allclose(a, b)  # same z, two classes, two images
    with pytest.raises(ValueError, match="pass labels"):
        vae.decode(z)


def test_reparameterization_gradients():
    mu = torch.tensor([[0.5, -1.0]], requires_grad=True)
    logvar = torch.tensor([[0.2, -0.4]], requires_grad=True)
    g = torch.Generator().manual_seed(3)
    z = reparameterize(mu, logvar, generator=g)
    eps = torch.randn(1, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, mu + torch.exp(0.5 * logvar) * eps)
    z.sum().backward()
    # dz/dmu = 1, dz/dlogvar = 0.5 * sigma * eps
    torch.testing.assert_close(mu.grad, torch.ones(1, 2))
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)


def test_loss_terms_against_hand_computation():
    x = torch.tensor([[[[0.5, -1.0]]]])  # (1, 1, 1, 2)
    h = torch.tensor([[[[0.0, 1.0]]]])
    m = math.tanh(1.0)
    assert mse_recon(x, h).item() == pytest.approx(0.5 ** 2 + (-1.0 - m) ** 2, rel=1e-6)
    assert mse_recon(x, h, obs_std=0.1).item() == pytest.approx((0.25 + (1 + m) ** 2) / 0.02, rel=1e-6)
    # targets (x + 1) / 2 = 0.75, 0: BCE = -[t log s(h) + (1 - t) log(1 - s(h))]
    s = 1 / (1 + math.exp(-1.0))
    want_bce = -(0.75 * math.log(0.5) + 0.25 * math.log(0.5)) - math.log(1 - s)
    assert bce_recon(x, h).item() == pytest.approx(want_bce, rel=1e-6)
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(4.0)]])
    # KL per dim: 1/2 (sigma^2 + mu^2 - 1 - log sigma^2): 1/2 (1 + 1 - 1 - 0) + 1/2 (4 + 0 - 1 - log 4)
    assert kl_divergence(mu, logvar).item() == pytest.approx(0.5 + 0.5 * (3 - math.log(4)), rel=1e-6)
    assert kl_divergence(torch.zeros(2, 5), torch.zeros(2, 5)).tolist() == [0.0, 0.0]


def test_vae_loss_is_the_batch_mean_with_the_warmed_up_beta():
    torch.manual_seed(0)
    x, h = torch.rand(4, 1, 3, 3) * 2 - 1, torch.randn(4, 1, 3, 3)
    mu, logvar = torch.randn(4, 2), torch.randn(4, 2)
    loss, stats = vae_loss(x, h, mu, logvar, kl_weight(5, 2.0, 10), "mse")
    want = (mse_recon(x, h) + 1.0 * kl_divergence(mu, logvar)).mean()
    torch.testing.assert_close(loss, want)
    assert stats["VAE/kl_weight"] == 1.0
    assert stats["Loss/VAE/kl"].item() == pytest.approx(kl_divergence(mu, logvar).mean().item())
    loss_bce, _ = vae_loss(x, h, mu, logvar, 0.0, "bce")
    torch.testing.assert_close(loss_bce, bce_recon(x, h).mean())


def test_kl_warmup_schedule():
    assert [kl_weight(s, 0.5, 4) for s in (0, 1, 2, 4, 100)] == [0.0, 0.125, 0.25, 0.5, 0.5]
    assert kl_weight(0, 0.5, 0) == 0.5


def test_bits_per_dim_known_cases():
    d = 3 * 4 * 4
    # a density uniform over the data range: 256 (well, 255 bins) equally likely values -> log2(255) bits
    assert bits_per_dim(torch.tensor(d * math.log(2.0)), d, "[-1,1]").item() == pytest.approx(math.log2(255))
    assert bits_per_dim(torch.tensor(0.0), d, "[0,1]").item() == pytest.approx(math.log2(255))
    # a Gaussian centred on the data: -log p = D/2 log(2 pi sigma^2); on [-1,1] the bins are 2/255 wide
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    sigma = 0.05
    nll = gaussian_nll(x, x, sigma)
    torch.testing.assert_close(nll, torch.full((2,), d / 2 * math.log(2 * math.pi * sigma ** 2)))
    want = 0.5 * math.log2(2 * math.pi * sigma ** 2) + math.log2(127.5)
    torch.testing.assert_close(bits_per_dim(nll, d), torch.full((2,), want))
    with pytest.raises(ValueError, match="data_range"):
        bits_per_dim(nll, d, "[0,255]")


def test_neg_elbo_bits_per_dim_matches_the_gaussian_elbo():
    torch.manual_seed(1)
    x, h = torch.rand(2, 1, 4, 4) * 2 - 1, torch.randn(2, 1, 4, 4)
    mu, logvar = torch.randn(2, 3), torch.randn(2, 3)
    nll = gaussian_nll(x, torch.tanh(h), 0.2) + kl_divergence(mu, logvar)
    torch.testing.assert_close(neg_elbo_bits_per_dim(x, h, mu, logvar, "mse", 0.2),
                               nll / (16 * math.log(2)) + math.log2(127.5))
    # the training term differs from the Gaussian -log p(x|z) only by its constant
    torch.testing.assert_close(gaussian_nll(x, torch.tanh(h), 0.2) - mse_recon(x, h, 0.2),
                               torch.full((2,), 16 * (math.log(0.2) + 0.5 * math.log(2 * math.pi))))
    with pytest.raises(ValueError, match="bits/dim"):
        neg_elbo_bits_per_dim(x, h, mu, logvar, "bce")


def test_image_measures_known_cases():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 16) * 1.6 - 0.8
    same = image_measures(x, x)
    assert same["l1"].tolist() == same["mse"].tolist() == [0.0] * 3
    assert same["ssim"].dtype == torch.float64 and torch.allclose(same["ssim"], torch.ones(3, dtype=torch.float64))
    assert torch.isinf(same["psnr"]).all()
    # +-0.1 noise: MSE 0.01 exactly, PSNR = 10 log10(range^2 / MSE) with range 2 (images in [-1, 1])
    noise = (torch.randint(0, 2, x.shape) * 2 - 1) * 0.1
    noise[1] *= 2  # sample 1 at twice the noise level: per-sample values
    m = image_measures(x + noise, x)
    torch.testing.assert_close(m["mse"], torch.tensor([0.01, 0.04, 0.01], dtype=torch.float64))
    torch.testing.assert_close(m["l1"], torch.tensor([0.1, 0.2, 0.1], dtype=torch.float64))
    torch.testing.assert_close(m["psnr"], 10 * torch.log10(4 / m["mse"]))
    assert m["ssim"][1] < m["ssim"][0] < 1
    # two flat images a, b: SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * range)^2 (structure term 1)
    a, b = -0.2, 0.6  # on [-1, 1]; SSIM reads the means as given
    c1 = (0.01 * 2) ** 2
    s = ssim_per_sample(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    assert s.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        mse_per_sample(x, x[:, :1])
    with pytest.raises(ValueError, match="11x11"):
        ssim_per_sample(x[..., :8, :8], x[..., :8, :8])


def test_per_sample_measures_sum_to_the_batch_mean():
    """Summed over two 'ranks' of uneven size and divided by the count: the mean over all samples."""
    torch.manual_seed(0)
    x, y = torch.rand(7, 3, 16, 16) * 2 - 1, torch.rand(7, 3, 16, 16) * 2 - 1
    whole = psnr_per_sample(x, y)
    split = torch.cat([psnr_per_sample(x[:3], y[:3]), psnr_per_sample(x[3:], y[3:])])
    torch.testing.assert_close(split.sum() / 7, whole.mean())


def test_pictures(tmp_path):
    torch.manual_seed(0)
    vae = VAE(tiny(img_size=28, img_channels=1, conditional=True, num_classes=3)).eval()
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    recon = vae.reconstruct(x, torch.tensor([0, 1, 2, 0, 1]))
    g = reconstruction_grid(x, recon, n=4)
    assert g.dtype == torch.uint8 and g.shape == (3, 2 * 30 + 2, 4 * 30 + 2)
    # the top row is the input: pixel (2, 2) of the grid is x[0]'s (0, 0)
    assert g[0, 2, 2].item() == round((x[0, 0, 0, 0].item() + 1) * 127.5)
    gi = interpolation_grid(vae, x[0], x[1], steps=6, y=2)
    assert gi.shape == (3, 32, 8 * 30 + 2)
    gp = prior_grid(vae, n=6, generator=torch.Generator().manual_seed(0))
    assert gp.shape == (3, 3 * 30 + 2, 2 * 30 + 2)  # one row per class, 2 each
    unconditional = VAE(tiny(img_size=32)).eval()
    assert prior_grid(unconditional, n=16).shape == (3, 2 * 34 + 2, 8 * 34 + 2)
    png = save_png(g, tmp_path / "recon.png")
    assert Image.open(png).size == (4 * 30 + 2, 2 * 30 + 2)


def test_curves_png(tmp_path):
    rows = [{"step": s, "Loss/VAE/recon": 10.0 / s, "Loss/VAE/kl": 1.0 + s} for s in range(1, 6)]
    rows.append({"step": 5, "Eval/psnr": 20.5, "Eval/ssim": 0.7, "Eval/recon_mse": 0.02, "Eval/kl": 6.0})
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = curves_png([json.loads(line) for line in jsonl.read_text().splitlines()], tmp_path / "plots" / "vae.png")
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[1] > 3 * img.shape[0]  # five panels side by side
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 10  # something was drawn
    assert not list((tmp_path / "plots").glob(".tmp*"))


@pytest.mark.parametrize("cls,kw,match", [
    (VAEConfig, {"img_size": 48}, "model.img_size.*power of two"), (VAEConfig, {"img_channels": 2}, "model.img_channels"),
    (VAEConfig, {"latent_dim": 0}, "model.latent_dim.*> 0"), (VAEConfig, {"recon": "l2"}, "model.recon.*mse, bce"),
    (VAEConfig, {"conditional": True, "num_classes": 1}, "model.conditional.*num_classes >= 2"),
    (VAELossConfig, {"beta": -1.0}, "loss.beta.*>= 0"), (VAELossConfig, {"kl_warmup_steps": -1}, "loss.kl_warmup_steps"),
    (VAELossConfig, {"obs_std": 0.0}, "loss.obs_std.*> 0"),
])
def test_config_refuses_bad_values(cls, kw, match):
    with pytest.raises(ConfigError, match=match):
        cls(**kw)


# ---------------------------------------------------------------------------- the family on the spine


def _train(shards, run, *overrides):
    from conftest import fit_in_process
    from gan.config import load_config

    cfg = load_config(None, ["family=vae", f"data.shards={shards}", "data.num_workers=1", "train.batch_size=16",
                             "train.mixed_precision=no", "log.progress=false", "log.with=", "log.every=1",
                             "log.sample_every=10", "checkpoint.every=10", "log.samples_per_class=2",
                             "model.channels=8", "model.latent_dim=16", "optim.lr_g=2e-3", "optim.betas_g=[0.9,0.999]",
                             *overrides])
    return fit_in_process(cfg, run)


@pytest.mark.parametrize("shards,overrides", [
    ("tiny_shards", ["model.conditional=true", "loss.kl_warmup_steps=10"]),
    ("tiny_shards_gray28", ["model.img_size=28", "model.img_channels=1", "model.recon=bce"]),
])
def test_vae_family_trains_on_the_spine(tmp_path, request, shards, overrides):
    """One process on real shards with a loader worker: the reconstruction falls, the KL weight follows
    its warm-up, the checkpoint's parts are named after the network, and the sample grid is written."""
    from gan.checkpoint import read_meta

    rows = _train(request.getfixturevalue(shards), tmp_path, "train.max_steps=30", *overrides)
    steps = [r for r in rows if "Loss/VAE/recon" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    recon = [r["Loss/VAE/recon"] for r in steps]
    # BCE on soft targets has a floor above 0 (the targets' own entropy; 784 ln 2 = 543 nats for h = 0 at
    # the start), so it falls less than the squared error does
    assert sum(recon[-5:]) / 5 < (0.95 if "model.recon=bce" in overrides else 0.7) * recon[0]
    assert all(math.isfinite(r["Loss/VAE/kl"]) and r["Loss/VAE/kl"] >= 0 for r in steps)
    if "loss.kl_warmup_steps=10" in overrides:  # step s logs the weight used at 0-based step s - 1
        assert [r["VAE/kl_weight"] for r in steps[:3]] == [0.0, 0.1, 0.2] and steps[-1]["VAE/kl_weight"] == 1.0
    meta = read_meta(tmp_path / "checkpoints" / "step-00000030")
    assert (meta["family"], meta["nets"], meta["ema"]) == ("vae", ["vae"], True)
    pngs = sorted((tmp_path / "samples").glob("*.png"))
    assert pngs and Image.open(pngs[-1]).size[0] > 0
    # the export is the EMA VAE, named after it, and loads through the family from either source
    from gan.metrics import load_generator

    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["model.json", "vae_ema.safetensors"]
    a, b = load_generator(tmp_path), load_generator(tmp_path, tmp_path / "export" / "vae_ema.safetensors")
    assert a.family.name == b.family.name == "vae" and a.step == b.step == 30 and a.label == "step-00000030"
    z, y = a.family.example_inputs(3)
    with torch.no_grad():
        assert torch.equal(a.family.generate(a.G, z, y), b.family.generate(b.G, z, y))


def test_vae_family_refuses_shards_that_do_not_fit(tmp_path, tiny_shards):
    from gan.data.manifest import ShardError

    with pytest.raises(ShardError, match="model.img_channels"):
        _train(tiny_shards, tmp_path / "run", "model.img_channels=1", "train.max_steps=1")
    from test_paired import inverted_pairs

    pairs = inverted_pairs(tmp_path / "pairs", size=32)
    with pytest.raises(ShardError, match=r"the VAE \(family: vae\) trains on single images.*family: pix2pix"):
        _train(pairs, tmp_path / "run", "train.max_steps=1")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("recipe", ["cifar10_vae.yaml", "fashion_mnist_vae.yaml"])
def test_recipes_build(recipe):
    from conftest import REPO
    from gan.config import load_config
    from gan.family import build_family

    cfg = load_config(REPO / "configs" / recipe)
    vae = build_family(cfg).build_networks()["vae"]
    m = cfg.model
    assert m.latent_dim == 128 and m.conditional
    x = torch.zeros(2, m.img_channels, m.img_size, m.img_size)
    assert vae(x, torch.tensor([0, 1]))[0].shape == x.shape


@pytest.mark.numerics
def test_per_sample_measures_of_the_vae():
    from gan.families.vae.evaluation import per_sample_measures

    torch.manual_seed(0)
    vae = VAE(tiny(img_size=32, conditional=True)).eval()
    x, y = torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, 2, 3])
    m = per_sample_measures(vae, x, y, seed=0)
    assert set(m) == {"recon_mse", "psnr", "ssim", "kl", "bits_per_dim"}
    assert all(v.shape == (4,) and v.dtype == torch.float64 for v in m.values())
    mu, logvar = vae.encode(x)
    torch.testing.assert_close(m["recon_mse"], ((vae.reconstruct(x, y) - x) ** 2).flatten(1).mean(1).double())
    torch.testing.assert_close(m["kl"], kl_divergence(mu, logvar).double())
    again = per_sample_measures(vae, x.flip(0), y.flip(0), seed=0)  # another batch order: each image its own noise
    # the same rows through the same kernels (one batch shape): float32-exact, float64 arithmetic after
    torch.testing.assert_close(m["bits_per_dim"], again["bits_per_dim"].flip(0), rtol=1e-9, atol=0)
    assert not torch.equal(m["bits_per_dim"], per_sample_measures(vae, x, y, seed=1)["bits_per_dim"])
    # a Gaussian of std sqrt(1/2) is far wider than a pixel bin (2/255): its bits/dim stay well above 0
    assert (m["bits_per_dim"] > 0).all()
    assert "bits_per_dim" not in per_sample_measures(VAE(tiny(recon="bce")).eval(), x)


@pytest.mark.slow
def test_vae_family_on_two_gloo_ranks(tmp_path, tiny_shards):
    """launch/train.py under torchrun on 2 gloo ranks: the conditional VAE (BatchNorm buffers included)
    stays identical on both ranks, and both ranks' images are counted."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    recipe = tmp_path / "vae.yaml"
    recipe.write_text("family: vae\nmodel: {channels: 8, latent_dim: 16, conditional: true}\n"
                      "loss: {kl_warmup_steps: 4}\noptim: {lr_g: 0.001, betas_g: [0.9, 0.999]}\n"
                      "data: {num_workers: 1, shuffle_buffer: 64}\ncheckpoint: {every: 3}\n"
                      "log: {every: 1, sample_every: 3, samples_per_class: 2, progress: false, with: ''}\n"
                      "train: {max_steps: 6, batch_size: 8, mixed_precision: 'no'}\n")
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "launch/train.py", "--config", str(recipe), "--run-dir", str(run), f"data.shards={tiny_shards}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "replica check: vae and vae_ema identical on all 2 ranks" in r.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["Progress/kimg"] == pytest.approx(6 * 8 * 2 / 1000)
    assert [r["step"] for r in rows if "Loss/VAE/recon" in r] == list(range(1, 7))

"""pix2pix's parts: the U-Net's depth, shapes and skips; the PatchGAN's 70x70 receptive field and
spectral norm; the adversarial + L1 loss against hand computations; its config; the triplet pictures."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from gan.config import ConfigError
from gan.families.gan.config import LossConfig
from gan.families.pix2pix.config import Pix2PixConfig, Pix2PixLossConfig
from gan.families.pix2pix.losses import discriminator_loss, generator_loss
from gan.families.pix2pix.networks import PatchGAN, UNet, build_networks, pair
from gan.families.pix2pix.pictures import triplet_grid
from gan.families.gan.losses import build_loss


def tiny(**kw) -> Pix2PixConfig:
    return Pix2PixConfig(**{"g_channels": 2, "d_channels": 2, **kw})


@pytest.mark.parametrize("size,depth,dropouts,patches", [(32, 5, 0, 2), (64, 6, 1, 6), (256, 8, 3, 30)])
def test_unet_depth_follows_the_resolution(size, depth, dropouts, patches):
    torch.manual_seed(0)
    nets = build_networks(tiny(img_size=size))
    G, D = nets["G"], nets["D"]
    assert len(G.downs) == len(G.ups) == depth
    assert sum(isinstance(m, torch.nn.Dropout) for m in G.modules()) == dropouts
    a = torch.rand(2, 3, size, size) * 2 - 1
    out = G(a)
    assert out.shape == a.shape and out.abs().max() <= 1
    assert D(pair(a, out)).shape == (2, 1, patches, patches)


def test_unet_256_matches_the_reference_widths():
    G = UNet(Pix2PixConfig())  # ngf 64 at 256 px: the reference's unet_256
    assert [d[1].out_channels if isinstance(d, torch.nn.Sequential) else d.out_channels for d in G.downs] == \
        [64, 128, 256, 512, 512, 512, 512, 512]
    # every up block but the innermost reads its skip concatenated with the block below
    assert [u[1].in_channels for u in G.ups] == [128, 256, 512, 1024, 1024, 1024, 1024, 512]
    assert G(torch.zeros(1, 3, 256, 256)).shape == (1, 3, 256, 256)


def test_unet_skip_connections_carry_the_input():
    """Everything below the outermost level cut off (down block 1 outputs zeros): the input still reaches
    the output, through the outermost skip alone, and only near where it changed (that skip is a 4x4
    conv and a 4x4 transposed conv). With down block 0 cut as well, nothing reaches it."""
    torch.manual_seed(0)
    G = UNet(tiny(img_size=32, dropout=0.0, norm="none")).eval()
    a = torch.rand(1, 3, 32, 32) * 2 - 1
    b = a.clone()
    b[..., :4, :4] += 0.5
    assert (G(a) - G(b)).abs()[0, :, 16:, 16:].sum() > 0  # uncut: the bottleneck spreads the change
    cut = G.downs[1].register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    diff = (G(a) - G(b)).abs()[0].sum(0)
    assert diff[:4, :4].sum() > 0
    assert diff[8:, :].sum() == 0 and diff[:, 8:].sum() == 0
    G.downs[0].register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    assert torch.equal(G(a), G(b))
    cut.remove()


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_patchgan_receptive_field_is_70x70(norm):
    """The input region with non-zero gradient for one output logit (eval mode: BatchNorm's running
    statistics, so no coupling through batch statistics)."""
    torch.manual_seed(0)
    D = PatchGAN(tiny(img_size=128, norm=norm)).eval()
    x = torch.randn(1, 6, 128, 128, requires_grad=True)
    logits = D(x)
    assert logits.shape == (1, 1, 14, 14)
    logits[0, 0, 7, 7].backward()
    nz = x.grad[0].abs().sum(0).nonzero()
    rows, cols = nz[:, 0], nz[:, 1]
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (70, 70)
    assert rows.min() > 0 and rows.max() < 127  # the whole field inside the image: not cut by the border


def test_patchgan_spectral_norm_on_and_off():
    convs = lambda D: [m for m in D.modules() if isinstance(m, torch.nn.Conv2d)]  # noqa: E731
    off = PatchGAN(tiny(img_size=64))
    assert not any(parametrize.is_parametrized(c, "weight") for c in convs(off))
    torch.manual_seed(0)
    on = PatchGAN(tiny(img_size=64, d_spectral_norm=True))
    assert len(convs(on)) == 5 and all(parametrize.is_parametrized(c, "weight") for c in convs(on))
    x = torch.randn(2, 6, 64, 64)
    for _ in range(30):  # one power iteration per training forward
        on(x)
    for c in convs(on):
        sigma = torch.linalg.matrix_norm(c.weight.detach().flatten(1), ord=2)
        # 30 power iterations from a seeded start: the estimate of the top singular value converges like
        # (s2/s1)^(2k); measured |sigma - 1| <= 4e-4 over seeds 0-4
        assert sigma.item() == pytest.approx(1.0, abs=0.05)


def test_default_norm_is_instance_and_lambda_is_100():
    assert Pix2PixConfig().norm == "instance"
    assert (Pix2PixLossConfig().lambda_l1, Pix2PixLossConfig().gan_loss) == (100.0, "ns")
    assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in UNet(tiny(img_size=32)).modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in PatchGAN(tiny(img_size=32)).modules())


def test_losses_against_hand_computation():
    torch.manual_seed(0)
    nets = build_networks(tiny(img_size=32))
    G, D = nets["G"], nets["D"]
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    fake = G(a)
    loss, stats = generator_loss(build_loss(LossConfig(name="ns")), D, a, fake, b, lambda_l1=100.0)
    with torch.no_grad():
        want_adv = F.softplus(-D(torch.cat([a, fake], 1))).mean()
        want_l1 = (fake - b).abs().mean()
    torch.testing.assert_close(loss.detach(), want_adv + 100 * want_l1)
    torch.testing.assert_close(stats["Loss/G/l1"], want_l1)
    # D: half of softplus(-D(a, b)) + softplus(D(a, G(a))); no gradient reaches G
    G.zero_grad()
    d_loss, _ = discriminator_loss(build_loss(LossConfig(name="ns")), D, a, fake, b)
    with torch.no_grad():
        want_d = 0.5 * (F.softplus(-D(pair(a, b))).mean() + F.softplus(D(pair(a, fake))).mean())
    torch.testing.assert_close(d_loss.detach(), want_d)
    d_loss.backward()
    assert all(p.grad is None for p in G.parameters())
    assert all(p.grad is not None for p in D.parameters())
    # any registered loss: hinge
    h_loss, _ = discriminator_loss(build_loss(LossConfig(name="hinge")), D, a, fake, b)
    with torch.no_grad():
        want_h = 0.5 * (F.relu(1 - D(pair(a, b))).mean() + F.relu(1 + D(pair(a, fake))).mean())
    torch.testing.assert_close(h_loss.detach(), want_h)


def test_wgan_gp_penalty_runs_through_the_pair():
    torch.manual_seed(0)
    nets = build_networks(tiny(img_size=32, norm="none"))
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    loss, stats = discriminator_loss(build_loss(LossConfig(name="wgan_gp")), nets["D"], a, nets["G"](a), b)
    assert "Loss/D/gp" in stats and torch.isfinite(loss)


def test_triplet_grid():
    a = torch.full((3, 1, 16, 16), -1.0)  # a gray input beside colour output and target
    f, t = torch.zeros(3, 3, 16, 16), torch.ones(3, 3, 16, 16)
    g = triplet_grid(a, f, t, n=2)
    assert g.dtype == torch.uint8 and g.shape == (3, 2 * 18 + 2, 3 * 18 + 2)
    assert [g[0, 2, 2 + 18 * k].item() for k in range(3)] == [0, 128, 255]  # input | output | target
    with pytest.raises(ValueError, match="pairs"):
        triplet_grid(a, f, t[:, :, :8])


@pytest.mark.parametrize("cls,kw,match", [
    (Pix2PixConfig, {"img_size": 28}, "model.img_size.*power of two"),
    (Pix2PixConfig, {"norm": "group"}, "model.norm.*instance, batch, none"),
    (Pix2PixConfig, {"dropout": 1.0}, "model.dropout"), (Pix2PixConfig, {"img_size": 16}, "model.d_layers"),
    (Pix2PixLossConfig, {"gan_loss": "vanilla"}, "loss.gan_loss.*hinge"),
    (Pix2PixLossConfig, {"lambda_l1": -1.0}, "loss.lambda_l1"),
])
def test_config_refuses_bad_values(cls, kw, match):
    with pytest.raises(ConfigError, match=match):
        cls(**kw)


def test_per_sample_measures_of_the_translation():
    from gan.families.pix2pix.evaluation import per_sample_measures
    from gan.metrics.image_pairs import psnr_per_sample

    torch.manual_seed(0)
    G = UNet(tiny(img_size=32)).eval()
    a, b = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    m, out = per_sample_measures(G, a, b)
    assert set(m) == {"l1", "mse", "psnr", "ssim"}
    assert all(v.shape == (3,) and v.dtype == torch.float64 for v in m.values())
    torch.testing.assert_close(m["l1"], (out - b).abs().flatten(1).mean(1).double())
    torch.testing.assert_close(m["psnr"], psnr_per_sample(G(a), b))

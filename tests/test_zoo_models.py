"""The model zoo: every registered architecture against the trainer's contract, and the switches
(spectral norm, init, attention, upsample, GoogLeNet D backbone) doing what they say."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from gan.config import ConfigError, ModelConfig
from gan.families.gan.models import MODELS, build_models
from gan.families.gan.models.googlenet_d import GoogLeNetDiscriminator, load_backbone
from gan.families.gan.models.layers import (ClassConditionalBatchNorm2d, SelfAttention, apply_init, apply_spectral_norm,
                               attention_level)

# tiny widths per architecture (biggan's are multipliers: 4 -> 16-wide G blocks, 8-wide D blocks)
WIDTHS = {"cdcgan": 8, "sngan": 16, "biggan": 4}
ARCHS = sorted(MODELS)
# (size, channels, d_backbone): the GoogLeNet D only at one size, it is the slow one
CASES = [(32, 3, ""), (28, 1, ""), (32, 3, "googlenet")]


def cfg_for(arch, size=32, channels=3, backbone="", **kw):
    w = WIDTHS.get(arch, 8)
    base = dict(name=arch, img_size=size, img_channels=channels, g_channels=w, d_channels=w, z_dim=16,
                shared_dim=8, num_classes=4, d_backbone=backbone)
    return ModelConfig(**{**base, **kw})


def weight_of(m):
    return m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight


def nets(arch, size=32, channels=3, backbone="", seed=0, **kw):
    torch.manual_seed(seed)
    return build_models(cfg_for(arch, size, channels, backbone, **kw))


@pytest.mark.parametrize("size, channels, backbone", CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_contract_shapes_range_and_labels(arch, size, channels, backbone):
    G, D = nets(arch, size, channels, backbone)
    if backbone:
        assert isinstance(D, GoogLeNetDiscriminator)
    z, y = torch.randn(4, 16), torch.tensor([0, 1, 2, 3])
    x = G(z, y)
    assert x.shape == (4, channels, size, size) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    logits = D(x, y)
    assert logits.shape == (4,) and logits.dtype == torch.float32 and torch.isfinite(logits).all()

    # the label reaches both nets: some inits start label-blind (SNGAN's class gains are all 1),
    # so perturb every class embedding first; eval mode so BatchNorm doesn't mix the batch
    with torch.no_grad():
        for m in list(G.modules()) + list(D.modules()):
            if isinstance(m, nn.Embedding):
                weight_of(m).add_(torch.randn_like(weight_of(m)) * 0.5)
    G.eval(), D.eval()
    z2, y2 = torch.randn(1, 16).repeat(2, 1), torch.tensor([0, 1])
    x2 = G(z2, y2)
    assert not torch.allclose(x2[0], x2[1], atol=1e-5)
    logits2 = D(x2[:1].repeat(2, 1, 1, 1), y2)
    assert not torch.allclose(logits2[0], logits2[1], atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"g_spectral_norm": True, "d_spectral_norm": True, "attn_res": 16}],
                         ids=["plain", "sn+attn16"])
@pytest.mark.parametrize("size, channels, backbone", CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_gets_a_gradient(arch, size, channels, backbone, options):
    """DDP (find_unused_parameters off) needs every parameter in the graph of D(G(z))."""
    G, D = nets(arch, size, channels, backbone, **options)
    y = torch.tensor([0, 1, 2, 3])
    D(G(torch.randn(4, 16), y), y).mean().backward()
    for net_name, net in (("G", G), ("D", D)):
        for name, p in net.named_parameters():
            assert p.grad is not None, f"{net_name}.{name} unused in the forward"
            assert torch.isfinite(p.grad).all(), f"{net_name}.{name}"
    if options:
        attn = [m for m in list(G.modules()) + list(D.modules()) if isinstance(m, SelfAttention)]
        assert len(attn) == (1 if backbone else 2)
        assert all(m.gamma.grad.abs() > 0 for m in attn)


@pytest.mark.parametrize("arch", ARCHS)
def test_double_backward_through_d(arch):
    """R1 and gradient penalties differentiate D's input gradient: attention and SN must allow it."""
    _, D = nets(arch, d_spectral_norm=True, attn_res=16)
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    (g,) = torch.autograd.grad(D(x, torch.tensor([0, 1])).sum(), x, create_graph=True)
    g.square().sum().backward()
    grads = [p.grad for p in D.parameters() if p.grad is not None]  # biases drop out of d logit / dx
    assert len(grads) > len(list(D.parameters())) // 2 and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("arch", ARCHS)
def test_size_64(arch):
    G, D = nets(arch, 64, 3)
    y = torch.tensor([0, 1])
    x = G(torch.randn(2, 16), y)
    assert x.shape == (2, 3, 64, 64) and D(x, y).shape == (2,)


def _sn_modules(net):
    return [m for m in net.modules() if parametrize.is_parametrized(m, "weight")]


@pytest.mark.parametrize("arch, backbone", [(a, "") for a in ARCHS] + [("cdcgan", "googlenet")])
def test_spectral_norm_keeps_top_singular_value_near_one(arch, backbone):
    G, D = nets(arch, backbone=backbone, g_spectral_norm=True, d_spectral_norm=True, attn_res=16)
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        for _ in range(3):  # train-mode forwards run the power iteration
            D(G(torch.randn(4, 16), y), y)
    G.eval(), D.eval()
    for net in (G, D):
        wrapped = _sn_modules(net)
        assert wrapped
        for m in net.modules():  # every conv/linear/embedding is wrapped unless marked to stay as is
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
                exempt = isinstance(m, nn.Embedding) and (
                    m is getattr(net, "shared", None)
                    or any(isinstance(c, ClassConditionalBatchNorm2d) and m in c.modules() for c in net.modules()))
                assert parametrize.is_parametrized(m, "weight") != exempt, m
        if len(wrapped) > 20:  # the GoogLeNet D: an SVD of each of its ~60 convs is slow on CPU
            wrapped = wrapped[:4] + wrapped[-4:]
        for m in wrapped:
            w = m.weight.detach()
            if isinstance(m, nn.ConvTranspose2d):
                w = w.transpose(0, 1)  # spectral_norm treats dim 1 as the output for these
            sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2).item()
            assert abs(sigma - 1) < 0.1, (m, sigma)
    # the BigGAN shared embedding and SNGAN's class gains are left alone (gains stay exactly 1)
    for m in G.modules():
        if isinstance(m, ClassConditionalBatchNorm2d):
            assert torch.equal(m.gain.weight, torch.ones_like(m.gain.weight))


def test_spectral_norm_skips_already_wrapped_and_survives_copy_and_reload():
    G, D = nets("sngan", d_spectral_norm=True)
    n = len(_sn_modules(D))
    apply_spectral_norm(D)  # idempotent
    assert len(_sn_modules(D)) == n
    assert all(len(m.parametrizations.weight) == 1 for m in _sn_modules(D))
    y = torch.tensor([0, 1])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    D(x, y)  # move u, v
    D2 = copy.deepcopy(D).eval()  # the EMA copies G this way
    fresh = nets("sngan", seed=1, d_spectral_norm=True)[1]
    fresh.load_state_dict(D.state_dict())  # checkpoint / export round trip
    D.eval(), fresh.eval()
    assert torch.allclose(D(x, y), D2(x, y)) and torch.allclose(D(x, y), fresh(x, y))


@pytest.mark.parametrize("size", [32, 28])
@pytest.mark.parametrize("arch", ARCHS)
def test_attention_at_16(arch, size):
    G, D = nets(arch, size, 3, attn_res=16)
    want = 16 if size == 32 else 14  # the 28 pyramid is 7/14/28
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-1]))
             for m in list(G.modules()) + list(D.modules()) if isinstance(m, SelfAttention)]
    y = torch.tensor([0, 1])
    D(G(torch.randn(2, 16), y), y).sum().backward()
    assert len(hooks) == 2 and seen == [want, want]
    for net in (G, D):
        (attn,) = [m for m in net.modules() if isinstance(m, SelfAttention)]
        assert attn.gamma.item() == 0 and attn.gamma.grad.abs() > 0
    G0, D0 = nets(arch, size, 3)
    assert not any(isinstance(m, SelfAttention) for m in list(G0.modules()) + list(D0.modules()))


@pytest.mark.parametrize("arch, attn_res, size", [("cdcgan", 32, 32), ("sngan", 4, 32), ("biggan", 32, 32),
                                                  ("sngan", 4, 28), ("cdcgan", 64, 64)])
def test_attention_where_a_net_has_no_such_map_is_a_config_error(arch, attn_res, size):
    with pytest.raises(ConfigError, match=f"model.attn_res.*{attn_res}x{attn_res}.*valid: 0 \\(off\\) or"):
        nets(arch, size, 3, attn_res=attn_res)


def test_a_replaced_d_is_not_built():
    G, D = nets("sngan", backbone="googlenet", attn_res=4)  # G has a 4x4 map; SNGAN's own D has none
    assert isinstance(D, GoogLeNetDiscriminator) and any(isinstance(m, SelfAttention) for m in G.modules())


def test_attention_level_maps_28_pyramid():
    assert attention_level(ModelConfig(img_size=28, attn_res=16)) == 14
    assert attention_level(ModelConfig(img_size=28, attn_res=8)) == 7
    assert attention_level(ModelConfig(img_size=32, attn_res=16)) == 16


@pytest.mark.parametrize("size, channels", [(32, 3), (28, 1), (64, 3)])
def test_cdcgan_nearest_upsample_keeps_shapes(size, channels):
    G, D = nets("cdcgan", size, channels, upsample="nearest")
    assert not any(isinstance(m, nn.ConvTranspose2d) and m.stride == (2, 2) for m in G.modules())
    assert sum(isinstance(m, nn.Upsample) for m in G.modules()) == {32: 3, 28: 2, 64: 4}[size]
    y = torch.tensor([0, 1])
    x = G(torch.randn(2, 16), y)
    assert x.shape == (2, channels, size, size) and x.abs().max() <= 1
    G_dc, _ = nets("cdcgan", size, channels)  # the same widths as with transposed convs
    widths = lambda net: [m.out_channels for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert widths(G) == widths(G_dc)


def _convs(net):
    return [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1
            and m.out_channels <= m.in_channels * m.kernel_size[0] * m.kernel_size[1]]


@pytest.mark.parametrize("arch", ARCHS)
def test_init_schemes(arch):
    for scheme in ("ortho", "normal", "dcgan", "xavier"):
        G, D = nets(arch, init=scheme)
        ws = [weight_of(m).detach() for m in _convs(G) + _convs(D)]
        assert ws
        for w in ws:
            w2 = w.reshape(w.shape[0], -1)
            if scheme == "ortho":
                # float32 Gram of unit rows: each entry n <= 512 products whose |sum| <= 1 (Cauchy-Schwarz),
                # so its rounding is <= n * 2^-24 = 3.1e-5 (measured <= 1e-6 for every arch)
                assert torch.allclose(w2 @ w2.T, torch.eye(w2.shape[0]), atol=1e-4)
            elif scheme == "xavier":  # Glorot uniform: bound sqrt(6 / (fan_in + fan_out))
                fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
                assert w.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5 + 1e-6
        if scheme in ("normal", "dcgan"):
            allw = torch.cat([w.flatten() for w in ws])
            assert abs(allw.std().item() - 0.02) < 0.003
        bns = [m for m in G.modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
        if scheme == "dcgan" and bns:
            gains = torch.cat([m.weight.detach() for m in bns])
            assert gains.std() > 0.005 and abs(gains.mean().item() - 1) < 0.03
        # SNGAN's per-class BatchNorm gains keep their init (1) whatever the scheme
        for m in G.modules():
            if isinstance(m, ClassConditionalBatchNorm2d):
                assert torch.equal(m.gain.weight, torch.ones_like(m.gain.weight))


def test_default_inits():
    G, D = nets("biggan")  # BigGAN: orthogonal
    w = G.blocks[0].c1.weight.detach().reshape(G.blocks[0].c1.out_channels, -1)
    assert torch.allclose(w @ w.T, torch.eye(w.shape[0]), atol=1e-4)  # as in test_init_schemes
    G, D = nets("sngan")  # SNGAN: Glorot uniform, gain sqrt(2) in the residual branch
    c = D.blocks[1].c1
    bound = 2 ** 0.5 * (6 / (c.in_channels * 9 + c.out_channels * 9)) ** 0.5
    assert c.weight.abs().max() <= bound + 1e-6 and c.weight.abs().max() > 0.8 * bound


def test_apply_init_rejects_unknown_scheme():
    with pytest.raises(ConfigError, match="model.init.*'kaiming'"):
        apply_init(nn.Linear(2, 2), "kaiming")


def test_biggan_hierarchical_z():
    G, _ = nets("biggan", z_dim=18)  # 4 chunks (linear + 3 blocks) that don't divide evenly
    assert G.chunks == [5, 5, 4, 4]
    assert G.linear.in_features == 5 and G.blocks[2].bn1.gain.in_features == 8 + 4
    G.eval()
    z, y = torch.randn(1, 18), torch.tensor([0])
    z2 = z.clone()
    z2[:, -4:] += 1  # only the last block's chunk
    assert not torch.allclose(G(z, y), G(z2, y))
    G, _ = nets("biggan", z_dim=18, hier_z=False)
    assert G.linear.in_features == 18 and G.blocks[0].bn1.gain.in_features == 8
    with pytest.raises(ConfigError, match="model.z_dim.*4 chunks"):
        nets("biggan", z_dim=3)


def test_unknown_architecture_lists_every_name():
    with pytest.raises(ConfigError, match="Valid names: biggan, cdcgan, sngan"):
        build_models(ModelConfig(name="nope"))


# ------------------------------------------------------------------ GoogLeNet backbone weights


@pytest.fixture(scope="module")
def googlenet_state(tmp_path_factory):
    """A torchvision GoogLeNet state_dict as torchvision ships it (with aux heads and fc)."""
    from torchvision.models import googlenet
    torch.manual_seed(0)
    state = googlenet(weights=None, aux_logits=True, init_weights=True).state_dict()
    path = tmp_path_factory.mktemp("w") / "googlenet.pth"
    torch.save(state, path)
    return path, state


def test_googlenet_loads_local_weights(googlenet_state):
    path, state = googlenet_state
    G, D = nets("cdcgan", backbone="googlenet", backbone_weights=str(path), init="normal")
    w = D.backbone.inception4a.branch2[1].conv.weight
    assert torch.equal(w, state["inception4a.branch2.1.conv.weight"])  # kept despite model.init
    assert torch.equal(D.backbone.conv1.bn.running_var, state["conv1.bn.running_var"])
    assert abs(D.linear.weight.std().item() - 0.02) < 0.01  # the head does follow model.init
    assert D(torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([0, 1])).shape == (2,)


def test_googlenet_wrong_weights_are_config_errors(googlenet_state, tmp_path):
    path, state = googlenet_state
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pth.*not a readable torch state_dict"):
        nets("cdcgan", backbone="googlenet", backbone_weights=str(junk))

    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.bn1.weight": torch.ones(64)}, other)
    with pytest.raises(ConfigError, match="resnet.pth does not match.*missing keys: .*unexpected keys: "
                                          "conv1.weight, layer1.0.bn1.weight"):
        nets("cdcgan", backbone="googlenet", backbone_weights=str(other))

    bad = dict(state)
    bad["inception3a.branch1.conv.weight"] = torch.zeros(1, 1, 1, 1)
    reshaped = tmp_path / "reshaped.pth"
    torch.save(bad, reshaped)
    with pytest.raises(ConfigError, match=r"reshaped.pth.*shape mismatches.*inception3a.branch1.conv.weight "
                                          r"\(1, 1, 1, 1\) vs \(64, 192, 1, 1\)"):
        nets("cdcgan", backbone="googlenet", backbone_weights=str(reshaped))

    with pytest.raises(ConfigError, match="gone.pth.*not found"):
        load_backbone(nn.Linear(1, 1), str(tmp_path / "gone.pth"))  # e.g. deleted after the config check


def test_googlenet_missing_file_is_rejected_by_the_config(tmp_path):
    with pytest.raises(ConfigError, match="model.backbone_weights.*file not found.*nope.pth"):
        ModelConfig(d_backbone="googlenet", backbone_weights=str(tmp_path / "nope.pth"))

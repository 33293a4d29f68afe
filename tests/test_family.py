"""The family interface (gan.family): the registry and the config key, and the spine running a family
that is not the GAN. A toy family (one autoencoder network "ae", its EMA copy) defined here, as a
new family module would be, trains, checkpoints parts named after its network, resumes bit for bit,
and a GAN config refuses its checkpoint."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from gan.config import ConfigError, _check, load_config
from gan.family import FAMILIES, Family, OptimSpec, build_family, get_family, register_family
from gan.rundir import parts_of, required_files

from conftest import fit_in_process


@dataclasses.dataclass
class ToyModelConfig:
    name: str = "toy-ae"
    width: int = 4

    def __post_init__(self):
        _check(self.width >= 1, "model.width", "must be >= 1")


class ToyFamily(Family):
    name = "toy"
    sections = {"model": ToyModelConfig}
    ema = "ae"

    def build_networks(self):
        w = self.cfg.model.width
        return {"ae": torch.nn.Sequential(torch.nn.Conv2d(3, w, 3, padding=1), torch.nn.Tanh(),
                                          torch.nn.Conv2d(w, 3, 3, padding=1))}

    def optimizer(self, name):
        return OptimSpec(self.cfg.optim.lr_g, tuple(self.cfg.optim.betas_g))

    def train_step(self, ctx):
        x, _ = ctx.batch()
        loss = F.mse_loss(ctx.nets["ae"](x), x)
        ctx.update("ae", loss, {"Loss/ae/mse": loss.detach()})

    def pictures(self, net, device):
        x = torch.zeros(4, 3, 8, 8, device=device)
        return net(x).clamp(-1, 1), torch.arange(4, device=device) % 2, 2

    def example_inputs(self, batch, seed=0):
        return (torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed)),)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(FAMILIES, "toy", ToyFamily)
    return ToyFamily


def toy_config(shards, *overrides):
    return load_config(None, ["family=toy", f"data.shards={shards}", "data.num_workers=0", "train.batch_size=8",
                              "train.mixed_precision=no", "log.progress=false", "log.with=", "log.every=1",
                              "log.sample_every=2", "checkpoint.every=2", *overrides])


def test_registry_and_config_key(toy):
    assert get_family("gan").sections["model"].__name__ == "ModelConfig"
    assert load_config(None).family == "gan"  # every existing recipe is the GAN's
    with pytest.raises(ConfigError, match=r"config key 'family': 'nope' is not a registered model family; one of: "
                                          r".*gan.*toy"):
        load_config(None, ["family=nope"])
    cfg = load_config(None, ["family=toy", "model.width=3"])
    assert isinstance(cfg.model, ToyModelConfig) and cfg.loss is None and isinstance(build_family(cfg), ToyFamily)
    assert cfg.to_dict()["model"] == {"name": "toy-ae", "width": 3} and "loss" not in cfg.to_dict()
    with pytest.raises(ConfigError, match=r"unknown config key 'model.z_dim'.*Valid keys here: model.name, model.width"):
        load_config(None, ["family=toy", "model.z_dim=3"])  # the GAN's keys are not the toy's
    with pytest.raises(ConfigError, match="config key 'model.width': must be >= 1"):
        load_config(None, ["family=toy", "model.width=0"])
    with pytest.raises(TypeError, match="needs a name and a 'model' section"):
        register_family(type("Bad", (Family,), {"name": "bad"}))


def test_checkpoint_parts_are_named_after_the_networks():
    assert parts_of(("G", "D"), True) == (("G", "D"), ("opt_G", "opt_D"), ("ema", "train_state", "sched_G", "sched_D"))
    assert parts_of(("vae",), False) == (("vae",), ("opt_vae",), ("train_state", "sched_vae"))
    assert required_files(1, "ddp", ("vae",), False) == [
        "model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl",
        "random_states_0.pkl"]


def test_a_new_family_trains_checkpoints_and_resumes_exactly(tmp_path, tiny_shards, toy):
    from gan.checkpoint import CheckpointError, check_resume, read_meta

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fit_in_process(toy_config(tiny_shards, "train.max_steps=4"), straight)
    meta = read_meta(straight / "checkpoints" / "step-00000004")
    assert (meta["family"], meta["nets"], meta["ema"]) == ("toy", ["ae"], True)
    assert set(meta["parts"]) == {"ae", "opt_ae", "ema", "train_state", "sched_ae"}
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "Loss/ae/mse" in r] == [1, 2, 3, 4]
    assert all("GradNorm/ae" in r and "LR/ae" in r for r in rows if "Loss/ae/mse" in r)
    assert sorted(p.name for p in (straight / "export").iterdir()) == ["ae_ema.safetensors", "model.json"]  # named after the EMA network

    fit_in_process(toy_config(tiny_shards, "train.max_steps=2"), resumed)
    fit_in_process(toy_config(tiny_shards, "train.max_steps=4"), resumed, resume="auto")
    a = load_file(straight / "checkpoints" / "step-00000004" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step-00000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    path = straight / "checkpoints" / "step-00000004"
    gan_cfg = load_config(None, [f"data.shards={tiny_shards}", "train.mixed_precision=no"])
    saved = straight / "config.yaml"
    with pytest.raises(CheckpointError, match=re.escape(
            f"holds a toy model and this run trains family=gan; resume it with the config it was trained with: "
            f"`--config {saved} --run-dir {straight} --resume auto`")):
        check_resume(path, meta, gan_cfg, 1)
    check_resume(path, meta, load_config(saved, []), 1)  # the hint works: that config resumes it
    saved.unlink()  # no saved config of the toy's: the hint names the family's recipes (it has none) and the meta
    with pytest.raises(CheckpointError, match=re.escape(f"resume it with a config of the toy family (family=toy, "
                                                        f"with the settings of {path / 'meta.json'}'s \"config\")")):
        check_resume(path, meta, gan_cfg, 1)


def test_a_family_mismatch_names_the_checkpoints_family_recipes(tmp_path, tiny_shards):
    """A VAE checkpoint resumed with the GAN's config: the hint names the VAE's recipes, not family=vae on the
    GAN's config (its model.name, loss.name are no VAE keys)."""
    from gan.checkpoint import CheckpointError, check_resume
    from gan.config import load_config

    path = tmp_path / "run" / "checkpoints" / "step-00000001"
    with pytest.raises(CheckpointError) as e:
        check_resume(path, {"family": "vae"}, load_config(None, [f"data.shards={tiny_shards}"]), 1)
    assert "a config of the vae family (configs/cifar10_vae.yaml, configs/fashion_mnist_vae.yaml, " in str(e.value)
    assert "family=vae" not in str(e.value)


def test_the_gan_refuses_paired_shards_before_any_work(tmp_path):
    from conftest import train_debug
    from test_paired import inverted_pairs

    shards = inverted_pairs(tmp_path / "pairs", size=32)
    r = train_debug(tmp_path / "run", shards, "model.num_classes=3", check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "the GAN (family: gan) trains on single images" in r.stderr and "family: pix2pix" in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()

#!/usr/bin/env python
"""Plain PyTorch training loops for the VAE and pix2pix: the obvious alternative our trainer is measured
against (benchmarks/fixed_budget.py --steps, benchmarks/train_throughput.py --families).

Shared with our trainer: the networks (gan/families/*/networks.py, built right after seeding with
``train.seed``, as the trainer does), the optimizer settings and the objective's weights read from the
same config, and the data: the project's TrainStream with the same seed, so both see the same batches in
the same order, augmented with the same draws. Left out: the whole spine (no Accelerate, backend, guard,
EMA, checkpoints, logging or stop policy). The optimizer is a plain ``torch.optim.Adam`` (the trainer's is
the fused kernel), and the losses are written out here as the papers and the pix2pix reference
implementation state them, not imported from gan/families/*/losses.py:

- VAE (Kingma & Welling): sum over pixels of (x - tanh(h))^2 / (2 obs_std^2) + w * KL(q(z|x) || N(0, I)),
  averaged over the batch, with the reparameterization trick; w = beta * min(1, step / kl_warmup_steps).
- pix2pix (pytorch-CycleGAN-and-pix2pix ``optimize_parameters``, ``gan_mode vanilla``): fake = G(a);
  D on (a, b) vs (a, fake.detach()) with BCE-with-logits, halved; then D frozen and G on BCE(D(a, fake), 1)
  + lambda_L1 * |fake - b|_1.

    python benchmarks/reference_loops.py --config configs/cifar10_vae.yaml --out DIR \
        data.shards=/tmp/shards/cifar10-train train.max_steps=300 train.seed=1

writes ``DIR/<net>.safetensors`` for each network, ``DIR/config.yaml`` (the resolved config) and
``DIR/result.json`` (steps, batch size, the loop's wall-clock seconds, the last losses).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def seed_all(seed: int) -> None:
    """What the trainer's ``accelerate.utils.set_seed`` does on a CPU, without Accelerate."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def adam(params, o, lr: float, betas) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=o.eps, weight_decay=o.weight_decay)


class VAELoop:
    """One network ``vae``, one Adam (``optim.lr_g``/``betas_g``), one update per step."""

    def __init__(self, cfg):
        from gan.families.vae.networks import VAE

        if cfg.model.recon != "mse":
            raise ValueError("the reference VAE loop implements the Gaussian likelihood (model.recon=mse) only")
        self.cfg = cfg
        seed_all(cfg.train.seed)
        self.nets = {"vae": VAE(cfg.model)}
        self.opt = adam(self.nets["vae"].parameters(), cfg.optim, cfg.optim.lr_g, cfg.optim.betas_g)
        seed_all(cfg.train.seed)  # the trainer seeds again (rank 0: the same seed) before drawing any noise

    def step(self, batch, i: int) -> dict:
        x, y = batch
        vae, m, lc = self.nets["vae"], self.cfg.model, self.cfg.loss
        mu, logvar = vae.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        h = vae.decode(z, y if m.conditional else None)
        recon = F.mse_loss(torch.tanh(h), x, reduction="sum") / (2 * lc.obs_std ** 2)
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        w = lc.beta * min(1.0, i / lc.kl_warmup_steps) if lc.kl_warmup_steps else lc.beta
        loss = (recon + w * kl) / x.shape[0]
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": loss.item()}


class Pix2PixLoop:
    """Networks ``G`` and ``D``, an Adam each; the reference implementation's update order."""

    def __init__(self, cfg):
        from gan.families.pix2pix.networks import build_networks

        if cfg.loss.gan_loss != "ns":
            raise ValueError("the reference pix2pix loop implements the paper's vanilla GAN loss (loss.gan_loss=ns) only")
        self.cfg = cfg
        seed_all(cfg.train.seed)
        self.nets = build_networks(cfg.model)
        o = cfg.optim
        self.opt_G = adam(self.nets["G"].parameters(), o, o.lr_g, o.betas_g)
        self.opt_D = adam(self.nets["D"].parameters(), o, o.lr_d, o.betas_d)
        seed_all(cfg.train.seed)

    def step(self, batch, i: int) -> dict:
        a, b, _ = batch
        G, D = self.nets["G"], self.nets["D"]
        fake = G(a)
        D.requires_grad_(True)
        self.opt_D.zero_grad()
        pred_fake, pred_real = D(torch.cat([a, fake.detach()], 1)), D(torch.cat([a, b], 1))
        loss_d = 0.5 * (F.binary_cross_entropy_with_logits(pred_fake, torch.zeros_like(pred_fake))
                        + F.binary_cross_entropy_with_logits(pred_real, torch.ones_like(pred_real)))
        loss_d.backward()
        self.opt_D.step()
        D.requires_grad_(False)
        self.opt_G.zero_grad()
        pred = D(torch.cat([a, fake], 1))
        l1 = F.l1_loss(fake, b)
        loss_g = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred)) + self.cfg.loss.lambda_l1 * l1
        loss_g.backward()
        self.opt_G.step()
        return {"loss_D": loss_d.item(), "loss_G": loss_g.item(), "l1": l1.item()}


LOOPS = {"vae": VAELoop, "pix2pix": Pix2PixLoop}


def build_loop(cfg):
    if cfg.family not in LOOPS:
        raise ValueError(f"no reference loop for family '{cfg.family}'; there are: {', '.join(LOOPS)}")
    return LOOPS[cfg.family](cfg)


def train(cfg, log_every: int = 50) -> tuple[object, dict]:
    """``train.max_steps`` steps of the reference loop on the TrainStream of ``cfg.data`` (rank 0 of 1).
    Returns (the loop, {"steps", "batch_size", "loop_seconds", "last"})."""
    from gan.data import TrainStream

    loop = build_loop(cfg)
    t = cfg.train
    stream = TrainStream(cfg.data, batch_size=t.batch_size, seed=t.seed, rank=0, world_size=1)
    for net in loop.nets.values():
        net.train()
    batches, last = iter(stream), {}
    t0 = time.perf_counter()
    try:
        for i in range(t.max_steps):
            last = loop.step(next(batches), i)
            if log_every and (i + 1) % log_every == 0:
                print(f"step {i + 1}/{t.max_steps} " + " ".join(f"{k} {v:.4f}" for k, v in last.items()), flush=True)
    finally:
        seconds = time.perf_counter() - t0
        stream.close()
    return loop, {"steps": t.max_steps, "batch_size": t.batch_size, "loop_seconds": seconds, "last": last}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a VAE or pix2pix recipe")
    p.add_argument("--out", required=True, help="directory for the weights, config.yaml and result.json")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    from safetensors.torch import save_file

    from gan.config import ConfigError, load_config
    from gan.io import write_file_atomic, write_json_atomic

    try:
        cfg = load_config(args.config, args.overrides)
        build_loop(cfg)  # an unsupported family or loss fails before any work
    except (ConfigError, ValueError) as e:
        p.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loop, result = train(cfg)
    for name, net in loop.nets.items():
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / f"{name}.safetensors"))
    write_file_atomic(out / "config.yaml", cfg.to_yaml().encode())
    write_json_atomic(out / "result.json", result)  # last: its presence marks a complete run
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

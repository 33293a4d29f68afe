"""pix2pix as a family: paired image-to-image translation on paired shards (``data_shards build --source
paired``). Networks "G" (U-Net, input image -> output image) and "D" (PatchGAN on (input, image) pairs),
an Adam each with the spine's ``optim.lr_g``/``betas_g`` and ``optim.lr_d``/``betas_d`` (2e-4, (0.5,
0.999) by default, as pix2pix's repository). One step, as the reference's ``optimize_parameters``: G
translates the batch once; D is updated on (input, target) against (input, G(input)) detached; then G is
updated through the frozen D on adversarial (any registered GAN loss, ``loss.gan_loss``) + ``loss.lambda_l1``
* L1. The spine keeps an EMA copy of G (``ema.*``; ``ema.decay: 0`` makes it the latest G): pictures and
the export use it, in eval mode (dropout off).

Config sections: ``model`` (Pix2PixConfig), ``loss`` (Pix2PixLossConfig) and ``val`` (Pix2PixValConfig:
the held-out pairs the pictures show and the metrics measure: L1, PSNR, SSIM, FID of outputs against
targets, gan.families.pix2pix.evaluation). Pictures: input | output | target rows of a fixed set of held-out
pairs. Export and serving signature: an image in (``in_channels`` x ``img_size``^2, in [-1, 1]), an image out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gan.config import _check
from gan.families.pix2pix.config import Pix2PixConfig, Pix2PixLossConfig
from gan.family import Family, Mode, OptimSpec, image_tensor, register_family

WHO = "pix2pix (family: pix2pix)"


@dataclass
class Pix2PixValConfig:
    # paired shards of held-out pairs, for the pictures and the metrics (e.g. `python -m data_shards build
    # --source paired --root SRC/val --split val --out DIR`); "" = data.shards, which are not held out
    shards: str = ""
    pictures: int = 8  # input | output | target rows in the logged picture

    def __post_init__(self):
        _check(self.pictures >= 1, "val.pictures", "must be >= 1")


@register_family
class Pix2Pix(Family):
    name = "pix2pix"
    sections = {"model": Pix2PixConfig, "loss": Pix2PixLossConfig, "val": Pix2PixValConfig}
    ema = "G"
    # one D update per step; the picture's rows are val.pictures held-out pairs
    unread_keys = ("optim.n_dis", "log.samples_per_class")
    paired = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self._loss = self._held_out = None

    @property
    def gan_loss(self):
        """The adversarial term: the GAN family's loss object of ``loss.gan_loss`` with its defaults."""
        if self._loss is None:
            from gan.families.gan.config import LossConfig
            from gan.families.gan.losses import build_loss

            self._loss = build_loss(LossConfig(name=self.cfg.loss.gan_loss))
        return self._loss

    def build_networks(self) -> dict[str, torch.nn.Module]:
        from gan.families.pix2pix.networks import build_networks

        return build_networks(self.cfg.model)

    def optimizer(self, name: str) -> OptimSpec:
        o, k = self.cfg.optim, name.lower()
        return OptimSpec(getattr(o, f"lr_{k}"), tuple(getattr(o, f"betas_{k}")))

    def check(self, manifest=None) -> None:
        self.gan_loss  # noqa: B018 - builds the loss before any work
        if manifest is None:
            return
        from gan.data import read_manifest

        self._fits(manifest, "data.shards")
        if self.cfg.val.shards:
            self._fits(read_manifest(self.cfg.val.shards, "val.shards", paired=True), "val.shards")

    def _fits(self, m, key: str) -> None:
        """Paired shards whose input and target fit the model (ShardError naming the key and the fix)."""
        from gan.data import ShardError, require_paired

        require_paired(m, WHO, key)  # single images: the message names `data_shards build --source paired`
        mc = self.cfg.model
        m.check(dataset=(self.cfg.data.dataset or None) if key == "data.shards" else None, size=mc.img_size, key=key)
        for side, shape, want in (("input", m.input_shape, "in_channels"), ("target", m.image_shape, "out_channels")):
            if shape[0] != getattr(mc, want):
                raise ShardError(f"{key}: the shards in {m.dir} ({m.describe()}) have {shape[0]}-channel {side}s, "
                                 f"but the config expects {getattr(mc, want)} (model.{want}). Set "
                                 f"model.{want}={shape[0]} or use other shards.")

    # ------------------------------------------------------------------ training
    def train_step(self, ctx) -> None:
        real_a, real_b, _ = ctx.batch()  # paired shards: check() refused single images before any work
        from gan.families.pix2pix.losses import discriminator_loss, generator_loss

        loss = self.gan_loss
        loss.step = ctx.step
        fake_b = ctx.nets["G"](real_a)  # once, as the reference: D sees it detached, G's loss through it
        ctx.update("D", *discriminator_loss(loss, ctx.nets["D"], real_a, fake_b, real_b))
        with ctx.frozen("D") as D:  # no weight gradients, no gradient sync
            ctx.update("G", *generator_loss(loss, D, real_a, fake_b, real_b, self.cfg.loss.lambda_l1))

    # ------------------------------------------------------------------ pictures, sampling, export
    def held_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``val.pictures`` pairs of ``val.shards`` (or of ``data.shards``) on the CPU, in the
        shards' order and unaugmented: the same pairs in every picture, on every resume."""
        if self._held_out is None:
            from gan.data import eval_batches

            a, b, _ = next(iter(eval_batches(self.cfg.val.shards or self.cfg.data.shards, self.cfg.val.pictures)))
            self._held_out = (a, b)
        return self._held_out

    def picture_grid(self, net: torch.nn.Module, device) -> torch.Tensor:
        """input | output | target rows of the held-out pairs, ``net`` (the EMA G) translating: uint8 (3, H, W)."""
        from gan.families.pix2pix.pictures import triplet_grid

        a, b = self.held_out()
        return triplet_grid(a, net(a.to(device)).float().cpu(), b, n=len(a))

    def example_inputs(self, batch: int, seed: int = 0) -> tuple[torch.Tensor]:
        """``(image,)``: float32 (batch, model.in_channels, model.img_size, model.img_size), uniform in [-1, 1]."""
        m = self.cfg.model
        gen = torch.Generator().manual_seed(seed)
        return (torch.rand(batch, m.in_channels, m.img_size, m.img_size, generator=gen) * 2 - 1,)

    # ================================================================ export and serving signature
    def modes(self) -> tuple[Mode, ...]:
        m = self.cfg.model
        return (Mode("translate", (image_tensor("image", m.in_channels, m.img_size),),
                     image_tensor("images", m.out_channels, m.img_size), "the translated image (input -> output)"),)

    def mode_inputs(self, mode: str, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        self.mode(mode)
        return self.example_inputs(batch, seed)

    def mode_forward(self, net: torch.nn.Module, mode: str) -> torch.nn.Module:
        self.mode(mode)
        return net  # the U-Net, image -> image

    # ================================================================ evaluation and offline pictures
    # (gan.families.pix2pix.evaluation, gan.families.pix2pix.pictures)
    sample_modes = {"triplets": 8, "curves": 0, "export": 1000}

    @classmethod
    def metric_table(cls):
        from gan.families.pix2pix.evaluation import METRICS

        return METRICS

    @classmethod
    def default_metrics(cls, cfg) -> str:
        return "l1,psnr,ssim"  # l1 first: the best-model pick is the L1 that G trains on

    def eval_preflight(self, request) -> dict:
        from gan.families.pix2pix.evaluation import preflight

        return preflight(self, request)

    def evaluate(self, net, request, device) -> tuple[dict, dict]:
        from gan.families.pix2pix.evaluation import evaluate

        return evaluate(self, net, request, device)

    def sample(self, net, request, device) -> torch.Tensor:
        from gan.families.pix2pix.pictures import sample

        return sample(self, net, request, device)

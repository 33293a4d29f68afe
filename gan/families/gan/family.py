"""The GAN as a family: a class-conditional generator G and discriminator D, ``optim.n_dis`` D
updates (plus lazy R1 as its own update) then one G update per step, the EMA copy of G for samples,
evaluation and export. Inputs of G: noise ``z`` (``model.z_dim``) and a class index."""
from __future__ import annotations

import torch

from gan.families.gan.config import LossConfig, ModelConfig
from gan.family import Family, Mode, OptimSpec, class_tensor, image_tensor, noise_tensor, register_family


@register_family
class GAN(Family):
    name = "gan"
    sections = {"model": ModelConfig, "loss": LossConfig}
    ema = "G"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._loss = None

    @property
    def loss(self):
        if self._loss is None:
            from gan.families.gan.losses import build_loss

            self._loss = build_loss(self.cfg.loss)
        return self._loss

    def build_networks(self) -> dict[str, torch.nn.Module]:
        from gan.families.gan.models import build_models

        G, D = build_models(self.cfg.model)
        return {"G": G, "D": D}

    def optimizer(self, name: str) -> OptimSpec:
        o = self.cfg.optim
        return OptimSpec(getattr(o, f"lr_{name.lower()}"), tuple(getattr(o, f"betas_{name.lower()}")))

    def check(self, manifest=None) -> None:
        from gan.families.gan.models import MODELS, build_models

        self.loss  # noqa: B018 - an unknown loss name raises ConfigError listing the valid ones
        if self.cfg.model.name not in MODELS:
            build_models(self.cfg.model)  # raises ConfigError listing the valid architectures
        if manifest is not None:
            from gan.data.manifest import require_single

            m = self.cfg.model
            require_single(manifest, "the GAN (family: gan)")  # paired shards: name the paired families
            manifest.check(dataset=self.cfg.data.dataset or None, channels=m.img_channels, size=m.img_size,
                           num_classes=m.num_classes)

    def _noise(self, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.cfg.model
        z = torch.randn(ctx.batch_size, m.z_dim, device=ctx.device)
        return z, torch.randint(0, m.num_classes, (ctx.batch_size,), device=ctx.device)

    def train_step(self, ctx) -> None:
        n_dis, loss, G = self.cfg.optim.n_dis, self.loss, ctx.nets["G"]
        loss.step = ctx.step
        for i in range(n_dis):
            real, y_real = ctx.batch()
            z, y_fake = self._noise(ctx)
            with torch.no_grad():
                fake = G(z, y_fake)
            ctx.update("D", *loss.d_loss(ctx.nets["D"], real, y_real, fake, y_fake))
            if loss.has_regularizer and (ctx.step * n_dis + i) % loss.cfg.r1_every == 0:
                ctx.update("D", *loss.d_regularizer(ctx.nets["D"], real, y_real), phase="D_reg")  # lazy R1
        z, y_fake = self._noise(ctx)
        with ctx.frozen("D") as D:  # no weight gradients, no gradient sync
            ctx.update("G", *loss.g_loss(D, G(z, y_fake), y_fake))

    def pictures(self, net: torch.nn.Module, device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A per-class grid of ``net`` (the EMA G) on fixed noise: ``log.samples_per_class`` per class."""
        if not hasattr(self, "_fixed"):
            gen = torch.Generator().manual_seed(self.cfg.train.seed)
            k, n = self.cfg.log.samples_per_class, self.cfg.model.num_classes
            self._fixed = (torch.randn(n * k, self.cfg.model.z_dim, generator=gen).to(device),
                           torch.arange(n).repeat_interleave(k).to(device))
        z, y = self._fixed
        images = torch.cat([net(zi, yi) for zi, yi in zip(z.split(256), y.split(256))])
        return images, y, self.cfg.model.num_classes

    def bn_inputs(self, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """``ema.bn_samples`` inputs ``(z, class)`` for the EMA G's own BatchNorm statistics: z ~ N(0, 1) from
        ``seed`` (a local generator), classes in turn, batches of gan.ema.BN_BATCH; None when it is 0."""
        from gan.ema import BN_BATCH

        n, m = self.cfg.ema.bn_samples, self.cfg.model
        if not n:
            return None
        z = torch.randn(n, m.z_dim, generator=torch.Generator().manual_seed(seed))
        return list(zip(z.split(BN_BATCH), (torch.arange(n) % m.num_classes).split(BN_BATCH)))

    def example_inputs(self, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, y)``: z float32 (batch, model.z_dim), y int64 class indices (the inputs gan.export traces
        and checks parity with, drawn the same way)."""
        m, gen = self.cfg.model, torch.Generator().manual_seed(seed)
        return torch.randn(batch, m.z_dim, generator=gen), torch.arange(batch) % m.num_classes

    # ================================================================ export and serving signature
    def modes(self) -> tuple[Mode, ...]:
        m = self.cfg.model
        return (Mode("generate", (noise_tensor(m.z_dim), class_tensor()),
                     image_tensor("images", m.img_channels, m.img_size), "images of a class from noise z"),)

    def mode_inputs(self, mode: str, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        self.mode(mode)
        return self.example_inputs(batch, seed)

    def mode_forward(self, net: torch.nn.Module, mode: str) -> torch.nn.Module:
        self.mode(mode)
        return net  # G(z, y) itself

    # ================================================================ evaluation and offline pictures
    sample_modes = {"grid": 10, "interp": 10, "classvar": 8, "realfake": 10, "curves": 0, "export": 1000}

    @classmethod
    def metric_table(cls):
        from gan.family import MetricSpec
        from gan.metrics import names

        return {n: MetricSpec(keys, keys[0] in names.HIGHER_IS_BETTER, "Inception features" if inc else "")
                for n, (keys, inc) in names.METRICS.items()}  # per_sample.register adds to METRICS

    @classmethod
    def default_metrics(cls, cfg) -> str:
        return "cls_fd,cls_acc"

    @classmethod
    def better(cls, key: str, new: float, old: float | None) -> bool:
        from gan.metrics.names import better

        return better(key, new, old)

    def eval_preflight(self, request) -> dict:
        from gan.metrics.core import check_counts, preflight

        m = self.cfg.model
        check_counts(request, m.num_classes)
        return preflight(request, m.num_classes, m.img_channels, m.img_size)

    def evaluate(self, net, request, device) -> tuple[dict, dict]:
        """``request.num_samples`` class-balanced samples of G against the real images (gan.metrics.core)."""
        from gan.metrics.core import evaluate_generator

        m = self.cfg.model
        return evaluate_generator(net, m.z_dim, m.num_classes, m.img_channels, m.img_size, request, device)

    def sample(self, net, request, device) -> torch.Tensor:
        """grid, interp, classvar, realfake (gan.sampling) and export (a PNG folder + labels.csv)."""
        from gan import sampling

        m, r = self.cfg.model, request
        args = (net, m.z_dim, m.num_classes)
        if r.mode == "export":
            sampling.export_images(*args, r.num, r.out, device, r.seed, class_names=r.class_names,
                                   classes=r.classes, progress=True)
            return torch.zeros(0, dtype=torch.uint8)
        if r.mode == "grid":
            return sampling.grid(*args, r.num, device, r.seed, r.classes, r.class_names)
        if r.mode == "interp":
            return sampling.interpolation(*args, max(r.num, 2), device, r.seed, r.classes, r.class_names)
        if r.mode == "classvar":
            return sampling.class_variation(*args, r.num, device, r.seed, r.classes, r.class_names)
        return sampling.real_vs_fake(*args, r.num, r.shards or self.cfg.data.shards, device, r.seed,
                                     classes=r.classes, class_names=r.class_names)

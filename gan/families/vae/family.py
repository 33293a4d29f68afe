"""The VAE as a family: one network "vae" (encoder and decoder, gan.families.vae.networks) trained on
the negative ELBO with a weighted, warmed-up KL term (gan.families.vae.losses), one update per step,
with an EMA copy for pictures, evaluation and export. Config sections: ``model`` (VAEConfig), ``loss``
(VAELossConfig) and ``val`` (VAEValConfig: the held-out split evaluation reads); the optimizer is the
spine's ``optim`` section with ``optim.lr_g`` and ``optim.betas_g`` (the VAE generates, as G does).
Export and serving modes: ``generate`` (prior samples from ``(z, class)``, the GAN's signature) and
``reconstruct`` (``(image, class)`` -> the decoded posterior mean); the class is ignored unless
``model.conditional``."""
from __future__ import annotations

import torch

from gan.families.vae.config import VAEConfig, VAELossConfig, VAEValConfig
from gan.families.vae.losses import kl_weight, vae_loss
from gan.family import Family, Mode, OptimSpec, class_tensor, image_tensor, noise_tensor, register_family


class _Generate(torch.nn.Module):
    """(z, y) -> images decoded from z (y used by a conditional decoder only)."""

    def __init__(self, vae: torch.nn.Module, conditional: bool):
        super().__init__()
        self.vae, self.conditional = vae, conditional

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.vae.to_image(self.vae.decode(z, y if self.conditional else None))


class _Reconstruct(_Generate):
    """(image, y) -> the decoded posterior mean of the image (deterministic)."""

    def forward(self, image: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, _ = self.vae.encode(image)
        return super().forward(mu, y)


@register_family
class VAEFamily(Family):
    name = "vae"
    sections = {"model": VAEConfig, "loss": VAELossConfig, "val": VAEValConfig}
    ema = "vae"
    unread_keys = ("optim.lr_d", "optim.betas_d", "optim.n_dis")  # one network, one update per step

    def build_networks(self) -> dict[str, torch.nn.Module]:
        from gan.families.vae.networks import VAE

        return {"vae": VAE(self.cfg.model)}

    def optimizer(self, name: str) -> OptimSpec:
        o = self.cfg.optim
        return OptimSpec(o.lr_g, tuple(o.betas_g))

    def check(self, manifest=None) -> None:
        # val.shards is read by the evaluation (its own checks, at the start when metrics.every is set) and by
        # launch/sample.py, not by training
        if manifest is not None:
            from gan.data.manifest import require_single

            m = self.cfg.model
            require_single(manifest, "the VAE (family: vae)")  # paired shards: name the paired families
            manifest.check(dataset=self.cfg.data.dataset or None, channels=m.img_channels, size=m.img_size,
                           num_classes=m.num_classes if m.conditional else None)

    def _labels(self, y: torch.Tensor) -> torch.Tensor | None:
        return y if self.cfg.model.conditional else None

    def train_step(self, ctx) -> None:
        x, y = ctx.batch()  # single-image shards: check() refused paired ones before any work
        m, lc = self.cfg.model, self.cfg.loss
        h, mu, logvar = ctx.nets["vae"](x, self._labels(y))
        w = kl_weight(ctx.step, lc.beta, lc.kl_warmup_steps)
        ctx.update("vae", *vae_loss(x, h, mu, logvar, w, m.recon, lc.obs_std))

    def _prior(self, n: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.cfg.model.latent_dim, generator=gen)
        return z.to(device), (torch.arange(n) % self.cfg.model.num_classes).to(device)

    def pictures(self, net: torch.nn.Module, device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Prior samples of ``net`` (the EMA VAE) on fixed noise: ``log.samples_per_class`` per class, one
        row each, with a conditional decoder; otherwise ``log.samples_per_class`` samples in one grid."""
        k, m = self.cfg.log.samples_per_class, self.cfg.model
        classes = m.num_classes if m.conditional else 1
        z, _ = self._prior(k * classes, self.cfg.train.seed, device)
        y = torch.arange(classes, device=device).repeat_interleave(k)
        return self.generate(net, z, y), y, classes

    def generate(self, net: torch.nn.Module, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] decoded from latents z (and classes y, used by a conditional decoder)."""
        return net.to_image(net.decode(z, self._labels(y)))

    def example_inputs(self, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, y)``: z float32 (batch, model.latent_dim) from N(0, I), y int64 class indices."""
        return self._prior(batch, seed, "cpu")

    # ================================================================ export and serving signature
    def modes(self) -> tuple[Mode, ...]:
        m = self.cfg.model
        img, y = image_tensor("images", m.img_channels, m.img_size), class_tensor(used=m.conditional)
        return (Mode("generate", (noise_tensor(m.latent_dim), y), img, "samples of the prior z ~ N(0, I)"),
                Mode("reconstruct", (image_tensor("image", m.img_channels, m.img_size), y), img,
                     "the image encoded, its posterior mean decoded"))

    def mode_inputs(self, mode: str, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        self.mode(mode)
        z, y = self._prior(batch, seed, "cpu")
        if mode == "generate":
            return z, y
        m, gen = self.cfg.model, torch.Generator().manual_seed(seed)
        return torch.rand(batch, m.img_channels, m.img_size, m.img_size, generator=gen) * 2 - 1, y

    def mode_forward(self, net: torch.nn.Module, mode: str) -> torch.nn.Module:
        self.mode(mode)
        return (_Generate if mode == "generate" else _Reconstruct)(net, self.cfg.model.conditional)

    # ================================================================ evaluation and offline pictures
    # (gan.families.vae.evaluation, gan.families.vae.pictures)
    sample_modes = {"grid": 10, "recon": 8, "interp": 10, "curves": 0, "export": 1000}

    @classmethod
    def metric_table(cls):
        from gan.families.vae.evaluation import METRICS

        return METRICS

    @classmethod
    def default_metrics(cls, cfg) -> str:
        """The negative ELBO first (the best-model pick) where it exists, then the reconstruction and the KL."""
        return ("bits_per_dim," if cfg.model.recon == "mse" else "") + "recon_mse,psnr,ssim,kl"

    def eval_preflight(self, request) -> dict:
        from gan.families.vae.evaluation import preflight

        return preflight(self, request)

    def evaluate(self, net, request, device) -> tuple[dict, dict]:
        from gan.families.vae.evaluation import evaluate

        return evaluate(self, net, request, device)

    def sample(self, net, request, device) -> torch.Tensor:
        from gan.families.vae.pictures import sample

        return sample(self, net, request, device)

    def curves(self, metrics_jsonl, out, title: str = ""):
        """Reconstruction, KL, PSNR and SSIM over the steps (training losses and Eval/* rows)."""
        from gan.families.vae.pictures import curves_png
        from gan.sampling import read_metrics_jsonl

        return curves_png(read_metrics_jsonl(metrics_jsonl), out, title)

"""The VAE's pictures: uint8 (3, H, W) grids (torchvision.utils.make_grid) and a curves PNG.

- :func:`reconstruction_grid`: inputs in the top row, their reconstructions below;
- :func:`interpolation_grid`: x0, decodings of the latent means on the line from mu(x0) to mu(x1), x1;
- :func:`prior_grid`: samples from z ~ N(0, I), one row per class when the decoder is conditional;
- :func:`curves_png`: reconstruction, KL, PSNR and SSIM over steps, from metrics.jsonl rows.
Grids are written with ``gan.viz.save_png``.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch
from torchvision.utils import make_grid

from gan.io import write_file_atomic
from gan.viz import to_uint8

# panel -> the metrics.jsonl keys drawn in it (training losses and evaluation measures)
# (the training term is a sum over pixels, the evaluation's MSE a per-pixel mean: two panels, two scales)
CURVES = {
    "Reconstruction term (train)": ("Loss/VAE/recon",),
    "Reconstruction MSE (eval)": ("Eval/recon_mse",),
    "KL (nats)": ("Loss/VAE/kl", "Eval/kl"),
    "PSNR (dB)": ("Eval/psnr",),
    "SSIM": ("Eval/ssim",),
}


def grid(images: torch.Tensor, nrow: int, padding: int = 2) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] (or uint8) -> uint8 (3, H', W'), nrow images per row."""
    return make_grid(to_uint8(images), nrow=nrow, padding=padding, pad_value=0)


def reconstruction_grid(x: torch.Tensor, recon: torch.Tensor, n: int = 8) -> torch.Tensor:
    """Inputs (top row) over their reconstructions (bottom row), the first n of each."""
    if x.shape != recon.shape:
        raise ValueError(f"inputs {tuple(x.shape)} and reconstructions {tuple(recon.shape)} differ in shape")
    n = min(n, len(x))
    return grid(torch.cat([x[:n].detach().cpu(), recon[:n].detach().cpu()]), nrow=n)


@torch.no_grad()
def interpolation_grid(vae, x0: torch.Tensor, x1: torch.Tensor, steps: int = 8,
                       y: torch.Tensor | None = None) -> torch.Tensor:
    """One row: x0, decodings of (1 - t) mu(x0) + t mu(x1) for ``steps`` values of t in [0, 1], x1.
    x0, x1: (C, H, W) images; y: their (shared) label for a conditional decoder."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    pair = torch.stack([x0, x1])
    mu, _ = vae.encode(pair)
    t = torch.linspace(0, 1, steps, device=mu.device).unsqueeze(1)
    z = (1 - t) * mu[0] + t * mu[1]
    labels = None if y is None else torch.as_tensor(y, device=mu.device).reshape(1).expand(steps)
    decoded = vae.to_image(vae.decode(z, labels))
    return grid(torch.cat([x0[None].cpu(), decoded.cpu(), x1[None].cpu()]), nrow=steps + 2)


@torch.no_grad()
def prior_grid(vae, n: int = 64, generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples from the prior: n in rows of 8, or with a conditional decoder ``n // num_classes`` per class
    (at least 1), one row per class."""
    classes = vae.cfg.num_classes if vae.cfg.conditional else 0
    if classes:
        per = max(1, n // classes)
        device = next(vae.parameters()).device
        y = torch.arange(classes, device=device).repeat_interleave(per)
        return grid(vae.sample(len(y), y, generator=generator).cpu(), nrow=per)
    return grid(vae.sample(n, generator=generator).cpu(), nrow=min(8, n))


def curves_png(rows: list[dict], out: str | Path, title: str = "") -> Path:
    """Reconstruction, KL, PSNR and SSIM against "step" from metrics.jsonl rows, one panel each (a panel
    with no values says so), written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(3.6 * len(CURVES), 3.2), squeeze=False)
    for ax, (panel, keys) in zip(axes.flat, CURVES.items()):
        drawn = False
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if "step" in r and isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=key, linewidth=1.2, marker="o" if len(pts) < 20 else None, markersize=3)
                drawn = True
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no values yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    plt.close(fig)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return write_file_atomic(out, buf.getvalue())


# ---------------------------------------------------------------------------- launch/sample.py's modes


def _held_out(family, request, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from gan.sampling import first_samples

    shards = request.shards or family.eval_shards()
    x, y = first_samples(shards, n, request.classes, family.shards_key(shards, "--real-shards"))
    return x, y


@torch.no_grad()
def sample(family, vae, request, device) -> torch.Tensor:
    """launch/sample.py for the VAE (``vae``: the EMA network, eval mode), a uint8 (3, H, W) picture:

    - ``grid``: prior samples, ``num`` per class in labelled rows with a conditional decoder (``--class``:
      only those rows), else ``num`` samples in a near-square grid;
    - ``recon``: the first ``num`` held-out images (top row) over their reconstructions (bottom row);
    - ``interp``: latent interpolation between two held-out images (the first two; with a conditional
      decoder the first two of one class, decoded with that class), ``num`` steps between them;
    - ``export``: ``num`` prior samples as PNG files in ``request.out`` (+ labels.csv); returns an empty tensor.
    """
    from gan import sampling

    m, r = family.cfg.model, request
    classes = m.num_classes if m.conditional else 1
    if r.classes and not m.conditional:
        raise ValueError("--class: this VAE's decoder is unconditional (model.conditional=false); leave --class out")
    names = r.class_names if m.conditional else None

    def decode(z, y):
        return family.generate(vae, z, y)

    if r.mode == "grid":
        return sampling.grid(decode, m.latent_dim, classes, r.num, device, r.seed, r.classes, names)
    if r.mode == "export":
        sampling.export_images(decode, m.latent_dim, classes, r.num, r.out, device, r.seed, class_names=names,
                               classes=r.classes, progress=True)
        return torch.zeros(0, dtype=torch.uint8)
    if r.mode == "recon":
        x, y = _held_out(family, r, r.num)
        x, y = x.to(device), y.to(device)
        return reconstruction_grid(x, vae.reconstruct(x, y if m.conditional else None), n=len(x))
    if r.mode == "interp":
        x, y = _held_out(family, r, 64 if m.conditional else 2)
        i, j = 0, 1
        if m.conditional:  # two images of the first image's class
            same = (y == y[0]).nonzero().flatten().tolist()
            if len(same) < 2:
                raise ValueError(f"interp needs two held-out images of class {int(y[0])} among the first 64")
            j = same[1]
        if len(x) < 2:
            raise ValueError("interp needs two held-out images")
        x = x.to(device)
        return interpolation_grid(vae, x[i], x[j], max(r.num, 2), y[i].to(device) if m.conditional else None)
    raise ValueError(f"the VAE has no picture mode {r.mode!r}")

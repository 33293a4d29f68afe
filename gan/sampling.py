"""Pictures of a generator: per-class grids, latent interpolation, class variation, real vs fake,
training curves, and export of individual images for other tools.

Every function takes an eval-mode conditional generator ``G(z, y) -> images in [-1, 1]`` and returns
a uint8 (C, H, W) picture (``gan.viz.save_png`` writes it), except :func:`curves_png` and
:func:`export_images`, which write files. Noise comes from a seeded CPU generator, so a picture is
the same on any device and in any process.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import torch

from gan.viz import cell_centres, class_grid, make_grid_uint8, save_png, to_uint8, with_labels


def _noise(n: int, z_dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _run(G, z: torch.Tensor, y: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    out = [G(zb.to(device), yb.to(device)).float().cpu() for zb, yb in zip(z.split(batch_size), y.split(batch_size))]
    return torch.cat(out)


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between vectors ``z0`` and ``z1`` (D,) at fractions ``t`` (T,) -> (T, D).
    Falls back to linear interpolation when the two are (anti)parallel."""
    z0, z1, t = z0.double(), z1.double(), t.double()[:, None]
    cos = torch.dot(z0, z1) / (z0.norm() * z1.norm())
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    if omega.abs() < 1e-6 or (math.pi - omega).abs() < 1e-6:
        return ((1 - t) * z0 + t * z1).float()
    s = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / s * z0 + torch.sin(t * omega) / s * z1).float()


def _rows_of(num_classes: int, classes: list[int] | None) -> list[int]:
    return list(range(num_classes)) if not classes else list(classes)


def label_rows(img: torch.Tensor, rows: list[int], size: int, num_classes: int,
               class_names: list[str] | None) -> torch.Tensor:
    """Class names left of each row (one row per class in ``rows``); nothing for an unconditional model."""
    if num_classes == 1 or not class_names:
        return img
    return with_labels(img, rows=list(zip(cell_centres(len(rows), size), [class_names[k] for k in rows])))


def class_rows(images: torch.Tensor, rows: list[int], per_class: int, num_classes: int,
               class_names: list[str] | None = None) -> torch.Tensor:
    """``images`` ordered as ``per_class`` of each class in ``rows`` -> one labelled row per class; a
    single class (an unconditional model, or one --class) fills a square grid instead."""
    g = class_grid(images, torch.arange(len(rows)).repeat_interleave(per_class), len(rows), per_class)
    if len(rows) == 1:
        named = num_classes > 1 and class_names
        return with_labels(g, cols=[(g.shape[2] / 2, class_names[rows[0]])]) if named else g
    return label_rows(g, rows, images.shape[2], num_classes, class_names)


def grid(G, z_dim: int, num_classes: int, per_class: int, device, seed: int = 0,
         classes: list[int] | None = None, class_names: list[str] | None = None) -> torch.Tensor:
    """One row per class (or per class in ``classes``), ``per_class`` samples each (different z)."""
    rows = _rows_of(num_classes, classes)
    y = torch.tensor(rows).repeat_interleave(per_class)
    images = _run(G, _noise(len(y), z_dim, seed), y, device)
    return class_rows(images, rows, per_class, num_classes, class_names)


def interpolation(G, z_dim: int, num_classes: int, steps: int, device, seed: int = 0,
                  classes: list[int] | None = None, class_names: list[str] | None = None) -> torch.Tensor:
    """Two z, spherical interpolation in ``steps`` columns; one row per class (the same two z in every
    row, so the rows differ only by the class), or only the rows of ``classes``."""
    rows = _rows_of(num_classes, classes)
    z0, z1 = _noise(2, z_dim, seed)
    path = slerp(z0, z1, torch.linspace(0, 1, steps))
    z = path.repeat(len(rows), 1)
    y = torch.tensor(rows).repeat_interleave(steps)
    images = _run(G, z, y, device)
    return label_rows(make_grid_uint8(images, nrow=steps), rows, images.shape[2], num_classes, class_names)


def class_variation(G, z_dim: int, num_classes: int, rows: int, device, seed: int = 0,
                    classes: list[int] | None = None, class_names: list[str] | None = None) -> torch.Tensor:
    """One z per row, the same z across all classes (columns = classes, or those in ``classes``,
    named on top). With one class (unconditional) there is nothing to vary: the ``rows`` samples
    fill a near-square grid."""
    cols = _rows_of(num_classes, classes)
    z = _noise(rows, z_dim, seed).repeat_interleave(len(cols), dim=0)
    y = torch.tensor(cols).repeat(rows)
    images = _run(G, z, y, device)
    if num_classes == 1:
        return make_grid_uint8(images, nrow=math.ceil(math.sqrt(rows)))
    img = make_grid_uint8(images, nrow=len(cols))
    if not class_names:
        return img
    return with_labels(img, cols=list(zip(cell_centres(len(cols), images.shape[3]), [class_names[k] for k in cols])))


def real_per_class(shards_dir: str | Path, num_classes: int, per_class: int,
                   classes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` real images of each class (or of each in ``classes``) in shard order
    (reads only as far as needed); labels are the class indices."""
    from gan.data import eval_batches

    wanted = _rows_of(num_classes, classes)
    picked: dict[int, list[torch.Tensor]] = {k: [] for k in wanted}
    for x, y in eval_batches(shards_dir, 500):
        for img, label in zip(x, y.tolist()):
            if label in picked and len(picked[label]) < per_class:
                picked[label].append(img)
        if all(len(v) >= per_class for v in picked.values()):
            break
    images = torch.stack([img for k in wanted for img in picked[k]])
    labels = torch.tensor([k for k in wanted for _ in picked[k]])
    return images, labels


def first_samples(shards_dir: str | Path, n: int, classes: list[int] | None = None, key: str = "data.shards",
                  paired: bool = False) -> tuple[torch.Tensor, ...]:
    """The first ``n`` samples of a shard set in shard order (of the classes in ``classes`` only, when
    given), unaugmented: ``(x, y)``, or ``(a, b, y)`` for paired shards (reads only as far as needed).
    Raises ValueError when the shards hold none; ``key``, ``paired``: what a shard error names."""
    from gan.data import eval_batches

    parts, have = [], 0
    for batch in eval_batches(shards_dir, max(n, 64), key=key, paired=paired):
        if classes:
            keep = torch.isin(batch[-1], torch.tensor(classes))
            batch = tuple(t[keep] for t in batch)
        parts.append(batch)
        have += len(batch[-1])
        if have >= n:
            break
    if not have:
        raise ValueError(f"{shards_dir} holds no samples" + (f" of classes {classes}" if classes else ""))
    return tuple(torch.cat(ts)[:n] for ts in zip(*parts))


def real_vs_fake(G, z_dim: int, num_classes: int, per_class: int, shards_dir: str | Path, device,
                 seed: int = 0, gap: int = 6, classes: list[int] | None = None,
                 class_names: list[str] | None = None) -> torch.Tensor:
    """Per class row: ``per_class`` real images (left, headed "real"), a gap, ``per_class`` generated
    ones (right, headed "generated"); rows named by class."""
    rows = _rows_of(num_classes, classes)
    real, ry = real_per_class(shards_dir, num_classes, per_class, rows)
    index = {k: i for i, k in enumerate(rows)}
    left = class_grid(real, torch.tensor([index[int(k)] for k in ry]), len(rows), per_class)
    y = torch.tensor(rows).repeat_interleave(per_class)
    fake = _run(G, _noise(len(y), z_dim, seed), y, device)
    right = class_grid(fake, torch.arange(len(rows)).repeat_interleave(per_class), len(rows), per_class)
    if left.shape[0] != right.shape[0]:  # grey reals beside RGB fakes (or back): match channels
        c = max(left.shape[0], right.shape[0])
        left, right = left.expand(c, -1, -1), right.expand(c, -1, -1)
    spacer = torch.full((left.shape[0], left.shape[1], gap), 255, dtype=torch.uint8)
    img = torch.cat([left, spacer, right], dim=2)
    w = left.shape[2]
    img = with_labels(img, cols=[(w / 2, "real"), (w + gap + right.shape[2] / 2, "generated")])
    if len(rows) > 1 and num_classes > 1 and class_names:
        top = img.shape[1] - left.shape[1]
        img = with_labels(img, rows=[(top + y, class_names[k]) for y, k in zip(cell_centres(len(rows), real.shape[2]), rows)])
    return img


def export_images(G, z_dim: int, num_classes: int, n: int, out_dir: str | Path, device, seed: int = 0,
                  batch_size: int = 256, class_names: list[str] | None = None, classes: list[int] | None = None,
                  progress: bool = False) -> Path:
    """``n`` class-balanced samples (of every class, or of those in ``classes``) as a PNG folder
    (:func:`write_png_folder`). ``progress``: a tqdm bar on stderr."""
    wanted = torch.tensor(_rows_of(num_classes, classes))
    z, y = _noise(n, z_dim, seed), wanted[torch.arange(n) % len(wanted)]

    def batches():
        with torch.no_grad():
            for start in range(0, n, batch_size):
                zs, ys = z[start:start + batch_size], y[start:start + batch_size]
                yield to_uint8(G(zs.to(device), ys.to(device)).float()), ys

    return write_png_folder(out_dir, batches(), n, class_names, progress)


def write_png_folder(out_dir: str | Path, batches, total: int, class_names: list[str] | None = None,
                     progress: bool = False) -> Path:
    """Images from ``batches`` (uint8 (N, C, H, W), labels (N,)) as individual PNGs ``out_dir/NNNNNN.png``
    (a flat folder, as torch-fidelity's CLI and clean-fid read it) plus ``out_dir/labels.csv`` (file, class
    index, name), written atomically last. Refuses a folder that already holds PNGs before ``batches`` is
    drawn from (nothing is overwritten or computed). ``progress``: a tqdm bar of ``total`` images on stderr."""
    from tqdm import tqdm

    out = Path(out_dir)
    if out.exists() and any(out.glob("*.png")):
        raise FileExistsError(f"{out} already holds PNG files; pass an empty or new folder (nothing was written)")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tqdm(total=total, desc="export", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for imgs, labels in batches:
            for img, label in zip(imgs, labels.tolist()):
                name = f"{len(rows):06d}.png"
                save_png(img, out / name)
                rows.append((name, label, class_names[label] if class_names else str(label)))
            bar.update(len(imgs))
    tmp = out / ".labels.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "class", "name"])
        w.writerows(rows)
    os.replace(tmp, out / "labels.csv")
    return out


# ---------------------------------------------------------------------------- training curves


def read_metrics_jsonl(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    return rows


def curve_panels(rows: list[dict]) -> dict[str, list[str]]:
    """Panel title -> metric names: losses, D outputs, gradient norms, throughput, each overall Eval metric."""
    names = sorted({k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
    panels = {
        "Loss": [n for n in names if n.startswith("Loss/")],
        "D output": [n for n in names if n.startswith("D/")],
        "Gradient norm": [n for n in names if n.startswith("GradNorm/")],
        "Images/s": [n for n in names if n == "Timing/img_per_s"],
    }
    for n in names:
        if n.startswith("Eval/") and n.count("/") == 1:
            panels[n] = [n]
    return {k: v for k, v in panels.items() if v}


def curves_png(metrics_jsonl: str | Path, out: str | Path, title: str = "") -> Path:
    """Training curves from a run's metrics.jsonl as one PNG (matplotlib, one panel per group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(metrics_jsonl)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: training curves are drawn from a run's metrics.jsonl")
    rows = read_metrics_jsonl(path)
    panels = curve_panels(rows)
    if not panels:
        raise ValueError(f"{path} holds no numeric metrics to draw")
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.4 * nrows), squeeze=False)
    for ax, (panel, keys) in zip(axes.flat, panels.items()):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=key, linewidth=1.2, marker="o" if len(pts) < 20 else None, markersize=3)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out

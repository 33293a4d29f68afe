"""pix2pix's pictures: input | output | target triplets as a uint8 (3, H, W) grid
(torchvision.utils.make_grid; written with ``gan.viz.save_png``)."""
from __future__ import annotations

import torch
from torchvision.utils import make_grid

from gan.viz import to_uint8


def _rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def triplet_grid(real_a: torch.Tensor, fake_b: torch.Tensor, real_b: torch.Tensor, n: int = 8) -> torch.Tensor:
    """One row per sample (the first n): input | output | target. Images in [-1, 1] or uint8; a 1-channel
    side is shown in gray beside a 3-channel one."""
    if fake_b.shape != real_b.shape or real_a.shape[0] != real_b.shape[0] or real_a.shape[-2:] != real_b.shape[-2:]:
        raise ValueError(f"input {tuple(real_a.shape)}, output {tuple(fake_b.shape)} and target "
                         f"{tuple(real_b.shape)} do not form pairs of the same size")
    n = min(n, len(real_a))
    a, f, b = (_rgb(to_uint8(t[:n])) for t in (real_a, fake_b, real_b))
    rows = torch.stack([a, f, b], dim=1).flatten(0, 1)  # a0 f0 b0 a1 f1 b1 ...
    return make_grid(rows, nrow=3, padding=2, pad_value=0)


# ---------------------------------------------------------------------------- launch/sample.py's modes


@torch.no_grad()
def sample(family, G, request, device) -> torch.Tensor:
    """launch/sample.py for pix2pix (``G``: the EMA generator, eval mode), from the held-out pairs
    (``request.shards`` or ``val.shards``, in shard order; ``--class``: only pairs of those labels):

    - ``triplets``: input | output | target rows of the first ``num`` pairs, a uint8 (3, H, W) picture;
    - ``export``: G's outputs for the first ``num`` pairs as ``request.out/NNNNNN.png`` (+ labels.csv: file,
      label, name), for other tools (e.g. torch-fidelity against the targets); returns an empty tensor.
    """
    from gan.sampling import first_samples, write_png_folder

    r = request
    shards = r.shards or family.eval_shards()
    a, b, y = first_samples(shards, r.num, r.classes, family.shards_key(shards, "--real-shards"), True)
    if r.mode == "triplets":
        return triplet_grid(a, G(a.to(device)).float().cpu(), b, n=len(a))
    if r.mode != "export":
        raise ValueError(f"pix2pix has no picture mode {r.mode!r}")
    batches = ((to_uint8(G(a[s:s + 64].to(device)).float()), y[s:s + 64]) for s in range(0, len(a), 64))
    write_png_folder(r.out, batches, len(a), r.class_names)
    return torch.zeros(0, dtype=torch.uint8)

"""gan.viz: grids as uint8 tensors and atomic PNG writing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gan.viz import class_grid, make_grid_uint8, save_png


def test_make_grid_layout_and_scaling():
    imgs = torch.full((5, 3, 4, 6), -1.0)
    imgs[4] = 1.0
    g = make_grid_uint8(imgs, nrow=2, padding=1)
    assert g.dtype == torch.uint8 and g.shape == (3, 3 * 5 + 1, 2 * 7 + 1)
    assert int(g[:, 1 + 2 * 5:1 + 2 * 5 + 4, 1:7].min()) == 255  # image 4: row 2, column 0
    assert int(g[:, 1:5, 1:7].max()) == 0
    assert torch.equal(make_grid_uint8(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), nrow=8, padding=0),
                       torch.zeros(1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError):
        make_grid_uint8(torch.zeros(0, 3, 4, 4))


def test_class_grid_rows_are_classes():
    labels = torch.tensor([2, 0, 2, 1, 2, 0])
    imgs = torch.stack([torch.full((1, 2, 2), float(i) / 10) for i in range(6)])  # image i has value i/10
    g = class_grid(imgs, labels, num_classes=4, per_class=2, padding=0)
    assert g.shape == (1, 4 * 2, 2 * 2)
    cell = lambda r, c: int(g[0, r * 2, c * 2])  # noqa: E731
    v = lambda i: int(round((i / 10 + 1) * 127.5))  # noqa: E731
    assert [cell(0, 0), cell(0, 1)] == [v(1), v(5)]  # class 0: images 1, 5
    assert [cell(1, 0), cell(1, 1)] == [v(3), 0]  # class 1: one image, then padding
    assert [cell(2, 0), cell(2, 1)] == [v(0), v(2)]  # class 2: first two of three
    assert [cell(3, 0), cell(3, 1)] == [0, 0]  # class 3: none


def test_save_png_rgb_and_gray(tmp_path):
    rgb = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    p = save_png(rgb, tmp_path / "sub" / "a.png")
    assert np.array_equal(np.asarray(Image.open(p)), rgb.permute(1, 2, 0).numpy())
    gray = torch.randint(0, 256, (1, 4, 4), dtype=torch.uint8)
    p = save_png(gray, tmp_path / "g.png")
    assert np.array_equal(np.asarray(Image.open(p)), gray[0].numpy())
    assert sorted(f.name for f in tmp_path.rglob("*")) == ["a.png", "g.png", "sub"]  # no temp files left
    with pytest.raises(ValueError):
        save_png(torch.zeros(2, 4, 4, dtype=torch.uint8), tmp_path / "bad.png")

"""launch/sample.py and gan.sampling: every mode writes a real PNG of the expected size (and a
TensorBoard image); bad input fails clearly and overwrites nothing."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ema_and_trained, load_cli, train_debug

ROOT = Path(__file__).resolve().parents[1]
PAD = 2  # gan.viz default padding


def grid_size(rows: int, cols: int, h: int = 32, w: int = 32) -> tuple[int, int]:
    """PIL (width, height) of a gan.viz grid."""
    return cols * (w + PAD) + PAD, rows * (h + PAD) + PAD


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, tiny_shards) -> Path:
    run = tmp_path_factory.mktemp("sample_run") / "run"
    train_debug(run, tiny_shards, "train.max_steps=4", "log.every=1")
    return run


@pytest.fixture
def run(sample_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(sample_run, dst)
    return dst


def sample(capsys, *args):
    rc = load_cli("sample").main([str(a) for a in args])
    return rc, capsys.readouterr()


def has_text(img: Image.Image, box: tuple[int, int, int, int]) -> bool:
    """A label margin: white with some dark (text) pixels."""
    import numpy as np

    a = np.asarray(img.convert("L").crop(box))
    return a.size > 0 and (a == 255).mean() > 0.5 and (a < 100).any()


# mode, --num, (columns, rows) of the image grid, labels left (class names), labels on top
@pytest.mark.parametrize("mode,num,cells,left,top", [
    ("grid", 3, (3, 10), True, False),
    ("interp", 5, (5, 10), True, False),
    ("classvar", 2, (10, 2), False, True),
    ("realfake", 2, None, True, True),  # two 2-column grids + a 6-pixel gap, "real" | "generated" on top
])
def test_picture_modes(run, capsys, mode, num, cells, left, top):
    rc, out = sample(capsys, "--run", run, "--mode", mode, "--num", num)
    assert rc == 0, out.err
    path = Path(out.out.strip())
    assert path == run / "samples" / f"{mode}-step-00000004.png"
    gw, gh = (2 * grid_size(10, 2)[0] + 6, grid_size(10, 2)[1]) if cells is None else grid_size(cells[1], cells[0])
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        w, h = img.size
        assert (w > gw) == left and (h > gh) == top and w >= gw and h >= gh  # the grid plus label margins
        if left:
            assert has_text(img, (0, h - gh, w - gw, h))  # class names left of the rows
        if top:
            assert has_text(img, (w - gw, 0, w, h - gh))  # class names / "real" "generated" above
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run), size_guidance={"images": 0})
    ea.Reload()
    assert [e.step for e in ea.Images(f"Sample/{mode}")] == [4]


def test_class_option_in_every_mode(run, capsys, tmp_path):
    out_png = tmp_path / "pics" / "i.png"
    rc, out = sample(capsys, "--run", run, "--mode", "interp", "--num", 4, "--class", 3, "--out", out_png,
                     "--no-tensorboard")
    assert rc == 0, out.err
    with Image.open(out_png) as img:  # one row, named on the left
        gw, gh = grid_size(1, 4)
        assert img.size[1] == gh and img.size[0] > gw and has_text(img, (0, 0, img.size[0] - gw, gh))
    rc, out = sample(capsys, "--run", run, "--mode", "grid", "--num", 4, "--class", 3, "--out", out_png)
    assert rc == 0, out.err
    with Image.open(out_png) as img:  # one class: a square 2x2 grid headed by its name
        gw, gh = grid_size(2, 2)
        assert img.size[0] == gw and img.size[1] > gh and has_text(img, (0, 0, gw, img.size[1] - gh))
    rc, out = sample(capsys, "--run", run, "--mode", "classvar", "--num", 2, "--class", 1, "--class", 4,
                     "--out", out_png)
    with Image.open(out_png) as img:
        assert rc == 0 and img.size[0] == grid_size(2, 2)[0]  # two class columns
    rc, out = sample(capsys, "--run", run, "--mode", "realfake", "--num", 2, "--class", 5, "--out", out_png)
    with Image.open(out_png) as img:
        assert rc == 0 and img.size == (2 * grid_size(1, 2)[0] + 6, img.size[1]) and img.size[1] > grid_size(1, 2)[1]
    rc, out = sample(capsys, "--run", run, "--mode", "export", "--num", 5, "--class", 7, "--out", tmp_path / "e")
    assert rc == 0, out.err
    rows = list(csv.DictReader(open(tmp_path / "e" / "labels.csv")))
    assert [r["class"] for r in rows] == ["7"] * 5 and rows[0]["name"] == "class7"
    assert "export" in out.err  # the progress bar
    for mode in ("interp", "grid", "export"):
        rc, out = sample(capsys, "--run", run, "--mode", mode, "--class", 12, "--out", tmp_path / "x")
        assert rc == 2 and "--class 12" in out.err


def test_curves(run, capsys):
    rc, out = sample(capsys, "--run", run, "--mode", "curves")
    assert rc == 0, out.err
    with Image.open(run / "samples" / "curves.png") as img:
        assert img.format == "PNG" and img.size[0] >= 500 and img.size[1] >= 300


def test_export_folder_for_other_tools(run, capsys, tmp_path):
    folder = tmp_path / "export"
    rc, out = sample(capsys, "--run", run, "--mode", "export", "--num", 23, "--out", folder)
    assert rc == 0, out.err
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 23 and pngs[0].name == "000000.png"
    with Image.open(pngs[0]) as img:
        assert img.size == (32, 32) and img.mode == "RGB"
    rows = list(csv.DictReader(open(folder / "labels.csv")))
    assert len(rows) == 23 and rows[11] == {"file": "000011.png", "class": "1", "name": "class1"}
    # torch-fidelity's own folder reader takes it as it is
    from torch_fidelity.utils import glob_samples_paths
    assert len(glob_samples_paths(str(folder), False, "png,jpg,jpeg", verbose=False)) == 23
    # a folder with PNGs already in it is refused, nothing rewritten
    before = pngs[0].read_bytes()
    rc, out = sample(capsys, "--run", run, "--mode", "export", "--num", 2, "--out", folder, "--seed", 5)
    assert rc == 2 and "already holds PNG files" in out.err and pngs[0].read_bytes() == before


def test_trained_net_pictures(run, capsys, tmp_path):
    """--net trained: the grid drawn by the checkpoint's trained G (its weights loaded by hand draw the same
    picture), in a file of its own that says so, beside the EMA's, which differs (the EMA has averaged)."""
    import numpy as np

    from gan.data import class_names
    from gan.family import SampleRequest
    from gan.viz import save_png

    for net in ("trained", "ema"):
        rc, out = sample(capsys, "--run", run, "--mode", "grid", "--num", 2, "--net", net, "--no-tensorboard")
        assert rc == 0, out.err
    trained, ema = run / "samples" / "grid-step-00000004-trained.png", run / "samples" / "grid-step-00000004.png"
    g, G = ema_and_trained(run, 4)
    request = SampleRequest("grid", 2, 0, None, "", class_names(g.cfg.data.shards, 10))
    save_png(g.family.sample(G, request, "cpu"), tmp_path / "by_hand.png")
    pixels = lambda p: np.asarray(Image.open(p))  # noqa: E731
    assert np.array_equal(pixels(trained), pixels(tmp_path / "by_hand.png"))
    assert not np.array_equal(pixels(trained), pixels(ema))


def test_bad_input(tmp_path, run, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(run / "config.yaml", empty / "config.yaml")
    rc, out = sample(capsys, "--run", empty, "--mode", "grid")
    assert rc == 2 and "no complete checkpoint" in out.err
    rc, out = sample(capsys, "--run", empty, "--mode", "curves")
    assert rc == 2 and "metrics.jsonl" in out.err
    rc, out = sample(capsys, "--run", run, "--mode", "grid", "--num", 0)
    assert rc == 2 and "--num" in out.err
    rc, out = sample(capsys, "--run", run, "--mode", "grid", "--net", "trained", "--checkpoint",
                     run / "export" / "G_ema.safetensors")
    assert rc == 2 and "--net trained reads the trained network from a checkpoint" in out.err
    assert not list((run / "samples").glob("grid-*"))
    assert sorted(p.name for p in empty.iterdir()) == ["config.yaml"]


def test_slerp_properties():
    from gan.sampling import slerp

    z0, z1 = torch.randn(64, generator=torch.Generator().manual_seed(0)), torch.randn(64)
    path = slerp(z0, z1, torch.linspace(0, 1, 5))
    # float32 sines and norms of 64-d unit-scale vectors: a few 2^-24 relative, ~1e-6 absolute
    assert torch.allclose(path[0], z0, atol=1e-5) and torch.allclose(path[-1], z1, atol=1e-5)
    # equal norms stay on the sphere
    a, b = z0 / z0.norm(), z1 / z1.norm()
    assert torch.allclose(slerp(a, b, torch.rand(7)).norm(dim=1), torch.ones(7), atol=1e-5)
    assert torch.allclose(slerp(a, a, torch.tensor([0.5]))[0], a)  # parallel: no division by zero

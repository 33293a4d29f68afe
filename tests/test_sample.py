"""launch/sample.py and gan.sampling: every mode writes a real PNG of the expected size (and a
TensorBoard image); bad input fails clearly and overwrites nothing."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import load_cli, train_debug

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


@pytest.mark.parametrize("mode,num,size", [
    ("grid", 3, grid_size(10, 3)),
    ("interp", 5, grid_size(10, 5)),
    ("classvar", 2, grid_size(2, 10)),
    ("realfake", 2, (2 * grid_size(10, 2)[0] + 6, grid_size(10, 2)[1])),
])
def test_picture_modes(run, capsys, mode, num, size):
    rc, out = sample(capsys, "--run", run, "--mode", mode, "--num", num)
    assert rc == 0, out.err
    path = Path(out.out.strip())
    assert path == run / "samples" / f"{mode}-step-00000004.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == size and img.mode == "RGB"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run), size_guidance={"images": 0})
    ea.Reload()
    assert [e.step for e in ea.Images(f"Sample/{mode}")] == [4]


def test_interp_one_class_and_out_path(run, capsys, tmp_path):
    out_png = tmp_path / "pics" / "i.png"
    rc, out = sample(capsys, "--run", run, "--mode", "interp", "--num", 4, "--class", 3, "--out", out_png,
                     "--no-tensorboard")
    assert rc == 0, out.err
    with Image.open(out_png) as img:
        assert img.size == grid_size(1, 4)
    rc, out = sample(capsys, "--run", run, "--mode", "interp", "--class", 12)
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
    assert sorted(p.name for p in empty.iterdir()) == ["config.yaml"]


def test_slerp_properties():
    from gan.sampling import slerp

    z0, z1 = torch.randn(64, generator=torch.Generator().manual_seed(0)), torch.randn(64)
    path = slerp(z0, z1, torch.linspace(0, 1, 5))
    assert torch.allclose(path[0], z0, atol=1e-5) and torch.allclose(path[-1], z1, atol=1e-5)
    # equal norms stay on the sphere
    a, b = z0 / z0.norm(), z1 / z1.norm()
    assert torch.allclose(slerp(a, b, torch.rand(7)).norm(dim=1), torch.ones(7), atol=1e-5)
    assert torch.allclose(slerp(a, a, torch.tensor([0.5]))[0], a)  # parallel: no division by zero

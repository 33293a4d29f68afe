"""Real image folders: any sizes and modes -> NxN shards (data_shards/imagefolder.py), `info`, bad input,
and the 64x64 / 128x128 recipes training a few steps on shards built that way."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, SHARED_DATA
from data_shards.__main__ import main
from gan.data import eval_batches, read_manifest

CIFAR_JPEG = SHARED_DATA / "cifar10-jpeg.tar.gz"


def run(*argv, capsys=None):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr() if capsys else None


def build(root, out, *opts, capsys=None):
    return run("build", "--source", "imagefolder", "--root", root, "--out", out, *opts, capsys=capsys)


def images_of(shards) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*eval_batches(shards, batch_size=64))
    return ((torch.cat(xs) + 1) * 127.5).round().to(torch.uint8), torch.cat(ys)


def save(path: Path, array: np.ndarray, mode: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    (im.convert(mode) if mode else im).save(path, **kw)
    return path


def noise(h, w, c=3, seed=0):
    shape = (h, w, c) if c > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def mixed_flat_folder(root: Path) -> Path:
    """Colour images of different sizes, aspect ratios and formats (RGB, RGBA, palette, JPEG, CMYK)."""
    save(root / "a.png", noise(60, 80, seed=1))
    save(root / "b.png", noise(90, 70, 4, seed=2))  # RGBA
    save(root / "c.png", noise(64, 64, seed=3), "P")
    save(root / "d.jpg", noise(100, 200, seed=4), quality=90)
    save(root / "e.jpg", noise(48, 40, seed=5), "CMYK")
    (root / "README.txt").write_text("not an image: ignored")
    return root


# ---------------------------------------------------------------------------------------------- transforms

def banded(w: int, h: int, band: int) -> np.ndarray:
    """Green image with a red band of ``band`` columns on the left and a blue one on the right."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 1] = 200
    a[:, :band] = (255, 0, 0)
    a[:, w - band:] = (0, 0, 255)
    return a


def test_center_crop_takes_the_centred_square(tmp_path, capsys):
    save(tmp_path / "src" / "wide.png", banded(80, 60, 10))  # the central 60x60 square is all green
    assert build(tmp_path / "src", tmp_path / "out", "--resolution", "60", capsys=capsys)[0] == 0
    x, _ = images_of(tmp_path / "out")
    assert x.shape == (1, 3, 60, 60)
    assert (x[0, 1] == 200).all() and (x[0, 0] == 0).all() and (x[0, 2] == 0).all()


def test_resize_keeps_everything_and_wide_letterboxes(tmp_path, capsys):
    save(tmp_path / "src" / "wide.png", banded(80, 40, 8))
    assert build(tmp_path / "src", tmp_path / "r", "--resolution", "40", "--transform", "resize",
                 "--resize-filter", "box", capsys=capsys)[0] == 0
    x, _ = images_of(tmp_path / "r")
    assert x.shape == (1, 3, 40, 40)
    assert (x[0, 0, :, 0] == 255).all() and (x[0, 2, :, -1] == 255).all()  # both bands survive, squeezed
    assert build(tmp_path / "src", tmp_path / "w", "--resolution", "40", "--transform", "center-crop-wide",
                 "--height", "20", "--resize-filter", "box", capsys=capsys)[0] == 0
    x, _ = images_of(tmp_path / "w")
    assert (x[0, :, :10] == 0).all() and (x[0, :, 30:] == 0).all()  # black bars above and below
    assert (x[0, 1, 10:30, 8:32] == 200).all() and (x[0, 0, 10:30, 0] == 255).all()  # 2:1 content, bands kept
    m = read_manifest(tmp_path / "w")
    assert m.build["transform"] == "center-crop-wide" and m.build["height"] == 20


def test_wide_needs_height(tmp_path, capsys):
    save(tmp_path / "src" / "a.png", banded(80, 40, 8))
    rc, cap = build(tmp_path / "src", tmp_path / "out", "--resolution", "32", "--transform", "center-crop-wide",
                    capsys=capsys)
    assert rc == 2 and "--height" in cap.err and "--height 24" in cap.err


# ---------------------------------------------------------------------------------------------- flat folders, modes

def test_flat_folder_of_mixed_sizes_and_formats_is_one_class(tmp_path, capsys):
    src = mixed_flat_folder(tmp_path / "photos")
    rc, cap = build(src, tmp_path / "out", "--resolution", "32", "--shard-size", "2", capsys=capsys)
    assert rc == 0, cap.err
    m = read_manifest(tmp_path / "out")
    assert m.num_classes == 1 and m.classes == ("photos",) and m.total == 5 and m.image_shape == (3, 32, 32)
    assert m.build["layout"] == "flat" and m.build["class_counts"] == [5] and m.build["resolution"] == 32
    x, y = images_of(tmp_path / "out")
    assert x.shape == (5, 3, 32, 32) and set(y.tolist()) == {0}
    assert len({img.numpy().tobytes() for img in x}) == 5
    assert run("verify", tmp_path / "out", capsys=capsys)[0] == 0
    rc, cap = run("info", tmp_path / "out", "--shards", capsys=capsys)
    assert rc == 0
    rows = dict(line.split(None, 1) if not line.startswith(("image", "size", "build")) else
                (line[:line.index("  ")], line[line.index("  "):].strip()) for line in cap.out.splitlines()
                if line.strip() and not line.startswith(("shard ", "train-")))
    assert rows["classes"].startswith("1 (unconditional") and rows["images"] == "5"
    assert rows["image shape"].startswith("3x32x32") and rows["build: transform"] == "center-crop"
    assert sum(line.startswith("train-0000") for line in cap.out.splitlines()) == 3  # one row per shard


def test_class_folders_info_counts(tmp_path, capsys):
    for k, (name, n) in enumerate([("cats", 3), ("dogs", 2)]):
        for i in range(n):
            save(tmp_path / "src" / name / f"{i}.png", noise(40 + 10 * i, 50, seed=10 * k + i))
    assert build(tmp_path / "src", tmp_path / "out", "--resolution", "32", capsys=capsys)[0] == 0
    assert read_manifest(tmp_path / "out").build["class_counts"] == [3, 2]
    rc, cap = run("info", tmp_path / "out", capsys=capsys)
    assert rc == 0 and "2: cats (3), dogs (2)" in cap.out


def test_mixed_modes_refused_then_chosen(tmp_path, capsys):
    gray = save(tmp_path / "src" / "g.png", noise(40, 40, 1))
    color = save(tmp_path / "src" / "c.png", noise(40, 40, 3))
    rc, cap = build(tmp_path / "src", tmp_path / "out", capsys=capsys)
    assert rc == 2 and str(gray) in cap.err and str(color) in cap.err and "--mode rgb" in cap.err
    assert not (tmp_path / "out").exists()
    assert build(tmp_path / "src", tmp_path / "rgb", "--mode", "rgb", capsys=capsys)[0] == 0
    x, _ = images_of(tmp_path / "rgb")
    assert x.shape == (2, 3, 40, 40)
    grey_one = [img for img in x if torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])]
    assert len(grey_one) == 1 and torch.equal(grey_one[0][0], torch.from_numpy(noise(40, 40, 1)))
    assert build(tmp_path / "src", tmp_path / "gray", "--mode", "gray", capsys=capsys)[0] == 0
    assert read_manifest(tmp_path / "gray").image_shape == (1, 40, 40)


def test_alpha_on_black_16bit_gray_and_exif_orientation(tmp_path, capsys):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255  # white, but fully transparent on the left half
    rgba[:, 4:, 3] = 255
    save(tmp_path / "a" / "x.png", rgba)
    assert build(tmp_path / "a", tmp_path / "oa", capsys=capsys)[0] == 0
    x, _ = images_of(tmp_path / "oa")
    assert (x[0, :, :, :4] == 0).all() and (x[0, :, :, 4:] == 255).all()

    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000
    Image.fromarray(deep).save(tmp_path / "g16.png")
    (tmp_path / "g").mkdir()
    (tmp_path / "g16.png").rename(tmp_path / "g" / "g16.png")
    assert Image.open(tmp_path / "g" / "g16.png").mode.startswith("I")
    assert build(tmp_path / "g", tmp_path / "og", capsys=capsys)[0] == 0
    x, _ = images_of(tmp_path / "og")
    assert x.shape == (1, 1, 8, 8)
    assert torch.equal(x[0, 0], torch.from_numpy(np.round(deep / 257.0).astype(np.uint8)))

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    save(tmp_path / "e" / "phone.jpg", noise(10, 20), exif=exif.tobytes())  # stored 20 wide, 10 high
    assert build(tmp_path / "e", tmp_path / "oe", capsys=capsys)[0] == 0
    assert read_manifest(tmp_path / "oe").image_shape == (3, 20, 10)  # displayed 10 wide, 20 high


# ---------------------------------------------------------------------------------------------- small images, subsets

def test_small_images_refuse_upscale_skip(tmp_path, capsys):
    save(tmp_path / "src" / "big1.png", noise(64, 64, seed=1))
    save(tmp_path / "src" / "big2.png", noise(80, 70, seed=2))
    tiny = save(tmp_path / "src" / "tiny.png", noise(20, 30, seed=3))
    rc, cap = build(tmp_path / "src", tmp_path / "out", "--resolution", "64", capsys=capsys)
    assert rc == 2 and str(tiny) in cap.err and "30x20" in cap.err and "64x64" in cap.err
    assert "--small upscale" in cap.err and "--small skip" in cap.err
    assert not (tmp_path / "out").exists()
    assert build(tmp_path / "src", tmp_path / "up", "--resolution", "64", "--small", "upscale", capsys=capsys)[0] == 0
    m = read_manifest(tmp_path / "up")
    assert m.total == 3 and m.build["small_images"] == 1 and m.build["skipped"] == 0
    rc, cap = build(tmp_path / "src", tmp_path / "skip", "--resolution", "64", "--small", "skip", capsys=capsys)
    assert rc == 0 and "1 image(s) smaller than 64x64: left out" in cap.err
    m = read_manifest(tmp_path / "skip")
    assert m.total == 2 and m.build["skipped"] == 1


def test_max_images_is_a_fixed_proportional_subset(tmp_path, capsys):
    for k, name in enumerate(["a", "b"]):
        for i in range(20):
            save(tmp_path / "src" / name / f"{i:02d}.png", noise(8, 8, seed=100 * k + i))
    assert build(tmp_path / "src", tmp_path / "o1", "--max-images", "10", capsys=capsys)[0] == 0
    assert build(tmp_path / "src", tmp_path / "o2", "--max-images", "10", capsys=capsys)[0] == 0
    m1, m2 = read_manifest(tmp_path / "o1"), read_manifest(tmp_path / "o2")
    assert m1.total == 10 and [s.sha256 for s in m1.shards] == [s.sha256 for s in m2.shards]
    assert min(m1.build["class_counts"]) >= 2  # both classes represented, not the first 10 files
    rc, cap = run("build", "--source", "cifar10", "--root", tmp_path, "--out", tmp_path / "o3", "--resolution", "64",
                  capsys=capsys)
    assert rc == 2 and "--resolution only work with --source imagefolder" in cap.err


# ---------------------------------------------------------------------------------------------- bad input

def test_empty_and_ambiguous_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    rc, cap = build(tmp_path / "empty", tmp_path / "o1", capsys=capsys)
    assert rc == 2 and "is empty" in cap.err and str(tmp_path / "empty") in cap.err
    loose = save(tmp_path / "both" / "stray.png", noise(8, 8))
    save(tmp_path / "both" / "cls" / "a.png", noise(8, 8))
    rc, cap = build(tmp_path / "both", tmp_path / "o2", capsys=capsys)
    assert rc == 2 and str(loose) in cap.err and "Move them into a class sub-folder" in cap.err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_unreadable_and_truncated_files_named(tmp_path, capsys):
    src = mixed_flat_folder(tmp_path / "src")
    bad = src / "zz.jpg"
    bad.write_bytes(b"not a jpeg at all")
    rc, cap = build(src, tmp_path / "o1", "--resolution", "32", capsys=capsys)
    assert rc == 2 and str(bad) in cap.err and "fix or remove the file" in cap.err
    assert not (tmp_path / "o1").exists()  # found by the header pass, before any output
    data = (src / "d.jpg").read_bytes()
    bad.write_bytes(data[:len(data) // 3])  # a valid header, pixel data cut short
    rc, cap = build(src, tmp_path / "o2", "--resolution", "32", capsys=capsys)
    assert rc == 2 and str(bad) in cap.err
    assert not (tmp_path / "o2" / "manifest.json").exists() and not list((tmp_path / "o2").glob("*.tar"))


# ---------------------------------------------------------------------------------------------- real data

@pytest.mark.skipif(not CIFAR_JPEG.is_file(), reason=f"{CIFAR_JPEG} is absent (the real CIFAR-10 JPEG copy "
                                                     f"lives in ../shared/data beside the repo)")
def test_real_cifar10_subset_upscaled_to_64(tmp_path, capsys):
    per_class, taken = 40, Counter()
    with tarfile.open(CIFAR_JPEG, "r|gz") as tf:  # streaming; the test split comes first
        for m in tf:
            parts = m.name.split("/")
            if len(parts) == 4 and parts[1] == "train":
                break
            if m.isfile() and len(parts) == 4 and parts[2] in ("cat", "ship") and taken[parts[2]] < per_class:
                tf.extract(m, tmp_path, filter="data")
                taken[parts[2]] += 1
    root = tmp_path / "cifar10-jpeg" / "test"
    rc, cap = build(root, tmp_path / "out", "--resolution", "64", capsys=capsys)
    assert rc == 2 and "--small upscale" in cap.err  # 32x32 images are smaller than 64x64
    rc, cap = build(root, tmp_path / "out", "--resolution", "64", "--small", "upscale", capsys=capsys)
    assert rc == 0, cap.err
    m = read_manifest(tmp_path / "out")
    assert m.classes == ("cat", "ship") and m.total == 80 and m.image_shape == (3, 64, 64)
    assert m.build["class_counts"] == [40, 40] and m.build["small_images"] == 80
    x, y = images_of(tmp_path / "out")
    first = sorted((root / "cat").iterdir())[0]  # the shard image is the JPEG upscaled with Lanczos
    want = np.asarray(Image.open(first).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS))
    hits = (x == torch.from_numpy(want.transpose(2, 0, 1).copy())).flatten(1).all(1)
    assert int(hits.sum()) == 1 and int(y[hits][0]) == 0  # label "cat"
    rc, cap = build(root, tmp_path / "sub", "--resolution", "64", "--small", "upscale", "--max-images", "30",
                    capsys=capsys)
    assert rc == 0 and read_manifest(tmp_path / "sub").total == 30
    assert min(read_manifest(tmp_path / "sub").build["class_counts"]) >= 8  # both classes, not the first 30 files


# ---------------------------------------------------------------------------------------------- recipes

TINY = ["model.g_channels=4", "model.d_channels=4", "model.shared_dim=8", "train.max_steps=2",
        "train.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8", "log.every=1", "log.sample_every=2",
        "log.samples_per_class=4", "log.progress=false", "checkpoint.every=2", "train.mixed_precision=no",
        "ema.warmup_steps=1"]


@pytest.fixture(scope="module")
def folder_shards(tmp_path_factory) -> dict[int, Path]:
    """Flat-folder shards at 64 and 128 built from mixed-size colour images (one class)."""
    d = tmp_path_factory.mktemp("recipes")
    src = d / "photos"
    for i in range(12):
        save(src / f"{i:02d}.png", noise(130 + 7 * i, 180 - 4 * i, seed=i))  # all >= 128 on both sides
    out = {}
    for res in (64, 128):
        assert main(["build", "--source", "imagefolder", "--root", str(src), "--out", str(d / f"s{res}"),
                     "--resolution", str(res)]) == 0
        out[res] = d / f"s{res}"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["images64_cdcgan", "images64_biggan", "images128_cdcgan", "images128_biggan"])
def test_recipe_trains_a_few_steps(tmp_path, folder_shards, recipe):
    res = 128 if recipe.startswith("images128") else 64
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "launch/train.py", "--config", f"configs/{recipe}.yaml", "--run-dir", str(run_dir),
           f"data.shards={folder_shards[res]}", *TINY]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    grid = Image.open(run_dir / "samples" / "step-00000002.png")
    assert grid.size == (2 * (res + 2) + 2,) * 2  # 4 samples of one class: a 2x2 grid, no class rows

"""data_shards: build -> load round trips from every source, determinism, crash safety, verify, bad input."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, SHARED_DATA, build_tiny, tiny_images
from data_shards.__main__ import main
from data_shards.sources import CIFAR10_CLASSES, FASHION_CLASSES
from gan.data import ShardError, eval_batches, read_manifest


def run(*argv, capsys=None):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr() if capsys else None
    return rc, out


def loaded_pairs(shards: Path) -> Counter:
    """Every (label, uint8 image bytes) read back through eval_batches."""
    got = Counter()
    for x, y in eval_batches(shards, batch_size=7):
        u8 = ((x + 1) * 127.5).round().to(torch.uint8)
        got.update((int(label), img.numpy().tobytes()) for img, label in zip(u8, y))
    return got


def source_pairs(images: np.ndarray, labels) -> Counter:
    return Counter((int(label), np.ascontiguousarray(img).tobytes()) for img, label in zip(images, labels))


def no_build_left(out: Path) -> None:
    """Nothing that looks complete: no manifest, no shard, no temp file."""
    if out.exists():
        assert not (out / "manifest.json").exists()
        assert not list(out.glob("*.tar")) and not list(out.glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------- sources

def write_imagefolder(root: Path, counts=(7, 5, 9), size=(16, 12), mode="RGB", seed=0):
    """PNG class folders (names deliberately not in sorted creation order); returns {class: [arrays]}."""
    rng = np.random.default_rng(seed)
    names = ["zebra", "apple", "mango"][:len(counts)]
    out = {}
    for name, n in zip(names, counts):
        d = root / name
        d.mkdir(parents=True)
        out[name] = []
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            a = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(a).save(d / f"img{i:03d}.png")
            out[name].append(a)
    (root / "zebra" / "notes.txt").write_text("not an image: ignored")
    return out


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_imagefolder_round_trip(tmp_path, capsys, encoding):
    classes = write_imagefolder(tmp_path / "src")
    rc, _ = run("build", "--source", "imagefolder", "--root", tmp_path / "src", "--out", tmp_path / "out",
                "--encoding", encoding, "--shard-size", "4", capsys=capsys)
    assert rc == 0
    m = read_manifest(tmp_path / "out")
    assert m.classes == ("apple", "mango", "zebra")  # sorted by name
    assert m.image_shape == (3, 12, 16) and m.total == 21 and len(m.shards) == 6 and m.encoding == encoding
    assert m.dataset == "src" and m.split == "train"
    want = Counter()
    for k, name in enumerate(m.classes):
        want.update((k, a.transpose(2, 0, 1).tobytes()) for a in classes[name])
    assert loaded_pairs(tmp_path / "out") == want  # every image once, with its label, pixel-exact


def test_imagefolder_grayscale_and_name(tmp_path, capsys):
    write_imagefolder(tmp_path / "gray" / "train", counts=(3, 4), size=(8, 8), mode="L")
    rc, _ = run("build", "--source", "imagefolder", "--root", tmp_path / "gray" / "train", "--out",
                tmp_path / "out", capsys=capsys)
    assert rc == 0
    m = read_manifest(tmp_path / "out")
    assert m.image_shape == (1, 8, 8) and m.dataset == "gray"  # "train" folder: named after its parent


def write_cifar_pickles(root: Path, per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    allx, ally = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(base / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
        allx[name], ally[name] = data.reshape(-1, 3, 32, 32), labels
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, f)
    return allx, ally


def test_cifar10_pickles_round_trip(tmp_path, capsys):
    xs, ys = write_cifar_pickles(tmp_path / "c10")
    for split, names in [("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])]:
        out = tmp_path / f"out-{split}"
        rc, _ = run("build", "--source", "cifar10", "--root", tmp_path / "c10", "--split", split, "--out", out,
                    "--shard-size", "3", capsys=capsys)
        assert rc == 0
        m = read_manifest(out)
        assert m.dataset == "cifar10" and m.split == split and m.classes == CIFAR10_CLASSES
        assert all(s.name.startswith(f"{split}-") for s in m.shards)
        want = Counter()
        for n in names:
            want += source_pairs(xs[n], ys[n])
        assert loaded_pairs(out) == want


def write_idx(root: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool):
    root.mkdir(parents=True, exist_ok=True)
    img = struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", *images.shape) + images.tobytes()
    lab = struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", len(labels)) + labels.astype(np.uint8).tobytes()
    for name, data in [(f"{prefix}-images-idx3-ubyte", img), (f"{prefix}-labels-idx1-ubyte", lab)]:
        if gz:
            with gzip.open(root / (name + ".gz"), "wb") as f:
                f.write(data)
        else:
            (root / name).write_bytes(data)


def test_fashion_mnist_idx_round_trip(tmp_path, capsys):
    rng = np.random.default_rng(1)
    train_x, train_y = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), rng.integers(0, 10, 30)
    test_x, test_y = rng.integers(0, 256, (11, 28, 28), dtype=np.uint8), rng.integers(0, 10, 11)
    write_idx(tmp_path / "fm", "train", train_x, train_y, gz=True)
    write_idx(tmp_path / "fm", "t10k", test_x, test_y, gz=False)  # raw idx works too
    for split, x, y in [("train", train_x, train_y), ("test", test_x, test_y)]:
        out = tmp_path / f"out-{split}"
        rc, _ = run("build", "--source", "fashion-mnist", "--root", tmp_path / "fm", "--split", split,
                    "--out", out, "--encoding", "png", "--shard-size", "8", capsys=capsys)
        assert rc == 0
        m = read_manifest(out)
        assert m.image_shape == (1, 28, 28) and m.classes == FASHION_CLASSES and m.dataset == "fashion-mnist"
        assert loaded_pairs(out) == source_pairs(x[:, None], y)


def test_mnist_in_torchvision_layout(tmp_path, capsys):
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 256, (9, 28, 28), dtype=np.uint8), rng.integers(0, 10, 9)
    write_idx(tmp_path / "root" / "MNIST" / "raw", "t10k", x, y, gz=False)
    rc, _ = run("build", "--source", "mnist", "--root", tmp_path / "root", "--split", "test", "--out",
                tmp_path / "out", capsys=capsys)
    assert rc == 0 and read_manifest(tmp_path / "out").classes == tuple("0123456789")
    assert loaded_pairs(tmp_path / "out") == source_pairs(x[:, None], y)


FASHION_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def debian_fashion_mnist() -> Path:
    """The real Fashion-MNIST idx files from Debian's package, installed if missing."""
    if not (FASHION_SYSTEM / "t10k-images-idx3-ubyte.gz").is_file():
        from debian import Unavailable, apt_install
        try:
            apt_install(("dataset-fashion-mnist",), "Debian's dataset-fashion-mnist")
        except Unavailable as e:
            pytest.skip(str(e))
    return FASHION_SYSTEM


@pytest.mark.slow
def test_real_fashion_mnist_from_debian_package(tmp_path, capsys, debian_fashion_mnist):
    rc, _ = run("build", "--source", "fashion-mnist", "--root", FASHION_SYSTEM, "--split", "test", "--out",
                tmp_path / "fm", capsys=capsys)
    assert rc == 0
    m = read_manifest(tmp_path / "fm")
    assert m.total == 10000 and m.image_shape == (1, 28, 28)
    counts = Counter(int(v) for _, y in eval_batches(tmp_path / "fm", 1000) for v in y)
    assert counts == {k: 1000 for k in range(10)}
    assert run("verify", tmp_path / "fm", capsys=capsys)[0] == 0


CIFAR_JPEG = SHARED_DATA / "cifar10-jpeg.tar.gz"


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_JPEG.is_file(),
                    reason=f"{CIFAR_JPEG} is absent (the real CIFAR-10 JPEG copy lives in ../shared/data beside "
                           f"the repo on the project's machines)")
def test_real_cifar10_jpeg_test_split(tmp_path, capsys):
    with tarfile.open(CIFAR_JPEG, "r|gz") as tf:  # one streaming pass, test split only
        for m in tf:
            if m.name.startswith("cifar10-jpeg/test/"):
                tf.extract(m, tmp_path, filter="data")
    rc, _ = run("build", "--source", "imagefolder", "--root", tmp_path / "cifar10-jpeg" / "test", "--name",
                "cifar10", "--split", "test", "--out", tmp_path / "shards", capsys=capsys)
    assert rc == 0
    m = read_manifest(tmp_path / "shards")
    assert m.classes == CIFAR10_CLASSES and m.total == 10000 and m.image_shape == (3, 32, 32)
    assert len(m.shards) == 10 and m.dataset == "cifar10"
    # one image against a direct decode of its JPEG: class "cat" is label 3
    cat = sorted((tmp_path / "cifar10-jpeg" / "test" / "cat").iterdir())[0]
    want = torch.from_numpy(np.asarray(Image.open(cat).convert("RGB")).transpose(2, 0, 1).copy())
    counts, found = Counter(), 0
    for x, y in eval_batches(tmp_path / "shards", 1000):
        counts.update(y.tolist())
        hits = (((x + 1) * 127.5).round().to(torch.uint8) == want).flatten(1).all(1)
        found += int(hits.sum())
        assert all(int(v) == 3 for v in y[hits])
    assert counts == {k: 1000 for k in range(10)}  # labels from the canonical folder order
    assert found >= 1
    assert run("verify", tmp_path / "shards", capsys=capsys)[0] == 0


# ---------------------------------------------------------------------------------------------- format

def test_byte_identical_rebuild_and_keys(tmp_path):
    a = build_tiny(tmp_path / "a", 50, 3, 8, 16, "t", encoding="png")
    b = build_tiny(tmp_path / "b", 50, 3, 8, 16, "t", encoding="png")
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and "manifest.json" in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    umask = os.umask(0)
    os.umask(umask)
    assert (a / "manifest.json").stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any new file
    build_tiny(a, 50, 3, 8, 16, "t", encoding="png")  # rebuilt in place: still the same bytes
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in files)
    with tarfile.open(a / "train-000000.tar") as tf:
        infos = tf.getmembers()
    assert all(i.mtime == 0 and i.uid == 0 and i.uname == "" for i in infos)
    keys = {i.name.split(".", 1)[0] for i in infos}
    assert all("." not in k and k.isdigit() for k in keys)
    classes_in_first_shard = {int(tarfile.open(a / "train-000000.tar").extractfile(i).read())
                              for i in infos if i.name.endswith(".cls")}
    assert len(classes_in_first_shard) > 5  # shards mix classes (fixed shuffle), not class-sorted


def test_manifest_matches_contract(tiny_shards):
    raw = json.loads((tiny_shards / "manifest.json").read_text())
    assert set(raw) == {"format", "dataset", "split", "classes", "image_shape", "encoding", "build", "shards", "total"}
    assert raw["format"] == 1 and raw["image_shape"] == [3, 32, 32] and raw["total"] == 240
    assert raw["build"] == {"class_counts": [24] * 10}  # optional; readers ignore it
    for s in raw["shards"]:
        assert set(s) == {"name", "count", "sha256"}
        assert hashlib.sha256((tiny_shards / s["name"]).read_bytes()).hexdigest() == s["sha256"]


def test_manifest_check_names_mismatch_and_fix(tiny_shards):
    m = read_manifest(tiny_shards)
    m.check(dataset="tiny10", channels=3, size=32, num_classes=10)
    m.check(dataset="")  # accepts any
    for kwargs, words in [({"dataset": "cifar10"}, ["tiny10", "cifar10", "data.dataset"]),
                          ({"channels": 1}, ["model.img_channels=3"]),
                          ({"size": 64}, ["32x32", "model.img_size"]),
                          ({"num_classes": 7}, ["10 classes", "model.num_classes=10"])]:
        with pytest.raises(ShardError) as e:
            m.check(**kwargs)
        assert str(tiny_shards) in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


# ---------------------------------------------------------------------------------------------- crash safety

def test_failed_rebuild_keeps_previous_set(tmp_path, capsys):
    write_imagefolder(tmp_path / "src")
    out = tmp_path / "out"
    assert run("build", "--source", "imagefolder", "--root", tmp_path / "src", "--out", out, capsys=capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "src" / "mango" / "img002.png"
    bad.write_bytes(bad.read_bytes()[:60])  # valid header, truncated pixel data: fails only when decoded
    rc, cap = run("build", "--source", "imagefolder", "--root", tmp_path / "src", "--out", out, capsys=capsys)
    assert rc == 2 and str(bad) in cap.err and "fix or remove" in cap.err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old set intact, no temp files
    read_manifest(out)


def test_crash_while_swapping_in_leaves_no_manifest(tmp_path, monkeypatch):
    out = build_tiny(tmp_path / "out", 40, 3, 8, 10, "t")
    import data_shards.writer as writer

    real_replace, calls = os.replace, []

    def crashing_replace(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt  # "power cut" after the first new shard was renamed into place
        return real_replace(a, b)

    monkeypatch.setattr(writer.os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        build_tiny(out, 60, 3, 8, 10, "t")  # a different set over the old one
    assert not (out / "manifest.json").exists()
    with pytest.raises(ShardError, match="no manifest.json"):
        read_manifest(out)


def test_interrupted_build_writes_nothing(tmp_path):
    from data_shards import array_source, build_shards

    imgs, labels = tiny_images(30, 3, 8)
    src = array_source("t", [str(k) for k in range(10)], imgs, labels)
    load = src.load

    def dying_load(i):
        if i == 17:
            raise KeyboardInterrupt
        return load(i)

    src.load = dying_load
    with pytest.raises(KeyboardInterrupt):
        build_shards(src, tmp_path / "out", "train", "t", shard_size=4, log=None)
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------------------------------------- verify

@pytest.fixture
def png_shards(tmp_path):
    return build_tiny(tmp_path / "shards", 40, 3, 8, 10, "t", encoding="png")


def rewrite_manifest_sha(shards: Path, name: str) -> None:
    path = shards / "manifest.json"
    raw = json.loads(path.read_text())
    for s in raw["shards"]:
        if s["name"] == name:
            s["sha256"] = hashlib.sha256((shards / name).read_bytes()).hexdigest()
    path.write_text(json.dumps(raw))


def test_verify_ok_one_line(png_shards, capsys):
    rc, cap = run("verify", png_shards, capsys=capsys)
    assert rc == 0 and cap.out.count("\n") == 1 and cap.out.startswith("OK ")
    assert "4 shards, 40 samples" in cap.out


def test_verify_checksum_mismatch(png_shards, capsys):
    p = png_shards / "train-000002.tar"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF  # in the zero padding at the end: the tar still reads, only the hash differs
    p.write_bytes(bytes(data))
    rc, cap = run("verify", png_shards, capsys=capsys)
    assert rc == 1
    assert "train-000002.tar: checksum mismatch" in cap.err and "train-000001" not in cap.err


def test_verify_truncated_tar(png_shards, capsys):
    p = png_shards / "train-000001.tar"
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 3])
    rc, cap = run("verify", png_shards, capsys=capsys)
    assert rc == 1
    assert "train-000001.tar: truncated" in cap.err and "train-000000" not in cap.err
    rewrite_manifest_sha(png_shards, "train-000001.tar")  # even with a matching hash
    rc, cap = run("verify", png_shards, capsys=capsys)
    assert rc == 1 and "train-000001.tar: truncated" in cap.err and "checksum" not in cap.err


def test_verify_undecodable_sample(png_shards, capsys):
    p = png_shards / "train-000003.tar"
    with tarfile.open(p) as tf:
        members = [(i.name, tf.extractfile(i).read()) for i in tf.getmembers()]
    victim = [n for n, _ in members if n.endswith(".png")][4]
    members = [(n, b"\x89PNG\r\n\x1a\n garbage" if n == victim else d) for n, d in members]
    from data_shards.writer import tar_bytes

    p.write_bytes(tar_bytes(members))
    rewrite_manifest_sha(png_shards, p.name)
    rc, cap = run("verify", png_shards, capsys=capsys)
    key = victim.split(".")[0]
    assert rc == 1 and f"train-000003.tar: sample {key} undecodable" in cap.err, cap.err
    # the training stream names it too
    with pytest.raises(ShardError, match=f"sample {key}"):
        for _ in eval_batches(png_shards, 8):
            pass


def test_verify_count_mismatch(png_shards, capsys):
    path = png_shards / "manifest.json"
    raw = json.loads(path.read_text())
    raw["shards"][0]["count"] += 1
    raw["total"] += 1
    path.write_text(json.dumps(raw))
    rc, cap = run("verify", png_shards, capsys=capsys)
    assert rc == 1 and "train-000000.tar: holds 10 readable samples, the manifest says 11" in cap.err


def test_verify_missing_manifest_exit_2(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    rc, cap = run("verify", tmp_path / "d", capsys=capsys)
    assert rc == 2 and str(tmp_path / "d") in cap.err and "python -m data_shards build" in cap.err


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("source", ["cifar10", "imagefolder", "fashion-mnist", "mnist"])
def test_missing_root(tmp_path, capsys, source):
    root = tmp_path / "nowhere"
    rc, cap = run("build", "--source", source, "--root", root, "--out", tmp_path / "out", capsys=capsys)
    assert rc == 2 and str(root) in cap.err and "does not exist" in cap.err
    assert not (tmp_path / "out").exists()


def test_wrong_layouts(tmp_path, capsys):
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(loose / "a.png")
    (loose / "cls").mkdir()  # loose images beside class folders: ambiguous (a flat folder alone is one class)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(loose / "cls" / "b.png")
    rc, cap = run("build", "--source", "imagefolder", "--root", loose, "--out", tmp_path / "o1", capsys=capsys)
    assert rc == 2 and str(loose / "a.png") in cap.err and "sub-folder" in cap.err
    rc, cap = run("build", "--source", "cifar10", "--root", loose, "--out", tmp_path / "o2", capsys=capsys)
    assert rc == 2 and "cifar-10-batches-py" in cap.err and "--source imagefolder" in cap.err
    rc, cap = run("build", "--source", "fashion-mnist", "--root", loose, "--out", tmp_path / "o3", capsys=capsys)
    assert rc == 2 and "train-images-idx3-ubyte" in cap.err and "/usr/share/datasets/fashion-mnist" in cap.err
    base = tmp_path / "partial" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CIFAR10_CLASSES)}))
    rc, cap = run("build", "--source", "cifar10", "--root", tmp_path / "partial", "--out", tmp_path / "o4",
                  capsys=capsys)
    assert rc == 2 and "data_batch_1" in cap.err and str(base) in cap.err
    for o in ("o1", "o2", "o3", "o4"):
        no_build_left(tmp_path / o)


def test_damaged_idx_and_pickle(tmp_path, capsys):
    (tmp_path / "fm").mkdir()
    (tmp_path / "fm" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 5)
    (tmp_path / "fm" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x00")
    rc, cap = run("build", "--source", "fashion-mnist", "--root", tmp_path / "fm", "--out", tmp_path / "o",
                  capsys=capsys)
    assert rc == 2 and "train-images-idx3-ubyte" in cap.err and "damaged" in cap.err
    write_cifar_pickles(tmp_path / "c")
    (tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    rc, cap = run("build", "--source", "cifar10", "--root", tmp_path / "c", "--out", tmp_path / "o", capsys=capsys)
    assert rc == 2 and "data_batch_3" in cap.err
    no_build_left(tmp_path / "o")


def test_empty_class_folder(tmp_path, capsys):
    write_imagefolder(tmp_path / "src")
    (tmp_path / "src" / "kiwi").mkdir()
    rc, cap = run("build", "--source", "imagefolder", "--root", tmp_path / "src", "--out", tmp_path / "out",
                  capsys=capsys)
    assert rc == 2 and str(tmp_path / "src" / "kiwi") in cap.err and "holds no images" in cap.err
    no_build_left(tmp_path / "out")


def test_unreadable_image(tmp_path, capsys):
    write_imagefolder(tmp_path / "src")
    bad = tmp_path / "src" / "apple" / "broken.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    rc, cap = run("build", "--source", "imagefolder", "--root", tmp_path / "src", "--out", tmp_path / "out",
                  capsys=capsys)
    assert rc == 2 and str(bad) in cap.err and "fix or remove the file" in cap.err
    assert not (tmp_path / "out").exists()  # caught before any output was created


def test_mixed_image_sizes(tmp_path, capsys):
    write_imagefolder(tmp_path / "src")
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "src" / "mango" / "small.png")
    rc, cap = run("build", "--source", "imagefolder", "--root", tmp_path / "src", "--out", tmp_path / "out",
                  capsys=capsys)
    assert rc == 2 and "small.png" in cap.err and "5x5" in cap.err and "resize" in cap.err


def test_output_not_writable(tmp_path, capsys):
    write_imagefolder(tmp_path / "src")
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    for out in (blocker, blocker / "shards"):
        rc, cap = run("build", "--source", "imagefolder", "--root", tmp_path / "src", "--out", out, capsys=capsys)
        assert rc == 2 and str(out) in cap.err and "--out" in cap.err
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        rc, cap = run("build", "--source", "imagefolder", "--root", tmp_path / "src", "--out", ro, capsys=capsys)
        assert rc == 2 and str(ro) in cap.err


def test_download_offline_is_clear(tmp_path, capsys, monkeypatch):
    import urllib.error

    import torchvision.datasets.cifar as tv_cifar

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    rc, cap = run("build", "--source", "cifar10", "--root", tmp_path / "dl", "--download", "--out", tmp_path / "o",
                  capsys=capsys)
    assert rc == 2 and "could not download" in cap.err and str(tmp_path / "dl") in cap.err
    assert "--source imagefolder" in cap.err and "cifar-10-batches-py" in cap.err
    no_build_left(tmp_path / "o")


# ---------------------------------------------------------------------------------------------- preview, ensure

def test_preview_grid(tiny_shards, tmp_path, capsys):
    rc, cap = run("preview", tiny_shards, "--out", tmp_path / "g.png", "--per-class", "3", capsys=capsys)
    assert rc == 0
    img = Image.open(tmp_path / "g.png")
    assert img.size == (3 * 34 + 2, 10 * 34 + 2) and img.mode == "RGB"


def write_cifar_jpeg_tarball(path: Path, per_class=2):
    rng = np.random.default_rng(3)
    with tarfile.open(path, "w:gz") as tf:
        for split in ("train", "test"):
            for cls in CIFAR10_CLASSES:
                for i in range(per_class):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
                    info = tarfile.TarInfo(f"cifar10-jpeg/{split}/{cls}/{i:04d}.jpg")
                    info.size = len(buf.getvalue())
                    tf.addfile(info, io.BytesIO(buf.getvalue()))


def test_ensure_cifar10_all_paths(tmp_path, capsys):
    out, root, tgz = tmp_path / "shards", tmp_path / "c10", tmp_path / "cifar10-jpeg.tar.gz"
    args = ("ensure-cifar10", "--out", out, "--root", root, "--shared", tgz)
    rc, cap = run(*args, capsys=capsys)  # nothing available
    assert rc == 2 and all(w in cap.err for w in (str(root / "cifar-10-batches-py"), str(tgz), "--download"))
    write_cifar_jpeg_tarball(tgz)  # from the JPEG tarball
    rc, cap = run(*args, capsys=capsys)
    assert rc == 0
    m = read_manifest(out)
    assert (m.dataset, m.split, m.total, m.classes) == ("cifar10", "train", 20, CIFAR10_CLASSES)
    assert not list(tmp_path.glob(".cifar10-jpeg-*"))  # temp extraction removed
    stamp = (out / "manifest.json").stat().st_mtime_ns
    rc, cap = run(*args, capsys=capsys)  # already there: nothing to do
    assert rc == 0 and "shards ready" in cap.err and (out / "manifest.json").stat().st_mtime_ns == stamp
    shutil.rmtree(out)
    write_cifar_pickles(root)  # torchvision's copy wins over the tarball
    rc, cap = run(*args, capsys=capsys)
    assert rc == 0 and "torchvision" in cap.err and read_manifest(out).total == 20
    other = build_tiny(tmp_path / "other", 20, 3, 32, 10, "tiny10")
    rc, cap = run("ensure-cifar10", "--out", other, "--root", root, "--shared", tgz, capsys=capsys)
    assert rc == 2 and "tiny10" in cap.err and str(other) in cap.err


def test_cli_entry_point(tiny_shards, tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_shards", "verify", str(tiny_shards)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("OK ")
    r = subprocess.run([sys.executable, "-m", "data_shards", "verify", str(tmp_path / "none")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr

"""Paired shards for image-to-image translation: `build --source paired` from aligned A|B files, two
folders and derivations (also on the shared CIFAR-10 JPEGs), verify/info/preview, the (a, b, y) streams
with one augmentation for both halves, exact resume with workers, two ranks, and every refused input."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA, ddp_data_check
from data_shards import Source, build_shards
from data_shards.__main__ import main
from data_shards.paired import edges, gray, sketch
from data_shards.sources import CIFAR10_CLASSES
from gan.config import DataConfig
from gan.data import (DeviceStream, ShardError, TrainStream, eval_batches, read_manifest, require_paired,
                      require_single)
from gan.data.augment import augment_together

CIFAR_JPEG = SHARED_DATA / "cifar10-jpeg.tar.gz"


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr()


def build(capsys, root, out, *opts):
    return run(capsys, "build", "--source", "paired", "--root", root, "--out", out, *opts)


def u8(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) * 127.5).round().to(torch.uint8)


def pairs_of(shards) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (input, target, label) of a paired shard set as uint8, through eval_batches (each sample once)."""
    a, b, y = (torch.cat(t) for t in zip(*eval_batches(shards, batch_size=7)))
    return u8(a), u8(b), y


def noise(h, w, c=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, c) if c > 1 else (h, w), dtype=np.uint8)


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def chw(hwc: np.ndarray) -> bytes:
    return np.ascontiguousarray(hwc.transpose(2, 0, 1) if hwc.ndim == 3 else hwc[None]).tobytes()


def nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------------------------- the sources

def aligned_folder(root: Path, n_per_class=4, size=12) -> dict[bytes, bytes]:
    """A|B files in two class folders: B is A with its colour channels reversed. Returns left -> right (CHW bytes)."""
    halves = {}
    for k, cls in enumerate(("day", "night")):
        for i in range(n_per_class):
            a = noise(size, size, seed=10 * k + i)
            save(root / cls / f"{i:03d}.png", np.concatenate([a, a[..., ::-1]], axis=1))
            halves[chw(a)] = chw(a[..., ::-1])
    return halves


def test_aligned_ab_files_both_directions_and_one_transform(tmp_path, capsys):
    root = tmp_path / "facades"
    halves = aligned_folder(root)
    rc, cap = build(capsys, root, tmp_path / "ab")
    assert rc == 0, cap.err
    a, b, y = pairs_of(tmp_path / "ab")
    assert a.shape == b.shape == (8, 3, 12, 12) and Counter(y.tolist()) == {0: 4, 1: 4}
    assert {x.numpy().tobytes(): t.numpy().tobytes() for x, t in zip(a, b)} == halves  # left = input, right = target

    rc, cap = build(capsys, root, tmp_path / "ba", "--direction", "BtoA")
    assert rc == 0, cap.err
    a2, b2, _ = pairs_of(tmp_path / "ba")
    assert {x.numpy().tobytes(): t.numpy().tobytes() for x, t in zip(a2, b2)} == {v: k for k, v in halves.items()}

    # --resolution: the same crop and resize for both halves (a channel swap commutes with any resize)
    rc, cap = build(capsys, root, tmp_path / "r8", "--resolution", "8", "--transform", "resize")
    assert rc == 0, cap.err
    a, b, _ = pairs_of(tmp_path / "r8")
    assert a.shape == (8, 3, 8, 8) and torch.equal(b, a.flip(1))
    m = read_manifest(tmp_path / "r8")
    assert m.paired and m.input_shape == m.image_shape == (3, 8, 8)
    assert m.build["pairs"] == "aligned A|B" and m.build["resolution"] == 8


def test_two_folders_matched_by_name_gray_input_colour_target(tmp_path, capsys):
    expected = {}
    for k, cls in enumerate(("cats", "dogs")):
        for i in range(3):
            g = noise(10, 10, c=1, seed=20 * k + i)
            rgb = np.stack([g, 255 - g, g], axis=-1)
            save(tmp_path / "A" / cls / f"img{i}.png", g)
            save(tmp_path / "B" / cls / f"img{i}.bmp", rgb)  # matched by name, whatever the extension
            expected[chw(g)] = (chw(rgb), k)
    rc, cap = build(capsys, tmp_path / "A", tmp_path / "out", "--root-b", tmp_path / "B")
    assert rc == 0, cap.err
    a, b, y = pairs_of(tmp_path / "out")
    assert a.shape == (6, 1, 10, 10) and b.shape == (6, 3, 10, 10)
    assert {x.numpy().tobytes(): (t.numpy().tobytes(), int(k)) for x, t, k in zip(a, b, y)} == expected
    m = read_manifest(tmp_path / "out")
    assert m.classes == ("cats", "dogs") and m.build["input_mode"] == "L" and m.build["mode"] == "RGB"


def test_derivations_are_deterministic_functions_of_the_target(tmp_path, capsys):
    photos = tmp_path / "photos"
    sources = set()
    for i in range(6):
        img = noise(20, 24, seed=i)
        img[:, :12] //= 4  # a strong vertical edge for edges/sketch to find
        save(photos / f"p{i}.png", img)
    save(photos / "flat.png", np.full((20, 24, 3), 128, np.uint8))
    for derive, draw in (("gray", gray), ("edges", edges), ("sketch", sketch)):
        out = tmp_path / derive
        rc, cap = build(capsys, photos, out, "--derive", derive, "--resolution", "16")
        assert rc == 0, cap.err
        a, b, y = pairs_of(out)
        assert a.shape == (7, 1, 16, 16) and b.shape == (7, 3, 16, 16) and set(y.tolist()) == {0}
        for x, t in zip(a, b):
            assert torch.equal(x, torch.tensor(draw(t.numpy())))  # the input is the derivation of the target
        sources.add(frozenset(t.numpy().tobytes() for t in b))
        flat = b.flatten(1).float().std(1) == 0
        if derive == "edges":
            assert set(a.unique().tolist()) == {0, 255} and bool((a[flat] == 255).all())  # lines on white
        if derive == "sketch":
            assert bool((a[flat] == 255).all())  # nothing to draw on a flat image
        again = tmp_path / f"{derive}-again"
        assert build(capsys, photos, again, "--derive", derive, "--resolution", "16")[0] == 0
        assert read_manifest(again).shards == read_manifest(out).shards  # byte-identical shards
    assert len(sources) == 1  # the targets are the same photos whatever the derivation
    rc, cap = build(capsys, photos, tmp_path / "rev", "--derive", "edges", "--resolution", "16",
                    "--direction", "BtoA")
    m = read_manifest(tmp_path / "rev")
    assert rc == 0 and m.input_shape == (3, 16, 16) and m.image_shape == (1, 16, 16)


def test_derive_sketch_from_the_shared_cifar10_jpegs(tmp_path, capsys):
    if not CIFAR_JPEG.is_file():
        pytest.skip(f"{CIFAR_JPEG} is absent (the shared CIFAR-10 JPEG copy, ../shared/data/README.md)")
    with tarfile.open(CIFAR_JPEG, "r:gz") as tf:  # the test split only, 20 images per class
        per_class: Counter = Counter()
        members = []
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and parts[1:2] == ["test"] and per_class[parts[2]] < 20:
                per_class[parts[2]] += 1
                members.append(m)
            if len(members) == 200:
                break
        tf.extractall(tmp_path, members=members, filter="data")
    root = tmp_path / "cifar10-jpeg" / "test"
    out = tmp_path / "sketch"
    rc, cap = build(capsys, root, out, "--derive", "sketch", "--split", "test", "--name", "cifar10-sketch")
    assert rc == 0, cap.err
    rc, cap = run(capsys, "verify", out)
    assert rc == 0 and "1x32x32 -> 3x32x32 pairs" in cap.out and "every pair decodes" in cap.out
    m = read_manifest(out)
    assert m.classes == CIFAR10_CLASSES and m.total == 200 and m.build["class_counts"] == [20] * 10
    a, b, y = pairs_of(out)
    assert Counter(y.tolist()) == {k: 20 for k in range(10)}
    for x, t in zip(a[:50], b[:50]):
        assert torch.equal(x, torch.tensor(sketch(t.numpy())))
    assert float(a.float().std()) > 10 and float((a < 200).float().mean()) > 0.01  # real strokes, not a blank page


def test_info_verify_preview_and_a_damaged_pair(tmp_path, capsys):
    aligned_folder(tmp_path / "ab")
    out = tmp_path / "s"
    assert build(capsys, tmp_path / "ab", out, "--shard-size", "3")[0] == 0
    rc, cap = run(capsys, "info", out)
    assert rc == 0 and "input shape        3x12x12" in cap.out and "pairs              8 (input, target)" in cap.out
    rc, cap = run(capsys, "preview", out, "--out", tmp_path / "p.png", "--per-class", "2")
    assert rc == 0 and Image.open(tmp_path / "p.png").size[0] > 2 * 2 * 12  # input|target side by side
    shard = out / read_manifest(out).shards[0].name
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:  # drop one target image
        for m, data in members:
            if m.name != members[2][0].name:
                tf.addfile(m, io.BytesIO(data))
    assert members[2][0].name.endswith(".target.raw")
    rc, cap = run(capsys, "verify", out)
    assert rc == 1 and "expected ['cls', 'input.raw', 'target.raw']" in cap.err


# ---------------------------------------------------------------------------------------------- the streams

def pair_source(inputs: np.ndarray, targets: np.ndarray, labels, classes=("c0", "c1", "c2")) -> Source:
    return Source("pairs", tuple(classes), tuple(targets.shape[1:]), np.asarray(labels, np.int64),
                  load=lambda i: (inputs[i], targets[i]), describe=str, input_shape=tuple(inputs.shape[1:]))


def inverted_pairs(out: Path, n=48, size=8, shard_size=10) -> Path:
    """Pairs (x, 255 - x) of distinct noise images, 3 classes."""
    x = np.random.default_rng(1).integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    build_shards(pair_source(x, 255 - x, np.arange(n) % 3), out, "train", "inv", shard_size=shard_size, log=None)
    return out


def cfg(shards, **kw) -> DataConfig:
    return DataConfig(shards=str(shards), **{"num_workers": 2, "shuffle_buffer": 8, **kw})


def take(stream, k):
    it = iter(stream)
    return [next(it) for _ in range(k)]


@pytest.mark.parametrize("on_device", [False, True])
def test_one_augmentation_for_both_halves_with_workers(tmp_path, on_device):
    shards = inverted_pairs(tmp_path / "inv")
    stored = {bytes(a.numpy().tobytes()) for a in pairs_of(shards)[0]}
    c = cfg(shards, hflip=True, translate=0.25, on_device=on_device)
    stream = DeviceStream(c, batch_size=8, seed=4) if on_device else TrainStream(c, batch_size=8, seed=4)
    moved = 0
    for a, b, y in take(stream, 12):
        assert a.shape == b.shape == (8, 3, 8, 8) and y.dtype == torch.int64
        assert torch.equal(u8(a).int() + u8(b).int(), torch.full_like(a, 255, dtype=torch.int32))  # still x, 255 - x
        moved += sum(x.numpy().tobytes() not in stored for x in u8(a))
    assert moved > 48  # flips and shifts really happened (the stored images are the un-augmented ones)

    # identical halves stay identical under colour jitter too, and a 1-channel input keeps its 3-channel twin
    x = np.random.default_rng(2).integers(0, 256, (32, 1, 8, 8), dtype=np.uint8)
    build_shards(pair_source(x, np.repeat(x, 3, axis=1), np.arange(32) % 3), tmp_path / "twin", "train", "twin",
                 shard_size=8, log=None)
    c = cfg(tmp_path / "twin", hflip=True, translate=0.25, color_jitter=0.0, on_device=on_device)
    stream = DeviceStream(c, batch_size=8) if on_device else TrainStream(c, batch_size=8)
    for a, b, _ in take(stream, 6):
        assert a.shape == (8, 1, 8, 8) and torch.equal(a.expand(-1, 3, -1, -1), b)
    g = torch.Generator().manual_seed(0)
    t = torch.from_numpy(x[:8].repeat(3, axis=1))
    a, b = augment_together((t, t.clone()), g, hflip=True, color_jitter_strength=0.5, translate_fraction=0.2)
    assert torch.equal(a, b) and not torch.equal(a, t)


def test_exact_resume_of_a_paired_stream_with_workers(tmp_path):
    shards = inverted_pairs(tmp_path / "inv")
    c = cfg(shards, translate=0.125, color_jitter=0.3)
    straight = take(TrainStream(c, batch_size=8, seed=7, rank=1, world_size=2), 7)  # 3 batches per epoch
    first = TrainStream(c, batch_size=8, seed=7, rank=1, world_size=2)
    head = take(first, 4)
    state = json.loads(json.dumps(first.state_dict()))
    assert state == {"epoch": 1, "batch": 1}
    resumed = TrainStream(c, batch_size=8, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(state)
    got = head + take(resumed, 3)
    assert all(len(s) == len(g) == 3 and all(torch.equal(u, v) for u, v in zip(s, g)) for s, g in zip(straight, got))


def test_two_ranks_each_get_their_own_intact_pairs(tmp_path):
    shards = inverted_pairs(tmp_path / "inv", n=150, shard_size=50)
    a, b, _ = pairs_of(shards)
    h = lambda t: hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]  # noqa: E731
    sample_of = {}
    for i, (x, t) in enumerate(zip(a, b)):  # ddp_data_check streams with hflip on: either way round is a sample
        sample_of[(h(x), h(t))] = sample_of[(h(x.flip(-1)), h(t.flip(-1)))] = i
    for mode in (("--workers", "1"), ("--on-device",)):
        res = ddp_data_check(shards, tmp_path, *mode)
        per_epoch = res[0]["batches_per_epoch"] * 16
        ids = [[sample_of[tuple(s)] for s in r["samples"]] for r in res]  # KeyError: a pair came apart
        assert len(ids[0]) == len(ids[1]) == 3 * per_epoch
        for e in range(3):
            mine, theirs = (set(i[e * per_epoch:(e + 1) * per_epoch]) for i in ids)
            assert mine != theirs
            if mode == ("--on-device",):  # the device stream splits every epoch's permutation by rank
                assert not mine & theirs and len(mine) == per_epoch


def test_eval_reads_every_held_out_pair_once_across_ranks_and_workers(tmp_path):
    shards = inverted_pairs(tmp_path / "inv", n=45, shard_size=10)
    seen = Counter()
    for rank in (0, 1):
        for a, b, y in eval_batches(shards, batch_size=4, rank=rank, world_size=2, num_workers=2):
            assert torch.equal(u8(a).int() + u8(b).int(), torch.full_like(a, 255, dtype=torch.int32))  # no augmentation
            seen.update(x.numpy().tobytes() for x in u8(a))
    x = np.random.default_rng(1).integers(0, 256, (45, 3, 8, 8), dtype=np.uint8)  # inverted_pairs' inputs
    assert seen == Counter(img.tobytes() for img in x)


# ---------------------------------------------------------------------------------------------- bad input

def test_halves_of_different_sizes_refused_before_any_work(tmp_path, capsys):
    save(tmp_path / "A" / "x.png", noise(8, 8))
    save(tmp_path / "B" / "x.png", noise(8, 8))
    save(tmp_path / "A" / "y.png", noise(8, 8))
    save(tmp_path / "B" / "y.png", noise(16, 8))
    out = tmp_path / "out"
    rc, cap = build(capsys, tmp_path / "A", out, "--root-b", tmp_path / "B", "--resolution", "8")
    assert rc == 2 and "1 of 2 pair(s) differ in size" in cap.err
    assert f"{tmp_path / 'A' / 'y.png'} is 8x8 but {tmp_path / 'B' / 'y.png'} is 8x16" in cap.err
    assert "resize one of each such pair" in cap.err and nothing_written(out)


def test_ab_file_not_twice_as_wide_refused(tmp_path, capsys):
    save(tmp_path / "ab" / "good.png", noise(8, 16))
    save(tmp_path / "ab" / "square.png", noise(8, 8))
    out = tmp_path / "out"
    rc, cap = build(capsys, tmp_path / "ab", out)
    assert rc == 2 and "1 of 2 file(s)" in cap.err and "not aligned A|B pairs" in cap.err
    assert f"{tmp_path / 'ab' / 'square.png'} is 8x8" in cap.err and "--root-b" in cap.err and "--derive" in cap.err
    assert nothing_written(out)


def test_unmatched_names_named(tmp_path, capsys):
    for name in ("a", "b", "c", "d", "e"):
        save(tmp_path / "A" / f"{name}.png", noise(8, 8))
    for name in ("a", "b", "z"):
        save(tmp_path / "B" / f"{name}.jpg", noise(8, 8))
    out = tmp_path / "out"
    rc, cap = build(capsys, tmp_path / "A", out, "--root-b", tmp_path / "B")
    assert rc == 2 and "do not match by file name" in cap.err
    assert f"3 only in {tmp_path / 'A'} ({tmp_path / 'A' / 'c.png'}" in cap.err
    assert f"1 only in {tmp_path / 'B'} ({tmp_path / 'B' / 'z.jpg'})" in cap.err
    assert nothing_written(out)
    save(tmp_path / "A" / "a.jpg", noise(8, 8))  # a.png and a.jpg: which one is a's pair?
    rc, cap = build(capsys, tmp_path / "A", out, "--root-b", tmp_path / "A")
    assert rc == 2 and "same name but for the extension" in cap.err and nothing_written(out)


def test_other_paired_options_refused(tmp_path, capsys):
    save(tmp_path / "g" / "x.png", noise(8, 8, c=1))
    out = tmp_path / "out"
    rc, cap = build(capsys, tmp_path / "g", out, "--derive", "gray")
    assert rc == 2 and "would pair each image with itself" in cap.err
    rc, cap = build(capsys, tmp_path / "g", out, "--derive", "edges", "--root-b", tmp_path / "g")
    assert rc == 2 and "drop --root-b" in cap.err
    rc, cap = run(capsys, "build", "--source", "imagefolder", "--root", tmp_path / "g", "--out", out,
                  "--derive", "edges")
    assert rc == 2 and "only work with --source paired" in cap.err
    assert nothing_written(out)


def test_require_paired_names_the_build_command(tmp_path, tiny_shards):
    m = read_manifest(tiny_shards)
    assert not m.paired and json.loads((tiny_shards / "manifest.json").read_text())["format"] == 1  # unchanged
    with pytest.raises(ShardError, match=r"python -m data_shards build --source paired --derive sketch\|edges\|gray "
                                         r"--root SRC --split train --out DIR") as e:
        require_paired(m)
    assert "pix2pix" in str(e.value) and "single images" in str(e.value)
    pairs = read_manifest(inverted_pairs(tmp_path / "inv"))
    assert require_paired(pairs) is pairs and require_single(m, "the GAN") is m
    with pytest.raises(ShardError, match="the GAN trains on single images"):
        require_single(pairs, "the GAN")
    raw = json.loads((pairs.dir / "manifest.json").read_text())
    assert raw["format"] == 2 and raw["paired"] is True and raw["input_shape"] == [3, 8, 8]
    del raw["input_shape"]
    (pairs.dir / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ShardError, match='format 2 needs "paired": true and "input_shape"'):
        read_manifest(pairs.dir)

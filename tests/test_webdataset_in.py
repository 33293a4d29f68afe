"""Standard webdataset shards in (``python -m data_shards build --source webdataset``), and ours read
by standard webdataset: shards written by webdataset's own ShardWriter/TarWriter and an img2dataset
layout, damaged tars, bad input, and a short training run on converted shards."""
from __future__ import annotations

import importlib.util
import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import build_tiny, tiny_images, train_debug
from data_shards.__main__ import main
from data_shards.writer import ORDER_SEED
from gan.data import ShardError, eval_batches, read_manifest


def run(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def convert(capsys, root, out, *opts) -> tuple[int, str]:
    return run(capsys, "build", "--source", "webdataset", "--root", root, "--out", out, *opts)


def encoded(img_chw: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    arr = img_chw[0] if img_chw.shape[0] == 1 else img_chw.transpose(1, 2, 0)
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def pixels(data: bytes) -> bytes:
    """What a decoder gives for an encoded image: the RGB pixels as bytes (C, H, W order)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1).tobytes()


def contents(shards) -> Counter:
    """The (label, pixels) multiset of a shard directory of ours."""
    out = Counter()
    for x, y in eval_batches(shards, batch_size=64):
        x = ((x + 1) * 127.5).round().to(torch.uint8).numpy()
        out.update((int(label), img.tobytes()) for img, label in zip(x, y.tolist()))
    return out


def shardwriter_dataset(d: Path, n: int = 60, size: int = 32, maxcount: int = 25, fmt: str = "JPEG",
                        ext: str = "jpg") -> tuple[str, Counter]:
    """``n`` jpg+cls samples written by webdataset's ShardWriter; the brace pattern of its shards and the
    (label, decoded pixels) multiset a faithful conversion must give."""
    d.mkdir(parents=True, exist_ok=True)
    imgs, labels = tiny_images(n, 3, size)
    want = Counter()
    with wds.ShardWriter(str(d / "shard-%06d.tar"), maxcount=maxcount, verbose=0) as w:
        for i, (x, y) in enumerate(zip(imgs, labels)):
            data = encoded(x, fmt)
            w.write({"__key__": f"sample{i:06d}", ext: data, "cls": int(y)})
            want[(int(y), pixels(data))] += 1
    last = (n + maxcount - 1) // maxcount - 1
    return str(d / f"shard-{{000000..{last:06d}}}.tar"), want


def assert_nothing_written(out: Path) -> None:
    """No output that looks complete: no manifest, no shard, no temp file."""
    if out.exists():
        assert not (out / "manifest.json").exists()
        assert not list(out.glob("*.tar")) and not list(out.glob(".tmp-*")), sorted(p.name for p in out.iterdir())


def members_of(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


# ---------------------------------------------------------------------------------------------- ShardWriter

def test_shardwriter_shards_convert_exactly_and_train(tmp_path, capsys):
    pattern, want = shardwriter_dataset(tmp_path / "wds")
    with pytest.raises(ShardError, match="--source webdataset"):  # training on them directly says what to do
        read_manifest(tmp_path / "wds")
    out = tmp_path / "ours"
    rc, log = convert(capsys, pattern, out, "--shard-size", "16")
    assert rc == 0, log
    assert "read shards" in log and "build wds train" in log  # the progress bars
    m = read_manifest(out)
    assert (m.image_shape, m.total, len(m.shards)) == ((3, 32, 32), 60, 4)
    assert m.classes == tuple(str(k) for k in range(10))  # no --classes: the label numbers
    assert m.build["source"] == "webdataset" and m.build["label_key"] == "cls" and m.build["shards"] == 3
    assert contents(out) == want  # every image (as a JPEG decoder gives it) with its own label
    # the directory form of --root reads the same shards
    rc, log = convert(capsys, tmp_path / "wds", tmp_path / "ours2", "--shard-size", "16")
    assert rc == 0, log
    assert [s.sha256 for s in read_manifest(tmp_path / "ours2").shards] == [s.sha256 for s in m.shards]

    run_dir = tmp_path / "run"
    train_debug(run_dir, out, "train.max_steps=2", "checkpoint.every=2", "log.sample_every=2", "log.every=1",
                env={"OMP_NUM_THREADS": "1"})
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_png_and_webp_samples_resize_with_classes_file(tmp_path, capsys):
    pattern, _ = shardwriter_dataset(tmp_path / "png", n=20, size=40, maxcount=20, fmt="PNG", ext="png")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class-{k}" for k in range(10)) + "\n")
    out = tmp_path / "out"
    rc, log = convert(capsys, pattern, out, "--resolution", "32", "--classes", names, "--encoding", "png")
    assert rc == 0, log
    m = read_manifest(out)
    assert m.image_shape == (3, 32, 32) and m.classes[3] == "class-3" and m.build["resolution"] == 32

    d = tmp_path / "webp"
    d.mkdir()
    imgs, labels = tiny_images(10, 3, 32)
    with wds.TarWriter(str(d / "a.tar")) as w:
        for i, x in enumerate(imgs):
            w.write({"__key__": f"k{i}", "webp": encoded(x, "WEBP"), "cls": int(labels[i])})
    rc, log = convert(capsys, d / "a.tar", tmp_path / "out_webp", "--label-key", "none")
    assert rc == 0, log
    m = read_manifest(tmp_path / "out_webp")
    assert m.total == 10 and m.classes == ("webp",)  # --label-key none: one class, named after the folder


# ---------------------------------------------------------------------------------------------- img2dataset

def img2dataset_layout(d: Path, n_shards: int = 2, per_shard: int = 15) -> list[dict]:
    """What img2dataset's webdataset output holds: ``{shard}.tar`` (jpg, txt, json: its metadata with
    indent 4, here with a ``label`` and a ``species`` column from --save_additional_columns),
    ``{shard}_stats.json`` and, where pyarrow is installed, ``{shard}.parquet``."""
    d.mkdir(parents=True)
    imgs, labels = tiny_images(n_shards * per_shard, 3, 32, num_classes=3)
    species = ["cat", "dog", "owl"]
    rows = []
    for s in range(n_shards):
        shard_rows = []
        with wds.TarWriter(str(d / f"{s:05d}.tar")) as w:
            for j in range(per_shard):
                i = s * per_shard + j
                meta = {"url": f"http://example.com/{i}.jpg", "caption": f"a {species[labels[i]]}",
                        "key": f"{s:05d}{j:04d}", "status": "success", "error_message": None, "width": 32,
                        "height": 32, "original_width": 64, "original_height": 64, "exif": None,
                        "sha256": "0" * 64, "label": int(labels[i]), "species": species[labels[i]]}
                w.write({"__key__": meta["key"], "jpg": encoded(imgs[i]), "txt": meta["caption"],
                         "json": json.dumps(meta, indent=4)})
                shard_rows.append(meta)
        (d / f"{s:05d}_stats.json").write_text(json.dumps(
            {"count": per_shard + 2, "successes": per_shard, "failed_to_download": 2, "failed_to_resize": 0,
             "duration": 1.5, "status_dict": {"success": per_shard, "timeout": 2}}, indent=4))
        if importlib.util.find_spec("pyarrow"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(shard_rows), d / f"{s:05d}.parquet")
        rows.extend(shard_rows)
    return rows


def test_img2dataset_layout_with_json_labels(tmp_path, capsys):
    rows = img2dataset_layout(tmp_path / "i2d")
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\nowl\n")
    rc, log = convert(capsys, tmp_path / "i2d", tmp_path / "by_label", "--label-key", "json.label",
                      "--classes", names)
    assert rc == 0, log
    m = read_manifest(tmp_path / "by_label")
    assert m.total == len(rows) == 30 and m.classes == ("cat", "dog", "owl")
    assert m.build["class_counts"] == [10, 10, 10]
    # a string field: the class names are its values (sorted); same labels as the integer field
    rc, log = convert(capsys, tmp_path / "i2d", tmp_path / "by_name", "--label-key", "json.species")
    assert rc == 0, log
    assert read_manifest(tmp_path / "by_name").classes == ("cat", "dog", "owl")
    assert contents(tmp_path / "by_name") == contents(tmp_path / "by_label")


def test_img2dataset_stats_count_catches_a_shard_cut_between_samples(tmp_path, capsys):
    d = tmp_path / "i2d"
    img2dataset_layout(d, n_shards=1, per_shard=6)
    tar = d / "00000.tar"
    cut = [m for m in members_of(tar) if m.name.startswith("000000004.")][0].offset  # sample 5 of 6 starts here
    tar.write_bytes(tar.read_bytes()[:cut])  # a tar that ends cleanly after sample 4: only the stats can tell
    rc, log = convert(capsys, d, tmp_path / "out", "--label-key", "json.label")
    assert rc == 2 and f"{tar}: holds 4 samples but 00000_stats.json says 6" in log and "--skip-bad" in log
    assert_nothing_written(tmp_path / "out")
    rc, log = convert(capsys, d, tmp_path / "out", "--label-key", "json.label", "--skip-bad")
    assert rc == 0 and "1 shard problem" in log, log
    assert read_manifest(tmp_path / "out").total == 4


# ---------------------------------------------------------------------------------------------- damage

@pytest.fixture
def one_shard(tmp_path) -> Path:
    """One ShardWriter shard of 30 jpg+cls samples (3 per class)."""
    pattern, _ = shardwriter_dataset(tmp_path / "src", n=30, maxcount=30)
    return tmp_path / "src" / "shard-000000.tar"


def test_truncated_tar_names_shard_and_member_and_skip_bad(tmp_path, capsys, one_shard):
    infos = members_of(one_shard)
    victim = next(m for m in infos if m.name == "sample000025.jpg")
    one_shard.write_bytes(one_shard.read_bytes()[:victim.offset_data + victim.size // 2])  # cut inside its data
    rc, log = convert(capsys, one_shard, tmp_path / "out")
    assert rc == 2 and f"{one_shard}: member sample000025.jpg is cut short" in log and "--skip-bad" in log, log
    assert_nothing_written(tmp_path / "out")
    rc, log = convert(capsys, one_shard, tmp_path / "out", "--skip-bad")
    assert rc == 0 and "left out 1 damaged sample(s)" in log, log
    m = read_manifest(tmp_path / "out")
    assert m.total == 25 and m.build["bad_samples_skipped"] == 1  # 0-24 are whole; 25 is cut; 26-29 are gone


def test_garbage_inside_a_tar_is_found_not_read_as_its_end(tmp_path, capsys, one_shard):
    """tarfile takes a corrupt header after the first for the end of the archive: half the samples
    would vanish without a word. The converter names the damage and, with --skip-bad, keeps reading."""
    data = bytearray(one_shard.read_bytes())
    hit = next(m for m in members_of(one_shard) if m.name == "sample000005.cls")
    data[hit.offset:hit.offset + 512] = np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes()
    one_shard.write_bytes(bytes(data))
    with tarfile.open(one_shard) as tf:
        assert len(tf.getmembers()) == 10  # what a plain reader sees: a short, "complete" archive
    rc, log = convert(capsys, one_shard, tmp_path / "out")
    assert rc == 2 and f"{one_shard}: damaged tar data at bytes" in log and "sample000004" in log, log
    assert_nothing_written(tmp_path / "out")
    rc, log = convert(capsys, one_shard, tmp_path / "out", "--skip-bad")
    assert rc == 0 and "left out 2 damaged sample(s)" in log, log
    # the damage sits between samples 4 and 5: both are left out, 6..29 are read past it
    assert read_manifest(tmp_path / "out").total == 28


def test_corrupt_image_is_named_and_skipped(tmp_path, capsys):
    d = tmp_path / "src"
    d.mkdir()
    imgs, labels = tiny_images(20, 3, 32)
    with wds.TarWriter(str(d / "a.tar")) as w:
        for i, x in enumerate(imgs):
            jpg = encoded(x)
            w.write({"__key__": f"s{i}", "jpg": jpg[:len(jpg) // 2] if i == 3 else jpg, "cls": int(labels[i])})
    shard = d / "a.tar"
    order = list(range(20))
    random.Random(ORDER_SEED).shuffle(order)
    assert order.index(3) >= 8  # with 4 per shard, two whole shards are written before the bad image
    rc, log = convert(capsys, d, tmp_path / "out", "--shard-size", "4")
    # its header reads; it fails to decode while shards are written: named, the written shards removed,
    # and no manifest (the writer commits shards and manifest only at the end)
    assert rc == 2 and f"cannot decode image {shard}:s3.jpg" in log and "--skip-bad" in log, log
    assert_nothing_written(tmp_path / "out")
    rc, log = convert(capsys, d, tmp_path / "out", "--skip-bad")
    assert rc == 0 and "left out 1 damaged sample(s)" in log and f"{shard}: member s3.jpg does not decode" in log, log
    assert read_manifest(tmp_path / "out").total == 19


def test_not_a_tar_and_compressed_shards(tmp_path, capsys, one_shard):
    bogus = one_shard.parent / "shard-000001.tar"
    bogus.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    rc, log = convert(capsys, one_shard.parent, tmp_path / "out")
    assert rc == 2 and f"{bogus}: not a tar archive" in log, log
    rc, log = convert(capsys, one_shard.parent, tmp_path / "out", "--skip-bad")
    assert rc == 0 and "1 shard problem" in log and read_manifest(tmp_path / "out").total == 30, log
    bogus.unlink()
    gz = one_shard.parent / "shard-000002.tar"
    with tarfile.open(gz, "w:gz") as tf:
        tf.add(one_shard, arcname="x.jpg")
    rc, log = convert(capsys, one_shard.parent, tmp_path / "out2", "--skip-bad")
    assert rc == 2 and "gzip-compressed" in log and "gunzip" in log, log


# ---------------------------------------------------------------------------------------------- bad input

def test_brace_pattern_matching_nothing(tmp_path, capsys, one_shard):
    rc, log = convert(capsys, tmp_path / "src" / "shard-{000100..000199}.tar", tmp_path / "out")
    assert rc == 2 and "matches nothing" in log and "none of its 100 names exists" in log, log
    rc, log = convert(capsys, tmp_path / "src" / "shard-{000000..000003}.tar", tmp_path / "out")
    assert rc == 2 and "3 of 4 shard(s) that do not exist" in log, log
    assert_nothing_written(tmp_path / "out")


def test_label_key_missing_in_some_samples_names_the_first(tmp_path, capsys):
    d = tmp_path / "src"
    d.mkdir()
    imgs, labels = tiny_images(8, 3, 32)
    with wds.TarWriter(str(d / "a.tar")) as w:
        for i, x in enumerate(imgs):
            sample = {"__key__": f"k{i}", "jpg": encoded(x), "json": json.dumps({"label": int(labels[i])})}
            if i in (5, 6):
                sample["json"] = json.dumps({"caption": "no label here"})
            w.write(sample)
    rc, log = convert(capsys, d, tmp_path / "out", "--label-key", "json.label")
    assert rc == 2 and f"sample {d / 'a.tar'}:k5 has no field label" in log and "2 sample(s) lack it" in log, log
    assert_nothing_written(tmp_path / "out")
    rc, log = convert(capsys, d, tmp_path / "out", "--label-key", "json.class")
    assert rc == 2 and "no sample's json member has the field class (the first has label)" in log, log
    assert_nothing_written(tmp_path / "out")


def test_mixed_sizes_need_resolution(tmp_path, capsys):
    d = tmp_path / "src"
    d.mkdir()
    with wds.TarWriter(str(d / "a.tar")) as w:
        for i, size in enumerate((32, 32, 48)):
            w.write({"__key__": f"k{i}", "jpg": encoded(tiny_images(1, 3, size)[0][0]), "cls": 0})
    rc, log = convert(capsys, d, tmp_path / "out")
    assert rc == 2 and "images differ in size" in log and f"{d / 'a.tar'}:k2.jpg is 48x48" in log, log
    assert "--resolution" in log
    assert_nothing_written(tmp_path / "out")
    rc, log = convert(capsys, d, tmp_path / "out", "--resolution", "32")
    assert rc == 0 and read_manifest(tmp_path / "out").image_shape == (3, 32, 32), log


def test_members_of_a_sample_must_be_consecutive(tmp_path, capsys):
    """A tar made by `tar cf` without --sort=name may interleave samples; webdataset would read each
    half as a sample of its own. The converter refuses, naming the sample and the fix."""
    imgs, _ = tiny_images(2, 3, 32)
    tar = tmp_path / "src.tar"
    with tarfile.open(tar, "w") as tf:
        for name, data in (("a.jpg", encoded(imgs[0])), ("b.jpg", encoded(imgs[1])), ("a.cls", b"0"), ("b.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    rc, log = convert(capsys, tar, tmp_path / "out")
    assert rc == 2 and f"{tar}: the members of sample a are not next to each other" in log and "--sort=name" in log
    assert_nothing_written(tmp_path / "out")


def test_labels_must_number_the_classes(tmp_path, capsys):
    pattern, _ = shardwriter_dataset(tmp_path / "src", n=10, maxcount=10)  # labels 0..9
    short = tmp_path / "five.txt"
    short.write_text("a\nb\nc\nd\ne\n")
    rc, log = convert(capsys, pattern, tmp_path / "out", "--classes", short)
    assert rc == 2 and "has label 5, outside the 5 names of --classes" in log, log
    long = tmp_path / "twelve.txt"
    long.write_text("\n".join(f"c{k}" for k in range(12)))
    rc, log = convert(capsys, pattern, tmp_path / "out", "--classes", long)
    assert rc == 2 and "2 of 12 classes have no samples (c10, c11)" in log, log
    rc, log = run(capsys, "build", "--source", "imagefolder", "--root", tmp_path, "--out", tmp_path / "o",
                  "--skip-bad")
    assert rc == 2 and "--skip-bad only work with --source webdataset" in log, log
    assert_nothing_written(tmp_path / "out")


# ---------------------------------------------------------------------------------------------- the other way

def test_standard_webdataset_reads_our_png_shards(tmp_path, capsys):
    shards = build_tiny(tmp_path / "ours", 50, 3, 32, 20, "tiny10", encoding="png")
    imgs, labels = tiny_images(50, 3, 32)
    urls = [str(p) for p in read_manifest(shards).paths]
    seen = set()
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        i = int(sample["__key__"])  # our key is the sample's index in the source
        assert np.array_equal(np.asarray(sample["png"]), imgs[i].transpose(1, 2, 0))
        assert sample["cls"] == labels[i]
        seen.add(i)
    assert seen == set(range(50))
    # and the converter reads them back unchanged
    rc, log = convert(capsys, shards, tmp_path / "back")
    assert rc == 0, log
    assert contents(tmp_path / "back") == contents(shards)

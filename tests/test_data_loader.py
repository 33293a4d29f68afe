"""gan.data: the training stream (equal batches, determinism, resume, augmentation), eval reading, errors,
and a real 2-process gloo run under torchrun."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny, ddp_data_check, tiny_images
from gan.config import DataConfig
from gan.data import ShardError, TrainStream, eval_batches, read_manifest, train_stream
from gan.data.augment import augment_batch, translate


def cfg(shards, **kw) -> DataConfig:
    kw.setdefault("num_workers", 0)
    kw.setdefault("shuffle_buffer", 32)
    return DataConfig(shards=str(shards), **kw)


def take(stream, k):
    it = iter(stream)
    return [next(it) for _ in range(k)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def source_bytes(n=240, c=3, s=32) -> dict[bytes, int]:
    imgs, labels = tiny_images(n, c, s)
    return {img.tobytes(): int(label) for img, label in zip(imgs, labels)}


def to_u8(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) * 127.5).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------- eval

@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (3, 2)])
def test_eval_each_sample_exactly_once(tiny_shards, world, workers):
    src = source_bytes()
    seen = []
    for rank in range(world):
        for x, y in eval_batches(tiny_shards, batch_size=16, rank=rank, world_size=world, num_workers=workers):
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 32, 32)
            assert float(x.min()) >= -1 and float(x.max()) <= 1
            for img, label in zip(to_u8(x), y):
                b = img.numpy().tobytes()
                assert src[b] == int(label)  # scaling only: the exact source pixels, unflipped
                seen.append(b)
    assert len(seen) == 240 and set(seen) == set(src)


def test_eval_batch_sizes(tiny_shards):
    sizes = [len(y) for _, y in eval_batches(tiny_shards, batch_size=50)]
    assert sizes == [50, 50, 50, 50, 40]


# ---------------------------------------------------------------------------------------------- train stream

def test_stream_shapes_and_equal_batches(tiny_shards):
    for world in (1, 2, 3, 7):
        streams = [TrainStream(cfg(tiny_shards), batch_size=16, seed=0, rank=r, world_size=world)
                   for r in range(world)]
        assert {s.batches_per_epoch for s in streams} == {max(1, 240 // (16 * world))}
    s = TrainStream(cfg(tiny_shards), batch_size=16, seed=0)
    assert s.manifest.total == 240 and s.manifest.image_shape == (3, 32, 32) and s.batches_per_epoch == 15
    x, y = take(s, 1)[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (16,) and y.dtype == torch.int64
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    big = TrainStream(cfg(tiny_shards), batch_size=500, seed=0)  # larger than the dataset: resampled, 1 batch
    assert big.batches_per_epoch == 1 and take(big, 2)[1][0].shape[0] == 500


def test_stream_epoch_accounting(tiny_shards):
    s = TrainStream(cfg(tiny_shards), batch_size=40, seed=0)  # 6 batches per epoch
    it = iter(s)
    for k in range(1, 14):
        next(it)
        assert s.state_dict() == {"epoch": k // 6, "batch": k % 6}


def test_stream_deterministic_and_seeded(tiny_shards):
    a = take(TrainStream(cfg(tiny_shards), batch_size=16, seed=5), 20)
    b = take(TrainStream(cfg(tiny_shards), batch_size=16, seed=5), 20)
    c = take(TrainStream(cfg(tiny_shards), batch_size=16, seed=6), 20)
    assert same(a, b) and not same(a, c)


def test_ranks_get_different_data(tiny_shards):
    r0 = take(TrainStream(cfg(tiny_shards), batch_size=16, seed=0, rank=0, world_size=2), 7)
    r1 = take(TrainStream(cfg(tiny_shards), batch_size=16, seed=0, rank=1, world_size=2), 7)
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(r0, r1))


def test_stream_serves_source_images(tiny_shards):
    src = source_bytes()
    c = cfg(tiny_shards, hflip=False)
    seen = set()
    for x, y in take(TrainStream(c, batch_size=24, seed=1), 30):
        for img, label in zip(to_u8(x), y):
            b = img.numpy().tobytes()
            assert src[b] == int(label)
            seen.add(b)
    assert len(seen) > 200  # resampling with a shuffle buffer still covers most of the data


def test_hflip_flips_about_half(tiny_shards):
    src = source_bytes()
    plain = flipped = 0
    for x, _ in take(TrainStream(cfg(tiny_shards, hflip=True), batch_size=40, seed=2), 6):
        for img in to_u8(x):
            if img.numpy().tobytes() in src:
                plain += 1
            else:
                assert img.flip(-1).numpy().tobytes() in src
                flipped += 1
    assert 70 < flipped < 170 and plain + flipped == 240


@pytest.mark.parametrize("workers,chunk_images", [(0, 256), (2, 20), (2, 40), (2, 256)])
def test_resume_is_exact(tiny_shards, workers, chunk_images, monkeypatch):
    import gan.data.stream

    monkeypatch.setattr(gan.data.stream, "CHUNK_IMAGES", chunk_images)  # 1, 2 or 3 batches per message
    c = cfg(tiny_shards, num_workers=workers, color_jitter=0.3, translate=0.125)
    k = 8  # batches_per_epoch is 6: the resume point (epoch 1, batch 2) is mid-epoch
    straight = take(TrainStream(c, batch_size=20, seed=3, rank=1, world_size=2), 2 * k)
    first = TrainStream(c, batch_size=20, seed=3, rank=1, world_size=2)
    head = take(first, k)
    state = first.state_dict()
    assert state == {"epoch": 1, "batch": 2}
    resumed = TrainStream(c, batch_size=20, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a round trip through a checkpoint
    assert same(straight, head + take(resumed, k))


def test_workers_deterministic_and_close(tiny_shards):
    import multiprocessing

    c = cfg(tiny_shards, num_workers=2)
    a = take(TrainStream(c, batch_size=16, seed=4), 18)
    assert not multiprocessing.active_children()  # the dropped iterator took its workers with it at once
    s = TrainStream(c, batch_size=16, seed=4)
    it = iter(s)
    b = [next(it) for _ in range(18)]
    assert same(a, b)
    assert len(multiprocessing.active_children()) == 2
    s.close()
    assert not multiprocessing.active_children()
    with pytest.raises(StopIteration):
        next(it)


@pytest.mark.parametrize("on_device", [False, True], ids=["shards", "on_device"])
def test_load_state_dict_validation(tiny_shards, on_device):
    """Both training streams (gan.data.train_stream: TrainStream, DeviceStream) refuse a malformed position
    and move one past the end of an epoch to the next epoch, with a warning."""
    s = train_stream(cfg(tiny_shards, on_device=on_device), batch_size=40, seed=0)
    assert type(s).__name__ == ("DeviceStream" if on_device else "TrainStream")
    for bad in ({}, {"epoch": "x", "batch": 0}, {"epoch": -1, "batch": 0}, None):
        with pytest.raises(ValueError):
            s.load_state_dict(bad)
    with pytest.warns(UserWarning, match="past the end"):
        s.load_state_dict({"epoch": 2, "batch": 6})
    assert s.state_dict() == {"epoch": 3, "batch": 0}


def test_stream_argument_errors(tiny_shards):
    with pytest.raises(ValueError, match="rank"):
        TrainStream(cfg(tiny_shards), batch_size=8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        TrainStream(cfg(tiny_shards), batch_size=0)


def test_gray_shards(tiny_shards_gray28):
    x, y = take(TrainStream(cfg(tiny_shards_gray28, translate=0.1, color_jitter=0.5), batch_size=12, seed=0), 1)[0]
    assert x.shape == (12, 1, 28, 28) and float(x.min()) >= -1 and float(x.max()) <= 1


# ---------------------------------------------------------------------------------------------- augmentation

def test_augment_is_a_function_of_the_generator():
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    kw = dict(hflip=True, color_jitter_strength=0.4, translate_fraction=0.25)
    a = augment_batch(x, torch.Generator().manual_seed(1), **kw)
    b = augment_batch(x, torch.Generator().manual_seed(1), **kw)
    c = augment_batch(x, torch.Generator().manual_seed(2), **kw)
    assert a.dtype == torch.uint8 and a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(augment_batch(x, torch.Generator(), hflip=False), x)


def test_translate_shifts_with_reflection():
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = translate(x, 0.25, torch.Generator().manual_seed(0))  # shifts in [-1, 1] per axis
    reflect = {-1: 1, 0: 0, 1: 1, 2: 2, 3: 3, 4: 2}  # index -> reflected index for size 4
    expected = {}
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            img = [[int(x[0, 0, reflect[i - dy], reflect[j - dx]]) for j in range(4)] for i in range(4)]
            expected[str(img)] = (dy, dx)
    got = {str(o[0].tolist()) for o in out}
    assert got <= set(expected) and len(got) == 9  # every shift, each a reflected copy


# ---------------------------------------------------------------------------------------------- errors

def test_missing_dir_is_clear(tmp_path):
    for d in (tmp_path / "nope", tmp_path):
        with pytest.raises(ShardError) as e:
            TrainStream(cfg(d), batch_size=8)
        assert str(d) in str(e.value) and "python -m data_shards build" in str(e.value)
    with pytest.raises(ShardError, match="is empty"):
        read_manifest(tmp_path)
    with pytest.raises(ShardError, match="does not exist"):
        eval_batches(tmp_path / "nope", 8)


@pytest.mark.parametrize("family,key,paired,split", [
    ("gan", "data.shards", False, "train"),
    ("vae", "data.shards", False, "train"),
    ("vae", "val.shards", False, "test"),
    ("pix2pix", "data.shards", True, "train"),
    ("pix2pix", "val.shards", True, "test"),
])
def test_a_missing_shard_directory_names_its_key_and_the_build_that_fits(tmp_path, tiny_shards, tiny_pairs,
                                                                        family, key, paired, split):
    """Before any work: the config key at fault, and the build command of that key's split (test for the
    held-out val.shards) and of the family's data (pairs for pix2pix). The GAN has no val.shards: its
    evaluation reads data.shards. The VAE's training reads no val.shards: its evaluation does (metrics.every)."""
    from gan.config import ConfigError, load_config
    from gan.preflight import preflight

    present = {"data.shards": str(tiny_pairs if paired else tiny_shards)}
    present["val.shards"] = present["data.shards"]
    missing = tmp_path / "no-such-shards"
    overrides = [f"family={family}", *(f"{k}={missing if k == key else v}" for k, v in present.items()
                                       if family != "gan" or k == "data.shards")]
    overrides += {"gan": [], "vae": ["metrics.every=1"],
                  "pix2pix": ["model.img_size=64", "model.in_channels=3"]}[family]
    with pytest.raises((ShardError, ConfigError)) as e:  # the evaluation's checks raise MetricError, a ConfigError
        preflight(load_config(None, overrides), tmp_path / "run", None)
    msg = str(e.value)
    assert f"shard directory {missing} ({key}) does not exist" in msg and f"point {key} at an existing" in msg
    assert f"--split {split} --out {missing}`" in msg
    assert ("--source paired --derive sketch|edges|gray" in msg) == paired, msg
    assert ("--source cifar10|imagefolder|fashion-mnist|mnist" in msg) != paired, msg


def test_dir_without_manifest_and_broken_manifest(tmp_path, tiny_shards):
    d = tmp_path / "copy"
    d.mkdir()
    for p in tiny_shards.glob("*.tar"):
        (d / p.name).write_bytes(p.read_bytes())
    with pytest.raises(ShardError, match="has no manifest.json"):
        read_manifest(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="not a valid shard manifest"):
        read_manifest(d)
    raw = json.loads((tiny_shards / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(raw))
    (d / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match="train-000001.tar"):
        read_manifest(d)


def test_dataset_mismatch(tiny_shards):
    with pytest.raises(ShardError, match="hold dataset 'tiny10', but the config expects 'cifar10'"):
        TrainStream(cfg(tiny_shards, dataset="cifar10"), batch_size=8)
    TrainStream(cfg(tiny_shards, dataset="tiny10"), batch_size=8)


def test_truncated_shard_named_by_stream(tmp_path):
    d = build_tiny(tmp_path / "s", 30, 3, 8, 10, "t")
    p = d / "train-000001.tar"
    p.write_bytes(p.read_bytes()[:3000])
    with pytest.raises(ShardError, match="train-000001.tar: truncated"):
        for _ in eval_batches(d, 8):
            pass


# ---------------------------------------------------------------------------------------------- real DDP

def test_torchrun_two_ranks_odd_shards_equal_batches(tmp_path):
    shards = build_tiny(tmp_path / "odd", 150, 3, 8, 50, "t")  # 3 shards for 2 ranks
    assert len(read_manifest(shards).shards) == 3
    res = ddp_data_check(shards, tmp_path, "--workers", "1")
    assert res[0]["batches_per_epoch"] == res[1]["batches_per_epoch"] == 150 // 32
    assert res[0]["batches"] == res[1]["batches"] == 3 * (150 // 32)
    assert res[0]["world_size"] == 2 and {r["rank"] for r in res} == {0, 1}
    assert res[0]["fingerprints"] != res[1]["fingerprints"]  # different data per rank

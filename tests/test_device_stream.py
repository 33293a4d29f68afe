"""data.on_device=true (gan/data/device.py): the TrainStream contract from a device-resident copy of the
data set: per-rank split, equal epochs, exact resume, the memory check; training with it, resumed and on
two gloo ranks. "Device" is the CPU here; the code path is the same on a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from conftest import REPO, build_tiny, ddp_data_check
from conftest import train_debug as train
from gan.config import ConfigError, DataConfig
from gan.data import DeviceStream, TrainStream, read_manifest, train_stream
from gan.data.codec import to_unit_range
from gan.data.device import check_fits, dataset_bytes, load_images
from test_shards import loaded_pairs  # every (label, image) as eval_batches reads them
from test_trainer import assert_identical, ckpt, tensors


def cfg(shards, **kw) -> DataConfig:
    return DataConfig(shards=str(shards), **{"on_device": True, "num_workers": 0, **kw})


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_factory_shapes_and_epoch_length(tiny_shards):
    s = train_stream(cfg(tiny_shards), batch_size=20, seed=0, rank=1, world_size=2, device="cpu")
    assert isinstance(s, DeviceStream) and s.images.dtype == torch.uint8 and s.images.shape == (240, 3, 32, 32)
    assert isinstance(train_stream(cfg(tiny_shards, on_device=False), batch_size=20), TrainStream)
    ref = TrainStream(cfg(tiny_shards, on_device=False), batch_size=20, rank=1, world_size=2)
    assert s.batches_per_epoch == ref.batches_per_epoch == 6
    x, y = take(s, 1)[0]
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert s.state_dict() == {"epoch": 0, "batch": 1}
    take(s, 5)  # a new iterator goes on from the stream's position
    assert s.state_dict() == {"epoch": 1, "batch": 0}  # rolls over after the last batch, like TrainStream


def test_loads_every_sample_once(tiny_shards):
    (images,), labels = load_images(read_manifest(tiny_shards))
    assert Counter((int(y), x.numpy().tobytes()) for x, y in zip(images, labels)) == loaded_pairs(tiny_shards)


def test_ranks_split_each_epoch_and_batches_are_the_indexed_images(tiny_shards):
    c = cfg(tiny_shards, hflip=False)
    r0, r1 = (DeviceStream(c, batch_size=16, seed=5, rank=r, world_size=2) for r in (0, 1))
    for epoch in (0, 1):
        i0, i1 = r0.epoch_indices(epoch), r1.epoch_indices(epoch)
        assert len(i0) == len(i1) == r0.batches_per_epoch * 16 == 112
        assert len(set(i0.tolist()) | set(i1.tolist())) == 224  # disjoint, no repeats within an epoch
    assert not torch.equal(r0.epoch_indices(0), r0.epoch_indices(1))  # a new order every epoch
    got = take(r1, r1.batches_per_epoch + 1)
    idx = r1.epoch_indices(0)
    for j, (x, y) in enumerate(got[:-1]):  # no augmentation: batch j is exactly images[idx[j*B:(j+1)*B]]
        sel = idx[j * 16:(j + 1) * 16]
        assert torch.equal(x, to_unit_range(r1.images[sel])) and torch.equal(y, r1.labels[sel])
    assert torch.equal(got[-1][0], to_unit_range(r1.images[r1.epoch_indices(1)[:16]]))


def test_epoch_longer_than_the_data_set(tiny_shards):
    s = DeviceStream(cfg(tiny_shards), batch_size=200, world_size=2)  # needs 400 of 240 samples
    assert s.batches_per_epoch == 1
    assert [x.shape[0] for x, _ in take(s, 3)] == [200, 200, 200]


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1)])
def test_resume_is_exact(tiny_shards, world, rank):
    c = cfg(tiny_shards, color_jitter=0.3, translate=0.125)
    k = 8  # 240 // (world * 20) = 12 or 6 batches per epoch: resume mid-epoch
    straight = take(DeviceStream(c, batch_size=20, seed=3, rank=rank, world_size=world), 2 * k)
    first = DeviceStream(c, batch_size=20, seed=3, rank=rank, world_size=world)
    head = take(first, k)
    state = first.state_dict()
    assert state == ({"epoch": 0, "batch": 8} if world == 1 else {"epoch": 1, "batch": 2})
    resumed = DeviceStream(c, batch_size=20, seed=3, rank=rank, world_size=world)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # through a checkpoint
    assert same(straight, head + take(resumed, k))
    assert not same(straight[:k], take(DeviceStream(c, batch_size=20, seed=4, rank=rank, world_size=world), k))


def test_too_big_for_the_device_is_refused_before_reading(tiny_shards, tmp_path):
    m = read_manifest(tiny_shards)
    assert dataset_bytes(m) == 240 * (3 * 32 * 32 + 8)
    assert check_fits(m, "cpu", 0.5, free=10**9) == dataset_bytes(m)
    with pytest.raises(ConfigError) as e:
        check_fits(m, "cuda:0", 0.5, free=1_000_000)  # 0.7 MiB of data, 0.5 of 0.95 MiB free
    msg = str(e.value)
    assert "data.on_device" in msg and "0.7 MiB" in msg and "cuda:0" in msg and "data.on_device=false" in msg
    # through launch/train.py: exit 2 from the preflight, before any model is built or file written
    r = train(tmp_path / "run", tiny_shards, "data.on_device=true", "data.on_device_budget=1e-12", check=False)
    assert r.returncode == 2 and "data.on_device" in r.stderr and "MiB" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_training_resume_bit_for_bit(tmp_path, tiny_shards):
    """N steps + resume + N steps == 2N steps straight, with the data on the device."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["data.on_device=true", "checkpoint.every=4", "data.translate=0.125", "data.color_jitter=0.2"]
    train(straight, tiny_shards, "train.max_steps=8", *common)
    train(split, tiny_shards, "train.max_steps=4", *common)
    r = train(split, tiny_shards, "train.max_steps=8", *common, resume="auto")
    assert "at step 4" in r.stdout
    assert_identical(tensors(ckpt(straight, 8)), tensors(ckpt(split, 8)))
    # and the data position is TrainStream's: 8 steps of batch 8 from 240 samples = epoch 0, batch 8
    meta = torch.load(ckpt(split, 8) / "custom_checkpoint_1.pkl", weights_only=False)
    assert meta["data"] == {"epoch": 0, "batch": 8}


def test_two_gloo_ranks_split_and_agree(tmp_path):
    shards = build_tiny(tmp_path / "odd", 150, 3, 8, 50, "t")
    res = ddp_data_check(shards, tmp_path, "--on-device")
    assert res[0]["batches_per_epoch"] == res[1]["batches_per_epoch"] == 150 // 32
    assert res[0]["batches"] == res[1]["batches"] == 3 * (150 // 32)
    assert res[0]["state"] == res[1]["state"] == {"epoch": 3, "batch": 0}
    for e in range(3):  # within every epoch the two ranks read disjoint samples
        a, b = res[0]["indices"][e], res[1]["indices"][e]
        assert len(a) == len(b) == (150 // 32) * 16 and not set(a) & set(b) and len(set(a)) == len(a)


@pytest.mark.slow
def test_two_process_training_on_device(tmp_path, tiny_shards):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "launch/train.py", "--config", "configs/debug_cpu.yaml", "--run-dir", str(run),
           f"data.shards={tiny_shards}", "data.on_device=true", "train.max_steps=4", "checkpoint.every=4"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "replica check: G, D and G_ema identical on all 2 ranks" in r.stdout
    assert json.loads((run / "status.json").read_text())["state"] == "finished"

"""Run under ``torchrun --nproc_per_node N``: each rank streams E epochs from a TrainStream and joins
an all-reduce after every batch, as DDP would. Unequal batch counts would hang (the test's timeout
fails it); at the end the ranks compare counts and write rank{r}.json for the test to check: a
fingerprint per batch and, per sample, a hash of each of its images as uint8 (one, or a pair's two)."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from gan.config import DataConfig
from gan.data import train_stream


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--on-device", action="store_true", help="data.on_device=true (DeviceStream on the CPU)")
    a = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = DataConfig(shards=a.shards, num_workers=a.workers, shuffle_buffer=16, on_device=a.on_device)
    stream = train_stream(cfg, batch_size=a.batch_size, seed=0, rank=rank, world_size=world)
    total = a.epochs * stream.batches_per_epoch
    fingerprints, samples, n = [], [], 0
    for *images, y in stream:  # (x, y), or (a, b, y) from paired shards
        step = torch.ones(1)
        dist.all_reduce(step)  # every rank must get here for every batch
        assert int(step.item()) == world
        fingerprints.append(hashlib.sha256(b"".join(x.numpy().tobytes() for x in images)).hexdigest()[:16])
        u8 = [((x + 1) * 127.5).round().to(torch.uint8) for x in images]
        samples.extend([hashlib.sha256(x[i].numpy().tobytes()).hexdigest()[:16] for x in u8] for i in range(len(y)))
        n += 1
        if n == total:
            break
    counts = [None] * world
    dist.all_gather_object(counts, (n, stream.batches_per_epoch, stream.state_dict()))
    assert len(set(map(str, counts))) == 1, f"ranks disagree: {counts}"
    Path(a.out, f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world_size": world, "batches": n, "batches_per_epoch": stream.batches_per_epoch,
         "state": stream.state_dict(), "fingerprints": fingerprints, "samples": samples, "env_rank": os.environ.get("RANK"),
         "indices": [stream.epoch_indices(e).tolist() for e in range(a.epochs)] if a.on_device else None}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

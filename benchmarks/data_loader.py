"""Images/s of the shard stream (raw and PNG shards) against torchvision's CIFAR10 + DataLoader.

Same work on both sides: random horizontal flip, scale to [-1, 1], batches of --batch-size, the same
worker count; measured side by side in one run, median of --repeats timed runs of --batches batches
each (after a warm-up batch, so worker start-up and shuffle-buffer filling are excluded).

    .venv/bin/python benchmarks/data_loader.py --workers 0,1,2

Inputs (all under the git-ignored data/, built on first use from ../shared/data/cifar10-jpeg.tar.gz):
  --cifar-root  torchvision's cifar-10-batches-py, pickled from the JPEG copy's train split (the
                official pickles are not available offline; torchvision's md5 check is skipped for them)
  --raw         raw-encoded shards (python -m data_shards ensure-cifar10 --out DIR)
  --png         PNG-encoded shards built from --cifar-root

    .venv/bin/python benchmarks/data_loader.py --message-path --batch-size 64

measures only the DataLoader message path (one worker sending ready uint8 batches, 1/2/4 per message).

    .venv/bin/python benchmarks/data_loader.py --on-device --workers 0,2 --batch-size 64 [--device cuda]

compares data.on_device=true (gan.data.DeviceStream: the uint8 set on --device, batches indexed and
augmented there) with the worker loader (TrainStream on raw shards, batches copied to --device as the
trainer does), both with flip + translation 0.125, in one run, interleaved.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import random
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def make_cifar_pickles(shared: Path, root: Path) -> Path:
    """torchvision's CIFAR-10 python layout from the JPEG copy (train split into 5 batches; test_batch)."""
    from PIL import Image

    out = root / "cifar-10-batches-py"
    if (out / "batches.meta").is_file():
        return root
    if not shared.is_file():
        sys.exit(f"error: {shared} not found; pass --shared or --cifar-root with an existing cifar-10-batches-py")
    print(f"pickling CIFAR-10 from {shared} into {out} ...", file=sys.stderr)
    per_split: dict[str, list] = {"train": [], "test": []}
    with tarfile.open(shared, "r:gz") as tf:
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4 and parts[1] in per_split and parts[2] in CLASSES:
                img = np.asarray(Image.open(tf.extractfile(m)).convert("RGB"), dtype=np.uint8)
                per_split[parts[1]].append((parts[2], parts[3], img))
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for split, items in per_split.items():
        items.sort(key=lambda t: (t[0], t[1]))
        random.Random(0).shuffle(items)
        data = np.stack([t[2].transpose(2, 0, 1).reshape(-1) for t in items])
        labels = [CLASSES.index(t[0]) for t in items]
        chunks = [("test_batch", 0, len(items))] if split == "test" else [
            (f"data_batch_{i + 1}", i * 10000, (i + 1) * 10000) for i in range(5)]
        for name, a, b in chunks:
            with open(tmp / name, "wb") as f:
                pickle.dump({"batch_label": name, "labels": labels[a:b], "data": data[a:b],
                             "filenames": [t[1] for t in items[a:b]]}, f)
    with open(tmp / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CLASSES), "num_cases_per_batch": 10000, "num_vis": 3072}, f)
    tmp.rename(out)
    return root


def ensure_shards(raw: Path, png: Path, cifar_root: Path, shared: Path) -> None:
    py = sys.executable
    if not (raw / "manifest.json").is_file():
        subprocess.run([py, "-m", "data_shards", "ensure-cifar10", "--out", str(raw), "--root", "/nonexistent",
                        "--shared", str(shared)], check=True, cwd=REPO)
    if not (png / "manifest.json").is_file():
        subprocess.run([py, "-m", "data_shards", "build", "--source", "cifar10", "--root", str(cifar_root),
                        "--split", "train", "--encoding", "png", "--out", str(png)], check=True, cwd=REPO)


def _time(it, warmup: int, batches: int, batch_size: int) -> float:
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        x, y = next(it)
        n += len(y)
    assert x.dtype == torch.float32 and x.shape[0] == batch_size
    return n / (time.perf_counter() - t)


def run_torchvision(cifar_root: Path, workers: int, batch_size: int, batches: int) -> float:
    import torchvision
    import torchvision.transforms as T

    base = torchvision.datasets.CIFAR10

    class CIFAR10Local(base):  # our pickles are not the official files: no md5 (only the md5 check changes)
        train_list = [[name, None] for name, _ in base.train_list]
        test_list = [[name, None] for name, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    tf = T.Compose([T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    ds = CIFAR10Local(str(cifar_root), train=True, transform=tf, download=False)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                                     persistent_workers=workers > 0, prefetch_factor=4 if workers else None)

    def endless():
        while True:
            yield from dl
    return _time(endless(), 1, batches, batch_size)


def run_stream(shards: Path, workers: int, batch_size: int, batches: int) -> float:
    from gan.config import DataConfig
    from gan.data import TrainStream

    cfg = DataConfig(shards=str(shards), num_workers=workers, shuffle_buffer=2000, hflip=True)
    return _time(iter(TrainStream(cfg, batch_size=batch_size, seed=0)), 1, batches, batch_size)


class _ReadyBatches(torch.utils.data.IterableDataset):
    """Message-path micro-benchmark: a worker sends ready uint8 batches (no reading, no decoding)."""

    def __init__(self, batch_size: int, per_message: int):
        self.b, self.k = batch_size, per_message

    def __iter__(self):
        x = torch.randint(0, 256, (self.b * self.k, 3, 32, 32), dtype=torch.uint8)
        while True:
            yield x.clone(), [0] * (self.b * self.k)


def _identity(x):
    return x


def run_message_path(batch_size: int, per_message: int, images: int = 40000) -> float:
    """img/s through one DataLoader worker when each message carries ``per_message`` batches."""
    dl = torch.utils.data.DataLoader(_ReadyBatches(batch_size, per_message), batch_size=None, num_workers=1,
                                     collate_fn=_identity, prefetch_factor=4)
    it = iter(dl)
    next(it)
    n, t = 0, time.perf_counter()
    while n < images:
        x, labels = next(it)
        for i in range(per_message):
            xb = x[i * batch_size:(i + 1) * batch_size].to(torch.float32).mul_(2 / 255).sub_(1)
            torch.tensor(labels[i * batch_size:(i + 1) * batch_size])
            n += len(xb)
    return n / (time.perf_counter() - t)


def _time_on(it, device: torch.device, warmup: int, batches: int, batch_size: int) -> float:
    """img/s of batches that end up on ``device`` (copied there if they come from the CPU)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(warmup):
        x, y = next(it)
        x.to(device, non_blocking=True)
    sync()
    t = time.perf_counter()
    for _ in range(batches):
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    sync()
    assert x.device.type == device.type and x.shape[0] == batch_size
    return batches * batch_size / (time.perf_counter() - t)


def run_on_device_compare(a) -> None:
    from gan.config import DataConfig
    from gan.data import DeviceStream, TrainStream

    device = torch.device(a.device)
    subprocess.run([sys.executable, "-m", "data_shards", "ensure-cifar10", "--out", str(a.raw), "--root",
                    "/nonexistent", "--shared", str(a.shared)], check=True, cwd=REPO)
    aug = dict(hflip=True, translate=0.125)
    workers = [int(w) for w in a.workers.split(",")]
    t0 = time.perf_counter()
    dev = DeviceStream(DataConfig(shards=str(a.raw), on_device=True, **aug), batch_size=a.batch_size, device=device)
    load_s = time.perf_counter() - t0
    loaders = {"on-device (DeviceStream)": lambda: iter(dev)}
    for w in workers:
        cfg = DataConfig(shards=str(a.raw), num_workers=w, shuffle_buffer=2000, **aug)
        loaders[f"worker loader (TrainStream, {w} workers)"] = lambda cfg=cfg: iter(TrainStream(cfg, a.batch_size))
    results: dict[str, list[float]] = {k: [] for k in loaders}
    for _ in range(a.repeats):
        for name, make in loaders.items():
            it = make()
            results[name].append(_time_on(it, device, 2, a.batches, a.batch_size))
            del it
    med = {k: statistics.median(v) for k, v in results.items()}
    base = med[f"worker loader (TrainStream, {max(workers)} workers)"]
    print(f"\ndevice: {device}; {os.cpu_count()} CPU cores; torch {torch.__version__}; batch {a.batch_size}; "
          f"flip + translate 0.125; median of {a.repeats} x {a.batches} batches; on-device load: {load_s:.1f} s "
          f"for {dev.manifest.total:,} images ({dev.nbytes / 2**20:.0f} MiB)\n")
    print("| loader | img/s | vs worker loader |\n|---|---|---|")
    for name, v in med.items():
        print(f"| {name} | {v:,.0f} | {v / base:.2f}x |")
    if a.json:
        a.json.write_text(json.dumps({"device": str(device), "batch_size": a.batch_size, "runs": results,
                                      "median": med, "load_seconds": load_s}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=100, help="timed batches per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--cifar-root", type=Path, default=REPO / "data/bench/cifar10-py")
    p.add_argument("--raw", type=Path, default=REPO / "data/shards/cifar10-train")
    p.add_argument("--png", type=Path, default=REPO / "data/bench/cifar10-train-png")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--message-path", action="store_true",
                   help="only the DataLoader message-path micro-benchmark (1, 2 and 4 batches per message)")
    p.add_argument("--on-device", action="store_true",
                   help="data.on_device=true (DeviceStream) against the worker loader, batches delivered to --device")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    if a.on_device:
        torch.set_num_threads(1)
        run_on_device_compare(a)
        return
    if a.message_path:
        torch.set_num_threads(1)
        for k in (1, 2, 4):
            r = statistics.median(run_message_path(a.batch_size, k) for _ in range(a.repeats))
            print(f"batch {a.batch_size}, {k} batch(es) per message: {r:,.0f} img/s")
        return

    torch.set_num_threads(1)  # the main process only receives batches, like a GPU training process
    make_cifar_pickles(a.shared, a.cifar_root)
    ensure_shards(a.raw, a.png, a.cifar_root, a.shared)
    loaders = {
        "torchvision CIFAR10 + DataLoader": lambda w: run_torchvision(a.cifar_root, w, a.batch_size, a.batches),
        "TrainStream, raw shards": lambda w: run_stream(a.raw, w, a.batch_size, a.batches),
        "TrainStream, PNG shards": lambda w: run_stream(a.png, w, a.batch_size, a.batches),
    }
    workers = [int(w) for w in a.workers.split(",")]
    results: dict[str, dict[int, float]] = {k: {} for k in loaders}
    for w in workers:
        for r in range(a.repeats):  # interleave loaders so background load hits all of them alike
            for name, fn in loaders.items():
                results[name].setdefault(w, [])
                results[name][w].append(fn(w))
    med = {k: {w: statistics.median(v) for w, v in d.items()} for k, d in results.items()}
    base = med["torchvision CIFAR10 + DataLoader"]
    print(f"\nmachine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU; "
          f"torch {torch.__version__}; batch {a.batch_size}; median of {a.repeats} x {a.batches} batches\n")
    print("| loader | " + " | ".join(f"{w} workers" for w in workers) + " |")
    print("|---|" + "---|" * len(workers))
    for name, d in med.items():
        cells = []
        for w in workers:
            per = f", {d[w] / w:,.0f}/worker" if w else ""
            speed = f", {d[w] / base[w]:.1f}x" if name != "torchvision CIFAR10 + DataLoader" else ""
            cells.append(f"{d[w]:,.0f} img/s{per}{speed}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if a.json:
        a.json.write_text(json.dumps({"machine": f"{os.cpu_count()} cores", "batch_size": a.batch_size,
                                      "runs": results, "median": med}, indent=1))


if __name__ == "__main__":
    main()

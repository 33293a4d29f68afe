#!/usr/bin/env python
"""Train the CIFAR-10 classifier behind the offline metrics ``cls_acc`` and ``cls_fd``.

    .venv/bin/python benchmarks/train_classifier.py \
        --train-shards data/shards/cifar10-train --test-shards data/shards/cifar10-test \
        --out gan/metrics/assets/cifar10_classifier.safetensors

Recipe (ResNet-9 style, after Page's DAWNBench net, half width): widths 32/64/128/256 (1.6M
parameters, saved in fp16: ~3.3 MB), SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 512,
learning rate linear 0 -> 0.4 over the first 20% of the epochs then linear to 0, label smoothing 0.2,
augmentation random crop (reflect-pad 4) + horizontal flip, bf16 autocast on CPU (channels_last).
Input images are scaled to [-1, 1], as the generator's output is.

After every epoch the script writes ``--work/state.pt`` (resume: rerun the same command) and the
current weights to ``--out`` with the measured test-split accuracy in the file's metadata, so a run
cut short still leaves a usable, honestly labelled file. ``--threads`` (default 1) keeps a shared
machine usable.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gan.data import eval_batches, read_manifest  # noqa: E402
from gan.metrics.cache import manifest_fingerprint  # noqa: E402
from gan.metrics.classifier import ResNet9, save_classifier  # noqa: E402


def load_split(shards: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All images of a shard set as uint8 (N, C, H, W) and labels (N,), in manifest order."""
    m = read_manifest(shards)
    xs, ys = [], []
    for x, y in eval_batches(shards, 1000):
        xs.append(((x + 1) * 127.5).round_().to(torch.uint8))
        ys.append(y)
    return torch.cat(xs), torch.cat(ys), list(m.classes)


def to_input(x_uint8: torch.Tensor) -> torch.Tensor:
    return (x_uint8.float() / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after reflect padding + random horizontal flip, on a uint8 batch."""
    n, _, h, w = x.shape
    padded = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out.to(torch.uint8)


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, bf16: bool, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(to_input(x[i:i + batch]))
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def lr_at(step: float, total: float, peak: float, warm_frac: float) -> float:
    warm = warm_frac * total
    return peak * step / warm if step < warm else peak * max(0.0, (total - step) / (total - warm))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-shards", default="data/shards/cifar10-train")
    p.add_argument("--test-shards", default="data/shards/cifar10-test")
    p.add_argument("--out", default="gan/metrics/assets/cifar10_classifier.safetensors")
    p.add_argument("--work", default="runs/classifier", help="resume state + log (default: %(default)s)")
    p.add_argument("--widths", default="32,64,128,256")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.4)
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of the epochs for the LR ramp-up")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-bf16", action="store_true", help="train in fp32 (bf16 autocast is the default)")
    p.add_argument("--max-train", type=int, default=0, help="use only the first N training images (tests)")
    p.add_argument("--init", help="start from this run's --work/state.pt (a second, fine-tuning phase with its own "
                                  "schedule, e.g. --init runs/classifier/state.pt --epochs 6 --lr 0.04 --warmup 0); "
                                  "the first phase's recipe and history are kept in the file's metadata")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    bf16 = not a.no_bf16
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, classes = load_split(a.train_shards)
    if a.max_train:
        x_tr, y_tr = x_tr[:a.max_train], y_tr[:a.max_train]
    x_te, y_te, test_classes = load_split(a.test_shards)
    if test_classes != classes:
        raise SystemExit(f"error: test shards' classes {test_classes} differ from the train shards' {classes}")
    widths = tuple(int(w) for w in a.widths.split(","))
    model = ResNet9(widths, num_classes=len(classes), in_channels=x_tr.shape[1]).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, nesterov=True, weight_decay=a.weight_decay)
    gen = torch.Generator().manual_seed(a.seed)
    steps_per_epoch = (len(x_tr) + a.batch_size - 1) // a.batch_size
    total = a.epochs * steps_per_epoch
    start, history, before = 0, [], None
    if a.init:
        s0 = torch.load(a.init, map_location="cpu", weights_only=False)
        model.load_state_dict(s0["model"])
        before = {"recipe": {k: v for k, v in s0["args"].items() if k not in ("out", "work", "threads")},
                  "history": s0["history"], "init": s0.get("before")}
    state_path = work / "state.pt"
    if state_path.is_file():
        s = torch.load(state_path, map_location="cpu", weights_only=False)
        if s["args"]["widths"] == a.widths and s["args"]["epochs"] == a.epochs:
            model.load_state_dict(s["model"])
            opt.load_state_dict(s["opt"])
            gen.set_state(s["gen"])
            start, history, before = s["epoch"], s["history"], s.get("before", before)
            print(f"resumed at epoch {start}", flush=True)
    recipe = {k: v for k, v in vars(a).items() if k not in ("out", "work", "threads")}
    for epoch in range(start, a.epochs):
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * a.batch_size:(i + 1) * a.batch_size]
            x = to_input(augment(x_tr[idx], gen))
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * steps_per_epoch + i, total, a.lr, a.warmup)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x), y_tr[idx], label_smoothing=a.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
            loss_sum += float(loss.detach()) * len(idx)
        train_s = time.perf_counter() - t0
        test_acc = accuracy(model, x_te, y_te, bf16)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "test_acc": test_acc,
               "epoch_s": round(train_s, 1), "img_per_s": round(seen / train_s, 1)}
        history.append(row)
        print(json.dumps(row), flush=True)
        info = {"classes": classes, "test_accuracy": test_acc, "test_accuracy_fp32": None, "earlier_phase": before,
                "epochs_done": epoch + 1, "recipe": recipe, "train_manifest": manifest_fingerprint(a.train_shards), "history": history,
                "device": f"{platform.processor() or platform.machine()}, {a.threads} thread(s)"}
        if epoch + 1 == a.epochs:  # the metrics run the classifier in fp32: measure that too
            info["test_accuracy_fp32"] = accuracy(model, x_te, y_te, False)
        save_classifier(model, a.out, info)
        tmp = state_path.with_name("state.pt.tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                    "epoch": epoch + 1, "history": history, "args": vars(a), "before": before}, tmp)
        os.replace(tmp, state_path)
    print(json.dumps({"out": a.out, "test_accuracy": history[-1]["test_acc"] if history else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

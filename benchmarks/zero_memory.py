#!/usr/bin/env python
"""Per-rank memory of parameters + gradients + optimizer states of G and D (BigGAN recipe, two
widths) under DDP, ZeRO-1 and ZeRO-2, and the training-step time of the three on the same run.

Memory is measured from the tensors each backend really holds on a rank, after one D update and
one G update (storages counted once, whatever views share them):
- parameters: the modules' weights (DeepSpeed keeps them whole on every rank at stages 1 and 2);
- gradients: after backward, before the step: the weights' .grad plus ZeRO's own gradient partitions
  (``averaged_gradients``, ``grads_in_partition``); "grad peak": the most of those alive at once
  during backward (a hook after each weight's gradient lands), where ZeRO-1 and ZeRO-2 differ:
  ZeRO-2 frees each reduced bucket of gradients during backward. ZeRO's bucket buffers (their
  most during backward, ``reduce_bucket_size`` elements, double-buffered) are reported apart; DDP's reducer buckets are internal to torch and not counted (with
  ``gradient_as_bucket_view=False`` they add one more copy of the gradients);
- optimizer states: Adam's moments and step, plus ZeRO's fp32 master partition of the weights.
On a GPU ``torch.cuda.max_memory_allocated`` is reported too.

    python benchmarks/zero_memory.py --ranks 2,8 --widths 96,192 --json out.json   # runs torchrun itself
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKENDS = {"ddp": [], "zero1": ["train.backend=deepspeed", "deepspeed.stage=1"],
            "zero2": ["train.backend=deepspeed", "deepspeed.stage=2", "deepspeed.config=configs/deepspeed/zero2.json"]}


def nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def logical_bytes(tensors) -> int:
    """Bytes of the tensors themselves (a view into a bigger buffer counts its own elements), each once."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _flat(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _flat(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _flat(v)


def grads_of(backend, net: str) -> tuple[int, int]:
    """(gradients, ZeRO's reduction buckets) in bytes on this rank."""
    if backend.name == "ddp":
        model = backend.nets[net]
        return logical_bytes(p.grad for p in model.parameters()), 0
    engine = backend.engines[net]
    zero = engine.optimizer
    grads = [p.grad for p in engine.module.parameters()] + list(_flat(getattr(zero, "averaged_gradients", {})))
    grads += [getattr(zero, "grads_in_partition", None)]
    buckets = [b for bucket in getattr(zero, "ipg_buckets", {}).values() for b in bucket.buffer]
    return logical_bytes(grads), nbytes(buckets)


def optimizer_of(backend, net: str) -> int:
    opt = backend.optimizers[net]  # the torch Adam; under ZeRO it holds this rank's partition only
    states = list(_flat(opt.state))
    if backend.name == "deepspeed":
        states += list(_flat(backend.engines[net].optimizer.single_partition_of_fp32_groups))
    return nbytes(states)


def params_of(backend, net: str) -> int:
    model = backend.nets[net] if backend.name == "ddp" else backend.engines[net].module
    return nbytes(model.parameters())


def worker(args) -> None:
    import torch.distributed as dist
    from accelerate import Accelerator

    from gan.backends import build_backend
    from gan.config import load_config
    from gan.families.gan.losses import build_loss
    from gan.families.gan.models import build_models
    from gan.family import build_family

    acc = Accelerator(cpu=not torch.cuda.is_available())
    rows = []
    for width in args.widths:
        for repeat in range(args.repeats):
            for name, overrides in BACKENDS.items():
                cfg = load_config(ROOT / "configs/cifar10_biggan.yaml",
                                  [f"model.g_channels={width}", f"model.d_channels={width}", "train.mixed_precision=no",
                                   f"train.batch_size={args.batch_size}", *overrides])
                torch.manual_seed(0)
                G, D = build_models(cfg.model)
                backend = build_backend(cfg, acc, "no")
                family = build_family(cfg)
                nets = {"G": G.to(acc.device), "D": D.to(acc.device)}
                Gw, Dw = backend.prepare(nets, {n: family.optimizer(n) for n in nets}).values()
                loss = build_loss(cfg.loss)
                B, dev = cfg.train.batch_size, acc.device
                real = torch.randn(B, 3, 32, 32, device=dev)
                y = torch.randint(0, 10, (B,), device=dev)

                def d_loss():
                    with torch.no_grad():
                        fake = Gw(torch.randn(B, cfg.model.z_dim, device=dev), y)
                    return loss.d_loss(Dw, real, y, fake, y)[0]

                def g_loss():
                    with backend.frozen("D") as Dg:
                        return loss.g_loss(Dg, Gw(torch.randn(B, cfg.model.z_dim, device=dev), y), y)[0]

                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                mem = {"params": 0, "grads": 0, "optimizer": 0, "buckets": 0, "grads_peak": 0}
                for net, fn in (("D", d_loss), ("G", g_loss)):  # one split update each, to measure between
                    ls = fn()
                    peak = [0, 0]
                    model = backend.nets[net] if backend.name == "ddp" else backend.engines[net].module

                    def track(_p, net=net, peak=peak):  # after DeepSpeed's own hook (registered later): live gradients
                        g, b = grads_of(backend, net)
                        peak[0], peak[1] = max(peak[0], g), max(peak[1], b)
                    hooks = [p.register_post_accumulate_grad_hook(track) for p in model.parameters() if p.requires_grad]
                    if backend.name == "ddp":
                        model, opt = backend._prepared[net]
                        opt.zero_grad(set_to_none=True)
                        acc.backward(ls)
                        g, _ = grads_of(backend, net)
                        mem["grads"] += g
                        opt.step()
                    else:
                        engine = backend.engines[net]
                        engine.backward(ls)
                        mem["grads"] += grads_of(backend, net)[0]
                        engine.step()
                    for h in hooks:
                        h.remove()
                    mem["grads_peak"] += peak[0]
                    mem["buckets"] += peak[1]
                    mem["params"] += params_of(backend, net)
                    mem["optimizer"] += optimizer_of(backend, net)
                times = []
                for i in range(args.warmup + args.steps if args.steps else 0):  # full steps: D update, G update
                    t0 = time.perf_counter()
                    backend.update("D", d_loss())
                    backend.update("G", g_loss())
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    if i >= args.warmup:
                        times.append(time.perf_counter() - t0)
                mem["total"] = mem["params"] + mem["grads"] + mem["optimizer"]
                if torch.cuda.is_available():
                    mem["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, mem)
                nparams = sum(p.numel() for p in G.parameters()) + sum(p.numel() for p in D.parameters())
                rows.append({"width": width, "backend": name, "repeat": repeat, "ranks": dist.get_world_size(),
                             "params_G_plus_D": nparams, "per_rank_max": {k: max(m[k] for m in gathered) for k in mem},
                             "step_s": statistics.median(times) if times else None})
                del backend, Gw, Dw, G, D
    if acc.is_main_process:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="2,8", help="comma list of process counts (each one torchrun)")
    p.add_argument("--widths", default="96,192", help="BigGAN g_channels = d_channels values")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per backend (median); 0: memory only")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats of ddp/zero1/zero2")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.widths = [int(w) for w in str(args.widths).split(",")]
    if args.worker:
        worker(args)
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(r) for r in args.ranks.split(",")]:
            out = Path(tmp) / f"r{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   __file__, "--worker", "--widths", ",".join(map(str, args.widths)), "--batch-size",
                   str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--repeats", str(args.repeats), "--json", str(out)]
            r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if r.returncode != 0:
                return r.returncode
            results += json.loads(out.read_text())
    print(f"{'ranks':>5} {'width':>5} {'backend':>7} {'params MB':>9} {'grads MB':>9} {'optim MB':>9} "
          f"{'total MB':>9} {'buckets MB':>10} {'grad peak MB':>12} {'step s':>7}")
    for r in results:
        m = r["per_rank_max"]
        print(f"{r['ranks']:>5} {r['width']:>5} {r['backend']:>7} {m['params'] / 2**20:9.1f} {m['grads'] / 2**20:9.1f} "
              f"{m['optimizer'] / 2**20:9.1f} {m['total'] / 2**20:9.1f} {m['buckets'] / 2**20:10.1f} {m['grads_peak'] / 2**20:12.1f} {r['step_s'] or float('nan'):7.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

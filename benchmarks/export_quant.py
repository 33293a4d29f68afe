#!/usr/bin/env python
"""What export formats, bf16 and int8 do to a run's generator on this CPU: ms per image (batch --batch,
median of --repeats forward passes, one thread), max and mean |difference| from the eager fp32 generator,
and cls_acc / cls_fd of --num-samples class-balanced samples (gan.metrics' offline CIFAR-10 classifier;
the same z for every variant). Formats: the torch.export program (.pt2, the default), ONNX and
TorchScript (deprecated). bf16: eager autocast and the .pt2 / TorchScript exports (--quantize bf16). int8:
dynamic (torch, onnxruntime) and static (onnxruntime's, --quantize int8-static; and torch.ao's FX on
each quantized engine).

    python benchmarks/export_quant.py --run runs/cdcgan --num-samples 2000 --out-dir /tmp/exq
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


NAMES = {"export": "torch.export (.pt2)", "torchscript": "TorchScript", "onnx": "ONNX"}


def timed(fn, z, y, repeats):
    fn(z, y)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(z, y)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) / len(z) * 1000


def fx_static_int8(G, engine: str, z_dim: int, num_classes: int):
    """torch.ao's static int8 (FX graph mode, the engine's default qconfig), calibrated on the same
    (z, y) batches as the ONNX int8-static export; a callable that runs it on ``engine``."""
    import copy
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from gan.export import calibration_inputs

    batches = calibration_inputs(z_dim, num_classes)
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(G), get_default_qconfig_mapping(engine),
                              (torch.from_numpy(batches[0]["z"]), torch.from_numpy(batches[0]["y"])))
        with torch.no_grad():
            for b in batches:
                prepared(torch.from_numpy(b["z"]), torch.from_numpy(b["y"]))
        q = convert_fx(prepared)

    def run(z, y):
        torch.backends.quantized.engine = engine
        return q(z, y)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-real", type=int, default=10000)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--aoti", action="store_true", help="also the fp32 .pt2 compiled by AOTInductor "
                   "(torch._inductor.aoti_compile_and_package: minutes, needs a C++ compiler); not an export option "
                   "unless it measures faster")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from gan.data import class_names
    from gan.export import Artifact, bake, export, pick_weights
    from gan.metrics import load_generator
    from gan.metrics.offline import cls_metrics
    from gan.viz import to_uint8

    loaded = load_generator(args.run, pick_weights(args.run), "cpu")
    G, cfg = bake(loaded.G), loaded.cfg
    m = cfg.model
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(args.num_samples, m.z_dim, generator=gen)
    y = torch.arange(args.num_samples) % m.num_classes

    def bf16(zb, yb):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return G(zb, yb).float()

    variants = {"eager fp32": G, "eager bf16 (autocast)": bf16}
    for engine in ("x86", "fbgemm", "qnnpack"):
        try:
            variants[f"eager int8 static (torch FX, {engine})"] = fx_static_int8(G, engine, m.z_dim, m.num_classes)
        except Exception as e:  # noqa: BLE001 (report why, e.g. a forward torch.fx cannot trace)
            variants[f"eager int8 static (torch FX, {engine})"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    label = {"none": "fp32", "int8": "int8 dynamic", "int8-static": "int8 static", "bf16": "bf16 (autocast)"}
    for fmt, q in (("export", "none"), ("export", "int8"), ("export", "bf16"), ("torchscript", "none"),
                   ("torchscript", "int8"), ("torchscript", "bf16"), ("onnx", "none"), ("onnx", "int8"),
                   ("onnx", "int8-static")):
        d = Path(args.out_dir) / f"{fmt}-{q}"
        export(args.run, d, fmt, q)
        variants[f"{NAMES[fmt]} {label[q]}"] = Artifact(d, threads=1)
    if args.aoti:
        t = time.perf_counter()
        try:
            prog = torch.export.load(str(Path(args.out_dir) / "export-none" / "generator.pt2"))
            pkg = torch._inductor.aoti_compile_and_package(prog, package_path=str(Path(args.out_dir) / "aoti.pt2"))
            variants["torch.export (.pt2) fp32, AOTInductor"] = torch._inductor.aoti_load_package(pkg)
            print(f"AOTInductor compile: {time.perf_counter() - t:.0f} s", flush=True)
        except Exception as e:  # noqa: BLE001 (report why, e.g. no C++ compiler)
            variants["torch.export (.pt2) fp32, AOTInductor"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    ref = None
    print(f"run {args.run}: {m.name}, step {loaded.step}, {args.num_samples} samples, batch {args.batch}")
    print("| variant | ms/image | max abs diff vs eager fp32 | mean abs diff | cls_acc | cls_fd |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for name, fn in variants.items():
        if isinstance(fn, str):  # could not be built: say why
            print(f"| {name} | failed: {fn} | | | | |", flush=True)
            continue
        with torch.no_grad():
            ms = timed(fn, z[:args.batch], y[:args.batch], args.repeats)
            out = torch.cat([fn(zb, yb).float() for zb, yb in zip(z.split(args.batch), y.split(args.batch))])
        ref = out if ref is None else ref
        vals, _ = cls_metrics(to_uint8(out), y, ["cls_acc", "cls_fd"], class_names(cfg.data.shards, cfg.model.num_classes), cfg.data.shards, None,
                              "cpu", max_real=args.max_real)
        diff = (out - ref).abs()
        print(f"| {name} | {ms:.2f} | {diff.max().item():.2e} | {diff.mean().item():.2e} | {vals['cls_acc']:.4f} | "
              f"{vals['cls_fd']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

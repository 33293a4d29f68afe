#!/usr/bin/env python
"""Export a run's EMA network as a self-contained artifact, one program per mode of its family (the GAN:
generate; the VAE: generate and reconstruct; pix2pix: translate): a torch.export program (.pt2, the
default) or ONNX; optionally int8 or bf16. (TorchScript, which torch deprecates, is still written with
--format torchscript.)

    python launch/export.py --run runs/cdcgan --out artifacts/cdcgan
    python launch/export.py --run runs/cifar10_vae --out artifacts/cifar10_vae
    python launch/export.py --run runs/cifar10_vae --modes generate --format onnx --quantize int8-static \
        --out artifacts/vae-int8s
    python launch/export.py --run runs/cdcgan --best --format onnx --out artifacts/cdcgan-onnx
    python launch/export.py --run runs/biggan --quantize int8 --out artifacts/biggan-int8
    python launch/export.py --run runs/biggan --format onnx --quantize int8-static --out artifacts/biggan-int8s
    python launch/export.py --run runs/biggan --quantize bf16 --out artifacts/biggan-bf16

--quantize int8: dynamic (Linear / MatMul weights only). int8-static (ONNX only): onnxruntime's static
int8 of the whole graph, calibrated on the network's own z and classes (so not for modes that take
images: reconstruct, translate). bf16 (not ONNX): captured
under CPU autocast. On a 2-core x86 VM (AMX) both ran a BigGAN generator faster than fp32 (measured
with TorchScript artifacts: int8-static 0.79 vs 1.97 ms/image ONNX fp32; bf16 1.62 vs 3.16 TorchScript
fp32) and neither helped the small transposed-conv cDCGAN (docs/benchmarks.md, "Export formats and
int8 on CPU").
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gan.export import FORMATS, QUANTIZE  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", "--run-dir", dest="run", required=True)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="checkpoints/step-XXXXXXXX dir or an export's <net>_ema.safetensors file")
    src.add_argument("--best", action="store_true", help="RUN/best (the best evaluation during training)")
    p.add_argument("--format", default=FORMATS[0], choices=FORMATS,
                   help="export: torch.export programs, generator.pt2 / <mode>.pt2 (default); onnx; "
                        "torchscript (deprecated)")
    p.add_argument("--quantize", default="none", choices=QUANTIZE,
                   help="int8: dynamic; int8-static: ONNX only; bf16: not ONNX (docs/benchmarks.md)")
    p.add_argument("--modes", default="", help="comma-separated modes to export (default: all of the family's)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from gan.checkpoint import CheckpointError
    from gan.config import ConfigError
    from gan.export import ExportError, export
    from gan.metrics import MetricError

    try:
        meta = export(args.run, args.out, args.format, args.quantize, args.checkpoint, args.best,
                      [m for m in args.modes.split(",") if m] or None)
    except (ExportError, MetricError, CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({**{k: meta[k] for k in ("family", "format", "quantize", "file", "step", "parity_max_abs_diff")},
                      "modes": {n: m["parity_max_abs_diff"] for n, m in meta["modes"].items()}}))
    print(Path(args.out) / meta["file"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Pictures of a run's EMA generator (PNG files + TensorBoard images).

    python launch/sample.py --run runs/cdcgan --mode grid      # one row per class
    python launch/sample.py --run runs/cdcgan --mode interp    # two z, slerp, one row per class
    python launch/sample.py --run runs/cdcgan --mode classvar  # one z per row across all classes
    python launch/sample.py --run runs/cdcgan --mode realfake  # reals (from the shards) | fakes, per class
    python launch/sample.py --run runs/cdcgan --mode curves    # training curves from metrics.jsonl
    python launch/sample.py --run runs/cdcgan --mode export --num 10000 --out samples/   # PNG folder
    python -m torch_fidelity.fidelity --gpu 0 --fid --input1 samples/ --input2 cifar10-train   # e.g.

Default output: RUN/samples/<mode>-<checkpoint>.png (export: RUN/samples/export-<checkpoint>/).
--num: images per class (grid, realfake; default 10), interpolation steps (interp; 10), rows
(classvar; 8), images in all (export; 1000).
--class K (repeatable, every mode but curves): only those classes (a grid or an export of one class).
Pictures carry the class names of the run's shards; realfake is headed "real" | "generated".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gan.checkpoint import CheckpointError  # noqa: E402
from gan.config import ConfigError  # noqa: E402
from gan.data import ShardError, class_names  # noqa: E402
from gan.rundir import RunDir  # noqa: E402

MODES = ("grid", "interp", "classvar", "realfake", "curves", "export")
DEFAULT_NUM = {"grid": 10, "interp": 10, "classvar": 8, "realfake": 10, "export": 1000}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory written by launch/train.py")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--checkpoint", help="checkpoints/step-XXXXXXXX dir or a G_ema.safetensors export "
                                        "(default: the newest complete checkpoint)")
    p.add_argument("--out", help="output PNG (export: output folder)")
    p.add_argument("--num", type=int, help="see above")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="cls", type=int, action="append",
                   help="only this class (repeatable): its rows (grid, interp, realfake), its column "
                        "(classvar), its images (export)")
    p.add_argument("--real-shards", help="realfake: real images (default: the run config's data.shards)")
    p.add_argument("--no-tensorboard", action="store_true")
    return p.parse_args(argv)


def _tb_image(run: Path, tag: str, img, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(run), filename_suffix=".sample")
    try:
        w.add_image(tag, img, step)
    finally:
        w.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Path(args.run)
    num = args.num if args.num is not None else DEFAULT_NUM.get(args.mode, 0)
    if args.mode != "curves" and num < 1:
        print(f"error: --num must be >= 1, got {num}", file=sys.stderr)
        return 2
    try:
        import torch

        from gan import sampling
        from gan.metrics import MetricError, load_generator
        from gan.viz import save_png

        if args.mode == "curves":
            if not run.is_dir():
                raise MetricError(f"run directory not found: {run}")
            out = Path(args.out) if args.out else RunDir(run).samples / "curves.png"
            try:
                sampling.curves_png(RunDir(run).metrics_file, out, title=str(run))
            except (FileNotFoundError, ValueError) as e:
                raise MetricError(str(e)) from None
            if not args.no_tensorboard:
                from PIL import Image
                import numpy as np
                arr = np.array(Image.open(out).convert("RGB"))
                rows = sampling.read_metrics_jsonl(RunDir(run).metrics_file)
                _tb_image(run, "Sample/curves", torch.from_numpy(arr).permute(2, 0, 1),
                          max([r.get("step", 0) for r in rows] or [0]))
            print(out)
            return 0

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        loaded = load_generator(run, args.checkpoint, device)
        G, m = loaded.G, loaded.cfg.model
        step = loaded.step or 0
        if args.cls:
            bad = [c for c in args.cls if not 0 <= c < m.num_classes]
            if bad:
                raise MetricError(f"--class {bad[0]} is not a class index of this model (0..{m.num_classes - 1})")
        names = class_names(args.real_shards or loaded.cfg.data.shards, m.num_classes)
        cls = list(dict.fromkeys(args.cls)) if args.cls else None
        if args.mode == "export":
            out = Path(args.out) if args.out else RunDir(run).samples / f"export-{loaded.label}"
            try:
                sampling.export_images(G, m.z_dim, m.num_classes, num, out, device, args.seed, class_names=names,
                                       classes=cls, progress=True)
            except FileExistsError as e:
                raise MetricError(str(e)) from None
            print(out)
            return 0
        if args.mode == "grid":
            img = sampling.grid(G, m.z_dim, m.num_classes, num, device, args.seed, cls, names)
        elif args.mode == "interp":
            img = sampling.interpolation(G, m.z_dim, m.num_classes, max(num, 2), device, args.seed, cls, names)
        elif args.mode == "classvar":
            img = sampling.class_variation(G, m.z_dim, m.num_classes, num, device, args.seed, cls, names)
        else:
            img = sampling.real_vs_fake(G, m.z_dim, m.num_classes, num, args.real_shards or loaded.cfg.data.shards,
                                        device, args.seed, classes=cls, class_names=names)
        out = Path(args.out) if args.out else RunDir(run).samples / f"{args.mode}-{loaded.label}.png"
        save_png(img, out)
        if not args.no_tensorboard:
            _tb_image(run, f"Sample/{args.mode}", img, step)
        print(out)
        return 0
    except (ConfigError, ShardError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

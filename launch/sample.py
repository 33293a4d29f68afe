#!/usr/bin/env python
"""Pictures of a run's EMA network (PNG files + TensorBoard images ``Sample/<mode>``); the modes are the
run's family's. --net trained draws them with the trained network of the checkpoint instead (files
<mode>-step-X-trained.png, TensorBoard Sample/trained/<mode>).

The GAN (grid, interp, classvar, realfake, curves, export):
    python launch/sample.py --run runs/cdcgan --mode grid      # one row per class
    python launch/sample.py --run runs/cdcgan --mode interp    # two z, slerp, one row per class
    python launch/sample.py --run runs/cdcgan --mode classvar  # one z per row across all classes
    python launch/sample.py --run runs/cdcgan --mode realfake  # reals (from the shards) | fakes, per class
    python launch/sample.py --run runs/cdcgan --mode curves    # training curves from metrics.jsonl
    python launch/sample.py --run runs/cdcgan --mode export --num 10000 --out samples/   # PNG folder
    python -m torch_fidelity.fidelity --gpu 0 --fid --input1 samples/ --input2 cifar10-train   # e.g.
The VAE (grid, recon, interp, curves, export):
    python launch/sample.py --run runs/cifar10_vae --mode grid     # prior samples, one row per class
    python launch/sample.py --run runs/cifar10_vae --mode recon    # held-out inputs over reconstructions
    python launch/sample.py --run runs/cifar10_vae --mode interp   # latent path between two held-out images
    python launch/sample.py --run runs/cifar10_vae --mode curves   # reconstruction, KL, PSNR, SSIM
    python launch/sample.py --run runs/cifar10_vae --mode export --num 10000 --out samples/  # prior samples
pix2pix (triplets, curves, export):
    python launch/sample.py --run runs/sketch --mode triplets      # input | output | target rows
    python launch/sample.py --run runs/sketch --mode export --out outputs/   # G's outputs as PNG files

Default output: RUN/samples/<mode>-<checkpoint>.png (export: RUN/samples/export-<checkpoint>/).
--num: images per class (grid, realfake; default 10), interpolation steps (interp; 10), rows
(classvar; 8), held-out images (recon, triplets; 8), images in all (export; 1000).
--class K (repeatable, every mode but curves): only those classes.
Held-out images (recon, interp, triplets, pix2pix's export) come from the run's val.shards, or from
--real-shards; the GAN's realfake reads its real images from data.shards or --real-shards.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gan.checkpoint import CheckpointError  # noqa: E402
from gan.config import ConfigError  # noqa: E402
from gan.data import ShardError, class_names  # noqa: E402
from gan.metrics.run import NETS  # noqa: E402
from gan.rundir import RunDir  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory written by launch/train.py")
    p.add_argument("--mode", required=True, help="a picture mode of the run's family (see above)")
    p.add_argument("--checkpoint", help="checkpoints/step-XXXXXXXX dir or a <net>_ema.safetensors export "
                                        "(default: the newest complete checkpoint)")
    p.add_argument("--net", choices=NETS, default="ema", help="ema: the EMA network; trained: the trained "
                   "network's own weights, from the checkpoint (default: %(default)s)")
    p.add_argument("--out", help="output PNG (export: output folder)")
    p.add_argument("--num", type=int, help="see above")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="cls", type=int, action="append",
                   help="only this class (repeatable): its rows (grid, interp, realfake), its column "
                        "(classvar), its images (export, recon, triplets)")
    p.add_argument("--real-shards", help="realfake: real images (default: data.shards); recon, interp, triplets: "
                                         "held-out images (default: val.shards)")
    p.add_argument("--no-tensorboard", action="store_true")
    return p.parse_args(argv)


def _tb_image(run: Path, tag: str, img, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(run), filename_suffix=".sample")
    try:
        w.add_image(tag, img, step)
    finally:
        w.close()


def _family_modes(run: Path, mode: str):
    """The run's family, refusing a mode it does not have (MetricError listing its modes)."""
    from gan.family import build_family
    from gan.metrics import MetricError
    from gan.metrics.run import run_config

    family = build_family(run_config(run))
    if mode not in family.sample_modes:
        raise MetricError(f"--mode {mode}: the {family.name} family has no such picture; its modes: "
                          f"{', '.join(family.sample_modes)}")
    return family


def _class_names(shards: str, num_classes: int | None) -> list[str]:
    if num_classes:
        return class_names(shards, num_classes)
    from gan.data import read_manifest

    try:
        return list(read_manifest(shards).classes)
    except ShardError:
        return []


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Path(args.run)
    try:
        import torch

        from gan.family import SampleRequest
        from gan.metrics import MetricError, load_generator
        from gan.viz import save_png

        family = _family_modes(run, args.mode)
        num = args.num if args.num is not None else family.sample_modes[args.mode]
        if args.mode != "curves" and num < 1:
            raise MetricError(f"--num must be >= 1, got {num}")
        if args.mode == "curves":
            out = Path(args.out) if args.out else RunDir(run).samples / "curves.png"
            try:
                family.curves(RunDir(run).metrics_file, out, title=str(run))
            except (FileNotFoundError, ValueError) as e:
                raise MetricError(str(e)) from None
            if not args.no_tensorboard:
                import numpy as np
                from PIL import Image

                from gan.sampling import read_metrics_jsonl
                arr = np.array(Image.open(out).convert("RGB"))
                rows = read_metrics_jsonl(RunDir(run).metrics_file)
                _tb_image(run, "Sample/curves", torch.from_numpy(arr).permute(2, 0, 1),
                          max([r.get("step", 0) for r in rows] or [0]))
            print(out)
            return 0

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        loaded = load_generator(run, args.checkpoint, device, args.net)
        family, step = loaded.family, loaded.step or 0
        shards = args.real_shards or ""
        k = getattr(loaded.cfg.model, "num_classes", None)  # pix2pix: the labels of its shards, if any
        names = _class_names(shards or (loaded.cfg.data.shards if k else family.eval_shards()), k)
        known = k or len(names) or 1
        bad = [c for c in args.cls or [] if not 0 <= c < known]
        if bad:
            raise MetricError(f"--class {bad[0]} is not a class index of this run (0..{known - 1})")
        out = Path(args.out) if args.out else RunDir(run).samples / (
            f"export-{loaded.label}" if args.mode == "export" else f"{args.mode}-{loaded.label}.png")
        request = SampleRequest(args.mode, num, args.seed, list(dict.fromkeys(args.cls)) if args.cls else None,
                                shards, names or None, str(out))
        try:
            img = family.sample(loaded.G, request, device)
        except (FileExistsError, ValueError) as e:
            raise MetricError(str(e)) from None
        if args.mode != "export":
            save_png(img, out)
            if not args.no_tensorboard:
                _tb_image(run, f"Sample/{args.mode}" if loaded.net == "ema" else f"Sample/{loaded.net}/{args.mode}",
                          img, step)
        print(out)
        return 0
    except (ConfigError, ShardError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

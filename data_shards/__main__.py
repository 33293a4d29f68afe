"""Command line: ``python -m data_shards {build,verify,info,preview,ensure-cifar10} ...`` (``-h`` for each).

``build --source webdataset`` converts standard webdataset shards (ShardWriter, img2dataset) into ours.

Exit codes: 0 fine, 1 verification found problems, 2 bad input (message names the path and the fix).
"""
from __future__ import annotations

import argparse
import sys
import time

from data_shards.imagefolder import FILTERS, MODES, SMALL_POLICIES, TRANSFORMS
from data_shards.paired import DERIVATIONS, DIRECTIONS
from data_shards.sources import SOURCES, InputError, open_source
from gan.data.manifest import ENCODINGS, ShardError

DEFAULT_ENCODING = "raw"  # see docs/benchmarks.md ("Data loader") for raw vs png
DEFAULT_SHARD_SIZE = 1000


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_build(a) -> int:
    from data_shards.writer import build_shards

    t0 = time.perf_counter()
    src = open_source(a.source, a.root, a.split, a.download, max_images=a.max_images, resolution=a.resolution,
                      transform=a.transform, height=a.height, small=a.small, mode=a.mode,
                      resize_filter=a.resize_filter, root_b=a.root_b, derive=a.derive, direction=a.direction,
                      label_key=a.label_key, classes_file=a.classes, skip_bad=a.skip_bad, log=_log)
    name = a.name or src.name
    how = f", {a.transform} to {a.resolution}" if a.resolution else ""
    shape = "x".join(map(str, src.shape))
    if src.input_shape is not None:
        shape = f"{'x'.join(map(str, src.input_shape))} -> {shape} pairs ({src.meta['pairs']}, {a.direction})"
    _log(f"building {name} {a.split}: {len(src)} samples, {len(src.classes)} class(es), "
         f"{shape}{how}, {a.encoding}, {a.shard_size} per shard -> {a.out}")
    m = build_shards(src, a.out, a.split, name, a.encoding, a.shard_size, log=_log)
    print(f"wrote {len(m.shards)} shards + manifest.json to {m.dir} ({m.total} samples, "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_verify(a) -> int:
    from data_shards.verify import summary, verify_dir

    m, problems = verify_dir(a.dir)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        bad = len({p.split(":", 1)[0] for p in problems})
        print(f"FAILED {m.dir}: {len(problems)} problem(s) in {bad} of {len(m.shards)} shard(s); rebuild with "
              f"`python -m data_shards build ... --out {m.dir}`", file=sys.stderr)
        return 1
    print(summary(m))
    return 0


def cmd_info(a) -> int:
    from data_shards.info import info_table
    from gan.data import read_manifest

    print(info_table(read_manifest(a.dir), shards=a.shards))
    return 0


def cmd_preview(a) -> int:
    import torch

    from gan.data import eval_batches, read_manifest
    from gan.viz import class_grid, save_png

    if a.per_class < 1:
        raise InputError(f"--per-class must be >= 1, got {a.per_class}")
    m = read_manifest(a.dir)
    xs, ys = [], []
    counts = torch.zeros(m.num_classes, dtype=torch.long)
    for *images, y in eval_batches(a.dir, batch_size=256):
        x = torch.cat([im.expand(-1, 3, -1, -1) for im in images], dim=3) if m.paired else images[0]  # A|B
        xs.append(x)
        ys.append(y)
        counts += torch.bincount(y, minlength=m.num_classes)
        if bool((counts >= a.per_class).all()):
            break
    grid = class_grid(torch.cat(xs), torch.cat(ys), m.num_classes, a.per_class)
    try:
        save_png(grid, a.out)
    except OSError as e:
        raise InputError(f"cannot write {a.out} ({e.strerror or e}): choose a writable --out") from None
    what = "input|target pairs" if m.paired else "images"
    print(f"wrote {a.out}: {m.num_classes} classes ({', '.join(m.classes)}) x {a.per_class} {what} from {m.dir}")
    return 0


def cmd_ensure(a) -> int:
    from data_shards.ensure import ensure_cifar10

    ensure_cifar10(a.out, a.root, a.shared, a.encoding, a.shard_size, log=_log)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_shards", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="write a dataset split as shards + manifest.json")
    b.add_argument("--source", required=True, choices=SOURCES)
    b.add_argument("--root", required=True,
                   help="where the source data lives (webdataset: a directory of .tar shards, one .tar, or a brace "
                        "pattern such as 'DIR/shard-{000000..000009}.tar')")
    b.add_argument("--split", default="train", choices=("train", "test"))
    b.add_argument("--out", required=True, help="output directory (one split per directory)")
    b.add_argument("--download", action="store_true", help="fetch with torchvision (cifar10, *mnist; needs internet)")
    b.add_argument("--name", default="", help="dataset name in the manifest (default: from the source)")
    b.add_argument("--encoding", default=DEFAULT_ENCODING, choices=ENCODINGS)
    b.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
    b.add_argument("--max-images", type=int, default=0,
                   help="keep this many samples (a fixed pseudo-random subset in source order; 0 = all)")
    f = b.add_argument_group("imagefolder options (see data_shards/imagefolder.py)")
    f.add_argument("--resolution", type=int, default=0,
                   help="crop/resize every image to NxN (default: keep the size; then all images must match)")
    f.add_argument("--transform", default="center-crop", choices=TRANSFORMS,
                   help="with --resolution: how to get to NxN (stylegan2-ada's dataset_tool semantics)")
    f.add_argument("--height", type=int, default=0,
                   help="center-crop-wide: the image height inside the NxN canvas (e.g. 3N/4 for 4:3)")
    f.add_argument("--small", default="refuse", choices=SMALL_POLICIES,
                   help="images smaller than the crop: refuse (error), upscale, or skip them")
    f.add_argument("--mode", default="auto", choices=MODES,
                   help="auto: gray shards if every image is gray, RGB if every one is colour, else an error")
    f.add_argument("--resize-filter", default="lanczos", choices=FILTERS)
    q = b.add_argument_group("paired options: (input, target) pairs for image-to-image translation "
                             "(see data_shards/paired.py; the imagefolder options apply to both images)")
    q.add_argument("--root-b", default="", help="pair the images of --root (A) with those of this folder (B) by "
                   "file name (default: --root holds pix2pix's aligned A|B files)")
    q.add_argument("--derive", default="", choices=("",) + DERIVATIONS,
                   help="make A from each image of --root (B): a real paired task from any image folder")
    q.add_argument("--direction", default="AtoB", choices=DIRECTIONS, help="AtoB: A is the input, B the target")
    w = b.add_argument_group("webdataset options (see data_shards/webdataset_in.py)")
    w.add_argument("--label-key", default="auto",
                   help="auto (the cls member if any, else one class), none, an extension holding an integer "
                        "(cls), or json.FIELD (a field of the json member, e.g. json.label)")
    w.add_argument("--classes", default="", metavar="FILE",
                   help="class names, one per line (line k names label k); default: the label numbers")
    w.add_argument("--skip-bad", action="store_true",
                   help="leave damaged samples out (and report how many) instead of stopping at the first")
    b.set_defaults(func=cmd_build)

    n = sub.add_parser("info", help="print a shard directory's manifest as a table")
    n.add_argument("dir")
    n.add_argument("--shards", action="store_true", help="also list every shard (name, count, sha256)")
    n.set_defaults(func=cmd_info)

    v = sub.add_parser("verify", help="re-hash every shard and decode every sample")
    v.add_argument("dir")
    v.set_defaults(func=cmd_verify)

    g = sub.add_parser("preview", help="PNG grid of real images, one row per class")
    g.add_argument("dir")
    g.add_argument("--out", required=True)
    g.add_argument("--per-class", type=int, default=10)
    g.set_defaults(func=cmd_preview)

    e = sub.add_parser("ensure-cifar10", help="build CIFAR-10 train shards unless they exist (make shards)")
    e.add_argument("--out", required=True)
    e.add_argument("--root", default="data/cifar10", help="may hold torchvision's cifar-10-batches-py")
    e.add_argument("--shared", default="../shared/data/cifar10-jpeg.tar.gz", help="the CIFAR-10 JPEG tarball")
    e.add_argument("--encoding", default=DEFAULT_ENCODING, choices=ENCODINGS)
    e.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    e.set_defaults(func=cmd_ensure)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        return a.func(a)
    except (InputError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (an unfinished build never leaves a manifest)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

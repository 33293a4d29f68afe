"""The shard manifest (``DIR/manifest.json``) and the error raised for unusable shard directories.

Format (docs/CONTRACTS.md)::

    {"format": 1, "dataset": "cifar10", "split": "train", "classes": [...],
     "image_shape": [C, H, W], "encoding": "raw" | "png",
     "build": {...},  # optional: source, transform, per-class counts (python -m data_shards info DIR)
     "shards": [{"name": "train-000000.tar", "count": 1000, "sha256": "..."}, ...], "total": 50000}

Paired shards (image-to-image translation: an input image, a target image and a label per sample) are
format 2 and add ``"paired": true, "input_shape": [C, H, W]``; ``image_shape`` is the target's (what a
model outputs), and both halves have the same H and W. Unpaired sets are still written as format 1,
so code that predates pairs reads them and refuses paired sets by their format number.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = 1  # single images
PAIRED_FORMAT = 2  # (input, target) pairs: adds "paired" and "input_shape"
MANIFEST = "manifest.json"
ENCODINGS = ("raw", "png")
SHARD_RE = r"[A-Za-z0-9_]+-\d{6}\.tar"
TAR_BLOCK = 512

def build_hint(directory: str | Path, key: str = "data.shards", paired: bool = False, split: str = "") -> str:
    """How to build the shard directory that config key (or flag) ``key`` names, for a family of single images
    or of (input, target) pairs (``paired``): ``split``, else the test split for a held-out key (val.shards,
    --real-shards) or a directory named after a test or validation split, else the train split."""
    d = Path(directory)
    held_out = key != "data.shards" or any(w in d.name.lower() for w in ("test", "val"))
    split = split or ("test" if held_out else "train")
    if paired:
        return (f"build pairs with `python -m data_shards build --source paired --derive sketch|edges|gray "
                f"--root SRC --split {split} --out {d}` (SRC: an image folder; for pix2pix's aligned A|B images "
                f"use --direction AtoB|BtoA instead of --derive, for two folders paired by file name --root-b B)")
    make = " (or `make shards` for CIFAR-10)" if split == "train" else ""
    return (f"build shards with `python -m data_shards build --source cifar10|imagefolder|fashion-mnist|mnist "
            f"--root SRC --split {split} --out {d}`{make}")


class ShardError(ValueError):
    """A shard directory that cannot be used: the message names the path and the fix."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a shard directory holds. ``shards`` keeps the manifest order."""

    dir: Path
    dataset: str
    split: str
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]  # (C, H, W)
    encoding: str
    shards: tuple[ShardInfo, ...]
    total: int
    build: dict = field(default_factory=dict, compare=False)  # optional: how it was built (source, transform, counts)
    input_shape: tuple[int, int, int] | None = None  # paired shards: the input's (C, H, W); None: single images

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def paired(self) -> bool:
        return self.input_shape is not None

    @property
    def image_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """The shape of each image of a sample, in the order of :func:`gan.data.codec.image_members`:
        (image,) or (input, target)."""
        return (self.image_shape,) if self.input_shape is None else (self.input_shape, self.image_shape)

    def describe(self) -> str:
        """``cifar10 train, 3x32x32, 10 classes`` (paired: ``1x32x32 -> 3x32x32 pairs``)."""
        shape = "x".join(map(str, self.image_shape))
        if self.paired:
            shape = f"{'x'.join(map(str, self.input_shape))} -> {shape} pairs"
        return f"{self.dataset} {self.split}, {shape}, {self.num_classes} classes"

    @property
    def paths(self) -> list[str]:
        return [str(self.dir / s.name) for s in self.shards]

    def check(self, dataset: str | None = None, channels: int | None = None, size: int | None = None,
              num_classes: int | None = None, key: str = "data.shards") -> "Manifest":
        """Raise :class:`ShardError` if these shards do not fit what the caller expects.

        ``dataset`` is ``data.dataset`` ("" or None accepts any), ``channels``/``size``/``num_classes``
        are ``model.img_channels``/``model.img_size``/``model.num_classes``; ``key`` names the shards.
        """
        c, h, w = self.image_shape
        where = f"{key}: shards in {self.dir} ({self.dataset} {self.split}, {c}x{h}x{w}, {self.num_classes} classes)"
        if dataset and dataset != self.dataset:
            raise ShardError(f"{where} hold dataset '{self.dataset}', but the config expects '{dataset}' "
                             f"(data.dataset). Point {key} at shards built from {dataset}, rebuild "
                             f"{self.dir} with `python -m data_shards build ... --name {dataset}`, or set "
                             f"data.dataset={self.dataset}.")
        if channels is not None and channels != c:
            raise ShardError(f"{where} have {c} channel(s), but the config expects {channels} "
                             f"(model.img_channels). Set model.img_channels={c} or use other shards.")
        if size is not None and (size != h or size != w):
            raise ShardError(f"{where} hold {h}x{w} images, but the config expects {size}x{size} "
                             f"(model.img_size). Set model.img_size={h} or use other shards.")
        if num_classes is not None and num_classes != self.num_classes:
            raise ShardError(f"{where} have {self.num_classes} classes, but the config expects {num_classes} "
                             f"(model.num_classes). Set model.num_classes={self.num_classes} or use other shards.")
        return self

    def check_files(self) -> "Manifest":
        """Cheap checks of every shard file against the manifest (two small reads per shard, no hashing):
        at least the bytes its sample count needs, a valid first tar header (a zero-filled shard has
        none) and the end-of-archive marker (a truncated shard has none). Raises :class:`ShardError`
        naming the shard and ``python -m data_shards verify`` (which hashes and decodes everything)."""
        blocks = lambda n: -(-n // TAR_BLOCK) * TAR_BLOCK  # noqa: E731
        per_sample = 2 * TAR_BLOCK + sum(blocks(c * h * w) + TAR_BLOCK if self.encoding == "raw" else 2 * TAR_BLOCK
                                         for c, h, w in self.image_shapes)
        problems = []
        for s in self.shards:
            path = self.dir / s.name
            need = s.count * per_sample + 2 * TAR_BLOCK
            with open(path, "rb") as f:
                size = f.seek(0, 2)
                f.seek(0)
                head = f.read(TAR_BLOCK)
                f.seek(max(0, size - 2 * TAR_BLOCK))
                tail = f.read(2 * TAR_BLOCK)
            if size < need or size % TAR_BLOCK:
                problems.append(f"{s.name} has {size} bytes, but {s.count} samples need at least {need} "
                                f"in whole 512-byte blocks (truncated?)")
            elif not any(head):
                problems.append(f"{s.name} starts with a zero block: no tar header (zero-filled?)")
            elif not tar_header_ok(head):
                problems.append(f"{s.name} starts with a corrupt tar header (checksum mismatch)")
            elif any(tail):
                problems.append(f"{s.name} has no end-of-archive marker (truncated?)")
        if problems:
            raise ShardError(f"damaged shard(s) in {self.dir}: {'; '.join(problems[:5])}"
                             f"{f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''}. Run "
                             f"`python -m data_shards verify {self.dir}` for the full report and rebuild the "
                             f"damaged shards (or the directory): "
                             + build_hint(self.dir, paired=self.paired, split=self.split))
        return self

    def to_json(self) -> dict:
        pairs = {"paired": True, "input_shape": list(self.input_shape)} if self.paired else {}
        return {"format": PAIRED_FORMAT if self.paired else FORMAT, "dataset": self.dataset, "split": self.split,
                "classes": list(self.classes), "image_shape": list(self.image_shape), **pairs,
                "encoding": self.encoding,
                **({"build": self.build} if self.build else {}),
                "shards": [{"name": s.name, "count": s.count, "sha256": s.sha256} for s in self.shards],
                "total": self.total}


def class_names(directory: str | Path, num_classes: int) -> list[str]:
    """The class names of the shards in ``directory`` (their manifest), or the class indices as names
    when the shards are gone or hold another number of classes (an artifact or picture still gets names)."""
    try:
        names = list(read_manifest(directory).classes)
    except ShardError:
        names = []
    return names if len(names) == num_classes else [str(k) for k in range(num_classes)]


def require_paired(m: Manifest, who: str = "pix2pix", key: str = "data.shards") -> Manifest:
    """Raise :class:`ShardError` unless ``m`` holds (input, target) pairs; the message names the config key
    ``key`` that named them and the build command."""
    if not m.paired:
        raise ShardError(f"{who} trains on (input, target) pairs, but the shards in {m.dir} ({key}: "
                         f"{m.describe()}) hold single images. Point {key} at paired shards: "
                         f"{build_hint('DIR', key, True)}")
    return m


def require_single(m: Manifest, who: str, key: str = "data.shards") -> Manifest:
    """Raise :class:`ShardError` if ``m`` holds pairs (a model of single images cannot use them)."""
    if m.paired:
        raise ShardError(f"{who} trains on single images, but the shards in {m.dir} ({key}: {m.describe()}) hold "
                         f"(input, target) pairs for image-to-image translation. Point {key} at shards "
                         f"built with --source cifar10|imagefolder|fashion-mnist|mnist, or train a paired "
                         f"family (family: pix2pix)")
    return m


def tar_header_ok(header: bytes) -> bool:
    """The checksum of a 512-byte tar header: the byte sum with the 8-byte checksum field read as spaces."""
    try:
        stored = int(header[148:156].strip(b"\0 ") or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(header[:148]) + sum(header[156:]) + 8 * 32


def parse_manifest(raw: dict, directory: Path, key: str = "data.shards", paired: bool = False) -> Manifest:
    """Validate a decoded manifest.json; raise :class:`ShardError` naming the problem (and, like
    :func:`read_manifest`, the config key ``key`` and the build command)."""
    path = directory / MANIFEST

    def _bad(path: Path, why: str) -> ShardError:
        return ShardError(f"{path} ({key}) is not a valid shard manifest: {why}. Rebuild the directory: "
                          + build_hint(directory, key, paired))

    def _shape(name: str, shape) -> tuple[int, int, int]:
        if (not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape)
                or shape[0] not in (1, 3)):
            raise _bad(path, f"{name} {shape!r} is not [C, H, W] with C in (1, 3)")
        return tuple(shape)
    if not isinstance(raw, dict):
        raise _bad(path, "top level is not a JSON object")
    missing = [k for k in ("format", "dataset", "split", "classes", "image_shape", "encoding", "shards", "total")
               if k not in raw]
    if missing:
        raise _bad(path, f"missing key(s) {', '.join(missing)}")
    if raw["format"] not in (FORMAT, PAIRED_FORMAT):
        raise _bad(path, f"format {raw['format']!r}, this code reads formats {FORMAT} and {PAIRED_FORMAT}")
    if raw["encoding"] not in ENCODINGS:
        raise _bad(path, f"encoding {raw['encoding']!r} is not one of {', '.join(ENCODINGS)}")
    shape = _shape("image_shape", raw["image_shape"])
    input_shape = None
    if raw["format"] == PAIRED_FORMAT:
        if raw.get("paired") is not True or "input_shape" not in raw:
            raise _bad(path, f"format {PAIRED_FORMAT} needs \"paired\": true and \"input_shape\"")
        input_shape = _shape("input_shape", raw["input_shape"])
        if input_shape[1:] != shape[1:]:
            raise _bad(path, f"input_shape {list(input_shape)} and image_shape {list(shape)} differ in H x W")
    elif "paired" in raw or "input_shape" in raw:
        raise _bad(path, f"\"paired\" and \"input_shape\" need format {PAIRED_FORMAT}")
    classes = raw["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise _bad(path, "classes must be a non-empty list of names")
    shards = []
    for i, s in enumerate(raw["shards"] if isinstance(raw["shards"], list) else [None]):
        if (not isinstance(s, dict) or not isinstance(s.get("name"), str) or not re.fullmatch(SHARD_RE, s["name"])
                or not isinstance(s.get("count"), int) or s["count"] < 1 or not isinstance(s.get("sha256"), str)):
            raise _bad(path, f"shard entry {i} ({s!r}) needs name '<split>-NNNNNN.tar', count >= 1 and sha256")
        shards.append(ShardInfo(s["name"], s["count"], s["sha256"]))
    if not shards:
        raise _bad(path, "it lists no shards")
    if raw["total"] != sum(s.count for s in shards):
        raise _bad(path, f"total {raw['total']} != sum of shard counts {sum(s.count for s in shards)}")
    build = raw.get("build", {})
    if not isinstance(build, dict):
        raise _bad(path, f"build {build!r} is not a JSON object")
    return Manifest(dir=directory, dataset=str(raw["dataset"]), split=str(raw["split"]), classes=tuple(classes),
                    image_shape=shape, encoding=raw["encoding"], shards=tuple(shards), total=raw["total"],
                    build=build, input_shape=input_shape)


def read_manifest(directory: str | Path, key: str = "data.shards", paired: bool = False) -> Manifest:
    """Read and validate ``directory/manifest.json``; every shard it names must exist.

    Raises :class:`ShardError` (a ``ValueError``) when the directory is missing, empty, has no manifest, or
    the manifest is damaged, naming the path, the config key (or flag) ``key`` that named it, and the build
    command that fits that key and a family of single images or of pairs (``paired``; :func:`build_hint`).
    """
    d = Path(directory)
    hint = build_hint(d, key, paired)
    if not d.exists():
        raise ShardError(f"shard directory {d} ({key}) does not exist: {hint}, or point {key} at an existing "
                         f"shard directory")
    if not d.is_dir():
        raise ShardError(f"shard directory {d} ({key}) is not a directory: point {key} at the directory that "
                         f"holds {MANIFEST} and the .tar shards")
    path = d / MANIFEST
    if not path.is_file():
        what = "is empty" if not any(d.iterdir()) else f"has no {MANIFEST} (an unfinished or interrupted build?)"
        foreign = "" if what == "is empty" or not any(d.glob("*.tar")) else (
            f"; if its .tar shards come from another tool (webdataset's ShardWriter or TarWriter, img2dataset), "
            f"convert them: `python -m data_shards build --source webdataset --root {d} --out NEW_DIR`")
        raise ShardError(f"shard directory {d} ({key}) {what}: {hint}{foreign}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path} ({key}) is not a valid shard manifest: cannot read it as JSON ({e}). Rebuild "
                         f"the directory: {hint}") from None
    m = parse_manifest(raw, d, key, paired)
    absent = [s.name for s in m.shards if not (d / s.name).is_file()]
    if absent:
        raise ShardError(f"{path} ({key}) names shard(s) missing from {d}: {', '.join(absent[:5])}"
                         f"{' ...' if len(absent) > 5 else ''}. Rebuild: {hint}")
    return m

"""Standard webdataset shards written by other tools -> a :class:`~data_shards.sources.Source`
(``python -m data_shards build --source webdataset --root DIR_OR_BRACE_PATTERN``).

Input: plain ``.tar`` shards as webdataset's ``ShardWriter``/``TarWriter`` or img2dataset write them
(``{shard}.tar`` with jpg/txt/json; its ``{shard}.parquet`` is not needed, and its
``{shard}_stats.json``, when present, is checked against the samples found). ``--root`` is a
directory (every ``*.tar`` in it), one ``.tar`` file, or a brace pattern such as
``data/shard-{000000..000099}.tar`` (every name it expands to must exist).

Samples are read as webdataset reads them (``webdataset.tariterators``): the key is the member path
up to the first dot of its file name, the extension the rest (lower-cased); consecutive members with
the same key form a sample (a key that comes back after other samples is refused: webdataset would
read two half samples); ``__*__`` metadata members and members without an extension are ignored.
The image is the ``jpg``, ``jpeg``, ``png`` or ``webp`` member. The label (``label_key``):

- ``auto`` (default): the ``cls`` member (an integer, as webdataset writes it) if the samples have
  one, else one class for everything;
- ``cls`` or another extension: that member, an integer;
- ``json.FIELD`` (``json.FIELD.SUB`` for nested objects): a field of the ``json`` member, an integer
  or a string (img2dataset's ``--save_additional_columns``);
- ``none``: one class.

Integer labels are the class indices: class names come from ``classes_file`` (one name per line,
line k for label k), else the numbers themselves. String labels are class names: sorted, or in the
order of ``classes_file``. Every class needs a sample.

Sizes and modes go through :func:`data_shards.imagefolder.images_source` (``--resolution``,
``--transform``, ``--small``, ``--mode``), which reads every image header before anything is written.

Damage (a tar cut short or with garbage between members, a compressed or empty shard, a label or
JSON member that does not parse, a sample without an image, a shard with fewer samples than its
``_stats.json`` says) is an error naming the shard and the member; ``skip_bad`` leaves the damaged
samples out (and an image that does not decode, which it also checks) and reports how many.
Compressed shards (``.tar.gz``) are refused: the writer needs random access to every member.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from data_shards.imagefolder import check_options, images_source, pick_subset, read_headers
from data_shards.sources import InputError, Source

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_AUTO, LABEL_NONE = "auto", "none"
_BLOCK = 512
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_COMPRESSED = ((b"\x1f\x8b", "gzip", "gunzip -k"), (b"BZh", "bzip2", "bunzip2 -k"),
               (b"\xfd7zXZ\x00", "xz", "unxz -k"), (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"))
SKIP_HINT = ("pass --skip-bad to leave the damaged samples out (the build reports how many), or re-create "
             "the shard")


def base_plus_ext(name: str) -> tuple[str | None, str | None]:
    """webdataset's split of a member name into (key, extension): the key ends at the first dot of the
    file name (``a/b.c/x.seg.jpg`` -> ``a/b.c/x``, ``seg.jpg``)."""
    from webdataset.tariterators import base_plus_ext as split

    return split(name)


@dataclass(frozen=True)
class Member:
    """One tar member, read by offset (the shard must be a plain tar)."""

    shard: str
    name: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self} ends after {len(data)} of {self.size} bytes (the shard changed or was cut)")
        return data

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"


@dataclass
class Sample:
    shard: str
    key: str
    members: dict[str, Member] = field(default_factory=dict)
    label_data: bytes | None = None  # the label member's bytes, read while scanning
    bad: str = ""  # why the sample is damaged ("" = fine)

    def __str__(self) -> str:
        return f"{self.shard}:{self.key}"

    @property
    def image(self) -> Member:
        return next(self.members[e] for e in IMAGE_EXTS if e in self.members)

    def spoil(self, why: str) -> None:
        self.bad = self.bad or why


# ---------------------------------------------------------------------------------------------- input paths

def shard_paths(root: str) -> list[Path]:
    """The shards ``--root`` names: a directory's ``*.tar``, one file, or a brace pattern."""
    import braceexpand

    if re.match(r"^[a-z][a-z0-9+]*:", root) and not Path(root).exists():
        raise InputError(f"--root {root} is not a local path: this converter reads local .tar files; copy the "
                         f"shards to a local directory first")
    p = Path(root)
    if p.is_dir():
        found = sorted(q for q in p.iterdir() if q.is_file() and q.name.endswith(".tar") and not q.name.startswith("."))
        if not found:
            packed = sorted(q.name for q in p.iterdir()
                            if re.search(r"\.(tar\.gz|tgz|tar\.bz2|tar\.xz|tar\.zst)$", q.name))
            what = (f"only compressed shards such as {packed[0]}: decompress them first (e.g. `gunzip -k "
                    f"{p}/*.tar.gz`)" if packed else "no .tar shards")
            raise InputError(f"webdataset root {p} holds {what}. Point --root at a directory of .tar shards, a "
                             f"shard file, or a brace pattern such as DIR/shard-{{000000..000009}}.tar")
        return found
    if "{" in root:
        try:
            names = list(braceexpand.braceexpand(root))
        except braceexpand.UnbalancedBracesError:
            raise InputError(f"--root {root}: unbalanced braces; a pattern looks like DIR/shard-{{000000..000009}}.tar"
                             ) from None
        if names == [root]:
            raise InputError(f"--root {root}: the braces do not form a pattern (use {{a,b}} or {{000..099}})")
        missing = [n for n in names if not Path(n).is_file()]
        if len(missing) == len(names):
            raise InputError(f"brace pattern {root} matches nothing: none of its {len(names)} names exists (the "
                             f"first is {names[0]}). Check the directory, the digits (e.g. {{000000..000009}} for "
                             f"ShardWriter's %06d) and the range")
        if missing:
            raise InputError(f"brace pattern {root} names {len(missing)} of {len(names)} shard(s) that do not "
                             f"exist: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}. Narrow the "
                             f"range to the shards you have")
        return [Path(n) for n in names]
    if p.is_file():
        return [p]
    raise InputError(f"webdataset root {root} does not exist: point --root at a directory of .tar shards, a shard "
                     f"file, or a brace pattern such as DIR/shard-{{000000..000009}}.tar")


# ---------------------------------------------------------------------------------------------- scanning

def _zeros(f, start: int, end: int) -> bool:
    """Whether bytes [start, end) of ``f`` are all zero (tar padding and end-of-archive blocks)."""
    f.seek(start)
    while start < end:
        chunk = f.read(min(end - start, 1 << 20))
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False
        start += len(chunk)
    return True


def _decodes(data: bytes) -> str:
    """'' if the image decodes completely, else why not."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"
    return ""


def scan_shard(path: Path, label_ext: str, check_images: bool, bar=None) -> tuple[list[Sample], str]:
    """The samples of one shard, each marked ``bad`` where the tar is damaged around it, and a
    shard-level problem ('' if none). Reads every header and the label members; with ``check_images``
    also decodes every image. Never stops silently where ``tarfile`` would (it takes a corrupt header
    after the first for the end of the archive): bytes between members and after the last one must be
    zero, so damage is found and reading goes on past it (``ignore_zeros`` resynchronises)."""
    shard, size = str(path), path.stat().st_size
    samples: list[Sample] = []
    cur: Sample | None = None
    expected, prev, pending, cut = 0, None, "", ""  # end of the last member, its name, damage before the next
    done = 0  # bytes counted on the progress bar
    keys: set[str] = set()
    with open(path, "rb") as f:
        _refuse_compressed(f, shard)
        try:
            members = iter(tarfile.open(fileobj=f, mode="r:", ignore_zeros=True))
        except (tarfile.TarError, EOFError, OSError) as e:
            return [], f"{shard}: not a tar archive ({e})"
        while not cut:
            try:
                ti = next(members, None)
            except (tarfile.TarError, EOFError, OSError) as e:
                cut = f"{shard}: damaged tar after member {prev} ({e})"
                break
            if ti is None:
                break
            if ti.offset > expected and not _zeros(f, expected, ti.offset):
                pending = (f"{shard}: damaged tar data at bytes {expected}-{ti.offset}, after member {prev} and "
                           f"before member {ti.name} (members in between are lost)")
                if cur is not None:
                    cur.spoil(pending)
            if ti.offset_data + ti.size > size:
                cut = (f"{shard}: member {ti.name} is cut short ({size - ti.offset_data} of {ti.size} bytes): the "
                       f"shard is truncated")
            expected, prev = ti.offset_data + -(-ti.size // _BLOCK) * _BLOCK, ti.name
            if bar is not None:
                bar.update(min(expected, size) - done)
                done = min(expected, size)
            key, ext = base_plus_ext(ti.name)
            if not ti.isreg() or _META.match(ti.name) or key is None:
                continue
            if cur is None or key != cur.key:
                if key in keys:
                    raise InputError(f"{shard}: the members of sample {key} are not next to each other (member "
                                     f"{ti.name} comes after members of other samples). webdataset reads a sample "
                                     f"only from consecutive members: re-create the tar with its names sorted (GNU "
                                     f"tar: `tar --sort=name -cf SHARD.tar FILES`)")
                keys.add(key)
                cur = Sample(shard, key)
                samples.append(cur)
            if pending:
                cur.spoil(pending)
                pending = ""
            if cut:
                break
            ext = ext.lower()
            if ext in cur.members:
                cur.spoil(f"{shard}: member {ti.name} repeats extension '{ext}' of sample {key}")
            member = cur.members[ext] = Member(shard, ti.name, ti.offset_data, ti.size)
            if ext == label_ext:
                cur.label_data = member.read()
            elif check_images and ext in IMAGE_EXTS:
                why = _decodes(member.read())
                if why:
                    cur.spoil(f"{shard}: member {ti.name} does not decode ({why})")
        if not cut and expected < size and not _zeros(f, expected, size):
            cut = (f"{shard}: not a tar archive (no readable tar header)" if prev is None else
                   f"{shard}: damaged or cut short after member {prev} (bytes {expected}-{size} are not tar headers)")
    if bar is not None:
        bar.update(size - done)
    if cut and cur is not None:
        cur.spoil(cut)
    if not samples:
        return [], cut or pending or f"{shard}: holds no samples (an empty tar)"
    return samples, ""


def _refuse_compressed(f, shard: str) -> None:
    magic = f.read(6)
    f.seek(0)
    for sig, kind, tool in _COMPRESSED:
        if magic.startswith(sig):
            raise InputError(f"{shard} is {kind}-compressed: this converter reads plain .tar shards (the writer "
                             f"reads members by offset). Decompress first (`{tool} {shard}`) and point --root at "
                             f"the .tar files")


def _stats_problem(path: Path, found: int) -> str:
    """img2dataset's ``{shard}_stats.json`` says how many samples it wrote ('successes')."""
    stats = path.with_name(path.name[:-len(".tar")] + "_stats.json") if path.name.endswith(".tar") else None
    if stats is None or not stats.is_file():
        return ""
    try:
        want = json.loads(stats.read_text())["successes"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""  # not img2dataset's file, or not readable: nothing to check against
    if isinstance(want, int) and found < want:
        return (f"{path}: holds {found} samples but {stats.name} says {want} were written: the shard is damaged "
                f"or cut short ({want - found} sample(s) missing)")
    return ""


# ---------------------------------------------------------------------------------------------- labels

def parse_label_key(label_key: str) -> tuple[str, list[str] | None]:
    """'cls' -> ('cls', None) (an integer member); 'json.a.b' -> ('json', ['a', 'b']) (a JSON field)."""
    if label_key in (LABEL_AUTO, LABEL_NONE):
        return ("cls" if label_key == LABEL_AUTO else ""), None
    if label_key.startswith("json.") and len(label_key) > 5 and "" not in label_key[5:].split("."):
        return "json", label_key[5:].split(".")
    if re.fullmatch(r"[a-z0-9_]+", label_key):
        return label_key, None
    raise InputError(f"--label-key {label_key!r} is not understood: use auto, none, an extension holding an "
                     f"integer (cls), or json.FIELD for a field of the json member (e.g. json.label)")


def _label(sample: Sample, ext: str, path: list[str] | None) -> int | str | None:
    """The sample's label (None: it has none), or raise ValueError for a member that does not parse."""
    if sample.label_data is None:
        return None
    member = sample.members[ext]
    if path is None:
        try:
            return int(sample.label_data.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{sample.shard}: member {member.name} is not an integer label "
                             f"({sample.label_data[:20]!r})") from None
    try:
        value = json.loads(sample.label_data)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{sample.shard}: member {member.name} is not valid JSON ({e})") from None
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, str))):
        raise InputError(f"sample {sample}: label json.{'.'.join(path)} is {value!r}, not an integer or a string: "
                         f"choose another --label-key")
    return value


def read_classes(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read --classes {path} ({e}): give a UTF-8 text file, one class name per "
                         f"line") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [s.strip() for s in lines]
    if not names:
        raise InputError(f"--classes {path} is empty: give one class name per line (line k names label k)")
    if "" in names:
        raise InputError(f"--classes {path}: line {names.index('') + 1} is blank; line k names label k, so "
                         f"every line needs a name")
    if len(set(names)) < len(names):
        dup = next(n for k, n in enumerate(names) if n in names[:k])
        raise InputError(f"--classes {path} names {dup} more than once: class names must differ")
    return names


def class_indices(samples: list[Sample], values: list, classes_file: str,
                  label_key: str) -> tuple[list[str], list[int]]:
    """(class names, label index per sample) from label values (all int or all str)."""
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        i = next(k for k, v in enumerate(values) if isinstance(v, str))
        j = next(k for k, v in enumerate(values) if isinstance(v, int))
        raise InputError(f"--label-key {label_key} mixes integers and strings: sample {samples[j]} has "
                         f"{values[j]!r}, sample {samples[i]} has {values[i]!r}. Make them one kind")
    names = read_classes(classes_file) if classes_file else None
    if kinds == {str}:
        if names is None:
            names = sorted(set(values))
        index = {n: k for k, n in enumerate(names)}
        unknown = next((k for k, v in enumerate(values) if v not in index), None)
        if unknown is not None:
            raise InputError(f"sample {samples[unknown]} has label {values[unknown]!r}, which --classes "
                             f"{classes_file} does not list: add it to the file")
        labels = [index[v] for v in values]
    else:
        bad = next((k for k, v in enumerate(values) if v < 0 or (names is not None and v >= len(names))), None)
        if bad is not None:
            where = f"outside the {len(names)} names of --classes {classes_file}" if names is not None and \
                values[bad] >= 0 else "negative"
            raise InputError(f"sample {samples[bad]} has label {values[bad]}, {where}: labels are class indices "
                             f"0..K-1 (line k of --classes names label k)")
        if names is None:
            names = [str(k) for k in range(max(values) + 1)]
        labels = list(values)
    present = set(labels)
    empty = [names[k] for k in range(len(names)) if k not in present]
    if empty:
        fix = (f"remove those names from --classes {classes_file}" if kinds == {str} else
               "labels are class indices 0..K-1, so renumber them without gaps"
               + (f" and list only those classes in --classes {classes_file}" if classes_file else "")
               + ", or pass --label-key none for one class")
        raise InputError(f"{len(empty)} of {len(names)} classes have no samples ({', '.join(map(str, empty[:5]))}"
                         f"{' ...' if len(empty) > 5 else ''}): every class needs samples; {fix}")
    return names, labels


# ---------------------------------------------------------------------------------------------- the source

def webdataset_source(root: str, label_key: str = LABEL_AUTO, classes_file: str = "", skip_bad: bool = False,
                      max_images: int = 0, log=None, **image_options) -> Source:
    """Scan the shards (damage, labels), then check every image header; return the Source.
    ``image_options``: :func:`data_shards.imagefolder.images_source`'s size and mode options. With a
    ``log``, a progress bar on stderr."""
    check_options(max_images=max_images, **image_options)
    label_ext, path = parse_label_key(label_key)
    shards = shard_paths(str(root))
    samples, problems = _scan_all(shards, label_ext, skip_bad, progress=log is not None)
    values = _check_samples(samples, label_ext, path, root)
    bad = [s for s in samples if s.bad]
    if bad or problems:
        _skip_bad(bad, problems, skip_bad, log)
        samples, values = [s for s in samples if not s.bad], [v for s, v in zip(samples, values) if not s.bad]
        if not samples:
            raise InputError(f"{root}: --skip-bad left no samples: every one is damaged")

    where = Path(shards[0]).resolve().parent
    name = where.name if where.name not in ("train", "test", "val", "valid") else where.parent.name
    resolved = _resolve_label_key(samples, values, label_key, label_ext, path)
    if resolved == LABEL_NONE:
        if classes_file:
            raise InputError(f"--classes {classes_file} names classes, but the samples carry no labels "
                             f"(label key {resolved}): drop --classes, or name the label with --label-key")
        classes, labels = [name or "images"], [0] * len(samples)
    else:
        classes, labels = class_indices(samples, values, classes_file, resolved)

    meta = {"source": "webdataset", "root": str(Path(root).resolve()) if Path(root).exists() else str(root),
            "shards": len(shards), "label_key": resolved}
    if bad or problems:
        meta.update(bad_samples_skipped=len(bad), bad_shard_problems=len(problems))
    if max_images:
        meta["max_images"] = max_images
    keep = pick_subset(len(samples), max_images)
    images = [samples[i].image for i in keep]
    opener, fix = lambda m: io.BytesIO(m.read()), "pass --skip-bad to leave such samples out, or re-create the shard"
    return images_source(name, tuple(classes), images, [labels[i] for i in keep],
                         read_headers(images, log, opener, fix), meta, log=log, opener=opener, fix=fix,
                         **image_options)


def _scan_all(shards: list[Path], label_ext: str, check_images: bool, progress: bool):
    """Every shard's samples, and the damage that is no one sample's (one line per shard)."""
    from tqdm import tqdm

    samples: list[Sample] = []
    problems: list[str] = []
    with tqdm(total=sum(p.stat().st_size for p in shards), desc="read shards", unit="B", unit_scale=True,
              disable=not progress, dynamic_ncols=True) as bar:
        for p in shards:
            found, problem = scan_shard(p, label_ext, check_images, bar)
            problem = problem or _stats_problem(p, len(found))
            if problem:
                problems.append(problem)
            samples.extend(found)
    return samples, problems


def _check_samples(samples: list[Sample], label_ext: str, path: list[str] | None, root: str) -> list:
    """Each sample's label value (None: none); spoils samples whose label does not parse or that
    have no image; refuses a sample with two images and shards without any image."""
    values = []
    for s in samples:
        try:
            values.append(_label(s, label_ext, path) if label_ext else None)
        except ValueError as e:
            s.spoil(str(e))
            values.append(None)
        images = [e for e in IMAGE_EXTS if e in s.members]
        if len(images) > 1:
            raise InputError(f"sample {s} holds {' and '.join(images)} images: keep one image per sample")
        if not images:
            s.spoil(f"{s.shard}: sample {s.key} has no image member ({', '.join(IMAGE_EXTS)}); it has "
                    f"{', '.join(sorted(s.members)) or 'nothing'}")
    if samples and not any(e in s.members for s in samples for e in IMAGE_EXTS):
        exts = sorted({e for s in samples for e in s.members})
        raise InputError(f"no sample in {root} has an image member ({', '.join(IMAGE_EXTS)}); the members are "
                         f"{', '.join(exts[:8])}: these are not image shards")
    return values


def _skip_bad(bad: list[Sample], problems: list[str], skip_bad: bool, log) -> None:
    """Refuse damaged input, or (``skip_bad``) say what is left out."""
    shown = list(dict.fromkeys([*problems, *(s.bad for s in bad)]))  # neighbours may share one damage
    if not skip_bad:
        more = len(bad) + len(problems) - 1
        raise InputError(f"damaged input: {shown[0]}" + (f" (and {more} more damaged sample(s) or shard(s))"
                         if more else "") + f". {SKIP_HINT}")
    if log:
        log(f"--skip-bad: left out {len(bad)} damaged sample(s)"
            + (f"; {len(problems)} shard problem(s)" if problems else "")
            + ": " + "; ".join(shown[:3]) + (" ..." if len(shown) > 3 else ""))


def _resolve_label_key(samples: list[Sample], values: list, label_key: str, label_ext: str,
                       path: list[str] | None) -> str:
    """``auto`` -> ``cls`` or ``none``; refuse a label that no sample or only some samples have."""
    missing = [k for k, v in enumerate(values) if v is None]
    if label_key == LABEL_NONE or (label_key == LABEL_AUTO and len(missing) == len(values)):
        return LABEL_NONE
    resolved = label_ext if label_key == LABEL_AUTO else label_key
    if len(missing) == len(values):
        seen = ", ".join(sorted({e for s in samples for e in s.members}))
        if path is None:
            why = f"no sample has a '{label_ext}' member (the samples have {seen})"
        else:
            fields = json.loads(samples[0].label_data) if samples[0].label_data is not None else None
            why = f"no sample's json member has the field {'.'.join(path)} " + (
                f"(the first has {', '.join(map(str, list(fields)[:10]))})" if isinstance(fields, dict) else
                f"(the samples have {seen})")
        raise InputError(f"--label-key {label_key}: {why}. Name an existing label, or pass --label-key none for "
                         f"one class")
    if missing:
        s = samples[missing[0]]
        what = f"no '{label_ext}' member" if path is None else f"no field {'.'.join(path)} in its json member"
        raise InputError(f"sample {s} has {what} (label key {resolved}), but {len(values) - len(missing)} other "
                         f"sample(s) have one; {len(missing)} sample(s) lack it. Every sample needs a label: fix "
                         f"those samples, or pass --label-key none to train on one class")
    return resolved

"""``info DIR``: a shard directory's manifest as a two-column table (and, with ``--shards``, one row per shard)."""
from __future__ import annotations

from gan.data.manifest import Manifest


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _classes(m: Manifest) -> str:
    counts = m.build.get("class_counts")
    if m.num_classes == 1:
        return f"1 (unconditional: {m.classes[0]})"
    names = [f"{c} ({counts[k]:,})" if counts and len(counts) == m.num_classes else c
             for k, c in enumerate(m.classes)]
    shown = ", ".join(names[:20]) + (f", ... ({m.num_classes - 20} more)" if m.num_classes > 20 else "")
    return f"{m.num_classes}: {shown}"


def info_rows(m: Manifest) -> list[tuple[str, str]]:
    c, h, w = m.image_shape
    pixels = sum(c * h * w for c, h, w in m.image_shapes)
    on_disk = sum((m.dir / s.name).stat().st_size for s in m.shards if (m.dir / s.name).is_file())
    counts = sorted({s.count for s in m.shards})
    per = f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,}-{counts[-1]:,}"
    rows = [("directory", str(m.dir)), ("dataset", m.dataset), ("split", m.split),
            *([("pairs", f"{m.total:,} (input, target): image-to-image translation"),
               ("input shape", "x".join(map(str, m.input_shape)) + " (C x H x W)"),
               ("target shape", f"{c}x{h}x{w} (C x H x W)")] if m.paired else
              [("images", f"{m.total:,}"), ("image shape", f"{c}x{h}x{w} (C x H x W)")]),
            ("classes", _classes(m)), ("encoding", m.encoding),
            ("size as uint8", _mb(m.total * pixels) + " (what data.on_device=true keeps on the device)"),
            ("shards", f"{len(m.shards)} x {per} images, {m.shards[0].name} .. {m.shards[-1].name}, "
                       f"{_mb(on_disk)} on disk")]
    for k, v in m.build.items():
        if k != "class_counts":
            rows.append((f"build: {k}", str(v)))
    return rows


def info_table(m: Manifest, shards: bool = False) -> str:
    rows = info_rows(m)
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if shards:
        lines += ["", f"{'shard':<20} {'count':>7}  sha256"]
        lines += [f"{s.name:<20} {s.count:>7,}  {s.sha256}" for s in m.shards]
    return "\n".join(lines)

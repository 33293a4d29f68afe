"""Datasets -> webdataset tar shards + manifest.json, and checks on them.

    python -m data_shards build --source cifar10|imagefolder|fashion-mnist|mnist --root R --split train --out DIR
    python -m data_shards build --source paired --root R [--root-b B | --derive sketch|edges|gray] --out DIR
    python -m data_shards build --source webdataset --root 'DIR/shard-{000000..000009}.tar' --out DIR
    python -m data_shards verify DIR
    python -m data_shards preview DIR --out grid.png
    python -m data_shards ensure-cifar10 --out DIR --root R --shared ../shared/data/cifar10-jpeg.tar.gz

Format: docs/CONTRACTS.md ("Shards") and gan/data/codec.py. Bad input exits with code 2 and a message
naming the path and the fix.
"""
from data_shards.sources import InputError, Source, array_source, open_source
from data_shards.writer import build_shards

__all__ = ["InputError", "Source", "array_source", "build_shards", "open_source"]

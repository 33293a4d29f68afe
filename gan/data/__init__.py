"""The webdataset data pipeline: shard manifests, the training stream and eval reading.

    from gan.data import TrainStream, DeviceStream, train_stream, ShardError, read_manifest, eval_batches
    from gan.data import require_paired, require_single  # a family that needs pairs, or single images

Paired shards (image-to-image translation) give ``(a, b, y)`` batches where single-image shards give ``(x, y)``.

See docs/CONTRACTS.md ("Loader") for the interface and ``gan/data/stream.py`` for how ranks,
workers, resampling and resume fit together. Shards are written by ``python -m data_shards build``.
"""
from gan.data.device import DeviceStream, train_stream
from gan.data.eval import eval_batches
from gan.data.manifest import (Manifest, ShardError, ShardInfo, class_names, read_manifest, require_paired,
                               require_single)
from gan.data.stream import TrainStream

__all__ = ["DeviceStream", "Manifest", "class_names", "ShardError", "ShardInfo", "TrainStream", "eval_batches", "read_manifest",
           "require_paired", "require_single", "train_stream"]

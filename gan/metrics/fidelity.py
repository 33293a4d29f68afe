"""FID, IS, KID and precision/recall through torch-fidelity 0.4 and its Inception-v3 feature extractor.

* Generated images go in as a ``Dataset`` of uint8 (3, H, W) tensors (``input1``), never as
  torch-fidelity's generative-model input: with ``input1_model_num_classes > 0`` that path calls
  ``np.int``, which NumPy >= 1.24 no longer has.
* Real images are the shard set's (``input2``), read lazily: torch-fidelity looks its feature cache
  up first (``input2_cache_name`` = a key of the shard manifest + the weights file's sha256 + the
  real-image count), so a cache hit reads no shard.
* The weights are always given to torch-fidelity as a local file (``feature_extractor_weights_path``):
  ``--inception-weights PATH``, else torch.hub's cached copy, else (with internet) one download into
  that cache, checked against its sha256 prefix. Offline, :func:`resolve_inception_weights` says which
  file is needed, where it comes from and which flag takes it. ``GAN_METRICS_NO_DOWNLOAD=1`` skips
  the download attempt.
* Precision/recall use the same Inception pool features (2048-d) as FID/KID, so one weights file
  serves every metric (torch-fidelity's default for prc would be VGG-16, a second download).
* torch-fidelity has no torch.distributed inside: call this on one rank (see ``collective.on_rank0``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from gan.metrics.cache import DEFAULT_CACHE, cache_key, file_sha256
from gan.metrics.errors import MetricError
from gan.metrics.realdata import load_shard_images

EXTRACTOR = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's pt_inception-2015-12-05
INCEPTION_SHA256_PREFIX = "6726825d"  # torch.hub's naming convention: the first 8 hex digits of sha256
_KEYS = {"frechet_inception_distance": "fid", "inception_score_mean": "isc", "inception_score_std": "isc_std",
         "kernel_inception_distance_mean": "kid", "kernel_inception_distance_std": "kid_std",
         "precision": "precision", "recall": "recall", "f_score": "f_score"}


def inception_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    return URL_INCEPTION_V3


def hub_cache_path() -> Path:
    """Where torch-fidelity itself would keep the downloaded file (torch.hub's checkpoint dir)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def _howto() -> str:
    return (f"FID, IS, KID and precision/recall need torch-fidelity's Inception-v3 weights "
            f"(pt_inception-2015-12-05, file {INCEPTION_FILE}, about 91 MB). "
            f"Fetch {inception_url()} on a machine with internet, e.g. "
            f"`curl -L -o {INCEPTION_FILE} {inception_url()}`, then pass it with --inception-weights PATH "
            f"(metrics.inception_weights=PATH in a config), or put it at {hub_cache_path()}. "
            f"Without it, use the offline metrics: cls_acc, cls_fd")


def _download(dst: Path, timeout: float = 30.0) -> None:
    """torch-fidelity's weights into ``dst`` (atomically), verified by the sha256 prefix in the name."""
    import hashlib
    import sys
    import urllib.request

    from gan.io import atomic_writer

    dst.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {inception_url()} to {dst}", file=sys.stderr, flush=True)
    h = hashlib.sha256()
    with atomic_writer(dst) as f, urllib.request.urlopen(inception_url(), timeout=timeout) as r:
        for block in iter(lambda: r.read(1 << 20), b""):
            f.write(block)
            h.update(block)
        if not h.hexdigest().startswith(INCEPTION_SHA256_PREFIX):
            raise OSError(f"downloaded file has sha256 {h.hexdigest()[:16]}..., expected {INCEPTION_SHA256_PREFIX}...")


def resolve_inception_weights(path: str | os.PathLike | None) -> Path:
    """The weights file to use: ``path`` if given (it must exist), else torch.hub's cached copy, else a
    download into that cache (unless ``GAN_METRICS_NO_DOWNLOAD=1``). Raises :class:`MetricError` saying
    which file is needed, where it comes from and which flag takes it."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise MetricError(f"Inception weights file not found: {p}. " + _howto())
        return p
    cached = hub_cache_path()
    if cached.is_file():
        return cached
    if os.environ.get("GAN_METRICS_NO_DOWNLOAD", "") not in ("", "0"):
        raise MetricError(f"no Inception weights file given, none at {cached}, and GAN_METRICS_NO_DOWNLOAD is "
                          f"set. " + _howto())
    try:
        _download(cached)
    except Exception as e:  # noqa: BLE001 - offline, proxy, disk: all mean "get the file yourself"
        raise MetricError(f"no Inception weights file given, none at {cached}, and the download failed "
                          f"({type(e).__name__}: {e}). " + _howto()) from None
    return cached


_checked: set = set()
_EXPECTED = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
             "fc.weight": (1008, 2048)}


def check_inception_file(path: Path) -> None:
    """Raise :class:`MetricError` unless ``path`` holds an Inception-v3 state dict of torch-fidelity's shapes."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _checked:
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not the weights file"
        raise MetricError(f"{path} could not be read as Inception weights ({type(e).__name__}: {e}). "
                          + _howto()) from None
    if not isinstance(state, dict):
        state = {}
    bad = [f"{k}: {tuple(state[k].shape) if k in state else 'missing'} (expected {v})" for k, v in _EXPECTED.items()
           if k not in state or not torch.is_tensor(state[k]) or tuple(state[k].shape) != v]
    if bad:
        raise MetricError(f"{path} is not torch-fidelity's Inception-v3 state dict ({'; '.join(bad)}). " + _howto())
    _checked.add(key)


def weights_identity(path: Path) -> dict:
    sha = file_sha256(path)
    return {"name": EXTRACTOR, "weights_sha256": sha, "official": sha.startswith(INCEPTION_SHA256_PREFIX)}


class ImagesDataset(Dataset):
    """uint8 (N, C, H, W) images as a Dataset of (3, H, W) uint8 tensors (grey images repeated to RGB)."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 (N, 1|3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


class ShardImagesDataset(Dataset):
    """The images of a shard set (the first ``max_real`` if > 0), loaded on first access."""

    def __init__(self, shards_dir: str | Path, max_real: int = 0):
        self.shards_dir, self.max_real = shards_dir, max_real
        self._ds = None

    def _load(self) -> ImagesDataset:
        if self._ds is None:
            self._ds = ImagesDataset(load_shard_images(self.shards_dir, self.max_real)[0])
        return self._ds

    def __len__(self) -> int:
        return len(self._load())

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._load()[i]


def fidelity_metrics(fake: torch.Tensor, names: list[str], real_shards: str | Path, weights: Path,
                     device: torch.device, batch_size: int = 64, kid_subset_size: int = 1000,
                     isc_splits: int = 10, max_real: int = 0, cache_dir: str | Path | None = None,
                     verbose: bool = False) -> tuple[dict, dict]:
    """Rank 0 only. ``fake``: uint8 (N, C, H, W). Returns (values, details) with keys fid, isc, isc_std,
    kid, kid_std, precision, recall, f_score (those asked for)."""
    import torch_fidelity

    names = [n for n in names if n in ("fid", "isc", "kid", "prc")]
    if not names:
        return {}, {}
    ident = weights_identity(weights)
    binary = any(n in names for n in ("fid", "kid", "prc"))
    cache_root = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    kwargs = dict(input1=ImagesDataset(fake), cuda=torch.device(device).type == "cuda", batch_size=batch_size,
                  isc="isc" in names, fid="fid" in names, kid="kid" in names, prc="prc" in names,
                  feature_extractor=EXTRACTOR, feature_extractor_weights_path=str(weights),
                  isc_splits=isc_splits, kid_subset_size=kid_subset_size, save_cpu_ram=True,
                  cache=True, cache_root=str(cache_root / "fidelity"), verbose=verbose)
    real_key = None
    if binary:
        real_key = "real-" + cache_key(real_shards, ident, max_real=max_real)
        kwargs.update(input2=ShardImagesDataset(real_shards, max_real), input2_cache_name=real_key)
    raw = torch_fidelity.calculate_metrics(**kwargs)
    values = {_KEYS[k]: float(v) for k, v in raw.items() if k in _KEYS}
    details = {"extractor": ident, "weights_path": str(weights), "real_cache": real_key,
               "kid_subset_size": kid_subset_size if "kid" in names else None,
               "isc_splits": isc_splits if "isc" in names else None,
               "prc_features": "inception-v3 pool3 (2048)" if "prc" in names else None}
    return values, {k: v for k, v in details.items() if v is not None}

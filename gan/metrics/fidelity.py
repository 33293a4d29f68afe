"""FID, IS, KID and precision/recall through torch-fidelity 0.4 and its Inception-v3 feature extractor.

* Generated images go in as a ``Dataset`` of uint8 (3, H, W) tensors, never as torch-fidelity's
  generative-model input: with ``input1_model_num_classes > 0`` that path calls ``np.int``, which
  NumPy >= 1.24 no longer has.
* Each rank extracts features of its own slice of the samples and of the real images with
  torch-fidelity's extractor; the metrics are then computed by torch-fidelity's own functions on every
  rank from what crossed ranks: float64 feature moments for FID, the feature rows for IS, KID and
  precision/recall. A rank's real features are cached (``inception-<key>.npz``; key = the shard
  manifest with its checksums + the weights file's sha256 + the layers + the real-image slice), so a
  cache hit reads no shard.
* The weights are always given to torch-fidelity as a local file (``feature_extractor_weights_path``):
  ``--inception-weights PATH``, else torch.hub's cached copy, else (with internet) one download into
  that cache, checked against its sha256 prefix. Offline, :func:`resolve_inception_weights` says which
  file is needed, where it comes from and which flag takes it. ``GAN_METRICS_NO_DOWNLOAD=1`` skips
  the download attempt.
* Precision/recall use the same Inception pool features (2048-d) as FID/KID, so one weights file
  serves every metric (torch-fidelity's default for prc would be VGG-16, a second download).
* torch-fidelity has no torch.distributed inside: gan.metrics.collective moves the statistics.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from gan.metrics.cache import StatsCache, announce, cache_key, file_sha256
from gan.metrics.errors import MetricError
from gan.metrics.frechet import moments, moments_to_gaussian
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


_extractors: dict = {}
_DIMS = {"2048": 2048, "logits_unbiased": 1008}


def layer_for(metric: str) -> str:
    """torch-fidelity's feature layer for ``metric`` (fid, isc, kid, prc) of our extractor."""
    from torch_fidelity.utils import resolve_feature_layer_for_metric
    return resolve_feature_layer_for_metric(metric, feature_extractor=EXTRACTOR)


def _extractor(weights: Path, layers: tuple[str, ...], cuda: bool):
    from torch_fidelity.utils import create_feature_extractor

    key = (str(weights), file_sha256(weights), layers, cuda)
    if key not in _extractors:
        _extractors.clear()
        _extractors[key] = create_feature_extractor(EXTRACTOR, list(layers), cuda=cuda, verbose=False,
                                                    feature_extractor_weights_path=str(weights))
    return _extractors[key]


def features(images: torch.Tensor, layers: tuple[str, ...], weights: Path, device, batch_size: int,
             progress: bool = False) -> dict[str, np.ndarray]:
    """torch-fidelity's Inception features of uint8 (N, C, H, W) ``images``, per layer, float32 (N, D)."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    if len(images) == 0:  # a rank with no samples adds nothing
        return {k: np.zeros((0, _DIMS[k]), np.float32) for k in layers}
    cuda = torch.device(device).type == "cuda"
    out = get_featuresdict_from_dataset(ImagesDataset(images), _extractor(weights, layers, cuda), batch_size, cuda,
                                        True, progress)
    return {k: v.numpy() for k, v in out.items()}


def _needs(names: list[str]) -> tuple[set, set]:
    """(layers whose rows must be gathered, layers whose moments suffice)."""
    rows = {layer_for(n) for n in names if n in ("isc", "kid", "prc")}
    return rows, ({layer_for("fid")} if "fid" in names else set())


def real_features(real_shards: str | Path, layers: tuple[str, ...], weights: Path, device, batch_size: int,
                  max_real: int = 0, cache_dir: str | Path | None = None, progress: bool = False) -> dict:
    """Inception features of this rank's slice of the real images, computed once and cached under a key of
    the shards' checksums, the extractor (weights sha256, layers) and the slice."""
    from gan.metrics.collective import rank, rank_range, world_size
    from gan.metrics.realdata import real_count

    lo, hi = rank_range(real_count(real_shards, max_real), rank(), world_size())
    key = cache_key(real_shards, {**weights_identity(weights), "layers": list(layers)}, max_real=max_real,
                    slice=[lo, hi])
    cache = StatsCache(Path(cache_dir) if cache_dir else None)
    hit = cache.load("inception", key)
    if hit is not None and set(hit) >= set(layers):
        return {k: hit[k] for k in layers}
    announce("real statistics (Inception features)", real_count(real_shards, max_real), real_shards, cache)
    images = load_shard_images(real_shards, max_real)[0][lo:hi]
    out = features(images, layers, weights, device, batch_size, progress)
    cache.save("inception", key, out, {"shards": str(real_shards), "weights": str(weights), "slice": [lo, hi]})
    return out


def fidelity_local(fake: torch.Tensor, names: list[str], real_shards: str | Path, weights: Path, device,
                   batch_size: int = 64, max_real: int = 0, cache_dir: str | Path | None = None,
                   progress: bool = False) -> dict:
    """Not a collective. This rank's part of fid/isc/kid/prc from its slice of the samples (uint8 ``fake``)
    and of the real images: ``{"sums": ..., "rows": ..., "details": ...}``. FID needs only float64 moments
    (as torchmetrics' FID syncs them); IS, KID and precision/recall need the feature rows themselves
    (as stylegan2-ada's FeatureStats keeps them)."""
    names = [n for n in names if n in ("fid", "isc", "kid", "prc")]
    if not names:
        return {"sums": {}, "rows": {}, "details": {}}
    rows, summed = _needs(names)
    fake_f = features(fake, tuple(sorted(rows | summed)), weights, device, batch_size, progress)
    real_layers = tuple(sorted({layer_for(n) for n in names if n in ("fid", "kid", "prc")}))
    real_f = real_features(real_shards, real_layers, weights, device, batch_size, max_real, cache_dir,
                           progress) if real_layers else {}
    sums, out_rows = {}, {}
    for layer in summed:
        sums.update(moments(fake_f[layer], f"inc.fake.{layer}."))
        sums.update(moments(real_f[layer], f"inc.real.{layer}."))
    for layer in rows:
        out_rows[f"inc.fake.{layer}"] = fake_f[layer]
        if layer in real_f:
            out_rows[f"inc.real.{layer}"] = real_f[layer]
    return {"sums": sums, "rows": out_rows, "details": {}}


def fidelity_finish(sums: dict, rows: dict, names: list[str], weights: Path, kid_subset_size: int = 1000,
                    isc_splits: int = 10) -> tuple[dict, dict]:
    """Every rank, from the sums and rows of all ranks: fid, isc, isc_std, kid, kid_std, precision, recall,
    f_score (those asked for), with torch-fidelity's own formulas and defaults (seeds included)."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric

    names = [n for n in names if n in ("fid", "isc", "kid", "prc")]
    if not names:
        return {}, {}
    raw = {}
    if "fid" in names:
        stat = {}
        for side in ("fake", "real"):
            p = f"inc.{side}.{layer_for('fid')}."
            mu, sigma = moments_to_gaussian(sums[p + "n"], sums[p + "s"], sums[p + "ss"])
            stat[side] = {"mu": mu, "sigma": sigma}
        raw.update(fid_statistics_to_metric(stat["fake"], stat["real"], False))

    def fd(side, metric):
        layer = layer_for(metric)
        return {layer: torch.from_numpy(rows[f"inc.{side}.{layer}"])}

    if "isc" in names:
        raw.update(isc_featuresdict_to_metric(fd("fake", "isc"), layer_for("isc"), isc_splits=isc_splits,
                                              verbose=False))
    if "kid" in names:
        raw.update(kid_featuresdict_to_metric(fd("fake", "kid"), fd("real", "kid"), layer_for("kid"),
                                              kid_subset_size=kid_subset_size, verbose=False))
    if "prc" in names:
        raw.update(prc_featuresdict_to_metric(fd("fake", "prc"), fd("real", "prc"), layer_for("prc"), verbose=False))
    values = {_KEYS[k]: float(v) for k, v in raw.items() if k in _KEYS}
    details = {"extractor": weights_identity(weights), "weights_path": str(weights),
               "kid_subset_size": kid_subset_size if "kid" in names else None,
               "isc_splits": isc_splits if "isc" in names else None,
               "prc_features": "inception-v3 pool3 (2048)" if "prc" in names else None}
    return values, {k: v for k, v in details.items() if v is not None}

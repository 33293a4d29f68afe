"""The offline metrics, computed with the committed CIFAR-10 classifier (no download, no Inception):

* ``cls_acc``: share of generated images the classifier assigns to their conditioning class, overall
  and per class (``cls_acc/<class>``);
* ``cls_fd``: Frechet distance between generated and real images in the classifier's penultimate
  feature space (256-d), overall and per class (``cls_fd/<class>``). Its scale is this network's own:
  it is not FID and is comparable only with values from the same classifier file and sample count.

Real statistics (mean/covariance overall and per class) are cached on disk under a key of the shard
manifest, the classifier file's sha256 and the real-image count.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gan.metrics.cache import StatsCache, cache_key, file_sha256
from gan.metrics.classifier import DEFAULT_WEIGHTS, ClassifierError, load_classifier, read_classifier_info
from gan.metrics.errors import MetricError
from gan.metrics.frechet import frechet_distance, gaussian_stats
from gan.metrics.realdata import load_shard_images

_models: dict = {}


def classifier_path(path: str | Path | None) -> Path:
    return Path(path).expanduser() if path else DEFAULT_WEIGHTS


def check_classifier(path: str | Path | None, real_classes: list[str]) -> dict:
    """The classifier's info; raises :class:`MetricError` if the file is missing or was trained on other classes."""
    p = classifier_path(path)
    try:
        arch, info = read_classifier_info(p)
    except ClassifierError as e:
        raise MetricError(f"{e} (--classifier / metrics.classifier)") from None
    classes = info.get("classes")
    if classes is not None and list(classes) != list(real_classes):
        raise MetricError(f"classifier {p} was trained on classes {classes}, but the real shards hold "
                          f"{list(real_classes)}: cls_acc/cls_fd need a classifier of the same classes "
                          f"(train one with benchmarks/train_classifier.py and pass --classifier PATH)")
    return {"path": str(p), "sha256": file_sha256(p), "arch": arch,
            "test_accuracy": info.get("test_accuracy_fp32") or info.get("test_accuracy")}


def _classifier(path: Path, device) -> torch.nn.Module:
    key = (str(path.resolve()), file_sha256(path), str(device))
    if key not in _models:
        _models.clear()
        _models[key] = load_classifier(path, device)[0]
    return _models[key]


@torch.no_grad()
def classify(model: torch.nn.Module, images: torch.Tensor, batch_size: int, device,
             progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, H, W) -> (features float64 (N, D), predicted class (N,)), on the CPU."""
    from tqdm import tqdm

    feats, preds = [], []
    for xb in tqdm(images.split(batch_size), desc="classifier features", unit="batch", disable=not progress,
                   dynamic_ncols=True):
        x = xb.to(device).float().div_(127.5).sub_(1.0)
        f, logits = model.features_and_logits(x)
        feats.append(f.double().cpu())
        preds.append(logits.argmax(1).cpu())
    return torch.cat(feats), torch.cat(preds)


def real_stats(real_shards: str | Path, path: Path, device, batch_size: int, max_real: int = 0,
               cache_dir: str | Path | None = None, progress: bool = False) -> dict:
    """Mean/covariance of the real images' classifier features: overall ("mu", "sigma") and per class
    ("mu_k", "sigma_k" stacked over classes), plus "count_k" and the real accuracy "acc"."""
    key = cache_key(real_shards, {"name": "cls-resnet9", "sha256": file_sha256(path)}, max_real=max_real)
    cache = StatsCache(Path(cache_dir) if cache_dir else None)
    hit = cache.load("cls", key)
    if hit is not None:
        return hit
    images, labels = load_shard_images(real_shards, max_real)
    feats, preds = classify(_classifier(path, device), images, batch_size, device, progress)
    num_classes = int(labels.max()) + 1
    mu, sigma = gaussian_stats(feats)
    d = feats.shape[1]
    mu_k, sigma_k, count_k = np.zeros((num_classes, d)), np.zeros((num_classes, d, d)), np.zeros(num_classes)
    for k in range(num_classes):
        sel = feats[labels == k]
        count_k[k] = len(sel)
        if len(sel) >= 2:
            mu_k[k], sigma_k[k] = gaussian_stats(sel)
    out = {"mu": mu, "sigma": sigma, "mu_k": mu_k, "sigma_k": sigma_k, "count_k": count_k,
           "acc": np.array(float((preds == labels).double().mean()))}
    cache.save("cls", key, out, {"shards": str(real_shards), "classifier": str(path), "max_real": max_real})
    return out


def cls_metrics(images: torch.Tensor, labels: torch.Tensor, names: list[str], class_names: list[str],
                real_shards: str | Path, classifier: str | Path | None, device, batch_size: int = 256,
                max_real: int = 0, cache_dir: str | Path | None = None, progress: bool = False) -> tuple[dict, dict]:
    """Rank 0 only. ``images`` uint8 (N, C, H, W) drawn for classes ``labels``. Returns (values, details)."""
    names = [n for n in names if n in ("cls_acc", "cls_fd")]
    if not names:
        return {}, {}
    path = classifier_path(classifier)
    info = check_classifier(path, class_names)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    feats, preds = classify(_classifier(path, device), images, batch_size, device, progress)
    labels = labels.cpu()
    values = {}
    if "cls_acc" in names:
        values["cls_acc"] = float((preds == labels).double().mean())
        for k, name in enumerate(class_names if len(class_names) > 1 else []):  # no class rows for one class
            sel = labels == k
            if sel.any():
                values[f"cls_acc/{name}"] = float((preds[sel] == k).double().mean())
    details = {"classifier": info}
    if "cls_fd" in names:
        real = real_stats(real_shards, path, device, batch_size, max_real, cache_dir, progress)
        mu, sigma = gaussian_stats(feats)
        values["cls_fd"] = frechet_distance(mu, sigma, real["mu"], real["sigma"])
        for k, name in enumerate(class_names if len(class_names) > 1 else []):
            sel = feats[labels == k]
            if len(sel) >= 2 and real["count_k"][k] >= 2:
                mk, sk = gaussian_stats(sel)
                values[f"cls_fd/{name}"] = frechet_distance(mk, sk, real["mu_k"][k], real["sigma_k"][k])
        details["real_cls_acc"] = float(real["acc"])
    return values, details

"""The offline metrics, computed with the committed CIFAR-10 classifier (no download, no Inception):

* ``cls_acc``: share of generated images the classifier assigns to their conditioning class, overall
  and per class (``cls_acc/<class>``);
* ``cls_fd``: Frechet distance between generated and real images in the classifier's penultimate
  feature space (256-d), overall and per class (``cls_fd/<class>``). Its scale is this network's own:
  it is not FID and is comparable only with values from the same classifier file and sample count.

Each rank classifies its own slice of the samples and of the real images; only float64 sums (feature
sum, outer-product sum, count, overall and per class; correct predictions) cross ranks. A rank's
real-image sums are cached on disk under a key of the shard manifest (the shards' checksums), the
classifier file's sha256, the real-image count and the rank's slice.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gan.metrics.cache import StatsCache, announce, cache_key, file_sha256
from gan.metrics.classifier import DEFAULT_WEIGHTS, ClassifierError, load_classifier, read_classifier_info
from gan.metrics.errors import MetricError
from gan.metrics.frechet import frechet_distance, moments, moments_to_gaussian
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


def class_sums(feats: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor, num_classes: int,
               prefix: str) -> dict[str, np.ndarray]:
    """float64 sums of one part of a sample set (one rank's slice): feature moments overall and per class
    ("<prefix>n", "s", "ss"; "n_k", "s_k", "ss_k" stacked over classes) and correct predictions ("correct",
    "correct_k"). Sums of parts add up to the sums of the whole."""
    f = feats.double()
    labels = labels.cpu().long()
    onehot = torch.nn.functional.one_hot(labels, num_classes).double()  # (N, K)
    hit = (preds == labels).double()
    out = moments(f, prefix)
    out.update({prefix + "n_k": onehot.sum(0).numpy(), prefix + "s_k": (onehot.T @ f).numpy(),
                prefix + "ss_k": np.stack([(f[labels == k].T @ f[labels == k]).numpy() for k in range(num_classes)]),
                prefix + "correct": np.array(float(hit.sum())), prefix + "correct_k": (onehot.T @ hit).numpy()})
    return out


def _features(path: Path, images: torch.Tensor, batch_size: int, device, progress: bool):
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    model = _classifier(path, device)
    if len(images) == 0:  # a rank with no samples (fewer samples than ranks) adds zeros
        return torch.zeros(0, model.feature_dim, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return classify(model, images, batch_size, device, progress)


def real_sums(real_shards: str | Path, path: Path, num_classes: int, device, batch_size: int, max_real: int = 0,
              cache_dir: str | Path | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """:func:`class_sums` of this rank's slice of the real images ("real." keys), computed once and cached
    under a key of the shards' checksums, the classifier file's sha256, and the slice."""
    from gan.metrics.collective import rank_range, rank, world_size
    from gan.metrics.realdata import real_count

    lo, hi = rank_range(real_count(real_shards, max_real), rank(), world_size())
    key = cache_key(real_shards, {"name": "cls-resnet9", "sha256": file_sha256(path)}, max_real=max_real,
                    slice=[lo, hi], num_classes=num_classes)
    cache = StatsCache(Path(cache_dir) if cache_dir else None)
    hit = cache.load("cls", key)
    if hit is not None and set(hit) >= {"real.n", "real.ss_k"}:
        return {k: v for k, v in hit.items() if k.startswith("real.")}
    announce("real statistics (classifier features)", real_count(real_shards, max_real), real_shards, cache)
    images, labels = load_shard_images(real_shards, max_real)
    feats, preds = _features(path, images[lo:hi], batch_size, device, progress)
    out = class_sums(feats, preds, labels[lo:hi], num_classes, "real.")
    cache.save("cls", key, out, {"shards": str(real_shards), "classifier": str(path), "max_real": max_real,
                                 "slice": [lo, hi]})
    return out


def cls_local(images: torch.Tensor, labels: torch.Tensor, names: list[str], class_names: list[str],
              real_shards: str | Path, classifier: str | Path | None, device, batch_size: int = 256,
              max_real: int = 0, cache_dir: str | Path | None = None, progress: bool = False) -> dict:
    """Not a collective. This rank's part of cls_acc/cls_fd: ``{"sums": {...}, "details": {...}}`` from its
    slice of the samples (uint8 ``images`` drawn for classes ``labels``) and of the real images."""
    names = [n for n in names if n in ("cls_acc", "cls_fd")]
    if not names:
        return {"sums": {}, "details": {}}
    path = classifier_path(classifier)
    info = check_classifier(path, class_names)
    feats, preds = _features(path, images, batch_size, device, progress)
    sums = class_sums(feats, preds, labels, len(class_names), "fake.")
    if "cls_fd" in names:
        sums.update(real_sums(real_shards, path, len(class_names), device, batch_size, max_real, cache_dir,
                              progress))
    return {"sums": {f"cls.{k}": v for k, v in sums.items()}, "details": {"classifier": info}}


def cls_finish(sums: dict[str, np.ndarray], names: list[str], class_names: list[str]) -> dict:
    """Every rank, from the sums over all ranks (:func:`cls_local`'s, added up): the metric values."""
    names = [n for n in names if n in ("cls_acc", "cls_fd")]
    s = {k[4:]: v for k, v in sums.items() if k.startswith("cls.")}
    values, per_class = {}, class_names if len(class_names) > 1 else []  # no class rows for one class
    if "cls_acc" in names:
        values["cls_acc"] = float(s["fake.correct"] / s["fake.n"])
        for k, name in enumerate(per_class):
            if s["fake.n_k"][k] > 0:
                values[f"cls_acc/{name}"] = float(s["fake.correct_k"][k] / s["fake.n_k"][k])
    if "cls_fd" in names:
        real = moments_to_gaussian(s["real.n"], s["real.s"], s["real.ss"])
        values["cls_fd"] = frechet_distance(*moments_to_gaussian(s["fake.n"], s["fake.s"], s["fake.ss"]), *real)
        for k, name in enumerate(per_class):
            if s["fake.n_k"][k] >= 2 and s["real.n_k"][k] >= 2:
                fake_k = moments_to_gaussian(s["fake.n_k"][k], s["fake.s_k"][k], s["fake.ss_k"][k])
                real_k = moments_to_gaussian(s["real.n_k"][k], s["real.s_k"][k], s["real.ss_k"][k])
                values[f"cls_fd/{name}"] = frechet_distance(*fake_k, *real_k)
        values_real_acc = float(s["real.correct"] / s["real.n"])
        return values, {"real_cls_acc": values_real_acc}
    return values, {}


def cls_metrics(images: torch.Tensor, labels: torch.Tensor, names: list[str], class_names: list[str],
                real_shards: str | Path, classifier: str | Path | None, device, batch_size: int = 256,
                max_real: int = 0, cache_dir: str | Path | None = None, progress: bool = False) -> tuple[dict, dict]:
    """cls_acc/cls_fd of uint8 ``images`` drawn for classes ``labels``: (values, details). Collective when
    several ranks run (each passes its own slice of the samples); in one process, the whole set."""
    from gan.metrics.collective import all_sum

    part = cls_local(images, labels, names, class_names, real_shards, classifier, device, batch_size, max_real,
                     cache_dir, progress)
    values, extra = cls_finish(all_sum(part["sums"]), names, class_names)
    return values, {**part["details"], **extra}

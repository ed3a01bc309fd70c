"""Transfer learning from a pretrained backbone, in three modes.

- ``head``: run the frozen backbone once over the images (features cached on disk by content
  hash), then fit a linear or MLP head on them. Seconds once the cache is warm.
- ``finetune``: the ``head`` fit as a warm start, then all layers trained with a lower learning
  rate for the backbone (discriminative rates, as fastai's ``fine_tune``), batch-norm statistics
  frozen (small batches on small data would only add noise to them).
- ``auto``: chosen from model, data size and hardware; the log says what and why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from imgclf.core.errors import SettingsError
from imgclf.core.events import Events, StopToken, info
from imgclf.core.preprocessing import Preprocessing
from imgclf.core.settings import Settings
from imgclf.data.audit import content_hashes
from imgclf.data.sources import Sample
from imgclf.models.device import Runtime
from imgclf.models.factory import is_scratch_model
from imgclf.models.heads import set_classifier
from imgclf.training.data_setup import RunData
from imgclf.training.features import FeatureStore, extract_features
from imgclf.training.head import HeadFit, class_weights, fit_head

# Below this many training photos per class, fine-tuning overfits: on clothing-small with 20 per
# class the head reached 79.2% val / 83.6% test top-1 and finetune 77.4% / 79.3% (docs/benchmarks.md).
FINETUNE_MIN_PER_CLASS = 30


def refuse_transfer_without_weights(settings: Settings, pretrained: bool) -> None:
    """head and finetune start from pretrained weights: without them, say so at once."""
    mode = settings.train.mode
    if mode in ("head", "finetune") and (is_scratch_model(settings.model.model) or not pretrained):
        raise SettingsError(
            f"setting 'mode': '{mode}' needs a pretrained model; {settings.model.model} has no "
            f"pretrained weights here (use --mode full, or a pretrained --model)"
        )


def resolve_mode(
    settings: Settings, pretrained: bool, runtime: Runtime, n_train: int, n_classes: int = 1
) -> tuple[str, str]:
    """The training mode to use, and why (said in the log)."""
    mode = settings.train.mode
    if is_scratch_model(settings.model.model) or not pretrained:
        refuse_transfer_without_weights(settings, pretrained)
        return "full", "the model starts from scratch: all layers are trained"
    if mode != "auto":
        return mode, "as asked"
    if n_train < FINETUNE_MIN_PER_CLASS * n_classes:
        return "head", (
            f"{n_train / n_classes:.0f} training photos per class are too few to fine-tune "
            f"without overfitting: a head on cached frozen features"
        )
    if runtime.device.type == "cuda":
        return "finetune", "a GPU is available: the network is fine-tuned after the head"
    return "finetune", (
        f"{n_train / n_classes:.0f} training photos per class: a head on cached features, then the layers past "
        f"stride {settings.train.freeze_stride} fine-tuned for as many epochs as the time budget allows "
        f"(the head alone if none fits)"
    )


def use_class_weights(setting: str, targets: torch.Tensor, num_classes: int) -> bool:
    if setting != "auto":
        return setting == "on"
    counts = torch.bincount(targets, minlength=num_classes)
    counts = counts[counts > 0]
    return bool(len(counts)) and float(counts.max() / counts.min()) >= 3.0


@dataclass
class SplitFeatures:
    """Cached backbone features of one split: vectors, class indices and the samples they belong to."""

    x: torch.Tensor
    y: torch.Tensor
    samples: list[Sample]


def _features(
    engine: tuple[str, Callable],
    run_data: RunData,
    split: str,
    hashes: dict,
    settings: Settings,
    prep: Preprocessing,
    views: int,
    signals: tuple[Events, StopToken],
) -> SplitFeatures:
    samples = run_data.split(split)
    sample_hashes = [hashes[s.ref] for s in samples]
    targets = torch.tensor(run_data.targets(samples), dtype=torch.long)
    xs, ys, kept_samples = [], [], []
    for view in range(views + 1):
        store = FeatureStore(settings.model.model, settings.model.weights or "imagenet", prep, view, engine[0])
        x, kept = extract_features(
            engine[1],
            samples,
            sample_hashes,
            store,
            prep,
            *signals,
            view=view,
            seed=settings.train.seed,
            max_pixels=settings.system.max_pixels,
        )
        xs.append(x)
        ys.append(targets[kept])
        kept_samples += [samples[i] for i in kept]
    return SplitFeatures(torch.cat(xs), torch.cat(ys), kept_samples)


def fit_transfer_head(
    model,
    run_data: RunData,
    settings: Settings,
    prep: Preprocessing,
    runtime: Runtime,
    source: str,
    events: Events,
    stop: StopToken,
    engine: tuple[str, Callable],
) -> tuple[HeadFit, dict[str, SplitFeatures]]:
    """Cached features -> fitted head, installed as the model's classifier. Also returns the val and
    test features, from which head mode calibrates and evaluates without running the backbone again."""
    samples = run_data.samples
    digests = content_hashes(samples, settings.data, source, settings.system.max_pixels, stop)
    hashes = {s.ref: h for s, h in zip(samples, digests)}
    feats = {
        split: _features(
            engine,
            run_data,
            split,
            hashes,
            settings,
            prep,
            settings.train.distortions if split == "train" else 0,
            (events, stop),
        )
        for split in ("train", "val", "test")
    }
    train, val = feats["train"], feats["val"]
    num_classes = len(run_data.classes)
    weights = (
        class_weights(train.y, num_classes)
        if use_class_weights(settings.train.class_weights, train.y, num_classes)
        else None
    )
    fit = fit_head(
        train.x,
        train.y,
        val.x,
        val.y,
        num_classes,
        hidden=settings.model.head_hidden,
        weights=weights,
        label_smoothing=settings.train.label_smoothing,
        seed=settings.train.seed,
    )
    set_classifier(model, fit.head.to(runtime.device))
    info(
        events,
        f"head on {len(train.y)} feature vectors: val top-1 {fit.val_top1:.3f}, val loss {fit.val_loss:.4f}"
        f"{f', L2 {fit.l2:g}' if not settings.model.head_hidden else ''}"
        f"{', class-weighted loss' if weights is not None else ''}",
    )
    return fit, feats

"""A trained model put to work, in scikit-learn's manner: ``predict``, ``predict_proba``, ``classes_``.

Preprocessing comes from the bundle; images are decoded by the same loader as in training, in a
thread pool that works on the next batch while the model runs on this one.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgclf.bundle import Bundle, BundleError, load_bundle
from imgclf.data.dataset import prefetch_batches
from imgclf.results import UNKNOWN, FilePrediction
from imgclf.data.images import ImageError, load_image, to_rgb
from imgclf.data.transforms import eval_tensor
from imgclf.training.hardware import resolve_runtime
from imgclf.training.loop import model_input

ImageLike = str | os.PathLike | Image.Image | np.ndarray


class Classifier:
    """Predicts labels for photos with a trained bundle."""

    def __init__(self, bundle: Bundle, device: str = "auto", precision: str = "auto", batch_size: int = 64):
        self.runtime = resolve_runtime(device, precision, "auto")
        memory_format = torch.channels_last if self.runtime.channels_last else torch.contiguous_format
        self.model = bundle.model.to(self.runtime.device, memory_format=memory_format).eval()
        self.meta = bundle.meta
        self.preprocessing = bundle.preprocessing
        self.classes_ = np.array(bundle.classes, dtype=object)
        self.temperature = float(bundle.meta.get("temperature", 1.0))
        self.batch_size = batch_size

    def _tensor(self, item: ImageLike) -> torch.Tensor:
        if isinstance(item, Image.Image):
            image = to_rgb(item)
        elif isinstance(item, np.ndarray):
            image = to_rgb(Image.fromarray(item))
        else:
            image = load_image(item, draft_size=self.preprocessing.resize_size)
        return eval_tensor(image, self.preprocessing)

    def _proba_of_tensors(self, tensors: list[torch.Tensor]) -> np.ndarray:
        return self._proba_of_batch(torch.stack(tensors))

    @torch.no_grad()
    def logits_of_batch(self, batch: torch.Tensor) -> np.ndarray:
        """uint8 NCHW batch -> raw logits (float32), before any temperature."""
        with self.runtime.autocast():
            logits = self.model(model_input(batch, self.runtime, self.preprocessing))
        return logits.float().cpu().numpy()

    def _proba_of_batch(self, batch: torch.Tensor) -> np.ndarray:
        """uint8 NCHW batch -> probabilities (temperature-scaled when the bundle has one)."""
        return torch.softmax(torch.from_numpy(self.logits_of_batch(batch)) / self.temperature, dim=1).numpy()

    def predict_proba(self, images: ImageLike | Iterable[ImageLike]) -> np.ndarray:
        """(n, n_classes) probabilities, columns in the order of ``classes_``. Raises ImageError."""
        items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        if not items:
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        out = []
        for start in range(0, len(items), self.batch_size):
            out.append(self._proba_of_tensors([self._tensor(x) for x in items[start:start + self.batch_size]]))
        return np.concatenate(out)

    def predict(self, images: ImageLike | Iterable[ImageLike], k: int = 1,
                min_confidence: float | str | None = None) -> np.ndarray:
        """Labels: shape (n,) for ``k=1``, else (n, k) ranked best first. With ``min_confidence``
        (a probability, or "auto" for the bundle's recommended threshold), a top label below it
        becomes "unknown"."""
        proba = self.predict_proba(images)
        order = np.argsort(-proba, axis=1)[:, :k]
        labels = self.classes_[order]
        threshold = self.confidence_threshold(min_confidence)
        if threshold is not None:
            labels[:, 0] = np.where(proba.max(axis=1) >= threshold, labels[:, 0], UNKNOWN)
        return labels[:, 0] if k == 1 else labels

    def confidence_threshold(self, value: float | str | None) -> float | None:
        """None (decide always), a number, or "auto": the threshold chosen on the validation split."""
        if value in (None, ""):
            return None
        if value == "auto":
            chosen = self.meta.get("threshold")
            if not chosen:
                raise BundleError("this model has no recommended threshold (it was not calibrated); "
                                  "give --min-confidence a number instead")
            return float(chosen["threshold"])
        return float(value)

    def predict_files(self, paths: Iterable[str], k: int = 5, progress: bool = False,
                      workers: int | None = None, min_confidence: float | str | None = None) -> Iterator[FilePrediction]:
        """Top-k for many files, in order, decoding the next batches while this one runs.

        A file that cannot be read gives a FilePrediction with ``error`` and the rest go on.
        Memory stays bounded: at most three batches are decoded at a time.
        """
        from tqdm import tqdm

        paths = list(paths)
        k = min(k, len(self.classes_))
        threshold = self.confidence_threshold(min_confidence)
        errors: dict[int, str] = {}

        def decode(index: int) -> torch.Tensor | None:
            try:
                return self._tensor(paths[index])
            except ImageError as exc:
                errors[index] = exc.reason
                return None

        with tqdm(total=len(paths), unit="img", desc="predict", disable=not progress, file=sys.stderr) as bar:
            for chunk, good, batch in prefetch_batches(len(paths), decode, self.batch_size, workers):
                proba = self._proba_of_batch(batch) if batch is not None else None
                rows = dict(zip(good, proba)) if proba is not None else {}
                for index in chunk:
                    if index not in rows:
                        yield FilePrediction(paths[index], error=errors.pop(index, "cannot decode"))
                        continue
                    order = np.argsort(-rows[index])[:k]
                    top = float(rows[index][order[0]])
                    decided = str(self.classes_[order[0]]) if threshold is None or top >= threshold else UNKNOWN
                    yield FilePrediction(paths[index], [str(self.classes_[j]) for j in order],
                                         [float(rows[index][j]) for j in order], label=decided)
                bar.update(len(chunk))


def load(path: str | os.PathLike, device: str = "auto", precision: str = "auto", batch_size: int = 64) -> Classifier:
    """Load a run folder or model bundle as a :class:`Classifier` (weights only from safetensors)."""
    return Classifier(load_bundle(Path(path)), device=device, precision=precision, batch_size=batch_size)

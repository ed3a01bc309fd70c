"""A trained model put to work, in scikit-learn's manner: ``predict``, ``predict_proba``, ``classes_``.

Preprocessing comes from the bundle; images are decoded by the same loader as in training, in a
thread pool that works on the next batch while the model runs on this one.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgclf.bundle import Bundle, load_bundle
from imgclf.base import BasePredictor
from imgclf.data.images import load_image, to_rgb
from imgclf.data.transforms import eval_tensor
from imgclf.training.hardware import resolve_runtime
from imgclf.training.loop import model_input

ImageLike = str | os.PathLike | Image.Image | np.ndarray


class Classifier(BasePredictor):
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
        self._stack = torch.stack

    def _input(self, item: ImageLike) -> torch.Tensor:
        if isinstance(item, Image.Image):
            image = to_rgb(item)
        elif isinstance(item, np.ndarray):
            image = to_rgb(Image.fromarray(item))
        else:
            image = load_image(item, draft_size=self.preprocessing.resize_size)
        return eval_tensor(image, self.preprocessing)

    @torch.no_grad()
    def logits_of_batch(self, batch: torch.Tensor) -> np.ndarray:
        """uint8 NCHW batch -> raw logits (float32), before any temperature."""
        with self.runtime.autocast():
            logits = self.model(model_input(batch, self.runtime, self.preprocessing))
        return logits.float().cpu().numpy()

    def _proba_of_batch(self, batch: torch.Tensor) -> np.ndarray:
        """uint8 NCHW batch -> probabilities (temperature-scaled when the bundle has one)."""
        return torch.softmax(torch.from_numpy(self.logits_of_batch(batch)) / self.temperature, dim=1).numpy()


def load(path: str | os.PathLike, device: str = "auto", precision: str = "auto", batch_size: int = 64) -> Classifier:
    """Load a run folder or model bundle as a :class:`Classifier` (weights only from safetensors)."""
    return Classifier(load_bundle(Path(path)), device=device, precision=precision, batch_size=batch_size)

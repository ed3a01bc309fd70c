"""The PyTorch predictor over a model bundle (a run folder is one): the network as trained, on
the device and precision this machine does best unless told otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgclf.bundle import Bundle, load_bundle
from imgclf.core.errors import batch_memory
from imgclf.core.settings import PREDICT_BATCH_SIZE
from imgclf.data.images import DEFAULT_MAX_PIXELS
from imgclf.models.device import model_input, resolve_runtime
from imgclf.predictors.base import BasePredictor

ImageLike = str | os.PathLike | Image.Image | np.ndarray


class Classifier(BasePredictor):
    """Predicts labels for photos with a trained bundle."""

    backend = "torch"

    def __init__(
        self,
        bundle: Bundle,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = PREDICT_BATCH_SIZE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        # the layout training measured fastest on this CPU, when the bundle's settings recorded one
        layout = bundle.meta.get("settings", {}).get("system", {}).get("channels_last", "auto")
        self.runtime = resolve_runtime(device, precision, layout)
        self.model = bundle.model.to(self.runtime.device, memory_format=self.runtime.memory_format).eval()
        self.meta = bundle.meta
        self.preprocessing = bundle.preprocessing
        self.classes_ = np.array(bundle.classes, dtype=object)
        self.temperature = float(bundle.meta.get("temperature", 1.0))
        self.batch_size, self.max_pixels = batch_size, max_pixels
        self._stack = torch.stack

    def _input(self, item: ImageLike) -> torch.Tensor:
        return torch.from_numpy(self._pixels(item))

    @torch.no_grad()
    def logits_of_batch(self, batch: torch.Tensor) -> np.ndarray:
        """uint8 NCHW batch -> raw logits (float32), before any temperature."""
        with batch_memory(len(batch)), self.runtime.autocast():
            logits = self.model(model_input(batch, self.runtime, self.preprocessing))
            return logits.float().cpu().numpy()

    def _proba_of_batch(self, batch: torch.Tensor) -> np.ndarray:
        """uint8 NCHW batch -> probabilities (temperature-scaled when the bundle has one)."""
        return torch.softmax(torch.from_numpy(self.logits_of_batch(batch)) / self.temperature, dim=1).numpy()


def load_torch(
    path: str | os.PathLike,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = PREDICT_BATCH_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Classifier:
    """A run folder or model bundle as a :class:`Classifier` (weights only from safetensors)."""
    return Classifier(load_bundle(Path(path)), device, precision, batch_size, max_pixels)

"""A predictor that needs no PyTorch: ONNX Runtime, Pillow and NumPy only, over the folder that
``imgclf export`` writes. Same manners as :class:`imgclf.predict.Classifier` (``predict``,
``predict_proba``, ``classes_``, ``predict_files``) and the same preprocessing code, so it gives
the same answers. Importing this module never imports torch.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.data.images import ImageError, load_image, to_rgb
from imgclf.data.preprocess import eval_array, normalize, prefetch_batches
from imgclf.results import UNKNOWN, FilePrediction


class OnnxClassifier:
    """Predicts labels for photos with an exported ONNX bundle (fp32, or int8 with ``int8=True``)."""

    def __init__(self, folder: str | os.PathLike, int8: bool = False, batch_size: int = 32, threads: int = 0):
        import onnxruntime as ort

        folder = Path(folder)
        self.meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        name = "model.int8.onnx" if int8 else "model.onnx"
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name}: not exported (imgclf export{' --int8' if int8 else ''})")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        prep = self.meta["preprocessing"]
        self.image_size, self.interpolation = int(prep["image_size"]), prep["interpolation"]
        self.resize_size = int(self.image_size / float(prep["crop_pct"]))
        self.mean, self.std = prep["mean"], prep["std"]
        self.classes_ = np.array(self.meta["classes"], dtype=object)
        self.temperature = float(self.meta.get("temperature", 1.0))
        self.batch_size = batch_size

    def _array(self, item) -> np.ndarray:
        if isinstance(item, Image.Image):
            image = to_rgb(item)
        elif isinstance(item, np.ndarray):
            image = to_rgb(Image.fromarray(item))
        else:
            image = load_image(item, draft_size=self.resize_size)
        return eval_array(image, self.image_size, self.resize_size, self.interpolation)

    def _proba_of_batch(self, batch: np.ndarray) -> np.ndarray:
        logits = self.session.run(None, {self.input_name: normalize(batch, self.mean, self.std)})[0]
        z = logits.astype(np.float64) / self.temperature
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict_proba(self, images) -> np.ndarray:
        items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        if not items:
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        return np.concatenate([self._proba_of_batch(np.stack([self._array(x) for x in items[i:i + self.batch_size]]))
                               for i in range(0, len(items), self.batch_size)])

    def confidence_threshold(self, value) -> float | None:
        if value in (None, ""):
            return None
        if value == "auto":
            if not self.meta.get("threshold"):
                raise ValueError("this model has no recommended threshold; give a number instead")
            return float(self.meta["threshold"]["threshold"])
        return float(value)

    def predict(self, images, k: int = 1, min_confidence=None) -> np.ndarray:
        proba = self.predict_proba(images)
        labels = self.classes_[np.argsort(-proba, axis=1)[:, :k]]
        threshold = self.confidence_threshold(min_confidence)
        if threshold is not None:
            labels[:, 0] = np.where(proba.max(axis=1) >= threshold, labels[:, 0], UNKNOWN)
        return labels[:, 0] if k == 1 else labels

    def predict_files(self, paths: Iterable[str], k: int = 5, progress: bool = False, workers: int | None = None,
                      min_confidence=None) -> Iterator[FilePrediction]:
        """Top-k for many files in order, decoding ahead in threads; bad files get an error each."""
        from tqdm import tqdm

        paths, k = list(paths), min(k, len(self.classes_))
        threshold, errors = self.confidence_threshold(min_confidence), {}

        def decode(index: int) -> np.ndarray | None:
            try:
                return self._array(paths[index])
            except ImageError as exc:
                errors[index] = exc.reason
                return None

        with tqdm(total=len(paths), unit="img", desc="predict", disable=not progress, file=sys.stderr) as bar:
            for chunk, good, batch in prefetch_batches(len(paths), decode, self.batch_size, np.stack, workers):
                rows = dict(zip(good, self._proba_of_batch(batch))) if batch is not None else {}
                for index in chunk:
                    if index not in rows:
                        yield FilePrediction(paths[index], error=errors.pop(index, "cannot decode"))
                        continue
                    order = np.argsort(-rows[index])[:k]
                    top = float(rows[index][order[0]])
                    label = str(self.classes_[order[0]]) if threshold is None or top >= threshold else UNKNOWN
                    yield FilePrediction(paths[index], [str(self.classes_[j]) for j in order],
                                         [float(rows[index][j]) for j in order], label=label)
                bar.update(len(chunk))


def load_onnx(folder: str | os.PathLike, int8: bool = False, batch_size: int = 32) -> OnnxClassifier:
    """Load an exported ONNX bundle folder (``RUN_DIR/onnx`` by default) for prediction."""
    return OnnxClassifier(folder, int8=int8, batch_size=batch_size)

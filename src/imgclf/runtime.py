"""A predictor that needs no PyTorch: ONNX Runtime, Pillow and NumPy only, over the folder that
``imgclf export`` writes. Same manners as :class:`imgclf.predict.Classifier` (``predict``,
``predict_proba``, ``classes_``, ``predict_files``) and the same preprocessing code, so it gives
the same answers. Importing this module never imports torch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.data.images import load_image, to_rgb
from imgclf.data.preprocess import eval_array, normalize
from imgclf.base import BasePredictor


class OnnxClassifier(BasePredictor):
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
        self._stack = np.stack

    def _input(self, item) -> np.ndarray:
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


def load_onnx(folder: str | os.PathLike, int8: bool = False, batch_size: int = 32) -> OnnxClassifier:
    """Load an exported ONNX bundle folder (``RUN_DIR/onnx`` by default) for prediction."""
    return OnnxClassifier(folder, int8=int8, batch_size=batch_size)

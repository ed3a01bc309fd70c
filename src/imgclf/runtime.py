"""The predictor that needs no PyTorch, under its public name: ``from imgclf.runtime import
load_onnx``. Needs only ONNX Runtime (or OpenVINO), Pillow and NumPy; see
:mod:`imgclf.predictors.onnx`."""

from __future__ import annotations

from imgclf.core.errors import BackendError
from imgclf.predictors.onnx import (
    OnnxClassifier,
    OpenVinoClassifier,
    choose_backend,
    compile_openvino,
    cpu_capabilities,
    load_onnx,
    openvino_precision,
)

__all__ = [
    "BackendError",
    "OnnxClassifier",
    "OpenVinoClassifier",
    "choose_backend",
    "compile_openvino",
    "cpu_capabilities",
    "load_onnx",
    "openvino_precision",
]

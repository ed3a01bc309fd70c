"""int8 quantization: the uint8 re-encoding is exact and lets ONNX Runtime run every quantized
convolution with its int8 kernel."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import torch

from imgclf.export import _export_fp32
from imgclf.quantize import activations_as_uint8, end_convolutions, nncf_quantize


class Residual(torch.nn.Module):
    """Enough of an inverted-residual network to have what matters here: twelve convolutions,
    signed activations (no ReLU after the projections) and residual additions."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.expand = torch.nn.ModuleList(torch.nn.Conv2d(16, 32, 1) for _ in range(5))
        self.project = torch.nn.ModuleList(torch.nn.Conv2d(32, 16, 3, padding=1) for _ in range(5))
        self.head = torch.nn.Conv2d(16, 24, 1)
        self.classifier = torch.nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for expand, project in zip(self.expand, self.project):
            x = x + project(torch.relu(expand(x)))
        return self.classifier(torch.relu(self.head(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def model_and_images(clothing, tmp_path_factory):
    """The exported network, and real photos as its calibration and test inputs."""
    from PIL import Image

    from imgclf.data.preprocess import eval_array

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("q") / "model.onnx"
    _export_fp32(Residual(), 32, path)
    photos = sorted((clothing / "train").glob("*/*.jpg"))[::25][:96]
    x = np.stack([eval_array(Image.open(p).convert("RGB"), 32, 36, "bilinear") for p in photos])
    return onnx.load(str(path)), (x.astype(np.float32) / 127.5 - 1.0)


def _run_as_written(model, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"pixels": x})[0]


def _optimized_ops(model, tmp_path) -> Counter:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


@pytest.mark.slow
def test_uint8_reencoding_is_exact_and_every_quantized_conv_runs_int8(model_and_images, tmp_path):
    model, x = model_and_images
    keep_float = end_convolutions(model)
    convs = sum(node.op_type == "Conv" for node in model.graph.node)
    assert len(keep_float) == 2 and convs == 12
    raw = nncf_quantize(model, x[:64], keep_float)  # calibrated on 64 photos, checked on all 96
    encoded = onnx.ModelProto()
    encoded.CopyFrom(raw)
    assert activations_as_uint8(encoded) > 0
    initializers = {init.name: init for init in encoded.graph.initializer}
    for node in encoded.graph.node:  # every activation quantizer is uint8 now, weights stay int8
        if node.op_type == "QuantizeLinear":
            assert initializers[node.input[2]].data_type == onnx.TensorProto.UINT8
    # with no graph rewriting, Q/DQ run as written: the re-encoding changes no number
    assert np.array_equal(_run_as_written(raw, x), _run_as_written(encoded, x))
    ops = _optimized_ops(encoded, tmp_path)
    assert ops["QLinearConv"] == convs - len(keep_float), ops
    assert _optimized_ops(raw, tmp_path)["QLinearConv"] < ops["QLinearConv"]

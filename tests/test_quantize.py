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
from imgclf.export.quantize import activations_as_uint8, float_layers, nncf_quantize


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
    keep_float = float_layers(model)
    conv_names = [node.name for node in model.graph.node if node.op_type == "Conv"]
    float_convs = [name for name in keep_float if name in conv_names]
    assert float_convs == sorted([conv_names[0], conv_names[-1]]) and len(conv_names) == 12  # no downsampling
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
    assert ops["QLinearConv"] == len(conv_names) - len(float_convs), ops
    assert _optimized_ops(raw, tmp_path)["QLinearConv"] < ops["QLinearConv"]


class Downsampling(torch.nn.Module):
    """Ten convolutions halving a 64-pixel input down to 2 pixels, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        strides = [2, 1, 2, 1, 2, 1, 2, 1, 2, 1]  # sides read: 64, 32, 32, 16, 16, 8, 8, 4, 4, 2
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv2d(3 if i == 0 else 8, 8, 3, stride, 1) for i, stride in enumerate(strides)
        )
        self.classifier = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.classifier(x.mean((2, 3)))


def test_float_layers_are_the_high_resolution_convolutions_the_last_and_the_classifier(tmp_path):
    _export_fp32(Downsampling(), 64, tmp_path / "down.onnx")
    model = onnx.load(str(tmp_path / "down.onnx"))
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    gemm = [node.name for node in model.graph.node if node.op_type in ("Gemm", "MatMul")]
    # reading sides of 16 or more (8x the last convolution's 2): the first five, then the last one
    assert float_layers(model) == sorted(convs[:5] + [convs[-1]] + gemm) and len(gemm) == 1
    assert float_layers(model, min_convs=11) == []  # a small network is quantized whole

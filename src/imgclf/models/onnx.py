"""A network as an ONNX file, with a dynamic batch axis (for the export and for the engines that
run frozen passes during training)."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch


def to_onnx(model: torch.nn.Module, size: int, path: str | Path, output: str = "logits") -> None:
    """torch.export-based ONNX export (the TorchScript one cannot express our small CNNs' adaptive
    pooling to a grid that does not divide the feature map). ``model`` is put in fp32 eval mode
    on the CPU (pass a copy to keep yours as it is). The input is ``pixels``: normalised NCHW."""
    dummy = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter is chatty
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.float().eval().cpu(),
            (dummy,),
            str(path),
            input_names=["pixels"],
            output_names=[output],
            dynamic_shapes={"x": {0: batch}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )

"""int8 quantization methods side by side on a run's fp32 ONNX export, on the validation and test
splits: top-1 agreement with fp32 (and how many photos differ), accuracy, the logits' RMS error
against fp32 (a steadier measure than flips of near-tied photos), and ONNX Runtime speed at batch
32; each method calibrated on three different sets of training photos.

    .venv/bin/python bench/int8.py RUN_DIR      # needs RUN_DIR/onnx/model.onnx (imgclf export)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _ort_static(fp32: Path, out: Path, calibration: np.ndarray, method: str) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"pixels": calibration[i : i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self):
            return next(self.batches, None)

    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
        extra_options={"CalibMovingAverage": True} if method == "MinMax" else {},
    )


def _ends(model) -> list[str]:
    """The first and last convolutions only (imgclf's choice before the high-resolution layers)."""
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    return [convs[0], convs[-1]]


def _nncf(fp32: Path, out: Path, calibration: np.ndarray, keep_float) -> None:
    import onnx

    from imgclf.export.quantize import activations_as_uint8, nncf_quantize

    model = onnx.load(str(fp32))
    quantized = nncf_quantize(model, calibration, keep_float(model))
    activations_as_uint8(quantized)
    onnx.save(quantized, str(out))


def _logits(path: Path, x: np.ndarray) -> tuple[np.ndarray, float]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session.run(None, {"pixels": x[:32]})
    started = time.perf_counter()
    logits = np.concatenate([session.run(None, {"pixels": x[i : i + 32]})[0] for i in range(0, len(x), 32)])
    return logits, len(x) / (time.perf_counter() - started)


def main(run_dir: str, calibration_images: int = 256) -> None:
    from imgclf.core.events import ignore
    from imgclf.data.split import read_split_csv
    from imgclf.export import _inputs
    from imgclf.export.quantize import float_layers
    from imgclf.predictors.pytorch import load_torch as load

    run = Path(run_dir)
    fp32 = run / "onnx" / "model.onnx"
    clf = load(run, device="cpu", precision="fp32")
    split = read_split_csv(run / "split.csv")
    index = {label: i for i, label in enumerate(clf.classes_.tolist())}
    sets = {}
    for name in ("val", "test"):
        samples = [s for s in split if s.split == name]
        x, rows = _inputs(clf, samples, 0, name, (ignore, None))
        sets[name] = (x, np.array([index.get(samples[r].label, -1) for r in rows]), _logits(fp32, x))
    train = [s for s in split if s.split == "train"]
    calibrations = [
        _inputs(clf, train[start::3], calibration_images, "calibrate", (ignore, None))[0] for start in range(3)
    ]
    methods = {
        "ONNX Runtime quantize_static, MinMax (moving average)": lambda o, c: _ort_static(fp32, o, c, "MinMax"),
        "ONNX Runtime quantize_static, Percentile": lambda o, c: _ort_static(fp32, o, c, "Percentile"),
        "NNCF + bias correction, all layers int8": lambda o, c: _nncf(fp32, o, c, lambda m: []),
        "NNCF + bias correction, first/last conv float": lambda o, c: _nncf(fp32, o, c, _ends),
        "NNCF + bias correction, high-resolution convs, last conv and classifier float (imgclf)": lambda o, c: _nncf(
            fp32, o, c, float_layers
        ),
    }
    print(
        f"{len(sets['val'][0])} validation and {len(sets['test'][0])} test photos; {calibration_images} "
        f"calibration photos per set; fp32 ONNX Runtime {sets['test'][2][1]:.0f} img/s"
    )
    print(
        "| method | calibration set | val agreement (differ) | test agreement (differ) | test accuracy (fp32) "
        "| test logit RMS error | img/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, quantize in methods.items():
            for number, calibration in enumerate(calibrations):
                out = Path(tmp) / "int8.onnx"
                quantize(out, calibration)
                cells = []
                for name in ("val", "test"):
                    x, targets, (reference, _) = sets[name]
                    logits, speed = _logits(out, x)
                    differ = int((logits.argmax(1) != reference.argmax(1)).sum())
                    cells.append(f"{1 - differ / len(x):.3f} ({differ})")
                accuracy = float((logits.argmax(1) == targets).mean())
                fp32_accuracy = float((reference.argmax(1) == targets).mean())
                rms = float(np.sqrt(((logits - reference) ** 2).mean()))
                print(
                    f"| {label} | {number + 1} | {cells[0]} | {cells[1]} | {accuracy:.3f} ({fp32_accuracy:.3f}) "
                    f"| {rms:.3f} | {speed:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main(sys.argv[1])

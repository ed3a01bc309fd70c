"""``export``: a trained bundle as ONNX, checked against PyTorch on real images before it counts.

- fp32: dynamic batch axis; the largest absolute difference of probabilities against PyTorch (fp32,
  no autocast) on test images must stay under 1e-4.
- OpenVINO (where installed): top-1 agreement with PyTorch and speed against ONNX Runtime on this
  CPU, recorded so the predictor's ``auto`` backend can follow the measurement.
- int8: static post-training quantization (:mod:`imgclf.export.quantize`: QDQ, per-channel weights, bias
  correction) that ONNX Runtime runs with its int8 kernels, calibrated on training images; top-1
  agreement with fp32 on the test split must reach 99% and accuracy may drop by at most 1 point
  (dynamic int8 is slower than fp32 for these convolutional nets, so it is not offered).

The export folder is itself a bundle for the torch-free predictor (:mod:`imgclf.runtime`):
``model.onnx`` (and ``model.int8.onnx``) beside a ``model.json`` with classes, preprocessing,
temperature and threshold, and the check results.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from imgclf.core.errors import ExportError
from imgclf.core.events import Events, StopToken, channel, info, stop_token, warn
from imgclf.core.meta import write_meta
from imgclf.core.numeric import softmax
from imgclf.core.rundir import RunDir
from imgclf.core.settings import Settings
from imgclf.data.dataset import decode_all
from imgclf.data.split import read_split_csv
from imgclf.data.transforms import eval_tensor, normalize_batch
from imgclf.export.quantize import quantize_int8
from imgclf.models.onnx import to_onnx
from imgclf.predictors import weights_digest
from imgclf.predictors.onnx import FP32_FILE, INT8_FILE, compile_openvino, cpu_capabilities, openvino_precision
from imgclf.predictors.pytorch import Classifier, load_torch

__all__ = ["export", "ExportError", "FP32_TOLERANCE", "INT8_MIN_AGREEMENT", "INT8_MAX_DROP"]

FP32_TOLERANCE = 1e-4
INT8_MIN_AGREEMENT = 0.99
INT8_MAX_DROP = 0.01


def _inputs(
    clf: Classifier, samples: list, limit: int, stage: str, signals: tuple[Events, StopToken]
) -> tuple[np.ndarray, list[int]]:
    """Normalised float32 NCHW inputs of up to ``limit`` samples (spread over the list), and their rows."""
    step = max(1, len(samples) // limit) if limit else 1
    positions = list(range(0, len(samples), step))[:limit] if limit else list(range(len(samples)))
    prep = clf.preprocessing
    tensors, _ = decode_all(
        [samples[p] for p in positions], lambda im: eval_tensor(im, prep), prep, stage, *signals, clf.max_pixels
    )
    kept = [i for i, t in enumerate(tensors) if t is not None]
    if not kept:
        raise ExportError("no readable images to check the export with")
    batch = normalize_batch(torch.stack([tensors[i] for i in kept]), prep)
    return batch.numpy(), [positions[i] for i in kept]


def _onnx_logits(path: Path, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


@torch.no_grad()
def _torch_logits(model: torch.nn.Module, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    model = model.float().eval().to("cpu", memory_format=torch.contiguous_format)
    return np.concatenate(
        [model(torch.from_numpy(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    )


def _export_fp32(model: torch.nn.Module, size: int, path: Path) -> None:
    to_onnx(model, size, path)


def export(
    run_dir: str | Path,
    out: str | Path | None = None,
    int8: bool = False,
    settings: Settings | None = None,
    events: Events | None = None,
    stop: StopToken | None = None,
    check_images: int = 256,
    calibration_images: int = 512,
) -> dict:
    """Write the ONNX bundle folder (default ``RUN_DIR/onnx``) and return the check results.

    ``calibration_images``: training photos (spread over the split) that int8 is calibrated on.
    The int8 flips are photos whose top two fp32 logits nearly tie, so which ones flip moves with
    the calibration set. On two trainings of the default clothing-small model, 256 photos gave
    1-4 of 372 test photos flipped over eight sets (4 fails the 99% check), 512 gave 0-1 over five."""
    run_dir, events, stop = Path(run_dir), channel(events), stop_token(stop)
    signals = (events, stop)
    out = Path(out) if out else run_dir / RunDir.ONNX
    out.mkdir(parents=True, exist_ok=True)
    system = (settings or Settings()).system
    clf = load_torch(run_dir, device="cpu", precision="fp32", max_pixels=system.max_pixels)
    split = read_split_csv(run_dir / RunDir.SPLIT)
    test = [s for s in split if s.split == "test"] or [s for s in split if s.split == "val"]
    fp32_path = out / FP32_FILE
    _export_fp32(clf.model, clf.preprocessing.image_size, fp32_path)
    x, _ = _inputs(clf, test, check_images, "check export", signals)
    temperature = float(clf.meta.get("temperature", 1.0))
    reference = softmax(_torch_logits(clf.model, x), temperature)
    difference = float(np.abs(softmax(_onnx_logits(fp32_path, x), temperature) - reference).max())
    if difference >= FP32_TOLERANCE:
        fp32_path.unlink()
        raise ExportError(
            f"{run_dir}: ONNX fp32 differs from PyTorch by {difference:.2e} (limit "
            f"{FP32_TOLERANCE:.0e}); the export was not written"
        )
    report = {
        "fp32": {"file": FP32_FILE, "max_abs_diff_probs": difference, "checked_images": len(x)},
        "weights_sha256": weights_digest(run_dir / RunDir.WEIGHTS),
    }
    openvino = _check_openvino(fp32_path, x, reference, temperature)
    if openvino:
        report["openvino"] = openvino
    _write_meta(out, clf.meta, report)  # the fp32 bundle is complete whatever happens to int8
    _say_openvino(openvino, events)
    info(events, f"exported {fp32_path} (max prob diff {difference:.1e} on {len(x)} images)", str(fp32_path))
    if int8:
        stop.check()
        try:
            report["int8"] = _export_int8(clf, split, test, fp32_path, out / INT8_FILE, calibration_images, signals)
        except ExportError as exc:
            _write_meta(out, clf.meta, {**report, "int8": {"failed": str(exc)}})
            raise
        _write_meta(out, clf.meta, report)
        result = report["int8"]
        info(
            events,
            f"exported {out / INT8_FILE} (top-1 agreement {result['top1_agreement']:.3f}, accuracy "
            f"{result['accuracy']:.3f} vs {result['fp32_accuracy']:.3f})",
            str(out / INT8_FILE),
        )
    return report


def _say_openvino(openvino: dict, events: Events) -> None:
    if openvino.get("error"):
        warn(events, f"OpenVINO could not run this model ({openvino['error']}); predict uses ONNX Runtime")
    elif openvino:
        info(
            events,
            f"OpenVINO {openvino['precision']}: {openvino['images_per_s']:.0f} img/s vs ONNX Runtime "
            f"{openvino['onnxruntime_images_per_s']:.0f}, top-1 agreement {openvino['top1_agreement']:.3f}"
            f" -> {'recommended' if openvino['recommended'] else 'not recommended'} on this CPU",
        )


def _images_per_second(run_batch, x: np.ndarray, batch_size: int = 32) -> float:
    run_batch(x[:batch_size])  # warm-up
    started = time.perf_counter()
    for i in range(0, len(x), batch_size):
        run_batch(x[i : i + batch_size])
    return len(x) / (time.perf_counter() - started)


def _check_openvino(fp32_path: Path, x: np.ndarray, reference: np.ndarray, temperature: float) -> dict:
    """Where OpenVINO is installed: its top-1 agreement with PyTorch fp32 and its speed against
    ONNX Runtime on this CPU, on the check images. The predictor's ``auto`` backend follows the
    recommendation only on a CPU with the same capabilities."""
    try:
        precision = openvino_precision()
    except ImportError:  # OpenVINO is an optional extra
        return {}
    import onnxruntime as ort

    try:
        request = compile_openvino(fp32_path, precision)
        probs = np.concatenate(
            [softmax(request.infer({0: x[i : i + 32]})[0].copy(), temperature) for i in range(0, len(x), 32)]
        )
    except Exception as exc:  # OpenVINO lacks an operator, a CPU feature...: the ONNX export stands alone
        return {"precision": precision, "error": f"{type(exc).__name__}: {exc}"[:500], "recommended": False}
    session = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    speed = _images_per_second(lambda b: request.infer({0: b}), x)
    ort_speed = _images_per_second(lambda b: session.run(None, {"pixels": b}), x)
    agreement = float((probs.argmax(1) == reference.argmax(1)).mean())
    return {
        "precision": precision,
        "top1_agreement": agreement,
        "max_abs_diff_probs": float(np.abs(probs - reference).max()),
        "checked_images": len(x),
        "images_per_s": round(speed, 1),
        "onnxruntime_images_per_s": round(ort_speed, 1),
        "cpu_capabilities": cpu_capabilities(),
        "recommended": agreement >= INT8_MIN_AGREEMENT and speed > ort_speed,
    }


def _write_meta(out: Path, meta: dict, report: dict) -> None:
    onnx_meta = {k: v for k, v in meta.items() if k != "settings"}
    onnx_meta["onnx"] = {"input": "pixels", "output": "logits", "layout": "NCHW float32, normalised", **report}
    write_meta(out, onnx_meta)


def _export_int8(
    clf: Classifier,
    split: list,
    test: list,
    fp32_path: Path,
    int8_path: Path,
    calibration_images: int,
    signals: tuple[Events, StopToken],
) -> dict:
    train = [s for s in split if s.split == "train"]
    calibration, _ = _inputs(clf, train, calibration_images, "calibrate int8", signals)
    method = quantize_int8(fp32_path, int8_path, calibration)
    signals[1].check()
    x, rows = _inputs(clf, test, 0, "check int8", signals)
    index = {label: i for i, label in enumerate(clf.classes_.tolist())}
    targets = np.array([index.get(test[r].label, -1) for r in rows])
    fp32_top1 = _onnx_logits(fp32_path, x).argmax(1)
    int8_top1 = _onnx_logits(int8_path, x).argmax(1)
    result = {
        "file": INT8_FILE,
        "top1_agreement": float((fp32_top1 == int8_top1).mean()),
        "accuracy": float((int8_top1 == targets).mean()),
        "fp32_accuracy": float((fp32_top1 == targets).mean()),
        "checked_images": len(x),
        "calibration_images": len(calibration),
        **method,
    }
    if result["top1_agreement"] < INT8_MIN_AGREEMENT or result["fp32_accuracy"] - result["accuracy"] > INT8_MAX_DROP:
        shutil.move(str(int8_path), str(int8_path.with_suffix(".failed.onnx")))
        raise ExportError(
            f"{int8_path}: int8 export failed its check: top-1 agreement {result['top1_agreement']:.3f} "
            f"(needs {INT8_MIN_AGREEMENT}), accuracy {result['accuracy']:.3f} vs fp32 "
            f"{result['fp32_accuracy']:.3f} (may drop {INT8_MAX_DROP}); kept as *.failed.onnx"
        )
    return result

"""Prediction speed, side by side in one run, on a run's test photos:

  raw ONNX Runtime and raw OpenVINO on tensors already preprocessed (the limits); imgclf
  end-to-end, JPEG files -> top-5, with ONNX Runtime fp32, ONNX Runtime int8 (when exported; a
  set-aside *.failed.onnx is measured and marked), OpenVINO (bf16 where the CPU has it), and
  PyTorch eager (bf16 autocast + channels_last where the CPU has it).
  Images/s at batch 32 (median of three passes) and at batch 1, and latency p50/p99 of a call on
  a batch of 32 and on one photo; then ONNX Runtime fp32 raw and end to end at batch sizes 8-64.

    .venv/bin/python bench/predict.py RUN_DIR      # exports RUN_DIR/onnx first if needed
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def _latencies(call, items: list, limit: int) -> tuple[float, float, float]:
    """Images/s, p50 and p99 milliseconds of one call per item (the first ``limit`` items)."""
    times = []
    for item in items[:limit]:
        started = time.perf_counter()
        call(item)
        times.append(time.perf_counter() - started)
    return len(times) / sum(times), float(np.percentile(times, 50) * 1000), float(np.percentile(times, 99) * 1000)


def _batch_latencies(call, count: int, repeat: int = 3) -> tuple[float, float]:
    """p50 and p99 milliseconds of one call on a batch of 32 (every batch of the photos, ``repeat``
    times): what one request of 32 photos waits."""
    starts = list(range(0, count - 31, 32)) * repeat
    return _latencies(call, starts, len(starts))[1:]


def _throughput(call, n: int, repeat: int = 3) -> float:
    """Images/s, the median of ``repeat`` passes (one pass over 372 photos takes about 1.5 s, and
    single passes varied by 10% on this machine)."""
    speeds = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        speeds.append(n / (time.perf_counter() - started))
    return float(np.median(speeds))


def _engine_row(label: str, run_batch, x: np.ndarray, latency_images: int) -> tuple:
    run_batch(x[:32])  # warm-up
    return (label, _throughput(lambda: [run_batch(x[i:i + 32]) for i in range(0, len(x), 32)], len(x)),
            *_batch_latencies(lambda i: run_batch(x[i:i + 32]), len(x)),
            *_latencies(lambda i: run_batch(x[i:i + 1]), list(range(len(x))), latency_images))


def _predictor_row(label: str, clf, files: list, latency_images: int) -> tuple:
    list(clf.predict_files(files[:32], k=5))  # warm-up
    return (label, _throughput(lambda: list(clf.predict_files(files, k=5)), len(files)),
            *_batch_latencies(lambda i: list(clf.predict_files(files[i:i + 32], k=5)), len(files)),
            *_latencies(lambda f: list(clf.predict_files([f], k=5)), files, latency_images))


def main(run_dir: str, latency_images: int = 100) -> None:
    import onnxruntime as ort

    from imgclf.data.split import read_split_csv
    from imgclf.export import export
    from imgclf.predict import load
    from imgclf.runtime import OnnxClassifier, OpenVinoClassifier, compile_openvino, openvino_precision

    run = Path(run_dir)
    if not (run / "onnx" / "model.onnx").exists():
        export(run, run / "onnx")
    files = [s.path for s in read_split_csv(run / "split.csv") if s.split == "test"]
    onnx_fp32 = OnnxClassifier(run / "onnx", batch_size=32)
    x = np.stack([onnx_fp32._input(f) for f in files])  # decoded, resized, normalised float32
    session = ort.InferenceSession(str(run / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    rows = [_engine_row("raw ONNX Runtime fp32, preprocessed tensors", lambda b: session.run(None, {"pixels": b}),
                        x, latency_images)]
    predictors = [("imgclf ONNX Runtime fp32, files -> top-5", onnx_fp32)]
    for name in ("model.int8.onnx", "model.int8.failed.onnx"):
        if (run / "onnx" / name).exists():
            int8 = OnnxClassifier(run / "onnx", batch_size=32)
            int8._open(run / "onnx" / name, 0)
            note = "" if name == "model.int8.onnx" else " (failed its accuracy check)"
            predictors.append((f"imgclf ONNX Runtime int8{note}, files -> top-5", int8))
            break
    predictors.append(("imgclf PyTorch eager, files -> top-5", load(run, batch_size=32)))
    rows += [_predictor_row(label, clf, files, latency_images) for label, clf in predictors]
    # OpenVINO last: its worker threads linger after inference and slowed the rows after them
    request = compile_openvino(run / "onnx" / "model.onnx")
    rows.append(_engine_row(f"raw OpenVINO {openvino_precision()}, preprocessed tensors",
                            lambda b: request.infer({0: b}), x, latency_images))
    rows.append(_predictor_row(f"imgclf OpenVINO {openvino_precision()}, files -> top-5",
                               OpenVinoClassifier(run / "onnx", batch_size=32), files, latency_images))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; model: {onnx_fp32.meta['architecture']} "
          f"at {onnx_fp32.image_size} px; {len(files)} test photos")
    print("| path | images/s, batch 32 | vs raw ONNX Runtime | p50 / p99 ms per batch of 32 | images/s, batch 1 "
          "| p50 / p99 ms, batch 1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, speed, p50_32, p99_32, speed1, p50, p99 in rows:
        print(f"| {label} | {speed:.1f} | {speed / rows[0][1]:.2f} | {p50_32:.0f} / {p99_32:.0f} | {speed1:.1f} "
              f"| {p50:.1f} / {p99:.1f} |")

    print()
    print("| batch size | raw ONNX Runtime fp32, images/s | imgclf ONNX Runtime fp32 files -> top-5, images/s | ratio |")
    print("|---:|---:|---:|---:|")
    for batch_size in (8, 16, 32, 64):
        clf = OnnxClassifier(run / "onnx", batch_size=batch_size)
        raw = _throughput(lambda: [session.run(None, {"pixels": x[i:i + batch_size]})
                                   for i in range(0, len(x), batch_size)], len(x))
        end_to_end = _throughput(lambda: list(clf.predict_files(files, k=5)), len(files))
        print(f"| {batch_size} | {raw:.1f} | {end_to_end:.1f} | {end_to_end / raw:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])

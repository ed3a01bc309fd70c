"""Prediction speed, side by side in one run, on a run's test photos:

  raw ONNX Runtime and raw OpenVINO on tensors already preprocessed (the limits); imgclf
  end-to-end, JPEG files -> top-5, with ONNX Runtime fp32, ONNX Runtime int8 (when exported; a
  set-aside *.failed.onnx is measured and marked), OpenVINO (bf16 where the CPU has it), and
  PyTorch eager (bf16 autocast + channels_last where the CPU has it).
  Images/s at batch 32 and per-image latency p50/p99 at batch 1.

    .venv/bin/python bench/predict.py RUN_DIR      # exports RUN_DIR/onnx first if needed
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def _latencies(call, items: list, repeat: int) -> tuple[float, float]:
    times = []
    for item in items[:repeat]:
        started = time.perf_counter()
        call(item)
        times.append(time.perf_counter() - started)
    return float(np.percentile(times, 50) * 1000), float(np.percentile(times, 99) * 1000)


def _throughput(call, n: int) -> float:
    started = time.perf_counter()
    call()
    return n / (time.perf_counter() - started)


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
    request = compile_openvino(run / "onnx" / "model.onnx")
    engines = [("raw ONNX Runtime fp32, preprocessed tensors", lambda b: session.run(None, {"pixels": b})),
               (f"raw OpenVINO {openvino_precision()}, preprocessed tensors", lambda b: request.infer({0: b}))]
    rows = []
    for label, run_batch in engines:
        run_batch(x[:32])
        rows.append((label, _throughput(lambda: [run_batch(x[i:i + 32]) for i in range(0, len(x), 32)], len(x)),
                     *_latencies(lambda i: run_batch(x[i:i + 1]), list(range(len(x))), latency_images)))
    predictors = [("imgclf ONNX Runtime fp32, files -> top-5", onnx_fp32)]
    for name in ("model.int8.onnx", "model.int8.failed.onnx"):
        if (run / "onnx" / name).exists():
            int8 = OnnxClassifier(run / "onnx", batch_size=32)
            int8._open(run / "onnx" / name, 0)
            note = "" if name == "model.int8.onnx" else " (failed its accuracy check)"
            predictors.append((f"imgclf ONNX Runtime int8{note}, files -> top-5", int8))
            break
    predictors.append((f"imgclf OpenVINO {openvino_precision()}, files -> top-5",
                       OpenVinoClassifier(run / "onnx", batch_size=32)))
    predictors.append(("imgclf PyTorch eager, files -> top-5", load(run, batch_size=32)))
    for label, clf in predictors:
        list(clf.predict_files(files[:32], k=5))  # warm-up
        rows.append((label, _throughput(lambda: list(clf.predict_files(files, k=5)), len(files)),
                     *_latencies(lambda f: list(clf.predict_files([f], k=5)), files, latency_images)))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; model: {onnx_fp32.meta['architecture']} "
          f"at {onnx_fp32.image_size} px; {len(files)} test photos")
    print("| path | images/s (batch 32) | p50 ms (batch 1) | p99 ms (batch 1) | vs raw ONNX Runtime |")
    print("|---|---:|---:|---:|---:|")
    for label, speed, p50, p99 in rows:
        print(f"| {label} | {speed:.1f} | {p50:.1f} | {p99:.1f} | {speed / rows[0][1]:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])

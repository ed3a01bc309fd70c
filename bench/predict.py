"""Prediction speed, side by side in one run, on a run's test photos:

raw ONNX Runtime and raw OpenVINO on tensors already preprocessed (the limits: ONNX Runtime
both as a plain session runs it, one batch at a time on every core, and two batches at once on
one core each, as the predictor runs a job of several batches); imgclf
end-to-end, JPEG files -> top-5, with ONNX Runtime fp32, ONNX Runtime int8 (when exported; a
set-aside *.failed.onnx is measured and marked), OpenVINO (bf16 where the CPU has it), and
PyTorch eager (bf16 autocast + channels_last where the CPU has it).
Images/s at batch 32 (median of three passes) and at batch 1, and latency p50/p99 of a call on
a batch of 32 and on one photo; then the ratio that matters, end to end against the faster raw
ONNX Runtime, in seven rounds that alternate the three (this machine's speed drifts by 10-20%
over minutes, so only side-by-side rounds are compared); then batch sizes 8-64.

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


def _two_at_once(run_batch, x: np.ndarray, batch_size: int = 32) -> None:
    """Every batch of ``x``, two at a time (each on its own thread)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda i: run_batch(x[i : i + batch_size]), range(0, len(x), batch_size)))


def _rounds(passes: dict, n: int, rounds: int = 7) -> dict:
    """Images/s of each pass in ``rounds`` rounds that run them one after another."""
    speeds = {label: [] for label in passes}
    for _ in range(rounds):
        for label, run in passes.items():
            started = time.perf_counter()
            run()
            speeds[label].append(n / (time.perf_counter() - started))
    return speeds


def _engine_row(label: str, run_batch, x: np.ndarray, latency_images: int) -> tuple:
    run_batch(x[:32])  # warm-up
    return (
        label,
        _throughput(lambda: [run_batch(x[i : i + 32]) for i in range(0, len(x), 32)], len(x)),
        *_batch_latencies(lambda i: run_batch(x[i : i + 32]), len(x)),
        *_latencies(lambda i: run_batch(x[i : i + 1]), list(range(len(x))), latency_images),
    )


def _predictor_row(label: str, clf, files: list, latency_images: int) -> tuple:
    list(clf.predict_files(files[:32], k=5))  # warm-up
    return (
        label,
        _throughput(lambda: list(clf.predict_files(files, k=5)), len(files)),
        *_batch_latencies(lambda i: list(clf.predict_files(files[i : i + 32], k=5)), len(files)),
        *_latencies(lambda f: list(clf.predict_files([f], k=5)), files, latency_images),
    )


def main(run_dir: str, latency_images: int = 100) -> None:
    import onnxruntime as ort

    from imgclf.data.split import read_split_csv
    from imgclf.export import export
    from imgclf.predictors.pytorch import load_torch as load
    from imgclf.runtime import OnnxClassifier, OpenVinoClassifier, compile_openvino, openvino_precision

    run = Path(run_dir)
    if not (run / "onnx" / "model.onnx").exists():
        export(run, run / "onnx")
    files = [s.path for s in read_split_csv(run / "split.csv") if s.split == "test"]
    onnx_fp32 = OnnxClassifier(run / "onnx", batch_size=32)
    x = np.stack([onnx_fp32._input(f) for f in files])  # decoded, resized, normalised float32
    session = ort.InferenceSession(str(run / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    one_thread = ort.SessionOptions()
    one_thread.intra_op_num_threads = 1
    single = ort.InferenceSession(str(run / "onnx" / "model.onnx"), one_thread, providers=["CPUExecutionProvider"])
    raw_session = lambda b: session.run(None, {"pixels": b})  # noqa: E731
    raw_single = lambda b: single.run(None, {"pixels": b})  # noqa: E731
    rows = [
        _engine_row("raw ONNX Runtime fp32, preprocessed tensors", raw_session, x, latency_images),
        (
            "raw ONNX Runtime fp32, preprocessed tensors, two batches at once on one thread each",
            _throughput(lambda: _two_at_once(raw_single, x), len(x)),
            None,
            None,
            None,
            None,
            None,
        ),
    ]
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
    rounds = _rounds(
        {
            "raw": lambda: [raw_session(x[i : i + 32]) for i in range(0, len(x), 32)],
            "raw two at once": lambda: _two_at_once(raw_single, x),
            "files": lambda: list(onnx_fp32.predict_files(files, k=5)),
        },
        len(files),
    )
    # OpenVINO last: its worker threads linger after inference and slowed the rows after them
    request = compile_openvino(run / "onnx" / "model.onnx")
    rows.append(
        _engine_row(
            f"raw OpenVINO {openvino_precision()}, preprocessed tensors",
            lambda b: request.infer({0: b}),
            x,
            latency_images,
        )
    )
    rows.append(
        _predictor_row(
            f"imgclf OpenVINO {openvino_precision()}, files -> top-5",
            OpenVinoClassifier(run / "onnx", batch_size=32),
            files,
            latency_images,
        )
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; model: {onnx_fp32.meta['architecture']} "
        f"at {onnx_fp32.image_size} px; {len(files)} test photos"
    )
    print(
        "| path | images/s, batch 32 | vs raw ONNX Runtime | p50 / p99 ms per batch of 32 | images/s, batch 1 "
        "| p50 / p99 ms, batch 1 |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, speed, p50_32, p99_32, speed1, p50, p99 in rows:
        latency = f"{p50_32:.0f} / {p99_32:.0f} | {speed1:.1f} | {p50:.1f} / {p99:.1f}" if p50_32 else " | | "
        print(f"| {label} | {speed:.1f} | {speed / rows[0][1]:.2f} | {latency} |")

    print()
    print("End to end against raw ONNX Runtime fp32, side by side in seven rounds (images/s):")
    print("| round | raw, one batch at a time | raw, two at once | imgclf files -> top-5 | ratio to the faster raw |")
    print("|---:|---:|---:|---:|---:|")
    ratios = []
    for number, (plain, two_at_once, end_to_end) in enumerate(zip(*rounds.values())):
        ratios.append(end_to_end / max(plain, two_at_once))
        print(f"| {number + 1} | {plain:.1f} | {two_at_once:.1f} | {end_to_end:.1f} | {ratios[-1]:.2f} |")
    print(
        f"median ratio {np.median(ratios):.2f} (to the plain session alone: "
        f"{np.median(np.array(rounds['files']) / np.array(rounds['raw'])):.2f})"
    )

    print()
    print(
        "| batch size | raw ONNX Runtime fp32, images/s (plain / two at once) | imgclf ONNX Runtime fp32 files -> "
        "top-5, images/s | ratio to the faster raw |"
    )
    print("|---:|---:|---:|---:|")
    for batch_size in (8, 16, 32, 64):
        clf = OnnxClassifier(run / "onnx", batch_size=batch_size)
        raw = _throughput(lambda: [raw_session(x[i : i + batch_size]) for i in range(0, len(x), batch_size)], len(x))
        raw_two = _throughput(lambda: _two_at_once(raw_single, x, batch_size), len(x))
        end_to_end = _throughput(lambda: list(clf.predict_files(files, k=5)), len(files))
        print(f"| {batch_size} | {raw:.1f} / {raw_two:.1f} | {end_to_end:.1f} | {end_to_end / max(raw, raw_two):.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])

"""Prediction through the service under load, beside raw ONNX Runtime in the same run.

A trained and exported run folder becomes version 1 of a model in a fresh home; `imgclf serve`
runs on 127.0.0.1 and a bounded Python client (threads, one photo of clothing-small per request)
measures: 1 client (p50/p99 latency), 8 clients (images/s against raw ONNX Runtime on
preprocessed tensors, p99, errors), and a soak at 8 clients (the server's memory growth).

  .venv/bin/python bench/serve.py RUN_DIR [--soak 120]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from imgclf.core.machine import cpu_model  # noqa: E402
from imgclf.serve import create_key  # noqa: E402
from imgclf.serve.store import Home, Store, new_id  # noqa: E402
from tests.serve.conftest import start_service, stop_service  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"


def publish(run: Path, home: Path) -> str:
    """The run as version 1 of a new model, as the worker would have left it."""
    store = Store(Home(home))
    model_id = new_id("mdl")
    store.execute("INSERT INTO models VALUES (?, 'bench', ?, 1)", model_id, time.time())
    shutil.copytree(run, store.home.version_dir(model_id, 1), ignore=shutil.ignore_patterns("tensorboard"))
    store.execute("INSERT INTO versions VALUES (?, 1, 'bench', 'ready', ?, NULL)", model_id, time.time())
    return model_id


def raw_onnxruntime(run: Path, photos: list[Path]) -> float:
    """Images/s of ONNX Runtime alone on already preprocessed tensors, batch 1, 8 threads at once."""
    from imgclf.runtime import OnnxClassifier

    clf = OnnxClassifier(run / "onnx")
    x = np.stack([clf._input(str(p)) for p in photos[:8]])
    done, started = [0], time.perf_counter()

    def work(row: np.ndarray) -> None:
        while time.perf_counter() - started < 10:
            clf._proba_of_batch(row[None])
            done[0] += 1

    threads = [threading.Thread(target=work, args=(x[i],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done[0] / (time.perf_counter() - started)


def load(url: str, key: str, model_id: str, photos: list[bytes], clients: int, seconds: float) -> dict:
    latencies, errors, refused = [], [], []
    stop = time.perf_counter() + seconds

    def client(n: int) -> None:
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}", "Content-Type": "image/jpeg"}, timeout=30
        ) as http:
            i = n
            while time.perf_counter() < stop:
                started = time.perf_counter()
                response = http.post(f"/v1/models/{model_id}/predict?k=1", content=photos[i % len(photos)])
                took = time.perf_counter() - started
                if response.status_code == 503 and response.headers.get("retry-after"):
                    refused.append(took)  # the bounded queue's fast no; a real client waits Retry-After
                    time.sleep(0.05)
                else:
                    latencies.append(took)
                if response.status_code not in (200, 503):
                    errors.append(response.status_code)
                i += clients

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ms = sorted(1000 * s for s in latencies)
    result = {
        "requests": len(ms),
        "images_per_s": round(len(ms) / seconds, 1),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 1),
        "errors": len(errors),
    }
    if refused:
        no = sorted(1000 * s for s in refused)
        result.update({"503s": len(no), "503_p99_ms": round(no[int(0.99 * (len(no) - 1))], 1)})
    return result


def train_beside(url: str, admin: str) -> str:
    """A training job of the service's own (default settings) on 15 photos per class of 3
    classes; returns its id."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=60) as http:
        classes = ("hat", "pants", "shoes")
        model = http.post("/v1/models", json={"name": "beside", "categories": list(classes)}).json()
        for category in model["categories"]:
            files = [("files", (p.name, p.read_bytes(), "image/jpeg"))
                     for p in sorted((DATA / "train" / category["name"]).glob("*.jpg"))[:15]]  # fmt: skip
            http.post(f"/v1/models/{model['id']}/categories/{category['id']}/images", files=files)
        return http.post(f"/v1/models/{model['id']}/train", json={}).json()["id"]


def wait_running(url: str, admin: str, job_id: str) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=60) as http:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = http.get(f"/v1/jobs/{job_id}").json()
            if status["state"] == "running" and status.get("stage"):
                return
            time.sleep(0.5)


def rss_mb(pid: int) -> float:
    """Resident memory of the service process and its children (the worker), in MB."""
    total = 0
    for line in subprocess.run(
        ["ps", "-o", "rss=", "--ppid", str(pid), "-p", str(pid)], capture_output=True, text=True
    ).stdout.split():
        total += int(line)
    return total / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--soak", type=float, default=120.0)
    args = parser.parse_args()
    run = Path(args.run_dir)
    photos = sorted((DATA / "test").glob("*/*.jpg"))[::7][:40]
    work = Path(tempfile.mkdtemp(prefix="imgclf-bench-serve-"))
    home = work / "home"
    key = create_key(home, "predict")
    admin = create_key(home, "admin")
    model_id = publish(run, home)
    print(f"CPU: {cpu_model()}; {os.cpu_count()} cores; generator on the same machine", flush=True)
    print(f"raw ONNX Runtime, 8 threads, batch 1: {raw_onnxruntime(run, photos):.1f} img/s", flush=True)
    process, url = start_service(home, {**os.environ})
    try:
        data = [p.read_bytes() for p in photos]
        load(url, key, model_id, data, 1, 3)  # warm: the model loads on the first request
        print("1 client:", load(url, key, model_id, data, 1, 20), flush=True)
        print("8 clients:", load(url, key, model_id, data, 8, 20), flush=True)
        before = rss_mb(process.pid)
        soak = load(url, key, model_id, data, 8, args.soak)
        print(
            f"soak {args.soak:.0f} s at 8 clients: {soak}; memory {before:.0f} -> {rss_mb(process.pid):.0f} MB",
            flush=True,
        )
        print("64 clients (bounded queue):", load(url, key, model_id, data, 64, 20), flush=True)
        job_id = train_beside(url, admin)
        wait_running(url, admin, job_id)
        print("1 client while a training job runs:", load(url, key, model_id, data, 1, 20), flush=True)
        print("8 clients while a training job runs:", load(url, key, model_id, data, 8, 20), flush=True)
    finally:
        stop_service(process)


if __name__ == "__main__":
    main()

"""bench/gpu.py runs on a CPU-only machine with --smoke: its figures are JSON lines that name the
machine they were measured on, the GPU-only parts are recorded as skipped, and the table is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


@pytest.mark.slow
def test_smoke_run_writes_its_figures(clothing, tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, str(BENCH), "--smoke", "--out", str(out), "--data", str(clothing),
               "--only-models", "resnet50", "--only", "models,loader,decode"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
    rows = [json.loads(line) for line in (out / "gpu.jsonl").read_text().splitlines()]
    by_item = {row["item"]: row for row in rows}
    step = by_item["train_step"]
    assert step["status"] == "ok" and step["img_s"] > 0 and step["model"] == "resnet50", step
    assert by_item["cpu_loader_pil"]["status"] == "ok" and by_item["cpu_loader_pil"]["img_s"] > 0
    assert by_item["gpu_decode_nvjpeg"]["status"] == "skipped"
    assert all(row["env"]["cpu"] and row["env"]["torch"] for row in rows)
    table = (out / "gpu.md").read_text()
    assert "train step resnet50" in table and "2,470" in table

"""SIGTERM in every stage of a head-mode training on real photos (clothing-small): in the check
before the run exists, and in feature extraction: each ends within seconds with exit 3 and says
how to go on, and going on finishes the run without redoing the work done
(../shared/design/BAD_INPUTS.md case 20; the epochs are covered in test_resume.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _progress(events: Path, stage: str) -> list[dict]:
    if not events.exists():
        return []
    rows = []
    for line in events.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # the line being written
            continue
        if row.get("event") == "progress" and row["stage"].startswith(stage):
            rows.append(row)
    return rows


def _train_until(cmd: list[str], events: Path, stage: str, env: dict, timeout: float = 240) -> tuple[int, str]:
    """Start ``cmd``, send SIGTERM once ``stage`` is under way, return its exit code and stderr."""
    events.unlink(missing_ok=True)
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not [r for r in _progress(events, stage) if 0 < r["done"] < r["total"]]:
            assert process.poll() is None, f"ended before {stage}: " + process.communicate()[1][-2000:]
            assert time.monotonic() < deadline, f"no {stage} progress in {timeout} s"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        assert time.monotonic() - sent < 30, "the stop took longer than 30 s"
    finally:
        process.kill()
    rows = _progress(events, stage)
    assert rows[-1]["done"] < rows[-1]["total"], f"{stage} had ended before the signal"
    return process.returncode, stderr


def test_sigterm_in_the_check_and_in_feature_extraction_stops_and_goes_on(clothing, tmp_path):
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(tmp_path / "cache")}  # nothing checked or extracted yet
    out, events = tmp_path / "run", tmp_path / "events.jsonl"
    train = [sys.executable, "-m", "imgclf.cli", "train", str(clothing), "--out", str(out), "--mode", "head"]
    train += ["--model", "tf_efficientnet_lite0", "--image-size", "96", "--time-budget", "0"]
    train += ["--events", str(events)]

    code, stderr = _train_until(train, events, "check", env)
    assert code == 3, stderr[-2000:]
    assert "before the run was set up" in stderr and "the same command starts it again" in stderr
    assert not (out / "run.json").exists()

    code, stderr = _train_until([*train, "--resume", "auto"], events, "features", env)
    assert code == 3, stderr[-2000:]
    checked = _progress(events, "check")
    assert checked[-1]["total"] < 3781  # the files checked before the first stop were not checked again
    assert f"continue with: imgclf train --resume {out}" in stderr
    assert json.loads((out / "run.json").read_text())["status"] == "stopped"

    done = subprocess.run(
        [sys.executable, "-m", "imgclf.cli", "train", "--resume", str(out), "--events", str(events)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    extracted = _progress(events, "features (view 0)")
    assert extracted[-1]["done"] == extracted[-1]["total"] < 3781  # only what the stop left undone
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["top1"] > 0.1 + 0.5, metrics["top1"]  # 10 classes

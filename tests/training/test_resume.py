"""A killed or stopped run resumes to exactly the weights of an uninterrupted run (same seed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_manifest

# small but not instant: about 10 epochs of a few hundred real images, so a kill lands mid-run
ARGS = [
    "--model",
    "cnn3",
    "--image-size",
    "24",
    "--epochs",
    "10",
    "--batch-size",
    "16",
    "--threads",
    "1",
    "--patience",
    "0",
    "--augment",
    "strong",
    "--seed",
    "3",
    # fixed, not measured: two fresh runs timed under different load could choose different layouts
    "--channels-last",
    "on",
]


def _train_cmd(data: Path, out: Path, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "imgclf.cli", "train", str(data), "--out", str(out), *ARGS, *extra]


def _resume_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "imgclf.cli", "train", "--resume", str(out)]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def manifest(digits_dir, tmp_path_factory) -> Path:
    return write_manifest(digits_dir, tmp_path_factory.mktemp("m") / "subset.csv", per_class=40)


@pytest.fixture(scope="module")
def reference_run(manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_train_cmd(manifest, out), check=True, capture_output=True, timeout=300)
    return out


def _wait_for_epochs(out: Path, process: subprocess.Popen, epochs: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = out / "history.csv"
        if history.exists() and len(history.read_text().strip().splitlines()) > epochs:
            return
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.01)
    raise AssertionError("training did not reach the expected epoch in time")


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(manifest, reference_run, tmp_path):
    out = tmp_path / "killed"
    process = subprocess.Popen(_train_cmd(manifest, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_epochs(out, process, epochs=2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "running", "the run finished before it could be killed"
    resumed = subprocess.run(_resume_cmd(out), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at epoch" in resumed.stderr
    _assert_same_weights(reference_run / "model.safetensors", out / "model.safetensors")
    _assert_same_weights(reference_run / "checkpoint.safetensors", out / "checkpoint.safetensors")
    assert (out / "history.csv").read_text().count("\n") == (reference_run / "history.csv").read_text().count("\n")


@pytest.mark.slow
def test_sigterm_stops_after_a_step_with_checkpoint_and_resumes_exactly(manifest, reference_run, tmp_path):
    out = tmp_path / "terminated"
    process = subprocess.Popen(_train_cmd(manifest, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_epochs(out, process, epochs=1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 3, stderr[-2000:]  # 3: stopped, resumable
    assert "SIGTERM received" in stderr and "--resume" in stderr
    assert json.loads((out / "run.json").read_text())["status"] == "stopped"
    resumed = subprocess.run(_resume_cmd(out), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_weights(reference_run / "model.safetensors", out / "model.safetensors")


@pytest.mark.slow
def test_ctrl_c_to_the_whole_process_group_stops_with_a_checkpoint_and_resumes_exactly(
    manifest, reference_run, tmp_path
):
    """BAD_INPUTS case 20 as a terminal does it: SIGINT to the process group, so that any data
    loading workers get it too. The run stops after its step (exit 3) and resumes exactly."""
    import os

    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        _train_cmd(manifest, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    _wait_for_epochs(out, process, epochs=1)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 3 and "Traceback" not in stderr, stderr[-2000:]
    assert "SIGINT received" in stderr and json.loads((out / "run.json").read_text())["status"] == "stopped"
    resumed = subprocess.run(_resume_cmd(out), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_weights(reference_run / "model.safetensors", out / "model.safetensors")


@pytest.mark.slow
def test_stop_mid_epoch_by_step_limit_resumes_exactly(manifest, reference_run, tmp_path):
    """max_steps stops inside an epoch (step 13 of 25): the checkpoint carries the epoch's position."""
    out = tmp_path / "limited"
    first = subprocess.run(
        _train_cmd(manifest, out, ["--max-steps", "38"]), capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 3, first.stderr[-2000:]
    from imgclf.training.checkpoint import load_checkpoint

    state = load_checkpoint(out / "checkpoint.safetensors")
    assert state["progress"] is not None and state["progress"]["step"] > 0, "expected a mid-epoch checkpoint"
    # the step limit is a setting of the run; lift it to let the resumed run finish
    settings = json.loads((out / "settings.json").read_text())
    settings["train"]["max_steps"] = 0
    (out / "settings.json").write_text(json.dumps(settings))
    resumed = subprocess.run(_resume_cmd(out), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_weights(reference_run / "model.safetensors", out / "model.safetensors")


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    from imgclf.api import train
    from imgclf.core.errors import TrainError

    with pytest.raises(TrainError, match="no run to resume here"):
        train(None, tmp_path, resume=True)


def test_non_finite_loss_stops_the_run_and_keeps_no_bad_model(manifest, tmp_path):
    from imgclf.api import train
    from imgclf.core.errors import TrainError

    out = tmp_path / "nan"
    overrides = {
        "model": "cnn1",
        "image_size": 16,
        "epochs": 3,
        "lr": 1e20,
        "threads": 1,
        "precision": "fp32",
        "warmup_epochs": 0,
    }
    with pytest.raises(TrainError, match="loss became"):
        train(str(manifest), out, overrides)
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    if (out / "model.safetensors").exists():  # a bundle from an earlier, finite epoch only
        meta = json.loads((out / "model.json").read_text())
        assert all(v == v for v in meta["metrics"].values()), "a NaN model was saved as best"


@pytest.mark.slow
def test_stop_token_from_another_thread_stops_within_a_step_and_resumes_exactly(manifest, reference_run, tmp_path):
    """As the service will: train on a worker thread, stop it from this one. The training thread
    is held at its 5th step of epoch 2 until the token is set, so the stop lands right after it."""
    import threading

    from imgclf import api
    from imgclf.core.events import Progress, StopToken
    from imgclf.training.checkpoint import load_checkpoint

    settings = {
        "model": "cnn3",
        "image_size": 24,
        "epochs": 10,
        "batch_size": 16,
        "threads": 1,
        "patience": 0,
        "augment": "strong",
        "seed": 3,
    }
    stop, reached, released = StopToken(), threading.Event(), threading.Event()
    held_at = []

    def events(event):
        if (
            isinstance(event, Progress)
            and event.stage == "train"
            and event.detail.get("epoch") == 2
            and event.done >= 5
            and not held_at
        ):
            held_at.append(event.done)
            reached.set()
            released.wait(timeout=60)

    out, results, threads = tmp_path / "stopped", [], torch.get_num_threads()
    worker = threading.Thread(
        target=lambda: results.append(api.train(manifest, out, settings, events=events, stop=stop))
    )
    try:
        worker.start()
        assert reached.wait(timeout=120), "training never reached epoch 2"
        stop.set("stopped from another thread")
        released.set()
        worker.join(timeout=120)
        assert results and results[0].status == "stopped"
        state = load_checkpoint(out / "checkpoint.safetensors")
        assert state["epoch"] == 1 and state["progress"]["step"] == held_at[0]  # no step after the stop
        assert json.loads((out / "run.json").read_text())["status"] == "stopped"
        resumed = api.train(None, out, resume=True)
    finally:
        torch.set_num_threads(threads)
    assert resumed.status == "finished" and resumed.metrics["n"] > 0
    _assert_same_weights(reference_run / "model.safetensors", out / "model.safetensors")


def test_resume_changes_only_system_settings_and_names_the_rest(manifest, tmp_path):
    out = tmp_path / "run"
    first = subprocess.run(_train_cmd(manifest, out, ["--max-steps", "3"]), capture_output=True, text=True, timeout=300)
    assert first.returncode == 3, first.stderr[-2000:]
    resumed = subprocess.run(
        _resume_cmd(out) + ["--epochs", "99", "--lr", "0.5", "--threads", "2", "--max-steps", "5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 3, resumed.stderr[-2000:]
    assert "ignored: epochs, lr, max_steps" in resumed.stderr
    saved = json.loads((out / "settings.json").read_text())
    assert saved["train"]["epochs"] == 10 and saved["system"]["threads"] == 2  # how the run went on


def test_a_head_on_features_that_are_not_finite_is_refused_with_the_reason():
    """BAD_INPUTS case 21 in head mode: NaN features (a damaged backbone) end the run before a
    head is fitted on them and saved as the model."""
    import torch

    from imgclf.core.errors import TrainError
    from imgclf.training.head import fit_head

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 8, generator=generator), torch.arange(40) % 2
    assert fit_head(x, y, x[:10], y[:10], 2).val_top1 >= 0  # finite features fit
    x[3, 5] = float("nan")
    with pytest.raises(TrainError, match="1 of 40 training feature vectors are not finite.*--precision fp32"):
        fit_head(x, y, x[:2] * 0, y[:2], 2)


# a training whose third checkpoint write stops half-written (the real file, truncated to half)
# and waits to be killed there: SIGKILL inside a real write, not a simulated failure
_KILLED_IN_WRITE = """
import os, sys, time
from imgclf.training import checkpoint
real, count = checkpoint.save_file, [0]

def half_written(tensors, temp, metadata=None):
    count[0] += 1
    real(tensors, temp, metadata=metadata)
    if count[0] == 3:
        os.truncate(temp, os.path.getsize(temp) // 2)
        open(sys.argv[1], "w").write(temp)
        time.sleep(600)

checkpoint.save_file = half_written
from imgclf.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_write_keeps_the_last_whole_one_and_resumes_exactly(
    manifest, reference_run, tmp_path
):
    """BAD_INPUTS case 19: the process dies in the middle of writing the epoch-3 checkpoint; the
    epoch-2 checkpoint is whole, the half-written file is a temporary one beside it (never the
    checkpoint), the next training removes it and ends with the uninterrupted run's weights."""
    out, marker = tmp_path / "run", tmp_path / "writing"
    cmd = [sys.executable, "-c", _KILLED_IN_WRITE, str(marker), *_train_cmd(manifest, out)[3:]]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() or not marker.read_text():
            assert process.poll() is None, process.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the third checkpoint was not written in time"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    half = Path(marker.read_text())
    assert half.exists() and half.parent == out and half.name.endswith(".tmp")
    from imgclf.training.checkpoint import load_checkpoint

    assert load_checkpoint(out / "checkpoint.safetensors")["epoch"] == 2  # the one before, whole
    # the next training removes temporary files older than a minute (a younger one may be a report
    # that an evaluate beside it is writing): as if the restart came two minutes later
    os.utime(half, (time.time() - 120, time.time() - 120))
    resumed = subprocess.run(_resume_cmd(out), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at epoch 3" in resumed.stderr
    assert not half.exists() and not list(out.rglob("*.tmp"))
    _assert_same_weights(reference_run / "model.safetensors", out / "model.safetensors")

"""Files we must not lose are replaced whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgclf.core.atomic import atomic_write


def test_a_failed_write_leaves_the_old_file_whole_and_no_temp_file(tmp_path):
    target = tmp_path / "checkpoint.safetensors"
    target.write_text("old, complete content")

    def disk_full(temp: str) -> None:
        Path(temp).write_text("half of the new con")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, disk_full)
    assert target.read_text() == "old, complete content"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]
    atomic_write(target, lambda temp: Path(temp).write_text("new"))
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_feature_cache_round_trips_in_one_file(tmp_path, monkeypatch):
    import torch

    from imgclf.core.preprocessing import Preprocessing
    from imgclf.training.features import FeatureStore

    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(tmp_path))
    prep = Preprocessing(32, (0.5,) * 3, (0.5,) * 3)
    store = FeatureStore("m", "w", prep, 0)
    store.vectors = {"aa": torch.ones(4, dtype=torch.float16), "bb": torch.zeros(4, dtype=torch.float16)}
    store.dirty = True
    store.save()
    again = FeatureStore("m", "w", prep, 0)
    assert set(again.vectors) == {"aa", "bb"} and torch.equal(again.vectors["aa"], torch.ones(4, dtype=torch.float16))
    assert [p.suffix for p in store.path.parent.iterdir()] == [".safetensors"]


def test_temp_files_left_by_a_killed_write_are_removed_by_the_next_training(tmp_path):
    """BAD_INPUTS case 57: a write cut by SIGKILL leaves ``NAME….tmp``; the next training to hold
    the run folder removes it (only old ones: a write in progress beside it keeps its own)."""
    import os
    import time

    from imgclf.core.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.make()
    old = [run.path / "checkpoint.safetensorsab12.tmp", run.path / "onnx" / "model.onnxcd34.tmp"]
    old[1].parent.mkdir()
    fresh = run.path / "metrics.jsonef56.tmp"
    for path in (*old, fresh):
        path.write_bytes(b"half")
    for path in old:
        os.utime(path, (time.time() - 600, time.time() - 600))
    (run.path / "run.json").write_text("{}")
    with run.lock():
        pass
    assert not any(path.exists() for path in old) and fresh.exists() and (run.path / "run.json").exists()


@pytest.mark.slow
def test_a_full_disk_during_training_is_one_line_and_the_earlier_files_are_whole(digits_dir, tmp_path):
    """BAD_INPUTS case 22, for real: the training's files may not grow past 60 kB (RLIMIT_FSIZE,
    the kernel's EFBIG, as a full disk's ENOSPC), so the model's weights cannot be written. The
    run ends with one line naming the file and what to do, exit status 2, and the files written
    before it (settings, split) are whole."""
    import json
    import resource
    import shutil
    import signal
    import subprocess
    import sys

    for label in ("3", "7"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for png in sorted((digits_dir / label).glob("*.png"))[:30]:
            shutil.copy(png, tmp_path / "data" / label / png.name)

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    run = tmp_path / "run"
    command = [sys.executable, "-m", "imgclf.cli", "train", str(tmp_path / "data"), "--out", str(run)]
    command += ["--model", "cnn3", "--image-size", "16", "--epochs", "1"]
    env = {**__import__("os").environ, "IMGCLF_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=small_files, env=env)
    lines = [line for line in done.stderr.splitlines() if line.startswith("imgclf: error")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(lines) == 1 and "cannot write it (File too large); the file there before is whole" in lines[0]
    assert "free some disk space" in lines[0]
    assert json.loads((run / "settings.json").read_text()) and (run / "split.csv").read_text().count("\n") > 40
    assert not list(run.rglob("*.tmp")), "no half-written file left"

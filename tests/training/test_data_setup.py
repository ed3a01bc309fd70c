"""Data that cannot train a classifier is refused before any time is spent, with the reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from imgclf.api import train
from imgclf.core.errors import DataError, TrainError


def _class(digits_dir, target, label, n):
    target.mkdir(parents=True)
    for png in sorted((digits_dir / label).glob("*.png"))[:n]:
        shutil.copy(png, target / png.name)


def test_one_class_only_is_refused(digits_dir, tmp_path):
    _class(digits_dir, tmp_path / "data" / "seven", "7", 20)
    with pytest.raises(DataError, match="at least 2 classes.*only 'seven'"):
        train(str(tmp_path / "data"), tmp_path / "run", {"epochs": 1})


def test_class_with_a_single_image_is_refused_by_name(digits_dir, tmp_path):
    _class(digits_dir, tmp_path / "data" / "seven", "7", 20)
    _class(digits_dir, tmp_path / "data" / "one", "1", 20)
    _class(digits_dir, tmp_path / "data" / "lonely", "3", 1)
    (tmp_path / "data" / "empty").mkdir()  # an empty folder is not a class: reported, left out
    with pytest.raises(DataError, match="single usable image.*lonely"):
        train(str(tmp_path / "data"), tmp_path / "run", {"epochs": 1})


def test_no_images_at_all_is_a_clear_error(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a" / "readme.txt").write_text("no photos here")
    with pytest.raises(DataError, match="no labelled images found"):
        train(str(tmp_path / "data"), tmp_path / "run", {"epochs": 1})


def test_a_second_train_into_a_used_run_folder_is_refused(digits_run):
    with pytest.raises(TrainError, match="already holds a run.*--resume"):
        train("anything", digits_run, {"epochs": 1})


def test_no_test_split_is_refused_before_training_and_no_val_split_is_said(digits_dir, tmp_path):
    """BAD_INPUTS case 52: test_fraction 0 with no test split given is refused before any
    training (nothing written but the audit); val_fraction 0 trains, saying what it gives up."""
    import json

    from imgclf.core.events import Message

    for label in ("3", "7"):
        _class(digits_dir, tmp_path / "data" / label, label, 30)
    with pytest.raises(DataError, match="no test images after the split.*--test-fraction"):
        train(str(tmp_path / "data"), tmp_path / "no-test", {"test_fraction": 0, "model": "cnn1"})
    assert not (tmp_path / "no-test" / "model.safetensors").exists()
    said = []
    overrides = {"val_fraction": 0, "model": "cnn1", "image_size": 16, "epochs": 1}
    result = train(str(tmp_path / "data"), tmp_path / "no-val", overrides, events=said.append)
    warnings = [e.text for e in said if isinstance(e, Message) and e.level == "warning"]
    assert any("no validation images after the split" in text for text in warnings), warnings
    assert result.status == "finished" and json.loads((tmp_path / "no-val" / "metrics.json").read_text())["n"] > 0


def test_a_second_training_into_a_folder_being_trained_refuses_at_once(digits_dir, tmp_path):
    """BAD_INPUTS case 56: while another process trains into --out (its lock held), a new
    training there is refused at once, saying why and what to do."""
    import time

    from imgclf.core.rundir import RunDir

    for label in ("3", "7"):
        _class(digits_dir, tmp_path / "data" / label, label, 20)
    with RunDir(tmp_path / "busy").lock():
        started = time.perf_counter()
        with pytest.raises(TrainError, match="being trained by another process; wait for it to end, or train into"):
            train(str(tmp_path / "data"), tmp_path / "busy", {"model": "cnn1", "epochs": 1})
        assert time.perf_counter() - started < 5


def test_the_automatic_split_keeps_copies_of_a_photo_together(digits_dir, tmp_path):
    """BAD_INPUTS case 15 after the automatic split: 30 photos each saved twice under different
    names; split by name alone some pairs straddle train and test, but the run puts each pair in
    one split and says so."""
    from pathlib import Path

    from imgclf.core.events import Message
    from imgclf.data.sources import scan
    from imgclf.data.split import assign_splits, read_split_csv

    for label in ("3", "7"):
        folder = tmp_path / "data" / label
        folder.mkdir(parents=True)
        for n, png in enumerate(sorted((digits_dir / label).glob("*.png"))[:40]):
            shutil.copy(png, folder / f"{n}.png")
            if n < 15:
                shutil.copy(png, folder / f"copy-of-{n}.png")
    pairs = lambda splits: [{splits[f"{label}/{n}.png"], splits[f"{label}/copy-of-{n}.png"]}  # noqa: E731
                            for label in ("3", "7") for n in range(15)]  # fmt: skip
    by_name = {s.name: s.split for s in assign_splits(scan(str(tmp_path / "data")).samples, 0.1, 0.1)}
    assert any(len(pair) > 1 for pair in pairs(by_name)), "the test needs pairs that a name split separates"
    said = []
    train(
        str(tmp_path / "data"), tmp_path / "run", {"model": "cnn1", "image_size": 16, "epochs": 1}, events=said.append
    )
    splits = {f"{s.label}/{Path(s.path).name}": s.split for s in read_split_csv(tmp_path / "run" / "split.csv")}
    assert all(len(pair) == 1 for pair in pairs(splits)), "each photo and its copy in one split"
    assert any(isinstance(e, Message) and "kept in the split of their first copy" in e.text for e in said)


def test_an_empty_class_folder_is_reported(digits_dir, tmp_path):
    """BAD_INPUTS case 13: an empty class folder (or one with no images in it) is named in the
    audit with the reason, and is no class."""
    from imgclf.api import check

    _class(digits_dir, tmp_path / "data" / "seven", "7", 12)
    _class(digits_dir, tmp_path / "data" / "one", "1", 12)
    (tmp_path / "data" / "empty").mkdir()
    (tmp_path / "data" / "notes").mkdir()
    (tmp_path / "data" / "notes" / "todo.txt").write_text("take photos")
    report = check(str(tmp_path / "data"))
    reasons = {Path(p["path"]).name: p["reason"] for p in report.problems}
    assert reasons["empty"] == "empty class folder (no images); add photos or remove it"
    assert reasons["notes"] == "empty class folder (no images, 1 other file(s)); add photos or remove it"
    assert sorted({s.label for s in report.usable}) == ["one", "seven"]


def test_running_out_of_memory_says_which_batch_size_to_try(digits_dir, tmp_path, monkeypatch):
    """BAD_INPUTS case 23: the CPU allocator's failure (a plain RuntimeError from PyTorch, here
    injected into the first optimisation step) ends the run with a message suggesting half the
    batch size and how to resume, not a traceback."""
    import imgclf.training.loop as loop

    def allocation_fails(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"
        )

    for label in ("3", "7"):
        _class(digits_dir, tmp_path / "data" / label, label, 20)
    monkeypatch.setattr(loop, "_optimisation_step", allocation_fails)
    with pytest.raises(TrainError) as raised:
        train(str(tmp_path / "data"), tmp_path / "run", {"model": "cnn1", "image_size": 16, "batch_size": 32})
    message = str(raised.value)
    assert message.startswith("out of memory (") and "can't allocate memory" in message
    assert "try --batch-size 16" in message and "imgclf train --resume" in message

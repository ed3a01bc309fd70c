"""Data that cannot train a classifier is refused before any time is spent, with the reason."""

from __future__ import annotations

import shutil

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
    (tmp_path / "data" / "empty").mkdir()  # an empty folder is not a class: ignored
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

"""Shared fixtures: the real photos in ../shared/datasets, and an isolated cache per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLOTHING = REPO.parent / "shared" / "datasets" / "clothing-small"


@pytest.fixture(scope="session")
def _shared_engines(tmp_path_factory) -> Path:
    """What imgclf measures about this machine (the engine for frozen passes, the memory layout)
    is measured once per test session, as it is once per machine; the tests of the measurement
    itself use a cache folder of their own."""
    return tmp_path_factory.mktemp("imgclf-engines")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch, _shared_engines):
    """Audit and feature caches go to a temporary folder per test, never to the user's home."""
    folder = tmp_path_factory.mktemp("imgclf-cache")
    (folder / "engines").symlink_to(_shared_engines, target_is_directory=True)
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(folder))


@pytest.fixture(scope="session")
def clothing() -> Path:
    if not CLOTHING.is_dir():
        from tests.badfiles import missing_data

        missing_data(f"real photos not found at {CLOTHING} (see ../shared/datasets/README.md)")
    return CLOTHING


def clothing_photos(root: Path, split: str, label: str, n: int) -> list[Path]:
    return sorted((root / split / label).glob("*.jpg"))[:n]


def pytest_configure(config):
    # Deterministic, quiet runs on small machines.
    os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's real digit scans as a folder-per-class PNG data set (written once)."""
    from imgclf.data.digits import write_digits

    return write_digits(tmp_path_factory.mktemp("digits") / "digits")


def write_manifest(digits: Path, path: Path, per_class: int, classes=range(10)) -> Path:
    """A CSV manifest over a subset of the digits, paths relative to the CSV: through a link in the
    CSV's folder, as a CSV may not lead outside its folder (unless allow_outside)."""
    link = path.parent / f"{path.stem}-images"
    if not link.exists():
        link.symlink_to(digits, target_is_directory=True)
    rows = ["path,label"]
    for label in classes:
        for png in sorted((digits / str(label)).glob("*.png"))[:per_class]:
            rows.append(f"{link.name}/{png.relative_to(digits).as_posix()},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def digits_run(digits_dir, tmp_path_factory) -> Path:
    """A small model trained once on the real digit scans, for tests that need a trained bundle."""
    from imgclf.api import train

    out = tmp_path_factory.mktemp("digits-run") / "run"
    overrides = {
        "model": "cnn3",
        "image_size": 24,
        "epochs": 4,
        "batch_size": 32,
        "lr": 3e-3,
        "augment": "none",
        "patience": 0,
    }
    train(str(digits_dir), out, overrides)
    return out


@pytest.fixture(scope="session")
def clothing_run(clothing, tmp_path_factory) -> Path:
    """cnn4 trained briefly on all of clothing-small (real photos), shared by the tests that check
    its accuracy, its run folder and its report."""
    from imgclf.api import train

    out = tmp_path_factory.mktemp("clothing-run") / "run"
    train(str(clothing), out, {"model": "cnn4", "image_size": 48, "epochs": 6, "patience": 0})
    return out

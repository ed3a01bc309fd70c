"""Shared fixtures: the real photos in ../shared/datasets, and an isolated cache per test."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLOTHING = REPO.parent / "shared" / "datasets" / "clothing-small"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Audit caches go to a temporary folder, never to the user's home."""
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(tmp_path_factory.mktemp("imgclf-cache")))


@pytest.fixture(scope="session")
def clothing() -> Path:
    if not CLOTHING.is_dir():
        pytest.skip(f"real photos not found at {CLOTHING} (see ../shared/datasets/README.md)")
    return CLOTHING


def clothing_photos(root: Path, split: str, label: str, n: int) -> list[Path]:
    return sorted((root / split / label).glob("*.jpg"))[:n]


def pytest_configure(config):
    # Deterministic, quiet runs on small machines.
    os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))

"""imgclf on Ray: a clear error without Ray; with it, two CPU workers train one small run that
rank 0 alone writes, and a rerun with the same folder continues it instead of starting over."""

from __future__ import annotations

import shutil
import sys

import pytest

from imgclf.core.errors import ImgclfError
from imgclf.core.rundir import RunDir


def test_without_ray_the_error_says_what_to_install(monkeypatch, tmp_path):
    from imgclf import ray_train

    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as when it is not installed
    with pytest.raises(ImgclfError, match=r"pip install imgclf\[ray\]"):
        ray_train.train_on_ray(tmp_path / "photos", tmp_path / "run")


@pytest.fixture()
def small(clothing, tmp_path):
    root = tmp_path / "photos"
    for split, n in (("train", 10), ("validation", 3), ("test", 3)):
        for label in ("hat", "pants", "shoes"):
            (root / split / label).mkdir(parents=True)
            for photo in sorted((clothing / split / label).glob("*.jpg"))[:n]:
                shutil.copy(photo, root / split / label / photo.name)
    return root


@pytest.mark.slow
def test_two_cpu_workers_train_one_run(small, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from imgclf.ray_train import train_on_ray

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        settings = {"model": "cnn4", "image_size": 32, "mode": "full", "epochs": 1, "batch_size": 8,
                    "workers": 0, "device": "cpu", "time_budget": "0"}  # fmt: skip
        out = tmp_path / "run"
        record = train_on_ray(small, out, settings, num_workers=2, storage_path=str(tmp_path / "ray"))
        assert record["status"] == "finished", record
        assert 0 <= record["metrics"]["top1"] <= 1 and record["metrics"]["n"] == 9
        assert RunDir(out).read_json(RunDir.SETTINGS)["train"]["batch_size"] == 8
        weights = (out / RunDir.WEIGHTS).stat().st_mtime_ns
        again = train_on_ray(small, out, settings, num_workers=2, storage_path=str(tmp_path / "ray"))
        assert again == record and (out / RunDir.WEIGHTS).stat().st_mtime_ns == weights  # not trained anew
    finally:
        ray.shutdown()

"""``imgclf datasets download`` on the fetch engine: retried, checked, nothing half-written."""

from __future__ import annotations

import hashlib

import pytest

from imgclf.core.errors import DataError
from imgclf.data.sources import idx
from tests.data.fetch.server import Reply, Seq


@pytest.fixture
def mirror(serve, monkeypatch):
    files = {name: f"fake {name}".encode() * 100 for name in idx._FILES}
    routes = {f"/{name}": Reply(body, content_type="application/gzip") for name, body in files.items()}
    first = idx._FILES[0]
    routes[f"/{first}"] = Seq([Reply(b"", 503), Reply(files[first], content_type="application/gzip")])
    server = serve(routes)
    spec = {"base": server.url("/"), "classes": idx.MNIST_CLASSES,
            "md5": {name: hashlib.md5(body).hexdigest() for name, body in files.items()}}  # fmt: skip
    monkeypatch.setitem(idx.DATASETS, "mnist", spec)
    return server, spec


def test_download_retries_and_checks(tmp_path, mirror):
    server, _ = mirror
    folder = idx.download("mnist", tmp_path / "mnist")
    assert sorted(p.name for p in folder.iterdir()) == sorted([*idx._FILES, "classes.txt"])
    assert server.count(f"/{idx._FILES[0]}") == 2  # the 503 was retried
    asked = len(server.requests)
    idx.download("mnist", tmp_path / "mnist")
    assert len(server.requests) == asked  # files already there and right are not asked for again


def test_download_failures_are_clear_and_leave_nothing(tmp_path, mirror):
    server, spec = mirror
    spec["md5"][idx._FILES[1]] = "0" * 32
    with pytest.raises(DataError, match="checksum mismatch"):
        idx.download("mnist", tmp_path / "a")
    server.routes[f"/{idx._FILES[0]}"] = Reply(b"", 404)
    with pytest.raises(DataError, match=r"cannot download http://127\.0\.0\.1:\d+/train-images.*HTTP 404"):
        idx.download("mnist", tmp_path / "b")
    assert not list((tmp_path / "b").glob("*.part"))

"""The service's error handlers: a library error is the request's fault (422), running out of
memory is the server's (503 with Retry-After), both in the one JSON error shape."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from imgclf.core.errors import BundleError, MemoryLimitError
from imgclf.serve.app import _handlers


def test_out_of_memory_is_503_and_retry_later_while_a_bad_bundle_is_422():
    app = FastAPI()
    _handlers(app)

    @app.get("/memory")
    def memory():
        raise MemoryLimitError("out of memory running the model on a batch of 64 images (...); try ...")

    @app.get("/bundle")
    def bundle():
        raise BundleError("x: no model.json here")

    client = TestClient(app)
    full = client.get("/memory")
    assert full.status_code == 503 and full.headers["retry-after"] == "5"
    assert full.json()["error"]["code"] == "out_of_memory"
    assert "batch of 64" in full.json()["error"]["message"]
    bad = client.get("/bundle")
    assert bad.status_code == 422 and bad.json()["error"]["code"] == BundleError.code

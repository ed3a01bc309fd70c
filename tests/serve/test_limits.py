"""The service's limits that answer at once: 507 when the disk is nearly full, 429 when too many
trainings are queued, 503 when the prediction queue is full, 408 for a client that stalls in the
middle of its body (slow loris)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from imgclf.serve import create_key  # noqa: E402
from imgclf.serve.app import create_app  # noqa: E402
from imgclf.serve.http import Limits  # noqa: E402
from imgclf.serve.store import Home, Store  # noqa: E402


def _client(home, limits: Limits) -> TestClient:
    key = create_key(home, "admin")
    client = TestClient(create_app(home, limits))
    client.headers["Authorization"] = f"Bearer {key}"
    return client


def test_low_disk_is_507_before_anything_is_written(tmp_path, clothing):
    with _client(tmp_path / "home", Limits(min_free_disk=2**62)) as client:
        model = client.post("/v1/models", json={"name": "m", "categories": ["a", "b"]}).json()
        photo = sorted((clothing / "train" / "hat").glob("*.jpg"))[0]
        target = f"/v1/models/{model['id']}/categories/{model['categories'][0]['id']}/images"
        answer = client.post(target, files=[("files", (photo.name, photo.read_bytes(), "image/jpeg"))])
    assert answer.status_code == 507 and answer.json()["error"]["code"] == "insufficient_storage"
    assert "free some space" in answer.json()["error"]["message"]
    assert not list((tmp_path / "home").rglob("*.jpg"))


def test_too_many_queued_trainings_is_429_with_retry_after(tmp_path):
    with _client(tmp_path / "home", Limits(queued_jobs=2)) as client:
        ids = [
            client.post("/v1/models", json={"name": f"m{i}", "categories": ["a", "b"]}).json()["id"] for i in range(3)
        ]
        store = Store(Home(tmp_path / "home"))
        for model_id in ids[:2]:
            store.add_job(model_id, {}, None)
        answer = client.post(f"/v1/models/{ids[2]}/train", json={})
    assert answer.status_code == 429 and answer.json()["error"]["code"] == "too_many_jobs"
    assert answer.headers["retry-after"] == "60"


def test_a_full_prediction_queue_is_a_fast_503_with_retry_after(tmp_path):
    with _client(tmp_path / "home", Limits(predict_queue=0)) as client:
        model = client.post("/v1/models", json={"name": "m", "categories": ["a", "b"]}).json()
        started = time.perf_counter()
        answer = client.post(f"/v1/models/{model['id']}/predict", content=b"x", headers={"Content-Type": "image/jpeg"})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "busy"
    assert answer.headers["retry-after"] == "1" and time.perf_counter() - started < 1.0


class _Served:
    """The app on a real uvicorn server in a thread (the test client cannot stall a body or stream)."""

    def __init__(self, app):
        import uvicorn

        from tests.serve.conftest import free_port

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def test_a_slow_loris_upload_times_out(tmp_path):
    key = create_key(tmp_path / "home", "admin")
    with _Served(create_app(tmp_path / "home", Limits(body_timeout=1.0))) as served:
        port = served.port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            head = (
                f"POST /v1/models/x/categories/y/images HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
            )
            sock.sendall(head.encode())
            started = time.perf_counter()
            chunks = [sock.recv(4096)]  # then nothing more: the client stalls
            waited = time.perf_counter() - started
            while chunks[-1]:  # the server closes the connection after its answer
                chunks.append(sock.recv(4096))
            answer = b"".join(chunks).decode()
        assert answer.startswith("HTTP/1.1 408") and "request_timeout" in answer, answer
        assert 0.9 < waited < 5.0


def test_an_event_stream_outlives_the_body_timeout(tmp_path):
    """The slow-body timeout ends with the body: a job's event stream that runs for longer than
    it is not cut (a browser saw ERR_INCOMPLETE_CHUNKED_ENCODING when it was)."""
    import httpx

    key = create_key(tmp_path / "home", "admin")
    app = create_app(tmp_path / "home", Limits(body_timeout=0.5))
    store = Store(Home(tmp_path / "home"))
    job, _ = store.add_job("m1", {}, None)
    with _Served(app) as served:
        url = f"http://127.0.0.1:{served.port}/v1/jobs/{job['id']}/events"
        statuses = []
        with httpx.stream("GET", url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    statuses.append(line[6:])
                    if len(statuses) == 1:
                        time.sleep(1.5)  # three body timeouts, with the stream open
                        store.execute("UPDATE jobs SET state = 'running' WHERE id = ?", job["id"])
                    elif len(statuses) == 2:
                        store.finish_job(job["id"], "cancelled")
    assert [json.loads(s)["state"] for s in statuses] == ["queued", "running", "cancelled"]


def test_a_prediction_over_the_time_limit_is_504_and_frees_its_slot(tmp_path, digits_run, digits_dir):
    import shutil

    from imgclf.api import export

    home = tmp_path / "home"
    with _client(home, Limits(predict_timeout=1e-3)) as client:
        model = client.post("/v1/models", json={"name": "digits", "categories": ["a", "b"]}).json()
        export(digits_run, Home(home).version_dir(model["id"], 1) / "onnx")
        for name in ("run.json", "settings.json"):
            shutil.copy(digits_run / name, Home(home).version_dir(model["id"], 1) / name)
        Store(Home(home)).execute("UPDATE models SET active_version = 1 WHERE id = ?", model["id"])
        photo = sorted((digits_dir / "3").glob("*.png"))[0].read_bytes()
        target = f"/v1/models/{model['id']}/predict"
        many = [("files", (f"{n}.png", photo, "image/png")) for n in range(150)]  # well over a millisecond
        slow = client.post(target, files=many)
        assert client.app.state.predicting == 0, "the slot is free again"
        client.app.state.limits = Limits()
        fine = client.post(target, content=photo, headers={"Content-Type": "image/png"})
    assert slow.status_code == 504 and slow.json()["error"]["code"] == "prediction_timeout", slow.text
    assert "send fewer or smaller images" in slow.json()["error"]["message"]
    assert fine.status_code == 200 and fine.json()["results"][0]["label"] in [str(n) for n in range(10)]

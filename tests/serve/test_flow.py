"""The hosted-service flow on a real service: create a model with categories, upload real photos
(bad ones rejected with reasons), train in the background, watch the job, get version 1, predict."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from tests.badfiles import make_bad_folder

CLASSES = ("hat", "pants", "shoes")


def _upload(client, model_id: str, category_id: str, paths) -> dict:
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    response = client.post(f"/v1/models/{model_id}/categories/{category_id}/images", files=files)
    assert response.status_code == 200, response.text
    return response.json()


def _wait_for(client, job_id: str, timeout: float = 400) -> list[dict]:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{job_id}").json()
        seen.append(status)
        if status["state"] in ("succeeded", "failed", "cancelled"):
            return seen
        time.sleep(0.5)
    raise AssertionError(f"the job did not end in {timeout} s: {seen[-1]}")


def _watch_events(client, job_id: str, timeout: float = 400) -> list[dict]:
    """The job's statuses from its server-sent event stream, which ends by itself with the job."""
    seen, deadline = [], time.monotonic() + timeout
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=60) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in stream.iter_lines():
            assert time.monotonic() < deadline, seen[-1:]
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                assert event == "status"
                seen.append(json.loads(line[6:]))
    return seen


@pytest.mark.slow
def test_create_upload_train_watch_predict(service, clothing, tmp_path, photo_server):
    client = service.client()
    created = client.post("/v1/models", json={"name": "shop", "categories": list(CLASSES)})
    assert created.status_code == 201, created.text
    model = created.json()
    assert model["state"] == "created" and not model["can_train"] and "needs 10 photos" in model["why_not"]
    ids = {c["name"]: c["id"] for c in model["categories"]}
    for label in CLASSES:
        photos = sorted((clothing / "train" / label).glob("*.jpg"))[:15]
        answer = _upload(client, model["id"], ids[label], photos)
        assert answer["accepted"] == 15 and answer["rejected"] == 0
    bad = make_bad_folder(tmp_path / "bad", sorted((clothing / "train" / "hat").glob("*.jpg"))[20:23])
    answer = _upload(client, model["id"], ids["hat"], [tmp_path / "bad" / name for name in bad])
    reasons = {f["name"]: f.get("code") for f in answer["files"] if not f["accepted"]}
    assert {
        "empty.jpg": "empty_file",
        "truncated.jpg": "truncated",
        "notes.jpg": "not_an_image",
        "bomb.png": "too_many_pixels",
    }.items() <= reasons.items()
    again = _upload(client, model["id"], ids["pants"], sorted((clothing / "train" / "hat").glob("*.jpg"))[:1])
    assert again["files"][0]["code"] == "in_another_category"

    model = client.get(f"/v1/models/{model['id']}").json()
    assert model["state"] == "ready_to_train" and model["can_train"]
    started = client.post(
        f"/v1/models/{model['id']}/train",
        json={"settings": {"mode": "head", "image_size": 64}},
        headers={"Idempotency-Key": "first"},
    )
    assert started.status_code == 202, started.text
    job = started.json()
    repeated = client.post(f"/v1/models/{model['id']}/train", json={}, headers={"Idempotency-Key": "first"})
    assert repeated.json()["id"] == job["id"]  # the same request starts one job
    assert client.post(f"/v1/models/{model['id']}/train", json={}).status_code == 409
    seen = _watch_events(client, job["id"])
    assert seen[-1]["state"] == "succeeded", seen[-1]
    assert len(seen) >= 3 and all(a != b for a, b in zip(seen, seen[1:])), "one event per change"
    assert {"queued", "running"} & {s["state"] for s in seen}
    assert any(s["stage"] for s in seen) and seen[-1]["version"] == 1 and seen[-1]["plan"] == "head"

    versions = client.get(f"/v1/models/{model['id']}/versions").json()["versions"]
    assert [(v["number"], v["state"], v["active"]) for v in versions] == [(1, "ready", True)]
    assert versions[0]["metrics"]["top1"] > 0.5
    assert "<html" in client.get(f"/v1/models/{model['id']}/versions/1/report").text[:200]
    assert len(client.get(f"/v1/models/{model['id']}/versions/1/onnx").content) > 100_000

    right = 0
    for label in CLASSES:
        photo = sorted((clothing / "test" / label).glob("*.jpg"))[0]
        response = client.post(
            f"/v1/models/{model['id']}/predict?k=2", content=photo.read_bytes(), headers={"Content-Type": "image/jpeg"}
        )
        assert response.status_code == 200, response.text
        result = response.json()["results"][0]
        assert len(result["top"]) == 2 and result["ms"] > 0
        right += result["label"] == label
    assert right >= 2, "a model trained on 15 photos per class should get held-out hats, pants and shoes right"
    photos = [sorted((clothing / "test" / label).glob("*.jpg"))[1] for label in ("hat", "shoes")]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in photos] + [("files", ("x.jpg", b"no", "x"))]
    several = client.post(f"/v1/models/{model['id']}/predict?min_confidence=auto", files=files).json()["results"]
    assert [r["name"] for r in several] == [p.name for p in photos] + ["x.jpg"]
    assert (
        all(r["label"] in (*CLASSES, "unknown") for r in several[:2]) and several[2]["error"]["code"] == "invalid_image"
    )
    urls = [
        photo_server.url("/shoes/3.jpg"),
        "http://169.254.169.254/latest/meta-data/",
        photo_server.url("/hat/3.jpg"),
    ]
    by_url = client.post(f"/v1/models/{model['id']}/predict", json={"urls": urls}).json()["results"]
    assert [r["name"] for r in by_url] == urls  # in the order asked
    assert by_url[0]["label"] in CLASSES and by_url[2]["label"] in CLASSES
    assert by_url[1]["error"]["code"] == "blocked_address"


def test_keys_scopes_and_no_plaintext(service):
    anonymous = service.client("not-a-key")
    assert anonymous.get("/v1/models").status_code == 401
    assert anonymous.get("/v1/models").json()["error"]["code"] == "unauthorized"
    from imgclf.serve import create_key

    reader = service.client(create_key(service.home, "predict"))
    assert reader.get("/v1/models").status_code == 200
    forbidden = reader.post("/v1/models", json={"name": "x", "categories": ["a", "b"]})
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
    from imgclf.serve.store import Home, Store

    revoked_key = create_key(service.home, "train")
    assert service.client(revoked_key).get("/v1/models").status_code == 200
    Store(Home(service.home)).execute("UPDATE keys SET revoked = 1 WHERE scope = 'train'")
    assert service.client(revoked_key).get("/v1/models").status_code == 401  # revoked: refused at once
    database = (service.home / "imgclf.db").read_bytes()
    assert service.admin.encode() not in database and service.admin[7:].encode() not in database
    rows = sqlite3.connect(service.home / "imgclf.db").execute("SELECT digest FROM keys").fetchall()
    assert rows and all(len(r[0]) == 64 for r in rows)


def test_a_body_over_the_limit_is_refused_at_once(service):
    client = service.client()
    model = client.post("/v1/models", json={"name": "limits", "categories": ["a", "b"]}).json()
    target = f"/v1/models/{model['id']}/categories/{model['categories'][0]['id']}/images"
    big = b"x" * (65 * 2**20)
    declared = client.post(target, content=big, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"

    def chunks():  # a well-formed multipart upload whose file never ends, sent without a Content-Length
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.jpg"\r\n\r\n'
        for _ in range(65):
            yield b"y" * 2**20

    chunked = client.post(target, content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "body_too_large"


@pytest.mark.slow
def test_a_new_version_takes_over_while_predictions_go_on_and_a_damaged_one_is_refused(service, clothing):
    import shutil
    import sqlite3
    import threading

    client = service.client()
    model = next(m for m in client.get("/v1/models").json()["models"] if m["name"] == "shop")
    job = client.post(f"/v1/models/{model['id']}/train", json={"settings": {"mode": "head", "image_size": 64}})
    assert _wait_for(client, job.json()["id"])[-1]["state"] == "succeeded"
    assert client.get(f"/v1/models/{model['id']}").json()["active_version"] == 2
    photo = sorted((clothing / "test" / "hat").glob("*.jpg"))[2].read_bytes()
    answers, done = [], threading.Event()

    def keep_predicting():
        with service.client() as own:
            while not done.is_set():
                response = own.post(
                    f"/v1/models/{model['id']}/predict", content=photo, headers={"Content-Type": "image/jpeg"}
                )
                answers.append((response.status_code, response.json().get("version")))

    loop = threading.Thread(target=keep_predicting)
    loop.start()
    time.sleep(1.0)
    assert client.post(f"/v1/models/{model['id']}/versions/1/activate").status_code == 200
    time.sleep(1.0)
    done.set()
    loop.join(timeout=30)
    assert answers and {status for status, _ in answers} == {200}
    versions = [v for _, v in answers]
    assert versions[0] == 2 and versions[-1] == 1 and versions == sorted(versions, reverse=True)

    damaged = service.home / "models" / model["id"] / "v3"  # a version whose export is damaged
    shutil.copytree(service.home / "models" / model["id"] / "v2", damaged)
    (damaged / "onnx" / "model.onnx").write_bytes(b"not an onnx model")
    with sqlite3.connect(service.home / "imgclf.db") as db:
        db.execute("INSERT INTO versions VALUES (?, 3, 'manual', 'ready', 0, NULL)", (model["id"],))
    refused = client.post(f"/v1/models/{model['id']}/versions/3/activate")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "version_unusable"
    still = client.post(f"/v1/models/{model['id']}/predict", content=photo, headers={"Content-Type": "image/jpeg"})
    assert still.status_code == 200 and still.json()["version"] == 1


@pytest.mark.slow
def test_sigterm_under_prediction_load_finishes_what_is_in_flight_and_turns_new_requests_away(service, clothing):
    """Last in this module: it stops the service."""
    import signal
    import threading

    client = service.client()
    model = next(m for m in client.get("/v1/models").json()["models"] if m["name"] == "shop")
    photo = sorted((clothing / "test" / "shoes").glob("*.jpg"))[4].read_bytes()
    answers, stop = [], threading.Event()

    def keep_predicting():
        with service.client() as own:
            while not stop.is_set():
                try:
                    response = own.post(f"/v1/models/{model['id']}/predict", content=photo,
                                        headers={"Content-Type": "image/jpeg"})  # fmt: skip
                except httpx.TransportError as exc:  # after the drain the socket closes: no answer at all
                    answers.append(("closed", type(exc).__name__))
                    return
                answers.append((response.status_code, response.json()["error"]["code"] if response.is_error else ""))

    threads = [threading.Thread(target=keep_predicting) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    served_before = len(answers)
    service.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while service.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert service.process.returncode is not None, "the service did not stop within 60 s of SIGTERM"
    kinds = {status for status, _ in answers}
    assert served_before > 0 and kinds <= {200, 503, "closed"}, answers[-20:]  # no 500, no broken answer
    assert (503, "shutting_down") in answers  # new requests were turned away while the others finished
    first_503 = answers.index((503, "shutting_down"))
    assert all(status == 200 for status, _ in answers[:first_503])


httpx = pytest.importorskip("httpx")

"""Nothing is lost: a worker killed with SIGKILL mid-training is replaced, its job is claimed again
(attempt 2) and resumes from the checkpoint; a restart of the whole service finds everything."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.serve.conftest import start_service, stop_service
from tests.serve.test_flow import CLASSES, _upload, _wait_for


def _model_with_photos(client, clothing) -> dict:
    model = client.post("/v1/models", json={"name": "durable", "categories": list(CLASSES)}).json()
    for category in model["categories"]:
        photos = sorted((clothing / "train" / category["name"]).glob("*.jpg"))[30:45]
        assert _upload(client, model["id"], category["id"], photos)["accepted"] == 15
    return model


@pytest.mark.slow
def test_a_killed_worker_hands_its_job_on_and_it_resumes(service, clothing):
    client = service.client()
    model = _model_with_photos(client, clothing)
    settings = {"model": "cnn1", "image_size": 32, "epochs": 40, "patience": 0, "batch_size": 8}
    job = client.post(f"/v1/models/{model['id']}/train", json={"settings": settings}).json()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{job['id']}").json()
        if (status["epoch"] or 0) >= 3:
            break
        time.sleep(0.2)
    assert (status["epoch"] or 0) >= 3, status
    import sqlite3

    worker = (
        sqlite3.connect(service.home / "imgclf.db")
        .execute("SELECT worker FROM jobs WHERE id = ?", (job["id"],))
        .fetchone()[0]
    )
    os.kill(int(worker.rsplit("-", 1)[1]), signal.SIGKILL)
    seen = _wait_for(client, job["id"], timeout=300)
    assert seen[-1]["state"] == "succeeded" and seen[-1]["attempt"] == 2, seen[-1]
    log = (service.home / "jobs" / job["id"] / "events.jsonl").read_text().splitlines()
    assert any("resuming at epoch" in json.loads(line).get("text", "") for line in log)
    run = json.loads((service.home / "models" / model["id"] / "v1" / "run.json").read_text())
    assert run["status"] == "finished" and run["epochs_done"] == 40


@pytest.mark.slow
def test_a_restarted_service_has_everything(service, clothing):
    client = service.client()
    before = client.get("/v1/models").json()["models"]
    trained = [m for m in before if m["active_version"]]
    assert trained, "runs after a test of this module that trains a model"
    stop_service(service.process)
    service.process, service.url = start_service(service.home, {**os.environ})
    client = service.client()
    deadline = time.monotonic() + 60
    while (ready := client.get("/readyz")).status_code != 200:  # 503 warming / no_worker at first
        assert ready.json()["error"]["code"] in ("warming", "no_worker") and time.monotonic() < deadline, ready.text
        time.sleep(0.2)
    assert ready.json()["models_warm"] == len(trained) and ready.json()["workers"] == 1
    after = client.get("/v1/models").json()["models"]
    assert [(m["id"], m["name"], m["active_version"], m["categories"]) for m in after] == [
        (m["id"], m["name"], m["active_version"], m["categories"]) for m in before
    ]
    model = trained[0]
    assert client.get(f"/v1/models/{model['id']}/versions").json()["versions"][0]["state"] == "ready"
    photo = sorted((clothing / "test" / "shoes").glob("*.jpg"))[1]
    response = client.post(
        f"/v1/models/{model['id']}/predict", content=photo.read_bytes(), headers={"Content-Type": "image/jpeg"}
    )
    assert response.status_code == 200 and response.json()["results"][0]["label"] in CLASSES

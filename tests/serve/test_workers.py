"""Beyond one machine: an API process with no worker of its own (``imgclf serve --db URL
--no-worker``) and two ``imgclf worker --db URL`` processes on one PostgreSQL database and one
shared home folder. Four queued jobs each run exactly once, on both workers; killing the worker
that holds a job hands it to the other, which resumes it from the checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.serve.conftest import Service, start_service, stop_service
from tests.serve.test_flow import _upload, _wait_for

CLASSES = ("hat", "shoes")
LEASE_S = 4  # short, so that the test sees a take-over soon; the default is 30 s


def _worker(home, url, env, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "imgclf.cli", "worker", "--home", str(home), "--db", url]
    return subprocess.Popen([*command, "--lease", str(LEASE_S)], stdout=log, stderr=log, env=env)


def _model(client, clothing, n: int) -> dict:
    model = client.post("/v1/models", json={"name": f"shop {n}", "categories": list(CLASSES)}).json()
    for category in model["categories"]:
        photos = sorted((clothing / "train" / category["name"]).glob("*.jpg"))[12 * n : 12 * n + 12]
        assert _upload(client, model["id"], category["id"], photos)["accepted"] == 12
    return model


def _rows(url: str, sql: str) -> list[dict]:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, row_factory=dict_row) as db:
        return db.execute(sql).fetchall()


@pytest.fixture
def cluster(tmp_path, postgres_url, clothing):
    """The API (no worker) on PostgreSQL, with four models ready to train; workers are started by the test."""
    from imgclf.serve import create_key

    home = tmp_path / "shared-home"
    admin = create_key(home, "admin", "tests", postgres_url)
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(tmp_path / "cache")}
    process, url = start_service(home, env, ("--db", postgres_url, "--no-worker"))
    service = Service(url, home, admin, process)
    workers: list[subprocess.Popen] = []
    log = open(tmp_path / "workers.log", "ab")
    yield service, postgres_url, lambda: workers.append(_worker(home, postgres_url, env, log)) or workers[-1]
    for worker in workers:
        worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
    stop_service(process)


@pytest.mark.slow
def test_two_workers_share_the_queue_and_take_over_a_dead_ones_job(cluster, clothing):
    service, url, start_worker = cluster
    client = service.client()
    models = [_model(client, clothing, n) for n in range(4)]
    settings = {"model": "cnn1", "image_size": 32, "epochs": 3, "patience": 0, "batch_size": 8}
    jobs = [client.post(f"/v1/models/{m['id']}/train", json={"settings": settings}).json() for m in models]
    assert {job["state"] for job in jobs} == {"queued"}, "no worker yet: the API only queues"
    assert client.get("/readyz").json()["workers"] == 0, "an API machine is ready without a worker of its own"
    workers = [start_worker(), start_worker()]
    deadline = time.monotonic() + 60
    while (ready := client.get("/readyz").json())["workers"] < 2:
        assert time.monotonic() < deadline, ready
        time.sleep(0.5)

    for job in jobs:
        assert _wait_for(client, job["id"], timeout=400)[-1]["state"] == "succeeded"
    rows = _rows(url, "SELECT id, attempt, worker FROM jobs")
    assert sorted(row["id"] for row in rows) == sorted(job["id"] for job in jobs)
    assert {row["attempt"] for row in rows} == {1}, "each job ran exactly once"
    pids = {int(row["worker"].rsplit("-", 1)[1]) for row in rows}
    assert pids == {w.pid for w in workers}, "both workers took jobs"
    for model in models:  # each version in the shared home, exported
        assert (service.home / "models" / model["id"] / "v1" / "onnx").is_dir()
    photo = sorted((clothing / "test" / "shoes").glob("*.jpg"))[0]
    answer = client.post(
        f"/v1/models/{models[0]['id']}/predict", content=photo.read_bytes(), headers={"Content-Type": "image/jpeg"}
    )
    assert answer.status_code == 200 and answer.json()["results"][0]["label"] in CLASSES

    # a longer training of one model; kill -9 the worker that holds it
    longer = {**settings, "epochs": 30}
    job = client.post(f"/v1/models/{models[0]['id']}/train", json={"settings": longer}).json()
    deadline = time.monotonic() + 180
    while ((status := client.get(f"/v1/jobs/{job['id']}").json())["epoch"] or 0) < 2:
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    holder = int(_rows(url, f"SELECT worker FROM jobs WHERE id = '{job['id']}'")[0]["worker"].rsplit("-", 1)[1])
    os.kill(holder, signal.SIGKILL)
    (survivor,) = [w for w in workers if w.pid != holder]
    seen = _wait_for(client, job["id"], timeout=400)
    final = _rows(url, f"SELECT attempt, worker FROM jobs WHERE id = '{job['id']}'")[0]
    assert seen[-1]["state"] == "succeeded" and final["attempt"] == 2, seen[-1]
    assert final["worker"].endswith(f"-{survivor.pid}"), "the other worker finished it"
    events = (service.home / "jobs" / job["id"] / "events.jsonl").read_text().splitlines()
    assert any("resuming at epoch" in json.loads(line).get("text", "") for line in events)
    run = json.loads((service.home / "models" / models[0]["id"] / "v2" / "run.json").read_text())
    assert run["status"] == "finished" and run["epochs_done"] == 30
    versions = client.get(f"/v1/models/{models[0]['id']}/versions").json()["versions"]
    assert [v["number"] for v in versions] == [1, 2] and client.get(f"/v1/models/{models[0]['id']}").json()[
        "active_version"
    ] == 2


def test_readyz_says_when_the_worker_it_runs_is_not_heard_from(tmp_path, postgres_url):
    from fastapi.testclient import TestClient

    from imgclf.serve.app import create_app
    from imgclf.serve.store import Home, Store

    app = create_app(tmp_path / "home", database=postgres_url)
    app.state.expects_worker = True
    with TestClient(app) as client:
        silent = client.get("/readyz")
        Store(Home(tmp_path / "home"), postgres_url).beat("host-1", "job_x")
        heard = client.get("/readyz")
    assert silent.status_code == 503 and silent.json()["error"]["code"] == "no_worker"
    assert heard.status_code == 200 and (heard.json()["workers"], heard.json()["training"]) == (1, 1)


def test_train_threads_reach_the_training_command(tmp_path, monkeypatch):
    """imgclf serve --train-threads N: the worker it runs trains with --threads N (cores left to
    the predictions); without it, PyTorch's own choice."""
    from imgclf.serve import worker
    from imgclf.serve.store import Home, Store

    store = Store(Home(tmp_path / "home"))
    job, _ = store.add_job("m1", {"epochs": 1}, None)
    store.home.job_dir(job["id"]).mkdir(parents=True)
    monkeypatch.setenv(worker.TRAIN_THREADS_ENV, "1")
    command = worker._command(store, job, tmp_path / "run")
    assert command[command.index("--threads") + 1] == "1"
    monkeypatch.delenv(worker.TRAIN_THREADS_ENV)
    assert "--threads" not in worker._command(store, job, tmp_path / "run")

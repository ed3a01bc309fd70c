"""Training jobs (queued for the worker, watched through their event stream) and the versions
they make."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
from fastapi import APIRouter, Body, Header, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from imgclf.core.rundir import RunDir
from imgclf.core.settings import SECTIONS, SYSTEM, as_settings, flat_overrides, section_fields
from imgclf.serve.catalog import describe, model_row
from imgclf.serve.http import LogLines, ServiceError, VersionNumber, file_response, require, require_disk
from imgclf.serve.inference import predictor_for
from imgclf.serve.store import Store

router = APIRouter(tags=["training"])
TRAINABLE = {spec.name for section in SECTIONS if section != SYSTEM for spec in section_fields(section)}
EVENTS_TAIL_BYTES = 256 * 1024
SSE_POLL_S = 0.5  # how often a stream looks for a change
SSE_MAX_S = 600.0  # a stream ends after this; clients reconnect


def _settings(requested: dict | None) -> dict:
    """The training settings a client may choose (never the system section: the operator's)."""
    flat = flat_overrides(requested or {})
    refused = sorted(set(flat) - TRAINABLE)
    if refused:
        raise ServiceError(
            422, "invalid_setting", f"settings not accepted here: {', '.join(refused)}", {"accepted": sorted(TRAINABLE)}
        )
    as_settings(flat)  # checks every value, naming the setting
    return flat


@router.post("/models/{model_id}/train", status_code=202, dependencies=[require("train")])
def train(
    request: Request,
    model_id: str,
    settings: dict | None = Body(default=None, embed=True),
    idempotency_key: str | None = Header(default=None),
) -> dict:
    """Queue a training of the model's photos; 409 while one runs, 422 when there are too few."""
    store: Store = request.app.state.store
    model = describe(store, model_row(store, model_id), request.app.state.limits)
    if idempotency_key:
        existing = store.one("SELECT * FROM jobs WHERE model_id = ? AND idempotency_key = ?", model_id, idempotency_key)
        if existing:
            return job_status(store, existing)
    if model["last_job"] and model["last_job"]["state"] in ("queued", "running"):
        raise ServiceError(
            409,
            "training_running",
            "a training of this model is queued or running",
            {"job_id": model["last_job"]["id"]},
        )
    limits = request.app.state.limits
    queued = store.one("SELECT COUNT(*) AS n FROM jobs WHERE state = 'queued'")["n"]
    if queued >= limits.queued_jobs:
        raise ServiceError(
            429, "too_many_jobs", f"{queued} trainings are already queued; try again when one has run",
            headers={"Retry-After": "60"},
        )  # fmt: skip
    require_disk(store, limits)
    if not model["can_train"]:
        raise ServiceError(
            422,
            "not_enough_photos",
            model["why_not"],
            {"categories": {c["name"]: c["images"] for c in model["categories"]}},
        )
    job, _ = store.add_job(model_id, _settings(settings), idempotency_key)
    return job_status(store, job)


def _events(store: Store, job_id: str) -> list[dict]:
    path = store.home.job_dir(job_id) / "events.jsonl"
    if not path.exists():
        return []
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - EVENTS_TAIL_BYTES))
        lines = handle.read().decode("utf-8", errors="replace").splitlines()
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a line cut by the tail, or one being written
    return events


def job_status(store: Store, job: dict) -> dict:
    """The job as a client watches it: state, stage and fraction, ETA, epoch and validation
    top-1, images/s, attempt, and the error; read from the job's own event stream."""
    events = _events(store, job["id"])
    progress = next((e for e in reversed(events) if e["event"] == "progress"), None)
    epoch = next((e for e in reversed(events) if e["event"] == "epoch_end"), None)
    plan = next((e for e in events if e["event"] == "plan"), None)
    message = next((e for e in reversed(events) if e["event"] == "message"), None)
    status = {
        "id": job["id"],
        "model_id": job["model_id"],
        "state": job["state"],
        "attempt": job["attempt"],
        "version": job["version"],
        "created": job["created"],
        "started": job["started"],
        "finished": job["finished"],
        "stage": progress["stage"] if progress else None,
        "fraction": round(progress["done"] / max(progress["total"], 1), 4) if progress else 0.0,
        "eta_s": (epoch or {}).get("eta_s") if epoch else (progress or {}).get("eta_s"),
        "epoch": epoch["row"]["epoch"] if epoch else None,
        "epochs": epoch["epochs"] if epoch else None,
        "best_val_top1": max((e["row"]["val_top1"] or 0 for e in events if e["event"] == "epoch_end"), default=None),
        "images_per_s": epoch["row"]["images_per_s"] if epoch else None,
        "plan": plan["plan"] if plan else None,
        "predicted_s": plan["predicted_s"] if plan else None,
        "message": message["text"] if message else None,
        "error": None,
    }
    if job["error_code"]:
        status["error"] = {"code": job["error_code"], "message": job["error_message"]}
    return status


def _job(store: Store, job_id: str) -> dict:
    job = store.one("SELECT * FROM jobs WHERE id = ?", job_id)
    if job is None:
        raise ServiceError(404, "job_not_found", f"no job {job_id}")
    return job


@router.get("/jobs/{job_id}", dependencies=[require("predict")])
def get_job(request: Request, job_id: str) -> dict:
    store = request.app.state.store
    return job_status(store, _job(store, job_id))


@router.get(
    "/jobs/{job_id}/events",
    dependencies=[require("predict")],
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "the job's status as server-sent events"}},
)
async def job_events(request: Request, job_id: str) -> StreamingResponse:
    """Server-sent events: an ``event: status`` with the job's status (as ``GET /v1/jobs/{id}``)
    each time it changes, a comment every 15 s to keep proxies from closing the stream, and the
    end of the stream when the job ends, after 10 minutes (reconnect), or when the service shuts
    down. Read with any SSE client, or ``fetch`` and a reader where a header carries the key."""
    store: Store = request.app.state.store
    await anyio.to_thread.run_sync(_job, store, job_id)  # 404 before the stream starts

    async def stream():
        last, quiet, deadline = None, time.monotonic(), time.monotonic() + SSE_MAX_S
        while time.monotonic() < deadline and not request.app.state.draining:
            status = await anyio.to_thread.run_sync(lambda: job_status(store, _job(store, job_id)))
            text = json.dumps(status, allow_nan=False, separators=(",", ":"))
            if text != last:
                yield f"event: status\ndata: {text}\n\n"
                last, quiet = text, time.monotonic()
            elif time.monotonic() - quiet > 15:
                yield ": still here\n\n"
                quiet = time.monotonic()
            if status["state"] in ("succeeded", "failed", "cancelled") or await request.is_disconnected():
                return
            await anyio.sleep(SSE_POLL_S)

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}  # nginx: pass events on at once
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


@router.post("/jobs/{job_id}/cancel", dependencies=[require("train")])
def cancel_job(request: Request, job_id: str) -> dict:
    """A queued job ends at once; a running one after its current step (with a checkpoint)."""
    store: Store = request.app.state.store
    job = _job(store, job_id)
    queued = store.execute(  # only while still queued: a worker may claim it at this moment
        "UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ? AND state = 'queued'", time.time(), job_id
    )
    if not queued and job["state"] in ("queued", "running"):
        store.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", job_id)
    return job_status(store, _job(store, job_id))


@router.get("/jobs/{job_id}/log", dependencies=[require("train")])
def job_log(request: Request, job_id: str, lines: LogLines = 50) -> dict:
    store: Store = request.app.state.store
    _job(store, job_id)
    said = [e["text"] for e in _events(store, job_id) if e["event"] == "message"]
    return {"lines": said[-max(1, min(lines, 1000)) :]}


def _version(store: Store, model_id: str, number: VersionNumber) -> dict:
    row = store.one("SELECT * FROM versions WHERE model_id = ? AND number = ?", model_id, number)
    if row is None:
        raise ServiceError(404, "version_not_found", f"model {model_id} has no version {number}")
    return row


def version_view(row: dict, active: int | None) -> dict:
    return {
        "number": row["number"],
        "state": row["state"],
        "created": row["created"],
        "job_id": row["job_id"],
        "active": row["number"] == active,
        "metrics": json.loads(row["metrics"]) if row["metrics"] else None,
    }


@router.get("/models/{model_id}/versions", dependencies=[require("predict")])
def list_versions(request: Request, model_id: str) -> dict:
    store: Store = request.app.state.store
    model = model_row(store, model_id)
    rows = store.query("SELECT * FROM versions WHERE model_id = ? ORDER BY number", model_id)
    return {"versions": [version_view(r, model["active_version"]) for r in rows]}


@router.post("/models/{model_id}/versions/{number}/activate", dependencies=[require("train")])
def activate(request: Request, model_id: str, number: VersionNumber) -> dict:
    """Serve an earlier (or later) version; only one whose export loads and answers."""
    store: Store = request.app.state.store
    model_row(store, model_id)
    row = _version(store, model_id, number)
    if row["state"] != "ready":
        raise ServiceError(409, "version_not_ready", f"version {number} is {row['state']}")
    predictor_for(request.app, model_id, number)  # refuses a damaged export before it serves
    store.execute("UPDATE models SET active_version = ? WHERE id = ?", number, model_id)
    return version_view(row, number)


def _version_file(request: Request, model_id: str, number: int, name: str) -> Path:
    store: Store = request.app.state.store
    _version(store, model_id, number)
    path = store.home.version_dir(model_id, number) / name
    if not path.exists():
        raise ServiceError(404, "file_not_found", f"version {number} has no {Path(name).name}")
    return path


@router.get(
    "/models/{model_id}/versions/{number}/report",
    dependencies=[require("predict")],
    response_class=FileResponse,
    responses=file_response("text/html"),
)
def report(request: Request, model_id: str, number: VersionNumber) -> Response:
    return FileResponse(_version_file(request, model_id, number, RunDir.REPORT_HTML), media_type="text/html")


@router.get("/models/{model_id}/versions/{number}/metrics", dependencies=[require("predict")])
def metrics(request: Request, model_id: str, number: VersionNumber) -> dict:
    return json.loads(_version_file(request, model_id, number, RunDir.METRICS).read_text())


@router.get(
    "/models/{model_id}/versions/{number}/onnx",
    dependencies=[require("predict")],
    response_class=FileResponse,
    responses=file_response("application/octet-stream"),
)
def onnx_file(request: Request, model_id: str, number: VersionNumber) -> Response:
    path = _version_file(request, model_id, number, f"{RunDir.ONNX}/model.onnx")
    return FileResponse(path, media_type="application/octet-stream", filename=f"{model_id}-v{number}.onnx")

"""Prediction on a model's active (or a chosen) version, on its ONNX export, loaded once and
kept warm."""

from __future__ import annotations

import threading
import time

import anyio
import numpy as np
from fastapi import APIRouter, FastAPI, Request
from PIL import Image
from starlette.datastructures import UploadFile  # what request.form() gives (FastAPI's is a subclass)

from imgclf.core.errors import ImageError, ImgclfError
from imgclf.core.rundir import RunDir
from imgclf.data.images import decode_image_bytes
from imgclf.predictors import UNKNOWN, load
from imgclf.serve.catalog import model_row
from imgclf.serve.http import OptionalVersion, ServiceError, TopK, require
from imgclf.serve.store import Store
from imgclf.serve.urls import fetch_bodies

router = APIRouter(tags=["predict"])
_loading = threading.Lock()
_one_at_a_time = threading.Lock()


def predictor_for(app: FastAPI, model_id: str, number: int):
    """The version's predictor, loaded on first use (its export checked by loading it)."""
    key = (model_id, number)
    cached = app.state.predictors.get(key)
    if cached is not None:
        return cached
    with _loading:
        if key not in app.state.predictors:
            folder = app.state.store.home.version_dir(model_id, number) / RunDir.ONNX
            try:
                app.state.predictors[key] = load(folder, "auto", batch_size=8)
            except (ImgclfError, OSError, RuntimeError) as exc:
                raise ServiceError(409, "version_unusable", f"version {number} cannot serve: {exc}") from None
    return app.state.predictors[key]


def warm_up(app: FastAPI) -> None:
    """Load every model's active version and answer one prediction with it, in the background, so
    that the first predictions after a start are as fast as the rest; ``/readyz`` answers 503
    ``warming`` until done. A version that cannot load is left to answer its own 409 when asked."""
    active = app.state.store.query("SELECT id, active_version FROM models WHERE active_version IS NOT NULL")
    app.state.warm = not active

    def load_all() -> None:
        for row in active:
            try:
                clf = predictor_for(app, row["id"], int(row["active_version"]))
                clf.predict_proba([Image.new("RGB", (64, 64), (128, 128, 128))])  # the first run's set-up, done now
            except (ServiceError, ImgclfError, RuntimeError):
                pass
        app.state.warm = True

    if active:
        threading.Thread(target=load_all, name="warm-up", daemon=True).start()


def _answer(clf, image, k: int, threshold: float | None, name: str) -> dict:
    started = time.perf_counter()
    proba = clf.predict_proba([image])[0]
    order = np.argsort(-proba)[: max(1, min(k, len(proba)))]
    top = [{"label": str(clf.classes_[i]), "probability": round(float(proba[i]), 6)} for i in order]
    label = top[0]["label"] if threshold is None or top[0]["probability"] >= threshold else UNKNOWN
    return {
        "name": name,
        "label": label,
        "probability": top[0]["probability"],
        "top": top,
        "ms": round(1000 * (time.perf_counter() - started), 2),
    }


@router.post("/models/{model_id}/predict", dependencies=[require("predict")])
async def predict(
    request: Request, model_id: str, k: TopK = 5, min_confidence: str = "", version: OptionalVersion = None
):
    """Labels for a raw image body (``Content-Type: image/...``), multipart ``files``, or JSON
    ``{"urls": [...]}`` where the operator allows URLs. 503 with Retry-After when ``predict_queue``
    predictions are already being answered or waiting: a fast no beats a slow timeout."""
    state = request.app.state
    if state.predicting >= state.limits.predict_queue:
        raise ServiceError(
            503, "busy", f"{state.predicting} predictions are already waiting; try again in a second",
            headers={"Retry-After": "1"},
        )  # fmt: skip
    state.predicting += 1  # one event loop: no lock needed
    try:
        return await _predict(request, model_id, k, min_confidence, version)
    finally:
        state.predicting -= 1


async def _predict(request: Request, model_id: str, k: int, min_confidence: str, version: int | None) -> dict:
    """Labels for a raw image body (``Content-Type: image/...``), multipart ``files``, or JSON
    ``{"urls": [...]}`` where the operator allows URLs."""
    store: Store = request.app.state.store
    model = model_row(store, model_id)
    number = version or model["active_version"]
    if not number:
        raise ServiceError(409, "not_trained", "this model has no trained version yet: train it first")
    clf = predictor_for(request.app, model_id, number)
    failed: dict[int, dict] = {}
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/"):
        form = await request.form(max_files=request.app.state.limits.files_per_request)
        inputs = [(f.filename or "upload", await f.read()) for f in form.getlist("files") if isinstance(f, UploadFile)]
    elif content_type.startswith("application/json"):
        inputs, failed = await _inputs_from_urls(request)
    else:
        inputs = [("body", await request.body())]
    if not inputs:
        raise ServiceError(422, "no_image", "send an image as the body, or multipart files")
    try:
        threshold = clf.confidence_threshold(min_confidence or None)
    except ImgclfError as exc:
        raise ServiceError(422, exc.code, str(exc)) from None
    limits = request.app.state.limits
    try:  # past the limit the answer is 504 and the queue slot is freed; the thread ends on its own
        with anyio.fail_after(limits.predict_timeout):
            results = await anyio.to_thread.run_sync(
                _predict_all, clf, inputs, k, threshold, limits, abandon_on_cancel=True
            )
    except TimeoutError:
        raise ServiceError(
            504, "prediction_timeout",
            f"the predictions took over {limits.predict_timeout:g} s; send fewer or smaller images, or try again",
        ) from None  # fmt: skip
    for position in sorted(failed):  # URLs that gave no photo keep their place in the answer
        results.insert(position, failed[position])
    return {"model_id": model_id, "version": number, "results": results}


async def _inputs_from_urls(request: Request) -> tuple[list[tuple[str, bytes]], dict[int, dict]]:
    try:
        urls = (await request.json()).get("urls")
    except (ValueError, AttributeError):
        raise ServiceError(422, "invalid_urls", 'send JSON like {"urls": ["https://..."]}') from None
    inputs, failed = [], {}
    for position, (url, body, error) in enumerate(await fetch_bodies(urls, request.app.state.limits, "predicting")):
        if body is None:
            failed[position] = {"name": url, "error": {"code": error["code"], "message": error["reason"]}}
        else:
            inputs.append((url, body))
    return inputs, failed


def _predict_all(clf, inputs: list[tuple[str, bytes]], k: int, threshold: float | None, limits) -> list[dict]:
    """Decode and predict each input (off the event loop: this is the CPU's work). ONNX Runtime
    sessions take concurrent calls; an OpenVINO infer request does not, so those take turns."""
    if getattr(clf, "backend", "") == "openvino":
        with _one_at_a_time:
            return _predict_each(clf, inputs, k, threshold, limits)
    return _predict_each(clf, inputs, k, threshold, limits)


def _predict_each(clf, inputs: list[tuple[str, bytes]], k: int, threshold: float | None, limits) -> list[dict]:
    results = []
    for name, data in inputs:
        try:
            if len(data) > limits.image_bytes:
                raise ImageError(name, f"over {limits.image_bytes} bytes")
            image = decode_image_bytes(
                data, name, draft_size=clf.preprocessing.resize_size, max_pixels=limits.image_pixels
            )
            results.append(_answer(clf, image, k, threshold, name))
        except ImageError as exc:
            results.append({"name": name, "error": {"code": "invalid_image", "message": exc.reason}})
    return results

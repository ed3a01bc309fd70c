"""Nanonets v2 image categorization, on imgclf: the same routes, form fields, HTTP Basic auth with
the key as user name, integer model states and JSON shapes, so that a client script written for
``app.nanonets.com/api/v2/ImageCategorization/`` works by changing its base URL. Each route
calls the same functions as ``/v1``."""

from __future__ import annotations

import base64
import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile  # what request.form() gives (FastAPI's is a subclass)

from imgclf.serve.catalog import accept_image, check_name, describe, model_row
from imgclf.serve.http import SCOPES, ServiceError, require_disk
from imgclf.serve.inference import _predict_all, predictor_for
from imgclf.serve.store import Store, new_id
from imgclf.serve.training import train as start
from imgclf.serve.urls import accept_urls, fetch_bodies

router = APIRouter(prefix="/api/v2/ImageCategorization", tags=["nanonets"])
# Nanonets' model states: -1 error, 0 created, 1 images uploaded, 2 ready to train, 3 queued,
# 4 training, 5 trained
STATES = {"failed": -1, "created": 0, "collecting": 1, "ready_to_train": 2, "trained": 5}


def _check(request: Request, scope: str) -> None:
    """HTTP Basic with the API key as the user name (Nanonets' convention), or a Bearer key."""
    header = request.headers.get("authorization", "")
    key = ""
    if header.lower().startswith("basic "):
        try:
            key = base64.b64decode(header[6:]).decode().split(":", 1)[0]
        except ValueError:
            key = ""
    elif header.lower().startswith("bearer "):
        key = header[7:].strip()
    granted = request.app.state.store.key_scope(key) if key else None
    if granted is None:
        raise ServiceError(
            401,
            "unauthorized",
            "give your API key as the user name of HTTP Basic auth",
            headers={"WWW-Authenticate": 'Basic realm="imgclf"'},
        )
    if SCOPES.index(granted) < SCOPES.index(scope):
        raise ServiceError(403, "forbidden", f"this key's scope is {granted}; this needs {scope}")


LIST_FIELDS = ("categories", "urls")  # form fields Nanonets clients repeat, one value each


async def _fields(request: Request) -> tuple[dict, list[UploadFile]]:
    """Form fields (urlencoded or multipart) merged over the query string, and the uploaded files."""
    form = await request.form(max_files=request.app.state.limits.files_per_request)
    fields = dict(request.query_params)
    lists: dict[str, list[str]] = {name: request.query_params.getlist(name) for name in LIST_FIELDS}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile) and name != "file":
            # requests sends ('', value) fields as parts with an empty file name: they are values
            value = (await value.read(4096)).decode("utf-8", errors="replace")
        if not isinstance(value, UploadFile):
            fields.setdefault(name, value)
            if name in LIST_FIELDS:
                lists[name].append(value)
    files = [v for v in form.getlist("file") if isinstance(v, UploadFile)]
    return {**fields, **lists}, files


def _model_object(store: Store, model_id: str, limits) -> dict:
    model = describe(store, model_row(store, model_id), limits)
    state = STATES.get(model["state"], 0)
    if model["state"] == "training":
        state = 4 if model["last_job"]["state"] == "running" else 3
    return {
        "model_id": model["id"],
        "model_type": "classification",
        "state": state,
        "status": model["state"],
        "categories": [{"name": c["name"], "count": c["images"]} for c in model["categories"]],
    }


def _model_id(fields: dict) -> str:
    model_id = fields.get("modelId") or fields.get("model_id")
    if not model_id:
        raise ServiceError(400, "missing_model_id", "give the model's id as the modelId field")
    return model_id


@router.post("/Model/")
async def create_model(request: Request) -> dict:
    _check(request, "train")
    fields, _ = await _fields(request)
    names = [check_name(c, "category") for c in fields["categories"]]
    if len(names) < 2 or len(set(names)) != len(names):
        raise ServiceError(400, "invalid_categories", "give at least 2 different categories")
    store: Store = request.app.state.store
    model_id = new_id("mdl")
    store.execute(
        "INSERT INTO models VALUES (?, ?, ?, NULL)", model_id, "nanonets " + ", ".join(names)[:80], time.time()
    )
    for name in names:
        store.execute("INSERT INTO categories VALUES (?, ?, ?)", new_id("cat"), model_id, name)
    return _model_object(store, model_id, request.app.state.limits)


@router.get("/Model/")
async def get_model(request: Request, modelId: str) -> dict:  # noqa: N803  (Nanonets' parameter name)
    _check(request, "predict")
    return _model_object(request.app.state.store, modelId, request.app.state.limits)


@router.post("/UploadFile/")
async def upload_file(request: Request) -> dict:
    _check(request, "train")
    fields, files = await _fields(request)
    store, limits = request.app.state.store, request.app.state.limits
    model_id = _model_id(fields)
    model_row(store, model_id)
    category = store.one("SELECT * FROM categories WHERE model_id = ? AND name = ?", model_id, fields.get("category"))
    if category is None:
        raise ServiceError(400, "unknown_category", f"the model has no category '{fields.get('category')}'")
    require_disk(store, limits)
    for upload in files:
        accept_image(
            store, limits, model_id, category, await upload.read(limits.image_bytes + 1), upload.filename or "upload"
        )
    return _model_object(store, model_id, limits)


@router.post("/UploadUrls/")
async def upload_urls(request: Request) -> dict:
    _check(request, "train")
    fields, _ = await _fields(request)
    store, limits = request.app.state.store, request.app.state.limits
    model_id = _model_id(fields)
    model_row(store, model_id)
    category = store.one("SELECT * FROM categories WHERE model_id = ? AND name = ?", model_id, fields.get("category"))
    if category is None:
        raise ServiceError(400, "unknown_category", f"the model has no category '{fields.get('category')}'")
    await accept_urls(request, model_id, category, fields["urls"])
    return _model_object(store, model_id, limits)


@router.post("/Train/")
async def train(request: Request) -> dict:
    _check(request, "train")
    fields, _ = await _fields(request)
    model_id = _model_id(fields)
    try:
        await run_in_threadpool(start, request, model_id, None, None)
    except ServiceError as exc:
        if exc.status != 409:  # Nanonets answers a model already training with its state
            raise ServiceError(400, exc.code, exc.message, exc.details) from None
    return _model_object(request.app.state.store, model_id, request.app.state.limits)


async def _label(request: Request, inputs: list[tuple[str, bytes]], model_id: str) -> dict:
    store: Store = request.app.state.store
    model = model_row(store, model_id)
    if not model["active_version"]:
        raise ServiceError(400, "not_trained", "the model is not trained yet (state 5 means trained)")
    clf = predictor_for(request.app, model_id, model["active_version"])
    k = len(clf.classes_)
    results = await run_in_threadpool(_predict_all, clf, inputs, k, None, request.app.state.limits)
    return {
        "message": "Success",
        "result": [
            {
                "message": "Success",
                "file": r["name"],
                "prediction": [{"label": t["label"], "probability": t["probability"]} for t in r["top"]],
            }
            if "top" in r
            else {"message": r["error"]["message"], "file": r["name"], "prediction": []}
            for r in results
        ],
    }


@router.post("/LabelFile/")
async def label_file(request: Request) -> dict:
    _check(request, "predict")
    fields, files = await _fields(request)
    if not files:
        raise ServiceError(400, "no_file", "send the image as the file field")
    inputs = [(f.filename or "upload", await f.read(request.app.state.limits.image_bytes + 1)) for f in files]
    return await _label(request, inputs, _model_id(fields))


@router.post("/LabelUrls/")
async def label_urls(request: Request) -> dict:
    _check(request, "predict")
    fields, _ = await _fields(request)
    fetched = await fetch_bodies(fields["urls"], request.app.state.limits, "predicting")
    answer = await _label(request, [(url, body) for url, body, _ in fetched if body is not None], _model_id(fields))
    answer["result"] += [
        {"message": error["reason"], "file": url, "prediction": []} for url, body, error in fetched if body is None
    ]
    return answer

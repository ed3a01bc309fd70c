"""Models (projects), their categories, and the photos uploaded to them."""

from __future__ import annotations

import hashlib
import io
import time
import zipfile
from pathlib import Path

from fastapi import APIRouter, Body, Request, UploadFile
from fastapi.responses import Response

from imgclf.core.atomic import atomic_write
from imgclf.core.errors import ImageError
from imgclf.data.images import decode_image_bytes
from imgclf.serve.http import Limits, ServiceError, file_response, require, require_disk
from imgclf.serve.store import Store, new_id

router = APIRouter(tags=["models"])
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}


def check_name(name: str, what: str) -> str:
    """A model or category name: 1-100 characters, no path separators or control characters."""
    name = (name or "").strip()
    if (
        not 1 <= len(name) <= 100
        or any(c in name for c in "/\\\0")
        or name.startswith(".")
        or any(ord(c) < 32 for c in name)
    ):
        raise ServiceError(
            422,
            "invalid_name",
            f"{what} '{name[:100]}' must be 1-100 characters, without / \\, control characters or a leading dot",
        )
    return name


def model_row(store: Store, model_id: str) -> dict:
    row = store.one("SELECT * FROM models WHERE id = ?", model_id)
    if row is None:
        raise ServiceError(404, "model_not_found", f"no model {model_id}")
    return row


def describe(store: Store, model: dict, limits: Limits) -> dict:
    """A model with its categories and counts, its state, and whether it can train (and if not, why)."""
    categories = store.query(
        "SELECT c.id, c.name, COUNT(i.id) AS images FROM categories c LEFT JOIN images i "
        "ON i.category_id = c.id WHERE c.model_id = ? GROUP BY c.id ORDER BY c.name",
        model["id"],
    )
    job = store.one(
        "SELECT id, state, error_code, error_message FROM jobs WHERE model_id = ? ORDER BY created DESC LIMIT 1",
        model["id"],
    )
    short = [c["name"] for c in categories if c["images"] < limits.min_per_category]
    why = ""
    if len(categories) < 2:
        why = "a model needs at least 2 categories"
    elif short:
        why = f"every category needs {limits.min_per_category} photos; short: {', '.join(short)}"
    elif job and job["state"] in ("queued", "running"):
        why = "a training is already running"
    if job and job["state"] in ("queued", "running"):
        state = "training"
    elif model["active_version"]:
        state = "trained"
    elif job and job["state"] == "failed":
        state = "failed"
    elif not why:
        state = "ready_to_train"
    else:
        state = "collecting" if any(c["images"] for c in categories) else "created"
    return {
        "id": model["id"],
        "name": model["name"],
        "created": model["created"],
        "state": state,
        "active_version": model["active_version"],
        "categories": categories,
        "can_train": not why,
        "why_not": why,
        "last_job": job,
    }


@router.post("/models", status_code=201, dependencies=[require("train")])
def create_model(request: Request, name: str = Body(...), categories: list[str] = Body(default=[])) -> dict:
    store: Store = request.app.state.store
    names = [check_name(c, "category") for c in categories]
    if len(set(names)) != len(names):
        raise ServiceError(422, "duplicate_category", "category names must differ")
    model_id = new_id("mdl")
    store.execute("INSERT INTO models VALUES (?, ?, ?, NULL)", model_id, check_name(name, "model"), time.time())
    for category in names:
        store.execute("INSERT INTO categories VALUES (?, ?, ?)", new_id("cat"), model_id, category)
    return describe(store, model_row(store, model_id), request.app.state.limits)


@router.get("/models", dependencies=[require("predict")])
def list_models(request: Request) -> dict:
    store: Store = request.app.state.store
    return {
        "models": [
            describe(store, m, request.app.state.limits) for m in store.query("SELECT * FROM models ORDER BY created")
        ]
    }


@router.get("/models/{model_id}", dependencies=[require("predict")])
def get_model(request: Request, model_id: str) -> dict:
    store: Store = request.app.state.store
    return describe(store, model_row(store, model_id), request.app.state.limits)


@router.patch("/models/{model_id}", dependencies=[require("train")])
def rename_model(request: Request, model_id: str, name: str = Body(..., embed=True)) -> dict:
    store: Store = request.app.state.store
    model_row(store, model_id)
    store.execute("UPDATE models SET name = ? WHERE id = ?", check_name(name, "model"), model_id)
    return describe(store, model_row(store, model_id), request.app.state.limits)


@router.delete("/models/{model_id}", status_code=204, dependencies=[require("admin")])
def delete_model(request: Request, model_id: str) -> Response:
    store: Store = request.app.state.store
    model_row(store, model_id)
    for table in ("images", "categories", "versions", "jobs"):
        store.execute(f"DELETE FROM {table} WHERE model_id = ?", model_id)
    store.execute("DELETE FROM models WHERE id = ?", model_id)
    request.app.state.predictors.pop(model_id, None)
    return Response(status_code=204)


@router.post("/models/{model_id}/categories", status_code=201, dependencies=[require("train")])
def add_category(request: Request, model_id: str, name: str = Body(..., embed=True)) -> dict:
    store: Store = request.app.state.store
    model_row(store, model_id)
    name = check_name(name, "category")
    if store.one("SELECT 1 AS x FROM categories WHERE model_id = ? AND name = ?", model_id, name):
        raise ServiceError(409, "duplicate_category", f"this model already has a category '{name}'")
    store.execute("INSERT INTO categories VALUES (?, ?, ?)", new_id("cat"), model_id, name)
    return describe(store, model_row(store, model_id), request.app.state.limits)


@router.delete("/models/{model_id}/categories/{category_id}", dependencies=[require("train")])
def remove_category(request: Request, model_id: str, category_id: str) -> dict:
    store: Store = request.app.state.store
    model_row(store, model_id)
    store.execute("DELETE FROM images WHERE category_id = ?", category_id)
    if not store.execute("DELETE FROM categories WHERE id = ? AND model_id = ?", category_id, model_id):
        raise ServiceError(404, "category_not_found", f"no category {category_id} in model {model_id}")
    return describe(store, model_row(store, model_id), request.app.state.limits)


def _reason_code(reason: str) -> str:
    for needle, code in (
        ("too many pixels", "too_many_pixels"),
        ("unsupported format", "unsupported_format"),
        ("truncated", "truncated"),
        ("empty", "empty_file"),
    ):
        if needle in reason:
            return code
    return "not_an_image"


def accept_image(store: Store, limits: Limits, model_id: str, category: dict, data: bytes, name: str) -> dict:
    """One uploaded file: stored under its content's name and recorded, or rejected with the reason."""
    rejected = {"name": name, "accepted": False}
    if len(data) > limits.image_bytes:
        return {**rejected, "code": "too_large", "reason": f"over {limits.image_bytes} bytes"}
    try:
        image, (width, height) = decode_image_bytes(
            data, name, draft_size=64, max_pixels=limits.image_pixels, with_size=True
        )
        extension = EXTENSIONS.get(image.format or "", ".img")
    except ImageError as exc:
        return {**rejected, "code": _reason_code(exc.reason), "reason": exc.reason}
    if min(width, height) < limits.min_side:
        return {
            **rejected,
            "code": "too_small",
            "reason": f"too small ({width}x{height}, under {limits.min_side} px a side)",
        }
    sha256 = hashlib.sha256(data).hexdigest()
    twin = store.one(
        "SELECT i.id, c.name FROM images i JOIN categories c ON c.id = i.category_id "
        "WHERE i.model_id = ? AND i.sha256 = ?",
        model_id,
        sha256,
    )
    if twin:
        if twin["name"] == category["name"]:
            return {**rejected, "code": "duplicate", "reason": "already uploaded", "image_id": twin["id"]}
        return {**rejected, "code": "in_another_category", "reason": f"the same photo is under '{twin['name']}'"}
    path = store.home.upload_path(sha256, extension)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda temp: open(temp, "wb").write(data))
    image_id = new_id("img")
    store.execute(
        "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        image_id,
        model_id,
        category["id"],
        sha256,
        len(data),
        width,
        height,
        str(path.relative_to(store.home.path)),
        name[:200],
        time.time(),
    )
    return {"name": name, "accepted": True, "image_id": image_id, "sha256": sha256, "size": len(data)}


@router.post("/models/{model_id}/categories/{category_id}/images", dependencies=[require("train")])
def upload_images(request: Request, model_id: str, category_id: str, files: list[UploadFile]) -> dict:
    store, limits = request.app.state.store, request.app.state.limits
    model_row(store, model_id)
    category = store.one("SELECT * FROM categories WHERE id = ? AND model_id = ?", category_id, model_id)
    if category is None:
        raise ServiceError(404, "category_not_found", f"no category {category_id} in model {model_id}")
    if len(files) > limits.files_per_request:
        raise ServiceError(413, "too_many_files", f"at most {limits.files_per_request} files per request")
    require_disk(store, limits)
    results = [
        accept_image(
            store, limits, model_id, category, upload.file.read(limits.image_bytes + 1), upload.filename or "upload"
        )
        for upload in files
    ]
    return {
        "accepted": sum(r["accepted"] for r in results),
        "rejected": sum(not r["accepted"] for r in results),
        "files": results,
    }


@router.get("/models/{model_id}/images", dependencies=[require("predict")])
def list_images(request: Request, model_id: str) -> dict:
    store: Store = request.app.state.store
    model_row(store, model_id)
    return {
        "images": store.query(
            "SELECT i.id, i.category_id, c.name AS category, i.sha256, i.size, i.width, "
            "i.height, i.original_name FROM images i JOIN categories c ON c.id = i.category_id "
            "WHERE i.model_id = ? ORDER BY i.created",
            model_id,
        )
    }


@router.get(
    "/images/{image_id}/thumbnail",
    dependencies=[require("predict")],
    response_class=Response,
    responses=file_response("image/jpeg"),
)
def thumbnail(request: Request, image_id: str) -> Response:
    store: Store = request.app.state.store
    row = store.one("SELECT file FROM images WHERE id = ?", image_id)
    if row is None:
        raise ServiceError(404, "image_not_found", f"no image {image_id}")
    image = decode_image_bytes((store.home.path / row["file"]).read_bytes(), image_id, draft_size=128)
    image.thumbnail((128, 128))
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=85)
    return Response(out.getvalue(), media_type="image/jpeg")


@router.delete("/images/{image_id}", status_code=204, dependencies=[require("train")])
def delete_image(request: Request, image_id: str) -> Response:
    if not request.app.state.store.execute("DELETE FROM images WHERE id = ?", image_id):
        raise ServiceError(404, "image_not_found", f"no image {image_id}")
    return Response(status_code=204)


ZIP_ENTRIES = 20_000
ZIP_TOTAL_BYTES = 2 * 2**30
ZIP_RATIO = 200  # an image compresses little: far more than this is a bomb


def _zip_entries(archive: zipfile.ZipFile, limits: Limits):
    """``(category, name, bytes or None, reason)`` per entry of a zip of class folders, read into
    memory with every size counted as it is read; nothing is extracted by the name it carries."""
    infos = archive.infolist()
    if len(infos) > ZIP_ENTRIES:
        raise ServiceError(413, "zip_too_many_entries", f"at most {ZIP_ENTRIES} entries in a zip")
    total = 0
    for info in infos:
        name = info.filename
        if info.is_dir() or name.startswith("__MACOSX/") or Path(name).name.startswith("."):
            continue
        parts = Path(name).parts
        if name.startswith("/") or ".." in parts or "\\" in name or (info.external_attr >> 16) & 0o170000 == 0o120000:
            yield None, name, None, "unsafe entry (absolute, '..', or a link)"
            continue
        if len(parts) != 2:
            yield None, name, None, "not inside a class folder (zip/CATEGORY/photo.jpg)"
            continue
        if info.file_size > limits.image_bytes or info.file_size > ZIP_RATIO * max(info.compress_size, 1):
            yield parts[0], name, None, "too large, or compressed like a bomb"
            continue
        with archive.open(info) as handle:
            data = handle.read(limits.image_bytes + 1)
        total += len(data)
        if total > ZIP_TOTAL_BYTES:
            raise ServiceError(413, "zip_too_large", f"the zip holds more than {ZIP_TOTAL_BYTES} bytes")
        yield parts[0], name, data, ""


@router.post("/models/{model_id}/zip", dependencies=[require("train")])
def upload_zip(request: Request, model_id: str, file: UploadFile) -> dict:
    """A zip of class folders (``CATEGORY/photo.jpg``); folders that are not categories yet become
    categories. Each entry is answered like an uploaded file."""
    store, limits = request.app.state.store, request.app.state.limits
    model_row(store, model_id)
    require_disk(store, limits)
    try:
        archive = zipfile.ZipFile(file.file)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise ServiceError(422, "not_a_zip", "the file is not a zip archive") from None
    results = []
    with archive:
        for category_name, name, data, reason in _zip_entries(archive, limits):
            if data is None:
                results.append(
                    {
                        "name": name,
                        "accepted": False,
                        "code": "unsafe_entry" if category_name is None else "too_large",
                        "reason": reason,
                    }
                )
                continue
            category = _category_named(store, model_id, check_name(category_name, "category"))
            results.append(
                {**accept_image(store, limits, model_id, category, data, name), "category": category["name"]}
            )
    return {
        "accepted": sum(r["accepted"] for r in results),
        "rejected": sum(not r["accepted"] for r in results),
        "files": results,
    }


def _category_named(store: Store, model_id: str, name: str) -> dict:
    row = store.one("SELECT * FROM categories WHERE model_id = ? AND name = ?", model_id, name)
    if row is None:
        store.execute("INSERT INTO categories VALUES (?, ?, ?)", new_id("cat"), model_id, name)
        row = store.one("SELECT * FROM categories WHERE model_id = ? AND name = ?", model_id, name)
    return row

"""What every route shares: the limits, the error type and body, the key check, and the body-size
guard."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi import Path as FastPath
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from imgclf.serve.store import SCOPES, Store


@dataclass(frozen=True)
class Limits:
    """What one request may carry; each over-limit answer is immediate, with its code."""

    body_bytes: int = 64 * 2**20  # a whole request, counted as it arrives
    files_per_request: int = 200
    image_bytes: int = 20 * 2**20
    image_pixels: int = 40_000_000
    min_side: int = 32
    min_per_category: int = 10  # photos per category before a model can be trained
    min_free_disk: int = 512 * 2**20
    predict_queue: int = 32  # predictions being answered or waiting; more get 503 with Retry-After
    predict_timeout: float = 30.0  # seconds for one request's predictions; over it: 504, and the slot is freed
    queued_jobs: int = 8  # training jobs waiting in all; more get 429 with Retry-After
    body_timeout: float = 30.0  # seconds a client may take between two pieces of its body (slow clients: 408)
    drain_seconds: float = 2.0  # after SIGTERM: new requests get 503 while those in flight finish
    url_uploads: bool = False  # photos by URL (upload and predict): off unless the operator allows it
    url_allow_hosts: tuple[str, ...] = ()  # host:port allowed although not public (an internal image server)


class ServiceError(Exception):
    """An answer other than 2xx, with the error body's code and what to do."""

    def __init__(self, status: int, code: str, message: str, details: dict | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details or {}, headers


# numbers a client may send, bounded so that nothing reaches SQLite or NumPy it cannot hold
VersionNumber = Annotated[int, FastPath(ge=1, le=1_000_000, description="version number")]
OptionalVersion = Annotated[int | None, Query(ge=1, le=1_000_000, description="version (default: the active one)")]
TopK = Annotated[int, Query(ge=1, le=1000, description="how many labels per input")]
LogLines = Annotated[int, Query(ge=1, le=10_000, description="how many lines, from the end")]


def file_response(media_type: str) -> dict:
    """The OpenAPI entry of a route that answers a file."""
    return {200: {"content": {media_type: {}}, "description": f"the file ({media_type})"}}


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict = {}


class ErrorBody(BaseModel):
    """Every answer that is not 2xx."""

    error: ErrorDetail


_MEANING = {
    400: "not allowed as asked (e.g. URLs when the operator has not allowed them)",
    401: "no key, or a wrong or revoked one",
    403: "the key's scope does not allow this",
    404: "no such model, category, image, job or version",
    408: "the request body stalled",
    409: "conflicts with the current state (a training running, a version not ready or unusable)",
    413: "the body, files or fields are over the limits",
    422: "the request is malformed, or there are too few photos",
    429: "too many trainings queued (Retry-After)",
    503: "busy, shutting down, or the database is away (Retry-After)",
    504: "the predictions took longer than the limit",
    507: "the service's disk is nearly full",
}
ERROR_RESPONSES = {status: {"model": ErrorBody, "description": text} for status, text in _MEANING.items()}


def error_body(code: str, message: str, details: dict | None = None) -> dict:
    return {"error": {"code": code, "message": message, "details": details or {}}}


class BodyLimit:
    """ASGI middleware: a request body over the limit is answered 413 as soon as it is counted,
    with or without a Content-Length (a chunked upload cannot slip past); a client that sends
    nothing for ``timeout`` seconds in the middle of its body is answered 408 (slow loris); after
    SIGTERM (``draining``) new requests are answered 503 while those in flight finish."""

    def __init__(self, app, limit: int, timeout: float, state):
        self.app, self.limit, self.timeout, self.state = app, limit, timeout, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.state.draining:
            return await _answer(
                send, 503, "shutting_down", "the service is restarting; try again", {"Retry-After": "5"}
            )
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(send, self.limit)
        seen, answered, rejected, body_done = 0, False, False, False

        async def counting_receive():
            nonlocal seen, answered, rejected, body_done
            if body_done:  # the body is in: what comes now is the disconnect, however long a stream runs
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except (asyncio.TimeoutError, TimeoutError):
                if not answered:
                    message = f"no part of the request body came for {self.timeout:g} s"
                    await _answer(send, 408, "request_timeout", message, {"Connection": "close"})
                    answered = rejected = True
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > self.limit:
                    if not answered:  # answer now, and tell the app the client is gone
                        await _too_large(send, self.limit)
                        answered = rejected = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal answered
            if rejected:
                return  # the 413 went out already; what the app makes of the disconnect is not sent
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, guarded_send)


async def _answer(send, status: int, code: str, message: str, headers: dict) -> None:
    response = JSONResponse(error_body(code, message), status_code=status, headers=headers)
    await response({"type": "http"}, None, send)


async def _too_large(send, limit: int) -> None:
    response = JSONResponse(error_body("body_too_large", f"the request body is over {limit} bytes"), status_code=413)
    await response({"type": "http"}, None, send)


def require_disk(store: Store, limits: Limits) -> None:
    """507 before anything is written when the disk is nearly full."""
    free = shutil.disk_usage(store.home.path).free
    if free < limits.min_free_disk:
        raise ServiceError(
            507, "insufficient_storage", f"only {free // 2**20} MB free on the service's disk; free some space "
            f"(at least {limits.min_free_disk // 2**20} MB) and try again",
        )  # fmt: skip


def bearer_key(request: Request) -> str:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else ""


def require(scope: str) -> Callable:
    """A dependency that lets a request through with a key of ``scope`` or a wider one."""

    def check(request: Request) -> str:
        store: Store = request.app.state.store
        key = bearer_key(request)
        granted = store.key_scope(key) if key else None
        if granted is None:
            raise ServiceError(
                401,
                "unauthorized",
                "give a valid API key: Authorization: Bearer KEY (imgclf serve keys create makes one)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if SCOPES.index(granted) < SCOPES.index(scope):
            raise ServiceError(403, "forbidden", f"this key's scope is {granted}; this needs {scope}")
        return granted

    return Depends(check)

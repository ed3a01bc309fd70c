"""The service's app factory: state in a home folder, keys checked on every request, errors as
``{"error": {"code", "message", "details"}}``, every ``ImgclfError`` a 4xx through one handler.
Routes are thin (:mod:`imgclf.serve.catalog`, :mod:`imgclf.serve.training`,
:mod:`imgclf.serve.inference`): they translate a request and call the library."""

from __future__ import annotations

import shutil
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from imgclf.core.errors import ImgclfError, MemoryLimitError
from imgclf.serve import catalog, inference, nanonets, training, urls
from imgclf.serve.database import DatabaseError
from imgclf.serve.http import ERROR_RESPONSES, BodyLimit, Limits, ServiceError, error_body
from imgclf.serve.store import Home, Store

PAGE = Path(__file__).with_name("static") / "index.html"


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        return JSONResponse(error_body(exc.code, exc.message, exc.details), exc.status, headers=exc.headers)

    @app.exception_handler(ImgclfError)
    async def library_error(request: Request, exc: ImgclfError):
        if isinstance(exc, MemoryLimitError):  # the server's condition, not the request's fault
            return JSONResponse(error_body(exc.code, str(exc)), 503, headers={"Retry-After": "5"})
        return JSONResponse(error_body(exc.code, str(exc)), 422)

    @app.exception_handler(DatabaseError)
    async def database_error(request: Request, exc: DatabaseError):
        body = error_body("database_unavailable", f"the service's database did not answer ({exc}); try again")
        return JSONResponse(body, 503, headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        details = {
            "errors": [
                {"where": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg", "")} for e in exc.errors()
            ]
        }
        return JSONResponse(error_body("invalid_request", "the request does not have the expected shape", details), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code)


def create_app(home: str | Path, limits: Limits | None = None, database: str | None = None) -> FastAPI:
    """The service over ``home`` (created when missing), its rows in ``database`` (default: the
    SQLite file in ``home``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        inference.warm_up(app)
        yield
        app.state.predictors.clear()

    app = FastAPI(
        title="imgclf",
        version="1",
        lifespan=lifespan,
        description="Self-hosted image classification: create, upload, train, watch, predict.",
    )
    app.state.home = Home(home)
    app.state.store = Store(app.state.home, database)
    app.state.limits = limits or Limits()
    app.state.predictors = {}
    app.state.expects_worker = False  # set by run_service when it runs a worker beside the app
    app.state.warm = False  # the active versions loaded (inference.warm_up, at start-up)
    _handlers(app)
    app.state.draining = False  # set on SIGTERM: new requests get 503 while those in flight finish
    app.state.predicting = 0  # predictions being answered or waiting (bounded by limits.predict_queue)
    app.add_middleware(
        BodyLimit, limit=app.state.limits.body_bytes, timeout=app.state.limits.body_timeout, state=app.state
    )

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        """The web page: one file from the package, no build step and nothing from a CDN."""
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        return {"ok": True}

    @app.get("/readyz", tags=["health"], responses={503: ERROR_RESPONSES[503]})
    def readyz(request: Request) -> dict:
        store: Store = request.app.state.store
        store.one("SELECT 1 AS ok")  # a database that does not answer: 503 database_unavailable (handler)
        free = shutil.disk_usage(store.home.path).free
        if free < request.app.state.limits.min_free_disk:
            raise ServiceError(503, "low_disk", f"only {free // 2**20} MB free in {store.home.path}")
        workers = store.live_workers()
        if request.app.state.expects_worker and not workers:
            raise ServiceError(503, "no_worker", "no training worker has been heard from in 30 s; it may be starting")
        if not request.app.state.warm:
            raise ServiceError(503, "warming", "loading the models' active versions", headers={"Retry-After": "1"})
        training = sum(1 for w in workers if w["job_id"])
        warm = len(request.app.state.predictors)
        return {
            "ok": True,
            "free_disk_mb": free // 2**20,
            "workers": len(workers),
            "training": training,
            "models_warm": warm,
        }

    for module in (catalog, urls, training, inference):
        app.include_router(module.router, prefix="/v1", responses=ERROR_RESPONSES)
    app.include_router(nanonets.router, responses=ERROR_RESPONSES)
    return app

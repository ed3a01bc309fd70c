"""Photos by URL, when the operator allows it (``imgclf serve --allow-url-uploads``): the fetch
engine of ``imgclf fetch`` (size cap while streaming, deadlines, retries, redirects checked hop by
hop), with only public addresses: a URL whose host is, or resolves to, a loopback, private or
link-local address (127.0.0.1, ::1, 10.x, 169.254.169.254, ...) is refused, at every redirect
too, except the ``--url-allow-host`` ones the operator names."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Body, Request
from fastapi.concurrency import run_in_threadpool

from imgclf.data.fetch.http import Attempts, Downloader, Failure, HttpLimits
from imgclf.data.fetch.inputs import normalise_url
from imgclf.serve.catalog import accept_image, model_row
from imgclf.serve.http import Limits, ServiceError, require, require_disk

router = APIRouter(tags=["models"])
USER_AGENT = "imgclf-serve/0.1 (fetching photos a user asked for)"


def http_limits(limits: Limits) -> HttpLimits:
    return HttpLimits(
        concurrency=8, per_host=4, connect_timeout=5.0, read_timeout=10.0, url_timeout=20.0, retries=1,
        retry_after_cap=5.0, max_bytes=limits.image_bytes, user_agent=USER_AGENT, public_only=True,
        allow_hosts=tuple(limits.url_allow_hosts),
    )  # fmt: skip


async def fetch_bodies(urls: list, limits: Limits, what: str = "uploading") -> list[tuple[str, bytes | None, dict]]:
    """(url, body, {}) or (url, None, {"code", "reason"}) for each URL, in order."""
    if not limits.url_uploads:
        raise ServiceError(
            400, "urls_not_allowed", f"{what} by URL is off on this server; send the files, or ask the operator "
            "to start it with --allow-url-uploads",
        )  # fmt: skip
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls) or not urls:
        raise ServiceError(422, "invalid_urls", "send a JSON list of URL strings as urls")
    if len(urls) > limits.files_per_request:
        raise ServiceError(413, "too_many_files", f"at most {limits.files_per_request} URLs per request")
    async with Downloader(http_limits(limits)) as downloader:

        async def one(url: str) -> tuple[str, bytes | None, dict]:
            normalised, error = normalise_url(url)
            if error:
                return url, None, {"code": "invalid_url", "reason": error}
            try:
                return url, (await downloader.get(normalised, Attempts())).body, {}
            except Failure as failure:
                return url, None, {"code": failure.outcome, "reason": failure.detail}

        return list(await asyncio.gather(*(one(u) for u in urls)))


async def accept_urls(request: Request, model_id: str, category: dict, urls: list) -> list[dict]:
    store, limits = request.app.state.store, request.app.state.limits
    require_disk(store, limits)
    results = []
    for url, body, error in await fetch_bodies(urls, limits):
        if body is None:
            results.append({"name": url, "accepted": False, **error})
        else:
            results.append(await run_in_threadpool(accept_image, store, limits, model_id, category, body, url))
    return results


@router.post("/models/{model_id}/categories/{category_id}/urls", dependencies=[require("train")])
async def upload_urls(request: Request, model_id: str, category_id: str, urls: list[str] = Body(..., embed=True)):
    """Photos for one category by URL: each answered, accepted or rejected with its code."""
    store = request.app.state.store
    model_row(store, model_id)
    category = store.one("SELECT * FROM categories WHERE id = ? AND model_id = ?", category_id, model_id)
    if category is None:
        raise ServiceError(404, "category_not_found", f"no category {category_id} in model {model_id}")
    results = await accept_urls(request, model_id, category, urls)
    return {
        "accepted": sum(r["accepted"] for r in results),
        "rejected": sum(not r["accepted"] for r in results),
        "files": results,
    }

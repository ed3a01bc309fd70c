"""Polite, bounded HTTP: one URL in, its body (or the reason there is none) out.

httpx streams every response, so nothing is read past ``max_bytes`` (said up front by
Content-Length or found while streaming) and nothing but an image is read past its first bytes.
stamina retries only what may pass (connect errors, timeouts, 408/425/429/5xx) with backoff and
jitter, and waits what Retry-After asks up to a cap. Each host (host:port) has a concurrency limit
and a circuit breaker: after a connection failure the host gets one attempt at a time, and after
``breaker_failures`` in a row none at all. Redirects are followed by hand so that every hop is
checked (scheme, loops, known placeholder paths) before it is asked for.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import re
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import stamina

from imgclf.data.fetch.inputs import normalise_url

# stamina reports retries through logging; the library never prints, so they go nowhere unless
# the application configures logging (a NullHandler stops Python's last-resort stderr handler).
logging.getLogger("stamina").addHandler(logging.NullHandler())

# Known stand-ins that hosts redirect dead photos to; refused before their body is asked for.
BUILTIN_PLACEHOLDER_URLS = (
    r"/photo_unavailable[^/]*\.(png|gif|jpe?g)$",  # Flickr: .../images/photo_unavailable.png
    r"^https?://([a-z0-9-]+\.)*imgur\.com/removed\.(png|jpe?g)$",  # imgur: i.imgur.com/removed.png
)
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
SNIFF_BYTES = 32
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class HttpLimits:
    concurrency: int = 32
    per_host: int = 4
    connect_timeout: float = 10.0
    read_timeout: float = 20.0
    url_timeout: float = 60.0
    retries: int = 3
    retry_after_cap: float = 30.0
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    breaker_failures: int = 3
    user_agent: str = "imgclf"
    respect_noai: bool = True
    placeholder_urls: tuple[str, ...] = BUILTIN_PLACEHOLDER_URLS
    backoff_initial: float = 0.2
    backoff_jitter: float = 0.3
    # a service fetching URLs that users send: only addresses on the public internet, checked at
    # every hop after the name is resolved; allow_hosts ("host:port") are the operator's exceptions
    public_only: bool = False
    allow_hosts: tuple[str, ...] = ()


class Failure(Exception):
    """The URL gave no usable body: ``outcome`` is one of the manifest's codes."""

    retryable = False

    def __init__(self, outcome: str, detail: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(detail)
        self.outcome, self.detail, self.status, self.retry_after = outcome, detail, status, retry_after
        self.final_url = ""


class Transient(Failure):
    """A failure that another attempt may not have: retried by stamina."""

    retryable = True


@dataclass
class Response:
    body: bytes
    status: int
    final_url: str
    content_type: str
    redirects: list[str] = field(default_factory=list)


@dataclass
class Attempts:
    count: int = 0
    last_status: int | None = None
    final_url: str = ""


class _Host:
    def __init__(self, per_host: int) -> None:
        self.slot = asyncio.Semaphore(per_host)
        self.probe = asyncio.Lock()
        self.failures = 0  # connection failures in a row


def _is_image_start(head: bytes) -> bool:
    return head.startswith(IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _describe(head: bytes) -> str:
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<")):
        return "HTML or XML, not an image"
    if text.startswith((b"{", b"[")):
        return "JSON, not an image"
    return "not an image by its first bytes"


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def robots_denied(headers: httpx.Headers) -> bool:
    """X-Robots-Tag noai / noimageai, for all agents or for ours (``imgclf: noai``)."""
    for value in headers.get_list("x-robots-tag"):
        agent, sep, rules = value.rpartition(":")
        if sep and agent.strip().lower() not in ("imgclf", "*") and " " not in agent.strip():
            continue
        words = {w.strip().lower() for w in re.split(r"[,\s]+", rules if sep else value)}
        if words & {"noai", "noimageai"}:
            return True
    return False


class Downloader:
    """Fetch many URLs concurrently within the limits. Use as ``async with Downloader(...) as d``."""

    def __init__(self, limits: HttpLimits, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.limits = limits
        self._hosts: dict[str, _Host] = {}
        self._placeholder = [re.compile(p, re.IGNORECASE) for p in limits.placeholder_urls]
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(limits.read_timeout, connect=limits.connect_timeout, pool=None),
            limits=httpx.Limits(max_connections=limits.concurrency, max_keepalive_connections=limits.concurrency),
            headers={"User-Agent": limits.user_agent, "Accept-Encoding": "identity", "Accept": "image/*,*/*;q=0.5"},
            follow_redirects=False,
            transport=transport,
            trust_env=True,
        )
        self._retrying = stamina.AsyncRetryingCaller(
            attempts=limits.retries + 1,
            timeout=None,  # the whole URL's deadline is kept by get() itself
            wait_initial=limits.backoff_initial,
            wait_max=limits.retry_after_cap,
            wait_jitter=limits.backoff_jitter,
        ).on(self._backoff)

    async def __aenter__(self) -> Downloader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    def _backoff(self, exc: Exception) -> bool | float:
        if not isinstance(exc, Transient):
            return False
        return min(exc.retry_after, self.limits.retry_after_cap) if exc.retry_after is not None else True

    async def get(self, url: str, attempts: Attempts, into: Path | None = None) -> Response:
        """The body of ``url``, or :class:`Failure` with its outcome, within the URL's deadline.
        With ``into``, any content (not only images) is streamed to that file instead of memory."""
        try:
            call = self._retrying(self._attempt, url, attempts, into)
            return await asyncio.wait_for(call, self.limits.url_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise Failure("timeout", f"no complete answer within {self.limits.url_timeout:g} s") from None

    def host_of(self, url: str) -> _Host:
        netloc = urlsplit(url).netloc
        if netloc not in self._hosts:
            self._hosts[netloc] = _Host(self.limits.per_host)
        return self._hosts[netloc]

    @asynccontextmanager
    async def _turn(self, url: str):
        """A slot on the URL's host; one at a time while the host is failing; none when it is down."""
        host = self.host_of(url)
        async with host.slot:
            if host.failures == 0:
                yield host
                return
            async with host.probe:
                if host.failures >= self.limits.breaker_failures:
                    netloc = urlsplit(url).netloc
                    raise Failure(
                        "host_unreachable", f"{netloc}: {host.failures} failed connections in a row; not tried"
                    )
                yield host

    async def _check_address(self, url: str, hop: int) -> None:
        """With ``public_only``: refuse a host that is, or resolves to, a private, loopback,
        link-local or otherwise non-public address (what a server-side request forgery aims at).
        The name is resolved again when httpx connects; a DNS answer that changes in between
        (rebinding) is not caught here."""
        if not self.limits.public_only:
            return
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if f"{parts.hostname}:{port}" in self.limits.allow_hosts:
            return
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise Failure("connect_error", f"cannot resolve {parts.hostname} ({exc})") from None
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%")[0])
            if address.version == 6 and address.ipv4_mapped:  # ::ffff:127.0.0.1 is 127.0.0.1
                address = address.ipv4_mapped
            if not address.is_global:
                where = "redirected to" if hop else "is"
                raise Failure("blocked_address", f"{where} {parts.hostname} ({address}), not a public address")

    def _check_hop(self, url: str, hop: int, seen: set[str]) -> None:
        if any(p.search(url) for p in self._placeholder):
            raise Failure("placeholder", f"{'redirected to' if hop else 'is'} a known placeholder: {url}")
        if url in seen:
            raise Failure("too_many_redirects", f"redirect loop back to {url}")
        if hop > self.limits.max_redirects:
            raise Failure("too_many_redirects", f"more than {self.limits.max_redirects} redirects")

    async def _attempt(self, url: str, attempts: Attempts, into: Path | None = None) -> Response:
        redirects: list[str] = []
        seen: set[str] = set()
        for hop in range(self.limits.max_redirects + 2):
            self._check_hop(url, hop, seen)
            await self._check_address(url, hop)
            seen.add(url)
            attempts.final_url = url
            async with self._turn(url) as host:
                attempts.count += hop == 0
                location, response = await self._request(url, host, attempts, into)
            if response is not None:
                response.redirects = redirects
                return response
            redirects.append(location)
            url = location
        raise Failure("too_many_redirects", f"more than {self.limits.max_redirects} redirects")

    async def _request(
        self, url: str, host: _Host, attempts: Attempts, into: Path | None
    ) -> tuple[str, Response | None]:
        try:
            async with self._client.stream("GET", url) as reply:
                host.failures = 0
                attempts.last_status = reply.status_code
                if reply.status_code in (301, 302, 303, 307, 308) and reply.headers.get("location"):
                    target, error = normalise_url(urljoin(url, reply.headers["location"]))
                    if error:
                        raise Failure("invalid_url", f"redirect to {target}: {error}", reply.status_code)
                    return target, None
                self._check_status(reply)
                body = await (self._read_body(reply) if into is None else self._save_body(reply, into))
                return url, Response(body, reply.status_code, url, reply.headers.get("content-type", ""))
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            host.failures += 1
            kind = "timeout" if isinstance(exc, httpx.ConnectTimeout) else "connect_error"
            raise Transient(kind, f"cannot connect to {urlsplit(url).netloc} ({exc or type(exc).__name__})") from None
        except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout) as exc:
            raise Transient("timeout", f"no data for {self.limits.read_timeout:g} s ({type(exc).__name__})") from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise Transient("incomplete", f"connection broke off ({exc or type(exc).__name__})") from None
        except httpx.HTTPError as exc:  # anything else httpx can raise (bad headers, decoding)
            raise Failure("http_error", f"{type(exc).__name__}: {exc}") from None

    def _check_status(self, reply: httpx.Response) -> None:
        status = reply.status_code
        if status in RETRY_STATUS:
            wait = retry_after_seconds(reply.headers.get("retry-after"))
            if wait is not None and wait > self.limits.retry_after_cap:
                raise Failure(
                    "rate_limited",
                    f"HTTP {status}, Retry-After {wait:.0f} s is over the {self.limits.retry_after_cap:g} s cap",
                    status,
                )
            raise Transient("rate_limited" if status == 429 else "server_error", f"HTTP {status}", status, wait)
        if status in (404, 410):
            raise Failure("not_found", f"HTTP {status}", status)
        if status in (401, 403, 451):
            raise Failure("forbidden", f"HTTP {status}", status)
        if not 200 <= status < 300:
            raise Failure("http_error", f"HTTP {status}", status)
        if self.limits.respect_noai and robots_denied(reply.headers):
            raise Failure("robots_denied", "X-Robots-Tag asks not to use it for AI (noai/noimageai)", status)
        declared = reply.headers.get("content-length", "")
        said_image = reply.headers.get("content-type", "").lower().startswith(("image/", "application/octet-stream"))
        if said_image and declared.isdigit() and int(declared) > self.limits.max_bytes:  # before any byte is read
            raise Failure("too_large", f"Content-Length {declared} is over max_bytes {self.limits.max_bytes}", status)

    def _check_start(self, head: bytes, reply: httpx.Response) -> None:
        """Once the first bytes are in: an image by its content, and not over the size said."""
        if not _is_image_start(head):
            raise Failure("not_image", _describe(head), reply.status_code)
        declared = reply.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limits.max_bytes:
            detail = f"Content-Length {declared} is over max_bytes {self.limits.max_bytes}"
            raise Failure("too_large", detail, reply.status_code)

    async def _save_body(self, reply: httpx.Response, into: Path) -> bytes:
        size = 0
        with open(into, "wb") as handle:  # each attempt starts the file again
            async for chunk in reply.aiter_bytes():
                size += len(chunk)
                if size > self.limits.max_bytes:
                    raise Failure("too_large", f"over max_bytes {self.limits.max_bytes} while streaming")
                handle.write(chunk)
        return b""

    async def _read_body(self, reply: httpx.Response) -> bytes:
        chunks: list[bytes] = []
        size, sniffed = 0, False
        async for chunk in reply.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if not sniffed and size >= SNIFF_BYTES:
                self._check_start(b"".join(chunks)[:SNIFF_BYTES], reply)
                sniffed = True
            if size > self.limits.max_bytes:
                raise Failure("too_large", f"over max_bytes {self.limits.max_bytes} while streaming", reply.status_code)
        body = b"".join(chunks)
        if not sniffed:
            self._check_start(body[:SNIFF_BYTES], reply)
        return body


def download_file(url: str, path: Path, limits: HttpLimits) -> None:
    """Stream one file (any content) to ``path`` with the same retries, deadlines and caps;
    raises :class:`Failure`. For ``imgclf datasets download``."""

    async def save() -> None:
        async with Downloader(limits) as downloader:
            await downloader.get(url, Attempts(), into=path)

    asyncio.run(save())

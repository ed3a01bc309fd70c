"""A small HTTP/1.1 server on 127.0.0.1 for the fetch tests and benchmark, in a thread of its
own: each path answers as its route says (a body, a status, a redirect, a trickle, a hang, a short
body, a reset), and the server records every request and the most it served at once."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Reply:
    body: bytes = b""
    status: int = 200
    content_type: str = "image/jpeg"
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    content_length: bool = True  # False: no Content-Length, the body ends when the connection closes

    async def respond(self, writer: asyncio.StreamWriter, server: Server) -> bool:
        if self.delay:
            await asyncio.sleep(self.delay)
        headers = {"Content-Type": self.content_type, **self.headers}
        if self.content_length:
            headers["Content-Length"] = str(len(self.body))
        else:
            headers["Connection"] = "close"
        writer.write(_head(self.status, headers) + self.body)
        await writer.drain()
        return self.content_length  # keep the connection open for the next request


@dataclass
class Seq:
    """The n-th request to the path gets the n-th reply (the last one repeats)."""

    replies: list
    served: int = 0

    async def respond(self, writer, server) -> bool:
        reply = self.replies[min(self.served, len(self.replies) - 1)]
        self.served += 1
        return await reply.respond(writer, server)


@dataclass
class Redirect:
    location: str
    status: int = 302

    async def respond(self, writer, server) -> bool:
        writer.write(_head(self.status, {"Location": self.location, "Content-Length": "0"}))
        await writer.drain()
        return True


@dataclass
class Trickle:
    """A 200 with a Content-Length, then one byte every ``interval`` seconds."""

    body: bytes
    interval: float = 0.3

    async def respond(self, writer, server) -> bool:
        writer.write(_head(200, {"Content-Type": "image/jpeg", "Content-Length": str(len(self.body))}))
        for i in range(len(self.body)):
            writer.write(self.body[i : i + 1])
            await writer.drain()
            await asyncio.sleep(self.interval)
        return False


class Hang:
    """Reads the request and never answers."""

    async def respond(self, writer, server) -> bool:
        await asyncio.sleep(3600)
        return False


@dataclass
class Short:
    """Says Content-Length ``declared`` and sends fewer bytes, then closes."""

    body: bytes
    declared: int

    async def respond(self, writer, server) -> bool:
        writer.write(_head(200, {"Content-Type": "image/jpeg", "Content-Length": str(self.declared)}) + self.body)
        await writer.drain()
        return False


class Reset:
    """Closes the connection with a TCP reset, answering nothing."""

    async def respond(self, writer, server) -> bool:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        return False


@dataclass
class Endless:
    """A JPEG-looking body of ``size`` bytes sent in chunks, with or without Content-Length;
    counts what was actually sent."""

    size: int
    content_length: bool = True
    head: bytes = b"\xff\xd8\xff\xe0"
    content_type: str = "image/jpeg"
    sent: int = 0

    async def respond(self, writer, server) -> bool:
        headers = {"Content-Type": self.content_type}
        if self.content_length:
            headers["Content-Length"] = str(self.size)
        writer.write(_head(200, headers) + self.head)
        chunk = b"\0" * 65536
        while self.sent < self.size:
            writer.write(chunk)
            self.sent += len(chunk)
            await writer.drain()
        return False


def _head(status: int, headers: dict) -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Server:
    """``with Server(routes) as s: s.url("/a.jpg")``; unknown paths answer 404."""

    def __init__(self, routes: dict | None = None) -> None:
        self.routes = dict(routes or {})
        self.requests: list[tuple[str, float, dict]] = []
        self.active = 0
        self.max_active = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, path: str) -> int:
        return sum(1 for p, _, _ in self.requests if p == path)

    def __enter__(self) -> Server:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, backlog=512)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopping.wait()
        server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            keep = True
            while keep:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                self.requests.append((path, time.monotonic(), headers))
                self.active += 1
                self.max_active = max(self.max_active, self.active)
                try:
                    keep = await self.routes.get(path, Reply(b"not found", 404, "text/plain")).respond(writer, self)
                finally:
                    self.active -= 1
        except (ConnectionError, asyncio.CancelledError):
            writer.transport.abort()
        finally:
            if not writer.transport.is_closing():
                writer.close()

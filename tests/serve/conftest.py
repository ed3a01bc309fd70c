"""A real service on 127.0.0.1: `imgclf serve` in a child process (the app and its worker), with a
home folder of its own, stopped at the end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx", reason="the service tests need the serve extra: pip install 'imgclf[serve]'")


@dataclass
class Service:
    url: str
    home: Path
    admin: str
    process: subprocess.Popen

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.admin}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(home: Path, env: dict, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(home.parent / f"service-{port}.log", "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "imgclf.cli", "serve", "--home", str(home), "--port", str(port), *extra],
        stdout=log,
        stderr=log,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert process.poll() is None, (home.parent / f"service-{port}.log").read_text()[-3000:]
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("the service did not start in 90 s")


def stop_service(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="session")
def photo_server(clothing):
    """Test photos of clothing-small by URL (``/<label>/<n>.jpg``) on 127.0.0.1, for URL uploads
    and predictions; ``/to-internal`` redirects to another port, which is not allowed."""
    from tests.data.fetch.server import Redirect, Reply, Server

    internal = Server({"/secret.jpg": Reply(b"never")}).__enter__()
    routes = {
        f"/{label}/{n}.jpg": Reply(path.read_bytes())
        for label in ("hat", "pants", "shoes")
        for n, path in enumerate(sorted((clothing / "test" / label).glob("*.jpg"))[:12])
    }
    routes["/to-internal"] = Redirect(internal.url("/secret.jpg"))
    routes["/page"] = Reply(b"<!DOCTYPE html><html>moved</html>", content_type="text/html")
    server = Server(routes).__enter__()
    server.internal = internal
    yield server
    server.__exit__(None, None, None)
    internal.__exit__(None, None, None)


@pytest.fixture(scope="module")
def service(tmp_path_factory, photo_server) -> Service:
    from imgclf.serve import create_key

    root = tmp_path_factory.mktemp("service")
    home = root / "home"
    admin = create_key(home, "admin", "tests")
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(root / "cache")}
    allowed = f"127.0.0.1:{photo_server.port}"  # loopback is refused unless named, as an operator would
    process, url = start_service(home, env, ("--allow-url-uploads", "--url-allow-host", allowed))
    yield Service(url, home, admin, process)
    stop_service(process)


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server of the tests' own on 127.0.0.1 (see tests/serve/postgres.py)."""
    pytest.importorskip("psycopg", reason="the PostgreSQL tests need psycopg: pip install 'imgclf[postgresql]'")
    from tests.serve.postgres import Postgres

    server = Postgres()
    why = server.start()
    if why:
        server.stop()
        pytest.skip(f"no PostgreSQL server for the tests: {why}")
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """A URL to a new, empty database on the tests' server."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    return postgres_server.database(name)

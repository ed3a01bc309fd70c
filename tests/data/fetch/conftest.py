"""Fixtures for the fetch tests: real photos (clothing-small) to serve, a server factory, and a
helper that writes one URL list per class and runs ``imgclf.fetch`` with short deadlines."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgclf import api
from tests.data.fetch.server import Server

FAST = {  # deadlines and backoff short enough for tests; the defaults are for the internet
    "connect_timeout": 1.0,
    "read_timeout": 1.0,
    "url_timeout": 2.0,
    "retries": 2,
    "retry_after_cap": 2.0,
    "concurrency": 8,
}


@pytest.fixture(scope="session")
def photos(clothing) -> list[bytes]:
    """40 real JPEG photos, all different."""
    files = sorted((clothing / "train").glob("*/*.jpg"))[:40]
    return [f.read_bytes() for f in files]


@pytest.fixture
def serve():
    """``serve(routes)`` starts a server that is stopped after the test."""
    servers = []

    def start(routes: dict) -> Server:
        server = Server(routes).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def write_lists(folder: Path, urls_by_label: dict[str, list[str]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for label, urls in urls_by_label.items():
        path = folder / f"{label}.txt"
        path.write_text("\n".join(urls) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def run_fetch(tmp_path: Path, urls_by_label: dict[str, list[str]], name: str = "data", **settings):
    lists = write_lists(tmp_path / f"{name}-lists", urls_by_label)
    events: list = []
    summary = api.fetch(lists, tmp_path / name, {**FAST, **settings}, events=events.append)
    return summary, last_by_url(tmp_path / name), events


def last_by_url(data: Path) -> dict[str, dict]:
    from imgclf.data.fetch.manifest import last_records

    return {r["url"]: r for r in last_records(data / ".imgclf" / "fetch" / "manifest.jsonl").values()}


def kept_files(data: Path) -> list[str]:
    return sorted(
        p.relative_to(data).as_posix()
        for p in data.rglob("*")
        if p.is_file() and ".imgclf" not in p.parts and "_rejected" not in p.parts
    )

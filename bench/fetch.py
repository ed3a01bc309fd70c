"""imgclf fetch on loopback: 2,000 URLs from 4 server ports (1,400 distinct 640x480 JPEGs made
from clothing-small photos, 600 errors: 404, 403 and HTML pages), every picture fully decoded,
hashed and written. The server runs in a process of its own (asyncio, keep-alive, bodies held in
memory); the fetch runs in another, torch-free, whose peak memory is read from the kernel.

  .venv/bin/python bench/fetch.py [--urls 2000] [--ports 4]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from imgclf.core.machine import cpu_model  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"


def pictures(n: int) -> list[bytes]:
    from PIL import Image

    files = sorted(DATA.glob("*/*/*.jpg"))[:n]
    out = []
    for path in files:
        image = Image.open(path).convert("RGB").resize((640, 480))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def serve(n_good: int, n_bad: int, ports: int, ready, stop) -> None:
    from tests.data.fetch.server import Reply, Server

    bodies = pictures(n_good)
    servers = []
    for p in range(ports):
        routes = {f"/{i}.jpg": Reply(body) for i, body in enumerate(bodies) if i % ports == p}
        for i in range(n_bad):
            if i % ports == p:
                kind = ("404", "403", "html")[i % 3]
                routes[f"/bad{i}"] = (
                    Reply(b"<html>moved</html>", content_type="text/html")
                    if kind == "html"
                    else Reply(b"", int(kind), content_type="text/plain")
                )
        servers.append(Server(routes).__enter__())
    ready.put([s.port for s in servers])
    stop.wait()


def fetch(lists: list[str], out: str, result) -> None:
    from imgclf.core.events import StopToken
    from imgclf.core.settings import Settings
    from imgclf.data.fetch import fetch_urls

    started = time.perf_counter()
    summary = fetch_urls(lists, out, Settings(), lambda event: None, StopToken())
    elapsed = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    result.put({"elapsed": elapsed, "rss": rss, "by_outcome": summary.by_outcome,
                "user": cpu.ru_utime, "sys": cpu.ru_stime, "imgclf_modules": "torch" in sys.modules})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--urls", type=int, default=2000)
    parser.add_argument("--ports", type=int, default=4)
    args = parser.parse_args()
    n_good, n_bad = args.urls * 7 // 10, args.urls - args.urls * 7 // 10
    print(f"CPU: {cpu_model()}; {os.cpu_count()} cores; server process on the same machine", flush=True)
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=serve, args=(n_good, n_bad, args.ports, ready, stop), daemon=True)
    server.start()
    ports = ready.get(timeout=300)
    with tempfile.TemporaryDirectory() as tmp:
        lists = []
        for label in range(10):
            urls = [f"http://127.0.0.1:{ports[i % len(ports)]}/{i}.jpg" for i in range(n_good) if i % 10 == label]
            urls += [f"http://127.0.0.1:{ports[i % len(ports)]}/bad{i}" for i in range(n_bad) if i % 10 == label]
            path = Path(tmp) / f"class{label}.txt"
            path.write_text("\n".join(urls) + "\n")
            lists.append(str(path))
        result = ctx.Queue()
        child = ctx.Process(target=fetch, args=(lists, str(Path(tmp) / "data"), result))
        child.start()
        numbers = result.get(timeout=1200)
        child.join()
        written = sum(1 for p in (Path(tmp) / "data").rglob("*.jpg"))
    stop.set()
    server.join(10)
    rate = args.urls / numbers["elapsed"]
    print(json.dumps(numbers["by_outcome"]))
    print(
        f"{args.urls} URLs ({n_good} pictures, {n_bad} errors) from {args.ports} ports in {numbers['elapsed']:.1f} s: "
        f"{rate:.0f} URLs/s; {written} files written; peak RSS of the fetch process {numbers['rss'] / 2**20:.0f} MiB; "
        f"CPU user {numbers['user']:.1f} s, system {numbers['sys']:.1f} s; torch imported: {numbers['imgclf_modules']}"
    )


if __name__ == "__main__":
    main()

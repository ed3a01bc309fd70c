"""A throwaway PostgreSQL server on 127.0.0.1 for the tests: Debian's server binaries (installed with
apt when missing and this is root), a cluster in a temporary folder, trust authentication on
loopback only, stopped at the end. Tests that need it skip, saying why, only where it cannot be
installed."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _binaries() -> Path | None:
    found = shutil.which("initdb")
    if found and Path(found).resolve().with_name("postgres").exists():
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def _install() -> str:
    """Install Debian's server; returns why it could not be, or ''."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "PostgreSQL's server is not installed (apt-get install postgresql) and this is not root with apt"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "postgresql"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0 and command[1] == "install":
            return f"apt-get install postgresql failed: {done.stderr.strip()[-300:]}"
    return ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Postgres:
    """``start()`` then ``database(name)`` for a URL to a fresh database; ``stop()``."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="imgclf-pg-"))
        self.port = _free_port()
        self.process: subprocess.Popen | None = None

    @staticmethod
    def _owner() -> dict:
        # initdb and postgres refuse to run as root: run them as Debian's postgres user
        return {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}

    def start(self) -> str:
        """Returns why it could not start, or ''."""
        binaries = _binaries()
        if binaries is None:
            why = _install()
            binaries = _binaries()
            if binaries is None:
                return why or "PostgreSQL's server binaries were not found after installing"
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        data = self.folder / "data"
        initdb = [str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "imgclf", "--no-sync", "-E", "UTF8"]
        done = subprocess.run(initdb, capture_output=True, text=True, timeout=120, **self._owner())
        if done.returncode != 0:
            return f"initdb failed: {done.stderr.strip()[-300:]}"
        server = [str(binaries / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(self.folder)]
        server += ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"]
        log = open(self.folder / "server.log", "ab")
        self.process = subprocess.Popen(server, stdout=log, stderr=log, **self._owner())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"postgres exited: {(self.folder / 'server.log').read_text()[-300:]}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return ""
            except OSError:
                time.sleep(0.2)
        return "postgres did not start in 60 s"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://imgclf@127.0.0.1:{self.port}/{database}"

    def database(self, name: str) -> str:
        """A new, empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: postgres's smart shutdown
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)

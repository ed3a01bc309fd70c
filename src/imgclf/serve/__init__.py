"""``imgclf serve``: the self-hosted service. The app (:func:`imgclf.serve.app.create_app`)
answers HTTP on one process; a worker process (:mod:`imgclf.serve.worker`) runs the trainings.
Both share the home folder and the database (SQLite in the home folder, or a PostgreSQL server
that several API and worker machines share: ``--db``). It listens on 127.0.0.1 unless told
otherwise, and refuses another address while no API key exists."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import threading
from pathlib import Path

from imgclf.core.errors import SettingsError
from imgclf.serve.http import Limits
from imgclf.serve.store import Home, Store
from imgclf.serve.worker import TRAIN_THREADS_ENV


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_key(home: str | Path, scope: str, name: str = "", database: str | None = None) -> str:
    try:
        return Store(Home(home), database).create_key(scope, name)
    except ValueError as exc:
        raise SettingsError(f"--scope: {exc}") from None


def run_service(
    home: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    worker: bool = True,
    limits: Limits | None = None,
    database: str | None = None,
    train_threads: int = 0,
) -> None:
    """Serve until SIGINT/SIGTERM: uvicorn in this process, the worker beside it (unless
    ``worker`` is False: an API machine whose trainings run on ``imgclf worker`` machines). On
    shutdown uvicorn finishes the requests in flight and the worker hands its running job back to
    the queue (the next start resumes it)."""
    import uvicorn

    from imgclf.serve.app import create_app
    from imgclf.serve.server import DrainingServer

    home = Home(home)
    store = Store(home, database)  # made here, so that a bad --db is one line before anything starts
    if not is_loopback(host) and not store.has_keys():
        raise SettingsError(
            f"--host {host}: refusing to listen beyond this machine while no API key exists; "
            f"make one first: imgclf serve keys create --home {home.path} --scope admin"
        )
    supervisor = _Supervisor(home, database, train_threads) if worker else None
    app = create_app(home.path, limits, database)
    app.state.expects_worker = worker
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_keep_alive=5, timeout_graceful_shutdown=30
    )
    try:
        DrainingServer(config, app.state).run()
    finally:
        if supervisor is not None:
            supervisor.stop()


class _Supervisor:
    """Keeps one worker process running beside the app: a worker that dies (a crash, kill -9) is
    started again, and the new one takes back the job the dead one held."""

    def __init__(self, home: Home, database: str | None, train_threads: int = 0):
        self.home, self.database, self.stopping = home, database, threading.Event()
        self.env = {**os.environ, TRAIN_THREADS_ENV: str(train_threads)} if train_threads else None
        self.child = self._start()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _start(self) -> subprocess.Popen:
        database = [self.database] if self.database else []
        return subprocess.Popen(
            [sys.executable, "-m", "imgclf.serve.worker", str(self.home.path), *database], env=self.env
        )

    def _watch(self) -> None:
        while not self.stopping.wait(1.0):
            if self.child.poll() is not None:
                self.child = self._start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.child.terminate()
        try:
            self.child.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.child.kill()

"""The service's state in one SQLite database (WAL): API keys, models and their categories,
images, training jobs and model versions. The files themselves live beside it in the home folder
(:class:`Home`): uploads under server-made content-addressed names, each version an ordinary
imgclf run folder.

The rows are in SQLite by default, or in a PostgreSQL server shared by several API and worker
machines (:mod:`imgclf.serve.database`). Keys are stored only as an HMAC under a secret kept in the
home folder, and a presented key is compared with every stored one in constant time. Jobs are
claimed atomically with a lease that a worker renews; a job whose lease ran out (its worker died)
is claimed again. One job of a model runs at a time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
import uuid
from pathlib import Path

from imgclf.serve.database import Database, open_database

SCOPES = ("predict", "train", "admin")  # each includes the ones before it
LEASE_S = 30.0
MAX_ATTEMPTS = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, digest TEXT NOT NULL, scope TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '', created DOUBLE PRECISION NOT NULL, revoked DOUBLE PRECISION);
CREATE TABLE IF NOT EXISTS models (id TEXT PRIMARY KEY, name TEXT NOT NULL, created DOUBLE PRECISION NOT NULL,
    active_version INTEGER);
CREATE TABLE IF NOT EXISTS categories (id TEXT PRIMARY KEY, model_id TEXT NOT NULL, name TEXT NOT NULL,
    UNIQUE (model_id, name));
CREATE TABLE IF NOT EXISTS images (id TEXT PRIMARY KEY, model_id TEXT NOT NULL, category_id TEXT NOT NULL,
    sha256 TEXT NOT NULL, size INTEGER NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL,
    file TEXT NOT NULL, original_name TEXT NOT NULL DEFAULT '', created DOUBLE PRECISION NOT NULL,
    UNIQUE (model_id, sha256));
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, model_id TEXT NOT NULL, state TEXT NOT NULL,
    settings TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL,
    lease_until DOUBLE PRECISION, worker TEXT, cancel INTEGER NOT NULL DEFAULT 0, idempotency_key TEXT,
    version INTEGER, error_code TEXT, error_message TEXT, created DOUBLE PRECISION NOT NULL,
    started DOUBLE PRECISION, finished DOUBLE PRECISION,
    UNIQUE (model_id, idempotency_key));
CREATE TABLE IF NOT EXISTS versions (model_id TEXT NOT NULL, number INTEGER NOT NULL, job_id TEXT NOT NULL,
    state TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, metrics TEXT, PRIMARY KEY (model_id, number));
CREATE TABLE IF NOT EXISTS workers (name TEXT PRIMARY KEY, seen DOUBLE PRECISION NOT NULL, job_id TEXT);
"""


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


class Home:
    """The service's folder: the database, the key secret, uploads, run folders and job logs."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        for sub in ("uploads", "models", "jobs"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    @property
    def database(self) -> Path:
        return self.path / "imgclf.db"

    def secret(self) -> bytes:
        """The HMAC key for API keys, made on first use, readable by this user only."""
        path = self.path / "secret"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(32))
        return path.read_bytes()

    def upload_path(self, sha256: str, extension: str) -> Path:
        """Where an upload lives: named by its content, never by the name it came with."""
        return self.path / "uploads" / sha256[:2] / f"{sha256}{extension}"

    def version_dir(self, model_id: str, number: int) -> Path:
        return self.path / "models" / model_id / f"v{number}"

    def job_dir(self, job_id: str) -> Path:
        return self.path / "jobs" / job_id


class Store:
    """Rows of the service's database; every write is one transaction."""

    def __init__(self, home: Home, database: str | None = None):
        self.home = home
        self.db: Database = open_database(home.database, database)
        if self.db.dialect == "postgresql":  # API and worker machines may start at once
            self.execute("SELECT pg_advisory_lock(7460127)")
            try:
                self.db.script(SCHEMA)
            finally:
                self.execute("SELECT pg_advisory_unlock(7460127)")
        else:
            self.db.script(SCHEMA)

    def query(self, sql: str, *args) -> list[dict]:
        return self.db.query(sql, *args)

    def one(self, sql: str, *args) -> dict | None:
        rows = self.query(sql, *args)
        return rows[0] if rows else None

    def execute(self, sql: str, *args) -> int:
        return self.db.execute(sql, *args)

    # keys ---------------------------------------------------------------------------------
    def _digest(self, key: str) -> str:
        return hmac.new(self.home.secret(), key.encode(), hashlib.sha256).hexdigest()

    def create_key(self, scope: str, name: str = "") -> str:
        """A new key, returned once: only its HMAC is stored."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        key = "imgclf_" + secrets.token_urlsafe(32)
        self.execute(
            "INSERT INTO keys VALUES (?, ?, ?, ?, ?, NULL)", new_id("key"), self._digest(key), scope, name, time.time()
        )
        return key

    def key_scope(self, key: str) -> str | None:
        """The scope of a presented key, or None. Compared with every live key in constant time."""
        presented, found = self._digest(key or ""), None
        for row in self.query("SELECT digest, scope FROM keys WHERE revoked IS NULL"):
            if hmac.compare_digest(presented, row["digest"]):
                found = row["scope"]
        return found

    def has_keys(self) -> bool:
        return bool(self.one("SELECT 1 AS x FROM keys WHERE revoked IS NULL"))

    def revoke_keys(self, scope: str | None = None) -> int:
        if scope is None:
            return self.execute("UPDATE keys SET revoked = ? WHERE revoked IS NULL", time.time())
        return self.execute("UPDATE keys SET revoked = ? WHERE revoked IS NULL AND scope = ?", time.time(), scope)

    # jobs ---------------------------------------------------------------------------------
    def add_job(self, model_id: str, settings: dict, idempotency_key: str | None) -> tuple[dict, bool]:
        """A queued job, or the one already made with this idempotency key; and whether it is new."""
        if idempotency_key:
            existing = self.one(
                "SELECT * FROM jobs WHERE model_id = ? AND idempotency_key = ?", model_id, idempotency_key
            )
            if existing:
                return existing, False
        job_id = new_id("job")
        self.execute(
            "INSERT INTO jobs (id, model_id, state, settings, max_attempts, idempotency_key, created) "
            "VALUES (?, ?, 'queued', ?, ?, ?, ?)",
            job_id,
            model_id,
            json.dumps(settings),
            MAX_ATTEMPTS,
            idempotency_key,
            time.time(),
        )
        return self.one("SELECT * FROM jobs WHERE id = ?", job_id), True

    def claim_job(self, worker: str, lease_s: float = LEASE_S) -> dict | None:
        """Atomically take the oldest queued job, or one whose worker's lease ran out, of a model
        with no other job running. On PostgreSQL the candidate row is locked and rows that other
        workers hold locked are skipped, so each job goes to one worker."""
        now = time.time()
        lock = " FOR UPDATE SKIP LOCKED" if self.db.dialect == "postgresql" else ""
        return self.one(
            "UPDATE jobs SET state = 'running', attempt = attempt + 1, lease_until = ?, worker = ?, "
            "started = COALESCE(started, ?) WHERE id = (SELECT id FROM jobs j WHERE (j.state = 'queued' OR "
            "(j.state = 'running' AND j.lease_until < ?)) AND NOT EXISTS (SELECT 1 FROM jobs o WHERE "
            "o.model_id = j.model_id AND o.id <> j.id AND o.state = 'running' AND o.lease_until >= ?) "
            f"ORDER BY j.created LIMIT 1{lock}) RETURNING *",
            now + lease_s,
            worker,
            now,
            now,
            now,
        )

    def renew_lease(self, job_id: str, worker: str, lease_s: float = LEASE_S) -> bool:
        """Extend the lease; False when the job is no longer this worker's (it was taken over)."""
        return bool(
            self.execute(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND worker = ? AND state = 'running'",
                time.time() + lease_s,
                job_id,
                worker,
            )
        )

    def finish_job(
        self, job_id: str, state: str, code: str | None = None, message: str | None = None, version: int | None = None
    ) -> None:
        self.execute(
            "UPDATE jobs SET state = ?, error_code = ?, error_message = ?, version = COALESCE(?, version), "
            "finished = ?, lease_until = NULL WHERE id = ?",
            state,
            code,
            message,
            version,
            time.time(),
            job_id,
        )

    # workers' heartbeats (for /readyz) ------------------------------------------------------
    def beat(self, worker: str, job_id: str | None) -> None:
        self.execute(
            "INSERT INTO workers VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET seen = excluded.seen, "
            "job_id = excluded.job_id",
            worker,
            time.time(),
            job_id,
        )

    def forget_worker(self, worker: str) -> None:
        self.execute("DELETE FROM workers WHERE name = ?", worker)

    def forget_dead_workers(self, host: str, alive) -> None:
        """Drop the heartbeats of this host's workers that are gone (killed, so they could not)."""
        for row in self.query("SELECT name FROM workers"):
            if _gone(row["name"], host, alive):
                self.forget_worker(row["name"])

    def live_workers(self, within_s: float = LEASE_S) -> list[dict]:
        return self.query("SELECT * FROM workers WHERE seen >= ? ORDER BY name", time.time() - within_s)

    def requeue_orphans(self, host: str, alive) -> int:
        """Hand back to the queue the running jobs of this host's workers that are gone (a crash or
        kill -9), at once rather than when their lease runs out."""
        orphans = [
            row["id"]
            for row in self.query("SELECT id, worker FROM jobs WHERE state = 'running'")
            if _gone(row["worker"], host, alive)
        ]
        for job_id in orphans:
            self.requeue_job(job_id)
        return len(orphans)

    def requeue_job(self, job_id: str) -> None:
        self.execute("UPDATE jobs SET state = 'queued', lease_until = NULL, worker = NULL WHERE id = ?", job_id)


def _gone(worker: str | None, host: str, alive) -> bool:
    """Whether ``worker`` (``host-pid``, as the worker names itself) ran on ``host`` and its
    process is no longer alive."""
    name, _, pid = (worker or "").rpartition("-")
    return name == host and pid.isdigit() and not alive(int(pid))

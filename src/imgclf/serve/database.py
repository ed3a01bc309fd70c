"""Where the service's rows live: one interface, two backends, run through the same tests.

- :class:`SqliteDatabase`, the default: one file in the home folder (WAL), no server. One API
  process and its worker on one machine.
- :class:`PostgresDatabase`: a PostgreSQL server (``--db postgresql://…``) that several API and
  worker machines share, with the home folder (uploads and run folders) on storage they share too.
  Jobs are claimed with ``FOR UPDATE SKIP LOCKED``, so two workers never take the same one.

Both take SQL written with ``?`` placeholders in the subset the two dialects share; the few places
that differ (the claim, the schema's types) ask :attr:`Database.dialect`. Every statement is its
own transaction (autocommit); each thread has its own connection.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from imgclf.core.errors import ImgclfError, SettingsError


class DatabaseError(ImgclfError):
    """The database could not be reached or refused a statement (either backend)."""

    code = "database_unavailable"


class Database:
    """Rows as dicts from SQL with ``?`` placeholders; one connection per thread."""

    dialect = ""

    def __init__(self) -> None:
        self._local = threading.local()

    def _connect(self) -> Any:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql

    def connection(self) -> Any:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    def _run(self, sql: str, args: tuple):
        try:
            return self.connection().execute(self._sql(sql), args)
        except self.errors as exc:
            self._local.db = None  # a broken connection is made again on the next statement
            raise DatabaseError(f"{self.dialect}: {exc}") from exc

    def query(self, sql: str, *args) -> list[dict]:
        return [dict(row) for row in self._run(sql, args).fetchall()]

    def execute(self, sql: str, *args) -> int:
        return self._run(sql, args).rowcount

    def script(self, statements: str) -> None:
        for statement in statements.split(";"):
            if statement.strip():
                self._run(statement, ())

    def describe(self) -> str:
        raise NotImplementedError


class SqliteDatabase(Database):
    dialect = "sqlite"
    errors = (sqlite3.Error,)

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=30000")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    def describe(self) -> str:
        return str(self.path)


class PostgresDatabase(Database):
    dialect = "postgresql"

    def __init__(self, url: str):
        super().__init__()
        try:
            import psycopg
        except ImportError:
            raise SettingsError(
                "--db: a PostgreSQL database needs psycopg; install it with: pip install 'imgclf[postgresql]'"
            ) from None
        self.url, self._psycopg = url, psycopg
        self.errors = (psycopg.Error,)

    def _connect(self):
        from psycopg.rows import dict_row

        try:
            return self._psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=10)
        except self._psycopg.Error as exc:
            raise DatabaseError(f"--db {self.describe()}: cannot connect ({str(exc).strip()})") from exc

    def _sql(self, sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def describe(self) -> str:
        """The URL without its password (passwords belong in PGPASSWORD or ~/.pgpass)."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()


def open_database(home_database: Path, url: str | None) -> Database:
    """The SQLite file in the home folder, or the PostgreSQL server that ``url`` names."""
    if not url:
        return SqliteDatabase(home_database)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url)
    if url.startswith("sqlite:///"):
        return SqliteDatabase(Path(url.removeprefix("sqlite:///")))
    raise SettingsError(f"--db {url}: expected postgresql://USER@HOST/DATABASE or sqlite:///PATH")

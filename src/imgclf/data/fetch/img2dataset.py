"""Hand-over from img2dataset (the tool for 100M-URL crawls on Spark or many machines): its
output folder (per shard ``NNNNN.parquet`` with a label column carried through
``--save_additional_columns``, and the pictures in ``NNNNN/<key>.jpg`` or ``NNNNN.tar``) becomes
the same class folders and manifest as ``imgclf fetch``, every picture checked the same way."""

from __future__ import annotations

import asyncio
import tarfile
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from imgclf.core.errors import DataError
from imgclf.core.events import Events, StopToken
from imgclf.core.settings import Settings
from imgclf.data.fetch.checks import Placeholders
from imgclf.data.fetch.inputs import Row, normalise_url
from imgclf.data.fetch.labels import folder_map
from imgclf.data.fetch.outcomes import Record
from imgclf.data.fetch.run import FetchJob
from imgclf.data.fetch.summary import FetchSummary

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class Shards:
    """The pictures of an img2dataset output by (parquet name, key), from folders or tars."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tars: dict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}
        self._lock = threading.Lock()

    def read(self, shard: str, key: str) -> bytes | None:
        for ext in IMAGE_EXTS:
            path = self.root / shard / f"{key}.{ext}"
            if path.is_file():
                return path.read_bytes()
        tar_path = self.root / f"{shard}.tar"
        if not tar_path.is_file():
            return None
        with self._lock:  # one TarFile is read by two threads
            if shard not in self._tars:
                archive = tarfile.open(tar_path)
                members = {}
                for member in archive.getmembers():
                    stem, _, ext = member.name.rpartition(".")
                    if member.isfile() and ext.lower() in IMAGE_EXTS:
                        members[stem] = member
                self._tars[shard] = (archive, members)
            archive, members = self._tars[shard]
            member = members.get(key)
            return archive.extractfile(member).read() if member else None

    def close(self) -> None:
        for archive, _ in self._tars.values():
            archive.close()


def read_rows(root: Path, label_column: str) -> tuple[list[Row], dict[str, tuple[str, str, str]]]:
    """A row per parquet line, and for each row (shard, key, img2dataset's status or error)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("--from-img2dataset reads parquet: pip install 'imgclf[img2dataset]' (pyarrow)") from None
    parquets = sorted(root.glob("*.parquet"))
    if not parquets:
        raise DataError(f"{root}: no *.parquet files; is this an img2dataset output folder?")
    rows, where = [], {}
    for parquet in parquets:
        table = pq.read_table(parquet).to_pylist()
        if table and label_column not in table[0]:
            raise DataError(
                f"{parquet}: no '{label_column}' column; run img2dataset with "
                f"--save_additional_columns '[\"{label_column}\"]' or name the column with --label-column"
            )
        for line in table:
            url, error = normalise_url(str(line.get("url") or ""))
            source = f"{parquet.name}:{line.get('key')}"
            rows.append(Row(url, str(line.get(label_column) or ""), source, error if error else ""))
            status = line.get("status") or ""
            detail = "" if status == "success" else f"img2dataset: {status} ({line.get('error_message') or ''})"
            where[source] = (parquet.stem, str(line.get("key")), detail)
    return rows, where


class Img2datasetJob(FetchJob):
    def __init__(self, root: Path, rows, where, *args) -> None:
        super().__init__(rows, *args)
        self.shards, self.where = Shards(root), where

    @asynccontextmanager
    async def _source(self):
        try:
            yield self.shards
        finally:
            self.shards.close()

    async def _one(self, shards: Shards, row: Row, pool) -> Record:
        shard, key, failed = self.where[row.source]
        if failed:
            return Record(row.url, row.label, row.source, "import_failed", error=failed)
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(pool, shards.read, shard, key)
        if body is None:
            return Record(row.url, row.label, row.source, "import_failed", error=f"no picture for key {key} in {shard}")
        record = await loop.run_in_executor(pool, self._check_and_store, row, body)
        record.final_url = row.url
        return record


def import_img2dataset(
    root, out, settings: Settings, events: Events, stop: StopToken, *, label_column: str = "label", placeholders=()
) -> FetchSummary:
    root = Path(root)
    rows, where = read_rows(root, label_column)
    folder_map([r.label for r in rows if not r.error])
    job = Img2datasetJob(root, rows, where, out, settings, Placeholders(list(placeholders)), events, stop)
    return job.run()

"""The fetch manifest: ``DATA_DIR/.imgclf/fetch/manifest.jsonl``, append-only, one JSON record
per line; the last record of an input row is its outcome. A line cut short by a kill is dropped
when the file is next opened, so the next record starts on a line of its own."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from imgclf.data.fetch.outcomes import Record


class Manifest:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.last: dict[str, Record] = {}  # source -> its last record
        self._repair_and_read()
        self._handle = open(path, "a", encoding="utf-8")

    def _repair_and_read(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        keep = raw[: raw.rfind(b"\n") + 1]
        if len(keep) != len(raw):  # a line cut short by a kill: drop it
            with open(self.path, "r+b") as handle:
                handle.truncate(len(keep))
        for line in keep.decode("utf-8").splitlines():
            if line.strip():
                record = Record.from_dict(json.loads(line))
                self.last[record.source] = record

    def append(self, record: Record) -> None:
        data = record.to_dict()
        data["time"] = round(time.time(), 3)
        self._handle.write(json.dumps(data, ensure_ascii=False) + "\n")
        self._handle.flush()
        self.last[record.source] = record

    def sync(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def read_manifest(path: str | Path) -> list[dict]:
    """Every record of a manifest, in the order written."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def last_records(path: str | Path) -> dict[str, dict]:
    """source -> the last record of that input row."""
    last: dict[str, dict] = {}
    for record in read_manifest(path):
        last[record["source"]] = record
    return last

"""Files of a fetched data folder: ``DATA_DIR/<folder>/<sha256 prefix>.<ext>``, written
atomically (a ``.part`` file renamed into place), rejected ones under ``_rejected/<reason>/``, and
the bookkeeping under ``.imgclf/fetch/``."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

from imgclf.core.atomic import atomic_write

NAME = re.compile(r"^[0-9a-f]{16}\.(jpg|png|gif|webp|bmp|tif|bin)$")
PART_SUFFIX = ".part"


class FetchStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.meta = self.root / ".imgclf" / "fetch"

    @property
    def manifest_path(self) -> Path:
        return self.meta / "manifest.jsonl"

    def relative(self, folder: str, sha256: str, ext: str) -> str:
        return f"{folder}/{sha256[:16]}.{ext}"

    def write(self, relative: str, data: bytes) -> None:
        """Write once: the same content at the same name is already there."""
        target = self.root / relative
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}{PART_SUFFIX}")
        with open(part, "wb") as handle:
            handle.write(data)
        try:
            os.replace(part, target)
        except OSError:
            part.unlink(missing_ok=True)
            raise

    def reject(self, outcome: str, sha256: str, ext: str, data: bytes) -> str:
        relative = f"_rejected/{outcome}/{sha256[:16]}.{ext}"
        self.write(relative, data)
        return relative

    def remove(self, relative: str, keep_as: str = "") -> None:
        """Take a file out of its class folder (into ``_rejected/keep_as/`` when asked)."""
        source = self.root / relative
        if not source.exists():
            return
        if keep_as:
            target = self.root / "_rejected" / keep_as / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        else:
            source.unlink()

    def clean_partial(self) -> int:
        """Remove the ``.part`` files a killed run left; returns how many."""
        removed = 0
        if not self.root.exists():
            return 0
        for part in self.root.glob(f"*/.*{PART_SUFFIX}"):
            part.unlink(missing_ok=True)
            removed += 1
        for part in self.root.glob(f"_rejected/*/.*{PART_SUFFIX}"):
            part.unlink(missing_ok=True)
            removed += 1
        return removed

    def sweep(self, folders: list[str], kept: set[str]) -> int:
        """Remove files of ours (by name) in class folders that no record keeps: written by a run
        killed before it could record them, and whose URL then ended otherwise."""
        removed = 0
        for folder in folders:
            directory = self.root / folder
            if not directory.is_dir():
                continue
            for path in directory.iterdir():
                if NAME.match(path.name) and f"{folder}/{path.name}" not in kept:
                    path.unlink()
                    removed += 1
        return removed

    def write_labels(self, folders: dict[str, str]) -> None:
        """folder -> label, for reading the original labels back."""
        self.write_json("labels.json", {folder: label for label, folder in sorted(folders.items())})

    def write_json(self, name: str, data: dict) -> None:
        self.meta.mkdir(parents=True, exist_ok=True)
        text = json.dumps(data, indent=2, ensure_ascii=False)
        atomic_write(self.meta / name, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def read_json(self, name: str) -> dict:
        return json.loads((self.meta / name).read_text())

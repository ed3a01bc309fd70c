"""What every data source gives: labelled samples, and a reader for each sample's bytes.

A source (class folders, split folders, a CSV manifest, IDX files; URL lists and shards next)
lists :class:`Sample` records. A sample says which reader opens it (``kind``): a plain file, or
a member of a container file (an image inside an IDX file). Audit, datasets, split and the
reports go through :mod:`imgclf.data.sources` and never ask which source they read.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from PIL import Image

from imgclf.core.errors import DataError
from imgclf.core.meta import LEVEL_SEP
from imgclf.data.images import decode_image_bytes, read_file

SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}

__all__ = [
    "LEVEL_SEP",
    "SPLIT_NAMES",
    "Sample",
    "ScanResult",
    "Reader",
    "FileReader",
    "Source",
    "refuse_case_collisions",
]


@dataclass(frozen=True)
class Sample:
    """One labelled image. ``member`` names it inside a container file (an IDX image's index);
    ``kind`` is the reader that opens it."""

    path: str
    label: str
    split: str | None = None
    rel: str = ""  # path relative to the data root: stable name used for splitting and reports
    member: str = ""
    kind: str = "file"

    @property
    def name(self) -> str:
        """The stable name: relative path (``#member`` inside a container). Splits hash it."""
        base = self.rel or self.path
        return f"{base}#{self.member}" if self.member else base

    @property
    def ref(self) -> str:
        """Where a person finds it: the file path (``#member`` inside a container)."""
        return f"{self.path}#{self.member}" if self.member else self.path


@dataclass
class ScanResult:
    root: str
    kind: str  # the source's registry name: "folders", "split-folders", "csv", "idx"
    samples: list[Sample]
    skipped: list[dict] = field(default_factory=list)  # [{"path", "reason"}] found while scanning
    ignored_files: int = 0  # files whose names are not image names (README.txt, ...)

    @property
    def classes(self) -> list[str]:
        return sorted({s.label for s in self.samples})


class Reader:
    """How the samples of one ``kind`` are read: their bytes (what content hashes are of), the
    decoded picture, and a cheap stamp that changes when the bytes do (for caches)."""

    kind: ClassVar[str]
    # sources whose images are small by design (MNIST's 28 px) are not held to ``min_side``
    small_by_design: ClassVar[bool] = False

    def read(self, sample: Sample) -> bytes:
        raise NotImplementedError

    def decode(
        self, sample: Sample, data: bytes, draft_size: int | None, max_pixels: int
    ) -> tuple[Image.Image, tuple[int, int]]:
        raise NotImplementedError

    def stamp(self, sample: Sample) -> str | None:
        try:
            stat = os.stat(sample.path)
        except OSError:
            return None
        return f"{os.path.abspath(sample.path)}#{sample.member}|{stat.st_size}|{stat.st_mtime_ns}"


class FileReader(Reader):
    """One image per file, decoded by the one image loader."""

    kind = "file"

    def read(self, sample: Sample) -> bytes:
        return read_file(sample.path)

    def decode(
        self, sample: Sample, data: bytes, draft_size: int | None, max_pixels: int
    ) -> tuple[Image.Image, tuple[int, int]]:
        return decode_image_bytes(data, sample.path, draft_size=draft_size, max_pixels=max_pixels, with_size=True)


class Source:
    """A kind of data source: recognises its input and lists its samples."""

    kind: ClassVar[str]

    @classmethod
    def detect(cls, path: Path) -> bool:
        raise NotImplementedError

    @classmethod
    def scan(cls, path: Path) -> ScanResult:
        raise NotImplementedError


def refuse_case_collisions(labels: Iterable[tuple[str, str]], source: str) -> None:
    """Raise DataError when two labels, or two of their hierarchy levels (``Men > Shoes`` and
    ``men > Boots``), differ only in case, as ``imgclf fetch`` does: they would be one folder on
    macOS and Windows, and one class to whoever reads the results. ``labels`` is ``(label,
    where)`` pairs, ``where`` saying where a person finds it (``line 4``, a folder)."""
    seen: dict[str, tuple[str, str]] = {}  # folded level path -> (level path, where it was first seen)
    done: set[str] = set()
    for label, where in labels:
        if label in done:  # a CSV repeats its labels on every row: check each once
            continue
        done.add(label)
        levels = label.split(LEVEL_SEP)
        for depth in range(1, len(levels) + 1):
            level = LEVEL_SEP.join(levels[:depth])
            here = where if depth == len(levels) else f"{where}, in {label!r}"
            # NFC as well as case: "é" typed two ways is one name on macOS too
            key = unicodedata.normalize("NFC", level).casefold()
            other, there = seen.setdefault(key, (level, here))
            if other != level:
                raise DataError(
                    f"{source}: labels {other!r} and {level!r} differ only in case ({there}; {here}): they would "
                    "be one folder on macOS and Windows; rename one of them"
                )

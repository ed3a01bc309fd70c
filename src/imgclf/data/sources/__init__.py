"""The data sources, behind one registry: list the labelled samples of what the user has, and
read any sample's bytes or picture whatever source it came from.

To add a source: a :class:`~imgclf.data.sources.base.Source` subclass (``detect`` and ``scan``)
in :data:`SOURCES`, and, when its samples are not plain files, a
:class:`~imgclf.data.sources.base.Reader` in :data:`READERS`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from PIL import Image

from imgclf.core.errors import DataError
from imgclf.data.images import DEFAULT_MAX_PIXELS
from imgclf.data.sources.base import LEVEL_SEP, FileReader, Reader, Sample, ScanResult, Source
from imgclf.data.sources.folders import FoldersSource, SplitFoldersSource
from imgclf.data.sources.idx import IdxReader, IdxSource
from imgclf.data.sources.manifest import CsvSource
from imgclf.data.sources.shards import ShardReader, ShardsSource

__all__ = [
    "LEVEL_SEP",
    "Sample",
    "ScanResult",
    "SOURCES",
    "READERS",
    "scan",
    "reader",
    "read_sample",
    "decode_sample",
    "open_sample",
]

# Tried in this order: the most specific first (imgclf shards, a folder of IDX files, split folders,
# class folders: a shard folder is a folder too, so it must be recognised before class folders).
SOURCES: tuple[type[Source], ...] = (CsvSource, ShardsSource, IdxSource, SplitFoldersSource, FoldersSource)
READERS: dict[str, Reader] = {r.kind: r for r in (FileReader(), IdxReader(), ShardReader())}


def scan(source: str | os.PathLike, allow_outside: bool = False) -> ScanResult:
    """Recognise the kind of data source and list its labelled images. A CSV's rows that point
    outside the CSV's folder (``../../etc/passwd``, an absolute path) are refused unless
    ``allow_outside``: a manifest someone sent must not make imgclf read what it likes."""
    root = Path(source)
    if not root.exists():
        raise DataError(f"{root}: no such file or folder")
    kind = next((s for s in SOURCES if s.detect(root)), None)
    if kind is None:
        raise DataError(f"{root}: expected a folder of class folders, a .csv manifest or IDX files")
    result = kind.scan(root)
    if kind is CsvSource and not allow_outside:
        result = _refuse_outside(result, root.parent)
    if not result.samples:
        raise DataError(f"{root}: no labelled images found (expected class folders, a CSV or IDX files)")
    return result


def _refuse_outside(result: ScanResult, base: Path) -> ScanResult:
    inside, refused = [], list(result.skipped)
    top = base.resolve()
    for sample in result.samples:
        target = Path(os.path.abspath(sample.path))
        if target == top or top in target.parents:
            inside.append(sample)
        else:
            reason = "outside the CSV's folder (set allow_outside / --allow-outside to read it)"
            refused.append({"path": sample.rel or sample.path, "reason": reason})
    return dataclasses.replace(result, samples=inside, skipped=refused)


def reader(sample: Sample) -> Reader:
    try:
        return READERS[sample.kind]
    except KeyError:
        raise DataError(f"{sample.ref}: no reader for samples of kind '{sample.kind}'") from None


def read_sample(sample: Sample) -> bytes:
    """The sample's bytes (what its content hash is of). Raises ImageError."""
    return reader(sample).read(sample)


def decode_sample(
    sample: Sample, data: bytes, draft_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, tuple[int, int]]:
    """The RGB picture of bytes read from ``sample``, and its stored size. Raises ImageError."""
    return reader(sample).decode(sample, data, draft_size, max_pixels)


def open_sample(sample: Sample, draft_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and decode a sample to RGB in one call. Raises ImageError."""
    return decode_sample(sample, read_sample(sample), draft_size, max_pixels)[0]

"""A folder written by ``imgclf shard``: uncompressed POSIX tar shards in WebDataset layout
(``<key>.<ext>``, ``<key>.cls``, ``<key>.json`` per photo), a byte-offset index beside each shard,
``classes.json`` and timm's ``_info.json``. See docs/shards.md.

Scanning reads the indexes only, never a shard's photos. A sample's ``name`` is the original
sample's stable name and ``split`` the split the writer assigned, so splits and reports are those
of the original source; samples come in the original scan's order (the key is that position).

A sample's ``path`` is ``<shard>@<offset>+<size>``: where its bytes lie in the shard. That, with
``kind``, is all a run's split.csv keeps (not ``rel``), so a resumed run reads the very bytes
with one seek and one read and needs no index.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from PIL import Image

from imgclf.core.errors import DataError, ImageError
from imgclf.data.images import MAX_FILE_BYTES, decode_image_bytes
from imgclf.data.sources.base import Reader, Sample, ScanResult, Source

FORMAT = "imgclf-shards/1"
CLASSES = "classes.json"
INFO = "_info.json"
STATS = "stats.json"
INDEX_SUFFIX = ".index.json"
BLOCK = 512  # a tar block: one USTAR header (the writer's names are short: never a long-name header)
SPLIT_ORDER = ("train", "val", "test")
INDEX_FIELDS = {"key": str, "ext": str, "offset": int, "size": int, "cls": int, "label": str, "split": str, "name": str}
_LOCATION = re.compile(r"^(?P<tar>.+)@(?P<offset>\d+)\+(?P<size>\d+)$")
_KEY = re.compile(r"^\d{9,}$")


def shard_name(split: str, number: int) -> str:
    """``train-000003.tar``: one shard list per split, as timm reads a split."""
    return f"{split}-{number:06d}.tar"


def index_name(tar_name: str) -> str:
    """``train-000003.index.json`` for ``train-000003.tar``."""
    return tar_name[: -len(".tar")] + INDEX_SUFFIX


def location(tar: str | Path, offset: int, size: int) -> str:
    return f"{tar}@{offset}+{size}"


def parse_location(sample: Sample) -> tuple[str, int, int]:
    """(shard path, data offset, size) of a shard sample."""
    found = _LOCATION.match(sample.path)
    if not found:
        raise ImageError(sample.path, "not a shard location (expected SHARD.tar@OFFSET+SIZE)")
    return found["tar"], int(found["offset"]), int(found["size"])


def load_json(path: Path, what: str) -> object:
    """A JSON file of the shard set, or DataError naming it and what to do."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path}: {what} is missing; the shard set is incomplete: rerun imgclf shard") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: damaged {what} ({exc}); delete it and rerun imgclf shard to rewrite it") from None


def read_index(path: Path) -> dict:
    """A shard's index, its fields checked: a damaged one is a DataError naming the file."""
    index = load_json(path, "shard index")
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("samples"), list):
        raise DataError(f"{path}: not an index of imgclf shards ({FORMAT}); delete it and rerun imgclf shard")
    for field in ("tar_bytes", "plan", "shard"):
        if field not in index:
            raise DataError(f"{path}: damaged shard index (no '{field}'); delete it and rerun imgclf shard")
    for n, entry in enumerate(index["samples"]):
        bad = [f for f, kind in INDEX_FIELDS.items() if not isinstance(entry, dict) or type(entry.get(f)) is not kind]
        if bad or not _KEY.match(entry["key"]) or entry["offset"] < BLOCK or entry["size"] < 0:
            what = f"field {bad[0]!r} missing or of the wrong type" if bad else "bad key, offset or size"
            raise DataError(f"{path}: damaged shard index (sample {n}: {what}); delete it and rerun imgclf shard")
    return index


def _shard_lists(root: Path, info: object) -> list[str]:
    """The shard file names that ``_info.json`` lists, split by split."""
    splits = info.get("splits") if isinstance(info, dict) else None
    if not isinstance(splits, dict) or not all(isinstance(s, dict) for s in splits.values()):
        raise DataError(f"{root / INFO}: damaged shard list (no 'splits'); rerun imgclf shard to rewrite it")
    names = []
    for split in splits.values():
        files = split.get("filenames")
        if not isinstance(files, list) or not all(isinstance(f, str) and f.endswith(".tar") for f in files):
            raise DataError(f"{root / INFO}: damaged shard list (bad 'filenames'); rerun imgclf shard to rewrite it")
        names += files
    return names


def scan_shards(root: Path) -> ScanResult:
    classes = load_json(root / CLASSES, "class list")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{root / CLASSES}: damaged class list (expected a JSON list of names); rerun imgclf shard")
    names = _shard_lists(root, load_json(root / INFO, "shard list"))
    keyed = []
    for name in names:
        tar, index_path = root / name, root / index_name(name)
        index = read_index(index_path)
        try:
            size = tar.stat().st_size
        except OSError:
            raise DataError(f"{tar}: shard missing (listed in {INFO}); copy it back or rerun imgclf shard") from None
        if size != index["tar_bytes"]:
            raise DataError(
                f"{tar}: {size} bytes, its index says {index['tar_bytes']}: the shard is truncated or was changed; "
                "delete it and rerun imgclf shard to rewrite it"
            )
        for entry in index["samples"]:
            if not 0 <= entry["cls"] < len(classes) or classes[entry["cls"]] != entry["label"]:
                raise DataError(f"{index_path}: label {entry['label']!r} is not class {entry['cls']} of {CLASSES}")
            if entry["offset"] + entry["size"] > size:
                raise DataError(f"{tar}: member {entry['key']} lies beyond the end of the shard (truncated)")
            where = location(tar, entry["offset"], entry["size"])
            sample = Sample(where, entry["label"], entry["split"], entry["name"], "", ShardReader.kind)
            keyed.append((int(entry["key"]), sample))
    keyed.sort(key=lambda pair: pair[0])  # the key is the position in the original scan
    return ScanResult(str(root), ShardsSource.kind, [sample for _, sample in keyed])


def _header_size(header: bytes) -> int:
    """The member size a USTAR header records (octal digits), -1 when unreadable."""
    try:
        return int(header[124:136].rstrip(b"\0 ") or b"0", 8)
    except ValueError:
        return -1


class ShardsSource(Source):
    kind = "shards"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_dir() and (path / CLASSES).is_file() and (path / INFO).is_file()

    @classmethod
    def scan(cls, path: Path) -> ScanResult:
        return scan_shards(path)


class ShardReader(Reader):
    """A photo inside a shard: one seek and one read of its tar header and bytes; the header is
    checked (a shard rewritten since it was indexed is refused, never read as another photo)."""

    kind = "shard"

    def read(self, sample: Sample) -> bytes:
        tar, offset, size = parse_location(sample)
        if size > MAX_FILE_BYTES or offset < BLOCK:
            raise ImageError(sample.ref, "not a member of a shard written by imgclf shard")
        try:
            with open(tar, "rb") as handle:
                end = os.fstat(handle.fileno()).st_size
                if offset + size > end:
                    raise ImageError(
                        sample.ref,
                        f"lies beyond the end of the shard ({end} bytes): the shard is truncated; "
                        "delete it and rerun imgclf shard to rewrite it",
                    )
                handle.seek(offset - BLOCK)
                data = handle.read(BLOCK + size)
        except OSError as exc:
            raise ImageError(sample.ref, f"cannot read shard ({exc.strerror or exc})") from None
        header = data[:BLOCK]
        if len(data) != BLOCK + size or header[257:262] != b"ustar" or _header_size(header) != size:
            raise ImageError(sample.ref, "the shard changed since it was indexed; rerun imgclf shard to rewrite it")
        return data[BLOCK:]

    def decode(
        self, sample: Sample, data: bytes, draft_size: int | None, max_pixels: int
    ) -> tuple[Image.Image, tuple[int, int]]:
        name = f"{sample.ref} ({sample.rel})" if sample.rel else sample.ref
        return decode_image_bytes(data, name, draft_size=draft_size, max_pixels=max_pixels, with_size=True)

    def stamp(self, sample: Sample) -> str | None:
        tar, offset, size = parse_location(sample)
        try:
            stat = os.stat(tar)
        except OSError:
            return None
        return f"{os.path.abspath(tar)}@{offset}+{size}|{stat.st_size}|{stat.st_mtime_ns}"

"""``imgclf shard``: any data source as WebDataset tar shards, for data too large for folders.

The source is scanned, audited and split once, exactly as a training on it would be (the same
data-layer calls, the same val/test fractions), so a training on the shards uses the very samples,
splits and order. A seeded shuffle mixes the classes; each split is cut into shards of
``shard_samples`` photos (one shard list per split, as timm reads a split). The plan depends only
on the source and the settings: every ``--part`` computes the same one and writes its share.

Each shard is written to a temporary file, made durable and renamed, then its index (which is
what marks it complete); a rerun keeps the shards whose index matches the plan and whose size is
the one recorded, and writes the rest, so a killed run finishes with the very bytes of an
uninterrupted one. The layout is in docs/shards.md; the reader in :mod:`imgclf.data.sources.shards`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from imgclf.core.atomic import atomic_write
from imgclf.core.errors import DataError, ImageError, OutputError, SettingsError
from imgclf.core.events import Events, StopToken, Tracker, channel, info, skipped, stop_token
from imgclf.core.settings import Settings
from imgclf.data.audit import audit, content_hashes
from imgclf.data.images import ALLOWED_FORMATS, IMAGE_SUFFIXES
from imgclf.data.sources import Sample, decode_sample, read_sample, scan
from imgclf.data.sources.shards import (
    BLOCK,
    CLASSES,
    FORMAT,
    INFO,
    SPLIT_ORDER,
    STATS,
    index_name,
    read_index,
    shard_name,
)
from imgclf.data.split import assign_splits, keep_copies_together

__all__ = ["ShardSummary", "write_shards", "plan_shards", "parse_part"]

JPEG_QUALITY = 90  # --max-side re-encodes at one fixed quality: the same photo gives the same bytes
SHARED_MODE = 0o644  # shards are data for other machines and users (temporary files start private)
KEEP_KINDS = ("file", "shard")  # samples whose bytes are an image file are stored as they are
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "HEIF": "heic"}


@dataclass
class Shard:
    split: str
    number: int  # within its split
    members: list[int]  # positions in Plan.samples
    digest: str = ""  # of everything that decides the shard's bytes

    @property
    def name(self) -> str:
        return shard_name(self.split, self.number)


@dataclass
class Plan:
    name: str  # the source folder's name, for timm's _info.json
    classes: list[str]
    samples: list[Sample]  # usable samples with their splits, in the source's scan order
    sha1: list[str]  # of each sample's bytes, from the audit
    shards: list[Shard]
    problems: list[dict]  # what the audit left out (paths relative to the source)


@dataclass
class ShardSummary:
    out: str
    samples: int
    shards: int  # in the whole set
    mine: int  # shards this part writes
    written: list[str] = field(default_factory=list)
    kept: int = 0  # of this part's shards, already complete
    complete: bool = False  # every shard of the set is there (stats.json written)
    skipped: int = 0  # files the audit left out


def parse_part(text: str) -> tuple[int, int]:
    """``"i/N"`` (0-based ``i``) as ``(i, N)``; empty is the whole set, ``(0, 1)``."""
    if not text.strip():
        return 0, 1
    found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not found or not 0 <= int(found[1]) < int(found[2]):
        raise SettingsError(f"setting 'shard_part': {text!r} is not i/N with 0 <= i < N (0-based, e.g. 0/4 ... 3/4)")
    return int(found[1]), int(found[2])


def _relative(path: str, root: str) -> str:
    """A problem's path under the source, so the same data mounted elsewhere gives the same stats."""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


def plan_shards(source: str | Path, settings: Settings, events: Events, stop: StopToken) -> Plan:
    """Scan, audit and split the source as a training does; shuffle and cut it into shards."""
    result = scan(source, settings.data.allow_outside)
    report = audit(result, settings.data, settings.system, events, stop)
    for problem in report.problems:
        skipped(events, problem["path"], problem["reason"])
    samples = assign_splits(report.usable, settings.data.val_fraction, settings.data.test_fraction)
    samples = keep_copies_together(samples, report.usable, report.duplicates)
    # the audit has just hashed every sample: these come from its cache
    hashes = content_hashes(samples, settings.data, result.root, settings.system.max_pixels, stop)
    classes = sorted({s.label for s in samples})
    problems = [{"path": _relative(p["path"], result.root), "reason": p["reason"]} for p in report.problems]
    plan = Plan(Path(result.root).resolve().name, classes, samples, hashes, [], problems)
    plan.shards = _cut(plan, settings.shard.shard_samples, settings.shard.shard_seed)
    for shard in plan.shards:
        shard.digest = _digest(plan, shard, settings)
    return plan


def _cut(plan: Plan, per_shard: int, seed: int) -> list[Shard]:
    order = list(range(len(plan.samples)))
    random.Random(seed).shuffle(order)  # classes mixed inside each shard, the same for every part
    by_split: dict[str, list[int]] = {}
    for i in order:
        by_split.setdefault(plan.samples[i].split or "train", []).append(i)
    splits = [s for s in SPLIT_ORDER if s in by_split] + sorted(set(by_split) - set(SPLIT_ORDER))
    shards = []
    for split in splits:
        members = by_split[split]
        for number, start in enumerate(range(0, len(members), per_shard)):
            shards.append(Shard(split, number, members[start : start + per_shard]))
    return shards


def _digest(plan: Plan, shard: Shard, settings: Settings) -> str:
    """What decides a shard's bytes: its photos (names, labels, content hashes) and the encoding."""
    rows = [
        [_key(i), plan.samples[i].name, plan.samples[i].kind, plan.samples[i].label, plan.sha1[i]]
        for i in shard.members
    ]
    head = [FORMAT, shard.name, plan.classes, settings.shard.shard_max_side, JPEG_QUALITY]
    text = json.dumps([head, rows], ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _key(i: int) -> str:
    """A photo's key: its position in the source's scan, which gives the reader that order back."""
    return f"{i:09d}"


def _extension(sample: Sample, data: bytes) -> str:
    """The original extension (``jpeg`` spelt ``jpg``, as WebDataset readers expect), else the
    format the content is in (a CSV may name a photo without an image extension)."""
    suffix = Path(sample.name).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return {".jpeg": "jpg", ".tif": "tiff", ".heif": "heic"}.get(suffix, suffix[1:])
    with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:  # the audit decoded it already
        return _FORMAT_EXT.get(image.format or "", "png")


def _encode(image: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, quality=JPEG_QUALITY) if kind == "JPEG" else image.save(buffer, kind)
    return buffer.getvalue()


def _stored(sample: Sample, sha1: str, max_side: int, max_pixels: int) -> tuple[bytes, str]:
    """The bytes a shard holds for a photo, and their extension: the original bytes; re-encoded
    as JPEG when over ``max_side``; a PNG of the picture for samples that are no image file (IDX)."""
    try:
        data = read_sample(sample)
        if hashlib.sha1(data).hexdigest() != sha1:
            raise ImageError(sample.ref, "changed since the audit")
        if not max_side and sample.kind in KEEP_KINDS:
            return data, _extension(sample, data)
        image, _ = decode_sample(sample, data, None, max_pixels)
    except ImageError as exc:
        raise DataError(
            f"{exc.path}: cannot be sharded now ({exc.reason}), though the audit read it; restore it, or rerun "
            "imgclf shard to plan without it"
        ) from None
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return _encode(image.resize(size, Image.Resampling.LANCZOS), "JPEG"), "jpg"
    if sample.kind in KEEP_KINDS:
        return data, _extension(sample, data)
    return _encode(image, "PNG"), "png"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Add one member with fixed metadata (same bytes on every machine); return its data offset."""
    member = tarfile.TarInfo(name)
    member.size, member.mtime, member.mode = len(data), 0, 0o644
    member.uid, member.gid, member.uname, member.gname = 0, 0, "", ""
    start = tar.offset
    tar.addfile(member, io.BytesIO(data))
    if tar.offset != start + BLOCK + -(-len(data) // BLOCK) * BLOCK:  # one header block, as the reader assumes
        raise DataError(f"{name}: tar header is not one block; the shard cannot be indexed")
    return start + BLOCK


def _write_shard(plan: Plan, shard: Shard, out: Path, settings: Settings, tracker: Tracker, stop: StopToken) -> None:
    """The shard (temporary name, fsync, rename), then its index: the index marks it complete."""
    entries: list[dict] = []
    max_side, max_pixels = settings.shard.shard_max_side, settings.system.max_pixels

    def write(temp: str) -> None:
        entries.clear()
        with open(temp, "wb") as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in shard.members:
                stop.check()  # the temporary file is removed; the shard is written whole next run
                sample, key = plan.samples[i], _key(i)
                data, ext = _stored(sample, plan.sha1[i], max_side, max_pixels)
                cls = plan.classes.index(sample.label)
                meta = {"key": key, "label": sample.label, "cls": cls, "split": shard.split, "name": sample.name}
                offset = _add_member(tar, f"{key}.{ext}", data)
                _add_member(tar, f"{key}.cls", str(cls).encode("ascii"))
                _add_member(tar, f"{key}.json", json.dumps({**meta, "sha1": plan.sha1[i]}).encode("ascii"))
                entries.append({**meta, "ext": ext, "offset": offset, "size": len(data)})
                tracker.advance()
        os.chmod(temp, SHARED_MODE)

    tar_path = out / shard.name
    atomic_write(tar_path, write)
    size, sha256 = _file_digest(tar_path)
    index = {
        "format": FORMAT,
        "shard": shard.name,
        "split": shard.split,
        "plan": shard.digest,
        "tar_bytes": size,
        "tar_sha256": sha256,
        "samples": entries,
    }
    _write_json(out / index_name(shard.name), index, indent=None)


def _file_digest(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file, a block at a time (a shard of large photos may not fit in memory)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _complete(out: Path, shard: Shard) -> dict | None:
    """The shard's index when the shard is whole and of this plan, else None (to be written)."""
    try:
        index = read_index(out / index_name(shard.name))
        size = (out / shard.name).stat().st_size
    except (DataError, OSError):
        return None
    return index if index["plan"] == shard.digest and index["tar_bytes"] == size else None


def _write_json(path: Path, data: object, indent: int | None = 2) -> None:
    """Atomically, and only when the content differs: every part writes the top-level files."""
    text = (json.dumps(data, indent=indent, ensure_ascii=True) + "\n").encode("ascii")
    try:
        if path.read_bytes() == text:
            return
    except OSError:
        pass

    def write(temp: str) -> None:
        Path(temp).write_bytes(text)
        os.chmod(temp, SHARED_MODE)

    atomic_write(path, write)


def _timm_info(plan: Plan) -> dict:
    """timm's WebDataset reader format (timm/data/readers/reader_wds.py, ``_parse_split_info``)."""
    splits = {}
    for shard in plan.shards:
        split = splits.setdefault(shard.split, {"name": shard.split, "num_samples": 0, "filenames": []})
        split["num_samples"] += len(shard.members)
        split["filenames"].append(shard.name)
        split.setdefault("shard_lengths", []).append(len(shard.members))
    return {"name": plan.name, "format": FORMAT, "num_classes": len(plan.classes), "splits": splits}


def _stats(plan: Plan, indexes: list[dict], settings: Settings) -> dict:
    counts = Counter((s.label, s.split) for s in plan.samples)
    return {
        "format": FORMAT,
        "samples": len(plan.samples),
        "classes": {c: {s: counts[c, s] for s in SPLIT_ORDER if counts[c, s]} for c in plan.classes},
        "splits": {s: sum(n for (_, split), n in counts.items() if split == s) for s in SPLIT_ORDER},
        "shards": len(plan.shards),
        "bytes": sum(index["tar_bytes"] for index in indexes),
        "shard_samples": settings.shard.shard_samples,
        "shard_max_side": settings.shard.shard_max_side,
        "shard_seed": settings.shard.shard_seed,
        "skipped": plan.problems,
    }


def _prepare_out(source: Path, out: Path, part: tuple[int, int], plan: Plan) -> None:
    """Refuse an output inside the source or holding other files; remove what a killed run left
    (temporary files of this part's shards; the top-level ones and shards of an older plan: part 0)."""
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise DataError(f"{out}: the shards cannot go inside the source {source}; choose a folder outside it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the shard folder ({exc.strerror or exc}); choose another") from None
    names = {p.name for p in out.iterdir() if not p.name.endswith(".tmp")}  # a killed run's are cleaned below
    if names and not {CLASSES, INFO} & names:
        raise DataError(f"{out}: holds other files and is no shard set; choose an empty or new folder")
    mine = [s.name for j, s in enumerate(plan.shards) if j % part[1] == part[0]]
    owned = [*mine, *map(index_name, mine)] + ([CLASSES, INFO, STATS] if part[0] == 0 else [])
    for name in owned:
        for temp in out.glob(f"{name}*.tmp"):
            temp.unlink(missing_ok=True)
    if part[0] == 0 and INFO in names:
        _remove_old_plan(out, plan)


def _remove_old_plan(out: Path, plan: Plan) -> None:
    """Shards an earlier plan listed (other settings, other photos) and this one does not, and
    its stats.json (the new one comes when the new set is complete)."""
    try:
        old = json.loads((out / INFO).read_bytes())
        listed = [name for split in old["splits"].values() for name in split["filenames"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    if old != _timm_info(plan):
        (out / STATS).unlink(missing_ok=True)
    planned = {shard.name for shard in plan.shards}
    for name in set(listed) - planned:
        if re.fullmatch(r"[a-z]+-\d{6}\.tar", str(name)):
            (out / name).unlink(missing_ok=True)
            (out / index_name(name)).unlink(missing_ok=True)


def write_shards(
    source: str | Path, out: str | Path, settings: Settings, events: Events | None = None, stop: StopToken | None = None
) -> ShardSummary:
    """Write the shards of ``source`` into ``out`` (this part's share with ``shard_part``), and the
    top-level files; ``stats.json`` once every shard of the set is there."""
    events, stop, out = channel(events), stop_token(stop), Path(out)
    part = parse_part(settings.shard.shard_part)
    plan = plan_shards(source, settings, events, stop)
    _prepare_out(Path(source), out, part, plan)
    mine = [shard for j, shard in enumerate(plan.shards) if j % part[1] == part[0]]
    summary = ShardSummary(str(out), len(plan.samples), len(plan.shards), len(mine), skipped=len(plan.problems))
    _write_json(out / CLASSES, plan.classes)
    _write_json(out / INFO, _timm_info(plan))
    todo = [shard for shard in mine if _complete(out, shard) is None]
    summary.kept = len(mine) - len(todo)
    info(events, f"{len(plan.samples)} photos, {len(plan.shards)} shards; this part writes {len(todo)} "
                 f"of its {len(mine)} ({summary.kept} already complete)", str(out))  # fmt: skip
    tracker = Tracker(events, "shard", sum(len(s.members) for s in todo))
    for shard in todo:
        stop.check()
        _write_shard(plan, shard, out, settings, tracker, stop)
        summary.written.append(shard.name)
    tracker.finish()
    indexes = [_complete(out, shard) for shard in plan.shards]
    summary.complete = all(index is not None for index in indexes)
    if summary.complete:
        _write_json(out / STATS, _stats(plan, indexes, settings))
    else:
        missing = sum(index is None for index in indexes)
        info(events, f"{missing} shards of other parts are still to be written; stats.json comes with the last")
    return summary

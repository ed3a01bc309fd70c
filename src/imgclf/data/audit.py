"""Check a data set before training: decode every image once, in parallel, and report what is wrong.

Results per file are cached on (path, size, mtime, inode, ctime), so checking an unchanged folder
again only stats the files, and a file replaced with its size and mtime kept (``rsync -a``) is
checked again: its inode or ctime changed, and no tool can set those back. Duplicates are exact
(content hash): inside a class, across classes (conflicting labels) and across splits (leakage).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.core.atomic import atomic_write
from imgclf.core.events import Events, StopToken, Tracker, channel, info, stop_token, warn
from imgclf.core.settings import DataSettings, SystemSettings
from imgclf.data.images import ImageError
from imgclf.data.sources import Sample, ScanResult, decode_sample, read_sample, reader
from imgclf.data.split import name_bytes

CACHE_VERSION = 2  # 2: inode and ctime in the key; entries of version 1 are dropped, not kept forever


def cache_dir() -> Path:
    """Where imgclf keeps caches: $IMGCLF_CACHE_DIR, else ~/.cache/imgclf (data folders may be read-only)."""
    return Path(os.environ.get("IMGCLF_CACHE_DIR") or Path.home() / ".cache" / "imgclf")


@dataclass
class FileCheck:
    """What decoding one file found: its size in pixels and content hash, or why it is unusable."""

    width: int = 0
    height: int = 0
    sha1: str = ""
    error: str = ""


def check_file(sample: Sample, max_pixels: int) -> FileCheck:
    """Read, hash and decode one image (JPEGs at reduced scale: every byte is still decoded)."""
    try:
        data = read_sample(sample)
    except ImageError as exc:
        return FileCheck(error=exc.reason)
    digest = hashlib.sha1(data).hexdigest()
    try:
        image, (width, height) = decode_sample(sample, data, draft_size=32, max_pixels=max_pixels)
    except ImageError as exc:
        return FileCheck(sha1=digest, error=exc.reason)
    image.close()
    return FileCheck(width, height, digest)


@dataclass
class AuditReport:
    source: str
    classes: dict[str, int]  # usable images per class
    splits: dict[str, dict[str, int]]  # usable images per split and class
    problems: list[dict]  # [{"path", "reason"}]: files that will not be used
    duplicates: list[dict]  # [{"kind", "sha1", "paths", "labels", "splits"}]
    imbalance_ratio: float
    small_classes: list[str]
    n_files: int
    usable: list[Sample] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "n_files": self.n_files,
            "n_usable": len(self.usable),
            "classes": self.classes,
            "splits": self.splits,
            "imbalance_ratio": self.imbalance_ratio,
            "small_classes": self.small_classes,
            "problems": self.problems,
            "duplicates": self.duplicates,
        }

    def write_json(self, path: str | Path) -> None:
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        # A name that is not valid UTF-8 holds lone surrogates, which UTF-8 cannot encode: they are
        # written as JSON's own \udcXX escape, so json.loads gives back the very name (and
        # os.fsencode its bytes) while every other name stays readable UTF-8.
        data = text.encode("utf-8", "backslashreplace")
        atomic_write(path, lambda temp: Path(temp).write_bytes(data))


def readable(name: str) -> str:
    """A name for people: bytes that are not UTF-8 shown as ``\\xe9``, never a lone surrogate
    (which a UTF-8 terminal or file refuses)."""
    return name_bytes(name).decode("utf-8", "backslashreplace")


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data["files"] if data.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError, KeyError):
        return {}


def _save_cache(path: Path, files: dict, events: Events) -> None:
    """Atomic: a killed audit never leaves a half-written cache behind."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": CACHE_VERSION, "files": files})
        atomic_write(path, lambda temp: Path(temp).write_text(text))
    except OSError as exc:  # a cache that cannot be written only costs time next run
        warn(events, f"audit cache not written ({exc})", str(path))


def _file_key(sample: Sample, max_pixels: int) -> str | None:
    stamp = reader(sample).stamp(sample)
    if stamp is None:
        return None
    try:
        stat = os.stat(sample.path)
    except OSError:  # a reader whose samples are not files: its own stamp is all there is
        return f"{stamp}|{max_pixels}"
    # size and mtime are kept by rsync -a, cp -p and touch -r; the inode and ctime of a replaced
    # file are new whatever the tool does
    return f"{stamp}|{stat.st_ino}|{stat.st_ctime_ns}|{max_pixels}"


def check_files(
    samples: list[Sample],
    settings: DataSettings,
    source: str,
    max_pixels: int,
    events: Events | None = None,
    stop: StopToken | None = None,
) -> list[FileCheck]:
    """Check every sample, reusing cached results for files that have not changed. A stop keeps
    what was checked so far in the cache, then raises Stopped."""
    events, stop = channel(events), stop_token(stop)
    source_key = hashlib.sha1(name_bytes(os.path.abspath(source))).hexdigest()[:16]
    cache_path = cache_dir() / f"audit-{source_key}.json"
    cache = _load_cache(cache_path)
    keys = [_file_key(s, max_pixels) for s in samples]
    results: list[FileCheck | None] = [None] * len(samples)
    todo = []
    for i, key in enumerate(keys):
        if key is not None and key in cache:
            results[i] = FileCheck(**cache[key])
        else:
            todo.append(i)
    if todo:
        tracker = Tracker(events, "check", len(todo))
        try:
            with ThreadPoolExecutor(max_workers=settings.audit_workers or os.cpu_count() or 1) as pool:
                for i, result in zip(
                    todo, pool.map(lambda j: None if stop.is_set() else check_file(samples[j], max_pixels), todo)
                ):
                    if result is None:
                        break
                    results[i] = result
                    if keys[i] is not None:
                        cache[keys[i]] = result.__dict__
                    tracker.advance()
        finally:
            _save_cache(cache_path, cache, events)
        stop.check()
    return results  # type: ignore[return-value]


def content_hashes(
    samples: list[Sample], settings: DataSettings, source: str, max_pixels: int, stop: StopToken | None = None
) -> list[str]:
    """SHA-1 of each sample's bytes, from the audit cache (computed for files not seen before)."""
    return [check.sha1 for check in check_files(samples, settings, source, max_pixels, stop=stop)]


def _find_duplicates(samples: list[Sample], checks: list[FileCheck]) -> list[dict]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, check in enumerate(checks):
        if check.sha1 and not check.error:
            groups[check.sha1].append(i)
    duplicates = []
    for sha1, members in groups.items():
        if len(members) < 2:
            continue
        labels = sorted({samples[i].label for i in members})
        splits = sorted({samples[i].split or "" for i in members} - {""})
        kinds = []
        if len(labels) > 1:
            kinds.append("conflicting_labels")
        if len(splits) > 1:
            kinds.append("across_splits")
        if not kinds:
            kinds.append("within_class")
        for kind in kinds:
            duplicates.append(
                {
                    "kind": kind,
                    "sha1": sha1,
                    "paths": [samples[i].ref for i in members],
                    "labels": labels,
                    "splits": splits,
                }
            )
    return duplicates


def typical_short_side(samples: list[Sample], checks: list[FileCheck]) -> dict[str, int]:
    """The median shorter side of each class's readable images: what "small" is measured against."""
    sides: dict[str, list[int]] = defaultdict(list)
    for sample, check in zip(samples, checks):
        if not check.error and check.width:
            sides[sample.label].append(min(check.width, check.height))
    return {label: int(statistics.median(values)) for label, values in sides.items()}


def audit(
    scan_result: ScanResult,
    settings: DataSettings | None = None,
    system: SystemSettings | None = None,
    events: Events | None = None,
    stop: StopToken | None = None,
) -> AuditReport:
    """Check every image of a scanned source; return usable samples, problems and statistics."""
    settings, system = settings or DataSettings(), system or SystemSettings()
    samples = scan_result.samples
    checks = check_files(samples, settings, scan_result.root, system.max_pixels, events, stop)
    problems = list(scan_result.skipped)
    usable = []
    typical = typical_short_side(samples, checks)
    kept_small = 0
    for sample, check in zip(samples, checks):
        short = min(check.width, check.height)
        if check.error:
            problems.append({"path": sample.ref, "reason": check.error})
        elif short < settings.min_side and not reader(sample).small_by_design:
            if short * 2 >= typical.get(sample.label, 0):  # the class's own resolution, not a fault
                kept_small += 1
                usable.append(sample)
                continue
            reason = (
                f"too small ({check.width}x{check.height}, under {settings.min_side} px a side and under half "
                f"its class's typical {typical[sample.label]} px)"
            )
            problems.append({"path": sample.ref, "reason": reason})
        else:
            usable.append(sample)
    if kept_small:
        info(
            channel(events),
            f"{kept_small} images are under min_side {settings.min_side} px but typical of their classes "
            f"(median short side {min(typical.values())} px): kept, as that is this data's resolution; models "
            "see them resized to their input size",
        )
    duplicates = _find_duplicates(samples, checks)
    counts = Counter(s.label for s in usable)
    classes = {label: counts.get(label, 0) for label in scan_result.classes}
    splits: dict[str, dict[str, int]] = defaultdict(dict)
    for (split, label), n in sorted(Counter((s.split or "unsplit", s.label) for s in usable).items()):
        splits[split][label] = n
    nonzero = [n for n in classes.values() if n]
    ratio = round(max(nonzero) / min(nonzero), 2) if nonzero else 0.0
    small = sorted(label for label, n in classes.items() if n < settings.min_per_class)
    return AuditReport(
        scan_result.root, classes, dict(splits), problems, duplicates, ratio, small, len(samples), usable
    )


def format_report(report: AuditReport, max_rows: int = 50) -> str:
    """A table for the terminal: class counts, then problems and duplicates."""
    lines = [
        f"{readable(report.source)}: {report.n_files} files, {len(report.usable)} usable, "
        f"{len(report.classes)} classes, imbalance ratio {report.imbalance_ratio}"
    ]
    split_names = sorted(report.splits)
    width = max([len(readable(c)) for c in report.classes] + [5])
    lines.append(f"  {'class':<{width}}  " + "  ".join(f"{s:>7}" for s in split_names) + "    total")
    for label, total in sorted(report.classes.items()):
        cells = "  ".join(f"{report.splits[s].get(label, 0):>7}" for s in split_names)
        flag = "  (few images)" if label in report.small_classes else ""
        lines.append(f"  {readable(label):<{width}}  {cells}  {total:>7}{flag}")
    if report.problems:
        lines.append(f"{len(report.problems)} files skipped:")
        lines += [f"  {readable(p['path'])}: {p['reason']}" for p in report.problems[:max_rows]]
        if len(report.problems) > max_rows:
            lines.append(f"  ... and {len(report.problems) - max_rows} more (see --json)")
    if report.duplicates:
        kinds = Counter(d["kind"] for d in report.duplicates)
        lines.append("duplicates: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(kinds.items())))
        for dup in report.duplicates[:max_rows]:
            lines.append(f"  {dup['kind']}: " + " = ".join(readable(p) for p in dup["paths"]))
    return "\n".join(lines)


def summary_line(report: AuditReport) -> str:
    """One line: files, usable, classes and imbalance."""
    return format_report(report, max_rows=0).splitlines()[0]

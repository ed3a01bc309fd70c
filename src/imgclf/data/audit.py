"""Check a data set before training: decode every image once, in parallel, and report what is wrong.

Results per file are cached on (path, size, mtime), so checking an unchanged folder again only
stats the files. Duplicates are exact (content hash): inside a class, across classes (conflicting
labels) and across splits (leakage).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from imgclf.atomic import atomic_write
from imgclf.data.images import ImageError, decode_image_bytes
from imgclf.data.scan import Sample, ScanResult
from imgclf.settings import DataSettings

CACHE_VERSION = 1


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
    if sample.index >= 0:  # IDX images were validated with their file
        from imgclf.data.idx import idx_image

        array = idx_image(sample)
        return FileCheck(array.shape[1], array.shape[0], hashlib.sha1(array.tobytes()).hexdigest())
    try:
        with open(sample.path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return FileCheck(error=f"cannot read file ({exc.strerror or exc})")
    digest = hashlib.sha1(data).hexdigest()
    try:
        image, (width, height) = decode_image_bytes(data, sample.path, draft_size=32,
                                                    max_pixels=max_pixels, with_size=True)
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
            "source": self.source, "n_files": self.n_files, "n_usable": len(self.usable),
            "classes": self.classes, "splits": self.splits, "imbalance_ratio": self.imbalance_ratio,
            "small_classes": self.small_classes, "problems": self.problems, "duplicates": self.duplicates,
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data["files"] if data.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError, KeyError):
        return {}


def _save_cache(path: Path, files: dict) -> None:
    """Atomic: a killed audit never leaves a half-written cache behind."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": CACHE_VERSION, "files": files})
        atomic_write(path, lambda temp: Path(temp).write_text(text))
    except OSError as exc:  # a cache that cannot be written only costs time next run
        print(f"warning: audit cache not written ({exc})", file=sys.stderr)


def _file_key(sample: Sample, max_pixels: int) -> str | None:
    try:
        stat = os.stat(sample.path)
    except OSError:
        return None
    return f"{os.path.abspath(sample.path)}#{sample.index}|{stat.st_size}|{stat.st_mtime_ns}|{max_pixels}"


def check_files(samples: list[Sample], settings: DataSettings, source: str,
                progress: bool = True) -> list[FileCheck]:
    """Check every sample, reusing cached results for files that have not changed."""
    source_key = hashlib.sha1(os.path.abspath(source).encode()).hexdigest()[:16]
    cache_path = cache_dir() / f"audit-{source_key}.json"
    cache = _load_cache(cache_path)
    keys = [_file_key(s, settings.max_pixels) for s in samples]
    results: list[FileCheck | None] = [None] * len(samples)
    todo = []
    for i, key in enumerate(keys):
        if key is not None and key in cache:
            results[i] = FileCheck(**cache[key])
        else:
            todo.append(i)
    workers = settings.audit_workers or os.cpu_count() or 1
    if todo:
        with ThreadPoolExecutor(max_workers=workers) as pool, \
                tqdm(total=len(todo), desc="check", unit="img", disable=not progress, file=sys.stderr) as bar:
            for i, result in zip(todo, pool.map(lambda j: check_file(samples[j], settings.max_pixels), todo)):
                results[i] = result
                bar.update(1)
        for i in todo:
            if keys[i] is not None:
                cache[keys[i]] = results[i].__dict__
        _save_cache(cache_path, cache)
    return results  # type: ignore[return-value]


def content_hashes(samples: list[Sample], settings: DataSettings, source: str) -> list[str]:
    """SHA-1 of each sample's bytes, from the audit cache (computed for files not seen before)."""
    return [check.sha1 for check in check_files(samples, settings, source, progress=False)]


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
            duplicates.append({"kind": kind, "sha1": sha1, "paths": [samples[i].name if samples[i].index >= 0
                                                                       else samples[i].path for i in members],
                               "labels": labels, "splits": splits})
    return duplicates


def audit(scan_result: ScanResult, settings: DataSettings | None = None, progress: bool = True) -> AuditReport:
    """Check every image of a scanned source; return usable samples, problems and statistics."""
    settings = settings or DataSettings()
    samples = scan_result.samples
    checks = check_files(samples, settings, scan_result.root, progress)
    problems = list(scan_result.skipped)
    usable = []
    for sample, check in zip(samples, checks):
        if check.error:
            problems.append({"path": sample.name if sample.index >= 0 else sample.path, "reason": check.error})
        elif min(check.width, check.height) < settings.min_side and sample.index < 0:
            # IDX data sets (MNIST: 28 px) are small by design; the size check is for photos
            problems.append({"path": sample.path, "reason": f"too small ({check.width}x{check.height}, "
                                                            f"under {settings.min_side} px a side)"})
        else:
            usable.append(sample)
    duplicates = _find_duplicates(samples, checks)
    counts = Counter(s.label for s in usable)
    classes = {label: counts.get(label, 0) for label in scan_result.classes}
    splits: dict[str, dict[str, int]] = defaultdict(dict)
    for (split, label), n in sorted(Counter((s.split or "unsplit", s.label) for s in usable).items()):
        splits[split][label] = n
    nonzero = [n for n in classes.values() if n]
    ratio = round(max(nonzero) / min(nonzero), 2) if nonzero else 0.0
    small = sorted(label for label, n in classes.items() if n < settings.min_per_class)
    return AuditReport(scan_result.root, classes, dict(splits), problems, duplicates, ratio, small,
                       len(samples), usable)


def format_report(report: AuditReport, max_rows: int = 50) -> str:
    """A table for the terminal: class counts, then problems and duplicates."""
    lines = [f"{report.source}: {report.n_files} files, {len(report.usable)} usable, "
             f"{len(report.classes)} classes, imbalance ratio {report.imbalance_ratio}"]
    split_names = sorted(report.splits)
    width = max([len(c) for c in report.classes] + [5])
    lines.append(f"  {'class':<{width}}  " + "  ".join(f"{s:>7}" for s in split_names) + "    total")
    for label, total in sorted(report.classes.items()):
        cells = "  ".join(f"{report.splits[s].get(label, 0):>7}" for s in split_names)
        flag = "  (few images)" if label in report.small_classes else ""
        lines.append(f"  {label:<{width}}  {cells}  {total:>7}{flag}")
    if report.problems:
        lines.append(f"{len(report.problems)} files skipped:")
        lines += [f"  {p['path']}: {p['reason']}" for p in report.problems[:max_rows]]
        if len(report.problems) > max_rows:
            lines.append(f"  ... and {len(report.problems) - max_rows} more (see --json)")
    if report.duplicates:
        kinds = Counter(d["kind"] for d in report.duplicates)
        lines.append("duplicates: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(kinds.items())))
        for dup in report.duplicates[:max_rows]:
            lines.append(f"  {dup['kind']}: " + " = ".join(dup["paths"]))
    return "\n".join(lines)

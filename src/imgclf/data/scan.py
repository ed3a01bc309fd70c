"""Find the labelled images in what a user has: class folders, nested class folders,
split folders, a CSV manifest, or MNIST-format IDX files.

Nested folders are hierarchical labels: ``root/Men/Shoes/Sneakers/x.jpg`` is labelled
``Men > Shoes > Sneakers``; leaf folders are the classes.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.data.images import is_image_name

LEVEL_SEP = " > "
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "test": "test", "testing": "test"}


class DataError(ValueError):
    """A data source that cannot be used as given, with the reason."""


@dataclass(frozen=True)
class Sample:
    """One labelled image. ``index`` >= 0 means the ``index``-th image of an IDX file."""

    path: str
    label: str
    split: str | None = None
    rel: str = ""  # path relative to the data root: stable name used for splitting and reports
    index: int = -1

    @property
    def name(self) -> str:
        return f"{self.rel or self.path}#{self.index}" if self.index >= 0 else (self.rel or self.path)


@dataclass
class ScanResult:
    root: str
    kind: str  # "folders", "split-folders", "csv", "idx"
    samples: list[Sample]
    skipped: list[dict] = field(default_factory=list)  # [{"path", "reason"}] found while scanning
    ignored_files: int = 0  # files whose names are not image names (README.txt, ...)

    @property
    def classes(self) -> list[str]:
        return sorted({s.label for s in self.samples})


def _walk_images(top: Path) -> tuple[list[Path], list[dict], int]:
    """Every image-named file under ``top`` (following symlinks, never looping), sorted."""
    found: list[Path] = []
    skipped: list[dict] = []
    ignored = 0
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        stat = os.stat(dirpath)
        key = (stat.st_dev, stat.st_ino)
        if key in seen_dirs:  # a symlink loop or a second link to a folder already walked
            skipped.append({"path": dirpath, "reason": "folder already visited (symlink loop)"})
            dirnames[:] = []
            continue
        seen_dirs.add(key)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if filename.startswith("."):
                continue
            if is_image_name(filename):
                found.append(Path(dirpath) / filename)
            else:
                ignored += 1
    return found, skipped, ignored


def _label_from_folders(relative_dir: Path) -> str:
    return LEVEL_SEP.join(relative_dir.parts)


def scan_class_folders(root: Path, split: str | None = None, rel_prefix: str = "") -> ScanResult:
    """Folder per class; nested folders give hierarchical labels; leaf folders are the classes."""
    files, skipped, ignored = _walk_images(root)
    dirs_with_subdirs = {Path(p).parent.relative_to(root) for p in files}
    parents = {parent for d in dirs_with_subdirs for parent in d.parents}
    samples = []
    for path in files:
        relative_dir = path.parent.relative_to(root)
        rel = (Path(rel_prefix) / path.relative_to(root)).as_posix()
        if relative_dir == Path("."):
            skipped.append({"path": str(path), "reason": "image outside any class folder"})
        elif relative_dir in parents:
            skipped.append({"path": str(path), "reason": "image in a folder that has class sub-folders"})
        else:
            samples.append(Sample(str(path), _label_from_folders(relative_dir), split, rel))
    return ScanResult(str(root), "folders", samples, skipped, ignored)


def _split_folders(root: Path) -> dict[str, Path]:
    found = {}
    for child in sorted(root.iterdir()):
        name = SPLIT_NAMES.get(child.name.lower())
        if child.is_dir() and name:
            if name in found:
                raise DataError(f"{root}: two folders for the {name} split ({found[name].name}, {child.name})")
            found[name] = child
    return found if "train" in found and len(found) >= 2 else {}


def scan_csv(csv_path: Path) -> ScanResult:
    """``path,label[,split]`` rows, paths relative to the CSV's folder; a header row is optional."""
    base = csv_path.parent
    samples, skipped = [], []
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    for line_number, row in enumerate(rows, start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            skipped.append({"path": f"{csv_path}:{line_number}", "reason": "row needs path and label"})
            continue
        rel, label = row[0].strip(), LEVEL_SEP.join(p.strip() for p in row[1].split(">"))
        split = None
        if len(row) > 2 and row[2].strip():
            split = SPLIT_NAMES.get(row[2].strip().lower())
            if split is None:
                skipped.append({"path": rel, "reason": f"unknown split '{row[2].strip()}'"})
                continue
        samples.append(Sample(str(base / rel), label, split, rel))
    return ScanResult(str(csv_path), "csv", samples, skipped, 0)


def scan(source: str | os.PathLike) -> ScanResult:
    """Recognise the kind of data source and list its labelled images."""
    from imgclf.data import idx  # local: only IDX sources need it

    root = Path(source)
    if not root.exists():
        raise DataError(f"{root}: no such file or folder")
    if root.is_file():
        if root.suffix.lower() == ".csv":
            result = scan_csv(root)
        else:
            raise DataError(f"{root}: expected a folder of class folders, a .csv manifest or IDX files")
    elif idx.find_idx_pairs(root):
        result = idx.scan_idx(root)
    elif splits := _split_folders(root):
        result = ScanResult(str(root), "split-folders", [])
        for split, folder in splits.items():
            part = scan_class_folders(folder, split, rel_prefix=folder.name)
            result.samples += part.samples
            result.skipped += part.skipped
            result.ignored_files += part.ignored_files
    else:
        result = scan_class_folders(root)
    if not result.samples:
        raise DataError(f"{root}: no labelled images found (expected class folders, a CSV or IDX files)")
    return result

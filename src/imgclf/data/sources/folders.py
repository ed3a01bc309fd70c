"""Class folders (``root/<class>/*.jpg``; nested folders are hierarchical labels:
``root/Men/Shoes/Sneakers/x.jpg`` is ``Men > Shoes > Sneakers``, leaf folders are the classes)
and split folders (``root/{train,val|valid|validation,test}/<class>/``). Folders whose labels
differ only in case (``Cat``, ``cat``), or one named ``A > B`` beside nested ``A/B`` (one label
from two folders), are an error: which was meant is not for imgclf to guess."""

from __future__ import annotations

import os
from pathlib import Path

from imgclf.core.errors import DataError
from imgclf.data.fetch.labels import RESERVED_FOLDERS
from imgclf.data.images import is_image_name
from imgclf.data.sources.base import LEVEL_SEP, SPLIT_NAMES, Sample, ScanResult, Source, refuse_case_collisions

REJECTED = RESERVED_FOLDERS[0]


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
        # hidden folders, and the rejects imgclf fetch --keep-rejected keeps for a look, are no classes
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != REJECTED)
        images = 0
        for filename in sorted(filenames):
            if filename.startswith("."):
                continue
            if is_image_name(filename):
                found.append(Path(dirpath) / filename)
                images += 1
            else:
                ignored += 1
        if not images and not dirnames and Path(dirpath) != top:  # a class folder with nothing in it: say so
            others = sum(not f.startswith(".") for f in filenames)
            what = f"no images, {others} other file(s)" if others else "no images"
            skipped.append({"path": dirpath, "reason": f"empty class folder ({what}); add photos or remove it"})
    return found, skipped, ignored


def scan_class_folders(root: Path, split: str | None = None, rel_prefix: str = "") -> ScanResult:
    """Folder per class; nested folders give hierarchical labels; leaf folders are the classes."""
    files, skipped, ignored = _walk_images(root)
    dirs_with_images = {Path(p).parent.relative_to(root) for p in files}
    parents = {parent for d in dirs_with_images for parent in d.parents}
    samples = []
    folders: dict[str, Path] = {}  # label -> the class folder it came from
    for path in files:
        relative_dir = path.parent.relative_to(root)
        rel = (Path(rel_prefix) / path.relative_to(root)).as_posix()
        if relative_dir == Path("."):
            skipped.append({"path": str(path), "reason": "image outside any class folder"})
        elif relative_dir in parents:
            skipped.append({"path": str(path), "reason": "image in a folder that has class sub-folders"})
        else:
            label = _folder_label(root, relative_dir, folders)
            samples.append(Sample(str(path), label, split, rel))
    return ScanResult(str(root), FoldersSource.kind, samples, skipped, ignored)


def _folder_label(root: Path, relative_dir: Path, folders: dict[str, Path]) -> str:
    """The label of a class folder: its folder names joined by the level separator. A folder
    named ``A > B`` gives what nested ``A/B`` gives, so both present is one label from two
    folders, and a name with an empty level (``A > ``) no label a CSV could give: both refused."""
    label = LEVEL_SEP.join(relative_dir.parts)
    if any(not level.strip() for level in label.split(LEVEL_SEP)):
        raise DataError(
            f"{root / relative_dir}: a folder name with an empty hierarchy level ('{LEVEL_SEP}' separates "
            "levels); rename the folder"
        )
    other = folders.setdefault(label, relative_dir)
    if other != relative_dir:
        raise DataError(
            f"{root}: folders '{other.as_posix()}' and '{relative_dir.as_posix()}' both give the label {label!r} "
            f"('{LEVEL_SEP}' in a folder name separates hierarchy levels); merge them or rename one"
        )
    return label


def _refuse_case_collisions(result: ScanResult) -> ScanResult:
    class_folders: dict[str, str] = {}  # label -> its (first) folder, to name it in the error
    for sample in result.samples:
        if sample.label not in class_folders:
            class_folders[sample.label] = str(Path(sample.path).parent)
    refuse_case_collisions(class_folders.items(), result.root)
    return result


def split_folders(root: Path) -> dict[str, Path]:
    """``{split: folder}`` when ``root`` holds a train folder and at least one other split folder."""
    found: dict[str, Path] = {}
    for child in sorted(root.iterdir()):
        name = SPLIT_NAMES.get(child.name.lower())
        if child.is_dir() and name:
            if name in found:
                raise DataError(
                    f"{root}: two folders for the {name} split ({found[name].name}, {child.name}); rename or remove one"
                )
            found[name] = child
    return found if "train" in found and len(found) >= 2 else {}


class FoldersSource(Source):
    kind = "folders"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_dir()

    @classmethod
    def scan(cls, path: Path) -> ScanResult:
        return _refuse_case_collisions(scan_class_folders(path))


class SplitFoldersSource(Source):
    kind = "split-folders"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_dir() and bool(split_folders(path))

    @classmethod
    def scan(cls, path: Path) -> ScanResult:
        result = ScanResult(str(path), cls.kind, [])
        for split, folder in split_folders(path).items():
            part = scan_class_folders(folder, split, rel_prefix=folder.name)
            result.samples += part.samples
            result.skipped += part.skipped
            result.ignored_files += part.ignored_files
        return _refuse_case_collisions(result)  # across splits too: train/Cat and val/cat

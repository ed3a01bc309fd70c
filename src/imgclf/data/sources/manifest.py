"""A CSV manifest: ``path,label[,split]`` rows, paths relative to the CSV's folder, a header row
optional; ``>`` in a label separates hierarchy levels (empty levels dropped). UTF-8 or
Windows-1252. A repeated row, a NUL byte, an empty label or a row the CSV reader cannot parse (a
field over its size limit) is skipped with the reason; one path given two labels is a label
conflict, and neither row is used; labels that differ only in case are an error."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imgclf.core.errors import DataError
from imgclf.data.sources.base import LEVEL_SEP, SPLIT_NAMES, Sample, ScanResult, Source, refuse_case_collisions


def _text(path: Path) -> str:
    """UTF-8 (with or without a BOM), else Windows-1252, as Excel writes CSVs on Windows."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: neither UTF-8 nor Windows-1252 text (byte {exc.start}); save it as UTF-8") from None


@dataclass(frozen=True)
class _Row:
    line: int
    rel: str
    label: str
    split: str | None


def _records(path: Path, skipped: list[dict]) -> Iterator[tuple[int, list[str]]]:
    """``(line, cells)`` of each CSV record. A record the reader cannot parse (a field over
    ``csv.field_size_limit``; on Python 3.10 a NUL byte) is skipped with the reason, not raised:
    the reader drops the rest of that line and goes on, so one bad row never loses the others."""
    reader = csv.reader(io.StringIO(_text(path), newline=""))
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            reason = f"unreadable CSV row ({exc}); fix or remove it"
            skipped.append({"path": f"{path}:{reader.line_num}", "reason": reason})
            continue
        yield reader.line_num, cells


def _parse(path: Path, line: int, cells: list[str], skipped: list[dict]) -> _Row | None:
    """The row's path, label and split; None (with the reason in ``skipped``) for a row that cannot be used."""
    where = f"{path}:{line}"
    if len(cells) < 2 or not cells[0].strip() or not cells[1].strip():
        skipped.append({"path": where, "reason": "row needs path and label"})
        return None
    rel, label = cells[0].strip(), LEVEL_SEP.join(p.strip() for p in cells[1].split(">") if p.strip())
    if "\x00" in rel or "\x00" in label or not label:
        reason = "NUL byte in the path" if "\x00" in rel else "NUL byte in the label" if label else "empty label"
        skipped.append({"path": where, "reason": reason})
        return None
    split = None
    if len(cells) > 2 and cells[2].strip():
        split = SPLIT_NAMES.get(cells[2].strip().lower())
        if split is None:
            skipped.append({"path": rel, "reason": f"unknown split '{cells[2].strip()}'"})
            return None
    return _Row(line, rel, label, split)


def _rows(path: Path, skipped: list[dict]) -> list[_Row]:
    """The usable rows, each path once: a repeated row is skipped, and a path given two labels
    is a label conflict. Neither label is used then: the CSV cannot say which is right, and
    training on both would teach the model to confuse them (the audit reports the same thing,
    "conflicting_labels", for copies of one image under two labels)."""
    by_path: dict[str, dict[str, _Row]] = {}
    first = True
    for line, cells in _records(path, skipped):
        if first and [c.strip().lower() for c in cells[:2]] == ["path", "label"]:
            first = False
            continue
        if not any(cell.strip() for cell in cells):
            continue
        first = False
        row = _parse(path, line, cells, skipped)
        if row is None:
            continue
        # the same file written two ways (img/a.png, ./img/a.png) is the same row
        labels = by_path.setdefault(os.path.normpath(row.rel), {})
        if row.label in labels:
            reason = f"duplicate row (the same as line {labels[row.label].line})"
            skipped.append({"path": f"{path}:{line}", "reason": reason})
            continue
        labels[row.label] = row
    rows = []
    for labels in by_path.values():
        if len(labels) == 1:
            rows += labels.values()
            continue
        given = sorted(labels.values(), key=lambda r: r.line)
        listed = " and ".join(f"'{r.label}' (line {r.line})" for r in given)
        reason = f"label conflict: '{given[0].rel}' is labelled {listed}; neither is used, give it one label"
        skipped.append({"path": f"{path}:{given[0].line}", "reason": reason})
    return sorted(rows, key=lambda r: r.line)


class CsvSource(Source):
    kind = "csv"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".csv"

    @classmethod
    def scan(cls, path: Path) -> ScanResult:
        skipped: list[dict] = []
        rows = _rows(path, skipped)
        refuse_case_collisions(((r.label, f"line {r.line}") for r in rows), str(path))
        samples = [Sample(str(path.parent / r.rel), r.label, r.split, r.rel) for r in rows]
        return ScanResult(str(path), cls.kind, samples, skipped, 0)

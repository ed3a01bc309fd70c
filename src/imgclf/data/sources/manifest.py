"""A CSV manifest: ``path,label[,split]`` rows, paths relative to the CSV's folder, a header row
optional; ``>`` in a label separates hierarchy levels (empty levels dropped). UTF-8 or
Windows-1252; a repeated row, a NUL byte in a path or an empty label is skipped with the reason."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from imgclf.core.errors import DataError
from imgclf.data.sources.base import LEVEL_SEP, SPLIT_NAMES, Sample, ScanResult, Source


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


class CsvSource(Source):
    kind = "csv"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".csv"

    @classmethod
    def scan(cls, path: Path) -> ScanResult:
        base = path.parent
        samples, skipped = [], []
        seen: dict[tuple[str, str], int] = {}
        rows = list(csv.reader(io.StringIO(_text(path), newline="")))
        first = 1
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
            rows, first = rows[1:], 2
        for line_number, row in enumerate(rows, start=first):
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                skipped.append({"path": f"{path}:{line_number}", "reason": "row needs path and label"})
                continue
            rel, label = row[0].strip(), LEVEL_SEP.join(p.strip() for p in row[1].split(">") if p.strip())
            if "\x00" in rel or not label:
                reason = "NUL byte in the path" if "\x00" in rel else "empty label"
                skipped.append({"path": f"{path}:{line_number}", "reason": reason})
                continue
            if (rel, label) in seen:
                reason = f"duplicate row (the same as line {seen[(rel, label)]})"
                skipped.append({"path": f"{path}:{line_number}", "reason": reason})
                continue
            seen[(rel, label)] = line_number
            split = None
            if len(row) > 2 and row[2].strip():
                split = SPLIT_NAMES.get(row[2].strip().lower())
                if split is None:
                    skipped.append({"path": rel, "reason": f"unknown split '{row[2].strip()}'"})
                    continue
            samples.append(Sample(str(base / rel), label, split, rel))
        return ScanResult(str(path), cls.kind, samples, skipped, 0)

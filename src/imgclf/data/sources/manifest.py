"""A CSV manifest: ``path,label[,split]`` rows, paths relative to the CSV's folder, a header row
optional; ``>`` in a label separates hierarchy levels."""

from __future__ import annotations

import csv
from pathlib import Path

from imgclf.data.sources.base import LEVEL_SEP, SPLIT_NAMES, Sample, ScanResult, Source


class CsvSource(Source):
    kind = "csv"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".csv"

    @classmethod
    def scan(cls, path: Path) -> ScanResult:
        base = path.parent
        samples, skipped = [], []
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
        first = 1
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
            rows, first = rows[1:], 2
        for line_number, row in enumerate(rows, start=first):
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                skipped.append({"path": f"{path}:{line_number}", "reason": "row needs path and label"})
                continue
            rel, label = row[0].strip(), LEVEL_SEP.join(p.strip() for p in row[1].split(">"))
            split = None
            if len(row) > 2 and row[2].strip():
                split = SPLIT_NAMES.get(row[2].strip().lower())
                if split is None:
                    skipped.append({"path": rel, "reason": f"unknown split '{row[2].strip()}'"})
                    continue
            samples.append(Sample(str(base / rel), label, split, rel))
        return ScanResult(str(path), cls.kind, samples, skipped, 0)

"""Library functions that the CLI (and later the service) call, beside train/evaluate/load."""
from __future__ import annotations

from pathlib import Path

from imgclf.data.audit import AuditReport, audit
from imgclf.data.scan import scan
from imgclf.settings import Settings, apply_overrides


def check(data: str | Path, overrides: dict | None = None, json_path: str | Path | None = None,
          progress: bool = True) -> AuditReport:
    """Audit a data source: every image decoded once; problems, duplicates and counts reported."""
    settings = apply_overrides(Settings(), overrides or {})
    report = audit(scan(data), settings.data, progress=progress)
    if json_path is not None:
        report.write_json(json_path)
    return report

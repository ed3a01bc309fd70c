"""``imgclf fetch``: a training set from lists of image URLs, with dead links, placeholders and
duplicates weeded out, resumable, with a record of every URL (``docs/fetch.md``)."""

from __future__ import annotations

from pathlib import Path

from imgclf.core.events import Events, StopToken
from imgclf.core.settings import Settings
from imgclf.data.fetch.checks import Placeholders
from imgclf.data.fetch.inputs import read_rows
from imgclf.data.fetch.labels import folder_map
from imgclf.data.fetch.run import FetchJob, settle_without_requests
from imgclf.data.fetch.summary import FetchSummary, dry_run_summary

__all__ = ["fetch_urls", "FetchSummary"]


def fetch_urls(
    inputs: list[str | Path],
    out: str | Path,
    settings: Settings,
    events: Events,
    stop: StopToken,
    *,
    names: str | Path | None = None,
    placeholders: list[str | Path] = (),
    retry_failed: bool = False,
    dry_run: bool = False,
) -> FetchSummary:
    rows = read_rows(inputs, names)
    if dry_run:
        folder_map([r.label for r in rows if not r.error])  # hostile or clashing labels fail here too
        settled, requests = settle_without_requests(rows)
        return dry_run_summary(rows, settled, requests, str(out))
    job = FetchJob(rows, out, settings, Placeholders(list(placeholders)), events, stop, retry_failed)
    return job.run()

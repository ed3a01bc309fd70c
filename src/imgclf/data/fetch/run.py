"""The fetch engine: rows in, class folders and a manifest out, resumable at any point.

A run (1) reads and de-duplicates the rows, deciding what needs no request (invalid URLs, the
same URL twice, one URL under two labels); (2) downloads what the manifest does not already
settle, round-robin over the labels so an interrupted or capped run stays balanced, checking and
writing each picture as it arrives (``fetched``); (3) decides what needs every picture at hand:
duplicates within a label, one picture under two labels, one picture behind many URLs (a
suspected placeholder); and (4) writes ``summary.json``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from imgclf.core.events import Events, StopToken, Tracker, info, warn
from imgclf.core.settings import Settings
from imgclf.data.fetch.checks import Checked, ImageLimits, Placeholders, Rejected, check_image, format_of
from imgclf.data.fetch.http import BUILTIN_PLACEHOLDER_URLS, Attempts, Downloader, Failure, HttpLimits
from imgclf.data.fetch.inputs import Row
from imgclf.data.fetch.labels import folder_map
from imgclf.data.fetch.manifest import Manifest
from imgclf.data.fetch.outcomes import HAS_CONTENT, Record, kind_of
from imgclf.data.fetch.store import FetchStore
from imgclf.data.fetch.summary import FetchSummary, summarise

PROGRESS_GROUPS = ("ok", "failed", "placeholder")
DRAIN_S = 10.0  # after a stop, downloads in flight get this long to finish before they are cut


def http_limits(settings: Settings) -> HttpLimits:
    f = settings.fetch
    extra = (f.placeholder_url,) if f.placeholder_url else ()
    return HttpLimits(
        concurrency=f.concurrency, per_host=f.per_host, connect_timeout=f.connect_timeout,
        read_timeout=f.read_timeout, url_timeout=f.url_timeout, retries=f.retries,
        retry_after_cap=f.retry_after_cap, max_bytes=f.max_bytes, max_redirects=f.max_redirects,
        breaker_failures=f.breaker_failures, user_agent=f.user_agent, respect_noai=f.respect_noai,
        placeholder_urls=BUILTIN_PLACEHOLDER_URLS + extra,
    )  # fmt: skip


def image_limits(settings: Settings) -> ImageLimits:
    f = settings.fetch
    return ImageLimits(settings.data.min_side, f.min_bytes, f.max_aspect, settings.system.max_pixels, f.max_side)


def settle_without_requests(rows: list[Row]) -> tuple[list[Record], list[Row]]:
    """Records for the rows that need no request, and the rows to request (one per URL)."""
    settled: list[Record] = []
    by_url: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        if row.error:
            settled.append(Record(row.url, row.label, row.source, "invalid_url", error=row.error))
        else:
            by_url[row.url].append(row)
    requests = []
    for url, same in by_url.items():
        labels = list(dict.fromkeys(r.label for r in same))
        if len(labels) > 1:
            why = f"the same URL is listed under {len(labels)} labels ({', '.join(labels[:3])})"
            settled.extend(Record(url, r.label, r.source, "label_conflict", error=why) for r in same)
            continue
        requests.append(same[0])
        why = f"the same URL as {same[0].source}"
        settled.extend(Record(url, r.label, r.source, "duplicate_url", error=why) for r in same[1:])
    return settled, requests


class FetchJob:
    def __init__(
        self,
        rows: list[Row],
        out,
        settings: Settings,
        placeholders: Placeholders,
        events: Events,
        stop: StopToken,
        retry_failed: bool = False,
    ) -> None:
        self.rows, self.settings, self.placeholders = rows, settings, placeholders
        self.events, self.stop, self.retry_failed = events, stop, retry_failed
        self.order = {row.source: i for i, row in enumerate(rows)}
        self.folders = folder_map([r.label for r in rows if not r.error])
        self.store = FetchStore(out)
        self.limits, self.image_limits = http_limits(settings), image_limits(settings)
        self.requests = 0

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> FetchSummary:
        started = time.perf_counter()
        removed = self.store.clean_partial()
        if removed:
            info(self.events, f"removed {removed} partial files left by an interrupted run")
        self.manifest = Manifest(self.store.manifest_path)
        self.store.write_labels(self.folders)
        self.store.write_json("settings.json", self.settings.to_dict())
        try:
            settled, requests = settle_without_requests(self.rows)
            for record in settled:
                self._record_if_new(record)
            processed = self._download_rounds(requests)
        finally:
            self.manifest.sync()
            self.manifest.close()
        summary = summarise(self, processed, time.perf_counter() - started)
        self.store.write_json("summary.json", summary.to_dict())
        return summary

    def _record_if_new(self, record: Record) -> None:
        last = self.manifest.last.get(record.source)
        if last is None or (last.outcome, last.error) != (record.outcome, record.error):
            self.manifest.append(record)

    def _needs_request(self, row: Row) -> bool:
        last = self.manifest.last.get(row.source)
        if last is None or last.outcome == "not_needed":
            return True
        return self.retry_failed and kind_of(last.outcome) == "transient"

    def _download_rounds(self, requests: list[Row]) -> int:
        """Download, decide, and download again while a capped class lost pictures to the decisions."""
        processed = 0
        for _ in range(3):
            todo = [row for row in requests if self._needs_request(row)]
            if todo and not self.stop.is_set():
                processed += asyncio.run(self._download_all(todo))
            self.finalise()
            if self.stop.is_set() or not self._short_classes(requests):
                break
        return processed

    def _short_classes(self, requests: list[Row]) -> bool:
        cap = self.settings.fetch.max_per_class
        if not cap:
            return False
        good = Counter(r.label for r in self.manifest.last.values() if r.outcome == "ok")
        waiting = {r.label for r in requests if self.manifest.last.get(r.source, r).outcome == "not_needed"}
        return any(good[label] < cap for label in waiting)

    # -- downloading -------------------------------------------------------------------------
    async def _download_all(self, todo: list[Row]) -> int:
        queue = _Queue(todo, self._good_per_label(), self.settings.fetch.max_per_class)
        tracker = Tracker(self.events, "fetch", len(todo), unit="url", interval=0.5)
        finished: list[Record] = []
        tracker.detail.update(dict.fromkeys(PROGRESS_GROUPS, 0))
        per_label = len(queue.labels) <= 100  # per-label progress, for as many labels as a face can show
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="imgclf-fetch") as pool:
            async with self._source() as source:

                async def worker() -> None:
                    while (row := await queue.take(self.stop)) is not None:
                        try:
                            record = await self._one(source, row, pool)
                        finally:
                            await queue.done(row)
                        self.manifest.append(record)
                        queue.count(record)
                        finished.append(record)
                        _tally(tracker.detail, record, per_label)
                        tracker.advance(1)

                workers = [asyncio.create_task(worker()) for _ in range(self.limits.concurrency)]
                await _wait_or_drain(workers, self.stop, queue)
        for row in queue.left_over() if not self.stop.is_set() else []:
            self._record_if_new(Record(row.url, row.label, row.source, "not_needed", error="max_per_class reached"))
            tracker.advance(1)
        if not self.stop.is_set():
            tracker.finish()
        return len(finished)

    def _good_per_label(self) -> dict[str, set[str]]:
        good: dict[str, set[str]] = defaultdict(set)
        for record in self.manifest.last.values():
            if record.outcome in ("ok", "fetched") and record.source in self.order:
                good[record.label].add(record.sha256)
        return good

    def _source(self):
        """Where the bytes come from: the network here; img2dataset's shards in the importer."""
        return Downloader(self.limits)

    async def _one(self, downloader: Downloader, row: Row, pool: ThreadPoolExecutor) -> Record:
        started = time.perf_counter()
        attempts = Attempts()
        try:
            response = await downloader.get(row.url, attempts)
        except Failure as failure:
            return Record(
                row.url, row.label, row.source, failure.outcome, attempts.count,
                failure.status or attempts.last_status, attempts.final_url, error=failure.detail,
                elapsed_s=round(time.perf_counter() - started, 3),
            )  # fmt: skip
        finally:
            self.requests += attempts.count
        loop = asyncio.get_running_loop()
        record = await loop.run_in_executor(pool, self._check_and_store, row, response.body)
        record.attempts, record.status, record.final_url = attempts.count, response.status, response.final_url
        record.extra["redirects"] = response.redirects
        record.elapsed_s = round(time.perf_counter() - started, 3)
        return record

    def _check_and_store(self, row: Row, body: bytes) -> Record:
        """In a worker thread: decode and check the picture, then write it (or reject it)."""
        record = Record(row.url, row.label, row.source, "fetched", bytes=len(body))
        try:
            checked: Checked = check_image(body, row.url, self.image_limits, self.placeholders)
        except Rejected as rejected:
            record.outcome, record.error = rejected.outcome, rejected.detail
            if self.settings.fetch.keep_rejected:
                digest = hashlib.sha256(body).hexdigest()
                record.path = self.store.reject(rejected.outcome, digest, format_of(body), body)
            return record
        record.sha256, record.format = checked.sha256, checked.format
        record.width, record.height = checked.width, checked.height
        record.extra["phash"] = checked.phash
        record.path = self.store.relative(self.folders[row.label], checked.sha256, checked.format)
        self.store.write(record.path, checked.data)
        return record

    # -- deciding ----------------------------------------------------------------------------
    def finalise(self) -> None:
        """Decide duplicates, conflicts and suspected placeholders over every picture at hand."""
        content = [r for r in self.manifest.last.values() if r.outcome in HAS_CONTENT and r.source in self.order]
        by_sha: dict[str, list[Record]] = defaultdict(list)
        for record in sorted(content, key=lambda r: self.order[r.source]):
            by_sha[record.sha256].append(record)
        kept: set[str] = set()
        dropped: list[tuple[str, str]] = []
        for group in by_sha.values():
            for record, (outcome, why) in zip(group, self._decide(group)):
                path = self.store.relative(self.folders[record.label], record.sha256, record.format)
                if outcome == "ok":
                    kept.add(path)
                else:
                    dropped.append((path, outcome))
                new = replace(record, outcome=outcome, error=why, path=path if outcome == "ok" else "")
                if (new.outcome, new.error, new.path) != (record.outcome, record.error, record.path):
                    self.manifest.append(new)
        keep_as = self.settings.fetch.keep_rejected
        for path, outcome in dropped:
            if path not in kept:
                self.store.remove(path, keep_as=outcome if keep_as else "")
        swept = self.store.sweep(list(self.folders.values()), kept)
        if swept:
            warn(self.events, f"removed {swept} files that no manifest record keeps (left by a killed run)")

    def _decide(self, group: list[Record]) -> list[tuple[str, str]]:
        urls = {r.url for r in group}
        if len(urls) >= self.settings.fetch.quarantine_after:
            return [("suspected_placeholder", f"the same picture came from {len(urls)} different URLs")] * len(group)
        labels = list(dict.fromkeys(r.label for r in group))
        if len(labels) > 1 and self.settings.fetch.conflicts == "drop":
            why = f"the same picture is under {len(labels)} labels ({', '.join(labels[:3])}); none is kept"
            return [("label_conflict", why)] * len(group)
        first = group[0]
        decisions = []
        for record in group:
            if record is first:
                decisions.append(("ok", ""))
            elif record.label == first.label:
                decisions.append(("duplicate", f"the same picture as {first.source}"))
            else:
                decisions.append(("label_conflict", f"the same picture as {first.source}, kept under {first.label!r}"))
        return decisions


class _Queue:
    """Rows handed out round-robin over the labels, holding back a label that has (or may soon
    have, counting downloads in flight) ``cap`` good pictures."""

    def __init__(self, rows: list[Row], good: dict[str, set[str]], cap: int) -> None:
        self.queues: dict[str, deque[Row]] = defaultdict(deque)
        for row in rows:
            self.queues[row.label].append(row)
        self.labels = list(self.queues)
        self.good, self.cap = good, cap
        self.inflight: Counter = Counter()
        self.turn = 0
        self.changed = asyncio.Condition()

    def _pick(self) -> Row | None:
        for step in range(len(self.labels)):
            label = self.labels[(self.turn + step) % len(self.labels)]
            queue = self.queues[label]
            if queue and not (self.cap and len(self.good[label]) + self.inflight[label] >= self.cap):
                self.turn = (self.turn + step + 1) % len(self.labels)
                self.inflight[label] += 1
                return queue.popleft()
        return None

    async def take(self, stop: StopToken) -> Row | None:
        async with self.changed:
            while not stop.is_set():
                row = self._pick()
                if row is not None:
                    return row
                if not any(self.inflight.values()):
                    return None
                await self.changed.wait()
        return None

    async def done(self, row: Row) -> None:
        async with self.changed:
            self.inflight[row.label] -= 1
            self.changed.notify_all()

    def count(self, record: Record) -> None:
        if record.outcome == "fetched":
            self.good[record.label].add(record.sha256)

    def left_over(self) -> list[Row]:
        return [row for queue in self.queues.values() for row in queue]

    async def wake(self) -> None:
        async with self.changed:
            self.changed.notify_all()


async def _wait_or_drain(workers: list[asyncio.Task], stop: StopToken, queue: _Queue) -> None:
    """Wait for the workers; once the stop token is set, give downloads in flight DRAIN_S to end.
    A worker that fails (a full disk, a bug) stops the others and its error is raised."""
    pending = set(workers)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, timeout=0.1, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
            if stop.is_set() and pending:
                await queue.wake()
                done, pending = await asyncio.wait(pending, timeout=DRAIN_S)
                for task in done:
                    task.result()
                return
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _tally(detail: dict, record: Record, per_label: bool) -> None:
    """Count one finished URL as ok / failed / placeholder, in all and per label, in place."""
    outcome = record.outcome
    group = "ok" if outcome == "fetched" else "placeholder" if "placeholder" in outcome else "failed"
    detail[group] = detail.get(group, 0) + 1
    if per_label:
        counts = detail.setdefault("labels", {}).setdefault(record.label, dict.fromkeys(PROGRESS_GROUPS, 0))
        counts[group] += 1

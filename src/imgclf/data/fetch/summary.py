"""What a fetch ended with: counts per outcome, per kind and per label (``summary.json``, and the
table the command line draws)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from imgclf.data.fetch.outcomes import group_of, kind_of

GROUPS = ("ok", "placeholder", "duplicate", "conflict", "failed", "pending")


@dataclass
class FetchSummary:
    out: str
    inputs: int  # input rows; the counts of each table add up to it
    by_outcome: dict
    by_kind: dict
    labels: dict  # label -> {"folder": ..., "ok": n, "placeholder": n, ...}
    processed: int = 0  # URLs downloaded by this run
    requests: int = 0  # HTTP attempts by this run (redirect hops not counted)
    elapsed_s: float = 0.0
    urls_per_s: float = 0.0
    stopped: str = ""  # the stop reason when the run was interrupted
    dry_run: bool = False
    hosts: dict = field(default_factory=dict)  # dry run: host -> URLs to request

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> list[str]:
        """The per-label table, one line per label and a total line."""
        width = max([len("label")] + [len(label) for label in self.labels])
        lines = [f"{'label':<{width}}  " + "  ".join(f"{g:>9}" for g in GROUPS)]
        totals: Counter = Counter()
        for label, row in sorted(self.labels.items()):
            totals.update({g: row[g] for g in GROUPS})
            lines.append(f"{label:<{width}}  " + "  ".join(f"{row[g]:>9}" for g in GROUPS))
        lines.append(f"{'all':<{width}}  " + "  ".join(f"{totals[g]:>9}" for g in GROUPS))
        return lines


def summarise(job, processed: int, elapsed_s: float) -> FetchSummary:
    by_outcome: Counter = Counter()
    by_kind: Counter = Counter()
    labels: dict = defaultdict(lambda: dict.fromkeys(GROUPS, 0))
    for row in job.rows:
        record = job.manifest.last.get(row.source)
        outcome = record.outcome if record else "unfinished"
        by_outcome[outcome] += 1
        by_kind[kind_of(outcome) if record else "unfinished"] += 1
        labels[row.label][group_of(outcome) if record else "pending"] += 1
    for label, row in labels.items():
        row["folder"] = job.folders.get(label, "")
    return FetchSummary(
        out=str(job.store.root),
        inputs=len(job.rows),
        by_outcome=dict(sorted(by_outcome.items())),
        by_kind=dict(by_kind),
        labels=dict(labels),
        processed=processed,
        requests=job.requests,
        elapsed_s=round(elapsed_s, 3),
        urls_per_s=round(processed / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        stopped=job.stop.reason if job.stop.is_set() else "",
    )


def dry_run_summary(rows, settled, requests, out: str) -> FetchSummary:
    """Counts per label and per host, from parsing alone: nothing is requested or written."""
    by_outcome: Counter = Counter(r.outcome for r in settled)
    by_outcome["to_request"] = len(requests)
    labels: dict = defaultdict(lambda: dict.fromkeys(GROUPS, 0))
    for record in settled:
        labels[record.label][group_of(record.outcome)] += 1
    for row in requests:
        labels[row.label]["pending"] += 1
    hosts = Counter(urlsplit(r.url).netloc for r in requests)
    return FetchSummary(
        out=out,
        inputs=len(rows),
        by_outcome=dict(sorted(by_outcome.items())),
        by_kind={"to_request": len(requests), "settled": len(settled)},
        labels=dict(labels),
        dry_run=True,
        hosts=dict(hosts.most_common()),
    )

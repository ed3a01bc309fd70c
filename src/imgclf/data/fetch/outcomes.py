"""The closed list of what can become of one URL, and the manifest record that says it.

Every input row ends with exactly one last record in the manifest. Outcomes are of three kinds:

- *final*: the URL will not be asked for again (ok, duplicate, not_found, not_image, ...);
- *transient*: it may work later (timeouts, 5xx after the retries, rate limits); a rerun leaves
  them alone unless ``--retry-failed`` is given;
- *pending*: ``fetched`` (downloaded and checked, waiting for the duplicate and placeholder
  decisions that need every URL) and ``not_needed`` (its class already had ``max_per_class``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

GOOD = ("ok",)
KEPT_ELSEWHERE = ("duplicate", "duplicate_url")
PLACEHOLDER = ("placeholder", "suspected_placeholder")
FINAL = (
    GOOD
    + KEPT_ELSEWHERE
    + PLACEHOLDER
    + (
        "label_conflict",  # the same photo (or URL) under two labels: no file is kept
        "invalid_url",  # not http(s), no host, unparseable
        "blocked_address",  # a private, loopback or link-local address where only public ones are allowed
        "not_found",  # 404, 410
        "forbidden",  # 401, 403, 451
        "http_error",  # any other 4xx
        "too_many_redirects",  # more hops than max_redirects, or a loop
        "robots_denied",  # X-Robots-Tag noai / noimageai
        "not_image",  # HTML, JSON or another format by content
        "too_large",  # more bytes than max_bytes (said up front or found while streaming)
        "too_many_pixels",  # a decompression bomb, refused before decoding
        "decode_error",  # truncated or damaged image data
        "too_small",  # under min_side pixels, or min_bytes
        "bad_aspect",  # longer side over max_aspect times the shorter
        "import_failed",  # img2dataset could not fetch or resize it (its own error is kept)
    )
)
TRANSIENT = (
    "timeout",  # connect, read or the whole URL's deadline
    "connect_error",  # refused, unreachable, DNS
    "host_unreachable",  # the host's circuit breaker is open: not tried
    "incomplete",  # a short body or a reset connection
    "server_error",  # 408, 425, 5xx after the retries
    "rate_limited",  # 429 / 503 with a Retry-After over the cap
)
PENDING = ("fetched", "not_needed")
OUTCOMES = FINAL + TRANSIENT + PENDING
HAS_CONTENT = ("fetched", "ok", "duplicate", "label_conflict", "suspected_placeholder")


def kind_of(outcome: str) -> str:
    """final, transient or pending."""
    if outcome in FINAL:
        return "final"
    if outcome in TRANSIENT:
        return "transient"
    if outcome in PENDING:
        return "pending"
    raise ValueError(f"unknown outcome {outcome!r}")


def group_of(outcome: str) -> str:
    """The column of the per-label table: ok, placeholder, duplicate, conflict, failed or pending."""
    if outcome in GOOD:
        return "ok"
    if outcome in PLACEHOLDER:
        return "placeholder"
    if outcome in KEPT_ELSEWHERE:
        return "duplicate"
    if outcome == "label_conflict":
        return "conflict"
    if outcome in PENDING:
        return "pending"
    return "failed"


@dataclass
class Record:
    """One manifest line: what happened to one input row."""

    url: str
    label: str
    source: str  # input file and line, e.g. "lists/cats.txt:12"
    outcome: str
    attempts: int = 0
    status: int | None = None  # the last HTTP status
    final_url: str = ""
    bytes: int = 0
    sha256: str = ""
    width: int = 0
    height: int = 0
    format: str = ""
    path: str = ""  # relative to the data folder
    error: str = ""
    elapsed_s: float = 0.0
    extra: dict = field(default_factory=dict)  # phash, the redirect chain

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["kind"] = kind_of(self.outcome)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Record:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})

"""The embedded default job: scikit-learn's digits written out as a folder-per-class PNG data set
(:mod:`imgclf.data.digits`), then check -> train -> evaluate -> predict, through the same verbs
as everything else. The CLI shows what it returns."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from imgclf import api
from imgclf.core.events import Events, StopToken, channel, info
from imgclf.core.rundir import RunDir
from imgclf.data.digits import write_digits

DEMO_OVERRIDES = {
    "model": "cnn3",
    "image_size": 32,
    "epochs": 12,
    "batch_size": 32,
    "lr": 3e-3,
    "augment": "none",
    "patience": 0,
}


@dataclass
class DemoResult:
    status: str
    metrics: dict
    report: Path
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (path, predicted, true)


def run_demo(
    data_dir: str | Path = "demo_data/digits",
    out: str | Path = "runs/digits",
    *,
    events: Events | None = None,
    stop: StopToken | None = None,
) -> DemoResult:
    events, run = channel(events), RunDir(out)
    data = write_digits(data_dir)
    info(events, f"wrote the scikit-learn digits to {data}", str(data))
    report = api.check(data, events=events, stop=stop)
    info(events, f"check: {len(report.usable)} usable images, {len(report.problems)} problems")
    if (run / RunDir.METRICS).exists() or run.status == "finished":
        shutil.rmtree(run.path)  # a finished demo run is redone from scratch; a killed one continues
    resume = run.is_run
    result = api.train(data, out, None if resume else DEMO_OVERRIDES, events=events, stop=stop, resume=resume)
    if result.status != "finished":
        return DemoResult(result.status, {}, run / RunDir.REPORT_MD)
    clf = api.load(out, {"backend": "torch"}, events=events)
    paths = [str(p) for p in sorted(Path(data).glob("*/000*.png"))[:5]]
    examples = [(p, str(label), Path(p).parent.name) for p, label in zip(paths, clf.predict(paths))]
    return DemoResult(result.status, result.metrics or {}, run / RunDir.REPORT_MD, examples)

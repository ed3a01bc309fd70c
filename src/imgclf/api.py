"""Every verb of imgclf, in one signature shape::

    verb(source, out=None, settings=None, *, events=None, stop=None)

``source`` is what the verb reads (photos, or a run folder); ``out`` where it writes; ``settings``
a :class:`~imgclf.core.settings.Settings` or a dict of overrides (flat or by section); ``events``
a callable that receives :mod:`imgclf.core.events` (the library itself never prints); ``stop`` a
:class:`~imgclf.core.events.StopToken` that ends long work after its current step.

The CLI and the service are thin faces over these functions; ``import imgclf`` hands them on.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from imgclf.core.errors import SettingsError
from imgclf.core.events import Events, StopToken, channel, info, stop_token
from imgclf.core.rundir import RunDir
from imgclf.core.settings import Settings, as_settings, flat_overrides, from_dict
from imgclf.data.audit import AuditReport, audit
from imgclf.data.fetch import FetchSummary, fetch_urls
from imgclf.data.fetch.img2dataset import import_img2dataset
from imgclf.data.shards import ShardSummary, write_shards
from imgclf.data.sources import scan
from imgclf.evaluation import embed as embedding
from imgclf.evaluation import run as evaluation
from imgclf.evaluation.leaderboard import Leaderboard, leaderboard_row, parse_candidate, write_leaderboard
from imgclf.export import export as export_onnx
from imgclf.predictors import BasePredictor
from imgclf.predictors import load as load_predictor
from imgclf.training import fit
from imgclf.training.budget import REASON as BUDGET_REASON
from imgclf.training.distributed import is_main_process

__all__ = ["check", "fetch", "shard", "train", "evaluate", "load", "export", "compare", "embed", "similar"]

PathLike = str | os.PathLike


def check(
    source: PathLike,
    out: PathLike | None = None,
    settings: Settings | dict | None = None,
    *,
    events: Events | None = None,
    stop: StopToken | None = None,
) -> AuditReport:
    """Audit a data source: every image decoded once; problems, duplicates and counts reported.
    ``out``: a file to write the full report to as JSON."""
    settings = as_settings(settings)
    report = audit(scan(source, settings.data.allow_outside), settings.data, settings.system, events, stop)
    if out is not None:
        report.write_json(out)
    return report


def fetch(
    source: PathLike | list[PathLike],
    out: PathLike = "data",
    settings: Settings | dict | None = None,
    *,
    names: PathLike | None = None,
    placeholders: list[PathLike] = (),
    retry_failed: bool = False,
    dry_run: bool = False,
    from_img2dataset: bool = False,
    label_column: str = "label",
    events: Events | None = None,
    stop: StopToken | None = None,
) -> FetchSummary:
    """Class folders under ``out`` from lists of image URLs (``source``: files or folders of them),
    with every URL's outcome in ``out/.imgclf/fetch/manifest.jsonl``; a rerun resumes. With
    ``from_img2dataset``, ``source`` is an img2dataset output folder to convert instead."""
    settings = as_settings(settings)
    inputs = list(source) if isinstance(source, (list, tuple)) else [source]
    if from_img2dataset:
        return import_img2dataset(
            inputs[0], out, settings, channel(events), stop_token(stop), label_column=label_column,
            placeholders=list(placeholders),
        )  # fmt: skip
    return fetch_urls(
        inputs, out, settings, channel(events), stop_token(stop), names=names, placeholders=list(placeholders),
        retry_failed=retry_failed, dry_run=dry_run,
    )  # fmt: skip


def train(
    source: PathLike | None,
    out: PathLike = "runs/run",
    settings: Settings | dict | None = None,
    *,
    events: Events | None = None,
    stop: StopToken | None = None,
    resume: bool | str = False,
    evaluate: bool = True,
) -> fit.TrainResult:
    """Train a classifier on ``source`` into the run folder ``out``, then calibrate it on the
    validation split and report on the test split. ``resume=True`` continues the run in ``out``
    (``settings`` may then change only the system section); ``resume="auto"`` continues it when
    ``out`` holds a run and starts it otherwise (one command for every torchrun restart). A run
    stopped at its time budget is evaluated too: its best model so far is what the budget bought."""
    started, events, stop = time.monotonic(), channel(events), stop_token(stop)
    source = None if resume is True or source is None else str(source)
    result = fit.train(source, str(out), settings, events=events, stop=stop, resume=resume, started=started)
    run = RunDir(out)
    budget_stop = result.status == "stopped" and result.reason == BUDGET_REASON and (run / RunDir.WEIGHTS).exists()
    if (result.status == "finished" or budget_stop) and evaluate and is_main_process():
        resolved = from_dict(run.read_json(RunDir.SETTINGS))  # what the run used, "auto"s decided
        result.metrics = evaluation.after_training(out, result.logits, resolved, events, stop)
        _compare_with_plan(run, time.monotonic() - started, events)
    return result


def _compare_with_plan(run: RunDir, seconds: float, events: Events) -> None:
    """Say how long the run took against the time its plan predicted, and record both."""
    plan = run.read_run().get("plan")
    if not plan or not is_main_process():
        return
    predicted, budget = plan.get("predicted_s", 0.0), plan.get("budget_s", 0.0)
    run.update_run(plan={**plan, "actual_s": round(seconds, 1)})
    off = f" ({100 * (seconds - predicted) / predicted:+.0f}%)" if predicted else ""
    of_budget = f" of a {budget / 60:.1f} min budget" if budget else ""
    info(events, f"the run took {seconds / 60:.1f} min; its plan predicted {predicted / 60:.1f} min{off}{of_budget}")


def evaluate(
    source: PathLike,
    out: PathLike | None = None,
    settings: Settings | dict | None = None,
    *,
    data: PathLike | None = None,
    events: Events | None = None,
    stop: StopToken | None = None,
) -> dict:
    """Evaluate the run in ``source`` on its test split, or on other labelled ``data``; metrics.json,
    the pictures and the reports go to ``out`` (the run folder by default)."""
    return evaluation.evaluate(source, None if data is None else str(data), out, as_settings(settings), events, stop)


def load(
    source: PathLike,
    settings: Settings | dict | None = None,
    *,
    backend: str | None = None,
    int8: bool | None = None,
    events: Events | None = None,
) -> BasePredictor:
    """A predictor (``predict``, ``predict_proba``, ``classes_``, ``predict_files``) for a run
    folder, model bundle or ONNX export. ``backend`` and ``int8`` default to the predict settings."""
    settings = as_settings(settings)
    p, s = settings.predict, settings.system
    return load_predictor(
        source,
        p.backend if backend is None else backend,
        int8=p.int8 if int8 is None else int8,
        batch_size=p.predict_batch_size,
        device=s.device,
        precision=s.precision,
        max_pixels=s.max_pixels,
        events=events,
    )


def export(
    source: PathLike,
    out: PathLike | None = None,
    settings: Settings | dict | None = None,
    *,
    int8: bool = False,
    events: Events | None = None,
    stop: StopToken | None = None,
) -> dict:
    """The run's model as ONNX (and int8 with ``int8=True``), checked against PyTorch, in ``out``
    (``RUN_DIR/onnx`` by default)."""
    return export_onnx(source, out, int8, as_settings(settings), events, stop)


def compare(
    source: PathLike,
    out: PathLike = "runs/compare",
    settings: Settings | dict | None = None,
    *,
    candidates: list[str],
    per_class: list[int] | None = None,
    events: Events | None = None,
    stop: StopToken | None = None,
) -> Leaderboard:
    """Train every candidate (``MODEL[:MODE]``, at every ``per_class`` size) on the same split and
    seed into ``out/<name>/``, rank them by validation top-1, keep the best in ``out/best``."""
    out, events, stop = Path(out), channel(events), stop_token(stop)
    overrides = flat_overrides(settings.to_dict() if isinstance(settings, Settings) else dict(settings or {}))
    chosen = [parse_candidate(spec) for spec in candidates]
    if not chosen:
        raise SettingsError("--models: give at least one candidate (MODEL[:MODE], comma-separated)")
    as_settings(overrides)  # refuse bad settings before any training
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in per_class or [0]:
        for spec, candidate in zip(candidates, chosen):
            run_dir = out / (spec.strip().replace(":", "-") + (f"-n{size}" if size else ""))
            if run_dir.exists():
                shutil.rmtree(run_dir)
            info(events, f"== {spec}{f' with {size} photos per class' if size else ''} ==")
            started = time.perf_counter()
            result = train(source, run_dir, {**overrides, **candidate, "per_class": size}, events=events, stop=stop)
            if result.status != "finished":
                stop.check()
            rows.append(leaderboard_row(spec, size, run_dir, time.perf_counter() - started))
    board = write_leaderboard(rows, out, per_class)
    info(
        events,
        f"best by validation top-1: {board.best['candidate']} (val {board.best['val_top1']:.3f}, test "
        f"{board.best['test_top1']:.3f}); its bundle is in {out / 'best'}",
        str(out / "best"),
    )
    return board


def embed(
    source: PathLike,
    out: PathLike,
    settings: Settings | dict | None = None,
    *,
    data: PathLike | None = None,
    events: Events | None = None,
    stop: StopToken | None = None,
) -> Path:
    """Embeddings of ``data`` (default: the run's own images) for TensorBoard's projector, as NumPy,
    and as PCA/t-SNE maps, in ``out``."""
    settings = as_settings(settings)
    clf = evaluation.load_for_evaluation(Path(source), settings)
    return embedding.embed(clf, source, None if data is None else str(data), out, events, stop)


def similar(
    source: PathLike,
    query: PathLike,
    settings: Settings | dict | None = None,
    *,
    k: int = 8,
    events: Events | None = None,
    stop: StopToken | None = None,
) -> list[dict]:
    """The ``k`` training photos of the run in ``source`` nearest to the image ``query``."""
    settings = as_settings(settings)
    clf = evaluation.load_for_evaluation(Path(source), settings)
    return embedding.similar(clf, source, str(query), k, events, stop)


def shard(
    source: PathLike,
    out: PathLike,
    settings: Settings | dict | None = None,
    *,
    events: Events | None = None,
    stop: StopToken | None = None,
) -> ShardSummary:
    """WebDataset tar shards of ``source`` in ``out``, with byte-offset indexes, ``classes.json``,
    ``stats.json`` and timm's ``_info.json``; audited and split as a training on ``source`` would
    be, so ``out`` trains the same model. A rerun finishes a killed one; ``shard_part`` ("i/N")
    writes one machine's share. See docs/shards.md."""
    return write_shards(source, out, as_settings(settings), channel(events), stop_token(stop))

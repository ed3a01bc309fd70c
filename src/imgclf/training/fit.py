"""``train``: data -> audited split -> model -> epochs with checkpoints -> best bundle.

Read top to bottom: :func:`train` prepares (or, resuming, loads) the job, fits a transfer head
when the mode has one, then trains the layers epoch by epoch. Evaluation is not done here:
:func:`imgclf.api.train` calls :mod:`imgclf.evaluation` on the result. A run folder holds
everything (see :class:`~imgclf.core.rundir.RunDir`); a killed or stopped run continues exactly.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from imgclf.bundle import save_bundle
from imgclf.core.errors import Stopped, TrainError, last_line, out_of_memory
from imgclf.core.events import EpochEnd, Events, StopToken, channel, ignore, info, stop_token
from imgclf.core.meta import LEVEL_SEP, META
from imgclf.core.rundir import RunDir
from imgclf.core.settings import Settings, as_settings, asked_settings
from imgclf.models.factory import freeze_early_layers
from imgclf.models.heads import head_info, install_saved_head
from imgclf.training.budget import REASON as BUDGET_REASON
from imgclf.training.budget import BudgetStop
from imgclf.training.checkpoint import save_checkpoint
from imgclf.training.data_setup import Loaders, build_loaders
from imgclf.training.distributed import (
    Distributed,
    average_batch_norm,
    gather_to_main,
    init_distributed,
    leave_distributed,
    run_on_main,
    share_from_main,
    sum_over_ranks,
    unwrap,
)
from imgclf.training.engines import feature_engine
from imgclf.training.head import HeadFit
from imgclf.training.job import Job, load_job, prepare_job
from imgclf.training.loop import (
    EpochControl,
    EpochProgress,
    NonFiniteLossError,
    TrainStep,
    evaluate_logits,
    summarize_logits,
    train_one_epoch,
)
from imgclf.training.optim import build_step, loop_epochs
from imgclf.training.plan import budget_seconds, make_plan
from imgclf.training.split import split_training
from imgclf.training.state import HISTORY_FIELDS, RunState, checkpoint_state, restore_state, write_history
from imgclf.training.transfer import SplitFeatures, fit_transfer_head


@dataclass
class TrainResult:
    run_dir: str
    status: str  # "finished", "stopped" (stop token or max_steps: resumable)
    epochs_done: int
    best_epoch: int
    metrics: dict | None = None
    reason: str = ""  # why it stopped: the stop token's reason ("time budget" when the run stopped itself)
    # head mode: the fitted head's logits on the val and test features ({split: (logits, samples)}),
    # from which evaluation calibrates and reports without running the backbone again
    logits: dict | None = field(default=None, repr=False)


def train(
    source: str | None,
    out: str,
    settings: Settings | dict | None = None,
    *,
    events: Events | None = None,
    stop: StopToken | None = None,
    resume: bool | str = False,
    started: float | None = None,
) -> TrainResult:
    """Train a classifier on ``source`` into the run folder ``out``, or continue it (``resume``;
    ``"auto"``: continue the run in ``out`` when there is one, else start it, so that one command
    serves every attempt under ``torchrun --max-restarts``). ``started`` (time.monotonic()) is
    when the time budget began: by default, now."""
    started = time.monotonic() if started is None else started
    ranks = init_distributed()
    if resume == "auto":
        resume = share_from_main(RunDir(out).is_run, ranks)  # decided once: rank 0 may be creating it
        settings = asked_settings(settings) if resume else settings
    events = channel(events) if ranks.is_main else ignore  # the one guard: only rank 0 reports
    run = RunDir(out)
    # one training per run folder: a new one refuses at once, a resumed one waits a while for a
    # stopping one to write its last checkpoint (the service's next attempt after a kill)
    holder = run.lock(120.0 if resume else 0.0) if ranks.is_main else contextlib.nullcontext()
    try:
        with holder:
            result = _train(source, run, settings, events, stop_token(stop).child(), resume, started, ranks)
        leave_distributed(ranks)
        return result
    except TimeoutError as exc:
        raise TrainError(f"{exc}; wait for it to end, or train into another --out") from None
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not out_of_memory(exc):
            raise
        saved = RunDir(out).read_json(RunDir.SETTINGS, {}).get("train", {}) if resume else {}
        batch = saved.get("batch_size", 0) if resume else as_settings(settings).train.batch_size
        smaller = f"try --batch-size {max(1, batch // 2)}" if batch else "try a smaller --batch-size"
        raise TrainError(
            f"out of memory ({last_line(exc)}); {smaller}, a smaller --image-size, or close other programs; "
            f"a run that had started continues with: imgclf train --resume {out}"
        ) from None


def _train(
    source, run: RunDir, settings, events: Events, stop: StopToken, resume: bool, started: float, ranks
) -> TrainResult:
    """The body of :func:`train`; ``stop`` is the run's own child token (it may stop itself at its budget)."""
    out, timer = run.path, None
    try:
        job, model = _prepare(source, run, settings, events, stop, resume, started, ranks)
        timer = _budget_timer(job, stop, started)
        if job.mode in ("head", "finetune") and not run.has_checkpoint:
            fitted = run_on_main(ranks, lambda: _fit_head(job, model, events, stop))
            if job.mode == "head":
                return _finish_head(job, model, *fitted) if ranks.is_main else TrainResult(str(out), "finished", 1, 1)
            install_saved_head(model, run.read_run())  # the other processes' heads take its shape; DDP its weights
        return _train_layers(job, model, events, stop, timer)
    except Stopped as exc:
        if ranks.is_main and run.is_run:
            run.update_run(status="stopped")
            info(events, f"stopped ({exc.reason}); continue with: imgclf train --resume {out}")
        elif ranks.is_main:  # stopped in the scan or the check, before run.json
            info(
                events,
                f"stopped ({exc.reason}) before the run was set up in {out}: nothing to resume; the same "
                "command starts it again (or add --resume auto), and the files checked so far are not checked again",
            )
        return TrainResult(str(out), "stopped", 0, 0, reason=exc.reason)
    finally:
        if timer is not None:
            timer.cancel()


def _prepare(source, run: RunDir, settings, events, stop, resume: bool, started: float, ranks):
    """Rank 0 scans, audits and splits the data once, builds the network and plans the run (or
    loads all of it, resuming); the other processes then load what it recorded, as a resumed run
    does, so every process trains on the same split, settings and plan."""

    def main_prepares():
        if resume:
            job, model = load_job(run, settings, ranks, events)
        else:
            job, model = prepare_job(source, run, as_settings(settings), ranks, events, stop)
        model = model.to(job.runtime.device, memory_format=job.runtime.memory_format)
        if not run.read_run().get("plan"):  # a resumed run keeps the plan it was given
            job, _ = make_plan(job, model, events, stop, started)
        return job, model

    prepared = run_on_main(ranks, main_prepares)
    if ranks.is_main:
        return prepared
    job, model = load_job(run, settings if resume else {}, ranks, ignore)
    return job, model.to(job.runtime.device, memory_format=job.runtime.memory_format)


def _fit_head(job: Job, model: nn.Module, events: Events, stop: StopToken):
    """The transfer head, fitted on frozen features (rank 0: the features are computed once)."""
    engine = feature_engine(model, job, None, events)  # as the plan measured and remembered
    fit, features = fit_transfer_head(
        model, job.data, job.settings, job.prep, job.runtime, job.source, events, stop, engine
    )
    job.run.update_run(head=head_info(model, job.settings.model.head_hidden))
    return fit, features


def _budget_timer(job: Job, stop: StopToken, started: float) -> BudgetStop | None:
    """Set the run's stop token when the time budget, less the evaluation still to come, is spent
    (deferred until the run has a first model: training/budget.py)."""
    budget = budget_seconds(job.settings.system.time_budget, job.runtime)
    if not budget:
        return None
    reserve = job.run.read_run().get("plan", {}).get("stages", {}).get("evaluate", 0.0)
    has_model = (job.run.path / META).exists()
    return BudgetStop(stop, started + budget - reserve - time.monotonic(), has_model)


def _bundle_meta(job: Job, model: nn.Module, row: dict) -> dict:
    depth = max(label.count(LEVEL_SEP) + 1 for label in job.data.classes)
    return {
        "architecture": job.settings.model.model,
        "classes": job.data.classes,
        "mode": job.mode,
        "head": head_info(unwrap(model), job.settings.model.head_hidden),
        "hierarchy": {"separator": LEVEL_SEP, "depth": depth} if depth > 1 else None,
        "preprocessing": job.prep.to_dict(),
        "settings": job.settings.to_dict(),
        "epoch": row["epoch"],
        "metrics": {"val_loss": row["val_loss"], "val_top1": row["val_top1"], "val_top5": row["val_top5"]},
    }


def gather_logits(model: nn.Module, loader, runtime, prep, ranks: Distributed, events: Events, reported: set):
    """Logits and targets of a loader over a :class:`~imgclf.data.dataset.ShareSampler`: each
    process evaluates its share, rank 0 puts them back in order (None elsewhere), so that what it
    scores is what one process evaluating everything would score."""
    logits, targets = evaluate_logits(model, loader, runtime, prep, events, reported)
    shares = gather_to_main((logits, targets), ranks)
    if shares is None:
        return None
    shares = [(lg, tg) for lg, tg in shares if len(tg)]
    if not shares:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat([lg for lg, _ in shares]), torch.cat([tg for _, tg in shares])


def _validate(step: TrainStep, loaders: Loaders, ctx: dict) -> dict:
    """Loss, top-1 and top-5 on the validation split, scored on rank 0 and told to every process
    (early stopping is decided alike everywhere)."""
    val = {"loss": math.nan, "top1": math.nan, "top5": math.nan}
    if loaders.val is None:
        return val
    gathered = gather_logits(
        unwrap(step.model), loaders.val, step.runtime, step.prep, step.ranks, ctx["events"], step.reported
    )
    if gathered is not None:
        val = summarize_logits(*gathered, step.loss_fn)
    return share_from_main(val, step.ranks)


def _epoch_row(step: TrainStep, loaders: Loaders, state: RunState, progress: EpochProgress, ctx: dict) -> dict:
    val = _validate(step, loaders, ctx)
    seen, loss_sum, correct = sum_over_ranks([progress.seen, progress.loss_sum, progress.correct], step.ranks)
    seen = max(seen, 1)
    return {
        "epoch": state.epoch + 1,
        "train_loss": round(loss_sum / seen, 5),
        "train_acc": round(correct / seen, 5),
        "val_loss": round(val["loss"], 5),
        "val_top1": round(val["top1"], 5),
        "val_top5": round(val["top5"], 5),
        "lr": step.optimizer.param_groups[0]["lr"],
        "seconds": round(progress.seconds, 2),
        "images_per_s": round(seen / max(progress.seconds, 1e-9), 1),
    }


def _save_checkpoint(step: TrainStep, state: RunState, job: Job) -> None:
    """Batch-norm statistics averaged over the processes first (in every process, so that a
    resumed run goes on from the same statistics), then rank 0 writes."""
    average_batch_norm(step.model, job.ranks)
    if job.ranks.is_main:
        save_checkpoint(checkpoint_state(step, state), job.run / RunDir.CHECKPOINT)


def _end_of_epoch(step: TrainStep, loaders: Loaders, state: RunState, progress: EpochProgress, ctx: dict) -> bool:
    """Validate, record, keep the best bundle, checkpoint. Returns True when patience ran out."""
    job: Job = ctx["job"]
    average_batch_norm(step.model, job.ranks)
    row = _epoch_row(step, loaders, state, progress, ctx)
    state.history.append(row)
    score = row["val_loss"] if loaders.val is not None else row["train_loss"]
    improved = score < state.best_loss - 1e-6
    if improved:
        state.best_loss, state.best_epoch, state.bad_epochs = score, row["epoch"], 0
        if job.ranks.is_main:
            save_bundle(job.run.path, unwrap(step.model), _bundle_meta(job, step.model, row))
    else:
        state.bad_epochs += 1
    over = ctx["budget"].model_made() if ctx["budget"] is not None else None
    if over is not None:
        info(
            ctx["events"],
            f"the time budget ran out {over:.0f} s before the first model was ready; training ends with it",
        )
    state.epoch, state.global_step, state.progress = state.epoch + 1, state.global_step + progress.step, None
    epochs = loop_epochs(job.settings)
    _save_checkpoint(step, state, job)
    if job.ranks.is_main:
        write_history(job.run / RunDir.HISTORY, state.history)
        for key in HISTORY_FIELDS[1:]:
            ctx["writer"].add_scalar(key, row[key], row["epoch"])
        ctx["writer"].flush()
    epoch_seconds = time.perf_counter() - ctx["epoch_started"]  # views, steps and validation
    ctx["events"](EpochEnd(row, epochs, improved, (epochs - state.epoch) * epoch_seconds + ctx["reserve"]))
    patience = job.settings.train.patience
    return bool(patience) and state.bad_epochs >= patience and job.mode != "finetune"


def _run_epochs(step: TrainStep, loaders: Loaders, state: RunState, ctx: dict) -> str:
    """The epoch loop. Returns "finished", "early-stopped" or "stopped" (resumable)."""
    job: Job = ctx["job"]
    t, epochs = job.settings.train, loop_epochs(job.settings)

    def save_mid_epoch(progress: EpochProgress) -> None:
        state.progress = progress
        _save_checkpoint(step, state, job)
        state.progress = None

    while state.epoch < epochs:
        progress = state.progress or EpochProgress()
        loaders.sampler.set_epoch(state.epoch, skip_steps=progress.step)
        ctx["epoch_started"] = time.perf_counter() - progress.seconds
        if ctx["views"] is not None:
            ctx["views"].compute(state.epoch, ctx["events"], ctx["stop"])
        control = EpochControl(
            ctx["stop"], t.max_steps, state.global_step, job.settings.system.checkpoint_minutes * 60, save_mid_epoch
        )
        progress, interrupted = train_one_epoch(
            step, loaders.train, progress, control, state.epoch, epochs, ctx["events"]
        )
        if interrupted:  # agreed by every process at the same step
            state.progress = progress
            _save_checkpoint(step, state, job)
            return "stopped"
        if _end_of_epoch(step, loaders, state, progress, ctx):
            info(
                ctx["events"],
                f"early stop: validation loss has not improved for {t.patience} epochs "
                f"(best at epoch {state.best_epoch})",
            )
            return "early-stopped"
    return "finished"


def _train_layers(
    job: Job, model: nn.Module, events: Events, stop: StopToken, budget: BudgetStop | None = None
) -> TrainResult:
    """Train the network's layers epoch by epoch (full or finetune mode), from the checkpoint when
    there is one."""
    from torch.utils.tensorboard import SummaryWriter  # TensorBoard's import is slow; only training needs it

    t, run = job.settings.train, job.run
    if job.mode == "finetune":
        frozen = freeze_early_layers(model, t.freeze_stride)
        if frozen:
            info(events, f"finetune: {frozen} parameter tensors up to stride {t.freeze_stride} stay frozen")
    loaders = build_loaders(job.data, job.prep, job.settings, job.ranks, events, stop)
    step = build_step(model, job, loaders, job.ranks)
    views = split_training(step, job, loaders) if job.mode == "finetune" else None
    resuming = run.has_checkpoint
    state = restore_state(step, run / RunDir.CHECKPOINT) if resuming else RunState()
    if resuming and job.ranks.is_main:
        _record_resume(job, state)
    info(
        events,
        f"training {job.settings.model.model} ({job.mode}) on {len(loaders.train_dataset)} images, "
        f"{len(job.data.classes)} classes ({job.runtime.describe()}"
        f"{'; frozen layers apart, the rest in ' + ('bf16' if step.runtime.dtype else 'fp32') if views else ''})"
        f"{f', resuming at epoch {state.epoch + 1}' if resuming else ''}",
    )
    ctx = {
        "job": job,
        "events": events,
        "stop": stop,
        "views": views,
        "budget": budget,
        "reserve": run.read_run().get("plan", {}).get("stages", {}).get("evaluate", 0.0),
        "writer": SummaryWriter(str(run / RunDir.TENSORBOARD)) if job.ranks.is_main else None,
    }
    started = time.perf_counter()
    try:
        status = _run_epochs(step, loaders, state, ctx)
    except NonFiniteLossError as exc:
        if job.ranks.is_main:
            run.update_run(status="failed", message=str(exc))
        raise TrainError(f"{exc}. The best model so far (epoch {state.best_epoch}) is kept in {run}.") from None
    finally:
        if ctx["writer"] is not None:
            ctx["writer"].close()
    result = TrainResult(
        str(run),
        "stopped" if status == "stopped" else "finished",
        state.epoch,
        state.best_epoch,
        reason=stop.reason if status == "stopped" else "",
    )
    if job.ranks.is_main:
        run.update_run(
            status=result.status,
            epochs_done=state.epoch,
            best_epoch=state.best_epoch,
            train_seconds=round(time.perf_counter() - started, 1),
        )
        if status == "stopped" and result.reason == BUDGET_REASON:
            info(
                events,
                f"stopped at the time budget after {state.epoch} epochs, the best (epoch {state.best_epoch}) "
                f"kept; continue with: imgclf train --resume {run} --time-budget LONGER",
            )
        elif status == "stopped":
            info(events, f"stopped with a checkpoint; continue with: imgclf train --resume {run}")
    return result


def _record_resume(job: Job, state: RunState) -> None:
    """run.json keeps a line per resumption: where it went on from, with how many processes, and
    torchrun's restart count when torchrun restarted it."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    entry = {
        "epoch": state.epoch + 1,
        "step": state.progress.step if state.progress else 0,
        "world_size": job.ranks.world_size,
        "torchrun_restart": int(restart) if restart is not None else None,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    job.run.update_run(resumes=[*job.run.read_run().get("resumes", []), entry])


def _finish_head(job: Job, model: nn.Module, fit: HeadFit, features: dict[str, SplitFeatures]) -> TrainResult:
    """Head mode: the fitted head is the model. Save it like a trained epoch, and hand on its
    logits on the val and test features for evaluation (the head applied to them gives the
    model's logits, so the backbone need not run again)."""
    row = {
        "epoch": 1,
        "train_loss": round(fit.train_loss, 5),
        "train_acc": round(fit.train_acc, 5),
        "val_loss": round(fit.val_loss, 5),
        "val_top1": round(fit.val_top1, 5),
        "val_top5": math.nan,
        "lr": math.nan,
        "seconds": math.nan,
        "images_per_s": math.nan,
    }
    result = TrainResult(str(job.run), "finished", 1, 1)
    if not job.ranks.is_main:
        return result
    model = model.cpu()
    save_bundle(job.run.path, model, _bundle_meta(job, model, row))
    write_history(job.run / RunDir.HISTORY, [row])
    job.run.update_run(status="finished", epochs_done=1, best_epoch=1)
    head = fit.head.cpu().eval()
    with torch.no_grad():
        result.logits = {
            split: (head(f.x).numpy(), f.samples)
            for split, f in features.items()
            if split != "train" and len(f.samples)
        }
    return result

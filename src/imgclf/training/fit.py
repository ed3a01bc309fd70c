"""``train``: data -> audited split -> model -> epochs with checkpoints -> best bundle.

Read top to bottom: :func:`train` prepares (or, resuming, loads) the job, fits a transfer head
when the mode has one, then trains the layers epoch by epoch. Evaluation is not done here:
:func:`imgclf.api.train` calls :mod:`imgclf.evaluation` on the result. A run folder holds
everything (see :class:`~imgclf.core.rundir.RunDir`); a killed or stopped run continues exactly.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from imgclf.bundle import save_bundle
from imgclf.core.errors import Stopped, TrainError
from imgclf.core.events import EpochEnd, Events, StopToken, channel, ignore, info, stop_token
from imgclf.core.meta import LEVEL_SEP
from imgclf.core.rundir import RunDir
from imgclf.core.settings import Settings, as_settings
from imgclf.models.factory import freeze_early_layers
from imgclf.models.heads import classifier_name, head_info
from imgclf.training.checkpoint import save_checkpoint
from imgclf.training.data_setup import Loaders, build_loaders
from imgclf.training.distributed import broadcast_flag, init_distributed, unwrap, wrap_model
from imgclf.training.engines import feature_engine
from imgclf.training.head import HeadFit, class_weights
from imgclf.training.job import Job, load_job, prepare_job
from imgclf.training.loop import (
    EpochProgress,
    NonFiniteLossError,
    TrainStep,
    evaluate_logits,
    summarize_logits,
    train_one_epoch,
)
from imgclf.training.plan import budget_seconds, make_plan
from imgclf.training.split import split_training
from imgclf.training.state import HISTORY_FIELDS, RunState, checkpoint_state, restore_state, write_history
from imgclf.training.transfer import SplitFeatures, fit_transfer_head, use_class_weights


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
    resume: bool = False,
    started: float | None = None,
) -> TrainResult:
    """Train a classifier on ``source`` into the run folder ``out``, or continue it (``resume``).
    ``started`` (time.monotonic()) is when the time budget began: by default, now."""
    started = time.monotonic() if started is None else started
    ranks = init_distributed()
    events = channel(events) if ranks.is_main else ignore  # the one guard: only rank 0 reports
    run = RunDir(out)
    # one training per run folder: a new one refuses at once, a resumed one waits a while for a
    # stopping one to write its last checkpoint (the service's next attempt after a kill)
    holder = run.lock(120.0 if resume else 0.0) if ranks.is_main else contextlib.nullcontext()
    try:
        with holder:
            return _train(source, run, settings, events, stop_token(stop).child(), resume, started, ranks)
    except TimeoutError as exc:
        raise TrainError(f"{exc}; wait for it to end, or train into another --out") from None
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not out_of_memory(exc):
            raise
        saved = RunDir(out).read_json(RunDir.SETTINGS, {}).get("train", {}) if resume else {}
        batch = saved.get("batch_size", 0) if resume else as_settings(settings).train.batch_size
        smaller = f"try --batch-size {max(1, batch // 2)}" if batch else "try a smaller --batch-size"
        raise TrainError(
            f"out of memory ({_last_line(exc)}); {smaller}, a smaller --image-size, or close other programs; "
            f"a run that had started continues with: imgclf train --resume {out}"
        ) from None


def out_of_memory(exc: BaseException) -> bool:
    """A failed allocation, on a GPU (torch.OutOfMemoryError) or in the CPU's memory (PyTorch's
    allocator raises a plain RuntimeError; Python a MemoryError), anywhere in a run: feature
    extraction, planning and evaluation as well as the epochs."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return "can't allocate memory" in text or "not enough memory" in text or "out of memory" in text.lower()


def _last_line(exc: BaseException) -> str:
    """The line that says what failed (PyTorch's allocator puts it last)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]


def _train(
    source, run: RunDir, settings, events: Events, stop: StopToken, resume: bool, started: float, ranks
) -> TrainResult:
    """The body of :func:`train`; ``stop`` is the run's own child token (it may stop itself at its budget)."""
    out, timer = run.path, None
    try:
        if resume:
            job, model = load_job(run, settings, ranks, events)
        else:
            job, model = prepare_job(source, run, as_settings(settings), ranks, events, stop)
        model = model.to(job.runtime.device, memory_format=job.runtime.memory_format)
        if not run.read_run().get("plan"):  # a resumed run keeps the plan it was given
            job, _ = make_plan(job, model, events, stop, started)
        timer = _budget_timer(job, stop, started)
        if job.mode in ("head", "finetune") and not run.has_checkpoint:
            engine = feature_engine(model, job, None, events)  # as the plan measured and remembered
            fit, features = fit_transfer_head(
                model, job.data, job.settings, job.prep, job.runtime, job.source, events, stop, engine
            )
            if ranks.is_main:
                run.update_run(head=head_info(model, job.settings.model.head_hidden))
            if job.mode == "head":
                return _finish_head(job, model, fit, features)
        return _train_layers(job, model, events, stop)
    except Stopped as exc:
        if ranks.is_main and run.is_run:
            run.update_run(status="stopped")
            info(events, f"stopped ({exc.reason}); continue with: imgclf train --resume {out}")
        return TrainResult(str(out), "stopped", 0, 0, reason=exc.reason)
    finally:
        if timer is not None:
            timer.cancel()


def _budget_timer(job: Job, stop: StopToken, started: float):
    """Set the run's stop token when the time budget, less the evaluation still to come, is spent."""
    budget = budget_seconds(job.settings.system.time_budget, job.runtime)
    if not budget:
        return None
    reserve = job.run.read_run().get("plan", {}).get("stages", {}).get("evaluate", 0.0)
    return stop.set_after(started + budget - reserve - time.monotonic(), "time budget")


def _optimizer(model: nn.Module, settings: Settings) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation weights (1-D parameters). In finetune
    mode the pretrained layers learn ``backbone_lr_scale`` times slower than the new head."""
    t = settings.train
    head_prefix = classifier_name(unwrap(model)) + "."
    groups = []
    for is_head in (False, True):
        scale = 1.0 if is_head or t.mode != "finetune" else t.backbone_lr_scale
        params = [
            (n, p)
            for n, p in unwrap(model).named_parameters()
            if p.requires_grad and n.startswith(head_prefix) == is_head
        ]
        groups += [
            {"params": [p for _, p in params if p.ndim > 1], "weight_decay": t.weight_decay, "lr": t.lr * scale},
            {"params": [p for _, p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": t.lr * scale},
        ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr)


def loop_epochs(settings: Settings) -> int:
    return settings.train.finetune_epochs if settings.train.mode == "finetune" else settings.train.epochs


def _scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, settings: Settings):
    """Linear warm-up, then cosine decay to 1% of the peak, stepped every optimisation step."""
    total = max(1, loop_epochs(settings) * steps_per_epoch)
    warmup = min(total - 1, int(settings.train.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.01 + 0.99 * step / max(1, warmup)
        done = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


def _epoch_row(step: TrainStep, loaders: Loaders, state: RunState, progress: EpochProgress, ctx: dict) -> dict:
    val = {"loss": math.nan, "top1": math.nan, "top5": math.nan}
    if loaders.val is not None:
        logits, targets = evaluate_logits(
            unwrap(step.model), loaders.val, step.runtime, step.prep, ctx["events"], step.reported
        )
        val = summarize_logits(logits, targets, step.loss_fn)
    summary = progress.summary()
    return {
        "epoch": state.epoch + 1,
        "train_loss": round(summary["train_loss"], 5),
        "train_acc": round(summary["train_acc"], 5),
        "val_loss": round(val["loss"], 5),
        "val_top1": round(val["top1"], 5),
        "val_top5": round(val["top5"], 5),
        "lr": step.optimizer.param_groups[0]["lr"],
        "seconds": round(progress.seconds, 2),
        "images_per_s": round(summary["images_per_s"], 1),
    }


def _end_of_epoch(step: TrainStep, loaders: Loaders, state: RunState, progress: EpochProgress, ctx: dict) -> bool:
    """Validate, record, keep the best bundle, checkpoint. Returns True when patience ran out."""
    job: Job = ctx["job"]
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
    state.epoch, state.global_step, state.progress = state.epoch + 1, state.global_step + progress.step, None
    epochs = loop_epochs(job.settings)
    if job.ranks.is_main:
        save_checkpoint(checkpoint_state(step, state), job.run / RunDir.CHECKPOINT)
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
    while state.epoch < epochs:
        progress = state.progress or EpochProgress()
        if progress.step == 0:  # each epoch's dropout/RNG stream depends only on (seed, epoch)
            torch.manual_seed(t.seed * 7919 + state.epoch)
        loaders.sampler.set_epoch(state.epoch, skip=progress.step * t.batch_size)
        ctx["epoch_started"] = time.perf_counter() - progress.seconds
        if ctx["views"] is not None:
            ctx["views"].compute(state.epoch, ctx["events"], ctx["stop"])
        progress, interrupted = train_one_epoch(
            step,
            loaders.train,
            progress,
            ctx["stop"],
            state.epoch,
            epochs,
            ctx["events"],
            t.max_steps,
            state.global_step,
        )
        if broadcast_flag(interrupted, job.ranks):
            state.progress = progress
            if job.ranks.is_main:
                save_checkpoint(checkpoint_state(step, state), job.run / RunDir.CHECKPOINT)
            return "stopped"
        if _end_of_epoch(step, loaders, state, progress, ctx):
            info(
                ctx["events"],
                f"early stop: validation loss has not improved for {t.patience} epochs "
                f"(best at epoch {state.best_epoch})",
            )
            return "early-stopped"
    return "finished"


def _build_step(model: nn.Module, job: Job, loaders: Loaders) -> TrainStep:
    settings, num_classes = job.settings, len(job.data.classes)
    optimizer = _optimizer(model, settings)
    targets = torch.tensor(loaders.train_dataset.targets, dtype=torch.long)
    weights = None
    if use_class_weights(settings.train.class_weights, targets, num_classes):
        weights = class_weights(targets, num_classes).to(job.runtime.device)
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=settings.train.label_smoothing)
    scheduler = _scheduler(optimizer, len(loaders.train), settings)
    return TrainStep(model, optimizer, scheduler, loss_fn, job.runtime, job.prep, frozen_bn=job.mode == "finetune")


def _train_layers(job: Job, model: nn.Module, events: Events, stop: StopToken) -> TrainResult:
    """Train the network's layers epoch by epoch (full or finetune mode), from the checkpoint when
    there is one."""
    from torch.utils.tensorboard import SummaryWriter  # TensorBoard's import is slow; only training needs it

    t, run = job.settings.train, job.run
    if job.mode == "finetune":
        frozen = freeze_early_layers(model, t.freeze_stride)
        if frozen:
            info(events, f"finetune: {frozen} parameter tensors up to stride {t.freeze_stride} stay frozen")
    loaders = build_loaders(job.data, job.prep, job.settings, job.ranks, events, stop)
    step = _build_step(wrap_model(model, job.ranks, job.runtime.device), job, loaders)
    views = split_training(step, job, loaders) if job.mode == "finetune" else None
    resuming = run.has_checkpoint
    state = restore_state(step, run / RunDir.CHECKPOINT) if resuming else RunState()
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
    except torch.OutOfMemoryError:
        raise TrainError(
            f"out of memory with batch size {t.batch_size}; try --batch-size {max(1, t.batch_size // 2)}"
        ) from None
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
        if status == "stopped" and result.reason == "time budget":
            info(
                events,
                f"stopped at the time budget after {state.epoch} epochs, the best (epoch {state.best_epoch}) "
                f"kept; continue with: imgclf train --resume {run} --time-budget LONGER",
            )
        elif status == "stopped":
            info(events, f"stopped with a checkpoint; continue with: imgclf train --resume {run}")
    return result


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

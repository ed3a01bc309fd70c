"""``train``: data -> audited split -> model -> epochs with checkpoints -> best bundle -> evaluation.

Read top to bottom: :func:`train` calls one function per stage. A run folder holds everything
(settings.json, split.csv, audit.json, history.csv, tensorboard/, checkpoint.safetensors, the
bundle, metrics.json, report.md), and ``train(resume=True)`` continues a killed run exactly.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgclf.bundle import save_bundle
from imgclf.data.transforms import Preprocessing, measure_mean_std
from imgclf.models.factory import (classifier_name, create_model, freeze_early_layers, is_scratch_model,
                                   preprocessing_for, resolve_image_size, resolve_pretrained)
from imgclf.settings import Settings, apply_overrides, from_dict
from imgclf.training.checkpoint import save_checkpoint
from imgclf.training.data_setup import Loaders, RunData, build_loaders, prepare_data, reload_data
from imgclf.training.distributed import Distributed, broadcast_flag, init_distributed, unwrap, wrap_model
from imgclf.training.hardware import Runtime, resolve_runtime
from imgclf.training.head import HeadFit, class_weights
from imgclf.training.state import HISTORY_FIELDS, RunState, checkpoint_state, restore_state, write_history
from imgclf.training.transfer import fit_transfer_head, install_saved_head, resolve_mode, use_class_weights
from imgclf.training.loop import (EpochProgress, NonFiniteLossError, StopRequest, TrainStep, evaluate_logits,
                               summarize_logits, train_one_epoch)

CHECKPOINT = "checkpoint.safetensors"


class TrainError(RuntimeError):
    """Training cannot start or go on, with the reason and what to do."""


@dataclass
class TrainResult:
    run_dir: str
    status: str  # "finished", "stopped" (signal or max_steps: resumable), "failed"
    epochs_done: int
    best_epoch: int
    metrics: dict | None = None


def _write_run_json(out: Path, **fields: Any) -> None:
    path = out / "run.json"
    run = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    run.update(fields)
    path.write_text(json.dumps(run, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _start_run(data: str | None, out: Path, settings: Settings, resume: bool, info: Distributed,
               progress: bool) -> tuple[Settings, RunData]:
    """Prepare a new run folder, or reload an interrupted one exactly as it was."""
    if resume:
        if not (out / CHECKPOINT).exists():
            raise TrainError(f"{out}: no {CHECKPOINT} to resume from")
        saved = json.loads((out / "settings.json").read_text(encoding="utf-8"))
        return from_dict(saved), reload_data(out)
    if data is None:
        raise TrainError("no data given: pass a folder of class folders, a CSV or IDX files")
    if (out / CHECKPOINT).exists():
        raise TrainError(f"{out} already holds a run; continue it with --resume or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    run_data = prepare_data(data, settings, out, info, progress)
    if info.is_main:
        settings.dump(out / "settings.json")
        _write_run_json(out, data=str(Path(data).resolve()), classes=run_data.classes, status="running")
    return settings, run_data


def _preprocessing(model: nn.Module, settings: Settings, out: Path, run_data: RunData,
                   resume: bool, progress: bool) -> Preprocessing:
    """The model's input config. Scratch models get the training split's mean/std, measured once."""
    m = settings.model
    if resume:
        return Preprocessing.from_dict(json.loads((out / "run.json").read_text())["preprocessing"])
    if not is_scratch_model(m.model):
        return preprocessing_for(model, m.model, m.image_size, interpolation=m.interpolation)
    decode_prep = preprocessing_for(model, m.model, m.image_size, (0.5,) * 3, (0.5,) * 3, m.interpolation)
    from imgclf.data.dataset import decode_all
    from imgclf.data.transforms import eval_tensor

    sample = run_data.split("train")[:: max(1, len(run_data.split("train")) // 500)]
    tensors, _ = decode_all(sample, lambda im: eval_tensor(im, decode_prep), decode_prep, "measure mean/std",
                            progress)
    mean, std = measure_mean_std([t for t in tensors if t is not None])
    return replace(decode_prep, mean=mean, std=std)


def _optimizer(model: nn.Module, settings: Settings) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation weights (1-D parameters). In finetune
    mode the pretrained layers learn ``backbone_lr_scale`` times slower than the new head."""
    t = settings.train
    head_prefix = classifier_name(unwrap(model)) + "."
    groups = []
    for is_head in (False, True):
        scale = 1.0 if is_head or t.mode != "finetune" else t.backbone_lr_scale
        params = [(n, p) for n, p in unwrap(model).named_parameters()
                  if p.requires_grad and n.startswith(head_prefix) == is_head]
        groups += [{"params": [p for _, p in params if p.ndim > 1], "weight_decay": t.weight_decay,
                    "lr": t.lr * scale},
                   {"params": [p for _, p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": t.lr * scale}]
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


def _head_info(model: nn.Module, settings: Settings) -> dict:
    """Shape of the classifier head, so a bundle can rebuild an MLP head before loading weights."""
    model = unwrap(model)
    return {"hidden": settings.model.head_hidden,
            "in_features": int(getattr(model, "head_hidden_size", None) or model.num_features)}


def _bundle_meta(settings: Settings, run_data: RunData, prep: Preprocessing, model: nn.Module, row: dict) -> dict:
    depth = max(label.count(" > ") + 1 for label in run_data.classes)
    return {"architecture": settings.model.model, "classes": run_data.classes, "mode": settings.train.mode,
            "head": _head_info(model, settings),
            "hierarchy": {"separator": " > ", "depth": depth} if depth > 1 else None,
            "preprocessing": prep.to_dict(), "settings": settings.to_dict(),
            "epoch": row["epoch"], "metrics": {"val_loss": row["val_loss"], "val_top1": row["val_top1"],
                                               "val_top5": row["val_top5"]}}


def _format_eta(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def _end_of_epoch(step: TrainStep, loaders: Loaders, state: RunState, progress: EpochProgress,
                  ctx: dict) -> bool:
    """Validate, record, keep the best bundle, checkpoint. Returns True when patience ran out."""
    settings, out, info = ctx["settings"], ctx["out"], ctx["info"]
    val = {"loss": math.nan, "top1": math.nan, "top5": math.nan}
    if loaders.val is not None:
        logits, targets = evaluate_logits(unwrap(step.model), loaders.val, step.runtime, step.prep)
        val = summarize_logits(logits, targets, step.loss_fn)
    summary = progress.summary()
    row = {"epoch": state.epoch + 1, "train_loss": round(summary["train_loss"], 5),
           "train_acc": round(summary["train_acc"], 5), "val_loss": round(val["loss"], 5),
           "val_top1": round(val["top1"], 5), "val_top5": round(val["top5"], 5),
           "lr": step.optimizer.param_groups[0]["lr"], "seconds": round(progress.seconds, 2),
           "images_per_s": round(summary["images_per_s"], 1)}
    state.history.append(row)
    score = val["loss"] if loaders.val is not None else summary["train_loss"]
    improved = score < state.best_loss - 1e-6
    if improved:
        state.best_loss, state.best_epoch, state.bad_epochs = score, row["epoch"], 0
        if info.is_main:
            save_bundle(out, unwrap(step.model), _bundle_meta(settings, ctx["run_data"], step.prep, step.model, row))
    else:
        state.bad_epochs += 1
    state.epoch, state.global_step, state.progress = state.epoch + 1, state.global_step + progress.step, None
    if info.is_main:
        save_checkpoint(checkpoint_state(step, state), out / CHECKPOINT)
        write_history(out, state.history)
        for key in HISTORY_FIELDS[1:]:
            ctx["writer"].add_scalar(key, row[key], row["epoch"])
        ctx["writer"].flush()
        left = (loop_epochs(settings) - state.epoch) * progress.seconds
        print(f"epoch {row['epoch']}/{loop_epochs(settings)}: train loss {row['train_loss']:.4f} "
              f"acc {row['train_acc']:.3f} | val loss {row['val_loss']:.4f} top1 {row['val_top1']:.3f} "
              f"top5 {row['val_top5']:.3f} | {row['images_per_s']:.0f} img/s, {row['seconds']:.0f}s"
              f"{' *best' if improved else ''} | ETA {_format_eta(left)}", file=sys.stderr)
    patience = settings.train.patience
    return bool(patience) and state.bad_epochs >= patience and settings.train.mode != "finetune"


def _run_epochs(step: TrainStep, loaders: Loaders, state: RunState, ctx: dict) -> str:
    """The epoch loop. Returns "finished", "early-stopped" or "stopped" (resumable)."""
    t, epochs = ctx["settings"].train, loop_epochs(ctx["settings"])
    with StopRequest() as stop:
        while state.epoch < epochs:
            progress = state.progress or EpochProgress()
            if progress.step == 0:  # each epoch's dropout/RNG stream depends only on (seed, epoch)
                torch.manual_seed(t.seed * 7919 + state.epoch)
            loaders.sampler.set_epoch(state.epoch, skip=progress.step * t.batch_size)
            progress, interrupted = train_one_epoch(step, loaders.train, progress, stop, state.epoch, epochs,
                                                    t.max_steps, state.global_step, ctx["progress"])
            if broadcast_flag(interrupted, ctx["info"]):
                state.progress = progress
                if ctx["info"].is_main:
                    save_checkpoint(checkpoint_state(step, state), ctx["out"] / CHECKPOINT)
                return "stopped"
            if _end_of_epoch(step, loaders, state, progress, ctx):
                print(f"early stop: validation loss has not improved for {t.patience} epochs "
                      f"(best at epoch {state.best_epoch})", file=sys.stderr)
                return "early-stopped"
    return "finished"


def _build_step(model: nn.Module, prep: Preprocessing, settings: Settings, runtime: Runtime,
                loaders: Loaders, num_classes: int) -> TrainStep:
    optimizer = _optimizer(model, settings)
    targets = torch.tensor(loaders.train_dataset.targets, dtype=torch.long)
    weights = None
    if use_class_weights(settings.train.class_weights, targets, num_classes):
        weights = class_weights(targets, num_classes).to(runtime.device)
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=settings.train.label_smoothing)
    scheduler = _scheduler(optimizer, len(loaders.train), settings)
    return TrainStep(model, optimizer, scheduler, loss_fn, runtime, prep,
                     frozen_bn=settings.train.mode == "finetune")


def train(data: str | None = None, out: str | Path = "runs/run", overrides: dict | None = None, *,
          resume: bool = False, settings: Settings | None = None, progress: bool = True,
          evaluate: bool = True) -> TrainResult:
    """Train a classifier on ``data`` into the run folder ``out`` (or continue it with ``resume``)."""
    info, out = init_distributed(), Path(out)
    settings = apply_overrides(settings or Settings(), overrides or {})
    settings, run_data = _start_run(data, out, settings, resume, info, progress)
    if settings.train.threads:
        torch.set_num_threads(settings.train.threads)
    t = settings.train
    runtime = resolve_runtime(t.device, t.precision, t.channels_last, info.local_rank)
    settings, model, prep = _build_model(settings, run_data, out, resume, runtime, info, progress)
    if settings.train.mode in ("head", "finetune") and not resume:
        fit, features = fit_transfer_head(model, run_data, settings, prep, runtime, _source(out),
                                          progress and info.is_main)
        if info.is_main:
            _write_run_json(out, head=_head_info(model, settings))
        if settings.train.mode == "head":
            return _finish_head(out, model, fit, features, settings, run_data, prep, evaluate)
    return _train_layers(out, settings, model, prep, run_data, runtime, info, resume, evaluate, progress)


def _build_model(settings: Settings, run_data: RunData, out: Path, resume: bool, runtime: Runtime,
                 info: Distributed, progress: bool) -> tuple[Settings, nn.Module, Preprocessing]:
    """The network (pretrained when asked and at hand), the resolved settings and its input config."""
    m = settings.model
    torch.manual_seed(settings.train.seed)
    pretrained = resolve_pretrained(m.pretrained, m.model, m.weights, m.download)
    model = create_model(m.model, len(run_data.classes), pretrained=pretrained and not resume,
                         drop_rate=m.drop_rate, weights=m.weights, download=m.download)
    if resume:
        install_saved_head(model, json.loads((out / "run.json").read_text()))
    else:
        settings = _resolve(settings, model, pretrained, runtime, run_data, out, info)
    prep = _preprocessing(model, settings, out, run_data, resume, progress and info.is_main)
    if info.is_main and not resume:
        _write_run_json(out, preprocessing=prep.to_dict())
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    return settings, model.to(runtime.device, memory_format=memory_format), prep


def _train_layers(out: Path, settings: Settings, model: nn.Module, prep: Preprocessing, run_data: RunData,
                  runtime: Runtime, info: Distributed, resume: bool, evaluate: bool,
                  progress: bool) -> TrainResult:
    """Train the network's layers epoch by epoch (full or finetune mode), then evaluate."""
    from torch.utils.tensorboard import SummaryWriter

    t = settings.train
    if t.mode == "finetune":
        frozen = freeze_early_layers(model, t.freeze_stride)
        if info.is_main and frozen:
            print(f"finetune: {frozen} parameter tensors up to stride {t.freeze_stride} stay frozen", file=sys.stderr)
    loaders = build_loaders(run_data, prep, settings, info, progress)
    step = _build_step(wrap_model(model, info, runtime.device), prep, settings, runtime, loaders,
                       len(run_data.classes))
    state = restore_state(step, out / CHECKPOINT) if resume else RunState()
    if info.is_main:
        print(f"training {settings.model.model} ({t.mode}) on {len(loaders.train_dataset)} images, "
              f"{len(run_data.classes)} classes ({runtime.describe()})"
              f"{f', resuming at epoch {state.epoch + 1}' if resume else ''}", file=sys.stderr)
    ctx = {"settings": settings, "out": out, "info": info, "run_data": run_data, "progress": progress,
           "writer": SummaryWriter(str(out / "tensorboard")) if info.is_main else None}
    started = time.perf_counter()
    try:
        status = _run_epochs(step, loaders, state, ctx)
    except NonFiniteLossError as exc:
        if info.is_main:
            _write_run_json(out, status="failed", message=str(exc))
        raise TrainError(f"{exc}. The best model so far (epoch {state.best_epoch}) is kept.") from None
    except torch.OutOfMemoryError:
        raise TrainError(f"out of memory with batch size {t.batch_size}; try --batch-size "
                         f"{max(1, t.batch_size // 2)}") from None
    finally:
        if ctx["writer"] is not None:
            ctx["writer"].close()
    return _finish(out, status, state, info, settings, evaluate, progress, time.perf_counter() - started)


def _finish(out: Path, status: str, state: RunState, info: Distributed, settings: Settings, evaluate: bool,
            progress: bool, seconds: float) -> TrainResult:
    result = TrainResult(str(out), "stopped" if status == "stopped" else "finished", state.epoch,
                         state.best_epoch)
    if not info.is_main:
        return result
    _write_run_json(out, status=result.status, epochs_done=state.epoch, best_epoch=state.best_epoch,
                    train_seconds=round(seconds, 1))
    if status == "stopped":
        print(f"stopped with a checkpoint; continue with: imgclf train --resume {out}", file=sys.stderr)
    elif evaluate:
        from imgclf.evaluation.run import calibrate, evaluate as evaluate_run

        calibrate(out, settings.evaluate.target_precision)
        result.metrics = evaluate_run(out, progress=progress)
    return result


def _source(out: Path) -> str:
    return json.loads((out / "run.json").read_text(encoding="utf-8"))["data"]


def _resolve(settings: Settings, model: nn.Module, pretrained: bool, runtime: Runtime, run_data: RunData,
             out: Path, info: Distributed) -> Settings:
    """Turn every "auto" into what this run uses, say why, and save the resolved settings."""
    m = settings.model
    mode, why = resolve_mode(settings, pretrained, runtime, len(run_data.split("train")), len(run_data.classes))
    resolved = apply_overrides(settings, {"pretrained": "on" if pretrained else "off", "mode": mode,
                                          "image_size": resolve_image_size(m.image_size, m.model, model)})
    if info.is_main:
        print(f"mode: {mode} ({why})", file=sys.stderr)
        resolved.dump(out / "settings.json")
    return resolved


def _finish_head(out: Path, model: nn.Module, fit: HeadFit, features: dict, settings: Settings,
                 run_data: RunData, prep: Preprocessing, evaluate: bool) -> TrainResult:
    """Head mode: the fitted head is the model. Save it like a trained epoch; calibrate and evaluate
    from the cached features (the head applied to them gives the model's logits), not the images."""
    from imgclf.bundle import read_meta
    from imgclf.evaluation.run import calibrate_from_logits, report_from_logits

    row = {"epoch": 1, "train_loss": round(fit.train_loss, 5), "train_acc": round(fit.train_acc, 5),
           "val_loss": round(fit.val_loss, 5), "val_top1": round(fit.val_top1, 5), "val_top5": math.nan,
           "lr": math.nan, "seconds": math.nan, "images_per_s": math.nan}
    model = model.cpu()
    save_bundle(out, model, _bundle_meta(settings, run_data, prep, model, row))
    write_history(out, [row])
    _write_run_json(out, status="finished", epochs_done=1, best_epoch=1)
    result = TrainResult(str(out), "finished", 1, 1)
    if evaluate:
        head = fit.head.cpu().eval()
        with torch.no_grad():
            logits = {split: head(f.x).numpy() for split, f in features.items() if len(f.samples)}
        meta = read_meta(out)
        if "val" in logits:
            calibrate_from_logits(out, meta, logits["val"], features["val"].samples,
                                  settings.evaluate.target_precision)
        split = "test" if "test" in logits else "val"
        result.metrics = report_from_logits(out, meta, logits[split], features[split].samples,
                                            {"split": split, "data": "run split", "skipped": [],
                                             "unknown_labels": 0})
    return result

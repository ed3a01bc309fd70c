"""What a run is fixed to once it starts: resolved settings, data and split, preprocessing, the
network. A new run prepares them and writes them into the run folder; a resumed run loads them
from there. That is the one place where starting and resuming differ."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from imgclf.core.errors import TrainError
from imgclf.core.events import Events, StopToken, info, warn
from imgclf.core.preprocessing import Preprocessing
from imgclf.core.rundir import RunDir
from imgclf.core.settings import Settings, apply_overrides, from_dict, resume_overrides
from imgclf.data.dataset import decode_all
from imgclf.data.transforms import eval_tensor, measure_mean_std
from imgclf.models.device import Runtime, resolve_runtime
from imgclf.models.factory import (
    create_model,
    is_scratch_model,
    preprocessing_for,
    resolve_image_size,
    resolve_pretrained,
)
from imgclf.models.heads import install_saved_head
from imgclf.training.data_setup import RunData, prepare_data, reload_data
from imgclf.training.distributed import Distributed
from imgclf.training.transfer import refuse_transfer_without_weights, resolve_mode


@dataclass
class Job:
    run: RunDir
    settings: Settings
    data: RunData
    prep: Preprocessing
    source: str
    ranks: Distributed
    runtime: Runtime

    @property
    def mode(self) -> str:
        return self.settings.train.mode


def _runtime(settings: Settings, ranks: Distributed) -> Runtime:
    s = settings.system
    if s.threads:
        torch.set_num_threads(s.threads)
    return resolve_runtime(s.device, s.precision, s.channels_last, ranks.local_rank)


def _create(settings: Settings, classes: list[str], with_pretrained: bool) -> tuple[nn.Module, bool]:
    """The network, with pretrained weights when asked and at hand; and whether it has them."""
    m = settings.model
    torch.manual_seed(settings.train.seed)
    pretrained = resolve_pretrained(m.pretrained, m.model, m.weights, m.download)
    model = create_model(
        m.model,
        len(classes),
        pretrained=pretrained and with_pretrained,
        drop_rate=m.drop_rate,
        weights=m.weights,
        download=m.download,
    )
    return model, pretrained


def prepare_job(
    source: str | None, run: RunDir, settings: Settings, ranks: Distributed, events: Events, stop: StopToken
) -> tuple[Job, nn.Module]:
    """Audit and split the data, build the network, turn every "auto" into a decision (said in the
    log), and record all of it in the run folder."""
    if source is None:
        raise TrainError("no data given: pass a folder of class folders, a CSV or IDX files")
    if run.is_run:
        raise TrainError(f"{run} already holds a run ({run.status}); continue it with --resume or choose another --out")
    m = settings.model
    # before any time is spent on the data: a mode that cannot work with this model
    refuse_transfer_without_weights(settings, resolve_pretrained(m.pretrained, m.model, m.weights, m.download))
    run.make()
    runtime = _runtime(settings, ranks)
    run_data = prepare_data(source, settings, run, ranks, events, stop)
    model, pretrained = _create(settings, run_data.classes, with_pretrained=True)
    asked_mode = settings.train.mode  # auto may still become head when the time budget says so
    settings = _resolve(settings, model, pretrained, runtime, run_data, events)
    settings = _resolve_lr(settings, ranks, events)
    prep = _preprocessing(model, settings, run_data, events, stop)
    source = str(Path(source).resolve())
    if ranks.is_main:
        run.write_json(RunDir.SETTINGS, settings.to_dict())
        run.write_json(
            RunDir.RUN,
            {
                "data": source,
                "classes": run_data.classes,
                "preprocessing": prep.to_dict(),
                "status": "running",
                "asked_mode": asked_mode,
                "world_size": ranks.world_size,
                "global_batch": global_batch(settings, ranks),
            },
        )
    return Job(run, settings, run_data, prep, source, ranks, runtime), model


def load_job(
    run: RunDir, overrides: Settings | dict | None, ranks: Distributed, events: Events
) -> tuple[Job, nn.Module]:
    """The run as it was recorded. Only the system settings may change; other overrides are
    named as ignored."""
    if not run.is_run:
        raise TrainError(
            f"{run}: no run to resume here (no {RunDir.RUN}); start one with imgclf train DATA --out {run}"
        )
    if run.status == "finished":
        raise TrainError(f"{run}: this run has finished (its model is there); to train again choose another --out")
    saved = from_dict(run.read_json(RunDir.SETTINGS))
    wanted = overrides.to_dict() if isinstance(overrides, Settings) else dict(overrides or {})
    settings, ignored = resume_overrides(saved, wanted)
    if settings.system != saved.system and ranks.is_main:
        run.write_json(RunDir.SETTINGS, settings.to_dict())  # the record says how the run went on
    if ignored:
        warn(
            events,
            f"a resumed run keeps its own settings; ignored: {', '.join(ignored)} "
            f"(only the system settings, such as --device or --threads, may change)",
        )
    record = run.read_run()
    settings = _keep_global_batch(settings, record, ranks, run, events)
    run_data = reload_data(run)
    runtime = _runtime(settings, ranks)
    # the checkpoint holds every weight; without one (stopped before the first), start from pretrained again
    model, _ = _create(settings, run_data.classes, with_pretrained=not run.has_checkpoint)
    install_saved_head(model, record)
    prep = Preprocessing.from_dict(record["preprocessing"])
    return Job(run, settings, run_data, prep, record["data"], ranks, runtime), model


def _resolve(
    settings: Settings, model: nn.Module, pretrained: bool, runtime: Runtime, run_data: RunData, events: Events
) -> Settings:
    """Turn every "auto" into what this run uses, and say why."""
    m = settings.model
    mode, why = resolve_mode(settings, pretrained, runtime, len(run_data.split("train")), len(run_data.classes))
    info(events, f"mode: {mode} ({why})")
    return apply_overrides(
        settings,
        {
            "pretrained": "on" if pretrained else "off",
            "mode": mode,
            "image_size": resolve_image_size(m.image_size, m.model, model),
        },
    )


def _preprocessing(
    model: nn.Module, settings: Settings, run_data: RunData, events: Events, stop: StopToken
) -> Preprocessing:
    """The model's input config. Scratch models get the training split's mean/std, measured once."""
    m = settings.model
    if not is_scratch_model(m.model):
        return preprocessing_for(model, m.model, m.image_size, interpolation=m.interpolation)
    decode_prep = preprocessing_for(model, m.model, m.image_size, (0.5,) * 3, (0.5,) * 3, m.interpolation)
    train = run_data.split("train")
    sample = train[:: max(1, len(train) // 500)]
    tensors, _ = decode_all(
        sample,
        lambda im: eval_tensor(im, decode_prep),
        decode_prep,
        "measure mean/std",
        events,
        stop,
        settings.system.max_pixels,
    )
    mean, std = measure_mean_std([t for t in tensors if t is not None])
    return replace(decode_prep, mean=mean, std=std)


def scaled_lr(lr_base: float, global_batch: int) -> float:
    """timm's rule for adaptive optimisers (AdamW): the learning rate grows with the square root of
    the global batch, from ``lr_base`` at 256 images (SGD would scale linearly)."""
    return lr_base * math.sqrt(global_batch / 256)


def global_batch(settings: Settings, ranks: Distributed) -> int:
    """Images per optimisation step over all processes."""
    return settings.train.batch_size * settings.train.accumulate * ranks.world_size


def _resolve_lr(settings: Settings, ranks: Distributed, events: Events) -> Settings:
    """lr 0 means lr_base scaled to this run's global batch (timm's square-root rule for AdamW);
    the value used is what settings.json records, so a resumed run keeps it."""
    t = settings.train
    if t.lr:
        return settings
    batch = global_batch(settings, ranks)
    lr = scaled_lr(t.lr_base, batch)
    info(
        events,
        f"learning rate {lr:.3g}: lr_base {t.lr_base:g} x sqrt({batch} / 256), for a global batch of {batch} "
        f"({t.batch_size} x {t.accumulate} micro-batches x {ranks.world_size} processes)",
    )
    return apply_overrides(settings, {"lr": lr})


def _keep_global_batch(settings: Settings, record: dict, ranks: Distributed, run: RunDir, events: Events) -> Settings:
    """Resumed with another number of processes, a run keeps its global batch (and with it its
    learning rate and schedule) by accumulating more or fewer micro-batches."""
    saved_world = int(record.get("world_size", 1))
    if saved_world == ranks.world_size:
        return settings
    t = settings.train
    wanted = int(record.get("global_batch", t.batch_size * t.accumulate * saved_world))
    accumulate, rest = divmod(wanted, t.batch_size * ranks.world_size)
    if rest or not accumulate:
        raise TrainError(
            f"{run}: this run's global batch of {wanted} images cannot be kept with {ranks.world_size} processes of "
            f"batch size {t.batch_size}; resume it with a number of processes that divides {wanted // t.batch_size}"
        )
    info(
        events,
        f"{ranks.world_size} processes instead of {saved_world}: {accumulate} micro-batches per step keep "
        f"the global batch of {wanted}",
    )
    settings = apply_overrides(settings, {"accumulate": accumulate})
    if ranks.is_main:
        run.write_json(RunDir.SETTINGS, settings.to_dict())
        run.update_run(world_size=ranks.world_size)
    return settings

"""Every setting of imgclf, declared once: type, default and a one-line help.

Sections group the settings by the job that reads them; field names are unique across
sections so that each one can be a flat command-line flag (``--image-size``), as
Ultralytics' ``default.yaml`` keys are. Precedence: defaults < config file < command line.
The resolved tree is written with every run (``settings.json``) and every model bundle.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from imgclf.core.errors import SettingsError


def setting(
    default: Any, help: str, choices: tuple | None = None, low: float | None = None, high: float | None = None
) -> Any:
    """Declare one setting: its default, its one-line help and, optionally, allowed values or the
    range a number must lie in (``low <= value <= high``; NaN is never in range)."""
    return field(default=default, metadata={"help": help, "choices": choices, "low": low, "high": high})


@dataclass
class DataSettings:
    val_fraction: float = setting(0.1, "share of each class held out for validation when no split is given")
    test_fraction: float = setting(0.1, "share of each class held out for testing when no split is given")
    min_side: int = setting(32, "images smaller than this many pixels on a side are skipped as too small", low=1)
    min_per_class: int = setting(10, "classes with fewer images than this are flagged by the audit", low=1)
    audit_workers: int = setting(0, "threads used to decode images in the audit (0: one per CPU core)", low=0)
    per_class: int = setting(0, "train on at most this many images per class (stratified, seeded; 0: all)", low=0)
    allow_outside: bool = setting(False, "read CSV rows whose paths lead outside the CSV's folder (.., absolute)")


@dataclass
class ModelSettings:
    model: str = setting(
        "tf_efficientnet_lite0", "model name: one of ours (cnn1, cnn3, cnn4, alexnet_bn) or any timm architecture"
    )
    image_size: int = setting(0, "side of the square model input in pixels (0: the model's own, 64 for ours)")
    interpolation: str = setting(
        "bilinear",
        "resampling filter from photo to model input; bilinear: as accurate "
        "as bicubic on clothing-small, 0.5 ms less per photo; auto: the pretrained "
        "config's",
        choices=("auto", "bilinear", "bicubic"),
    )
    pretrained: str = setting(
        "auto", "start from pretrained weights; auto: when the model has weights at hand", choices=("auto", "on", "off")
    )
    head_hidden: int = setting(0, "classifier head for transfer: 0 linear, N an MLP with N hidden units", low=0)
    weights: str = setting("", "pretrained weights from this .safetensors file instead of the built-in ones")
    download: bool = setting(False, "allow downloading pretrained weights from the internet (timm's hub)")
    drop_rate: float = setting(0.0, "dropout before the classifier", low=0, high=0.99)


@dataclass
class TrainSettings:
    mode: str = setting(
        "auto",
        "head: train a head on cached frozen features; finetune: head, then all "
        "layers; full: all layers from the start; auto: chosen from model, data and hardware",
        choices=("auto", "head", "finetune", "full"),
    )
    epochs: int = setting(30, "maximum number of passes over the training images (fewer when the time budget needs)")
    finetune_epochs: int = setting(
        4,
        "epochs of training the later layers after the head, in finetune mode (fewer when the time budget needs)",
        low=0,
    )
    backbone_lr_scale: float = setting(
        0.1, "learning rate of pretrained layers relative to the head's (finetune)", low=0
    )
    freeze_stride: int = setting(
        8,
        "finetune: keep frozen the early layers up to this output stride "
        "(0: train all; 8 skips most of the compute at full resolution)",
        low=0,
    )
    distortions: int = setting(0, "augmented views per training image added to the cached features (head)", low=0)
    class_weights: str = setting(
        "auto",
        "weight the loss by inverse class frequency; auto: when the imbalance ratio is 3 or more",
        choices=("auto", "on", "off"),
    )
    batch_size: int = setting(64, "images per micro-batch per process (global batch: this x accumulate x processes)")
    accumulate: int = setting(1, "micro-batches whose gradients are summed into each optimisation step", low=1)
    lr: float = setting(0.0, "peak learning rate of AdamW (0: lr_base scaled to the global batch)", low=0)
    lr_base: float = setting(
        4e-3,
        "learning rate at a global batch of 256, scaled by the square root of global batch / 256 when lr is 0 "
        "(timm's rule for adaptive optimisers; 2e-3 at one process's default batch of 64)",
        low=0,
    )
    sync_bn: bool = setting(False, "several GPUs: batch-norm statistics computed over all processes' batches")
    weight_decay: float = setting(0.05, "AdamW weight decay", low=0)
    warmup_epochs: float = setting(1.0, "epochs of linear learning-rate warm-up before the cosine decay", low=0)
    label_smoothing: float = setting(0.1, "label smoothing of the cross-entropy loss", low=0, high=0.99)
    augment: str = setting("light", "augmentation preset", choices=("none", "light", "strong"))
    patience: int = setting(6, "stop when validation loss has not improved for this many epochs (0: never)", low=0)
    seed: int = setting(0, "random seed: the same seed and data give the same model")
    max_steps: int = setting(0, "stop after this many optimisation steps in total (0: no limit; for tests)", low=0)


@dataclass
class EvaluateSettings:
    target_precision: float = setting(
        0.95, "precision the recommended confidence threshold aims for (chosen on the validation split)"
    )


@dataclass
class PredictSettings:
    top_k: int = setting(5, "how many labels to return per image", low=1)
    min_confidence: str = setting(
        "",
        "below this top probability the label is 'unknown': a number, or auto for the bundle's recommended threshold",
    )
    predict_batch_size: int = setting(
        32, "images per forward pass when predicting, evaluating, exporting and extracting features"
    )
    backend: str = setting(
        "auto",
        "torch; onnx (ONNX Runtime on the folder written by imgclf export); openvino "
        "(the same export); auto: the export's measured best on this CPU, else torch",
        choices=("auto", "torch", "onnx", "openvino"),
    )
    int8: bool = setting(False, "run the int8 model written by imgclf export --int8 (on ONNX Runtime)")
    format: str = setting("table", "output format", choices=("table", "json", "csv"))


@dataclass
class FetchSettings:
    concurrency: int = setting(32, "fetch: URLs downloaded at once, in all")
    per_host: int = setting(4, "fetch: URLs downloaded at once from one host (host:port)")
    connect_timeout: float = setting(10.0, "fetch: seconds to wait for a connection")
    read_timeout: float = setting(20.0, "fetch: seconds to wait for the next bytes of an answer")
    url_timeout: float = setting(60.0, "fetch: seconds one URL may take in all, retries included (cuts off tricklers)")
    retries: int = setting(3, "fetch: retries of a transient failure (connect error, timeout, 408/425/429/5xx)")
    retry_after_cap: float = setting(
        30.0, "fetch: longest Retry-After honoured; a longer one gives up as rate_limited", low=0
    )
    max_bytes: int = setting(20_000_000, "fetch: larger answers are refused while streaming (too_large)")
    max_redirects: int = setting(5, "fetch: redirects followed, each hop checked; more is too_many_redirects")
    breaker_failures: int = setting(
        3, "fetch: failed connections in a row after which a host is not tried again", low=1
    )
    user_agent: str = setting("imgclf/0.1 (image classifier training-set builder)", "fetch: the User-Agent sent")
    respect_noai: bool = setting(True, "fetch: honour X-Robots-Tag noai / noimageai (robots_denied)")
    placeholder_url: str = setting("", "fetch: regex of placeholder URLs, added to the built-in Flickr and imgur ones")
    quarantine_after: int = setting(3, "fetch: content served for this many distinct URLs is a suspected placeholder")
    conflicts: str = setting(
        "drop",
        "fetch: the same photo under two labels: drop it, or keep it under the first label",
        choices=("drop", "first"),
    )
    min_bytes: int = setting(0, "fetch: smaller files are too_small (0: any; small real thumbnails exist)", low=0)
    max_aspect: float = setting(
        0.0, "fetch: a longer side over this many times the shorter is bad_aspect (0: any)", low=0
    )
    max_side: int = setting(
        0, "fetch: downscale kept images to at most this many pixels on the long side (0: keep)", low=0
    )
    max_per_class: int = setting(0, "fetch: stop at this many good images per class, kept balanced (0: all)", low=0)
    keep_rejected: bool = setting(False, "fetch: keep rejected content under DATA_DIR/_rejected/<reason>/ for a look")


@dataclass
class ShardSettings:
    shard_samples: int = setting(1000, "shard: photos per tar shard (1000 web-sized photos: about 100-300 MB)", low=1)
    shard_seed: int = setting(0, "shard: seed of the shuffle that mixes the classes across the shards")
    shard_max_side: int = setting(
        0, "shard: re-encode photos longer than this many pixels as JPEG of that size (0: keep the bytes)", low=0
    )
    shard_part: str = setting(
        "", "shard: write only the shards j with j mod N = i, given as i/N (0-based: 0/4 ... 3/4); empty: all"
    )


@dataclass
class SystemSettings:
    """How this machine runs the work, never what is learned: the one section that ``--resume``
    may change, and that train, predict, export and the service all read."""

    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    precision: str = setting(
        "auto",
        "number format: auto picks bf16 where the CPU/GPU supports it (fp16 on GPUs without bf16)",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    channels_last: str = setting("auto", "memory layout for convolutions", choices=("auto", "on", "off"))
    threads: int = setting(0, "CPU threads for PyTorch (0: leave PyTorch's default)", low=0)
    workers: int = setting(-1, "DataLoader worker processes (-1: chosen from CPU count and cache)", low=-1)
    cache: str = setting(
        "auto", "keep decoded images in memory: auto does so when they fit", choices=("auto", "ram", "none")
    )
    max_pixels: int = setting(
        89_478_485, "images with more pixels are refused as decompression bombs (in check, train, evaluate and predict)"
    )
    checkpoint_minutes: float = setting(
        10.0, "write a mid-epoch checkpoint this often as well as at each epoch's end (0: epoch ends only)", low=0
    )
    compile: str = setting(
        "auto",
        "torch.compile the network before training; auto: on a GPU for runs of 2,000 steps or more",
        choices=("auto", "on", "off"),
    )
    time_budget: str = setting(
        "auto",
        "wall time a training may take, everything included (e.g. 10m, 90s, 1h; 0: none); auto: 10m on a CPU, "
        "none on a GPU. The plan is fitted to it from speeds measured on the spot",
    )


@dataclass
class Settings:
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    predict: PredictSettings = field(default_factory=PredictSettings)
    fetch: FetchSettings = field(default_factory=FetchSettings)
    shard: ShardSettings = field(default_factory=ShardSettings)
    system: SystemSettings = field(default_factory=SystemSettings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in fields(Settings)}
SYSTEM = "system"
PREDICT_BATCH_SIZE = PredictSettings().predict_batch_size  # the one default, wherever images are run in batches


def section_fields(section: str) -> list[dataclasses.Field]:
    return list(fields(getattr(Settings(), section)))


def _all_names() -> dict[str, str]:
    """Map every setting name to the section that declares it."""
    return {f.name: section for section in SECTIONS for f in section_fields(section)}


def _coerce(name: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"setting '{name}': expected true/false, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise SettingsError(f"setting '{name}': expected {kind.__name__}, got {value!r}") from None


def apply_overrides(settings: Settings, overrides: dict[str, Any]) -> Settings:
    """Return a copy of ``settings`` with flat ``name: value`` overrides applied and validated.

    Nested ``{section: {name: value}}`` dictionaries (as written to settings.json) are accepted too.
    Unknown names fail with a "did you mean" suggestion.
    """
    names = _all_names()
    flat = flat_overrides(overrides)
    result = Settings(**{s: dataclasses.replace(getattr(settings, s)) for s in SECTIONS})
    for key, value in flat.items():
        if key not in names:
            close = difflib.get_close_matches(key, list(names), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise SettingsError(f"unknown setting '{key}'{hint}")
        section = getattr(result, names[key])
        spec = next(f for f in fields(section) if f.name == key)
        coerced = _coerce(key, value, spec.default)
        choices = spec.metadata.get("choices")
        if choices and coerced not in choices:
            close = difflib.get_close_matches(str(coerced), choices, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise SettingsError(f"setting '{key}': {coerced!r} is not one of {', '.join(choices)}{hint}")
        setattr(section, key, coerced)
    validate(result)
    return result


def _check_ranges(settings: Settings) -> None:
    for name in SECTIONS:
        section = getattr(settings, name)
        for spec in fields(section):
            low, high, value = spec.metadata.get("low"), spec.metadata.get("high"), getattr(section, spec.name)
            if low is None and high is None:
                continue
            if (low is not None and not value >= low) or (high is not None and not value <= high):  # NaN: neither
                allowed = f"{low} to {high}" if low is not None and high is not None else f"at least {low}"
                raise SettingsError(f"setting '{spec.name}': {value!r} is out of range ({allowed})")


def validate(settings: Settings) -> None:
    """Refuse values that cannot work, with the reason."""
    _check_ranges(settings)
    d, m, t, s = settings.data, settings.model, settings.train, settings.system
    if not 0 <= d.val_fraction < 1 or not 0 <= d.test_fraction < 1 or d.val_fraction + d.test_fraction >= 1:
        raise SettingsError("val_fraction and test_fraction must be in [0, 1) and leave room for training")
    if m.image_size and m.image_size < 8:
        raise SettingsError(f"image_size {m.image_size} is too small (8 pixels at least, or 0 for the model's own)")
    if t.epochs < 1 or t.batch_size < 1:
        raise SettingsError("epochs and batch_size must be at least 1")
    if t.lr < 0 or t.lr_base <= 0:
        raise SettingsError("lr must be positive (or 0: lr_base scaled to the batch) and lr_base positive")
    if s.time_budget != "auto":
        parse_duration(s.time_budget)
    if s.max_pixels < 1 or settings.predict.predict_batch_size < 1:
        raise SettingsError("max_pixels and predict_batch_size must be at least 1")
    if s.device != "auto" and s.device != "cpu" and not s.device.startswith("cuda"):
        raise SettingsError(f"setting 'device': '{s.device}' is not auto, cpu, cuda or cuda:N")
    if not 0 < settings.evaluate.target_precision < 1:
        raise SettingsError("target_precision must be between 0 and 1 (e.g. 0.95)")
    _validate_fetch(settings.fetch)
    confidence = settings.predict.min_confidence
    if confidence not in ("", "auto"):
        try:
            number = float(confidence)
        except ValueError:
            raise SettingsError(f"min_confidence: '{confidence}' is neither a number nor auto") from None
        if not 0 <= number <= 1:
            raise SettingsError(f"min_confidence: {confidence} is not a probability in [0, 1] (or auto)")


def _validate_fetch(f: FetchSettings) -> None:
    if f.concurrency < 1 or f.per_host < 1 or f.retries < 0 or f.max_redirects < 0 or f.quarantine_after < 2:
        raise SettingsError("concurrency and per_host must be at least 1, retries and max_redirects at least 0, "
                            "quarantine_after at least 2")  # fmt: skip
    if min(f.connect_timeout, f.read_timeout, f.url_timeout) <= 0 or f.max_bytes < 1:
        raise SettingsError("connect_timeout, read_timeout, url_timeout and max_bytes must be positive")
    if f.placeholder_url:
        try:
            re.compile(f.placeholder_url)
        except re.error as exc:
            raise SettingsError(f"setting 'placeholder_url': {f.placeholder_url!r} is not a regex ({exc})") from None


def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "10m", "1.5h"; 0 for "0", "none" or "off". Raises SettingsError."""
    value = str(text).strip().lower()
    if value in ("0", "none", "off", ""):
        return 0.0
    scale = {"s": 1, "m": 60, "h": 3600}.get(value[-1:], None)
    number = value[:-1] if scale else value
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise SettingsError(f"setting 'time_budget': '{text}' is not a duration (e.g. 10m, 90s, 1h, 0)") from None
    if seconds < 0:
        raise SettingsError(f"setting 'time_budget': '{text}' is negative")
    return seconds


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Defaults, then a JSON config file (flat or sectioned), then explicit overrides."""
    settings = Settings()
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SettingsError(f"cannot read settings file {path}: {exc}") from None
        settings = apply_overrides(settings, data)
    return apply_overrides(settings, overrides or {})


def from_dict(data: dict) -> Settings:
    """Rebuild settings saved by :meth:`Settings.to_dict`, tolerating keys added in later versions
    and keys that moved section (read by name: names are unique across sections)."""
    names = _all_names()
    known = {k: v for section in data.values() if isinstance(section, dict) for k, v in section.items() if k in names}
    return apply_overrides(Settings(), known)


def as_settings(settings: Settings | dict | None) -> Settings:
    """What every verb accepts: a :class:`Settings`, a dict of overrides (flat or by section), or None."""
    if settings is None:
        return Settings()
    if isinstance(settings, Settings):
        validate(settings)
        return settings
    return apply_overrides(Settings(), dict(settings))


def flat_overrides(overrides: dict) -> dict:
    """``{section: {name: value}}`` or ``{name: value}`` as flat ``{name: value}``."""
    flat: dict = {}
    for key, value in overrides.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def asked_settings(settings: Settings | dict | None) -> dict:
    """What differs from the defaults: what a person asked for (a resumed run is told only that)."""
    if not isinstance(settings, Settings):
        return dict(settings or {})
    defaults = Settings()
    return {
        spec.name: getattr(getattr(settings, name), spec.name)
        for name in SECTIONS
        for spec in section_fields(name)
        if getattr(getattr(settings, name), spec.name) != getattr(getattr(defaults, name), spec.name)
    }


def resume_overrides(saved: Settings, overrides: dict) -> tuple[Settings, list[str]]:
    """A resumed run keeps everything it learned with; only the system section (device, threads,
    ...) may change. Returns the settings to use and the names of the overrides left out."""
    names = _all_names()
    flat = flat_overrides(overrides)
    system = {k: v for k, v in flat.items() if names.get(k) == SYSTEM}
    ignored = [
        k
        for k, v in flat.items()
        if k not in system and getattr(getattr(saved, names.get(k, SYSTEM)), k, object()) != v
    ]
    unknown = [k for k in ignored if k not in names]
    if unknown:
        apply_overrides(saved, {unknown[0]: flat[unknown[0]]})  # the "did you mean" error
    return apply_overrides(saved, system), sorted(ignored)

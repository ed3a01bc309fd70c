"""The engine that runs frozen passes (feature extraction for the head), chosen by measurement.

The frozen backbone only runs forward, so any inference engine will do: PyTorch (in the run's
precision and layout), ONNX Runtime, or OpenVINO (bf16 where the CPU has it). Each is timed on a
batch of the run's own photos and checked against PyTorch fp32 (every feature vector's cosine
similarity at least :data:`MIN_COSINE`); the fastest that agrees is used. The choice and the ONNX
file of the backbone are remembered in the cache folder per CPU model, network, weights and
input: measured once, not assumed from CPU flags. Measured on 2 Xeon cores (AMX), Lite0 at 224 px,
the engine alone: PyTorch bf16 channels_last 115-181 img/s, ONNX Runtime fp32 281-290, OpenVINO bf16
553-642; from file to features (decoding beside it): 141, 198 and 360 img/s.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from imgclf.core.atomic import atomic_write
from imgclf.core.events import Events, info
from imgclf.core.machine import cpu_model
from imgclf.data.audit import cache_dir
from imgclf.data.preprocess import normalize
from imgclf.models import heads
from imgclf.models.device import model_input
from imgclf.models.onnx import to_onnx
from imgclf.predictors.onnx import compile_openvino, openvino_precision
from imgclf.training.job import Job

# Every feature vector must be at least this close (cosine) to PyTorch fp32's. Measured on 32
# clothing-small photos: ONNX Runtime fp32 1.00000, PyTorch's own bf16 (imgclf's features before)
# 0.99829, OpenVINO bf16 0.99679, and a head on OpenVINO's features scored as on ONNX Runtime's
# (89.8% test top-1 both; 85.3% and 85.6% validation).
MIN_COSINE = 0.995
Features = Callable[[torch.Tensor], torch.Tensor]  # uint8 NCHW batch -> float32 (n, d) features


class _Pooled(nn.Module):
    """The backbone's pooled features as the network's output, for the ONNX file."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return heads.pooled_features(self.model, x)


def torch_features(model: nn.Module, job: Job) -> Features:
    def run(batch: torch.Tensor) -> torch.Tensor:
        model.eval()
        with torch.no_grad(), job.runtime.autocast():
            return heads.pooled_features(model, model_input(batch, job.runtime, job.prep)).float().cpu()

    return run


def _onnx_features(path: Path, job: Job, engine: str) -> Features:
    mean, std = job.prep.mean, job.prep.std
    if engine == "openvino":
        request = compile_openvino(path, openvino_precision())
        infer = lambda x: request.infer({0: x})[0].copy()  # noqa: E731  (the request reuses its output)
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # decoding shares the cores
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        infer = lambda x: session.run(None, {"pixels": x})[0]  # noqa: E731
    return lambda batch: torch.from_numpy(infer(normalize(batch.numpy(), mean, std)))


def _key(job: Job, model: nn.Module) -> str:
    weights = hashlib.sha1(b"".join(v.detach().cpu().numpy().tobytes()[:4096] for v in model.state_dict().values()))
    return "|".join(
        [
            cpu_model(),
            job.settings.model.model,
            weights.hexdigest()[:12],
            json.dumps(job.prep.to_dict(), sort_keys=True),
        ]
    )


def _backbone_file(key: str, model: nn.Module, job: Job) -> Path:
    """The backbone as ONNX, kept in the cache; in a temporary folder for this run when the cache
    cannot be written (full, read-only), so that the run goes on."""
    name = f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.onnx"
    try:
        return _write_backbone(cache_dir() / "engines" / name, model, job)
    except OSError:
        return _write_backbone(Path(tempfile.mkdtemp(prefix="imgclf-engine-")) / name, model, job)


def _write_backbone(path: Path, model: nn.Module, job: Job) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda temp: to_onnx(_Pooled(copy.deepcopy(model)), job.prep.image_size, temp, "features"))
    return path


def _rate(run: Features, batch: torch.Tensor) -> float:
    run(batch)
    started = time.perf_counter()
    for _ in range(2):
        run(batch)
    return 2 * len(batch) / (time.perf_counter() - started)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).min())


def feature_engine(model: nn.Module, job: Job, batch: torch.Tensor | None, events: Events) -> tuple[str, Features]:
    """The engine for this run's frozen passes, by name, and the function that runs it. ``batch``:
    uint8 NCHW photos of the run to time and check the engines on (None: use what is remembered)."""
    if job.runtime.device.type != "cpu" or job.ranks.world_size > 1:
        return "torch", torch_features(model, job)
    key, record_path = _key(job, model), cache_dir() / "engines" / "choices.json"
    try:
        known = json.loads(record_path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known and batch is not None:
        known[key] = _measure(key, model, job, batch, events)
        record_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(record_path, lambda temp: Path(temp).write_text(json.dumps(known, indent=1)))
    engine = known.get(key, {}).get("engine", "torch")
    if engine == "torch":
        return engine, torch_features(model, job)
    return engine, _onnx_features(_backbone_file(key, model, job), job, engine)


def _measure(key: str, model: nn.Module, job: Job, batch: torch.Tensor, events: Events) -> dict:
    fp32 = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        plain = type(job.runtime)(job.runtime.device, None, False)
        exact = heads.pooled_features(fp32, model_input(batch, plain, job.prep)).float()
    candidates: dict[str, Features] = {"torch": torch_features(model, job)}
    path = _backbone_file(key, model, job)
    candidates["onnxruntime"] = _onnx_features(path, job, "onnxruntime")
    try:
        candidates["openvino"] = _onnx_features(path, job, "openvino")
    except ImportError:  # an optional extra
        pass
    except Exception as exc:  # OpenVINO lacks an operator, a CPU feature...: the others stand
        info(events, f"OpenVINO cannot run {job.settings.model.model} here ({type(exc).__name__}); not used")
    rates, agreement = {}, {}
    for name, run in candidates.items():
        agreement[name] = round(_cosine(run(batch), exact), 6)
        rates[name] = round(_rate(run, batch), 1)
    agreeing = [name for name in rates if agreement[name] >= MIN_COSINE] or ["torch"]
    chosen = max(agreeing, key=lambda name: rates[name])
    measured = ", ".join(f"{n} {r:.0f} img/s (cosine {agreement[n]:.5f})" for n, r in rates.items())
    info(events, f"frozen passes on {chosen}: measured here against PyTorch fp32: {measured}; remembered for this CPU")
    return {"engine": chosen, "images_per_s": rates, "cosine": agreement}

"""The engine for frozen passes and the memory layout are chosen by measurement on the run's own
photos, agree with PyTorch fp32, and are remembered per CPU instead of measured again."""

from __future__ import annotations

import json

import pytest
import torch

from imgclf.core.events import Message
from imgclf.core.preprocessing import Preprocessing
from imgclf.core.rundir import RunDir
from imgclf.core.settings import Settings, apply_overrides
from imgclf.data.sources import Sample
from imgclf.models.device import model_input, resolve_runtime
from imgclf.models.factory import create_model, preprocessing_for
from imgclf.models.heads import pooled_features
from imgclf.training.data_setup import RunData
from imgclf.training.distributed import Distributed
from imgclf.training.engines import MIN_COSINE, feature_engine
from imgclf.training.job import Job
from imgclf.training.speed import choose_layout, eval_batch


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _job(clothing, tmp_path) -> tuple[Job, torch.nn.Module]:
    model = create_model("tf_efficientnet_lite0", 3, pretrained=True)
    prep: Preprocessing = preprocessing_for(model, "tf_efficientnet_lite0", 64)
    photos = sorted((clothing / "train" / "hat").glob("*.jpg"))[:16]
    samples = [Sample(str(p), "hat", "train") for p in photos]
    settings = apply_overrides(Settings(), {"image_size": 64})
    job = Job(
        RunDir(tmp_path), settings, RunData(["hat"], samples), prep, str(clothing), Distributed(), resolve_runtime()
    )
    return job, model


def test_the_chosen_engine_agrees_with_pytorch_fp32_and_is_remembered(clothing, tmp_path, cache_dir):
    job, model = _job(clothing, tmp_path)
    batch = eval_batch(job, 16)
    said: list = []
    name, features = feature_engine(model, job, batch, said.append)
    assert name in ("torch", "onnxruntime", "openvino")
    assert any(isinstance(e, Message) and e.text.startswith(f"frozen passes on {name}") for e in said)
    record = next(iter(json.loads((cache_dir / "engines" / "choices.json").read_text()).values()))
    assert record["engine"] == name and record["cosine"][name] >= MIN_COSINE
    assert record["images_per_s"][name] == max(
        r for n, r in record["images_per_s"].items() if record["cosine"][n] >= MIN_COSINE
    )
    exact = job.runtime.__class__(job.runtime.device, None, False)
    with torch.no_grad():
        reference = pooled_features(model.float().eval(), model_input(batch, exact, job.prep))
    got = features(batch)
    cosine = torch.nn.functional.cosine_similarity(got.double(), reference.double()).min()
    assert got.shape == reference.shape and cosine >= MIN_COSINE
    again: list = []
    assert feature_engine(model, job, batch, again.append)[0] == name and not again  # remembered, not measured


def test_the_layout_is_measured_once_per_cpu(clothing, tmp_path, cache_dir):
    job, model = _job(clothing, tmp_path)
    said: list = []
    first = choose_layout(job, model, said.append)
    assert len(said) == 1 and "measured here" in said[0].text
    assert choose_layout(job, model, said.append) == first and len(said) == 1

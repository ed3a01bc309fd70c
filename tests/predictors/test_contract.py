"""Contract over every installed predictor backend, chosen through the one ``load``: the same
classes, the same top-1 and the same probabilities within each engine's tolerance."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest

from imgclf import api
from imgclf.predictors import BACKENDS

# fp32 engines agree to rounding; OpenVINO runs bf16 where the CPU has it (AMX, AVX-512 BF16)
TOLERANCE = {"torch": 1e-5, "onnx": 1e-4, "openvino": 0.05}
INSTALLED = [b for b in BACKENDS if b != "auto" and (b != "openvino" or importlib.util.find_spec("openvino"))]


@pytest.fixture(scope="module")
def exported_run(digits_run, tmp_path_factory):
    """A copy of the digits run (so other tests' runs stay without an export), exported to ONNX."""
    run = tmp_path_factory.mktemp("contract") / "run"
    run.mkdir()
    for name in ("model.safetensors", "model.json", "split.csv"):
        shutil.copy(digits_run / name, run / name)
    api.export(run)
    return run


@pytest.fixture(scope="module")
def files(digits_dir):
    return [str(p) for p in sorted(digits_dir.glob("*/1*.png"))[::3]][:90]


@pytest.fixture(scope="module")
def reference(exported_run, files):
    clf = api.load(exported_run, {"precision": "fp32"}, backend="torch")
    return clf.classes_, clf.predict_proba(files)


@pytest.mark.parametrize("backend", INSTALLED)
def test_every_backend_gives_the_same_answers(backend, exported_run, files, reference):
    events = []
    clf = api.load(exported_run, {"precision": "fp32"}, backend=backend, events=events.append)
    assert clf.backend == backend and any(e.text.startswith(f"backend: {backend}") for e in events)
    classes, expected = reference
    assert list(clf.classes_) == list(classes)
    proba = clf.predict_proba(files)
    assert proba.shape == expected.shape and np.allclose(proba.sum(1), 1, atol=1e-4)
    assert np.abs(proba - expected).max() < TOLERANCE[backend]
    margin = np.sort(expected, 1)[:, -1] - np.sort(expected, 1)[:, -2]
    clear = margin > 2 * TOLERANCE[backend]  # near-ties may flip in bf16; all others may not
    assert clear.mean() > 0.9 and (proba.argmax(1) == expected.argmax(1))[clear].all()
    streamed = list(clf.predict_files(files, k=1))
    assert [r.labels[0] for r in streamed] == list(clf.predict(files))


def test_auto_takes_the_export_and_falls_back_to_torch_when_it_is_stale(exported_run, files):
    assert api.load(exported_run).backend in ("onnx", "openvino")
    weights = exported_run / "model.safetensors"
    original = weights.read_bytes()
    try:
        from safetensors.torch import load_file, save_file

        state = load_file(str(weights))
        state[next(iter(state))] += 0.01  # retrained, say, but not exported again
        save_file(state, str(weights), metadata={"format": "pt"})
        events = []
        assert api.load(exported_run, events=events.append).backend == "torch"
        assert any("made from earlier weights" in e.text for e in events)
    finally:
        weights.write_bytes(original)


def test_auto_does_not_trust_an_export_that_does_not_say_which_weights_it_came_from(exported_run):
    """BAD_INPUTS case 41: an export without the weights' hash (made before it was recorded, or
    copied in from elsewhere) beside the weights is not taken by auto."""
    import json

    meta_path = exported_run / "onnx" / "model.json"
    original = meta_path.read_text()
    try:
        meta = json.loads(original)
        del meta["onnx"]["weights_sha256"]
        meta_path.write_text(json.dumps(meta))
        events = []
        assert api.load(exported_run, events=events.append).backend == "torch"
        assert any("or does not say which" in e.text for e in events)
    finally:
        meta_path.write_text(original)

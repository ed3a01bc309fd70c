"""Model bundles load only from safetensors + model.json; anything else is refused clearly."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest

import imgclf
from imgclf.bundle import BundleError, load_bundle


@pytest.fixture()
def bundle_copy(digits_run, tmp_path) -> Path:
    target = tmp_path / "bundle"
    target.mkdir()
    for name in ("model.safetensors", "model.json"):
        shutil.copy(digits_run / name, target / name)
    return target


class _RunsCode:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loaded_bundle_predicts_like_the_run(bundle_copy, digits_run, digits_dir):
    files = [str(p) for p in sorted(digits_dir.glob("*/00*.png"))[:20]]
    assert (imgclf.load(bundle_copy).predict(files) == imgclf.load(digits_run).predict(files)).all()


def test_pickle_in_place_of_weights_is_refused_and_never_run(bundle_copy, tmp_path):
    marker = tmp_path / "code-ran"
    (bundle_copy / "model.safetensors").write_bytes(pickle.dumps({"weights": _RunsCode(marker)}))
    assert not marker.exists()
    with pytest.raises(BundleError, match="not a safetensors file.*never unpickles"):
        imgclf.load(bundle_copy)
    assert not marker.exists(), "loading the bundle ran code from a pickle"


def test_torch_zip_checkpoint_in_place_of_weights_is_refused(bundle_copy, tmp_path):
    import torch

    marker = tmp_path / "code-ran"
    torch.save({"x": _RunsCode(marker)}, bundle_copy / "model.safetensors")
    with pytest.raises(BundleError, match="not a safetensors file"):
        load_bundle(bundle_copy)
    assert not marker.exists()


def test_only_a_pickle_named_model_pt_is_not_loaded(bundle_copy):
    (bundle_copy / "model.safetensors").rename(bundle_copy / "model.pt")
    with pytest.raises(BundleError, match="model.pt is a pickle format and is not loaded"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    "header",
    [
        b"{not json at all",  # malformed header
        json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode(),  # past the end
    ],
)
def test_damaged_safetensors_are_refused(bundle_copy, header):
    (bundle_copy / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(BundleError):
        load_bundle(bundle_copy)


def test_huge_safetensors_header_is_refused_before_reading(bundle_copy):
    (bundle_copy / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{")
    with pytest.raises(BundleError, match="not a safetensors file"):
        load_bundle(bundle_copy)


def test_model_json_missing_field_or_newer_version(bundle_copy):
    meta = json.loads((bundle_copy / "model.json").read_text())
    del meta["classes"]
    (bundle_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="missing field.*classes"):
        load_bundle(bundle_copy)
    meta["classes"], meta["format_version"] = [str(i) for i in range(10)], 99
    (bundle_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="newer imgclf"):
        load_bundle(bundle_copy)


def test_bundle_carries_what_predict_needs(digits_run):
    meta = json.loads((digits_run / "model.json").read_text())
    assert meta["architecture"] == "cnn3" and meta["classes"] == [str(i) for i in range(10)]
    prep = meta["preprocessing"]
    assert prep["image_size"] == 24 and prep["interpolation"] == "bilinear"
    assert 0.05 < prep["mean"][0] < 0.6 and prep["std"][0] > 0.05  # measured on the training split
    assert meta["settings"]["model"]["model"] == "cnn3" and {"torch", "timm"} <= set(meta["versions"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"classes": ["0", "1", "1", "3", "4", "5", "6", "7", "8", "9"]}, "'classes' must list at least 2 distinct"),
        ({"temperature": 0}, "'temperature' must be a positive number"),
        ({"temperature": float("nan")}, "'temperature' must be a positive number"),
        ({"threshold": {"threshold": 1.5, "target_precision": 0.95}}, "'threshold.threshold' must be a probability"),
        ({"threshold": "high"}, "'threshold.threshold' must be a probability"),
        ({"classes": ["a", "b", "c"]}, "model.json lists 3 classes"),
    ],
)
def test_model_json_fields_that_cannot_be_right_are_named(bundle_copy, change, message):
    """BAD_INPUTS case 42: each refused with the field named, on the torch path and the ONNX one."""
    meta = json.loads((bundle_copy / "model.json").read_text())
    (bundle_copy / "model.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)

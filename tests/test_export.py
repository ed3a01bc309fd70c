"""ONNX export is checked against PyTorch on real images before it counts."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

import imgclf
from imgclf.cli import main
from imgclf.data.split import read_split_csv


def test_fp32_export_matches_pytorch_and_has_a_dynamic_batch(digits_run, tmp_path):
    out = tmp_path / "onnx"
    assert main(["export", str(digits_run), "--out", str(out)]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == [str(i) for i in range(10)] and meta["preprocessing"]["image_size"] == 24
    assert meta["onnx"]["fp32"]["max_abs_diff_probs"] < 1e-4 and meta["onnx"]["fp32"]["checked_images"] > 100
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 7):
        assert session.run(None, {"pixels": np.zeros((batch, 3, 24, 24), np.float32)})[0].shape == (batch, 10)


def test_export_refuses_a_model_that_disagrees_with_pytorch(digits_run, tmp_path, monkeypatch):
    import imgclf.export as export_module

    real = export_module._onnx_logits
    monkeypatch.setattr(
        export_module,
        "_onnx_logits",
        lambda path, x, batch_size=32: real(path, x) + np.linspace(0, 1, 10, dtype=np.float32),
    )
    with pytest.raises(export_module.ExportError, match="differs from PyTorch"):
        export_module.export(digits_run, tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.onnx").exists()


@pytest.mark.slow
def test_int8_export_is_checked_for_agreement_and_accuracy(digits_run, tmp_path):
    from imgclf.export import INT8_MAX_DROP, INT8_MIN_AGREEMENT, ExportError, export

    try:
        report = export(digits_run, tmp_path / "q", int8=True)
    except ExportError as exc:  # refused: the numbers are in the message, the file set aside
        assert "int8 export failed its check" in str(exc)
        assert (tmp_path / "q" / "model.int8.failed.onnx").exists()
        assert not (tmp_path / "q" / "model.int8.onnx").exists()
        meta = json.loads((tmp_path / "q" / "model.json").read_text())  # the fp32 export stays usable
        assert meta["onnx"]["fp32"]["max_abs_diff_probs"] < 1e-4 and "failed" in meta["onnx"]["int8"]
        return
    int8 = report["int8"]
    assert int8["top1_agreement"] >= INT8_MIN_AGREEMENT
    assert int8["fp32_accuracy"] - int8["accuracy"] <= INT8_MAX_DROP
    test = [s for s in read_split_csv(digits_run / "split.csv") if s.split == "test"]
    assert int8["checked_images"] == len(test)


def test_exported_model_predicts_like_the_bundle(digits_run, digits_dir, tmp_path):
    out = tmp_path / "onnx"
    imgclf_export = __import__("imgclf.export", fromlist=["export"]).export
    imgclf_export(digits_run, out)
    clf = imgclf.load(digits_run, {"precision": "fp32"})
    files = [str(p) for p in sorted(digits_dir.glob("*/01*.png"))[:40]]
    x = np.stack([clf._input(f).numpy() for f in files]).astype(np.float32) / 255.0
    prep = clf.preprocessing
    x = (x - np.array(prep.mean, np.float32)[:, None, None]) / np.array(prep.std, np.float32)[:, None, None]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_labels = clf.classes_[session.run(None, {"pixels": x})[0].argmax(1)]
    assert (onnx_labels == clf.predict(files)).all()


def test_an_openvino_failure_leaves_the_onnx_export_whole(digits_run, tmp_path, monkeypatch):
    import imgclf.export as export_module
    from imgclf.runtime import choose_backend

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(export_module, "compile_openvino", broken)
    out = tmp_path / "onnx"
    assert main(["export", str(digits_run), "--out", str(out)]) == 0
    record = json.loads((out / "model.json").read_text())["onnx"]["openvino"]
    assert "unsupported operation" in record["error"] and not record["recommended"]
    assert choose_backend(out) == "onnx"


@pytest.fixture(scope="module")
def export_folder(digits_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "onnx"
    assert main(["export", str(digits_run), "--out", str(out)]) == 0
    return out


def _copy_with_external_data(export_folder, target, location: str):
    """The export in ``target`` with its weights moved to an external file ``location``."""
    import shutil

    import onnx

    shutil.copytree(export_folder, target)
    model = onnx.load(str(target / "model.onnx"))
    # small constants stay inline: ONNX Runtime reads shapes from them
    onnx.save_model(
        model, str(target / "model.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=1024
    )
    model = onnx.load(str(target / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(target / "model.onnx"))
    return target


def test_onnx_external_data_outside_the_folder_or_through_a_symlink_is_refused(export_folder, digits_dir, tmp_path):
    """BAD_INPUTS case 27: weights taken from '../..', an absolute path or a symlink are refused
    before ONNX Runtime reads anything; inside the folder they load and predict the same."""
    import os

    from imgclf.core.errors import BundleError
    from imgclf.predictors.onnx import OnnxClassifier

    photos = [str(p) for p in sorted(digits_dir.glob("*/2*.png"))[:12]]
    reference = OnnxClassifier(export_folder).predict_proba(photos)
    inside = _copy_with_external_data(export_folder, tmp_path / "inside", "weights.bin")
    assert np.allclose(OnnxClassifier(inside).predict_proba(photos), reference, atol=1e-6)

    outside = _copy_with_external_data(export_folder, tmp_path / "outside", "../inside/weights.bin")
    with pytest.raises(BundleError, match=r"takes its data from '../inside/weights.bin', outside the model's folder"):
        OnnxClassifier(outside)
    absolute = _copy_with_external_data(export_folder, tmp_path / "absolute", str(inside / "weights.bin"))
    with pytest.raises(BundleError, match="outside the model's folder"):
        OnnxClassifier(absolute)
    linked = _copy_with_external_data(export_folder, tmp_path / "linked", "weights.bin")
    os.replace(linked / "weights.bin", tmp_path / "elsewhere.bin")
    os.symlink(tmp_path / "elsewhere.bin", linked / "weights.bin")
    with pytest.raises(BundleError, match="through a symlink"):
        OnnxClassifier(linked)


def test_an_export_whose_outputs_do_not_match_its_classes_is_refused(export_folder, tmp_path):
    """BAD_INPUTS case 41: model.json from another model (3 classes) beside a 10-class export."""
    import shutil

    from imgclf.core.errors import BundleError
    from imgclf.predictors.onnx import OnnxClassifier

    shutil.copytree(export_folder, tmp_path / "swapped")
    meta = json.loads((tmp_path / "swapped" / "model.json").read_text())
    meta["classes"] = ["a", "b", "c"]
    (tmp_path / "swapped" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="gives 10 scores but model.json lists 3 classes"):
        OnnxClassifier(tmp_path / "swapped")

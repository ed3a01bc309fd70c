"""The ONNX predictor works where PyTorch is not installed, and agrees with the PyTorch path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import imgclf
from imgclf.cli import main
from imgclf.export import export

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(digits_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "onnx"
    export(digits_run, out)
    return out


def test_runtime_predictions_match_the_torch_path(digits_run, digits_dir, exported):
    from imgclf.runtime import load_onnx

    files = [str(p) for p in sorted(digits_dir.glob("*/0*.png"))[::7]][:120]
    torch_clf, onnx_clf = imgclf.load(digits_run, {"precision": "fp32"}), load_onnx(exported)
    assert list(onnx_clf.classes_) == list(torch_clf.classes_)
    assert np.allclose(onnx_clf.predict_proba(files), torch_clf.predict_proba(files), atol=1e-4)
    assert (onnx_clf.predict(files, k=3) == torch_clf.predict(files, k=3)).all()
    results = list(onnx_clf.predict_files(files + ["/nonexistent.png"], k=2))
    assert results[-1].error and [r.labels[0] for r in results[:-1]] == list(torch_clf.predict(files))


def test_two_batches_at_once_keep_the_order_and_the_answers(digits_dir, exported, tmp_path):
    """A job of several batches runs two at a time (on a machine with 2+ cores): the results come
    back in file order, equal to one batch at a time, with a batch of only bad files between."""
    import os

    from imgclf.runtime import OnnxClassifier

    bad = []
    for i in range(4):  # a whole batch of unreadable files
        bad.append(tmp_path / f"bad-{i}.png")
        bad[-1].write_bytes(b"not an image")
    good = [str(p) for p in sorted(digits_dir.glob("*/1*.png"))[:30]]
    files = good[:8] + [str(p) for p in bad] + good[8:]
    clf = OnnxClassifier(exported, batch_size=4)
    if (os.cpu_count() or 1) >= 2:
        assert clf._batch_runner(batches=len(files) // 4)[0] == 2 and clf._batch_runner(batches=1)[0] == 1
    results = list(clf.predict_files(files, k=3))
    assert [r.path for r in results] == files
    assert [bool(r.error) for r in results] == [False] * 8 + [True] * 4 + [False] * 22
    one_at_a_time = clf.predict_proba(good)  # batch after batch on the one all-core session
    assert np.allclose([r.probs[0] for r in results if not r.error], one_at_a_time.max(1), atol=1e-5)
    assert [r.labels[0] for r in results if not r.error] == list(clf.classes_[one_at_a_time.argmax(1)])


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_cli_backend(digits_dir, exported, capsys, backend):
    files = [str(p) for p in sorted(digits_dir.glob("5/*.png"))[:5]]
    assert main(["predict", str(exported), *files, "--backend", backend, "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert f"backend: {backend} (" in captured.err and len(json.loads(captured.out)) == 5


@pytest.mark.slow
def test_runtime_in_a_venv_without_torch(digits_run, digits_dir, exported, tmp_path):
    """A fresh virtual environment with only the runtime extra's packages (no torch) predicts a
    folder with the same top-1 as the PyTorch path."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--no-deps", str(REPO)], check=True, timeout=600, capture_output=True)
    subprocess.run(pip + ["onnxruntime", "pillow", "numpy"], check=True, timeout=600, capture_output=True)
    folder = digits_dir / "8"
    script = (
        "import sys, json, glob; from imgclf.runtime import load_onnx; "
        f"files = sorted(glob.glob({str(folder)!r} + '/*.png')); "
        f"clf = load_onnx({str(exported)!r}); "
        "print(json.dumps({'torch': 'torch' in sys.modules, 'labels': list(clf.predict(files)), 'files': files}))"
    )
    done = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True)
    assert check.returncode != 0 and not result["torch"], "torch must not be installed in the runtime venv"
    expected = list(imgclf.load(digits_run, {"precision": "fp32"}).predict(result["files"]))
    assert result["labels"] == expected and len(expected) > 100


@pytest.mark.slow
def test_ten_thousand_files_bounded_memory_bad_files_and_progress(digits_dir, exported, tmp_path, capsys):
    import os
    import tracemalloc

    from imgclf.runtime import load_onnx

    folder = tmp_path / "many"
    folder.mkdir()
    sources = sorted(digits_dir.glob("*/*.png"))
    for i in range(10_000):
        os.link(sources[i % len(sources)], folder / f"{i:05d}.png")  # links: fast, real files
    for name in ("bad-a.png", "bad-b.png", "bad-c.png"):
        (folder / name).write_bytes(b"not an image at all")
    files = sorted(str(p) for p in folder.iterdir())
    clf = load_onnx(exported)

    def peak_while_streaming(paths: list[str], events=None) -> tuple[int, int, list[str]]:
        tracemalloc.start()
        count, errors = 0, []
        for result in clf.predict_files(paths, k=5, events=events):
            count += 1
            if result.error:
                errors.append(os.path.basename(result.path) + ": " + result.error)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak, count, errors

    small_peak, _, _ = peak_while_streaming(files[:1000])
    progress = []
    big_peak, count, errors = peak_while_streaming(files, progress.append)
    assert count == 10_003
    assert sorted(errors) == [f"bad-{c}.png: not an image" for c in "abc"]
    assert big_peak < 2 * small_peak + 5_000_000, (small_peak, big_peak)  # does not grow with the file count
    assert progress[0].done == 0 and progress[-1].done == progress[-1].total == 10_003  # progress with images/s
    assert progress[-1].stage == "predict" and progress[-1].rate > 0 and 3 < len(progress) < 2000


def test_one_photo_gives_one_input_in_evaluation_and_in_both_predictors(digits_run, exported, clothing):
    """Evaluation, the PyTorch predictor and the ONNX predictor build the same model input from a
    real JPEG (decoded in draft mode: this model's 24 px input is far smaller than the photo)."""
    from imgclf.data.dataset import open_for
    from imgclf.data.preprocess import normalize
    from imgclf.data.sources import Sample
    from imgclf.data.transforms import eval_tensor
    from imgclf.runtime import load_onnx

    torch_clf, onnx_clf = imgclf.load(digits_run, {"precision": "fp32"}), load_onnx(exported)
    prep = torch_clf.preprocessing
    for path in sorted((clothing / "test").glob("*/*.jpg"))[::60][:6]:
        evaluation = eval_tensor(open_for(Sample(str(path), "x", "test"), prep), prep).numpy()
        assert (torch_clf._input(str(path)).numpy() == evaluation).all()
        assert np.array_equal(onnx_clf._input(str(path)), normalize(evaluation, prep.mean, prep.std))


def test_openvino_backend_agrees_with_onnx_runtime_and_was_measured(digits_dir, exported):
    from imgclf.runtime import cpu_capabilities, load_onnx

    record = json.loads((exported / "model.json").read_text())["onnx"]["openvino"]
    assert record["top1_agreement"] >= 0.99 and record["checked_images"] > 100
    assert record["images_per_s"] > 0 and record["onnxruntime_images_per_s"] > 0
    assert record["cpu_capabilities"] == cpu_capabilities()
    files = [str(p) for p in sorted(digits_dir.glob("*/0*.png"))[::5]][:150]
    openvino, onnx = load_onnx(exported, backend="openvino"), load_onnx(exported, backend="onnx")
    assert openvino.backend == "openvino" and onnx.backend == "onnx"
    assert (openvino.predict(files) == onnx.predict(files)).mean() >= 0.99
    results = list(openvino.predict_files(files[:10] + ["/nonexistent.png"], k=3))
    assert results[-1].error and all(len(r.labels) == 3 for r in results[:-1])


def test_auto_backend_follows_the_measurement_only_on_the_same_cpu(exported, tmp_path):
    import shutil

    from imgclf.runtime import choose_backend, cpu_capabilities

    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    meta = json.loads((folder / "model.json").read_text())

    def record(**changes) -> str:
        meta["onnx"]["openvino"] = {**meta["onnx"]["openvino"], **changes}
        (folder / "model.json").write_text(json.dumps(meta))
        return choose_backend(folder)

    assert record(recommended=True, cpu_capabilities=cpu_capabilities()) == "openvino"
    assert record(recommended=True, cpu_capabilities=["FP32"]) == "onnx"  # measured on another kind of CPU
    assert record(recommended=False, cpu_capabilities=cpu_capabilities()) == "onnx"
    del meta["onnx"]["openvino"]
    (folder / "model.json").write_text(json.dumps(meta))
    assert choose_backend(folder) == "onnx"  # exported where OpenVINO was not installed


@pytest.mark.slow
def test_cli_predict_int8(digits_run, digits_dir, tmp_path, capsys):
    """The int8 model runs from the command line (when export kept it: a refused one is set aside
    and predict says it is not exported)."""
    from imgclf.export import ExportError, export

    out = tmp_path / "onnx"
    try:
        export(digits_run, out, int8=True)
    except ExportError:
        (out / "model.int8.failed.onnx").rename(out / "model.int8.onnx")  # run it anyway: this checks the wiring
    files = [str(p) for p in sorted(digits_dir.glob("7/*.png"))[:6]]
    capsys.readouterr()  # the export's own output
    assert main(["predict", str(out), *files, "--int8", "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert "backend: onnx int8" in captured.err and len(json.loads(captured.out)) == 6
    assert main(["predict", str(out), *files, "--int8", "--backend", "torch"]) == 2
    assert "the int8 model runs on ONNX Runtime" in capsys.readouterr().err
    assert main(["predict", str(out), *files, "--int8", "--backend", "openvino"]) == 2
    assert "the int8 model runs on ONNX Runtime" in capsys.readouterr().err


def test_a_backend_that_cannot_run_is_a_clear_error(digits_dir, exported, capsys, monkeypatch):
    files = [str(p) for p in sorted(digits_dir.glob("1/*.png"))[:2]]
    assert main(["predict", str(exported), *files, "--int8"]) == 2  # exported without --int8
    assert "model.int8.onnx: not exported (imgclf export --int8)" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    assert main(["predict", str(exported), *files, "--backend", "openvino"]) == 2
    assert "pip install 'imgclf[openvino]'" in capsys.readouterr().err

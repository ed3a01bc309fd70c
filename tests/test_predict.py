"""Prediction: scikit-learn manners in Python, thousands of files from the CLI, bad files reported."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import imgclf
from imgclf.cli import main


def test_predict_proba_columns_follow_classes(digits_run, digits_dir):
    clf = imgclf.load(digits_run)
    files = [str(p) for d in range(10) for p in sorted((digits_dir / str(d)).glob("*.png"))[-3:]]
    proba = clf.predict_proba(files)
    assert proba.shape == (30, 10) and np.allclose(proba.sum(1), 1, atol=1e-4)
    labels = clf.predict(files)
    assert (labels == clf.classes_[proba.argmax(1)]).all()
    truth = np.array([f.split("/")[-2] for f in files])
    assert (labels == truth).mean() > 0.7  # chance is 0.1
    top5 = clf.predict(files, k=5)
    assert top5.shape == (30, 5) and (top5[:, 0] == labels).all()


def test_predict_accepts_pil_images_and_arrays(digits_run, digits_dir):
    clf = imgclf.load(digits_run)
    path = sorted((digits_dir / "7").glob("*.png"))[0]
    image = Image.open(path)
    by_path, by_image, by_array = (
        clf.predict_proba([str(path)]),
        clf.predict_proba(image),
        clf.predict_proba([np.asarray(image.convert("RGB"))]),
    )
    assert np.allclose(by_path, by_image, atol=1e-6) and np.allclose(by_path, by_array, atol=1e-6)


def test_cli_predict_thousand_files_json_with_a_bad_file(digits_run, digits_dir, tmp_path, capsys):
    folder = tmp_path / "inbox"
    folder.mkdir()
    for png in sorted(digits_dir.glob("*/*.png"))[:1000]:
        shutil.copy(png, folder / f"{png.parent.name}_{png.name}")
    (folder / "broken.png").write_bytes(b"this is not a png")
    assert main(["predict", str(digits_run), str(folder), "--format", "json", "--top-k", "5"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert len(rows) == 1001
    bad = [r for r in rows if "error" in r]
    assert [r["path"].rsplit("/", 1)[-1] for r in bad] == ["broken.png"] and bad[0]["error"] == "not an image"
    assert "broken.png: not an image" in captured.err
    good = [r for r in rows if "top" in r]
    assert all(len(r["top"]) == 5 for r in good)
    right = sum(r["top"][0]["label"] == r["path"].rsplit("/", 1)[-1].split("_")[0] for r in good)
    assert right / len(good) > 0.7


def test_cli_predict_table_and_csv(digits_run, digits_dir, capsys):
    files = [str(p) for p in sorted(digits_dir.glob("3/*.png"))[:4]]
    assert main(["predict", str(digits_run), *files, "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(len(line.split("\t")) == 4 for line in lines)
    assert main(["predict", str(digits_run), *files, "--format", "csv", "--top-k", "2"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0] == "path,error,label1,prob1,label2,prob2" and len(rows) == 5


def test_min_confidence_answers_unknown_below_the_threshold(digits_run, digits_dir, capsys):
    clf = imgclf.load(digits_run, {"precision": "fp32"})
    files = [str(p) for d in range(10) for p in sorted((digits_dir / str(d)).glob("*.png"))[-4:]]
    top = clf.predict_proba(files).max(1)
    cut = float(np.median(top))
    labels = clf.predict(files, min_confidence=cut)
    assert ((labels == "unknown") == (top < cut)).all() and 0 < (labels == "unknown").sum() < len(files)
    threshold = clf.meta["threshold"]["threshold"]  # chosen on validation when the run was calibrated
    assert ((clf.predict(files, min_confidence="auto") == "unknown") == (top < threshold)).all()
    unsure = [f for f, p in zip(files, top) if p < 0.999][:6]
    assert main(["predict", str(digits_run), *unsure, "--min-confidence", "1", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in rows] == ["unknown"] * len(unsure) and all(r["top"] for r in rows) and unsure
    assert main(["predict", str(digits_run), *unsure, "--min-confidence", "1.01"]) == 2  # not a probability
    assert "min_confidence: 1.01 is not a probability in [0, 1]" in capsys.readouterr().err


def test_evaluate_on_other_labelled_data_writes_its_own_report(digits_run, digits_dir, tmp_path):
    from tests.conftest import write_manifest

    before = (digits_run / "metrics.json").read_text()
    other = write_manifest(digits_dir, tmp_path / "other.csv", per_class=5, classes=range(4))
    assert main(["evaluate", str(digits_run), str(other), "--out", str(tmp_path / "report")]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["n"] == 20 and metrics["split"] == "all" and metrics["data"] == str(other)
    assert metrics["top1"] > 0.5 and set(metrics["per_class"]) == set(clf_classes(digits_run))
    assert (tmp_path / "report" / "report.html").exists() and (tmp_path / "report" / "confusion.png").exists()
    assert (digits_run / "metrics.json").read_text() == before  # the run's own report is untouched


def clf_classes(run) -> list[str]:
    return json.loads((run / "model.json").read_text())["classes"]


def test_max_pixels_is_honoured_by_prediction_and_evaluation(digits_run, digits_dir, tmp_path, capsys):
    files = [str(p) for p in sorted(digits_dir.glob("2/*.png"))[:3]]  # 32 x 32 = 1024 pixels each
    # every file refused: exit status 1, and still one JSON row per file
    assert main(["predict", str(digits_run), *files, "--max-pixels", "1000", "--format", "json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert all("too many pixels" in r["error"] for r in rows)
    with pytest.raises(imgclf.ImgclfError, match="no image to evaluate on.*too many pixels"):
        imgclf.evaluate(digits_run, tmp_path / "report", {"max_pixels": 1000})


def test_predict_exits_non_zero_when_every_file_failed(digits_run, tmp_path, capsys):
    bad = [tmp_path / "a.png", tmp_path / "b.jpg"]
    bad[0].write_bytes(b"not a picture")
    bad[1].write_bytes(b"\xff\xd8\xff\xe0 cut short")
    assert main(["predict", str(digits_run), *map(str, bad)]) == 1
    err = capsys.readouterr().err
    assert "a.png" in err and "b.jpg" in err


def test_predict_into_a_pipe_that_closes_ends_quietly(digits_run, digits_dir):
    """BAD_INPUTS case 61: `imgclf predict ... | head -n 2` ends without a traceback."""
    import subprocess
    import sys

    files = [str(p) for p in sorted(digits_dir.glob("*/*.png"))[:400]]
    command = [sys.executable, "-m", "imgclf.cli", "predict", str(digits_run), *files]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as child:
        first = [child.stdout.readline() for _ in range(2)]
        child.stdout.close()  # what head does after its lines
        err = child.stderr.read().decode()
        code = child.wait(timeout=120)
    assert all(line.count(b"\t") == 5 for line in first)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert code in (0, 141)  # 0 when every line fitted in the pipe before it closed


def test_json_stays_valid_with_a_bad_file_in_the_middle_and_a_stop(digits_run, digits_dir, tmp_path, capsys):
    """Case 61: a failing file mid-stream is one entry among the others; a stop part way through
    still leaves one valid JSON array of what was done."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    for n, png in enumerate(sorted(digits_dir.glob("*/*.png"))[:40]):
        shutil.copy(png, folder / f"{n:03d}.png")
    (folder / "020_broken.png").write_bytes(b"<html>moved</html>")
    assert main(["predict", str(digits_run), str(folder), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["path"].rsplit("/", 1)[-1] for r in rows]
    assert len(rows) == 41 and names.index("020_broken.png") == 21 and rows[21]["error"] == "not an image"

    from imgclf.cli import render
    from imgclf.predictors.base import FilePrediction

    def stopped_midway():
        yield FilePrediction(path="a.png", labels=["3"], probs=[0.9])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        render.predictions(stopped_midway(), "json", 1)
    assert [r["path"] for r in json.loads(capsys.readouterr().out)] == ["a.png"]


def test_each_file_is_predicted_once_through_symlink_loops_and_repeats(digits_run, digits_dir, tmp_path, capsys):
    """BAD_INPUTS case 62: a folder holding a link to itself, a symlinked sub-folder, a glob that
    walks the loop, and a file given twice: every photo is predicted exactly once."""
    import os

    folder = tmp_path / "photos"
    (folder / "a").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    pngs = sorted(digits_dir.glob("*/*.png"))[:6]
    for n, png in enumerate(pngs[:4]):
        shutil.copy(png, folder / "a" / f"{n}.png")
    for n, png in enumerate(pngs[4:]):
        shutil.copy(png, outside / f"x{n}.png")
    os.symlink(folder, folder / "a" / "loop")
    os.symlink(outside, folder / "linked")
    args = [str(folder), str(tmp_path / "photos" / "**" / "*.png"), str(folder / "a" / "0.png")]
    assert main(["predict", str(digits_run), *args, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    real = sorted(os.path.realpath(r["path"]) for r in rows)
    assert len(real) == len(set(real)) == 6, real


def test_extreme_aspect_ratios_are_predicted_at_prediction(digits_run, tmp_path):
    """BAD_INPUTS case 9: a 1x1 photo and a 1:10000 strip are predicted (the crop box is resampled,
    not the whole strip scaled up), in bounded time."""
    import time

    from PIL import Image

    Image.new("RGB", (1, 1), (0, 0, 0)).save(tmp_path / "dot.png")
    Image.new("RGB", (10_000, 1), (255, 255, 255)).save(tmp_path / "strip.png")
    clf = imgclf.load(digits_run, {"precision": "fp32"})
    started = time.perf_counter()
    proba = clf.predict_proba([str(tmp_path / "dot.png"), str(tmp_path / "strip.png")])
    assert proba.shape == (2, 10) and np.allclose(proba.sum(axis=1), 1, atol=1e-4)
    assert time.perf_counter() - started < 10


def test_evaluate_on_other_data_reports_the_photos_it_was_trained_on(digits_run, tmp_path):
    """BAD_INPUTS case 59: other data holding copies of training photos (under new names) is
    evaluated, and the overlap is said and recorded in metrics.json."""
    from imgclf.data.split import read_split_csv

    samples = read_split_csv(digits_run / "split.csv")
    for label in ("3", "5"):
        folder = tmp_path / "other" / label
        folder.mkdir(parents=True)
        trained = [s for s in samples if s.label == label and s.split == "train"][:4]
        unseen = [s for s in samples if s.label == label and s.split == "test"][:3]
        for n, sample in enumerate(trained):
            shutil.copy(sample.path, folder / f"renamed-{n}.png")
        for n, sample in enumerate(unseen):
            shutil.copy(sample.path, folder / f"new-{n}.png")
    said = []
    metrics = imgclf.evaluate(digits_run, tmp_path / "report", data=tmp_path / "other", events=said.append)
    assert metrics["n"] == 14 and metrics["overlap_with_training"] == 8
    assert all("renamed-" in path for path in metrics["overlap_examples"])
    assert any("8 of the 14 images were used in training" in getattr(e, "text", "") for e in said)

"""The command line on real data: check's counts, the demo's accuracy, IDX data end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from imgclf.cli import main


def _readme_counts(clothing) -> dict[str, int]:
    """Per-class totals from the data set's own README table (train + validation + test rows)."""
    lines = (clothing.parent / "README.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| split"))
    names = [c.strip() for c in header.strip("|").split("|")][1:-1]
    totals = dict.fromkeys(names, 0)
    for line in lines:
        if re.match(r"\| (train|validation|test) ", line):
            cells = [c.strip().replace(",", "") for c in line.strip("|").split("|")][1:-1]
            for name, cell in zip(names, cells):
                totals[name] += int(cell)
    return totals


@pytest.mark.slow
def test_check_clothing_finds_the_readme_counts(clothing, tmp_path, capsys):
    out = tmp_path / "audit.json"
    assert main(["check", str(clothing), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["classes"] == _readme_counts(clothing)
    assert report["splits"]["val"]["skirt"] == 12 and report["splits"]["train"]["t-shirt"] == 795
    assert report["n_files"] == 3781 and report["imbalance_ratio"] > 5
    table = capsys.readouterr().out
    assert "t-shirt" in table and "3781 files" in table


@pytest.mark.slow
def test_demo_reaches_95_percent_on_the_digits(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path / "digits"), "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["top1"] >= 0.95 and metrics["n"] > 150
    out = capsys.readouterr().out
    assert f"test top-1 {metrics['top1']:.3f}" in out and "report:" in out and "predicted 3 (true 3)" in out


@pytest.mark.slow
def test_train_on_idx_files_end_to_end(digits_dir, tmp_path):
    """MNIST-format files (as Fashion-MNIST ships them) train like folders: 'train' and 't10k' splits."""
    from PIL import Image

    from imgclf.data.sources.idx import write_idx

    images, labels = [], []
    for label in range(10):
        for png in sorted((digits_dir / str(label)).glob("*.png"))[:60]:
            images.append(np.asarray(Image.open(png).convert("L").resize((28, 28))))
            labels.append(label)
    images, labels = np.stack(images), np.array(labels, dtype=np.uint8)
    order = np.random.default_rng(0).permutation(len(labels))
    train_idx, test_idx = order[:480], order[480:]
    folder = tmp_path / "idx"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte.gz", images[train_idx])
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels[train_idx])
    write_idx(folder / "t10k-images-idx3-ubyte", images[test_idx])
    write_idx(folder / "t10k-labels-idx1-ubyte", labels[test_idx])
    (folder / "classes.txt").write_text("\n".join(f"digit-{d}" for d in range(10)))
    assert (
        main(
            [
                "train",
                str(folder),
                "--out",
                str(tmp_path / "run"),
                "--model",
                "cnn3",
                "--image-size",
                "28",
                "--epochs",
                "6",
                "--batch-size",
                "32",
                "--augment",
                "none",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n"] == 120 and metrics["split"] == "test"
    assert metrics["top1"] > 0.6  # chance is 0.1
    assert "digit-3" in metrics["per_class"]


def test_train_writes_events_as_json_lines(digits_dir, tmp_path, capsys):
    from tests.conftest import write_manifest

    manifest = write_manifest(digits_dir, tmp_path / "m.csv", per_class=15)
    path = tmp_path / "run.jsonl"
    argv = [
        "train",
        str(manifest),
        "--out",
        str(tmp_path / "run"),
        "--model",
        "cnn1",
        "--image-size",
        "16",
        "--epochs",
        "3",
        "--patience",
        "0",
        "--events",
        str(path),
    ]
    assert main(argv) == 0
    events = [
        json.loads(line, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
        for line in path.read_text().splitlines()
    ]
    kinds = [e["event"] for e in events]
    assert kinds.count("epoch_end") == 3 and [e["row"]["epoch"] for e in events if e["event"] == "epoch_end"] == [
        1,
        2,
        3,
    ]
    ends = {e["stage"] for e in events if e["event"] == "progress" and e["done"] == e["total"]}
    assert {"check", "train", "evaluate"} <= ends
    assert any(e["event"] == "message" and e["text"].startswith("test top-1") for e in events)
    assert "epoch 3/3" in capsys.readouterr().err  # the terminal shows the same run


def _one_class(digits_dir, root):
    import shutil

    (root / "7").mkdir(parents=True)
    for png in sorted((digits_dir / "7").glob("*.png"))[:12]:
        shutil.copy(png, root / "7" / png.name)
    return root


def _damaged_bundle(digits_run, root):
    import shutil

    root.mkdir()
    for name in ("model.safetensors", "model.json"):
        shutil.copy(digits_run / name, root / name)
    (root / "model.json").write_text((root / "model.json").read_text()[:200])
    return root


USER_ERRORS = {
    "no data": (lambda d, r, t: ["train", str(t / "empty"), "--out", str(t / "o")], "no labelled images found"),
    "one class": (
        lambda d, r, t: ["train", str(_one_class(d, t / "one")), "--out", str(t / "o")],
        "need at least 2 classes",
    ),
    "head with a scratch model": (
        lambda d, r, t: ["train", str(d), "--out", str(t / "o"), "--model", "cnn3", "--mode", "head"],
        "'head' needs a pretrained model",
    ),
    "cuda without a GPU": (
        lambda d, r, t: ["train", str(d), "--out", str(t / "o"), "--device", "cuda"],
        "no CUDA GPU is available",
    ),
    "unknown setting in a config": (
        lambda d, r, t: [
            "train",
            str(d),
            "--out",
            str(t / "o"),
            "--config",
            str(_write(t / "c.json", '{"epochz": 3}')),
        ],
        "unknown setting 'epochz'; did you mean 'epochs'?",
    ),
    "unknown flag": (lambda d, r, t: ["train", str(d), "--epochz", "3"], "unrecognized arguments: --epochz"),
    "damaged model.json": (
        lambda d, r, t: ["predict", str(_damaged_bundle(r, t / "b")), _digit(d)],
        "model.json: not valid JSON",
    ),
    "unknown backend": (
        lambda d, r, t: ["predict", str(r), _digit(d), "--backend", "tpu"],
        "'tpu' is not one of auto, torch, onnx, openvino",
    ),
    "int8 with the torch backend": (
        lambda d, r, t: ["predict", str(r), _digit(d), "--int8", "--backend", "torch"],
        "the int8 model runs on ONNX Runtime",
    ),
    "no model here": (lambda d, r, t: ["predict", str(t), _digit(d)], "no model.json here"),
    "resume without a run": (lambda d, r, t: ["train", "--resume", str(t)], "no run to resume here"),
    "an --out that is a file": (
        lambda d, r, t: ["train", str(d), "--out", str(_write(t / "f", "x")), "--model", "cnn1"],
        "a file is in the way of the run folder; choose another --out",
    ),
    "an --out under a file": (
        lambda d, r, t: ["train", str(d), "--out", str(_write(t / "g", "x") / "run"), "--model", "cnn1"],
        "cannot create the run folder (Not a directory)",
    ),
    "a worker with a database it does not know": (
        lambda d, r, t: ["worker", "--home", str(t / "h"), "--db", "mysql://x/y"],
        "--db mysql://x/y: expected postgresql://",
    ),
    "a worker whose database does not answer": (
        lambda d, r, t: ["worker", "--home", str(t / "h"), "--db", "postgresql://imgclf@127.0.0.1:9/none"],
        "postgresql://imgclf@127.0.0.1:9/none: cannot connect",
    ),
    "an --out that cannot be made": (
        lambda d, r, t: ["train", str(d), "--out", "/sys/imgclf-run", "--model", "cnn1"],
        "/sys/imgclf-run: cannot create the run folder (Operation not permitted); choose another --out",
    ),
    "an --out that cannot be written in": (
        lambda d, r, t: ["train", str(d), "--out", "/sys/kernel", "--model", "cnn1"],
        "/sys/kernel: cannot write in the run folder",
    ),
    "a CSV that is not text": (
        lambda d, r, t: ["check", str(_write_bytes(t / "m.csv", b"x.png,\x81\x8d\x90\n"))],
        "neither UTF-8 nor Windows-1252",
    ),
}


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


def _write(path, text):
    path.write_text(text)
    return path


def _digit(digits_dir) -> str:
    return str(sorted((digits_dir / "3").glob("*.png"))[0])


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_a_user_error_is_one_line_and_exit_status_2(case, digits_dir, digits_run, tmp_path, capsys):
    import torch

    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "empty").mkdir()
    make_argv, expected = USER_ERRORS[case]
    argv = make_argv(digits_dir, digits_run, tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("imgclf")]
    assert len(lines) == 1 and expected in lines[0], err[-1000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == lines[0]


def test_a_user_error_in_a_real_process_has_no_traceback(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "imgclf.cli", "train", str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("imgclf: error: ")


@pytest.mark.slow
def test_names_that_are_not_utf8_are_trained_on_and_predicted(digits_dir, tmp_path):
    """BAD_INPUTS case 47 end to end: a data set whose file names hold Latin-1 bytes trains (with
    --events), and predict writes such a name back as the same bytes."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    data = tmp_path / "data"
    for label in ("3", "7"):
        (data / label).mkdir(parents=True)
        for n, png in enumerate(sorted((digits_dir / label).glob("*.png"))[:40]):
            name = os.fsdecode(b"caf\xe9-%d.png" % n) if n % 2 else f"{n}.png"
            shutil.copy(png, data / label / name)
    events = tmp_path / "events.jsonl"
    argv = ["train", str(data), "--out", str(tmp_path / "run"), "--model", "cnn1", "--image-size", "16"]
    assert main([*argv, "--epochs", "2", "--events", str(events)]) == 0
    assert all(json.loads(line) for line in events.read_text().splitlines())
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n"] > 0
    photo = data / "7" / os.fsdecode(b"caf\xe9-1.png")
    done = subprocess.run(
        [sys.executable, "-m", "imgclf.cli", "predict", str(tmp_path / "run"), str(photo)],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert done.stdout.startswith(os.fsencode(str(photo)) + b"\t") and b"Traceback" not in done.stderr

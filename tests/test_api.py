"""The verbs report through events alone: check -> train (head and finetune) -> evaluate ->
predict on real photos with bad files among them, and nothing is printed."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from imgclf import api
from imgclf.core.events import EpochEnd, Message, Plan, Progress

CLASSES = ("hat", "pants", "shoes")
BAD = ("empty.jpg", "truncated.jpg", "notes.jpg")


@pytest.fixture(scope="module")
def photos(clothing, tmp_path_factory) -> Path:
    """Real photos in split folders, and three unreadable files among the training hats."""
    root = tmp_path_factory.mktemp("api") / "photos"
    for split, n in (("train", 14), ("validation", 4), ("test", 4)):
        for label in CLASSES:
            (root / split / label).mkdir(parents=True)
            for photo in sorted((clothing / split / label).glob("*.jpg"))[:n]:
                shutil.copy(photo, root / split / label / photo.name)
    hats = root / "train" / "hat"
    (hats / "empty.jpg").write_bytes(b"")
    data = next(hats.glob("*.jpg")).read_bytes()
    (hats / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (hats / "notes.jpg").write_text("<html><body>The photo you asked for was moved.</body></html>")
    return root


def _stages_complete(events: list) -> dict[str, int]:
    """Every stage that started (done == 0) reached done == total; returns starts per stage."""
    started, ended = defaultdict(int), defaultdict(int)
    for event in events:
        if isinstance(event, Progress):
            started[event.stage] += event.done == 0
            ended[event.stage] += event.done == event.total
    incomplete = {stage: (started[stage], ended[stage]) for stage in started if ended[stage] < started[stage]}
    assert not incomplete, f"stages that never reached done == total (starts, ends): {incomplete}"
    return dict(started)


def _named(events: list) -> set[str]:
    return {Path(e.path).name for e in events if isinstance(e, Message) and e.path}


@pytest.mark.slow
def test_check_train_evaluate_predict_speak_only_through_events(photos, tmp_path, capfd):
    capfd.readouterr()
    checked: list = []
    report = api.check(photos, events=checked.append)
    assert {Path(p["path"]).name for p in report.problems} == set(BAD)
    assert "check" in _stages_complete(checked)

    # the audit's results are cached by api.check above, and head mode evaluates from its features
    expected = {"head": {"features (view 0)"}, "finetune": {"train", "validate", "calibrate", "evaluate"}}
    for mode, epochs in (("head", 0), ("finetune", 2)):
        events: list = []
        settings = {"mode": mode, "image_size": 64, "finetune_epochs": epochs or 1, "batch_size": 16}
        result = api.train(photos, tmp_path / mode, settings, events=events.append)
        assert result.status == "finished" and result.metrics["top1"] > 1 / 3 + 0.2, result.metrics
        stages = _stages_complete(events)
        assert expected[mode] <= set(stages), stages
        epoch_ends = [e for e in events if isinstance(e, EpochEnd)]
        assert [e.row["epoch"] for e in epoch_ends] == list(range(1, epochs + 1))
        assert set(BAD) <= _named(events), "each skipped file is named in a message"
        plans = [i for i, e in enumerate(events) if isinstance(e, Plan)]
        first_work = next(i for i, e in enumerate(events) if isinstance(e, Progress) and e.stage != "check")
        assert len(plans) == 1 and plans[0] < first_work, "the plan is stated before the work starts"

    evaluated: list = []
    metrics = api.evaluate(tmp_path / "finetune", events=evaluated.append)
    assert metrics["n"] == 12 and "evaluate" in _stages_complete(evaluated)

    predicted: list = []
    clf = api.load(tmp_path / "head", events=predicted.append)
    files = sorted(str(p) for p in (photos / "test").glob("*/*.jpg")) + [str(photos / "train" / "hat" / "notes.jpg")]
    results = list(clf.predict_files(files, k=2, events=predicted.append))
    assert [r.error for r in results].count("not an image") == 1 and len(results) == 13
    assert _stages_complete(predicted) == {"predict": 1}
    assert any(isinstance(e, Message) and e.text.startswith("backend: torch") for e in predicted)

    out, err = capfd.readouterr()
    assert out == "" and err == "", (out[-500:], err[-500:])

"""report.html agrees with metrics.json, is self-contained, and model.json carries the calibration."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest


@pytest.fixture(params=["digits_run", "clothing_run"])
def run_dir(request):
    """A run on the digit scans and one on real clothing photos."""
    return request.getfixturevalue(request.param)


class _Tables(HTMLParser):
    """Rows of every table, by table id, and the gallery cards' text."""

    def __init__(self):
        super().__init__()
        self.tables, self.current, self.row, self.cell, self.cards, self.in_card = {}, None, None, None, [], 0
        self.images = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.current = attrs.get("id")
            self.tables[self.current] = []
        elif tag == "tr" and self.current:
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            self.cell = ""
        elif tag == "div" and attrs.get("class") == "card":
            self.cards.append("")
            self.in_card = 1
        elif tag == "div" and self.in_card:
            self.in_card += 1
        elif tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.row.append(self.cell.strip())
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.tables[self.current].append(self.row)
            self.row = None
        elif tag == "table":
            self.current = None
        elif tag == "div" and self.in_card:
            self.in_card -= 1

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data
        if self.in_card:
            self.cards[-1] += data + " "


def test_report_html_agrees_with_metrics_json(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    page = (run_dir / "report.html").read_text()
    parsed = _Tables()
    parsed.feed(page)
    rows = {r[0]: r for r in parsed.tables["per-class"][1:]}
    assert set(rows) == set(metrics["per_class"])
    for label, m in metrics["per_class"].items():
        assert rows[label][1] == f"{100 * m['precision']:.1f}%" and rows[label][2] == f"{100 * m['recall']:.1f}%"
        assert int(rows[label][4]) == m["support"]
    f1s = [float(r[3]) for r in parsed.tables["per-class"][1:]]
    assert f1s == sorted(f1s)  # worst first
    matrix = metrics["confusion"]["matrix"]
    for i, label in enumerate(metrics["confusion"]["labels"]):
        assert sum(matrix[i]) == metrics["per_class"][label]["support"]
    assert len(parsed.cards) == min(48, len(metrics["mistakes"]))
    for card, mistake in zip(parsed.cards, metrics["mistakes"]):
        assert f"true: {mistake['true']}" in " ".join(card.split())
    confused = parsed.tables["confused"][1:]
    assert [(r[0], r[1], int(r[2])) for r in confused] == [
        (c["true"], c["predicted"], c["count"]) for c in metrics["most_confused"]
    ]


def test_report_html_is_self_contained(run_dir):
    page = (run_dir / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page), "the report must not need a network"
    parsed = _Tables()
    parsed.feed(page)
    assert parsed.images and all(src.startswith("data:image/") for src in parsed.images)
    for picture in ("training curves", "confusion matrix", "reliability diagram"):
        assert f'alt="{picture}"' in page


def test_bundle_carries_calibration_and_threshold(run_dir):
    meta = json.loads((run_dir / "model.json").read_text())
    assert 0.05 < meta["temperature"] < 20
    assert 0 < meta["threshold"]["threshold"] <= 1 and meta["threshold"]["target_precision"] == 0.95
    calibration = json.loads((run_dir / "metrics.json").read_text())["calibration"]
    assert calibration["ece_after"] <= calibration["ece_before"] + 0.02


def test_the_bundles_hierarchy_separator_is_used_for_levels(tmp_path):
    """Labels built with another separator (a bundle's ``hierarchy`` says which) are scored per level."""
    import numpy as np

    from imgclf.core.events import ignore
    from imgclf.data.sources import Sample
    from imgclf.evaluation.run import report_from_logits

    classes = ["Men/Shoes", "Men/Shirts", "Women/Dresses"]
    meta = {
        "architecture": "cnn1",
        "classes": classes,
        "hierarchy": {"separator": "/", "depth": 2},
        "preprocessing": {"image_size": 32},
        "epoch": 1,
    }
    truth = [0, 1, 2, 2]
    logits = np.array([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0], [0.0, 1.0, 3.0], [0.0, 1.0, 3.0]])  # one shirt as a shoe
    samples = [Sample(f"/x/{i}.png", classes[t]) for i, t in enumerate(truth)]
    metrics = report_from_logits(tmp_path, meta, logits, samples, {"split": "test"}, ignore)
    assert [(lv["depth"], lv["accuracy"]) for lv in metrics["levels"]] == [(1, 1.0), (2, 0.75)]

"""The events channel and the stop token: what every face relies on."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest

from imgclf.core.errors import Stopped
from imgclf.core.events import EpochEnd, JsonLines, Message, Progress, StopToken, Tracker, tee, to_dict


def test_tracker_reports_start_and_end_without_an_event_per_item():
    events: list = []
    tracker = Tracker(events.append, "check", 10_000, interval=60.0)
    for _ in range(10_000):
        tracker.advance()
    assert [(e.done, e.total) for e in events] == [(0, 10_000), (10_000, 10_000)]
    assert events[-1].stage == "check" and events[-1].rate > 0 and events[-1].eta_s == 0


def test_tracker_finish_completes_a_stage_whose_items_were_skipped():
    events: list = []
    tracker = Tracker(events.append, "decode", 5, interval=60.0)
    tracker.advance(3)
    tracker.finish()
    assert events[-1].done == events[-1].total == 5


def test_progress_rate_and_eta():
    progress = Progress("train", 25, 100, "batch", elapsed_s=5.0)
    assert progress.rate == 5.0 and progress.eta_s == 15.0
    assert math.isnan(Progress("train", 0, 100).eta_s)


def test_json_lines_are_strict_json_one_per_event(tmp_path):
    path = tmp_path / "run.jsonl"
    sink = JsonLines(path)
    row = {"epoch": 1, "val_loss": math.nan, "val_top1": 0.5}
    events = [Progress("check", 0, 3), EpochEnd(row, 4, True, 12.5), Message("warning", "skipped x: empty", "x")]
    for event in events:
        sink(event)
    sink.close()
    lines = path.read_text().splitlines()
    parsed = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in lines]
    assert [p["event"] for p in parsed] == ["progress", "epoch_end", "message"]
    assert parsed[1]["row"]["val_loss"] is None and parsed[1]["row"]["val_top1"] == 0.5
    assert parsed[2]["path"] == "x" and parsed[0]["eta_s"] is None and parsed[0]["time"] > 0


def test_tee_hands_every_event_to_each_channel():
    a, b = [], []
    send = tee(a.append, b.append)
    send(Message("info", "hello"))
    assert a == b == [Message("info", "hello")]
    assert to_dict(a[0])["text"] == "hello"


def test_stop_token_set_from_another_thread_is_seen():
    stop = StopToken()
    seen_at = []

    def work():
        for step in range(1000):
            if stop.is_set():
                seen_at.append(step)
                return
            time.sleep(0.002)

    worker = threading.Thread(target=work)
    worker.start()
    time.sleep(0.05)
    stop.set("cancelled by the user")
    worker.join(timeout=5)
    assert seen_at and seen_at[0] < 1000
    with pytest.raises(Stopped, match="cancelled by the user"):
        stop.check()
    stop.set("second reason")
    assert stop.reason == "cancelled by the user"  # the first reason is the one that counts

"""A fetch interrupted by SIGINT or killed by SIGKILL finishes on a rerun with no duplicate files,
no URL asked for twice once settled, and the manifest an uninterrupted run writes; a capped
run stops at exactly N per class; a dry run opens no socket; the result trains (issue 12,
items 9 and 11)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from imgclf import api
from imgclf.data.fetch.manifest import last_records, read_manifest
from tests.data.fetch.conftest import FAST, kept_files, write_lists
from tests.data.fetch.server import Reply

TIMING = ("time", "elapsed_s")


def _lists(tmp_path, s, per_label=12):
    urls = {label: [s.url(f"/{label}/{i}.jpg") for i in range(per_label)] for label in ("shirt", "hat", "dress")}
    urls["hat"].append(s.url("/gone.jpg"))
    return write_lists(tmp_path / "lists", urls)


def _routes(photos, per_label=12, delay=0.08):
    routes = {}
    for n, label in enumerate(("shirt", "hat", "dress")):
        for i in range(per_label):
            routes[f"/{label}/{i}.jpg"] = Reply(photos[n * per_label + i], delay=delay)
    return routes


def _cli(lists, out, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "imgclf.cli", "fetch", *map(str, lists), "--out", str(out), "--concurrency", "2"]
    return subprocess.Popen(args + list(extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_records(out, n, proc, limit=60.0):
    path = out / ".imgclf" / "fetch" / "manifest.jsonl"
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_bytes().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    pytest.fail("the fetch wrote no records")


def _final(out) -> dict:
    return {
        source: {k: v for k, v in record.items() if k not in TIMING}
        for source, record in last_records(out / ".imgclf" / "fetch" / "manifest.jsonl").items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_fetch_resumes_to_the_same_result(tmp_path, serve, photos, how):
    s = serve(_routes(photos))
    lists = _lists(tmp_path, s)
    reference = tmp_path / "reference"
    done = _cli(lists, reference)
    assert done.wait(120) == 0, done.communicate()
    asked_reference = len(s.requests)

    out = tmp_path / "data"
    first = _cli(lists, out)
    _wait_for_records(out, 12, first)
    first.send_signal(how)
    code = first.wait(60)
    stderr = first.communicate()[1]
    assert code == (130 if how == signal.SIGINT else -signal.SIGKILL), stderr
    if how == signal.SIGINT:
        assert "run the same command again" in stderr
    settled = {
        r["url"].split("/", 3)[3]
        for r in last_records(out / ".imgclf" / "fetch" / "manifest.jsonl").values()
        if r["kind"] != "pending" or r["outcome"] == "fetched"
    }
    assert 0 < len(settled) < 37
    asked_before = len(s.requests)

    again = _cli(lists, out)
    assert again.wait(120) == 0, again.communicate()
    asked_again = [p.lstrip("/") for p, _, _ in s.requests[asked_before:]]
    assert not settled & set(asked_again), "a settled URL was asked for again"
    assert len(s.requests) - asked_before < asked_reference  # only what was left
    assert _final(out) == _final(reference)
    files = kept_files(out)
    assert files == kept_files(reference) and len(files) == 36
    assert len({(out / f).read_bytes() for f in files}) == 36  # no picture twice
    assert not list(out.rglob("*.part"))


def test_max_per_class_gives_exactly_n_per_class(tmp_path, serve, photos):
    routes = _routes(photos, delay=0.0)
    routes["/shirt/0.jpg"] = Reply(b"", 404)  # a dead link early in a class is replaced by a later one
    s = serve(routes)
    summary = api.fetch(_lists(tmp_path, s), tmp_path / "data", {**FAST, "max_per_class": 5})
    per_folder = {}
    for f in kept_files(tmp_path / "data"):
        per_folder[f.split("/")[0]] = per_folder.get(f.split("/")[0], 0) + 1
    assert per_folder == {"shirt": 5, "hat": 5, "dress": 5}
    assert summary.by_outcome["ok"] == 15 and summary.by_outcome["not_needed"] > 0
    assert sum(summary.by_outcome.values()) == summary.inputs == 37
    asked = len(s.requests)
    assert asked <= 15 + 1 + 4  # not all 37: at most a download in flight per worker beyond the cap
    bigger = api.fetch(_lists(tmp_path, s), tmp_path / "data", {**FAST, "max_per_class": 8})
    assert bigger.by_outcome["ok"] == 24  # a rerun with a larger cap fetches only the rest


def test_dry_run_opens_no_socket(tmp_path, serve, photos, monkeypatch):
    s = serve(_routes(photos, delay=0.0))
    lists = _lists(tmp_path, s)

    def refuse(*args, **kwargs):
        raise AssertionError("a socket was opened during a dry run")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    summary = api.fetch(lists, tmp_path / "data", FAST, dry_run=True)
    assert summary.dry_run and summary.by_kind["to_request"] == 37
    assert summary.hosts == {f"127.0.0.1:{s.port}": 37}
    assert {label: row["pending"] for label, row in summary.labels.items()} == {"shirt": 12, "hat": 13, "dress": 12}
    assert s.requests == [] and not (tmp_path / "data").exists()


def test_retry_failed_retries_only_transient_failures(tmp_path, serve, photos):
    s = serve({"/busy.jpg": Reply(b"", 503), "/gone.jpg": Reply(b"", 404), "/ok.jpg": Reply(photos[0])})
    lists = write_lists(tmp_path / "lists", {"a": [s.url("/busy.jpg"), s.url("/gone.jpg"), s.url("/ok.jpg")]})
    api.fetch(lists, tmp_path / "data", FAST)
    asked = len(s.requests)
    api.fetch(lists, tmp_path / "data", FAST)
    assert len(s.requests) == asked  # a plain rerun asks for nothing settled, transient included
    s.routes["/busy.jpg"] = Reply(photos[1])
    summary = api.fetch(lists, tmp_path / "data", FAST, retry_failed=True)
    assert [p for p, _, _ in s.requests[asked:]] == ["/busy.jpg"]
    assert summary.by_outcome == {"ok": 2, "not_found": 1}
    records = read_manifest(tmp_path / "data" / ".imgclf" / "fetch" / "manifest.jsonl")
    assert [r["outcome"] for r in records if r["url"].endswith("/busy.jpg")] == ["server_error", "fetched", "ok"]


@pytest.mark.slow
def test_a_fetched_folder_trains(tmp_path, serve, photos):
    s = serve(_routes(photos, delay=0.0))
    data = tmp_path / "data"
    api.fetch(_lists(tmp_path, s), data, {**FAST, "keep_rejected": True})
    assert (data / "_rejected").exists() is False  # nothing was rejected: the 404 has no body to keep
    (data / "_rejected" / "not_image").mkdir(parents=True)
    (data / "_rejected" / "not_image" / "0123456789abcdef.jpg").write_bytes(photos[39])
    result = api.train(
        data,
        tmp_path / "run",
        {"model": "cnn1", "image_size": 16, "epochs": 1, "patience": 0, "min_per_class": 5, "time_budget": "0"},
    )
    assert result.status == "finished"
    classes = json.loads((tmp_path / "run" / "model.json").read_text())["classes"]
    assert sorted(classes) == ["dress", "hat", "shirt"]  # _rejected is not a class

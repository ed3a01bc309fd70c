"""``imgclf fetch`` on the command line: the per-label table, progress as JSON lines, one-line
errors."""

from __future__ import annotations

import json

from imgclf.cli import main
from tests.data.fetch.conftest import write_lists
from tests.data.fetch.server import Reply


def test_fetch_prints_a_table_and_writes_progress_events(tmp_path, serve, photos, capsys):
    s = serve({f"/{i}.jpg": Reply(photos[i]) for i in range(4)})
    lists = write_lists(tmp_path / "lists", {"shirt": [s.url("/0.jpg"), s.url("/1.jpg")],
                                             "hat": [s.url("/2.jpg"), s.url("/3.jpg"), s.url("/x.jpg")]})  # fmt: skip
    events = tmp_path / "events.jsonl"
    code = main(["fetch", *map(str, lists), "--out", str(tmp_path / "data"), "--events", str(events), "--retries", "0"])
    assert code == 0
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    assert rows["shirt"][:1] == ["2"] and rows["hat"][0] == "2" and rows["all"][0] == "4"
    assert "not_found 1" in err and "manifest.jsonl" in err
    progress = [json.loads(line) for line in events.read_text().splitlines()]
    progress = [e for e in progress if e["event"] == "progress" and e["stage"] == "fetch"]
    assert progress[0]["done"] == 0 and progress[-1]["done"] == progress[-1]["total"] == 5
    assert progress[-1]["unit"] == "url" and progress[-1]["detail"]["ok"] == 4 and progress[-1]["detail"]["failed"] == 1
    assert progress[-1]["detail"]["labels"]["hat"] == {"ok": 2, "failed": 1, "placeholder": 0}


def test_dry_run_on_the_command_line(tmp_path, capsys):
    lists = write_lists(tmp_path / "lists", {"shirt": ["http://127.0.0.1:9/a.jpg", "http://127.0.0.1:9/a.jpg"]})
    assert main(["fetch", str(lists[0]), "--out", str(tmp_path / "data"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "host 127.0.0.1:9: 1 URLs" in out and "dry run: 1 URLs to request" in out


def test_fetch_user_errors_are_one_line(tmp_path, capsys):
    assert main(["fetch", "--out", str(tmp_path / "d")]) == 2
    assert "give URL lists" in capsys.readouterr().err
    assert main(["fetch", str(tmp_path / "none.txt"), "--out", str(tmp_path / "d")]) == 2
    assert "none.txt: no such file or folder" in capsys.readouterr().err
    (tmp_path / "l.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    assert main(["fetch", str(tmp_path / "l.txt"), "--out", str(tmp_path / "d"), "--per-host", "0"]) == 2
    assert "per_host" in capsys.readouterr().err

"""imgclf fetch against a test server on 127.0.0.1: HTTP failures, stuck servers, wrong and
oversized content, redirects, placeholders, duplicates and politeness (issue 12, items 2-8)."""

from __future__ import annotations

import io
import time
import tracemalloc

import httpx
import pytest
from PIL import Image, ImageDraw

from imgclf import api
from tests.data.fetch.conftest import FAST, kept_files, run_fetch, write_lists
from tests.data.fetch.server import Endless, Hang, Redirect, Reply, Reset, Seq, Short, Trickle


def test_every_row_one_final_record_and_counts_add_up(tmp_path, serve, photos):
    s = serve(
        {f"/{i}.jpg": Reply(photos[i]) for i in range(6)} | {"/html": Reply(b"<html></html>", content_type="text/html")}
    )
    urls = {
        "shirt": [s.url("/0.jpg"), s.url("/1.jpg"), s.url("/1.jpg"), "ftp://example.com/a.jpg", s.url("/gone.jpg")],
        "hat": [s.url("/2.jpg"), s.url("/html"), "not a url", s.url("/3.jpg") + "#fragment", s.url("/3.jpg")],
    }
    summary, records, _ = run_fetch(tmp_path, urls)
    last = api_last_by_source(tmp_path / "data")
    assert len(last) == 10 == summary.inputs  # every input row, and only those, has a last record
    assert sum(summary.by_outcome.values()) == 10
    assert sum(sum(v for k, v in row.items() if k != "folder") for row in summary.labels.values()) == 10
    assert all(r["kind"] != "pending" for r in last.values())
    outcomes = sorted(r["outcome"] for r in last.values())
    assert outcomes == sorted(
        ["ok", "ok", "duplicate_url", "invalid_url", "not_found", "ok", "not_image", "invalid_url", "ok",
         "duplicate_url"]
    )  # fmt: skip
    assert s.count("/1.jpg") == 1 and s.count("/3.jpg") == 1  # normalised and de-duplicated before any request
    assert kept_files(tmp_path / "data") == sorted(r["path"] for r in last.values() if r["outcome"] == "ok")


def api_last_by_source(data):
    from imgclf.data.fetch.manifest import last_records

    return last_records(data / ".imgclf" / "fetch" / "manifest.jsonl")


def test_http_failures_retry_only_what_may_pass(tmp_path, serve, photos):
    s = serve(
        {
            "/404": Reply(b"", 404),
            "/403": Reply(b"", 403),
            "/flaky": Seq([Reply(b"", 500), Reply(b"", 500), Reply(photos[0])]),
            "/503": Reply(b"", 503),
            "/429": Seq([Reply(b"", 429, headers={"Retry-After": "1"}), Reply(photos[1])]),
            "/429-long": Reply(b"", 429, headers={"Retry-After": "3600"}),
        }
    )
    started = time.monotonic()
    _, records, _ = run_fetch(
        tmp_path, {"a": [s.url(p) for p in ("/404", "/403", "/flaky", "/503", "/429", "/429-long")]}
    )
    got = {url.rsplit("/", 1)[1]: (r["outcome"], r["attempts"], r["kind"]) for url, r in records.items()}
    assert got["404"] == ("not_found", 1, "final") and s.count("/404") == 1
    assert got["403"] == ("forbidden", 1, "final") and s.count("/403") == 1
    assert got["flaky"] == ("ok", 3, "final")
    assert got["503"] == ("server_error", 3, "transient") and s.count("/503") == 3  # 1 + retries=2
    assert got["429"] == ("ok", 2, "final")
    asked = [t for p, t, _ in s.requests if p == "/429"]
    assert asked[1] - asked[0] >= 1.0  # Retry-After: 1 was waited
    assert got["429-long"] == ("rate_limited", 1, "transient") and s.count("/429-long") == 1
    assert time.monotonic() - started < 10


def test_stuck_servers_end_within_the_deadline(tmp_path, serve, photos):
    body = photos[2]
    s = serve(
        {
            "/trickle": Trickle(body, interval=0.2),
            "/hang": Hang(),
            "/short": Short(body[:1000], len(body)),
            "/reset": Reset(),
            "/truncated": Reply(body[: len(body) // 2]),
        }
    )
    urls = [s.url(p) for p in ("/trickle", "/hang", "/short", "/reset", "/truncated")]
    started = time.monotonic()
    _, records, _ = run_fetch(tmp_path, {"a": urls}, url_timeout=2.0, read_timeout=1.0)
    assert time.monotonic() - started < 2.0 + 1.0 + 0.5  # all five in parallel: the deadline + 1 s
    got = {url.rsplit("/", 1)[1]: r for url, r in records.items()}
    for name in ("trickle", "hang"):
        assert got[name]["outcome"] == "timeout" and got[name]["elapsed_s"] <= 3.0
    assert got["short"]["outcome"] == "incomplete" and got["short"]["kind"] == "transient"
    assert got["reset"]["outcome"] == "incomplete"
    assert got["truncated"]["outcome"] == "decode_error" and got["truncated"]["error"]
    assert kept_files(tmp_path / "data") == []
    assert not list((tmp_path / "data").rglob("*.part"))


def test_wrong_and_oversized_content_is_not_read_into_memory(tmp_path, serve):
    big = 60_000_000
    s = serve(
        {
            "/page": Endless(big, content_length=False),  # starts like a JPEG: read until the size cap
            "/sized": Endless(big, content_length=True),
            "/html": Endless(5_000_000, head=b"<!DOCTYPE html><html>", content_type="text/html"),
        }
    )
    bomb = io.BytesIO()
    Image.new("1", (12_000, 10_000)).save(bomb, "PNG")  # 120 Mpx in a few kB
    s.routes["/bomb.png"] = Reply(bomb.getvalue(), content_type="image/png")
    tracemalloc.start()
    try:
        _, records, _ = run_fetch(tmp_path, {"a": [s.url(p) for p in ("/page", "/sized", "/html", "/bomb.png")]},
                                  max_bytes=2_000_000)  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    got = {url.rsplit("/", 1)[1]: r for url, r in records.items()}
    assert got["page"]["outcome"] == "too_large" and "streaming" in got["page"]["error"]
    assert got["sized"]["outcome"] == "too_large" and "Content-Length" in got["sized"]["error"]
    assert got["html"]["outcome"] == "not_image" and "HTML" in got["html"]["error"]
    assert got["bomb.png"]["outcome"] == "too_many_pixels"
    # what this process allocated, the test server's thread included: a few times the cap, not the bodies
    assert peak < 12_000_000, f"peak traced memory {peak / 1e6:.1f} MB for 60 MB bodies under a 2 MB cap"
    assert s.routes["/sized"].sent < 8_000_000  # refused from its Content-Length (what was sent is in socket buffers)


def _moved_picture(size=(300, 200)) -> Image.Image:
    image = Image.new("RGB", size, (230, 230, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 20, size[0] - 20, size[1] - 20), outline=(90, 90, 90), width=6)
    draw.line((20, 20, size[0] - 20, size[1] - 20), fill=(200, 40, 40), width=8)
    draw.ellipse((size[0] // 2 - 40, size[1] // 2 - 40, size[0] // 2 + 40, size[1] // 2 + 40), fill=(40, 40, 160))
    return image


def test_redirects_and_placeholders(tmp_path, serve, photos):
    placeholder_host = serve({"/images/photo_unavailable.png": Reply(b"\x89PNG never asked", content_type="image/png")})
    moved = _moved_picture()
    registered = tmp_path / "moved.png"
    moved.save(registered)
    copy = io.BytesIO()
    moved.resize((240, 160)).save(copy, "JPEG", quality=70)  # re-encoded and resized
    s = serve(
        {
            "/hop1": Redirect("/hop2"), "/hop2": Redirect("/hop3"), "/hop3": Redirect("/final.jpg"),
            "/final.jpg": Reply(photos[3]),
            **{f"/long{i}": Redirect(f"/long{i + 1}") for i in range(6)}, "/long6": Reply(photos[4]),
            "/loop1": Redirect("/loop2"), "/loop2": Redirect("/loop1"),
            "/flickr/123.jpg": Redirect(placeholder_host.url("/images/photo_unavailable.png")),
            **{f"/same{i}.jpg": Reply(photos[5]) for i in range(5)},
            "/moved-copy.jpg": Reply(copy.getvalue()),
            "/real.jpg": Reply(photos[6]),
        }
    )  # fmt: skip
    lists = write_lists(tmp_path / "lists", {"a": [s.url(p) for p in ("/hop1", "/long0", "/loop1", "/flickr/123.jpg",
                        "/moved-copy.jpg", "/real.jpg")] + [s.url(f"/same{i}.jpg") for i in range(5)]})  # fmt: skip
    api.fetch(lists, tmp_path / "data", FAST, placeholders=[registered])
    from tests.data.fetch.conftest import last_by_url

    got = {url.split("/", 3)[3]: r for url, r in last_by_url(tmp_path / "data").items()}
    assert got["hop1"]["outcome"] == "ok" and got["hop1"]["final_url"] == s.url("/final.jpg")
    assert got["long0"]["outcome"] == "too_many_redirects"
    assert got["loop1"]["outcome"] == "too_many_redirects" and "loop" in got["loop1"]["error"]
    assert got["flickr/123.jpg"]["outcome"] == "placeholder"
    assert placeholder_host.requests == []  # refused before the placeholder was asked for
    assert got["moved-copy.jpg"]["outcome"] == "placeholder" and "pHash" in got["moved-copy.jpg"]["error"]
    assert {got[f"same{i}.jpg"]["outcome"] for i in range(5)} == {"suspected_placeholder"}
    assert got["real.jpg"]["outcome"] == "ok"
    assert len(kept_files(tmp_path / "data")) == 2  # the 3-hop photo and the real one


def test_duplicates_kept_once_and_conflicts_dropped(tmp_path, serve, photos):
    s = serve({"/a1.jpg": Reply(photos[7]), "/a2.jpg": Reply(photos[7]), "/b.jpg": Reply(photos[8]),
               "/c.jpg": Reply(photos[8]), "/d.jpg": Reply(photos[9])})  # fmt: skip
    summary, records, _ = run_fetch(
        tmp_path,
        {"shirt": [s.url("/a1.jpg"), s.url("/a2.jpg"), s.url("/b.jpg")], "hat": [s.url("/c.jpg"), s.url("/d.jpg")]},
    )
    outcome = {url.rsplit("/", 1)[1]: r["outcome"] for url, r in records.items()}
    assert outcome == {"a1.jpg": "ok", "a2.jpg": "duplicate", "b.jpg": "label_conflict", "c.jpg": "label_conflict",
                       "d.jpg": "ok"}  # fmt: skip
    assert len(kept_files(tmp_path / "data")) == 2
    assert summary.labels["shirt"]["conflict"] == 1 and summary.labels["shirt"]["duplicate"] == 1


def test_per_host_limit_and_two_hosts_in_parallel(tmp_path, serve, photos):
    one = serve({f"/{i}.jpg": Reply(photos[i], delay=0.15) for i in range(10)})
    two = serve({f"/{i}.jpg": Reply(photos[10 + i], delay=0.15) for i in range(10)})
    urls = [server.url(f"/{i}.jpg") for i in range(10) for server in (one, two)]
    started = time.monotonic()
    summary, _, _ = run_fetch(tmp_path, {"a": urls}, per_host=2, concurrency=16)
    elapsed = time.monotonic() - started
    assert summary.by_outcome == {"ok": 20}
    assert one.max_active == 2 and two.max_active == 2  # the limit, and no more
    first_two = min(t for _, t, _ in two.requests)
    assert first_two < max(t for _, t, _ in one.requests)  # both hosts at once, not one after the other
    assert elapsed < 20 * 0.15 / 2  # faster than one host at a time


def test_closed_port_trips_the_circuit_breaker(tmp_path, monkeypatch):
    import socket

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    sent = []
    original = httpx.AsyncHTTPTransport.handle_async_request

    async def counting(self, request):
        sent.append(str(request.url))
        return await original(self, request)

    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", counting)
    summary, records, _ = run_fetch(tmp_path, {"a": [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(20)]})
    assert len(sent) <= 5, f"{len(sent)} connection attempts to a closed port"
    assert set(summary.by_outcome) <= {"connect_error", "host_unreachable"}
    assert summary.by_kind == {"transient": 20}


def test_x_robots_tag_noai_is_honoured(tmp_path, serve, photos):
    s = serve({"/noai.jpg": Reply(photos[11], headers={"X-Robots-Tag": "noai, noimageai"}),
               "/ours.jpg": Reply(photos[12], headers={"X-Robots-Tag": "imgclf: noimageai"}),
               "/other.jpg": Reply(photos[13], headers={"X-Robots-Tag": "otherbot: noai"}),
               "/index.jpg": Reply(photos[14], headers={"X-Robots-Tag": "noindex"})})  # fmt: skip
    urls = [s.url(p) for p in ("/noai.jpg", "/ours.jpg", "/other.jpg", "/index.jpg")]
    _, records, _ = run_fetch(tmp_path, {"a": urls})
    assert [records[u]["outcome"] for u in urls] == ["robots_denied", "robots_denied", "ok", "ok"]
    _, records, _ = run_fetch(tmp_path, {"a": urls}, name="again", respect_noai=False)
    assert [records[u]["outcome"] for u in urls] == ["ok", "ok", "ok", "ok"]


def test_user_agent_and_identity_encoding_are_sent(tmp_path, serve, photos):
    s = serve({"/a.jpg": Reply(photos[15])})
    run_fetch(tmp_path, {"a": [s.url("/a.jpg")]}, user_agent="shop-crawler/1 (me@example.com)")
    headers = s.requests[0][2]
    assert headers["user-agent"] == "shop-crawler/1 (me@example.com)"
    assert headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("size", [(20, 300), (300, 20)])
def test_small_pictures_are_too_small(tmp_path, serve, size):
    picture = io.BytesIO()
    Image.new("RGB", size, (10, 120, 10)).save(picture, "PNG")
    s = serve({"/p.png": Reply(picture.getvalue(), content_type="image/png")})
    _, records, _ = run_fetch(tmp_path, {"a": [s.url("/p.png")]}, min_side=32)
    assert records[s.url("/p.png")]["outcome"] == "too_small"


def test_keep_rejected_max_side_min_bytes_and_aspect(tmp_path, serve, photos):
    wide = io.BytesIO()
    Image.new("RGB", (900, 60), (200, 20, 20)).save(wide, "PNG")
    s = serve(
        {
            "/truncated.jpg": Reply(photos[16][:3000]),
            "/wide.png": Reply(wide.getvalue(), content_type="image/png"),
            "/big.jpg": Reply(photos[17]),
            **{f"/same{i}.jpg": Reply(photos[18]) for i in range(3)},
            "/ftp-redirect": Redirect("ftp://example.com/a.jpg"),
        }
    )
    urls = [s.url(p) for p in ("/truncated.jpg", "/wide.png", "/big.jpg", "/ftp-redirect")]
    urls += [s.url(f"/same{i}.jpg") for i in range(3)]
    _, records, _ = run_fetch(tmp_path, {"a": urls}, keep_rejected=True, max_side=200, max_aspect=10.0)
    got = {url.rsplit("/", 1)[1]: r for url, r in records.items()}
    assert got["truncated.jpg"]["outcome"] == "decode_error"
    assert got["wide.png"]["outcome"] == "bad_aspect"
    assert got["ftp-redirect"]["outcome"] == "invalid_url" and "redirect" in got["ftp-redirect"]["error"]
    data = tmp_path / "data"
    assert len(list((data / "_rejected" / "decode_error").iterdir())) == 1
    assert len(list((data / "_rejected" / "bad_aspect").iterdir())) == 1
    assert len(list((data / "_rejected" / "suspected_placeholder").iterdir())) == 1  # moved out of the class
    kept = kept_files(data)
    assert kept == [got["big.jpg"]["path"]]
    with Image.open(data / kept[0]) as image:
        assert max(image.size) == 200  # downscaled; the record keeps the size that arrived
    assert (got["big.jpg"]["width"], got["big.jpg"]["height"]) == Image.open(io.BytesIO(photos[17])).size
    _, records, _ = run_fetch(tmp_path, {"a": [s.url("/big.jpg")]}, name="small", min_bytes=len(photos[17]) + 1)
    assert records[s.url("/big.jpg")]["outcome"] == "too_small"

"""The service's bad-input cases (../shared/design/BAD_INPUTS.md): each answered at once with its
code, nothing stored under a name a client chose, unusual but valid photos accepted."""

from __future__ import annotations

import time

import pytest

from tests.badfiles import EXPECTED, OK, make_bad_folder


@pytest.fixture(scope="module")
def target(service):
    client = service.client()
    model = client.post("/v1/models", json={"name": "bad inputs", "categories": ["a", "b"]}).json()
    return model, f"/v1/models/{model['id']}/categories/{model['categories'][0]['id']}/images"


def test_unusual_but_valid_photos_are_accepted_and_bad_ones_named(service, clothing, target, tmp_path):
    _, url = target
    expected = make_bad_folder(tmp_path / "bad", sorted((clothing / "train" / "skirt").glob("*.jpg"))[:3])
    files = [("files", (name, (tmp_path / "bad" / name).read_bytes(), "application/octet-stream")) for name in expected]
    answers = {f["name"]: f for f in service.client().post(url, files=files).json()["files"]}
    for name, reason in EXPECTED.items():
        if reason == OK:
            assert answers[name]["accepted"], (name, answers[name])
        else:
            assert not answers[name]["accepted"] and reason.split(" (")[0] in answers[name]["reason"], answers[name]


def test_names_a_client_chose_are_never_used_as_paths(service, clothing, target):
    _, url = target
    photo = sorted((clothing / "train" / "skirt").glob("*.jpg"))[5].read_bytes()
    names = ["../../escaped.jpg", "/tmp/absolute-imgclf.jpg", "a\x00b.jpg"]
    boundary = "bound"
    parts = (
        b"--"
        + boundary.encode()
        + b'\r\nContent-Disposition: form-data; name="files"; filename="'
        + names[0].encode()
        + b'"\r\nContent-Type: image/jpeg\r\n\r\n'
        + photo
        + b"\r\n"
    )
    body = parts + b"--" + boundary.encode() + b"--\r\n"
    response = service.client().post(
        url, content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 200, response.text
    stored = [p for p in service.home.rglob("*escaped*")] + [p for p in service.home.parent.rglob("escaped.jpg")]
    assert not stored
    for name in names[1:]:
        data = photo + name.encode()  # another file each time, not a duplicate
        answer = service.client().post(url, files=[("files", (name, data, "image/jpeg"))])
        assert answer.status_code == 200 and answer.json()["files"][0]["accepted"], answer.text
    from pathlib import Path

    assert not Path("/tmp/absolute-imgclf.jpg").exists()
    uploads = [p.name for p in (service.home / "uploads").rglob("*") if p.is_file()]
    assert uploads and all(len(p.split(".")[0]) == 64 for p in uploads)  # sha256 names only


def test_ten_thousand_empty_parts_are_refused_quickly(service, target):
    _, url = target
    body = (
        b"".join(b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n\r\n' for _ in range(10_000)) + b"--b--\r\n"
    )
    started = time.monotonic()
    response = service.client().post(url, content=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert 400 <= response.status_code < 500 and time.monotonic() - started < 5
    assert "error" in response.json()


def _zip(entries: list[tuple[str, bytes]], links: tuple[str, ...] = ()) -> bytes:
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16  # a symbolic link
            archive.writestr(info, "/etc/passwd")
    return out.getvalue()


def test_a_zip_of_class_folders_is_taken_and_its_tricks_refused(service, clothing):
    client = service.client()
    model = client.post("/v1/models", json={"name": "zip", "categories": ["hat"]}).json()
    hats = sorted((clothing / "train" / "hat").glob("*.jpg"))[80:83]
    shoes = sorted((clothing / "train" / "shoes").glob("*.jpg"))[80:82]
    entries = [(f"hat/{p.name}", p.read_bytes()) for p in hats] + [(f"shoes/{p.name}", p.read_bytes()) for p in shoes]
    entries += [
        ("../escaped.jpg", hats[0].read_bytes()),
        ("/absolute.jpg", hats[1].read_bytes()),
        ("loose.jpg", hats[2].read_bytes()),
        ("hat/bomb.jpg", b"\0" * (64 * 2**20)),
    ]
    archive = _zip(entries, links=("hat/link.jpg",))
    answer = client.post(f"/v1/models/{model['id']}/zip", files=[("file", ("photos.zip", archive, "application/zip"))])
    assert answer.status_code == 200, answer.text
    by_name = {f["name"]: f for f in answer.json()["files"]}
    assert answer.json()["accepted"] == 5
    for name in ("../escaped.jpg", "/absolute.jpg", "hat/link.jpg"):
        assert by_name[name]["code"] == "unsafe_entry", by_name[name]
    assert not by_name["loose.jpg"]["accepted"] and by_name["hat/bomb.jpg"]["code"] == "too_large"
    categories = {c["name"]: c["images"] for c in client.get(f"/v1/models/{model['id']}").json()["categories"]}
    assert categories == {"hat": 3, "shoes": 2}
    assert not list(service.home.parent.rglob("escaped.jpg"))
    refused = client.post(f"/v1/models/{model['id']}/zip", files=[("file", ("x.zip", b"not a zip", "application/zip"))])
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "not_a_zip"

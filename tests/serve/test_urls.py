"""Photos by URL on the service: off unless the operator allows it; then fetched with imgclf
fetch's engine, and only from public addresses: loopback, private, link-local and metadata
addresses are refused, at every redirect too (issue 15, bad inputs)."""

from __future__ import annotations

import pytest

from tests.serve.conftest import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target(service):
    client = service.client()
    model = client.post("/v1/models", json={"name": "by url", "categories": ["hat", "shoes"]}).json()
    ids = {c["name"]: c["id"] for c in model["categories"]}
    return model["id"], ids


def test_photos_by_url_and_addresses_that_are_refused(service, target, photo_server):
    model_id, ids = target
    closed = free_port()
    internal = photo_server.internal
    refused = [
        internal.url("/secret.jpg"),  # loopback, not the allowed port
        f"http://[::1]:{closed}/x.jpg",
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://10.0.0.1/x.jpg",
        f"http://localhost:{internal.port}/secret.jpg",  # a name that resolves to loopback
        photo_server.url("/to-internal"),  # an allowed host redirecting to a refused one
    ]
    urls = [photo_server.url(f"/hat/{n}.jpg") for n in range(3)] + refused
    urls += [photo_server.url("/missing.jpg"), photo_server.url("/page"), "file:///etc/passwd"]
    answer = service.client().post(f"/v1/models/{model_id}/categories/{ids['hat']}/urls", json={"urls": urls})
    assert answer.status_code == 200, answer.text
    files = answer.json()["files"]
    assert [f["name"] for f in files] == urls
    assert all(f["accepted"] and len(f["sha256"]) == 64 for f in files[:3])
    for f in files[3:9]:
        assert not f["accepted"] and f["code"] == "blocked_address", f
    assert [f["code"] for f in files[9:]] == ["not_found", "not_image", "invalid_url"]
    assert internal.requests == []  # the internal server was never reached
    again = service.client().post(f"/v1/models/{model_id}/categories/{ids['hat']}/urls", json={"urls": urls[:1]})
    assert again.json()["files"][0]["code"] == "duplicate"


def test_nanonets_upload_urls(service, target, photo_server):
    import requests

    model_id, _ = target
    urls = [photo_server.url(f"/shoes/{n}.jpg") for n in range(4)] + ["http://10.1.2.3/x.jpg"]
    data = [("modelId", model_id), ("category", "shoes")] + [("urls", u) for u in urls]
    answer = requests.post(
        f"{service.url}/api/v2/ImageCategorization/UploadUrls/", auth=requests.auth.HTTPBasicAuth(service.admin, ""),
        data=data, timeout=60,
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    counts = {c["name"]: c["count"] for c in answer.json()["categories"]}
    assert counts["shoes"] == 4


def test_urls_are_off_unless_the_operator_allows_them(tmp_path):
    from fastapi.testclient import TestClient

    from imgclf.serve import create_key
    from imgclf.serve.app import create_app

    key = create_key(tmp_path / "home", "admin")
    with TestClient(create_app(tmp_path / "home")) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        model = client.post("/v1/models", json={"name": "m", "categories": ["a", "b"]}).json()
        category = model["categories"][0]["id"]
        answer = client.post(f"/v1/models/{model['id']}/categories/{category}/urls", json={"urls": ["https://x.y/a"]})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "urls_not_allowed"
    assert "--allow-url-uploads" in answer.json()["error"]["message"]

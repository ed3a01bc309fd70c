"""A client script written for Nanonets' v2 image categorization API, as its users write them
(requests, HTTP Basic with the key as user name, form fields), works against imgclf by changing
its base URL."""

from __future__ import annotations

import time

import pytest

requests = pytest.importorskip("requests")

CATEGORIES = ["hat", "shoes"]


@pytest.mark.slow
def test_a_nanonets_client_script_runs_unchanged_but_for_the_url(service, clothing):
    base = service.url + "/api/v2/ImageCategorization/"
    auth = requests.auth.HTTPBasicAuth(service.admin, "")

    response = requests.post(base + "Model/", auth=auth, data={"categories": CATEGORIES}, timeout=30)
    assert response.status_code == 200, response.text
    model_id = response.json()["model_id"]
    assert response.json()["state"] == 0 and response.json()["model_type"] == "classification"

    for category in CATEGORIES:
        for image in sorted((clothing / "train" / category).glob("*.jpg"))[60:72]:
            data = {"file": open(image, "rb"), "category": ("", category), "modelId": ("", model_id)}
            answer = requests.post(base + "UploadFile/", auth=auth, files=data, timeout=30)
            assert answer.status_code == 200, answer.text
    counts = {c["name"]: c["count"] for c in answer.json()["categories"]}
    assert counts == {"hat": 12, "shoes": 12} and answer.json()["state"] == 2

    trained = requests.post(base + "Train/", auth=auth, params={"modelId": model_id}, timeout=30)
    assert trained.status_code == 200 and trained.json()["state"] in (3, 4, 5), trained.text
    deadline, state = time.monotonic() + 300, None
    while time.monotonic() < deadline:
        state = requests.get(base + "Model/", auth=auth, params={"modelId": model_id}, timeout=30).json()["state"]
        if state in (5, -1):
            break
        time.sleep(1)
    assert state == 5

    photo = sorted((clothing / "test" / "shoes").glob("*.jpg"))[3]
    data = {"file": open(photo, "rb"), "modelId": ("", model_id)}
    result = requests.post(base + "LabelFile/", auth=auth, files=data, timeout=30).json()
    assert result["message"] == "Success"
    prediction = result["result"][0]["prediction"]
    assert {p["label"] for p in prediction} == set(CATEGORIES) and abs(
        sum(p["probability"] for p in prediction) - 1
    ) < 1e-3
    assert max(prediction, key=lambda p: p["probability"])["label"] == "shoes"

    wrong = requests.post(base + "LabelFile/", auth=requests.auth.HTTPBasicAuth("wrong", ""), files=data, timeout=30)
    assert wrong.status_code == 401

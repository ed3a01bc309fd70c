"""schemathesis over the service's OpenAPI document, in process: for generated requests to every
route (with an admin key, on a home with a model in it), no 5xx, and every status code and
response shape is one the document declares."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from imgclf.serve import create_key  # noqa: E402
from imgclf.serve.app import create_app  # noqa: E402

_HOME = {}


def _schema():
    """The app over a home holding one model with two categories and a photo, so that generated
    requests reach past the 404s (their ids are swapped for these, see below)."""
    import io
    import tempfile
    from pathlib import Path

    from fastapi.testclient import TestClient
    from PIL import Image

    home = Path(tempfile.mkdtemp(prefix="imgclf-contract-")) / "home"
    key = _HOME["key"] = create_key(home, "admin")
    app = create_app(home)
    photo = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(photo, "JPEG")
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        model = client.post("/v1/models", json={"name": "m", "categories": ["a", "b"]}).json()
        category = model["categories"][0]["id"]
        upload = client.post(f"/v1/models/{model['id']}/categories/{category}/images",
                             files=[("files", ("p.jpg", photo.getvalue(), "image/jpeg"))]).json()  # fmt: skip
    _HOME.update(model_id=model["id"], category_id=category, image_id=upload["files"][0]["image_id"])
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = _schema()
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_route_keeps_to_its_contract(case):
    if case.method.upper() != "DELETE":  # keep the model for the other routes
        for name in ("model_id", "category_id", "image_id"):
            if case.path_parameters and name in case.path_parameters:
                case.path_parameters[name] = _HOME[name]
    case.call_and_validate(headers={"Authorization": f"Bearer {_HOME['key']}"}, checks=CHECKS)

"""The OpenAPI schema is generated from the code, valid, and the committed copy is current."""

from pathlib import Path

import pytest
from django.core.management import call_command
from django.test import Client

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMITTED = REPO_ROOT / "docs" / "openapi.yaml"
REGENERATE = "python manage.py spectacular --validate --fail-on-warn --file docs/openapi.yaml"


def test_the_committed_schema_is_what_the_code_generates(tmp_path):
    generated = tmp_path / "openapi.yaml"
    # --validate checks it against the OpenAPI 3 meta-schema; --fail-on-warn refuses any
    # view or field drf-spectacular could not describe.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(generated))

    assert generated.read_text() == COMMITTED.read_text(), f"run: {REGENERATE}"


def test_every_api_route_is_described():
    import yaml

    paths = set(yaml.safe_load(COMMITTED.read_text())["paths"])
    assert paths == {
        "/api/v1/cases/",
        "/api/v1/cases/{case_id}/",
        "/api/v1/cases/{case_id}/review/",
        "/api/v1/cases/{case_id}/claim/",
        "/api/v1/cases/{case_id}/release/",
        "/api/v1/cases/{case_id}/assignment/",
        "/api/v1/cases/{case_id}/fhir/",
        "/api/v1/images/{image_id}/heatmap/",
        "/api/v1/webhooks/",
        "/api/v1/webhooks/{webhook_id}/",
        "/api/v1/webhooks/{webhook_id}/deliveries/",
    }


@pytest.mark.parametrize(
    ("path", "marker"),
    [
        ("/api/schema/", b"openapi: 3.0.3"),
        ("/api/docs/", b"swagger-ui"),
        ("/api/redoc/", b"redoc"),
    ],
)
def test_schema_swagger_ui_and_redoc_are_served_without_a_token(path, marker):
    response = Client().get(path)

    assert response.status_code == 200
    assert marker in response.content
    # The UI's scripts come from this server (drf-spectacular-sidecar), not a CDN.
    assert b"cdn.jsdelivr.net" not in response.content

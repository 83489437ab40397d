"""The webhook API: site admins register, list and delete their site's webhooks."""

import pytest
from rest_framework.test import APIClient

from diagnostics.models import Webhook, WebhookDelivery
from tests.factories import (
    CaseFactory,
    RadiologistFactory,
    SiteAdminFactory,
    UserFactory,
    WebhookFactory,
    token_for,
)

pytestmark = pytest.mark.django_db


def client_for(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(user)}")
    return client


def test_a_site_admin_registers_a_webhook_and_sees_its_secret_only_once():
    admin = SiteAdminFactory()
    api = client_for(admin)

    created = api.post(
        "/api/v1/webhooks/",
        {"url": "https://ris.example.org/mri", "events": ["case.completed"]},
        format="json",
    )
    listed = api.get("/api/v1/webhooks/")

    webhook = Webhook.objects.get()
    assert created.status_code == 201
    assert created.json() == {
        "id": webhook.id,
        "url": "https://ris.example.org/mri",
        "events": ["case.completed"],
        "is_active": True,
        "created_at": created.json()["created_at"],
        "secret": webhook.secret,
    }
    assert listed.json() == [{k: v for k, v in created.json().items() if k != "secret"}]


def test_a_non_http_url_is_refused_with_the_reason():
    response = client_for(SiteAdminFactory()).post(
        "/api/v1/webhooks/", {"url": "file:///etc/passwd"}, format="json"
    )

    assert (response.status_code, response.json()) == (
        400,
        {"detail": "'file:///etc/passwd' is not an http(s) URL", "code": "invalid_webhook"},
    )


@pytest.mark.parametrize("role_factory", [UserFactory, RadiologistFactory])
def test_uploaders_and_radiologists_may_not_see_or_register_webhooks(role_factory):
    api = client_for(role_factory())

    listed = api.get("/api/v1/webhooks/")
    created = api.post("/api/v1/webhooks/", {"url": "https://a.example/"}, format="json")

    assert (listed.status_code, listed.json()) == (
        403,
        {"detail": "your role does not allow you to see webhooks"},
    )
    assert (created.status_code, created.json()) == (
        403,
        {"detail": "your role does not allow you to register webhooks", "code": "forbidden"},
    )


def test_another_sites_webhook_is_not_found_and_not_deleted():
    theirs = WebhookFactory()
    api = client_for(SiteAdminFactory())

    assert api.get(f"/api/v1/webhooks/{theirs.id}/").status_code == 404
    assert api.delete(f"/api/v1/webhooks/{theirs.id}/").status_code == 404
    assert api.get("/api/v1/webhooks/").json() == []
    assert Webhook.objects.filter(id=theirs.id).exists()


def test_deliveries_are_listed_newest_first_and_deleting_stops_the_webhook():
    admin = SiteAdminFactory()
    site = admin.site_membership.site
    webhook = WebhookFactory(site=site)
    case = CaseFactory(uploaded_by=UserFactory(site=site))
    delivery = WebhookDelivery.objects.create(
        webhook=webhook,
        event="case.completed",
        case_id=case.id,
        payload={},
        attempts=2,
        response_status=500,
        last_error="answered HTTP 500: try later",
    )
    api = client_for(admin)

    listed = api.get(f"/api/v1/webhooks/{webhook.id}/deliveries/")
    deleted = api.delete(f"/api/v1/webhooks/{webhook.id}/")

    assert listed.json() == [
        {
            "id": str(delivery.id),
            "event": "case.completed",
            "case_id": str(case.id),
            "status": "pending",
            "attempts": 2,
            "response_status": 500,
            "last_error": "answered HTTP 500: try later",
            "created_at": listed.json()[0]["created_at"],
            "last_attempt_at": None,
            "delivered_at": None,
        }
    ]
    assert deleted.status_code == 204
    assert not Webhook.objects.exists() and not WebhookDelivery.objects.exists()

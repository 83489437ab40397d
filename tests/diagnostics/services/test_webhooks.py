"""Webhooks: registering, the events a case's changes record, signing, and delivery
against a real local HTTP receiver."""

import time

import pytest
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction

from diagnostics import services
from diagnostics.errors import Forbidden
from diagnostics.models import Status, Webhook, WebhookDelivery
from diagnostics.services import webhooks
from tests.factories import (
    CaseFactory,
    ImageFactory,
    PredictionFactory,
    RadiologistFactory,
    RejectedImageFactory,
    SiteAdminFactory,
    UserFactory,
    WebhookFactory,
)
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.django_db


@pytest.fixture
def sent_jobs(monkeypatch):
    """Delivery jobs sent to the broker, by delivery id."""
    sent = []
    monkeypatch.setattr(webhooks, "deliveries_send", lambda ids: sent.extend(ids) or len(ids))
    return sent


def test_a_site_admin_registers_a_webhook_with_a_server_generated_secret():
    admin = SiteAdminFactory()

    webhook = services.webhook_create(
        user=admin, url="https://ris.example.org/mri", events=["case.reviewed"]
    )

    assert webhook.site == admin.site_membership.site
    assert (webhook.url, webhook.events, webhook.is_active) == (
        "https://ris.example.org/mri",
        ["case.reviewed"],
        True,
    )
    assert len(webhook.secret) == 64 and int(webhook.secret, 16) >= 0


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://ris.example.org/x", "gopher://127.0.0.1:6379/_", "ris/mri", ""],
)
def test_only_http_and_https_urls_are_accepted(url):
    with pytest.raises(services.InvalidWebhook) as refused:
        services.webhook_create(user=SiteAdminFactory(), url=url, events=[])
    assert refused.value.detail == f"{url!r} is not an http(s) URL"
    assert not Webhook.objects.exists()


def test_unknown_events_are_refused():
    with pytest.raises(services.InvalidWebhook) as refused:
        services.webhook_create(user=SiteAdminFactory(), url="http://a.example/", events=["x"])
    assert refused.value.detail == (
        "unknown events ['x']; known: ['case.completed', 'case.reviewed']"
    )


@pytest.mark.parametrize("role_factory", [UserFactory, RadiologistFactory])
def test_uploaders_and_radiologists_may_not_register_webhooks(role_factory):
    with pytest.raises(Forbidden) as refused:
        services.webhook_create(user=role_factory(), url="http://a.example/", events=[])
    assert refused.value.detail == "your role does not allow you to register webhooks"


def test_the_last_image_finishing_records_one_completed_event_per_webhook_after_commit(
    sent_jobs, django_capture_on_commit_callbacks
):
    image = ImageFactory(status=Status.PROCESSING)
    case = image.case
    everything = WebhookFactory(site=case.site)
    completed_only = WebhookFactory(site=case.site, events=["case.completed"])
    WebhookFactory(site=case.site, events=["case.reviewed"])
    WebhookFactory(site=case.site, is_active=False)
    WebhookFactory()  # another site's

    with django_capture_on_commit_callbacks(execute=True) as after_commit:
        services.image_fail(image.id, "the model could not read the image")
        assert sent_jobs == []  # nothing leaves before the commit
    assert len(after_commit) == 1

    deliveries = WebhookDelivery.objects.order_by("webhook_id")
    assert [d.webhook for d in deliveries] == [everything, completed_only]
    assert sorted(sent_jobs) == sorted(d.id for d in deliveries)
    payload = deliveries[0].payload
    case.refresh_from_db()
    assert payload == {
        "event": "case.completed",
        "occurred_at": payload["occurred_at"],
        "case": {
            "id": str(case.id),
            "status": "failed",
            "completed_at": DjangoJSONEncoder().default(case.completed_at),
            "images": 1,
            "failed_images": 1,
            "rejected_images": 0,
            "needs_review": True,
            "predicted_label": None,
            "predicted_confidence": None,
            "review_status": "unreviewed",
            "review_label": None,
            "reviewed_at": None,
        },
    }


def test_the_payload_counts_rejected_slices_and_says_whether_the_case_needs_review(
    sent_jobs, django_capture_on_commit_callbacks
):
    case = CaseFactory(status=Status.DONE)
    WebhookFactory(site=case.site)
    RejectedImageFactory(case=case)
    PredictionFactory(image__case=case, needs_review=False)

    with django_capture_on_commit_callbacks(execute=True):
        [delivery] = services.case_event_record(case_id=case.id, event="case.completed")

    summary = delivery.payload["case"]
    assert (summary["images"], summary["failed_images"], summary["rejected_images"]) == (2, 0, 1)
    assert summary["needs_review"] is True
    assert (summary["predicted_label"], summary["predicted_confidence"]) == ("glioma", 0.7)


def test_a_change_that_rolls_back_announces_nothing(sent_jobs, django_capture_on_commit_callbacks):
    image = ImageFactory(status=Status.PROCESSING)
    WebhookFactory(site=image.case.site)

    with django_capture_on_commit_callbacks(execute=True) as after_commit:
        with pytest.raises(RuntimeError), transaction.atomic():
            services.image_fail(image.id, "boom")
            raise RuntimeError("rolled back")

    assert after_commit == []

    assert sent_jobs == []
    assert not WebhookDelivery.objects.exists()


def test_a_final_reading_records_a_reviewed_event_and_a_second_read_request_does_not(
    sent_jobs, django_capture_on_commit_callbacks
):
    case = PredictionFactory(image__case=CaseFactory(status=Status.DONE)).image.case
    WebhookFactory(site=case.site, events=["case.reviewed"])
    first, second = RadiologistFactory(site=case.site), RadiologistFactory(site=case.site)

    services.case_review(
        user=first,
        case_id=case.id,
        version=0,
        decision="override",
        label="meningioma",
        reason="dural tail",
        request_second_read=True,
    )
    assert not WebhookDelivery.objects.exists()
    with django_capture_on_commit_callbacks(execute=True):
        services.case_review(user=second, case_id=case.id, version=1, decision="confirm")

    [delivery] = WebhookDelivery.objects.all()
    assert delivery.event == "case.reviewed"
    assert delivery.payload["case"]["review_status"] == "confirmed"
    assert delivery.payload["case"]["review_label"] == "glioma"
    assert sent_jobs == [delivery.id]


def test_signatures_verify_and_refuse_tampering_wrong_secrets_and_old_timestamps():
    body = b'{"event": "case.completed"}'
    now = int(time.time())
    header = webhooks.signature_header("s3cret", now, body)

    assert header.startswith(f"t={now},v1=") and len(header.split("v1=")[1]) == 64
    assert webhooks.signature_verify("s3cret", header, body)
    assert not webhooks.signature_verify("s3cret", header, body + b" ")
    assert not webhooks.signature_verify("other", header, body)
    assert not webhooks.signature_verify("s3cret", header, body, now=now + 301)
    assert not webhooks.signature_verify("s3cret", "garbage", body)


def delivery_to(url: str, **webhook) -> WebhookDelivery:
    case = CaseFactory(status=Status.DONE)
    return WebhookDelivery.objects.create(
        webhook=WebhookFactory(site=case.site, url=url, **webhook),
        event="case.completed",
        case_id=case.id,
        payload={"event": "case.completed", "case": {"id": str(case.id), "status": "done"}},
    )


def test_a_delivery_is_posted_signed_and_recorded_as_delivered():
    with Receiver() as receiver:
        delivery = delivery_to(receiver.url)
        outcome = services.webhook_deliver(delivery.id)

    assert outcome == webhooks.DELIVERED
    [received] = receiver.received
    assert received.headers["X-Webhook-Event"] == "case.completed"
    assert received.headers["X-Webhook-Delivery"] == str(delivery.id)
    assert received.headers["Content-Type"] == "application/json"
    secret = delivery.webhook.secret
    assert webhooks.signature_verify(secret, received.headers["X-Webhook-Signature"], received.body)
    assert received.json == {"delivery": str(delivery.id), **delivery.payload}
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.response_status, delivery.last_error) == (
        "delivered",
        1,
        200,
        "",
    )
    assert delivery.delivered_at is not None
    # A second job for the same delivery (redelivered by the broker) sends nothing.
    assert services.webhook_deliver(delivery.id) == webhooks.SKIPPED


def test_an_error_answer_is_retried_until_the_attempts_are_used_up(settings):
    settings.WEBHOOK_MAX_ATTEMPTS = 3
    with Receiver(statuses=[500, 503, 502]) as receiver:
        delivery = delivery_to(receiver.url)
        outcomes = [services.webhook_deliver(delivery.id) for _ in range(4)]

    assert outcomes == [webhooks.RETRY, webhooks.RETRY, webhooks.FAILED, webhooks.SKIPPED]
    assert len(receiver.received) == 3
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.response_status) == ("failed", 3, 502)
    assert delivery.last_error == "answered HTTP 502: try later"


def test_an_unreachable_receiver_is_retried_with_the_cause():
    delivery = delivery_to("http://127.0.0.1:9/nothing-listens")

    assert services.webhook_deliver(delivery.id) == webhooks.RETRY

    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.response_status) == ("pending", 1, None)
    assert delivery.last_error.startswith("ConnectionError: ")


def test_a_redirect_is_not_followed():
    with Receiver(statuses=[302]) as receiver:
        delivery = delivery_to(receiver.url)
        assert services.webhook_deliver(delivery.id) == webhooks.RETRY
    assert len(receiver.received) == 1


def test_a_deactivated_webhook_gets_nothing():
    delivery = delivery_to("http://127.0.0.1:9/", is_active=False)

    assert services.webhook_deliver(delivery.id) == webhooks.FAILED

    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.last_error) == (
        "failed",
        0,
        "the webhook was deactivated",
    )


def test_backoff_doubles_from_the_base_and_stays_below_the_visibility_timeout(settings):
    settings.WEBHOOK_BACKOFF_BASE_S = 10
    settings.CELERY_VISIBILITY_TIMEOUT_S = 600
    assert [webhooks.backoff_s(n) for n in range(1, 8)] == [10, 20, 40, 80, 160, 300, 300]


def test_the_sweeper_resends_deliveries_whose_job_was_lost(sent_jobs):
    lost = delivery_to("http://127.0.0.1:9/")
    fresh = delivery_to("http://127.0.0.1:9/")
    WebhookDelivery.objects.filter(id=lost.id).update(
        created_at=lost.created_at.replace(year=lost.created_at.year - 1)
    )

    assert services.deliveries_resend_stuck() == 1
    assert sent_jobs == [lost.id]
    assert fresh.id not in sent_jobs

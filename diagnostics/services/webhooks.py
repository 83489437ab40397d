"""Webhooks: a site registers an http(s) URL; when one of its cases completes or is
reviewed, a signed POST goes there, retried with backoff until it is answered with 2xx.

Deliveries are an outbox: the row is written in the same transaction as the change it
reports and its job is sent after the commit, so an event is never announced for a change
that rolled back, and never lost when Redis is down (the sweeper sends it later).

Every POST carries
    X-Webhook-Event: case.completed
    X-Webhook-Delivery: <delivery id, the same on every retry: receivers dedupe on it>
    X-Webhook-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>
and a JSON body with ids, statuses and labels only (no file names, no study references).
"""

import hashlib
import hmac
import json
import logging
import secrets
import time
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.serializers.json import DjangoJSONEncoder
from django.core.validators import URLValidator
from django.db import transaction
from django.db.models import Count, F, Q
from django.utils import timezone

from diagnostics import selectors
from diagnostics.errors import DomainError, Forbidden, NotFound
from diagnostics.models import Case, Image, Status, Webhook, WebhookDelivery, WebhookEvent

logger = logging.getLogger(__name__)

DELIVER_TASK = "workers.webhooks.deliver_webhook"
SIGNATURE_HEADER = "X-Webhook-Signature"
EVENT_HEADER = "X-Webhook-Event"
DELIVERY_HEADER = "X-Webhook-Delivery"
# A receiver should refuse signatures older than this (replays).
SIGNATURE_TOLERANCE_S = 300

DELIVERED = "delivered"
RETRY = "retry"
FAILED = "failed"
SKIPPED = "skipped"


class InvalidWebhook(DomainError):
    code = "invalid_webhook"


# --- Registering -------------------------------------------------------------------------


def webhook_create(*, user, url: str, events: list[str], site=None) -> Webhook:
    """Register a receiver for the user's site (superusers name the site). The returned
    webhook's `secret` is the only time anyone sees it."""
    from diagnostics.services.cases import site_for

    _require(user, "add_webhook", "register webhooks")
    if site is None or not user.is_superuser:
        site = site_for(user)
    webhook = Webhook(
        site=site,
        url=_checked_url(url),
        events=_checked_events(events),
        secret=secrets.token_hex(32),
        created_by=user,
    )
    webhook.save()
    logger.info("webhook %s registered for site %s", webhook.id, site.id)
    return webhook


def webhook_update(*, user, webhook: Webhook, url: str, events: list[str], is_active: bool):
    _require(user, "change_webhook", "change webhooks")
    _check_visible(user, webhook)
    Webhook.objects.filter(id=webhook.id).update(
        url=_checked_url(url), events=_checked_events(events), is_active=is_active
    )
    webhook.refresh_from_db()
    return webhook


def webhook_delete(*, user, webhook_id) -> None:
    _require(user, "delete_webhook", "delete webhooks")
    webhook = Webhook.objects.filter(id=webhook_id).first()
    if webhook is None:
        raise NotFound("webhook not found")
    _check_visible(user, webhook)
    webhook.delete()


def _require(user, permission: str, doing: str) -> None:
    if not (user.is_active and user.has_perm(f"diagnostics.{permission}")):
        raise Forbidden(f"your role does not allow you to {doing}")


def _check_visible(user, webhook: Webhook) -> None:
    from diagnostics import selectors

    if not selectors.webhooks_visible_to(user).filter(id=webhook.id).exists():
        raise NotFound("webhook not found")


def _checked_url(url: str) -> str:
    # Only http(s): a file://, gopher:// or other scheme must never be fetched by a worker.
    try:
        URLValidator(schemes=["http", "https"])(url)
    except ValidationError as exc:
        raise InvalidWebhook(f"{url[:100]!r} is not an http(s) URL") from exc
    if len(url) > 500:
        raise InvalidWebhook("the URL is longer than 500 characters")
    return url


def _checked_events(events: list[str]) -> list[str]:
    unknown = set(events) - set(WebhookEvent.values)
    if unknown:
        raise InvalidWebhook(f"unknown events {sorted(unknown)}; known: {WebhookEvent.values}")
    return sorted(set(events))


# --- Recording events (inside the caller's transaction) -----------------------------------


def case_event_record(*, case_id, event: str) -> list[WebhookDelivery]:
    """Queue `event` about the case for every webhook of its site that wants it. Call it
    inside the transaction that makes the change; the jobs go out after the commit."""
    case = Case.objects.only("id", "site_id").get(id=case_id)
    return cases_event_record(case_sites={case.id: case.site_id}, event=event)


def cases_event_record(*, case_sites: dict, event: str) -> list[WebhookDelivery]:
    """case_event_record for many cases ({case id: site id}) at once: the workers' batches
    pay one query when none of the sites has a webhook, the common case."""
    webhooks = [
        w for w in Webhook.objects.filter(site_id__in=set(case_sites.values())) if w.wants(event)
    ]
    if not webhooks:
        return []
    deliveries = []
    for case_id, site_id in case_sites.items():
        payload = None
        for webhook in webhooks:
            if webhook.site_id == site_id:
                payload = payload or _case_payload(case_id, event)
                deliveries.append(
                    WebhookDelivery(webhook=webhook, event=event, case_id=case_id, payload=payload)
                )
    deliveries = WebhookDelivery.objects.bulk_create(deliveries)
    delivery_ids = [delivery.id for delivery in deliveries]
    transaction.on_commit(lambda: deliveries_send(delivery_ids))
    return deliveries


def _case_payload(case_id, event: str) -> dict:
    case = Case.objects.annotate(needs_review=selectors.case_needs_review()).get(id=case_id)
    counts = Image.objects.filter(case_id=case_id).aggregate(
        images=Count("id"),
        failed=Count("id", filter=Q(status=Status.FAILED)),
        rejected=Count("id", filter=Q(status=Status.REJECTED)),
    )
    return {
        "event": event,
        "occurred_at": timezone.now(),
        "case": {
            "id": case.id,
            "status": case.status,
            "completed_at": case.completed_at,
            "images": counts["images"],
            "failed_images": counts["failed"],
            # Not brain MRI slices (or unlike the model's training data): no label.
            "rejected_images": counts["rejected"],
            # A slice failed or was rejected, or the model is unsure of one.
            "needs_review": case.needs_review,
            "predicted_label": case.predicted_label or None,
            "predicted_confidence": case.predicted_confidence,
            "review_status": case.review_status,
            "review_label": case.review_label or None,
            "reviewed_at": case.reviewed_at,
        },
    }


def deliveries_send(delivery_ids) -> int:
    """Send one delivery job per id. A job that cannot be sent (Redis down) leaves its
    delivery pending for the sweeper."""
    from workers.app import app  # the queue boundary, as in diagnostics.jobs

    sent = 0
    for delivery_id in delivery_ids:
        try:
            app.send_task(DELIVER_TASK, args=[str(delivery_id)])
        except Exception:
            logger.exception("could not send webhook delivery %s; the sweeper will", delivery_id)
            break
        sent += 1
    return sent


# --- Delivering (in the worker) ------------------------------------------------------------


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return mac.hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={signature(secret, timestamp, body)}"


def signature_verify(secret: str, header: str, body: bytes, *, now: float | None = None) -> bool:
    """What a receiver does: recompute the HMAC over "<t>.<body>" and refuse old timestamps."""
    try:
        parts = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > SIGNATURE_TOLERANCE_S:
        return False
    return hmac.compare_digest(parts.get("v1", ""), signature(secret, timestamp, body))


def backoff_s(attempts: int) -> float:
    """Wait before the next attempt: base, 2x base, 4x base, ... capped below the broker's
    visibility timeout (a longer countdown would make Redis hand the job out twice)."""
    cap = min(3600, settings.CELERY_VISIBILITY_TIMEOUT_S // 2)
    return min(settings.WEBHOOK_BACKOFF_BASE_S * 2 ** max(attempts - 1, 0), cap)


def webhook_deliver(delivery_id) -> str:
    """POST one delivery once and record the attempt. Returns DELIVERED, RETRY (not
    answered with 2xx; try again after backoff_s(attempts)), FAILED (attempts used up or
    the webhook was deactivated) or SKIPPED (already settled)."""
    delivery = WebhookDelivery.objects.select_related("webhook").filter(id=delivery_id).first()
    if delivery is None or delivery.status != WebhookDelivery.Status.PENDING:
        return SKIPPED
    webhook = delivery.webhook
    if not webhook.is_active:
        _settle(delivery, WebhookDelivery.Status.FAILED, error="the webhook was deactivated")
        return FAILED
    body = json.dumps(
        {"delivery": str(delivery.id), **delivery.payload}, cls=DjangoJSONEncoder, sort_keys=True
    ).encode()
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "brain-mri-diagnostics-webhooks/1",
        EVENT_HEADER: delivery.event,
        DELIVERY_HEADER: str(delivery.id),
        SIGNATURE_HEADER: signature_header(webhook.secret, timestamp, body),
    }
    # Imported on first use: requests (with charset_normalizer) takes 0.1 s to import, which
    # every worker's cold start would pay, the classifying ones included.
    import requests

    response_status, error = None, ""
    try:
        # No redirects: the registered URL is the only place the payload may go.
        response = requests.post(
            _checked_url(webhook.url),
            data=body,
            headers=headers,
            timeout=settings.WEBHOOK_TIMEOUT_S,
            allow_redirects=False,
        )
        response_status = response.status_code
        if not 200 <= response_status < 300:
            error = f"answered HTTP {response_status}: {response.text[:300]}"
    except (requests.RequestException, InvalidWebhook) as exc:
        error = f"{type(exc).__name__}: {exc}"[:1000]

    attempts = delivery.attempts + 1
    if not error:
        status = WebhookDelivery.Status.DELIVERED
    elif attempts >= settings.WEBHOOK_MAX_ATTEMPTS:
        status = WebhookDelivery.Status.FAILED
    else:
        status = WebhookDelivery.Status.PENDING
    _settle(delivery, status, error=error, response_status=response_status, attempted=True)
    if status == WebhookDelivery.Status.DELIVERED:
        return DELIVERED
    logger.warning("webhook delivery %s attempt %d: %s", delivery.id, attempts, error.split(":")[0])
    return FAILED if status == WebhookDelivery.Status.FAILED else RETRY


def _settle(delivery, status, *, error="", response_status=None, attempted=False) -> None:
    now = timezone.now()
    fields = {"status": status, "last_error": error, "response_status": response_status}
    if attempted:
        fields |= {"attempts": F("attempts") + 1, "last_attempt_at": now}
    if status == WebhookDelivery.Status.DELIVERED:
        fields["delivered_at"] = now
    # Guarded: a delivery settled meanwhile (a duplicate job) is not reopened.
    WebhookDelivery.objects.filter(id=delivery.id, status=WebhookDelivery.Status.PENDING).update(
        **fields
    )
    delivery.refresh_from_db()


def deliveries_resend_stuck() -> int:
    """Re-send pending deliveries whose job is gone: never attempted a minute after the
    event (Redis was down), or not attempted again long after their backoff ended."""
    now = timezone.now()
    overdue = timedelta(seconds=backoff_s(settings.WEBHOOK_MAX_ATTEMPTS) * 2 + 60)
    stuck = list(
        WebhookDelivery.objects.filter(status=WebhookDelivery.Status.PENDING)
        .filter(
            Q(last_attempt_at__isnull=True, created_at__lt=now - timedelta(seconds=60))
            | Q(last_attempt_at__lt=now - overdue)
        )
        .values_list("id", flat=True)[: settings.SWEEP_BATCH]
    )
    return deliveries_send(stuck) if stuck else 0

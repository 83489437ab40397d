"""Thin webhook tasks: POST one delivery (retried with backoff), and the sweeper for
deliveries whose job was lost."""

import django

django.setup()

from django.conf import settings  # noqa: E402

from diagnostics import services  # noqa: E402
from diagnostics.services import webhooks  # noqa: E402
from workers import instruments  # noqa: E402
from workers.app import app  # noqa: E402


@app.task(
    bind=True,
    max_retries=None,  # bounded by WEBHOOK_MAX_ATTEMPTS, counted in the database
    # One POST with its timeout, and some slack.
    soft_time_limit=settings.WEBHOOK_TIMEOUT_S + 10,
    time_limit=settings.WEBHOOK_TIMEOUT_S + 20,
)
def deliver_webhook(self, delivery_id: str):
    outcome = services.webhook_deliver(delivery_id)
    instruments.WEBHOOK_DELIVERIES.labels(outcome).inc()
    if outcome == webhooks.RETRY:
        attempts = self.request.retries + 1
        raise self.retry(countdown=webhooks.backoff_s(attempts))
    return outcome


@app.task
def resend_stuck_webhooks():
    return services.deliveries_resend_stuck()

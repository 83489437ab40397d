"""Worker logs: the project's LOGGING (JSON lines) instead of Celery's own format, and the
case id of the job on every record the job writes."""

import logging.config

from celery.signals import setup_logging, task_postrun, task_prerun
from django.conf import settings

from diagnostics.logging import log_context

_job_context = {}


@setup_logging.connect
def _use_project_logging(**_):
    # Connecting this signal tells Celery not to configure logging itself.
    logging.config.dictConfig(settings.LOGGING)


def _case_of(task_name: str, args) -> str | None:
    # classify_image runs a batch of images of many cases: the classification service
    # puts each image's case id on the records it writes about that image.
    from diagnostics.models import WebhookDelivery

    if not args or task_name != "workers.webhooks.deliver_webhook":
        return None
    try:
        return WebhookDelivery.objects.filter(id=args[0]).values_list("case_id", flat=True).first()
    except Exception:  # noqa: BLE001  (a bad id or a database outage: log without the case)
        return None


@task_prerun.connect
def _enter_job_context(task_id=None, task=None, args=None, **_):
    context = log_context(case_id=_case_of(task.name, args), task_id=task_id)
    context.__enter__()
    _job_context[task_id] = context


@task_postrun.connect
def _leave_job_context(task_id=None, **_):
    context = _job_context.pop(task_id, None)
    if context is not None:
        context.__exit__(None, None, None)

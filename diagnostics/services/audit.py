"""The audit trail: every change to a case, a prediction or a review is recorded here by the
service that makes it, inside the same transaction, so a change and its record commit or
roll back together. Rows are never updated or deleted (a database trigger refuses both).

"From where" comes from the request being served (set by `RequestOriginMiddleware`), or
names the Celery task when a worker makes the change, or else says "system".
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from diagnostics.models import AuditEvent


@dataclass(frozen=True)
class Origin:
    source: str
    ip: str | None = None
    user_agent: str = ""


_request_origin: ContextVar[Origin | None] = ContextVar("audit_request_origin", default=None)


def origin_from_request(request) -> Origin:
    if request.path.startswith("/api/"):
        source = AuditEvent.Source.API
    elif request.path.startswith("/admin/"):
        source = AuditEvent.Source.ADMIN
    else:
        source = AuditEvent.Source.WEB
    # REMOTE_ADDR, not X-Forwarded-For: a client can write any forwarded header it likes.
    return Origin(
        source=source,
        ip=request.META.get("REMOTE_ADDR") or None,
        user_agent=request.META.get("HTTP_USER_AGENT", "")[:300],
    )


@contextmanager
def origin_set(origin: Origin) -> Iterator[None]:
    token = _request_origin.set(origin)
    try:
        yield
    finally:
        _request_origin.reset(token)


def current_origin() -> Origin:
    origin = _request_origin.get()
    if origin is not None:
        return origin
    from celery import current_task

    if current_task and current_task.request.id:
        return Origin(
            source=AuditEvent.Source.WORKER,
            user_agent=f"{current_task.name}[{current_task.request.id}]"[:300],
        )
    return Origin(source=AuditEvent.Source.SYSTEM)


def changes_between(before: dict, after: dict) -> dict:
    """{field: [old, new]} for each field whose value differs."""
    return {
        field: [before.get(field), value]
        for field, value in after.items()
        if before.get(field) != value
    }


def record(**fields) -> AuditEvent:
    """Append one event (the fields of event_new). `actor` is the user who acted, None for
    workers and the system."""
    event = event_new(**fields)
    event.save(force_insert=True)
    return event


def events_record(events: list[AuditEvent]) -> None:
    """Append many events (made by event_new) in one statement: the workers' batches."""
    AuditEvent.objects.bulk_create(events)


def event_new(
    *,
    action: str,
    object_type: str,
    object_id,
    changes: dict,
    actor=None,
    case_id=None,
    site_id=None,
) -> AuditEvent:
    """An unsaved event with its origin filled in, for events_record."""
    origin = current_origin()
    return AuditEvent(
        actor=actor,
        actor_name=actor.get_username() if actor is not None else "",
        source=origin.source,
        ip=origin.ip,
        user_agent=origin.user_agent,
        action=action,
        object_type=object_type,
        object_id=str(object_id),
        case_id=case_id,
        site_id=site_id,
        changes=changes,
    )


# What `services.cases` records, one line at each change (uploads and the workers' writes).


def case_created(*, case, images, actor) -> AuditEvent:
    return record(
        action="case.created",
        object_type="case",
        object_id=case.id,
        case_id=case.id,
        site_id=case.site_id,
        actor=actor,
        changes={
            "status": [None, case.status],
            "reference": [None, case.reference],
            "images": [None, [image.original_name for image in images]],
        },
    )


def case_images_added(*, case, images, actor) -> AuditEvent:
    """More slices of a DICOM study joined the study's case."""
    return record(
        action="case.images_added",
        object_type="case",
        object_id=case.id,
        case_id=case.id,
        site_id=case.site_id,
        actor=actor,
        changes={"images": [None, [image.original_name for image in images]]},
    )


# The workers' events, made unsaved for events_record: a batch appends them in one statement.


def case_status_changed(*, case_id, site_id, old: str, new: str) -> AuditEvent:
    return event_new(
        action="case.status_changed",
        object_type="case",
        object_id=case_id,
        case_id=case_id,
        site_id=site_id,
        changes={"status": [old, new]},
    )


def image_finished(*, image_id, case_id, site_id, status: str, cause: str) -> AuditEvent:
    """An image failed or was rejected (`status`), with its cause."""
    return event_new(
        action=f"image.{status}",
        object_type="image",
        object_id=image_id,
        case_id=case_id,
        site_id=site_id,
        changes={"status": [None, status], "error": [None, cause]},
    )


def prediction_recorded(*, prediction, case_id, site_id) -> AuditEvent:
    return event_new(
        action="prediction.recorded",
        object_type="prediction",
        object_id=prediction.id,
        case_id=case_id,
        site_id=site_id,
        changes={
            "image": [None, str(prediction.image_id)],
            "label": [None, prediction.label],
            "probabilities": [None, prediction.probabilities],
            "model": [None, f"{prediction.model_name} {prediction.model_version}"],
        },
    )

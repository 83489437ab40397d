"""The radiologist's reading of a case: claim, assign, confirm, override, second read.

A prediction is a suggestion; the reading is the result. Every write here is a guarded
update on the case's `review_version` (optimistic locking): the client sends the version it
read, and when someone else changed the case since, nothing is written and the caller gets
a Conflict that names who did. The admin and the API call these same functions, and the
permission checks live here so both enforce the same rules.
"""

from django.contrib.auth.models import Group, Permission
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from diagnostics import selectors
from diagnostics.errors import Conflict, DomainError, Forbidden, NotFound
from diagnostics.models import (
    TERMINAL_STATUSES,
    Case,
    Label,
    Review,
    ReviewStatus,
    Role,
    WebhookEvent,
)
from diagnostics.services import audit, webhooks

OPEN_REVIEW_STATUSES = (ReviewStatus.UNREVIEWED, ReviewStatus.SECOND_READ)


class InvalidReview(DomainError):
    code = "invalid_review"


class NotReviewable(Conflict):
    """The case's state does not allow this now (still processing, already read, someone
    else's); unlike a version conflict, reloading does not help by itself."""

    code = "not_reviewable"


def case_claim(*, user, case_id, version: int) -> Case:
    """Assign the case to oneself, so colleagues see it is being read."""
    _require(user, "review_case", "review cases")
    case = _case_for(user, case_id)
    _check_version(case, version)
    _check_open(case)
    _check_not_first_reader(case, user)
    if case.assigned_to_id == user.id:
        return case
    if case.assigned_to_id is not None:
        raise NotReviewable(
            f"this case is assigned to {case.assigned_to.get_username()}; "
            "ask a site admin to reassign it"
        )
    return _write(case, user=user, version=version, action="review.claimed", assigned_to=user)


def case_release(*, user, case_id, version: int) -> Case:
    """Give back a case one claimed, so a colleague can take it."""
    _require(user, "review_case", "review cases")
    case = _case_for(user, case_id)
    _check_version(case, version)
    if case.assigned_to_id != user.id:
        raise NotReviewable("this case is not assigned to you")
    return _write(case, user=user, version=version, action="review.released", assigned_to=None)


def case_assign(*, user, case_id, version: int, assignee_username: str | None) -> Case:
    """A site admin assigns the case to a radiologist of its site, or unassigns it (None)."""
    _require(user, "assign_case", "assign cases")
    case = _case_for(user, case_id)
    assignee = None
    if assignee_username is not None:
        assignee = (
            selectors.radiologists_of(site_id=case.site_id)
            .filter(username=assignee_username)
            .first()
        )
        if assignee is None:
            raise InvalidReview(f"{assignee_username!r} is not a radiologist at {case.site.name}")
    _check_version(case, version)
    _check_open(case)
    if assignee is not None:
        _check_not_first_reader(case, assignee)
    return _write(
        case,
        user=user,
        version=version,
        action="review.assigned" if assignee else "review.unassigned",
        assigned_to=assignee,
    )


def case_review(
    *,
    user,
    case_id,
    version: int,
    decision: str,
    label: str | None = None,
    reason: str = "",
    request_second_read: bool = False,
) -> Case:
    """Record a reading: confirm the model's label, or override it with the label read and
    a reason. A reader who overrides may ask for a second read; the second reader's reading
    is then the result. The reader takes the case if nobody holds it."""
    _require(user, "review_case", "review cases")
    case = _case_for(user, case_id)
    model_label = selectors.case_model_label(case_id=case.id)
    reason = (reason or "").strip()
    if decision == Review.Decision.CONFIRM:
        if model_label is None:
            raise InvalidReview(
                "no slice of this case has a prediction to confirm; "
                "override it with the label you read and a reason"
            )
        if request_second_read:
            raise InvalidReview("a second read is for readings that disagree with the model")
        label = model_label
    elif decision == Review.Decision.OVERRIDE:
        if label not in Label.values:
            raise InvalidReview(f"label must be one of: {', '.join(Label.values)}")
        if label == model_label:
            raise InvalidReview(f"{label!r} is the model's label: confirm it instead")
        if not reason:
            raise InvalidReview("an override needs a reason")
    else:
        raise InvalidReview("decision must be 'confirm' or 'override'")

    _check_version(case, version)
    _check_open(case)
    if case.status not in TERMINAL_STATUSES:
        raise NotReviewable(f"this case is still {case.status}; review it once it is done")
    if case.assigned_to_id not in (None, user.id):
        raise NotReviewable(
            f"this case is assigned to {case.assigned_to.get_username()}; "
            "ask a site admin to reassign it"
        )
    is_second_read = case.review_status == ReviewStatus.SECOND_READ
    _check_not_first_reader(case, user)
    if request_second_read and is_second_read:
        raise InvalidReview("this is already the second read")

    if request_second_read:
        action = "review.second_read_requested"
        fields = {
            "review_status": ReviewStatus.SECOND_READ,
            "review_label": "",
            "assigned_to": None,
        }
    else:
        confirmed = label == model_label
        action = "review.confirmed" if confirmed else "review.overridden"
        fields = {
            "review_status": ReviewStatus.CONFIRMED if confirmed else ReviewStatus.OVERRIDDEN,
            "review_label": label,
            "assigned_to": user,
            "reviewed_at": timezone.now(),
        }
    with transaction.atomic():
        reading = Review.objects.create(
            case=case,
            reader=user,
            decision=decision,
            label=label,
            model_label=model_label or "",
            reason=reason,
            is_second_read=is_second_read,
        )
        reviewed = _write(
            case,
            user=user,
            version=version,
            action=action,
            reading={
                "id": reading.id,
                "decision": decision,
                "label": label,
                "model_label": model_label,
                "reason": reason,
                "second_read": is_second_read,
            },
            **fields,
        )
        if not request_second_read:
            # The final reading: tell the site's webhooks (sent after the commit).
            webhooks.case_event_record(case_id=case.id, event=WebhookEvent.CASE_REVIEWED)
        return reviewed


# What each role may do (codenames of this app). The migration that created the groups
# keeps its own frozen copy; `roles_ensure` brings a database back to this one.
ROLE_PERMISSIONS = {
    Role.UPLOADER: ["add_case", "view_case", "view_image", "view_prediction"],
    Role.RADIOLOGIST: [
        "view_case",
        "view_image",
        "view_prediction",
        "view_review",
        "review_case",
        "view_auditevent",
    ],
    Role.SITE_ADMIN: [
        "view_case",
        "view_image",
        "view_prediction",
        "view_review",
        "assign_case",
        "view_auditevent",
        "view_sitemembership",
        # Their site's webhooks (migration 0006).
        "add_webhook",
        "view_webhook",
        "change_webhook",
        "delete_webhook",
        "view_webhookdelivery",
    ],
}


def roles_ensure() -> None:
    """Create the role groups with exactly their permissions (idempotent)."""
    with transaction.atomic():
        for role, codenames in ROLE_PERMISSIONS.items():
            group, _ = Group.objects.get_or_create(name=role)
            group.permissions.set(
                Permission.objects.filter(
                    content_type__app_label="diagnostics", codename__in=codenames
                )
            )


def user_roles_set(*, user, roles: list[str]) -> None:
    """Give a user exactly these roles. Radiologists and site admins work in the admin, so
    they become staff (an uploader alone needs only the API)."""
    unknown = set(roles) - set(Role.values)
    if unknown:
        raise InvalidReview(f"unknown roles {sorted(unknown)}; known: {Role.values}")
    if Group.objects.filter(name__in=roles).count() != len(set(roles)):
        roles_ensure()
    with transaction.atomic():
        user.groups.set(Group.objects.filter(name__in=roles))
        if set(roles) - {Role.UPLOADER} and not user.is_staff:
            user.is_staff = True
            user.save(update_fields=["is_staff"])


def _require(user, permission: str, doing: str) -> None:
    if not (user.is_active and user.has_perm(f"diagnostics.{permission}")):
        raise Forbidden(f"your role does not allow you to {doing}")


def _case_for(user, case_id) -> Case:
    # Another site's case is "not found", like one that does not exist: ids do not leak.
    case = (
        selectors.cases_visible_to(user)
        .filter(id=case_id)
        .select_related("site", "assigned_to")
        .first()
    )
    if case is None:
        raise NotFound("case not found")
    return case


def _check_version(case: Case, version: int) -> None:
    if case.review_version != version:
        raise _conflict(case.id, sent=version, current=case.review_version)


def _conflict(case_id, *, sent: int, current: int) -> Conflict:
    last = selectors.last_review_change(case_id=case_id)
    who = last.actor_name if last and last.actor_name else "someone else"
    return Conflict(
        f"{who} changed this case's review after you loaded it (you sent version {sent}, "
        f"it is now version {current}); reload the case and decide again"
    )


def _check_open(case: Case) -> None:
    if case.review_status not in OPEN_REVIEW_STATUSES:
        raise NotReviewable(f"this case is already reviewed ({case.review_status})")


def _check_not_first_reader(case: Case, user) -> None:
    if case.review_status != ReviewStatus.SECOND_READ:
        return
    first = case.reviews.order_by("-created_at").values_list("reader_id", flat=True).first()
    if first == user.id:
        raise NotReviewable(
            "you gave the first reading; the second read must come from another radiologist"
        )


def _write(case: Case, *, user, version: int, action: str, reading=None, **fields) -> Case:
    """The guarded update and its audit event, in one transaction."""
    with transaction.atomic():
        updated = Case.objects.filter(id=case.id, review_version=version).update(
            **fields, review_version=F("review_version") + 1
        )
        if not updated:
            # Someone wrote between our read and this update.
            current = Case.objects.values_list("review_version", flat=True).get(id=case.id)
            raise _conflict(case.id, sent=version, current=current)
        before = _review_state(case)
        for field, value in fields.items():
            setattr(case, field, value)
        case.review_version = version + 1
        changes = audit.changes_between(before, _review_state(case))
        if reading is not None:
            changes["reading"] = [None, reading]
        audit.record(
            action=action,
            object_type="review",
            object_id=reading["id"] if reading else case.id,
            case_id=case.id,
            site_id=case.site_id,
            actor=user,
            changes=changes,
        )
    return case


def _review_state(case: Case) -> dict:
    return {
        "review_status": case.review_status,
        "review_label": case.review_label,
        "assigned_to": case.assigned_to.get_username() if case.assigned_to else None,
        "review_version": case.review_version,
    }

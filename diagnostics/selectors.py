"""Every read the API and the admin make. Cases are always scoped to the user's site."""

from django.contrib.auth import get_user_model
from django.db.models import (
    BooleanField,
    ExpressionWrapper,
    F,
    IntegerField,
    Prefetch,
    Q,
    QuerySet,
    Value,
    When,
)
from django.db.models import Case as SqlCase

from diagnostics.models import (
    TERMINAL_STATUSES,
    AuditEvent,
    Case,
    Image,
    Prediction,
    Review,
    ReviewStatus,
    Site,
    Webhook,
    WebhookDelivery,
)


def cases_visible_to(user) -> QuerySet[Case]:
    cases = Case.objects.all()
    if not user.is_superuser:
        cases = cases.filter(site__memberships__user=user)
    return cases


def case_list(*, user, status: str | None = None) -> QuerySet[Case]:
    cases = cases_visible_to(user)
    if status:
        cases = cases.filter(status=status)
    return cases.select_related("assigned_to").prefetch_related(
        Prefetch("images", queryset=Image.objects.select_related("prediction"))
    )


def case_get(*, user, case_id) -> Case | None:
    """The case if this user may see it; None both when it does not exist and when it is
    another site's, so the API cannot leak which ids exist."""
    return case_list(user=user).filter(id=case_id).first()


# --- Review ----------------------------------------------------------------------------------


def case_needs_review() -> ExpressionWrapper:
    """A case needs a careful look when a slice failed, a slice was rejected (not a brain
    MRI slice, or out of distribution), or a slice's prediction has `needs_review` (its
    calibrated confidence is below the model's own review threshold, chosen on validation).
    All three are columns of the case row (kept by the database), so it costs no subquery."""
    return ExpressionWrapper(
        Q(has_failed_image=True) | Q(has_rejected_image=True) | Q(has_flagged_image=True),
        output_field=BooleanField(),
    )


def case_model_label(*, case_id) -> str | None:
    """What the model says about the case, and what "confirm" confirms: the label of its
    most confident slice (None when no slice has a prediction). Read from the predictions
    themselves, not from the case row's copy."""
    return (
        Prediction.objects.filter(image__case_id=case_id)
        .order_by("-confidence", "image__position")
        .values_list("label", flat=True)
        .first()
    )


def case_review_list(*, user) -> QuerySet[Case]:
    """The radiologists' worklist: every visible case with what the list shows, in one
    query per page and no subquery: what it shows, sorts and filters on are columns of
    the case row (deep pages still pay for the OFFSET).

    Default order: cases waiting for a reading first (finished and unreviewed or awaiting
    a second read), flagged ones first among them, then newest first.
    """
    return (
        cases_visible_to(user)
        .select_related("site", "assigned_to")
        .annotate(
            needs_review=case_needs_review(),
            review_rank=SqlCase(
                When(
                    status__in=TERMINAL_STATUSES,
                    review_status__in=[ReviewStatus.UNREVIEWED, ReviewStatus.SECOND_READ],
                    then=Value(0),
                ),
                When(
                    review_status__in=[ReviewStatus.UNREVIEWED, ReviewStatus.SECOND_READ],
                    then=Value(1),
                ),
                default=Value(2),
                output_field=IntegerField(),
            ),
        )
        .order_by("review_rank", F("needs_review").desc(), "-created_at", "-id")
    )


def case_review_get(*, user, case_id) -> Case | None:
    """The case page: the case with each image's prediction, its readings and its lead
    label, or None when the user may not see it."""
    return (
        cases_visible_to(user)
        .filter(id=case_id)
        .select_related("site", "assigned_to", "uploaded_by")
        .annotate(needs_review=case_needs_review())
        .prefetch_related(
            Prefetch("images", queryset=Image.objects.select_related("prediction")),
            Prefetch("reviews", queryset=Review.objects.select_related("reader")),
        )
        .first()
    )


def case_thumbnail_image_get(*, user, case_id) -> Image | None:
    """The case's first slice, which the worklist shows as its thumbnail."""
    return (
        Image.objects.filter(case_id=case_id, case__in=cases_visible_to(user))
        .order_by("position")
        .only("id", "s3_key", "rendering_key", "content_type")
        .first()
    )


def image_get(*, user, case_id, image_id) -> Image | None:
    return (
        Image.objects.filter(id=image_id, case_id=case_id, case__in=cases_visible_to(user))
        .only("id", "s3_key", "rendering_key", "content_type")
        .first()
    )


def image_heatmap_prediction_get(*, user, image_id, case_id=None) -> Prediction | None:
    """The prediction of an image this user may see (its case's site is theirs) when it
    has a heatmap grid, with what its overlay is made from and kept under: the grid, the
    overlay's key ("" until first rendered) and its image's ids and S3 keys. None when the
    image is not visible, has no prediction (rejected images have none) or no grid, so
    another site's image looks like one without a heatmap. `case_id`, when given, must
    match too."""
    predictions = Prediction.objects.filter(
        image_id=image_id, image__case__in=cases_visible_to(user), heatmap__isnull=False
    )
    if case_id is not None:
        predictions = predictions.filter(image__case_id=case_id)
    return (
        predictions.select_related("image")
        .only(
            "id",
            "heatmap",
            "heatmap_key",
            "image__id",
            "image__case_id",
            "image__s3_key",
            "image__rendering_key",
        )
        .first()
    )


def radiologists_of(*, site_id) -> QuerySet:
    """Active users of the site who may review (to assign cases to)."""
    return (
        get_user_model()
        .objects.filter(is_active=True, site_membership__site_id=site_id)
        .filter(
            Q(groups__permissions__codename="review_case")
            | Q(user_permissions__codename="review_case")
        )
        .distinct()
        .order_by("username")
    )


def user_may_review_at(*, user, site_id) -> bool:
    return (
        user.is_active
        and user.has_perm("diagnostics.review_case")
        and (user.is_superuser or radiologists_of(site_id=site_id).filter(id=user.id).exists())
    )


def sites_visible_to(user) -> QuerySet[Site]:
    sites = Site.objects.all()
    if not user.is_superuser:
        sites = sites.filter(memberships__user=user)
    return sites.order_by("name")


def audit_events_visible_to(user) -> QuerySet[AuditEvent]:
    events = AuditEvent.objects.all()
    if not user.is_superuser:
        events = events.filter(site__memberships__user=user)
    return events


def audit_events_for_case(*, user, case_id) -> QuerySet[AuditEvent]:
    return audit_events_visible_to(user).filter(case_id=case_id).order_by("created_at", "id")


def last_review_change(*, case_id) -> AuditEvent | None:
    """The latest review event on a case: who changed it under someone else's feet."""
    return (
        AuditEvent.objects.filter(case_id=case_id, object_type="review")
        .order_by("-created_at", "-id")
        .first()
    )


# --- Webhooks --------------------------------------------------------------------------------


def webhooks_visible_to(user) -> QuerySet[Webhook]:
    webhooks = Webhook.objects.select_related("site")
    if not user.is_superuser:
        webhooks = webhooks.filter(site__memberships__user=user)
    return webhooks.order_by("created_at", "id")


def webhook_deliveries_visible_to(user) -> QuerySet[WebhookDelivery]:
    deliveries = WebhookDelivery.objects.select_related("webhook", "webhook__site")
    if not user.is_superuser:
        deliveries = deliveries.filter(webhook__site__memberships__user=user)
    return deliveries.order_by("-created_at", "-id")

"""Domain: sites own cases; a case holds uploaded slices; each slice gets one prediction.

Statuses are explicit state machines. Transitions happen only in `services` through
guarded updates (`filter(status=...).update(...)`), never in `save()` or signals.
"""

import uuid

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.db.models import F, Func
from django.db.models.functions import Cast
from django.utils import timezone


class Site(models.Model):
    """A hospital or department. Every query for cases is scoped by site."""

    name = models.CharField(max_length=200, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return self.name


class SiteMembership(models.Model):
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="site_membership"
    )
    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="memberships")

    def __str__(self):
        return f"{self.user} @ {self.site}"


class Status(models.TextChoices):
    """An image's status, and its case's (derived from its images'; see `Case`).

    received -> queued -> processing -> done | failed | rejected. The last three are
    terminal. `rejected`: the model refused to read the slice, because it is not a brain
    MRI slice or not one like its training data (out of distribution); the reason is in
    `Image.error`, the OOD score in `Image.ood_score`, and there is no prediction (no
    tumour label is ever shown for it). `failed`: nothing could read it (not decodable,
    too many attempts).
    """

    RECEIVED = "received"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"


TERMINAL_STATUSES = (Status.DONE, Status.FAILED, Status.REJECTED)
# Terminal without a prediction: either makes the case need review.
UNREADABLE_STATUSES = (Status.FAILED, Status.REJECTED)


class Label(models.TextChoices):
    """What a slice can be read as; the classifier's classes (ml.config.CLASS_NAMES)."""

    GLIOMA = "glioma"
    MENINGIOMA = "meningioma"
    NO_TUMOR = "no_tumor", "no tumour"
    PITUITARY = "pituitary"


class ReviewStatus(models.TextChoices):
    UNREVIEWED = "unreviewed"
    # The first reader disagreed with the model and asked a colleague to read it too.
    SECOND_READ = "second_read", "awaiting second read"
    CONFIRMED = "confirmed"
    OVERRIDDEN = "overridden"


class Role(models.TextChoices):
    """Django groups of the same names, created with their permissions by a migration."""

    UPLOADER = "uploader"
    RADIOLOGIST = "radiologist"
    SITE_ADMIN = "site admin"


class Case(models.Model):
    """One patient study. Its status summarises its images' statuses (services.cases):

    - every image terminal: `done` if any image is done, else `rejected` if any is
      rejected, else `failed`;
    - else `processing` once any image is terminal or processing, else `queued` once any
      is queued, else `received`.

    It "needs review" (worklist flag, `selectors`) when any image's prediction has
    `needs_review` (below the model's own validation-chosen threshold) or any image
    failed or was rejected.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="cases")
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="uploaded_cases"
    )
    # Pseudonymous study reference supplied by the uploader; never a patient identifier.
    reference = models.CharField(max_length=128, blank=True)
    # Duplicate uploads return the existing case: the client's Idempotency-Key header, and
    # the sha256 over the sorted sha256s of its images (same bytes, same case).
    idempotency_key = models.CharField(max_length=255, blank=True)
    content_sha256 = models.CharField(max_length=64, blank=True)
    # A DICOM study's pseudonymous StudyInstanceUID (a keyed hash of the original and the
    # site; see diagnostics.dicom): later uploads of the same study add their slices here.
    study_uid = models.CharField(max_length=64, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RECEIVED)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    # The radiologist's reading (see services.reviews). `review_version` is the optimistic
    # lock: every review write sends the version it read and bumps it.
    review_status = models.CharField(
        max_length=16, choices=ReviewStatus.choices, default=ReviewStatus.UNREVIEWED
    )
    review_label = models.CharField(max_length=32, choices=Label.choices, blank=True)
    assigned_to = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="assigned_cases",
    )
    review_version = models.PositiveIntegerField(default=0)
    reviewed_at = models.DateTimeField(null=True, blank=True)

    # What the worklist sorts and filters on, kept by PostgreSQL triggers whenever a
    # prediction is written or a slice fails or is rejected (migrations 0005, 0008), so a
    # page of 100,000 cases needs no per-case subqueries. Read-only for Python: never
    # assign them.
    # The model's label for the case: its most confident slice's.
    predicted_label = models.CharField(max_length=32, blank=True, editable=False)
    predicted_confidence = models.FloatField(null=True, blank=True, editable=False)
    # The least confident slice's probability (informative; the flag below decides).
    min_confidence = models.FloatField(null=True, blank=True, editable=False)
    # "Needs review" is any of these three: a slice failed, a slice was rejected (not a
    # brain MRI / out of distribution), a slice's prediction has needs_review.
    has_failed_image = models.BooleanField(default=False, editable=False)
    has_rejected_image = models.BooleanField(default=False, editable=False)
    has_flagged_image = models.BooleanField(default=False, editable=False)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["site", "idempotency_key"],
                condition=~models.Q(idempotency_key=""),
                name="case_idempotency_key_unique_per_site",
            ),
            models.UniqueConstraint(
                fields=["site", "content_sha256"],
                condition=~models.Q(content_sha256=""),
                name="case_content_unique_per_site",
            ),
            models.UniqueConstraint(
                fields=["site", "study_uid"],
                condition=~models.Q(study_uid=""),
                name="case_study_unique_per_site",
            ),
        ]
        indexes = [
            models.Index(fields=["site", "-created_at"]),
            models.Index(fields=["site", "status", "-created_at"]),
            models.Index(fields=["site", "review_status", "-created_at"]),
            models.Index(fields=["assigned_to", "review_status"]),
        ]
        permissions = [
            ("review_case", "Can review cases: claim, confirm, override, second read"),
            ("assign_case", "Can assign cases of the site to any radiologist"),
        ]

    def __str__(self):
        return str(self.id)


class Image(models.Model):
    """One uploaded slice. The S3 key is generated by the server, never from the file name."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    case = models.ForeignKey(Case, on_delete=models.CASCADE, related_name="images")
    position = models.PositiveSmallIntegerField()
    s3_key = models.CharField(max_length=255, unique=True)
    sha256 = models.CharField(max_length=64)
    size_bytes = models.PositiveIntegerField()
    content_type = models.CharField(max_length=64)
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    # As sent by the client, for display only; for DICOM a neutral name ("MR series 4 image
    # 12.dcm"), since the uploaded one may carry the patient's name.
    original_name = models.CharField(max_length=255, blank=True)
    # DICOM only: the 8-bit PNG rendering the model classifies and the admin shows (the
    # de-identified DICOM itself is at `s3_key`), and the slice's pseudonymous UIDs.
    rendering_key = models.CharField(max_length=255, blank=True)
    series_uid = models.CharField(max_length=64, blank=True)
    instance_uid = models.CharField(max_length=64, blank=True)

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RECEIVED)
    attempts = models.PositiveSmallIntegerField(default=0)
    # Why it failed, or why it was rejected ("not a brain MRI slice: the image is blank").
    error = models.TextField(blank=True)
    # The model's out-of-distribution score (squared Mahalanobis distance of its features to
    # the nearest class mean; higher = less like the training data), kept here so that a
    # rejected slice, which has no prediction, keeps it too. Null before classification
    # and for models without an OOD detector.
    ood_score = models.FloatField(null=True, blank=True)
    received_at = models.DateTimeField(auto_now_add=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    processing_started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["case", "position"]
        constraints = [
            models.UniqueConstraint(fields=["case", "position"], name="image_position_unique"),
            # A DICOM slice is in its study's case once, however often it is uploaded.
            models.UniqueConstraint(
                fields=["case", "instance_uid"],
                condition=~models.Q(instance_uid=""),
                name="image_dicom_instance_unique",
            ),
        ]
        indexes = [models.Index(fields=["status", "queued_at"])]

    def __str__(self):
        return f"{self.case_id}/{self.position}"


class Prediction(models.Model):
    """The model's output for one image. One per image: the unique key makes a second
    delivery of the same job unable to write a second prediction."""

    image = models.OneToOneField(Image, on_delete=models.CASCADE, related_name="prediction")
    label = models.CharField(max_length=32)
    probabilities = models.JSONField()
    model_name = models.CharField(max_length=100)
    model_version = models.CharField(max_length=50)
    model_sha256 = models.CharField(max_length=64)
    runtime = models.CharField(max_length=20)
    # Time spent decoding + running the model, and from upload to the result.
    inference_ms = models.FloatField()
    turnaround_ms = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)
    # The calibrated top probability is below the model's own review threshold (chosen on
    # validation, model.json `review_threshold`): its case needs a careful look.
    needs_review = models.BooleanField(default=False)
    # The out-of-distribution score of the slice (also on Image.ood_score); null when the
    # model has no OOD detector.
    ood_score = models.FloatField(null=True, blank=True)
    # The class activation map of `label` as nested lists (7x7 floats, 0..1), from which
    # the overlay PNG is rendered; null when the model gives none. The overlay is rendered
    # on first view (services.heatmaps.image_heatmap_png), not by the worker, and kept in
    # S3 under `heatmap_key` (services.heatmaps.heatmap_key_for): "" until first viewed.
    heatmap = models.JSONField(null=True, blank=True)
    heatmap_key = models.CharField(max_length=255, blank=True)
    # The probability of the predicted label (its maximum), computed by PostgreSQL so lists
    # can filter and sort on it without reading the JSON in Python.
    confidence = models.GeneratedField(
        expression=Cast(
            Func(F("probabilities"), F("label"), template="(%(expressions)s)", arg_joiner=" ->> "),
            models.FloatField(),
        ),
        output_field=models.FloatField(),
        db_persist=True,
    )

    def __str__(self):
        return f"{self.label} ({self.image_id})"


class Review(models.Model):
    """One radiologist's reading of a case. A case has one, or two when the first reader
    disagreed with the model and asked for a second read; the last one is the result."""

    class Decision(models.TextChoices):
        CONFIRM = "confirm"
        OVERRIDE = "override"

    case = models.ForeignKey(Case, on_delete=models.CASCADE, related_name="reviews")
    reader = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="reviews"
    )
    decision = models.CharField(max_length=16, choices=Decision.choices)
    label = models.CharField(max_length=32, choices=Label.choices)
    # What the model said when the reader decided, so a later model cannot rewrite history.
    model_label = models.CharField(max_length=32, blank=True)
    reason = models.TextField(blank=True)
    is_second_read = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["case", "created_at"]

    def __str__(self):
        return f"{self.decision} {self.label} by {self.reader_id} ({self.case_id})"


class AuditEvent(models.Model):
    """Append-only: who changed what, when and from where. Written by services in the same
    transaction as the change; a database trigger refuses UPDATE and DELETE."""

    class Source(models.TextChoices):
        API = "api"
        ADMIN = "admin"
        WEB = "web"
        WORKER = "worker"
        SYSTEM = "system"

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    # No foreign keys to the audited rows: the trail must outlive them. Users and sites are
    # protected instead (deactivate a user, never delete one who acted).
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="audit_events",
    )
    actor_name = models.CharField(max_length=150, blank=True)
    source = models.CharField(max_length=16, choices=Source.choices)
    ip = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=300, blank=True)
    action = models.CharField(max_length=64)
    object_type = models.CharField(max_length=32)
    object_id = models.CharField(max_length=64)
    case_id = models.UUIDField(null=True, blank=True)
    site = models.ForeignKey(
        Site, on_delete=models.PROTECT, null=True, blank=True, related_name="audit_events"
    )
    changes = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["case_id", "created_at"]),
            models.Index(fields=["site", "-created_at"]),
        ]

    def __str__(self):
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_name or self.source} {self.action}"


class WebhookEvent(models.TextChoices):
    # Every image is done, failed or rejected: the predictions can be fetched.
    CASE_COMPLETED = "case.completed"
    # A radiologist's final reading is recorded (confirmed or overridden).
    CASE_REVIEWED = "case.reviewed"


class Webhook(models.Model):
    """A site's receiver: events about its cases are POSTed there, signed with `secret`
    (HMAC-SHA256; see services.webhooks). The secret is generated by the server and shown
    once, when the webhook is created."""

    site = models.ForeignKey(Site, on_delete=models.CASCADE, related_name="webhooks")
    url = models.URLField(max_length=500, help_text="http(s) URL that receives the POSTs")
    secret = models.CharField(max_length=64, editable=False)
    events = models.JSONField(default=list, help_text="event names; empty means every event")
    is_active = models.BooleanField(default=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["site", "created_at"]

    def __str__(self):
        return self.url

    def wants(self, event: str) -> bool:
        return self.is_active and (not self.events or event in self.events)


class WebhookDelivery(models.Model):
    """One event for one webhook, and how its delivery went. Written in the same
    transaction as the change it reports (an outbox), then sent by a worker."""

    class Status(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        FAILED = "failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=32, choices=WebhookEvent.choices)
    case_id = models.UUIDField(null=True, blank=True)
    payload = models.JSONField(encoder=DjangoJSONEncoder)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "created_at"])]
        verbose_name_plural = "webhook deliveries"

    def __str__(self):
        return f"{self.event} -> {self.webhook_id} ({self.status})"

"""Every write to the domain happens in these modules; the API, the admin and the workers
call them. `cases`: uploads and classification; `heatmaps`: the class activation overlays,
rendered on first view and kept in S3 next to the images; `reviews`: the radiologist's
reading; `audit`: the append-only trail every write records."""

from diagnostics.services.cases import (
    IdempotencyKeyReused,
    ImageBusy,
    NoSite,
    StudyReviewed,
    case_create,
    demo_user_ensure,
    enqueue_images,
    image_classify,
    image_fail,
    images_resend_stuck,
    site_for,
    user_create,
)
from diagnostics.services.classification import (
    BatchOutcome,
    images_claim,
    images_classify,
    images_fail,
)
from diagnostics.services.heatmaps import (
    heatmap_grid,
    heatmap_key_for,
    image_heatmap_png,
)
from diagnostics.services.reviews import (
    InvalidReview,
    NotReviewable,
    case_assign,
    case_claim,
    case_release,
    case_review,
    roles_ensure,
    user_roles_set,
)
from diagnostics.services.webhooks import (
    InvalidWebhook,
    case_event_record,
    deliveries_resend_stuck,
    webhook_create,
    webhook_delete,
    webhook_deliver,
    webhook_update,
)

__all__ = [
    "BatchOutcome",
    "images_claim",
    "images_classify",
    "images_fail",
    "heatmap_grid",
    "heatmap_key_for",
    "image_heatmap_png",
    "InvalidWebhook",
    "case_event_record",
    "deliveries_resend_stuck",
    "webhook_create",
    "webhook_delete",
    "webhook_deliver",
    "webhook_update",
    "InvalidReview",
    "NotReviewable",
    "case_assign",
    "case_claim",
    "case_release",
    "case_review",
    "roles_ensure",
    "user_roles_set",
    "IdempotencyKeyReused",
    "ImageBusy",
    "NoSite",
    "StudyReviewed",
    "case_create",
    "demo_user_ensure",
    "enqueue_images",
    "image_classify",
    "image_fail",
    "images_resend_stuck",
    "site_for",
    "user_create",
]

"""Every write to the domain happens in these modules; the API, the admin and the workers
call them. `cases`: uploads and classification; `reviews`: the radiologist's reading;
`audit`: the append-only trail every write records."""

from diagnostics.services.cases import (
    Claim,
    IdempotencyKeyReused,
    ImageBusy,
    NoSite,
    case_create,
    demo_user_ensure,
    enqueue_images,
    image_attempt_failed,
    image_claim,
    image_classify,
    image_fail,
    image_release,
    images_resend_stuck,
    prediction_record,
    site_for,
    user_create,
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

__all__ = [
    "InvalidReview",
    "NotReviewable",
    "case_assign",
    "case_claim",
    "case_release",
    "case_review",
    "roles_ensure",
    "user_roles_set",
    "Claim",
    "IdempotencyKeyReused",
    "ImageBusy",
    "NoSite",
    "case_create",
    "demo_user_ensure",
    "enqueue_images",
    "image_claim",
    "image_classify",
    "image_attempt_failed",
    "image_fail",
    "image_release",
    "images_resend_stuck",
    "prediction_record",
    "site_for",
    "user_create",
]

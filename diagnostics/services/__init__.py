"""Every write to the domain happens in these modules; the API, the admin and the workers
call them. `cases`: uploads and classification."""

from diagnostics.services.cases import (
    Claim,
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

__all__ = [
    "Claim",
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

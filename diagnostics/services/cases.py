"""Uploads and classification: cases, their images and predictions."""

import hashlib
import logging
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from diagnostics import jobs, selectors, storage
from diagnostics.errors import Conflict, Forbidden, InvalidUpload, ServiceUnavailable
from diagnostics.models import (
    Case,
    Image,
    Prediction,
    ReviewStatus,
    Site,
    Status,
)
from diagnostics.services import audit, classification
from diagnostics.uploads import CheckedImage, check_image

logger = logging.getLogger(__name__)


class NoSite(InvalidUpload):
    status_code = 403
    code = "no_site"


def site_for(user) -> Site:
    membership = getattr(user, "site_membership", None)
    if membership is None:
        raise NoSite("your account belongs to no site; ask an administrator to add it to one")
    return membership.site


class IdempotencyKeyReused(InvalidUpload):
    status_code = 422
    code = "idempotency_key_reused"


class StudyReviewed(Conflict):
    code = "study_reviewed"


def case_create(
    *, user, uploads: list[tuple[str, bytes]], reference: str = "", idempotency_key: str = ""
) -> tuple[Case, bool]:
    """Store every slice in S3, then commit the case and its images in one transaction.
    Returns the case, with its images and their predictions loaded, and whether it is new.

    All files are decoded before anything is stored, so one bad file rejects the whole
    request with nothing kept. If S3 or the database fails half way, the objects already
    written are deleted again: no row points at a missing object, and no object is left
    without a row. Jobs are sent only after the commit.

    A repeated upload (the same Idempotency-Key, or the same image bytes) returns the
    site's existing case instead of a second one, also when both arrive at once.

    DICOM slices are de-identified before anything is stored, and one study is one case:
    slices of a study the site already has a case for are added to that case (True when
    any slice was new; slices it already holds are skipped), also when two uploads of a
    new study arrive at once.
    """
    site = site_for(user)
    if not user.has_perm("diagnostics.add_case"):
        raise Forbidden("your role does not allow you to upload cases")
    if not uploads:
        raise InvalidUpload("no images: send one or more files in the 'images' field")
    if len(uploads) > settings.MAX_IMAGES_PER_CASE:
        raise InvalidUpload(
            f"{len(uploads)} images in one case; the limit is {settings.MAX_IMAGES_PER_CASE}"
        )
    checked = [
        check_image(data, name, pseudonym_scope=_pseudonym_scope(site)) for name, data in uploads
    ]
    study_uid = _one_study(checked)
    checked = _without_repeated_slices(checked)
    content_sha256 = hashlib.sha256("".join(sorted(c.sha256 for c in checked)).encode()).hexdigest()
    existing = _case_duplicate(site, idempotency_key, content_sha256)
    if existing is not None:
        return _as_stored(user, existing), False
    if study_uid:
        study_case = Case.objects.filter(site=site, study_uid=study_uid).first()
        if study_case is not None:
            study_case, added = _study_slices_add(study_case, checked, user=user)
            return _as_stored(user, study_case), added

    case = Case(
        id=uuid.uuid4(),
        site=site,
        uploaded_by=user,
        reference=reference,
        idempotency_key=idempotency_key,
        content_sha256=content_sha256,
        study_uid=study_uid,
    )
    images = _images_new(case, checked, first_position=0)

    stored_keys: list[str] = []
    try:
        _objects_store(images, checked, stored_keys)
        with transaction.atomic():
            case.save(force_insert=True)
            Image.objects.bulk_create(images)
            audit.case_created(case=case, images=images, actor=user)
            # Whether `case` and `images` still say what is stored once the jobs are sent.
            as_stored: list[bool] = []
            transaction.on_commit(lambda: as_stored.append(_new_case_enqueue(case, images)))
    except storage.StorageUnavailable as exc:
        _discard_objects(stored_keys)
        logger.warning("upload refused, object storage unavailable: %s", exc)
        raise ServiceUnavailable(
            "object storage is unavailable; nothing was stored, retry later"
        ) from exc
    except IntegrityError:
        # The same upload committed first in a concurrent request: answer with that one.
        _discard_objects(stored_keys)
        existing = _case_duplicate(site, idempotency_key, content_sha256)
        if existing is not None:
            return _as_stored(user, existing), False
        # Another upload of the same DICOM study created its case first: join it.
        study_case = study_uid and Case.objects.filter(site=site, study_uid=study_uid).first()
        if not study_case:
            raise
        study_case, added = _study_slices_add(study_case, checked, user=user)
        return _as_stored(user, study_case), added
    except DatabaseError as exc:
        _discard_objects(stored_keys)
        logger.warning("upload refused, database unavailable: %s", exc)
        raise ServiceUnavailable(
            "the database is unavailable; nothing was stored, retry later"
        ) from exc
    if as_stored == [False]:
        return _as_stored(user, case), True
    return _with_images_loaded(case, images), True


def _with_images_loaded(case: Case, images: list[Image]) -> Case:
    """The new case with its images loaded as written, none with a prediction yet: what
    prefetch_related("images") and select_related("prediction") leave on a case read from
    the database (Django's own prefetch sets the same caches). The upload answers with it
    instead of reading back what it just wrote (two queries per upload)."""
    for image in images:
        Image.prediction.related.set_cached_value(image, None)
    loaded = case.images.all()
    loaded._result_cache, loaded._prefetch_done = images, True
    case._prefetched_objects_cache = {"images": loaded}
    return case


def _as_stored(user, case: Case) -> Case:
    """An existing case as the API answers with it: its images and predictions loaded."""
    return selectors.case_get(user=user, case_id=case.id)


def _pseudonym_scope(site: Site) -> str:
    # The site is part of every pseudonymous DICOM UID: two sites never share one.
    return f"site:{site.id}"


def _one_study(checked: list[CheckedImage]) -> str:
    """The pseudonymous study UID of a DICOM upload ("" for other images). An upload is one
    case, so it holds one study's slices, and DICOM is not mixed with other images."""
    studies = {item.dicom.study_uid for item in checked if item.dicom is not None}
    if not studies:
        return ""
    if any(item.dicom is None for item in checked):
        raise InvalidUpload(
            "DICOM files and other images cannot be mixed in one upload; send them separately"
        )
    if len(studies) > 1:
        raise InvalidUpload(
            f"the DICOM files belong to {len(studies)} different studies; "
            "upload one study per request"
        )
    return studies.pop()


def _without_repeated_slices(checked: list[CheckedImage]) -> list[CheckedImage]:
    """The upload without a DICOM slice sent twice in it (same SOP Instance UID)."""
    seen: set[str] = set()
    kept = []
    for item in checked:
        if item.dicom is not None:
            if item.dicom.instance_uid in seen:
                continue
            seen.add(item.dicom.instance_uid)
        kept.append(item)
    return kept


def _images_new(case: Case, checked: list[CheckedImage], *, first_position: int) -> list[Image]:
    images = []
    for position, item in enumerate(checked, start=first_position):
        image_id = uuid.uuid4()
        images.append(
            Image(
                id=image_id,
                case=case,
                position=position,
                s3_key=f"scans/{case.id}/{image_id}",
                sha256=item.sha256,
                size_bytes=len(item.data),
                content_type=item.content_type,
                width=item.width,
                height=item.height,
                original_name=item.original_name[:255],
                rendering_key=f"scans/{case.id}/{image_id}.png" if item.dicom else "",
                series_uid=item.dicom.series_uid if item.dicom else "",
                instance_uid=item.dicom.instance_uid if item.dicom else "",
            )
        )
    return images


def _objects_store(images: list[Image], checked: list[CheckedImage], stored_keys: list) -> None:
    """Write each slice (and a DICOM slice's 8-bit rendering) to S3, appending every key
    written to `stored_keys`, so the caller can delete them if anything fails later."""
    for image, item in zip(images, checked, strict=True):
        storage.put(image.s3_key, item.data, content_type=item.content_type, sha256=item.sha256)
        stored_keys.append(image.s3_key)
        if item.dicom is not None:
            rendering = item.dicom.rendering
            storage.put(
                image.rendering_key,
                rendering,
                content_type="image/png",
                sha256=hashlib.sha256(rendering).hexdigest(),
            )
            stored_keys.append(image.rendering_key)


def _study_slices_add(case: Case, checked: list[CheckedImage], *, user) -> tuple[Case, bool]:
    """Add the slices of a DICOM study to the case the site already has for it; True when
    any was new. A slice the case holds already is skipped (an upload repeated, or a slice
    sent again with others); a reviewed case's slices no longer change."""
    held = set(case.images.values_list("instance_uid", flat=True))
    new = [item for item in checked if item.dicom.instance_uid not in held]
    if not new:
        return case, False
    if case.review_status in (ReviewStatus.CONFIRMED, ReviewStatus.OVERRIDDEN):
        raise StudyReviewed(
            f"this DICOM study's case {case.id} has been reviewed already, so no slices can "
            f"be added to it; {len(new)} of the uploaded slices are not in it"
        )
    # Positions are given under the case's lock below; keys need none.
    images = _images_new(case, new, first_position=0)
    stored_keys: list[str] = []
    try:
        _objects_store(images, new, stored_keys)
        with transaction.atomic():
            locked = Case.objects.select_for_update().get(id=case.id)
            if locked.review_status in (ReviewStatus.CONFIRMED, ReviewStatus.OVERRIDDEN):
                raise StudyReviewed(
                    f"this DICOM study's case {case.id} was reviewed while the slices were "
                    "uploaded, so they were not added"
                )
            held = set(locked.images.values_list("instance_uid", flat=True))
            images = [image for image in images if image.instance_uid not in held]
            next_position = max(locked.images.values_list("position", flat=True), default=-1) + 1
            for offset, image in enumerate(images):
                image.position = next_position + offset
            Image.objects.bulk_create(images)
            if images:
                audit.case_images_added(case=locked, images=images, actor=user)
                classification.cases_status_refresh(
                    {locked.id: classification.LockedCase(locked.site_id, locked.status)}
                )
                image_ids = [image.id for image in images]
                transaction.on_commit(lambda: enqueue_images(image_ids))
        kept = {image.s3_key for image in images} | {image.rendering_key for image in images}
        _discard_objects([key for key in stored_keys if key not in kept])
    except storage.StorageUnavailable as exc:
        _discard_objects(stored_keys)
        logger.warning("upload refused, object storage unavailable: %s", exc)
        raise ServiceUnavailable(
            "object storage is unavailable; nothing was stored, retry later"
        ) from exc
    except StudyReviewed:
        _discard_objects(stored_keys)
        raise
    except DatabaseError as exc:
        _discard_objects(stored_keys)
        logger.warning("upload refused, database unavailable: %s", exc)
        raise ServiceUnavailable(
            "the database is unavailable; nothing was stored, retry later"
        ) from exc
    return Case.objects.get(id=case.id), bool(images)


def _case_duplicate(site, idempotency_key: str, content_sha256: str) -> Case | None:
    if idempotency_key:
        case = Case.objects.filter(site=site, idempotency_key=idempotency_key).first()
        if case is not None:
            if case.content_sha256 != content_sha256:
                raise IdempotencyKeyReused(
                    "this Idempotency-Key was already used for a different upload"
                )
            return case
    return Case.objects.filter(site=site, content_sha256=content_sha256).first()


def _discard_objects(keys: list[str]) -> None:
    try:
        storage.delete_many(keys)
    except storage.StorageUnavailable:
        # Orphans without a row are harmless to users; log them for cleanup.
        logger.error("could not delete %d orphaned objects: %s", len(keys), keys)


def _send_jobs(image_ids) -> list:
    """Send one classification job per image, in order, until one cannot be sent; the ids
    sent. An image whose job was not sent stays `received` and is re-sent later."""
    sent = []
    for image_id in image_ids:
        try:
            jobs.send_classify(image_id)
        except Exception:
            logger.exception("could not send the job for image %s; it stays received", image_id)
            break
        sent.append(image_id)
    return sent


def _new_case_enqueue(case: Case, images: list[Image]) -> bool:
    """Send the jobs of a case this upload just created (all its images `received`), after
    the commit. Once any job is sent the case is `queued`: two guarded updates say so, and
    the same is set on `case` and `images`, which the upload answers with. False when a
    worker had moved an image or the case on already (they no longer say what is stored)."""
    sent = set(_send_jobs([image.id for image in images]))
    if not sent:
        return True
    now = timezone.now()
    # Images before their case, as a worker's claim locks them: no lock cycle.
    with transaction.atomic():
        queued = Image.objects.filter(id__in=sent, status=Status.RECEIVED).update(
            status=Status.QUEUED, queued_at=now
        )
        case_queued = Case.objects.filter(id=case.id, status=Status.RECEIVED).update(
            status=Status.QUEUED
        )
        if case_queued:
            audit.events_record(
                [
                    audit.case_status_changed(
                        case_id=case.id,
                        site_id=case.site_id,
                        old=Status.RECEIVED,
                        new=Status.QUEUED,
                    )
                ]
            )
    if queued != len(sent) or not case_queued:
        return False
    case.status = Status.QUEUED
    for image in images:
        if image.id in sent:
            image.status, image.queued_at = Status.QUEUED, now
    return True


def enqueue_images(image_ids) -> int:
    """Send one classification job per image and mark the sent ones queued (their cases'
    statuses derived again). Runs after the commit. An image whose job could not be sent
    stays `received`; it is re-sent later, so it is never lost."""
    sent = _send_jobs(image_ids)
    if sent:
        with transaction.atomic():
            Image.objects.filter(id__in=sent, status=Status.RECEIVED).update(
                status=Status.QUEUED, queued_at=timezone.now()
            )
            case_ids = set(Image.objects.filter(id__in=sent).values_list("case_id", flat=True))
            classification.cases_status_refresh(classification.cases_lock(case_ids))
    return len(sent)


def images_resend_stuck() -> int:
    """Re-send the job of every image that should have moved on by now.

    PostgreSQL is the source of truth: a job lost with the broker's state (Redis restarted
    empty, a send that failed) is sent again. Received images whose job was never sent,
    queued ones waiting longer than expected, and claims past their lease are re-sent;
    a duplicate job is harmless because claims are guarded.
    """
    now = timezone.now()
    received = list(
        Image.objects.filter(
            status=Status.RECEIVED,
            received_at__lt=now - timedelta(seconds=settings.SWEEP_RECEIVED_AFTER_S),
        ).values_list("id", flat=True)[: settings.SWEEP_BATCH]
    )
    waiting = list(
        Image.objects.filter(
            Q(
                status=Status.QUEUED,
                queued_at__lt=now - timedelta(seconds=settings.SWEEP_QUEUED_AFTER_S),
            )
            | Q(status=Status.PROCESSING, processing_started_at__lt=now - classification.lease())
        ).values_list("id", flat=True)[: settings.SWEEP_BATCH]
    )
    sent = enqueue_images(received) if received else 0
    resent = []
    for image_id in waiting:
        try:
            jobs.send_classify(image_id)
        except Exception:
            logger.exception("the sweeper could not re-send image %s", image_id)
            break
        resent.append(image_id)
    # Restart the wait, so the next sweep does not send the same job again.
    Image.objects.filter(id__in=resent, status=Status.QUEUED).update(queued_at=now)
    if sent or resent:
        logger.info("sweeper re-sent %d received and %d stalled images", sent, len(resent))
    return sent + len(resent)


def image_fail(image_id, cause: str) -> None:
    """Fail one unfinished image with its cause."""
    classification.images_fail({str(image_id): cause})


class ImageBusy(Exception):
    """Another worker's claim on the image is fresh; look again after `retry_in_s`."""

    def __init__(self, retry_in_s: float):
        super().__init__(f"claimed by another worker; look again in {retry_in_s:.0f} s")
        self.retry_in_s = retry_in_s


def image_classify(*, image_id, classifier) -> Prediction | None:
    """Classify one image now (a batch of one): its prediction, or None when there is
    none (nothing to do, or the image failed or was rejected). Raises ImageBusy when
    another worker holds a fresh claim, and StorageUnavailable when S3 is unreachable."""
    outcome = classification.images_classify(image_ids=[image_id], classifier=classifier)
    key = str(image_id)
    if key in outcome.busy:
        raise ImageBusy(outcome.busy[key])
    if key in outcome.transient:
        raise storage.StorageUnavailable(outcome.transient[key])
    return outcome.predictions.get(key)


def user_create(*, username: str, site: Site, password: str | None = None, is_staff=False):
    from django.contrib.auth import get_user_model

    from diagnostics.models import SiteMembership

    user = get_user_model().objects.create_user(
        username=username, password=password, is_staff=is_staff
    )
    SiteMembership.objects.create(user=user, site=site)
    return user


def demo_user_ensure(*, username: str, site_name: str, password: str | None = None) -> str:
    """A site, a staff user in it and its API token, created once; returns the token."""
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    with transaction.atomic():
        site, _ = Site.objects.get_or_create(name=site_name)
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            user = user_create(username=username, site=site, password=password, is_staff=True)
        elif password:
            user.set_password(password)
            user.save(update_fields=["password"])
        token, _ = Token.objects.get_or_create(user=user)
    return token.key

"""Classification: what a worker does with the jobs it holds, a batch at a time.

A worker is handed several queued images at once (celery-batches) and pays for the
database per batch, not per image: one transaction claims them all, one records every
result, and the statuses of the cases they touch are derived with set-based statements.
Meanwhile a thread pool fetches the next images from S3 and decodes them while the model
runs on the current one, and renders the heatmap overlays while the model moves on.

Every step is guarded, so running a batch twice (a redelivered job, the sweeper's re-send)
changes nothing: only `received`/`queued` images (or claims abandoned by a dead worker)
are claimed, and only images this worker holds in `processing` are written.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import (
    BooleanField,
    Count,
    DateTimeField,
    DurationField,
    ExpressionWrapper,
    F,
    FloatField,
    Q,
    TextField,
    Value,
    When,
)
from django.db.models import Case as SqlCase
from django.db.models.functions import Now
from django.utils import timezone

from diagnostics import storage
from diagnostics.logging import case_context
from diagnostics.models import (
    TERMINAL_STATUSES,
    Case,
    Image,
    Prediction,
    Status,
    WebhookEvent,
)
from diagnostics.services import audit, heatmaps, webhooks

logger = logging.getLogger(__name__)

# Slack between Celery's hard time limit and treating a claim as abandoned.
CLAIM_MARGIN_S = 5


def lease() -> timedelta:
    # Celery kills a job at its hard time limit, so an older claim has no live worker.
    return timedelta(seconds=settings.CLASSIFY_TIME_LIMIT_S + CLAIM_MARGIN_S)


def _abandoned() -> Q:
    return Q(
        status=Status.PROCESSING,
        processing_started_at__lt=ExpressionWrapper(Now() - lease(), output_field=DateTimeField()),
    )


@dataclass(frozen=True)
class ClaimedImage:
    id: object
    case_id: object
    key: str  # what the model reads: a DICOM slice's 8-bit rendering, else the upload
    received_at: datetime
    attempts: int


@dataclass
class Claims:
    claimed: list[ClaimedImage] = field(default_factory=list)
    # Image id -> seconds until another worker's fresh claim runs out: look again then.
    busy: dict[str, float] = field(default_factory=dict)


def images_claim(image_ids) -> Claims:
    """Move the images that are this worker's to take to `processing`, in one transaction.

    A claim older than the lease was left by a worker that died; it is taken over unless
    the image has used up its attempts, which is how an input that kills the worker ends
    up failed with a cause. Times come from the database clock, shared by every worker.
    """
    ids = [str(image_id) for image_id in image_ids]
    with transaction.atomic():
        rows = list(
            Image.objects.select_for_update()
            .filter(id__in=ids)
            .annotate(
                abandoned=ExpressionWrapper(_abandoned(), output_field=BooleanField()),
                lease_left=ExpressionWrapper(
                    F("processing_started_at") + lease() - Now(), output_field=DurationField()
                ),
            )
            .order_by("id")
            .values(
                "id",
                "case_id",
                "status",
                "attempts",
                "s3_key",
                "rendering_key",
                "received_at",
                "abandoned",
                "lease_left",
            )  # fmt: skip
        )
        claims, worn_out = Claims(), []
        for row in rows:
            if row["status"] in (Status.RECEIVED, Status.QUEUED) or (
                row["abandoned"] and row["attempts"] < settings.CLASSIFY_MAX_ATTEMPTS
            ):
                claims.claimed.append(
                    ClaimedImage(
                        id=row["id"],
                        case_id=row["case_id"],
                        key=row["rendering_key"] or row["s3_key"],
                        received_at=row["received_at"],
                        attempts=row["attempts"] + 1,
                    )
                )
            elif row["abandoned"]:
                worn_out.append(row)
            elif row["status"] == Status.PROCESSING:
                claims.busy[str(row["id"])] = max(row["lease_left"].total_seconds(), 1.0)
        if claims.claimed:
            Image.objects.filter(id__in=[image.id for image in claims.claimed]).update(
                status=Status.PROCESSING, processing_started_at=Now(), attempts=F("attempts") + 1
            )
        failures = {
            row["id"]: f"a worker stopped while classifying this image "
            f"{settings.CLASSIFY_MAX_ATTEMPTS} times; the image may crash the model"
            for row in worn_out
        }
        case_ids = {row["case_id"] for row in worn_out} | {c.case_id for c in claims.claimed}
        cases = cases_lock(case_ids)
        if failures:
            _images_finish(
                failures, Status.FAILED, {r["id"]: r["case_id"] for r in worn_out}, cases
            )
        cases_status_refresh(cases)
    return claims


@dataclass
class BatchOutcome:
    """What became of each image of a batch; the task decides about re-sending."""

    predictions: dict[str, Prediction] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # id -> why it is not an MRI slice
    failed: dict[str, str] = field(default_factory=dict)  # id -> cause
    busy: dict[str, float] = field(default_factory=dict)  # id -> look again after (s)
    # Released back to `queued` for another try: S3 unreachable, or the model raised.
    transient: dict[str, str] = field(default_factory=dict)
    model_errors: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # nothing to do (finished, or gone)


@dataclass
class _Work:
    image: ClaimedImage
    data: bytes | None = None
    pixels: object = None
    result: object = None  # ml.inference.Prediction
    inference_ms: float = 0.0
    heatmap: Future | None = None


_pool_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def _io_pool() -> ThreadPoolExecutor:
    """Threads for S3 transfers, decoding and heatmap rendering, made in the process that
    uses them (a prefork child: threads do not survive a fork)."""
    with _pool_lock:
        pool = _pools.get(os.getpid())
        if pool is None:
            pool = _pools[os.getpid()] = ThreadPoolExecutor(
                settings.CLASSIFY_IO_THREADS, thread_name_prefix="classify-io"
            )
        return pool


def _fetch_and_decode(image: ClaimedImage, size: int):
    from ml.data import decode_image

    data = storage.get(image.key)
    return data, decode_image(data, size)


def images_classify(*, image_ids, classifier) -> BatchOutcome:
    """Claim, fetch, classify and record a batch of images.

    Per image: unreadable bytes fail it at once with the cause; an image that is not a
    brain MRI slice is `rejected` with the reason; S3 errors and model errors release it
    for another try (the caller re-sends), a model error only until its attempts are used.
    A database error propagates: nothing of the batch was written, the caller retries.
    """
    from ml.data import UnreadableImage

    outcome = BatchOutcome()
    claims = images_claim(image_ids)
    outcome.busy = claims.busy
    claimed_ids = {str(image.id) for image in claims.claimed}
    outcome.skipped = [
        str(i) for i in image_ids if str(i) not in claimed_ids and str(i) not in claims.busy
    ]
    if not claims.claimed:
        return outcome
    pool = _io_pool()
    size = classifier.input_size
    attempts = {str(image.id): image.attempts for image in claims.claimed}
    fetches = [(image, pool.submit(_fetch_and_decode, image, size)) for image in claims.claimed]
    done: list[_Work] = []
    recorded = 0
    for image, fetch in fetches:
        key = str(image.id)
        with case_context(image.case_id):
            try:
                data, pixels = fetch.result()
            except storage.StorageUnavailable as exc:
                outcome.transient[key] = str(exc)
                continue
            except UnreadableImage as exc:
                outcome.failed[key] = f"the model could not read the image: {exc}"
                continue
            work = _Work(image=image, data=data, pixels=pixels)
            done.append(work)
            if not classifier.batches_calls:
                # CPU runtimes: one image per call is fastest, and overlaps the fetches;
                # its heatmap renders on the pool while the model runs the next one.
                _analyse(classifier, [work], outcome)
                _heatmap_submit(pool, work)
        if recorded == 0 and len(done) == FIRST_RESULTS and not classifier.batches_calls:
            # The batch's first results go out before the rest are computed: a worker
            # that just started (or a batch of a case's slices) shows results sooner.
            _record(done, attempts, classifier, BatchOutcome(), into=outcome)
            recorded = len(done)
    if classifier.batches_calls:
        _analyse(classifier, [w for w in done if w.result is None], outcome)
        for work in done:
            _heatmap_submit(pool, work)
    _record(done[recorded:], attempts, classifier, outcome, into=outcome)
    return outcome


# How many results of a batch are recorded before the rest are computed (CPU runtimes).
FIRST_RESULTS = 8


def _heatmap_submit(pool: ThreadPoolExecutor, work: _Work) -> None:
    result = work.result
    if result is not None and not result.rejected and result.heatmap is not None:
        work.heatmap = pool.submit(
            heatmaps.heatmap_overlay_store,
            image_id=work.image.id,
            case_id=work.image.case_id,
            image_bytes=work.data,
            heatmap=result.heatmap,
            pixels=work.pixels,
        )


def _record(
    works: list[_Work], attempts: dict, classifier, outcome: BatchOutcome, *, into: BatchOutcome
) -> None:
    """Wait for the works' heatmaps, then record them with what `outcome` holds (the
    batch's failures, on its last call); results are merged into `into`."""
    accepted = [w for w in works if w.result is not None]
    heatmap_keys = {}
    for work in accepted:
        key = str(work.image.id)
        if work.result.rejected:
            outcome.rejected[key] = work.result.rejection_reason
        elif work.heatmap is not None:
            try:
                heatmap_keys[key] = work.heatmap.result()
            except storage.StorageUnavailable as exc:
                outcome.transient[key] = str(exc)
    results_record(
        works=[w for w in accepted if str(w.image.id) not in outcome.transient],
        attempts=attempts,
        heatmap_keys=heatmap_keys,
        classifier=classifier,
        outcome=outcome,
    )
    if outcome is not into:
        into.predictions |= outcome.predictions
        into.rejected |= outcome.rejected
        into.transient |= outcome.transient


def _analyse(classifier, works: list[_Work], outcome: BatchOutcome) -> None:
    import numpy as np

    if not works:
        return
    started = time.perf_counter()
    try:
        results = classifier.analyse_batch(np.stack([work.pixels for work in works]))
    except Exception as exc:  # noqa: BLE001  (the model's error, whatever it is)
        if len(works) > 1:
            # One input may be the culprit: run each alone, so the others still finish.
            for work in works:
                _analyse(classifier, [work], outcome)
            return
        with case_context(works[0].image.case_id):
            logger.exception("classifying image %s failed", works[0].image.id)
        outcome.model_errors[str(works[0].image.id)] = (
            f"classification error: {type(exc).__name__}: {exc}"
        )
        return
    elapsed_ms = (time.perf_counter() - started) * 1000 / len(works)
    for work, result in zip(works, results, strict=True):
        work.result, work.inference_ms = result, elapsed_ms


def results_record(
    *, works: list[_Work], attempts: dict, heatmap_keys: dict, classifier, outcome: BatchOutcome
) -> None:
    """Write a batch's results in one transaction: predictions, finished and released
    images, their audit events, and the statuses of their cases. Only images still
    `processing` are written (a second delivery of the same job finds them finished).
    Adds to outcome.predictions; moves model errors on their last attempt to outcome.failed."""
    ids = [w.image.id for w in works]
    ids += [*outcome.failed, *outcome.model_errors, *outcome.transient]
    if not ids:
        return
    with transaction.atomic():
        case_of = dict(
            Image.objects.select_for_update()
            .filter(id__in=ids, status=Status.PROCESSING)
            .order_by("id")
            .values_list("id", "case_id")
        )
        held = {str(image_id) for image_id in case_of}
        cases = cases_lock(set(case_of.values()))
        now = timezone.now()
        predictions = [
            _prediction_new(work, classifier, heatmap_keys.get(str(work.image.id), ""), now)
            for work in works
            if str(work.image.id) in held and not work.result.rejected
        ]
        if predictions:
            Prediction.objects.bulk_create(predictions)
            Image.objects.filter(id__in=[p.image_id for p in predictions]).update(
                status=Status.DONE, error="", finished_at=now
            )
            audit.events_record(
                [
                    audit.prediction_recorded(
                        prediction=p,
                        case_id=case_of[p.image_id],
                        site_id=cases[case_of[p.image_id]].site_id,
                    )
                    for p in predictions
                ]
            )
        outcome.predictions |= {str(p.image_id): p for p in predictions}
        scores = {str(w.image.id): _finite(w.result.ood_score) for w in works}
        rejected = {i: reason for i, reason in outcome.rejected.items() if i in held}
        _images_finish(rejected, Status.REJECTED, case_of, cases, scores)
        # A model error uses up one attempt; the last one fails the image with the cause.
        for image_id, cause in list(outcome.model_errors.items()):
            if attempts.get(image_id, 0) >= settings.CLASSIFY_MAX_ATTEMPTS:
                outcome.failed[image_id] = (
                    f"{cause[:1900]} (after {settings.CLASSIFY_MAX_ATTEMPTS} attempts)"
                )
                del outcome.model_errors[image_id]
        failed = {i: cause for i, cause in outcome.failed.items() if i in held}
        _images_finish(failed, Status.FAILED, case_of, cases)
        again = [i for i in [*outcome.model_errors, *outcome.transient] if i in held]
        if again:
            Image.objects.filter(id__in=again).update(status=Status.QUEUED, queued_at=now)
        cases_status_refresh(cases)
    for prediction in predictions:
        # One line per result, tagged with its case: `grep <case id>` follows a case here.
        with case_context(case_of[prediction.image_id]):
            logger.info(
                "image %s classified: %s %.3f%s",
                prediction.image_id,
                prediction.label,
                max(prediction.probabilities.values()),
                ", needs review" if prediction.needs_review else "",
            )


def _prediction_new(work: _Work, classifier, heatmap_key: str, now) -> Prediction:
    result = work.result
    return Prediction(
        image_id=work.image.id,
        label=result.label,
        probabilities=result.probabilities,
        needs_review=result.needs_review,
        ood_score=_finite(result.ood_score),
        heatmap=heatmaps.heatmap_grid(result.heatmap),
        heatmap_key=heatmap_key,
        model_name=classifier.name,
        model_version=classifier.version,
        model_sha256=classifier.sha256,
        runtime=classifier.runtime,
        inference_ms=work.inference_ms,
        turnaround_ms=(now - work.image.received_at).total_seconds() * 1000,
    )


def _finite(value) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def images_fail(causes: dict) -> None:
    """Fail unfinished images ({image id: cause}): a job that gave up retrying."""
    with transaction.atomic():
        case_of = dict(
            Image.objects.select_for_update()
            .filter(id__in=list(causes))
            .exclude(status__in=TERMINAL_STATUSES)
            .order_by("id")
            .values_list("id", "case_id")
        )
        cases = cases_lock(set(case_of.values()))
        held = {str(image_id) for image_id in case_of}
        _images_finish(
            {str(i): c for i, c in causes.items() if str(i) in held}, Status.FAILED, case_of, cases
        )
        cases_status_refresh(cases)


def _images_finish(causes: dict, status: str, case_of: dict, cases: dict, scores=None) -> None:
    """Finish images as failed or rejected, each with its own cause, in one statement."""
    if not causes:
        return
    causes = {str(image_id): cause for image_id, cause in causes.items()}
    case_of = {str(image_id): case_id for image_id, case_id in case_of.items()}
    updates = {
        "status": status,
        "finished_at": Now(),
        "error": SqlCase(
            *[When(id=i, then=Value(cause[:2000])) for i, cause in causes.items()],
            default=F("error"),
            output_field=TextField(),
        ),
    }
    with_score = [i for i in causes if (scores or {}).get(i) is not None]
    if with_score:
        updates["ood_score"] = SqlCase(
            *[When(id=i, then=Value(scores[i])) for i in with_score],
            default=F("ood_score"),
            output_field=FloatField(),
        )
    Image.objects.filter(id__in=list(causes)).update(**updates)
    audit.events_record(
        [
            audit.image_finished(
                image_id=image_id,
                case_id=case_of[image_id],
                site_id=cases[case_of[image_id]].site_id,
                status=status,
                cause=cause[:2000],
            )
            for image_id, cause in causes.items()
        ]
    )
    for image_id, cause in causes.items():
        with case_context(case_of[image_id]):
            logger.warning("image %s %s: %s", image_id, status, cause)


@dataclass(frozen=True)
class LockedCase:
    site_id: object
    status: str


def cases_lock(case_ids) -> dict:
    """Lock the cases (in id order, so two workers never wait on each other in a cycle)
    for the caller's transaction: {case id: LockedCase}."""
    if not case_ids:
        return {}
    rows = (
        Case.objects.select_for_update()
        .filter(id__in=list(case_ids))
        .order_by("id")
        .values_list("id", "site_id", "status")
    )
    return {case_id: LockedCase(site_id, status) for case_id, site_id, status in rows}


def derived_status(counts: dict) -> str:
    """A case's status from its images' {status: count}: all finished -> done when any
    image is done, else rejected when any was rejected, else failed."""
    total = sum(counts.values())
    terminal = sum(counts.get(status, 0) for status in TERMINAL_STATUSES)
    if total and terminal == total:
        if counts.get(Status.DONE):
            return Status.DONE
        return Status.REJECTED if counts.get(Status.REJECTED) else Status.FAILED
    if terminal or counts.get(Status.PROCESSING):
        return Status.PROCESSING
    if counts.get(Status.QUEUED):
        return Status.QUEUED
    return Status.RECEIVED


def cases_status_refresh(cases: dict) -> None:
    """Derive the status of each case ({case id: LockedCase}, locked by cases_lock in the
    caller's transaction) from its images, in a few statements whatever their number."""
    if not cases:
        return
    counts: dict = {case_id: {} for case_id in cases}
    rows = (
        Image.objects.filter(case_id__in=list(cases))
        .values_list("case_id", "status")
        .annotate(n=Count("id"))
    )
    for case_id, status, n in rows:
        counts[case_id][status] = n
    changed: dict[str, list] = {}
    for case_id, case_counts in counts.items():
        new = derived_status(case_counts)
        if new != cases[case_id].status:
            changed.setdefault(new, []).append(case_id)
    events, finished = [], {}
    for new, case_ids in changed.items():
        terminal = new in TERMINAL_STATUSES
        Case.objects.filter(id__in=case_ids).update(
            status=new, completed_at=Now() if terminal else None
        )
        for case_id in case_ids:
            site_id = cases[case_id].site_id
            events.append(
                audit.case_status_changed(
                    case_id=case_id, site_id=site_id, old=cases[case_id].status, new=new
                )
            )
            if terminal:
                finished[case_id] = site_id
    if events:
        audit.events_record(events)
    if finished:
        # Sent after the commit; a rolled-back change announces nothing.
        webhooks.cases_event_record(case_sites=finished, event=WebhookEvent.CASE_COMPLETED)

"""Classification: what a worker does with the jobs it holds, a batch at a time.

A worker is handed several queued images at once (celery-batches) and pays for the
database per batch, not per image: one transaction claims them all, one records every
result, and the statuses of the cases they touch are derived with set-based statements.
A thread pool takes the images from S3 through decoding to the model, so fetches overlap
the model's calls (images_classify).

Every step is guarded, so running a batch twice (a redelivered job, the sweeper's re-send)
changes nothing: only `received`/`queued` images (or claims abandoned by a dead worker)
are claimed, and only images this worker holds in `processing` are written.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
    pixels: object = None
    result: object = None  # ml.inference.Prediction
    inference_ms: float = 0.0
    # Why the image got no result, when it did not (BatchOutcome.<kind>[id] = cause).
    problem: tuple[str, str] | None = None


_pool_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def _pool() -> ThreadPoolExecutor:
    """Threads that fetch from S3, decode and run the model, made in the process that uses
    them (a prefork child: threads do not survive a fork)."""
    with _pool_lock:
        pool = _pools.get(os.getpid())
        if pool is None:
            pool = _pools[os.getpid()] = ThreadPoolExecutor(
                settings.CLASSIFY_THREADS, thread_name_prefix="classify"
            )
        return pool


def _prepare(image: ClaimedImage, classifier, analyse: bool) -> _Work:
    """Fetch and decode one image and, when `analyse`, classify it: the pool's part."""
    from ml.data import UnreadableImage, decode_image

    work = _Work(image=image)
    with case_context(image.case_id):
        try:
            work.pixels = decode_image(storage.get(image.key), classifier.input_size)
        except storage.StorageUnavailable as exc:
            work.problem = ("transient", str(exc))
        except UnreadableImage as exc:
            work.problem = ("failed", f"the model could not read the image: {exc}")
        else:
            if analyse:
                _analyse(classifier, [work])
    return work


def images_classify(*, image_ids, classifier) -> BatchOutcome:
    """Claim, fetch, classify and record a batch of images.

    Per image: unreadable bytes fail it at once with the cause; an image that is not a
    brain MRI slice is `rejected` with the reason; S3 errors and model errors release it
    for another try (the caller re-sends), a model error only until its attempts are used.
    A database error propagates: nothing of the batch was written, the caller retries.

    On a CPU the pool's threads each take an image from S3 to a result, calling the model
    one image at a time (fastest with LiteRT, which runs as many calls side by side as it
    has interpreters), so fetching overlaps the model. On a GPU the pool fetches and
    decodes, and the whole batch is one model call.
    """
    outcome = BatchOutcome()
    claims = images_claim(image_ids)
    outcome.busy = claims.busy
    claimed_ids = {str(image.id) for image in claims.claimed}
    outcome.skipped = [
        str(i) for i in image_ids if str(i) not in claimed_ids and str(i) not in claims.busy
    ]
    if not claims.claimed:
        return outcome
    pool = _pool()
    per_image = not classifier.batches_calls
    attempts = {str(image.id): image.attempts for image in claims.claimed}
    # Each in a copy of this context: a pool thread's log lines carry the job's task id.
    futures = [
        pool.submit(contextvars.copy_context().run, _prepare, image, classifier, per_image)
        for image in claims.claimed
    ]
    done: list[_Work] = []
    recorded = 0
    for future in futures:
        work = future.result()
        if work.problem is not None:
            kind, cause = work.problem
            getattr(outcome, kind)[str(work.image.id)] = cause
            continue
        done.append(work)
        if per_image and len(done) - recorded >= RECORD_EVERY:
            # Record results as they come, while the pool computes the next ones: the
            # database work overlaps the model, and the first results show sooner (a
            # worker that just started, a case's slices). Only the last few wait.
            _record(done[recorded:], attempts, classifier, BatchOutcome(), into=outcome)
            recorded = len(done)
    if not per_image:
        _analyse(classifier, done)
        for work in done:
            if work.problem is not None:
                kind, cause = work.problem
                getattr(outcome, kind)[str(work.image.id)] = cause
        done = [work for work in done if work.result is not None]
    _record(done[recorded:], attempts, classifier, outcome, into=outcome)
    return outcome


# On a CPU, a batch's results are recorded this many at a time, as they come.
RECORD_EVERY = 8


def _record(
    works: list[_Work], attempts: dict, classifier, outcome: BatchOutcome, *, into: BatchOutcome
) -> None:
    """Record the works' results with what `outcome` holds (the batch's failures, on its
    last call); results are merged into `into`."""
    for work in works:
        if work.result.rejected:
            outcome.rejected[str(work.image.id)] = work.result.rejection_reason
    results_record(works=works, attempts=attempts, classifier=classifier, outcome=outcome)
    if outcome is not into:
        into.predictions |= outcome.predictions
        into.rejected |= outcome.rejected


def _analyse(classifier, works: list[_Work]) -> None:
    """Classify the works' pixels in one call, setting each one's result, or its problem
    when the model raised (a batch that raised is run one image at a time, so one bad input
    does not fail the others)."""
    import numpy as np

    if not works:
        return
    started = time.perf_counter()
    try:
        results = classifier.analyse_batch(np.stack([work.pixels for work in works]))
    except Exception as exc:  # noqa: BLE001  (the model's error, whatever it is)
        if len(works) > 1:
            for work in works:
                _analyse(classifier, [work])
            return
        with case_context(works[0].image.case_id):
            logger.exception("classifying image %s failed", works[0].image.id)
        works[0].problem = ("model_errors", f"classification error: {type(exc).__name__}: {exc}")
        return
    elapsed_ms = (time.perf_counter() - started) * 1000 / len(works)
    for work, result in zip(works, results, strict=True):
        work.result, work.inference_ms = result, elapsed_ms
        work.pixels = None  # not needed any more: a batch holds less memory


def results_record(
    *, works: list[_Work], attempts: dict, classifier, outcome: BatchOutcome
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
            _prediction_new(work, classifier, now)
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


def _prediction_new(work: _Work, classifier, now) -> Prediction:
    result = work.result
    return Prediction(
        image_id=work.image.id,
        label=result.label,
        probabilities=result.probabilities,
        needs_review=result.needs_review,
        ood_score=_finite(result.ood_score),
        # The overlay PNG is rendered when first asked for (services.heatmaps).
        heatmap=heatmaps.heatmap_grid(result.heatmap),
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

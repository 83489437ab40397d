import pytest
from django.db import IntegrityError, ProgrammingError, connection, transaction

from diagnostics import services
from diagnostics.errors import Conflict, Forbidden, NotFound
from diagnostics.models import AuditEvent, Image, Prediction, Review, ReviewStatus, Status
from diagnostics.services import audit
from diagnostics.services.reviews import InvalidReview, NotReviewable
from tests.factories import (
    CaseFactory,
    ImageFactory,
    PredictionFactory,
    RadiologistFactory,
    RejectedImageFactory,
    SiteAdminFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def case():
    """A finished case whose model says glioma at 70%."""
    return PredictionFactory(image__case=CaseFactory(status=Status.DONE)).image.case


@pytest.fixture
def radiologist(case):
    return RadiologistFactory(site=case.site)


@pytest.fixture
def colleague(case):
    return RadiologistFactory(site=case.site)


def review_events(case):
    return list(
        AuditEvent.objects.filter(case_id=case.id, object_type="review")
        .order_by("id")
        .values_list("action", "actor_name")
    )


def test_confirm_records_the_model_label_as_the_result_and_audits_it(case, radiologist):
    services.case_review(user=radiologist, case_id=case.id, version=0, decision="confirm")

    case.refresh_from_db()
    assert (case.review_status, case.review_label, case.review_version) == (
        ReviewStatus.CONFIRMED,
        "glioma",
        1,
    )
    assert case.assigned_to == radiologist and case.reviewed_at is not None
    reading = Review.objects.get(case=case)
    assert (reading.decision, reading.label, reading.model_label) == ("confirm", "glioma", "glioma")
    event = AuditEvent.objects.get(case_id=case.id, object_type="review")
    assert event.action == "review.confirmed"
    assert event.actor == radiologist and event.source == "system"
    assert event.changes["review_status"] == ["unreviewed", "confirmed"]
    assert event.changes["assigned_to"] == [None, radiologist.username]
    assert event.changes["reading"][1]["label"] == "glioma"


def test_override_needs_a_reason_and_records_the_corrected_label(case, radiologist):
    with pytest.raises(InvalidReview, match="^an override needs a reason$"):
        services.case_review(
            user=radiologist, case_id=case.id, version=0, decision="override", label="meningioma"
        )

    services.case_review(
        user=radiologist,
        case_id=case.id,
        version=0,
        decision="override",
        label="meningioma",
        reason="dural tail on slice 3",
    )

    case.refresh_from_db()
    assert (case.review_status, case.review_label) == (ReviewStatus.OVERRIDDEN, "meningioma")
    assert Review.objects.get(case=case).reason == "dural tail on slice 3"
    assert review_events(case) == [("review.overridden", radiologist.username)]


@pytest.mark.parametrize(
    ("kwargs", "detail"),
    [
        ({"decision": "override", "label": "glioma", "reason": "x"}, None),
        ({"decision": "override", "label": "tumour", "reason": "x"}, None),
        ({"decision": "confirm", "request_second_read": True}, None),
        ({"decision": "maybe"}, "decision must be 'confirm' or 'override'"),
    ],
)
def test_malformed_readings_are_refused_and_nothing_changes(case, radiologist, kwargs, detail):
    with pytest.raises(InvalidReview) as refused:
        services.case_review(user=radiologist, case_id=case.id, version=0, **kwargs)

    expected = (
        detail
        or {
            "glioma": "'glioma' is the model's label: confirm it instead",
            "tumour": "label must be one of: glioma, meningioma, no_tumor, pituitary",
            None: "a second read is for readings that disagree with the model",
        }[kwargs.get("label")]
    )
    assert refused.value.detail == expected
    case.refresh_from_db()
    assert (case.review_status, case.review_version) == (ReviewStatus.UNREVIEWED, 0)
    assert not Review.objects.exists() and review_events(case) == []


def test_the_second_of_two_simultaneous_readers_gets_a_conflict_naming_the_first(
    case, radiologist, colleague
):
    # Both loaded the case at version 0; the first one saves.
    services.case_review(user=radiologist, case_id=case.id, version=0, decision="confirm")

    with pytest.raises(Conflict) as conflict:
        services.case_review(
            user=colleague,
            case_id=case.id,
            version=0,
            decision="override",
            label="pituitary",
            reason="sella",
        )

    assert conflict.value.status_code == 409 and conflict.value.code == "conflict"
    assert conflict.value.detail == (
        f"{radiologist.username} changed this case's review after you loaded it "
        "(you sent version 0, it is now version 1); reload the case and decide again"
    )
    case.refresh_from_db()
    assert (case.review_label, case.review_version) == ("glioma", 1)
    assert Review.objects.filter(case=case).count() == 1


def test_a_write_racing_past_the_version_check_is_still_refused(
    case, radiologist, colleague, monkeypatch
):
    """The guarded UPDATE is what protects: here the colleague's claim lands between our
    version check and our update."""
    from diagnostics.services import reviews

    real_check = reviews._check_version

    def check_then_colleague_claims(checked_case, version):
        real_check(checked_case, version)
        monkeypatch.setattr(reviews, "_check_version", real_check)
        services.case_claim(user=colleague, case_id=case.id, version=version)

    monkeypatch.setattr(reviews, "_check_version", check_then_colleague_claims)
    with pytest.raises(Conflict, match="^" + colleague.username):
        services.case_review(user=radiologist, case_id=case.id, version=0, decision="confirm")

    case.refresh_from_db()
    assert (case.assigned_to, case.review_status) == (colleague, ReviewStatus.UNREVIEWED)
    assert not Review.objects.exists()


def test_a_case_assigned_to_a_colleague_cannot_be_claimed_or_read(case, radiologist, colleague):
    services.case_claim(user=colleague, case_id=case.id, version=0)

    expected = f"this case is assigned to {colleague.username}; ask a site admin to reassign it"
    with pytest.raises(NotReviewable, match=f"^{expected}$"):
        services.case_claim(user=radiologist, case_id=case.id, version=1)
    with pytest.raises(NotReviewable, match=f"^{expected}$"):
        services.case_review(user=radiologist, case_id=case.id, version=1, decision="confirm")


def test_claim_and_release(case, radiologist):
    claimed = services.case_claim(user=radiologist, case_id=case.id, version=0)
    released = services.case_release(user=radiologist, case_id=case.id, version=1)

    assert claimed.assigned_to == radiologist
    assert released.assigned_to is None and released.review_version == 2
    assert review_events(case) == [
        ("review.claimed", radiologist.username),
        ("review.released", radiologist.username),
    ]


def test_second_read_goes_to_another_radiologist_whose_reading_is_the_result(
    case, radiologist, colleague
):
    services.case_review(
        user=radiologist,
        case_id=case.id,
        version=0,
        decision="override",
        label="meningioma",
        reason="extra-axial",
        request_second_read=True,
    )
    case.refresh_from_db()
    assert (case.review_status, case.review_label, case.assigned_to) == (
        ReviewStatus.SECOND_READ,
        "",
        None,
    )

    with pytest.raises(NotReviewable, match="second read must come from another radiologist"):
        services.case_review(user=radiologist, case_id=case.id, version=1, decision="confirm")

    services.case_review(user=colleague, case_id=case.id, version=1, decision="confirm")

    case.refresh_from_db()
    assert (case.review_status, case.review_label, case.assigned_to) == (
        ReviewStatus.CONFIRMED,
        "glioma",
        colleague,
    )
    readings = list(case.reviews.values_list("reader", "label", "is_second_read"))
    assert readings == [(radiologist.id, "meningioma", False), (colleague.id, "glioma", True)]


def test_a_reviewed_case_is_closed(case, radiologist):
    services.case_review(user=radiologist, case_id=case.id, version=0, decision="confirm")

    with pytest.raises(NotReviewable, match=r"^this case is already reviewed \(confirmed\)$"):
        services.case_review(user=radiologist, case_id=case.id, version=1, decision="confirm")


def test_a_case_still_processing_cannot_be_read(radiologist):
    busy = CaseFactory(uploaded_by=radiologist, status=Status.PROCESSING)
    PredictionFactory(image__case=busy)

    with pytest.raises(NotReviewable, match="^this case is still processing; review it once"):
        services.case_review(user=radiologist, case_id=busy.id, version=0, decision="confirm")


def test_a_case_whose_slices_all_failed_can_only_be_overridden(radiologist):
    failed = CaseFactory(uploaded_by=radiologist, status=Status.FAILED)

    with pytest.raises(InvalidReview, match="no slice of this case has a prediction to confirm"):
        services.case_review(user=radiologist, case_id=failed.id, version=0, decision="confirm")
    services.case_review(
        user=radiologist,
        case_id=failed.id,
        version=0,
        decision="override",
        label="no_tumor",
        reason="read from the films",
    )
    failed.refresh_from_db()
    assert (failed.review_status, failed.review_label) == (ReviewStatus.OVERRIDDEN, "no_tumor")


def test_another_sites_case_is_not_found(case):
    stranger = RadiologistFactory()

    with pytest.raises(NotFound, match="^case not found$"):
        services.case_review(user=stranger, case_id=case.id, version=0, decision="confirm")


def test_site_admin_assigns_only_to_radiologists_of_the_site(case, radiologist):
    admin = SiteAdminFactory(site=case.site)
    outsider = RadiologistFactory()

    with pytest.raises(InvalidReview, match=f"^'{outsider.username}' is not a radiologist at "):
        services.case_assign(
            user=admin, case_id=case.id, version=0, assignee_username=outsider.username
        )
    services.case_assign(
        user=admin, case_id=case.id, version=0, assignee_username=radiologist.username
    )

    case.refresh_from_db()
    assert case.assigned_to == radiologist
    assert review_events(case) == [("review.assigned", admin.username)]


def test_a_radiologist_cannot_assign_and_a_site_admin_cannot_read(case, radiologist):
    with pytest.raises(Forbidden, match="^your role does not allow you to assign cases$"):
        services.case_assign(
            user=radiologist, case_id=case.id, version=0, assignee_username=radiologist.username
        )
    with pytest.raises(Forbidden, match="^your role does not allow you to review cases$"):
        services.case_review(
            user=SiteAdminFactory(site=case.site), case_id=case.id, version=0, decision="confirm"
        )


def test_the_audit_trail_refuses_update_and_delete_in_the_database(case, radiologist):
    services.case_claim(user=radiologist, case_id=case.id, version=0)
    event = AuditEvent.objects.get(case_id=case.id)

    for statement in (
        f"UPDATE diagnostics_auditevent SET action = 'forged' WHERE id = {event.id}",
        f"DELETE FROM diagnostics_auditevent WHERE id = {event.id}",
    ):
        with pytest.raises(ProgrammingError, match="the audit trail is append-only"):
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(statement)
    with pytest.raises(ProgrammingError, match="append-only: DELETE"):
        with transaction.atomic():
            AuditEvent.objects.all().delete()
    event.refresh_from_db()
    assert event.action == "review.claimed"


def test_a_user_who_acted_cannot_be_deleted(case, radiologist):
    services.case_claim(user=radiologist, case_id=case.id, version=1 - 1)
    services.case_release(user=radiologist, case_id=case.id, version=1)

    with pytest.raises(IntegrityError), transaction.atomic():
        radiologist.delete()


def test_events_carry_the_request_origin_when_there_is_one(case, radiologist):
    origin = audit.Origin(source="api", ip="10.1.2.3", user_agent="curl/8")
    with audit.origin_set(origin):
        services.case_claim(user=radiologist, case_id=case.id, version=0)

    event = AuditEvent.objects.get(case_id=case.id)
    assert (event.source, event.ip, event.user_agent) == ("api", "10.1.2.3", "curl/8")


def test_uploads_and_the_workers_writes_are_audited(tiny_classifier, s3_bucket):
    from tests.images import image_bytes

    uploader = UserFactory()
    uploaded, _ = services.case_create(user=uploader, uploads=[("a.jpg", image_bytes())])
    [image] = uploaded.images.all()
    services.image_classify(image_id=image.id, classifier=tiny_classifier)

    actions = list(
        AuditEvent.objects.filter(case_id=uploaded.id)
        .order_by("id")
        .values_list("action", "actor_name", "changes__status")
    )
    assert actions[0] == ("case.created", uploader.username, [None, "received"])
    assert ("prediction.recorded", "", None) in actions
    assert actions[-1] == ("case.status_changed", "", ["processing", "done"])
    assert AuditEvent.objects.filter(case_id=uploaded.id).values("site").distinct().count() == 1


def test_the_database_keeps_the_worklist_columns_of_the_case():
    case = CaseFactory(status=Status.DONE)
    confident = {"glioma": 0.05, "meningioma": 0.05, "no_tumor": 0.05, "pituitary": 0.85}
    PredictionFactory(image__case=case, label="pituitary", probabilities=confident)
    PredictionFactory(image__case=case)  # glioma at 0.7
    slow = ImageFactory(case=case, status=Status.PROCESSING)

    case.refresh_from_db()
    assert (case.predicted_label, case.predicted_confidence, case.min_confidence) == (
        "pituitary",
        0.85,
        0.7,
    )
    assert case.has_failed_image is False

    Image.objects.filter(id=slow.id).update(status=Status.FAILED)

    case.refresh_from_db()
    assert case.has_failed_image is True


def test_the_database_keeps_the_rejected_and_flagged_columns_of_the_case():
    case = CaseFactory(status=Status.PROCESSING)
    prediction = PredictionFactory(image__case=case)
    later = ImageFactory(case=case, status=Status.PROCESSING)

    case.refresh_from_db()
    assert (case.has_rejected_image, case.has_flagged_image) == (False, False)

    Image.objects.filter(id=later.id).update(status=Status.REJECTED, error="not a brain MRI")
    Prediction.objects.filter(id=prediction.id).update(needs_review=True)

    case.refresh_from_db()
    assert (case.has_rejected_image, case.has_flagged_image, case.has_failed_image) == (
        True,
        True,
        False,
    )
    # A rejected slice has no prediction: the model's label stays the predicted slice's.
    assert (case.predicted_label, case.predicted_confidence) == ("glioma", 0.7)

    Image.objects.filter(id=later.id).update(status=Status.QUEUED)
    Prediction.objects.filter(id=prediction.id).update(needs_review=False)

    case.refresh_from_db()
    assert (case.has_rejected_image, case.has_flagged_image) == (False, False)


def test_a_case_whose_slices_were_all_rejected_can_be_read_with_an_override(radiologist):
    rejected = CaseFactory(uploaded_by=radiologist, status=Status.REJECTED)
    RejectedImageFactory(case=rejected)

    with pytest.raises(InvalidReview, match="no slice of this case has a prediction to confirm"):
        services.case_review(user=radiologist, case_id=rejected.id, version=0, decision="confirm")
    services.case_review(
        user=radiologist,
        case_id=rejected.id,
        version=0,
        decision="override",
        label="no_tumor",
        reason="a photo of the report, not a slice",
    )
    rejected.refresh_from_db()
    assert (rejected.review_status, rejected.review_label) == (ReviewStatus.OVERRIDDEN, "no_tumor")


def test_create_demo_user_gives_the_roles_asked_for():
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    call_command("create_demo_user", "--username", "ann", "--site", "North", "--role", "uploader")
    call_command(
        "create_demo_user", "--username", "rad", "--site", "North", "--role", "radiologist"
    )
    call_command("create_demo_user", "--username", "demo")

    users = get_user_model().objects.in_bulk(["ann", "rad", "demo"], field_name="username")
    groups = {
        name: sorted(user.groups.values_list("name", flat=True)) for name, user in users.items()
    }
    assert groups == {
        "ann": ["uploader"],
        "rad": ["radiologist"],
        "demo": ["radiologist", "uploader"],
    }
    assert users["rad"].has_perm("diagnostics.review_case")
    assert not users["ann"].has_perm("diagnostics.review_case")

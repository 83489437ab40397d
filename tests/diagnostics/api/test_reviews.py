import pytest
from rest_framework.test import APIClient

from diagnostics.models import AuditEvent, Status
from tests.factories import (
    CaseFactory,
    ImageFactory,
    PredictionFactory,
    RadiologistFactory,
    token_for,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def case():
    # The model flagged its prediction (0.7 is below its review threshold).
    prediction = PredictionFactory(image__case=CaseFactory(status=Status.DONE), needs_review=True)
    return prediction.image.case


@pytest.fixture
def alice(case):
    return RadiologistFactory(site=case.site, username="alice")


@pytest.fixture
def bob(case):
    return RadiologistFactory(site=case.site, username="bob")


def api(user):
    client = APIClient(HTTP_USER_AGENT="review-test/1")
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(user)}")
    return client


def review_url(case):
    return f"/api/v1/cases/{case.id}/review/"


def test_review_state_shows_the_model_label_and_the_version_to_send_back(case, alice):
    response = api(alice).get(review_url(case))

    assert response.status_code == 200
    assert response.json() == {
        "case": str(case.id),
        "status": "unreviewed",
        "label": "",
        "model_label": "glioma",
        "model_confidence": 0.7,
        "needs_review": True,  # the prediction's own flag
        "assigned_to": None,
        "version": 0,
        "reviewed_at": None,
        "readings": [],
    }


@pytest.mark.parametrize(
    ("needs_review", "other_slice", "expected"),
    [
        (False, None, False),
        (True, None, True),
        (False, Status.FAILED, True),
        (False, Status.REJECTED, True),
        (False, Status.DONE, False),
    ],
)
def test_a_case_needs_review_when_the_model_flags_a_slice_or_a_slice_failed_or_was_rejected(
    alice, needs_review, other_slice, expected
):
    # Confident or not, only the model's flag and unreadable slices count.
    case = CaseFactory(uploaded_by=alice, status=Status.DONE)
    PredictionFactory(image__case=case, needs_review=needs_review)
    if other_slice is not None:
        ImageFactory(case=case, status=other_slice)

    response = api(alice).get(review_url(case))

    assert response.json()["needs_review"] is expected


def test_two_radiologists_at_once_the_second_gets_409_and_nothing_is_overwritten(case, alice, bob):
    version = api(alice).get(review_url(case)).json()["version"]
    assert api(bob).get(review_url(case)).json()["version"] == version

    first = api(alice).post(
        review_url(case), {"decision": "confirm", "version": version}, format="json"
    )
    second = api(bob).post(
        review_url(case),
        {"decision": "override", "label": "meningioma", "reason": "dural", "version": version},
        format="json",
    )

    assert first.status_code == 200
    assert first.json()["status"] == "confirmed" and first.json()["version"] == 1
    assert second.status_code == 409
    assert second.json() == {
        "detail": "alice changed this case's review after you loaded it (you sent version 0, "
        "it is now version 1); reload the case and decide again",
        "code": "conflict",
    }
    state = api(bob).get(review_url(case)).json()
    assert (state["status"], state["label"], state["assigned_to"]) == (
        "confirmed",
        "glioma",
        "alice",
    )
    assert [reading["reader"] for reading in state["readings"]] == ["alice"]


def test_override_without_a_reason_is_400_with_the_reason(case, alice):
    response = api(alice).post(
        review_url(case),
        {"decision": "override", "label": "pituitary", "version": 0},
        format="json",
    )

    assert response.status_code == 400
    assert response.json() == {"detail": "an override needs a reason", "code": "invalid_review"}


def test_malformed_body_names_the_fields(case, alice):
    response = api(alice).post(review_url(case), {"decision": "perhaps"}, format="json")

    assert response.status_code == 400
    assert response.json() == {
        "decision": ['"perhaps" is not a valid choice.'],
        "version": ["This field is required."],
    }


def test_claim_then_a_colleagues_claim_is_refused(case, alice, bob):
    claimed = api(alice).post(f"/api/v1/cases/{case.id}/claim/", {"version": 0}, format="json")
    refused = api(bob).post(f"/api/v1/cases/{case.id}/claim/", {"version": 1}, format="json")

    assert claimed.status_code == 200 and claimed.json()["assigned_to"] == "alice"
    assert refused.status_code == 409
    assert refused.json() == {
        "detail": "this case is assigned to alice; ask a site admin to reassign it",
        "code": "not_reviewable",
    }


def test_second_read_over_the_api(case, alice, bob):
    api(alice).post(
        review_url(case),
        {
            "decision": "override",
            "label": "meningioma",
            "reason": "extra-axial, dural tail",
            "request_second_read": True,
            "version": 0,
        },
        format="json",
    )
    second = api(bob).post(
        review_url(case),
        {"decision": "override", "label": "meningioma", "reason": "agree", "version": 1},
        format="json",
    )

    body = second.json()
    assert second.status_code == 200
    assert (body["status"], body["label"], body["assigned_to"]) == (
        "overridden",
        "meningioma",
        "bob",
    )
    assert [(r["reader"], r["is_second_read"]) for r in body["readings"]] == [
        ("alice", False),
        ("bob", True),
    ]


def test_the_case_detail_carries_the_review_state(case, alice):
    api(alice).post(review_url(case), {"decision": "confirm", "version": 0}, format="json")

    review = api(alice).get(f"/api/v1/cases/{case.id}/").json()["review"]

    assert review["status"] == "confirmed" and review["label"] == "glioma"
    assert review["assigned_to"] == "alice" and review["version"] == 1


def test_api_changes_are_audited_with_who_and_from_where(case, alice):
    api(alice).post(review_url(case), {"decision": "confirm", "version": 0}, format="json")

    event = AuditEvent.objects.get(case_id=case.id, action="review.confirmed")
    assert (event.actor_name, event.source, event.ip, event.user_agent) == (
        "alice",
        "api",
        "127.0.0.1",
        "review-test/1",
    )


def test_unknown_case_is_404(alice):
    import uuid

    response = api(alice).post(
        f"/api/v1/cases/{uuid.uuid4()}/review/", {"decision": "confirm", "version": 0}
    )
    assert response.status_code == 404
    assert response.json() == {"detail": "case not found", "code": "not_found"}

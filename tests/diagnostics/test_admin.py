import io
import re
from unittest import mock

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from PIL import Image as PilImage

from diagnostics import services, storage
from diagnostics.models import AuditEvent, ReviewStatus, Status
from tests.factories import (
    CaseFactory,
    ImageFactory,
    PredictionFactory,
    RadiologistFactory,
    RejectedImageFactory,
    UserFactory,
    slice_stored,
)
from tests.images import image_bytes

pytestmark = pytest.mark.django_db

CONFIDENT = {"glioma": 0.05, "meningioma": 0.05, "no_tumor": 0.05, "pituitary": 0.85}


@pytest.fixture
def radiologist(client):
    user = RadiologistFactory(username="alice")
    client.force_login(user)
    return user


def finished_case(site, probabilities=None, needs_review=False, **kwargs):
    case = CaseFactory(uploaded_by=UserFactory(site=site), status=Status.DONE, **kwargs)
    prediction_kwargs = {"needs_review": needs_review}
    if probabilities:
        label = max(probabilities, key=probabilities.get)
        prediction_kwargs |= {"probabilities": probabilities, "label": label}
    PredictionFactory(image__case=case, **prediction_kwargs)
    return case


def listed_ids(response) -> list[str]:
    """Case ids (first 8 characters) in the order the list shows them."""
    return re.findall(r"<small>([0-9a-f]{8})</small>", response.text)


def site_of(user):
    return user.site_membership.site


def test_the_list_shows_what_a_radiologist_works_from(client, radiologist):
    case = finished_case(site_of(radiologist), needs_review=True, reference="study-42")
    other = finished_case(CaseFactory().site)

    response = client.get("/admin/diagnostics/case/")

    assert response.status_code == 200
    assert listed_ids(response) == [str(case.id)[:8]]
    assert str(other.id)[:8] not in response.text
    row = response.text[response.text.index("study-42") - 2000 :]
    assert f'src="/admin/diagnostics/case/{case.id}/thumbnail/"' in row
    for column in ("glioma", "70%", "unreviewed", "icon-yes.svg"):
        assert column in row


def test_waiting_and_flagged_cases_come_first(client, radiologist):
    site = site_of(radiologist)
    reviewed = finished_case(site, probabilities=CONFIDENT)
    confident = finished_case(site, probabilities=CONFIDENT)
    flagged = finished_case(site, needs_review=True)  # the model is unsure
    processing = CaseFactory(uploaded_by=UserFactory(site=site), status=Status.PROCESSING)
    services.case_review(user=radiologist, case_id=reviewed.id, version=0, decision="confirm")

    response = client.get("/admin/diagnostics/case/")

    assert listed_ids(response) == [
        str(case.id)[:8] for case in (flagged, confident, processing, reviewed)
    ]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("predicted_label=pituitary", "confident"),
        ("needs_review=yes", "flagged"),
        ("needs_review=no", "confident"),
        ("review_status=unreviewed", "flagged confident"),
        ("assigned=me", "confident"),
        ("status=done", "flagged confident"),
        ("q=study-fl", "flagged"),
    ],
)
def test_filters_and_search(client, radiologist, query, expected):
    site = site_of(radiologist)
    cases = {
        "flagged": finished_case(site, needs_review=True, reference="study-flagged"),
        "confident": finished_case(site, probabilities=CONFIDENT, reference="study-confident"),
    }
    services.case_claim(user=radiologist, case_id=cases["confident"].id, version=0)

    response = client.get(f"/admin/diagnostics/case/?{query}")

    assert response.status_code == 200
    assert listed_ids(response) == [str(cases[name].id)[:8] for name in expected.split()]


def test_search_by_case_id(client, radiologist):
    case = finished_case(site_of(radiologist))
    finished_case(site_of(radiologist))

    response = client.get(f"/admin/diagnostics/case/?q={case.id}")

    assert listed_ids(response) == [str(case.id)[:8]]


def test_the_list_runs_a_fixed_number_of_queries_however_many_cases(client, radiologist):
    site = site_of(radiologist)

    def page_queries():
        with CaptureQueriesContext(connection) as queries:
            response = client.get("/admin/diagnostics/case/")
        assert response.status_code == 200
        return len(queries), len(listed_ids(response))

    finished_case(site)
    few = page_queries()
    for _ in range(20):
        case = finished_case(site)
        ImageFactory(case=case, status=Status.FAILED)
    many = page_queries()

    # session, user, the user's permissions (1), COUNT(*), the page of cases with every column
    assert few == (5, 1)
    assert many == (5, 21)


def test_the_case_page_shows_every_slice_its_probabilities_model_and_the_form(client, radiologist):
    case = finished_case(site_of(radiologist))
    failed = ImageFactory(case=case, status=Status.FAILED, error="the model could not read it")
    image = case.images.get(prediction__isnull=False)

    response = client.get(f"/admin/diagnostics/case/{case.id}/change/")

    assert response.status_code == 200
    for url in (f"/images/{image.id}/", f"/images/{failed.id}/"):
        assert f'src="/admin/diagnostics/case/{case.id}{url}"' in response.text
    for text in ("70.0%", "10.0%", "tiny-test 0", "failed: the model could not read it"):
        assert text in response.text
    assert 'id="review-form"' in response.text
    assert 'name="version" value="0"' in response.text


def test_a_review_through_the_admin_is_recorded_and_audited(client, radiologist):
    case = finished_case(site_of(radiologist))

    response = client.post(
        f"/admin/diagnostics/case/{case.id}/change/",
        {
            "action": "review",
            "decision": "override",
            "label": "meningioma",
            "reason": "dural tail",
            "version": 0,
        },
        HTTP_USER_AGENT="browser/1",
    )

    assert response.status_code == 302
    case.refresh_from_db()
    assert (case.review_status, case.review_label) == (ReviewStatus.OVERRIDDEN, "meningioma")
    event = AuditEvent.objects.get(case_id=case.id, action="review.overridden")
    assert (event.actor_name, event.source, event.ip, event.user_agent) == (
        "alice",
        "admin",
        "127.0.0.1",
        "browser/1",
    )
    page = client.get(f"/admin/diagnostics/case/{case.id}/change/").text
    assert "Your reading is recorded." in page
    assert "review.overridden" in page and "dural tail" in page


def test_a_stale_admin_form_gets_a_conflict_not_an_overwrite(client, radiologist):
    case = finished_case(site_of(radiologist))
    bob = RadiologistFactory(site=site_of(radiologist), username="bob")
    services.case_review(user=bob, case_id=case.id, version=0, decision="confirm")

    response = client.post(
        f"/admin/diagnostics/case/{case.id}/change/",
        {
            "action": "review",
            "decision": "override",
            "label": "pituitary",
            "reason": "x",
            "version": 0,
        },
    )

    assert response.status_code == 409
    assert (
        "Bob changed this case&#x27;s review after you loaded it (you sent version 0, "
        "it is now version 1); reload the case and decide again" in response.text
    )
    case.refresh_from_db()
    assert (case.review_label, case.assigned_to) == ("glioma", bob)


def test_claim_from_the_case_page(client, radiologist):
    case = finished_case(site_of(radiologist))

    client.post(f"/admin/diagnostics/case/{case.id}/change/", {"action": "claim", "version": 0})

    case.refresh_from_db()
    assert case.assigned_to == radiologist
    listed = client.get("/admin/diagnostics/case/?assigned=me")
    assert listed_ids(listed) == [str(case.id)[:8]]


def test_images_are_served_through_the_app_and_thumbnailed(client, radiologist, s3_bucket):
    case = finished_case(site_of(radiologist))
    image = case.images.get()
    data = image_bytes(300, 200)
    storage.put(image.s3_key, data, content_type="image/jpeg", sha256=image.sha256)
    url = f"/admin/diagnostics/case/{case.id}/images/{image.id}/"

    full = client.get(url)
    thumb = client.get(f"/admin/diagnostics/case/{case.id}/thumbnail/")

    assert full.status_code == 200 and full.content == data
    assert full["Content-Type"] == "image/jpeg"
    assert full["Cache-Control"] == "private, max-age=300"
    assert thumb["Content-Type"] == "image/jpeg"
    assert PilImage.open(io.BytesIO(thumb.content)).size == (96, 64)


def test_another_sites_case_page_and_image_are_not_reachable(client, radiologist):
    case = finished_case(CaseFactory().site)
    image = case.images.get()

    page = client.get(f"/admin/diagnostics/case/{case.id}/change/", follow=True)
    served = client.get(f"/admin/diagnostics/case/{case.id}/images/{image.id}/")

    assert "doesn’t exist" in page.text
    assert served.status_code == 404


def test_the_audit_trail_is_read_only_for_everyone_even_a_superuser(client):
    root = UserFactory(roles=[], is_superuser=True, is_staff=True)
    client.force_login(root)
    case = finished_case(site_of(root))
    services.case_claim(user=root, case_id=case.id, version=0)
    event = AuditEvent.objects.get(case_id=case.id)

    listing = client.get("/admin/diagnostics/auditevent/")
    detail = client.get(f"/admin/diagnostics/auditevent/{event.id}/change/")
    posted = client.post(f"/admin/diagnostics/auditevent/{event.id}/change/", {"action": "forged"})
    deleted = client.post(f"/admin/diagnostics/auditevent/{event.id}/delete/", {"post": "yes"})
    added = client.get("/admin/diagnostics/auditevent/add/")

    assert listing.status_code == 200 and "review.claimed" in listing.text
    assert detail.status_code == 200 and 'name="_save"' not in detail.text
    assert (posted.status_code, deleted.status_code, added.status_code) == (403, 403, 403)
    event.refresh_from_db()
    assert event.action == "review.claimed"


def test_audit_events_of_another_site_are_not_listed(client, radiologist):
    other = finished_case(CaseFactory().site)
    services.case_claim(user=RadiologistFactory(site=other.site), case_id=other.id, version=0)

    listing = client.get("/admin/diagnostics/auditevent/")

    assert listing.status_code == 200
    assert str(other.id)[:8] not in listing.text


# --- Trust signals: rejected slices, the model's review flag, heatmaps ----------------------

REJECTION = "not a brain MRI slice: the image is in colour (MRI slices are grayscale)"


def rejected_case(site, **kwargs):
    case = CaseFactory(uploaded_by=UserFactory(site=site), status=Status.REJECTED, **kwargs)
    RejectedImageFactory(case=case, error=REJECTION, ood_score=15321.4)
    return case


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status=rejected", "rejected"),
        ("slices=rejected", "rejected"),
        ("slices=failed", "failed"),
        ("slices=flagged", "flagged"),
        ("needs_review=yes", "flagged failed rejected"),
        ("needs_review=no", "confident"),
        ("", "flagged failed rejected confident"),
    ],
)
def test_rejected_failed_and_flagged_slices_make_a_case_need_review(
    client, radiologist, query, expected
):
    site = site_of(radiologist)
    cases = {
        "confident": finished_case(site, probabilities=CONFIDENT),
        "rejected": rejected_case(site),
        "failed": finished_case(site, probabilities=CONFIDENT),
        "flagged": finished_case(site, probabilities=CONFIDENT, needs_review=True),
    }
    ImageFactory(case=cases["failed"], status=Status.FAILED)

    response = client.get(f"/admin/diagnostics/case/?{query}")

    assert response.status_code == 200
    # Flagged first among the finished, unreviewed cases, newest first.
    assert listed_ids(response) == [str(cases[name].id)[:8] for name in expected.split()]


def test_a_slice_that_becomes_rejected_flags_its_case(client, radiologist):
    case = finished_case(site_of(radiologist), probabilities=CONFIDENT)
    later = ImageFactory(case=case, status=Status.PROCESSING)
    assert listed_ids(client.get("/admin/diagnostics/case/?needs_review=yes")) == []

    # As the classification service does it: a guarded update, no save().
    type(later).objects.filter(id=later.id).update(status=Status.REJECTED, error=REJECTION)

    assert listed_ids(client.get("/admin/diagnostics/case/?needs_review=yes")) == [str(case.id)[:8]]


def test_the_case_page_shows_heatmaps_review_flags_ood_scores_and_rejections(client, radiologist):
    case = finished_case(site_of(radiologist))
    image = case.images.get()
    flagged = PredictionFactory(
        image__case=case, with_heatmap=True, needs_review=True, label="meningioma"
    ).image
    rejected = RejectedImageFactory(case=case, error=REJECTION, ood_score=15321.4)
    case.refresh_from_db()
    assert flagged.prediction.heatmap_key == ""  # linked before its first view renders it

    response = client.get(f"/admin/diagnostics/case/{case.id}/change/")

    assert response.status_code == 200
    text = response.text
    heatmap = f"/admin/diagnostics/case/{case.id}/images/{flagged.id}/heatmap/"
    assert f'<img src="{heatmap}" alt="heatmap of slice {flagged.position}"' in text
    assert "where the model saw the evidence for meningioma" in text
    # Only the slice with a heatmap links one.
    assert text.count("/heatmap/") == 2  # the link and the img
    assert f"/images/{image.id}/heatmap/" not in text
    slice_of = {}
    for item in (image, flagged, rejected):
        start = text.index(f'id="slice-{item.position}"')
        slice_of[item] = text[start : text.find('<div class="slice"', start)]
    assert "needs review: the model is unsure" in slice_of[flagged]
    assert "out-of-distribution score: 812.5" in slice_of[flagged]
    assert "needs review" not in slice_of[image]
    assert f"rejected, no label: {REJECTION}" in slice_of[rejected]
    assert "out-of-distribution score: 15321.4" in slice_of[rejected]
    needs_review = text[text.index('id="needs-review"') :][:600]
    assert "a slice was rejected" in needs_review
    assert "the model is unsure of a slice" in needs_review
    assert "a slice failed" not in needs_review


def test_heatmaps_are_rendered_on_first_view_then_served_from_s3(client, radiologist, s3_keys):
    case = finished_case(site_of(radiologist))
    prediction = PredictionFactory(image__case=case, with_heatmap=True)
    image = prediction.image
    slice_stored(image)
    url = f"/admin/diagnostics/case/{case.id}/images/{image.id}/heatmap/"

    served = client.get(url)

    assert served.status_code == 200
    key = services.heatmap_key_for(image)
    prediction.refresh_from_db()
    assert prediction.heatmap_key == key
    assert s3_keys() == sorted([image.s3_key, key])
    assert served.content == storage.get(key)
    with PilImage.open(io.BytesIO(served.content)) as png:
        assert (png.format, png.size) == ("PNG", (224, 224))
    assert served["Content-Type"] == "image/png"
    assert served["Cache-Control"] == "private, max-age=300"
    assert served["X-Content-Type-Options"] == "nosniff"
    # The API's and the admin's views share the stored overlay; neither renders it again.
    with mock.patch(
        "diagnostics.services.heatmaps.heatmap_overlay_render",
        side_effect=AssertionError("rendered again"),
    ):
        assert client.get(url).content == served.content
    storage.delete_many([key])
    assert client.get(url).content == served.content == storage.get(key)


def test_a_heatmap_with_storage_down_is_503(client, radiologist, s3_bucket, request):
    case = finished_case(site_of(radiologist))
    image = PredictionFactory(image__case=case, with_heatmap=True).image
    slice_stored(image)
    request.getfixturevalue("s3_down")

    served = client.get(f"/admin/diagnostics/case/{case.id}/images/{image.id}/heatmap/")

    assert (served.status_code, served.content) == (503, b"object storage is unavailable")


def test_a_heatmap_of_another_site_or_of_no_prediction_is_not_found(client, radiologist, s3_keys):
    other = PredictionFactory(with_heatmap=True).image
    slice_stored(other)
    without = finished_case(site_of(radiologist)).images.get()
    rejected = rejected_case(site_of(radiologist)).images.get()

    for image in (other, without, rejected):
        url = f"/admin/diagnostics/case/{image.case_id}/images/{image.id}/heatmap/"
        assert client.get(url).status_code == 404
    # The image id must belong to the case in the URL.
    mine = PredictionFactory(image__case=finished_case(site_of(radiologist)), with_heatmap=True)
    slice_stored(mine.image)
    url = f"/admin/diagnostics/case/{without.case_id}/images/{mine.image_id}/heatmap/"
    assert client.get(url).status_code == 404
    assert s3_keys() == sorted([other.s3_key, mine.image.s3_key])  # nothing was rendered

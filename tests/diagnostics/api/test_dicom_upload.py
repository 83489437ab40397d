"""DICOM through the API: accepted MR slices are de-identified before they are stored, slices
of one study join one case, and nothing identifying reaches S3, the database or the logs."""

import io
import json
import logging

import pydicom
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from PIL import Image as PILImage
from rest_framework.test import APIClient

from diagnostics import services, storage
from diagnostics.models import AuditEvent, Case, Image, ReviewStatus, Status
from tests.dicoms import UID_ROOT, bundled, mr_slice, phi_slice, to_bytes
from tests.factories import RadiologistFactory, SiteFactory, UserFactory, token_for
from tests.images import image_bytes

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("s3_bucket")]

STUDY = f"{UID_ROOT}4711"


def api(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(user)}")
    return client


def upload(client, *files: tuple[str, bytes], **headers):
    images = [
        SimpleUploadedFile(name, data, content_type="application/dicom") for name, data in files
    ]
    return client.post("/api/v1/cases/", {"images": images}, **headers)


def study_slice(seed: int, study: str = STUDY) -> tuple[str, bytes]:
    return f"DOE^JOHN_{seed}.dcm", to_bytes(mr_slice(study_uid=study, seed=seed))


@pytest.fixture
def uploader():
    return UserFactory()


def test_an_mr_slice_is_stored_de_identified_with_a_rendering_for_the_model(uploader, s3_keys):
    response = upload(api(uploader), ("DOE^JOHN_0001.dcm", bundled("MR_small_jp2klossless.dcm")))

    assert response.status_code == 202, response.content
    body = response.json()
    [image] = body["images"]
    assert image["format"] == "dicom"
    assert image["content_type"] == "application/dicom"
    assert image["original_name"] == "MR series 1 image 1.dcm"
    assert (image["width"], image["height"]) == (64, 64)
    assert body["study_uid"].startswith("2.25.")
    assert image["instance_uid"].startswith("2.25.") and image["series_uid"].startswith("2.25.")
    row = Image.objects.get(id=image["id"])
    assert s3_keys() == sorted([row.s3_key, row.rendering_key])
    assert row.rendering_key == f"{row.s3_key}.png"
    stored = pydicom.dcmread(io.BytesIO(storage.get(row.s3_key)))
    assert stored.PatientName == "" and stored.PatientIdentityRemoved == "YES"
    assert stored.StudyInstanceUID == body["study_uid"]
    assert str(stored.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.90"  # as uploaded
    with PILImage.open(io.BytesIO(storage.get(row.rendering_key))) as rendering:
        assert (rendering.format, rendering.mode, rendering.size) == ("PNG", "L", (64, 64))


def test_a_ct_slice_is_refused_with_its_modality_and_nothing_is_stored(uploader, s3_keys):
    response = upload(api(uploader), ("head.dcm", bundled("CT_small.dcm")))

    assert response.status_code == 400
    assert response.json() == {
        "detail": "'head.dcm' is a CT DICOM; only MR slices are accepted",
        "code": "invalid_image",
    }
    assert Case.objects.count() == 0 and s3_keys() == []


def test_the_worker_classifies_the_rendering(uploader, tiny_classifier):
    response = upload(api(uploader), ("a.dcm", bundled("MR_small_RLE.dcm")))
    image_id = response.json()["images"][0]["id"]

    prediction = services.image_classify(image_id=image_id, classifier=tiny_classifier)

    assert prediction is not None and prediction.model_name == "tiny-test"
    assert Image.objects.get(id=image_id).status == Status.DONE


def test_the_admin_shows_the_rendering_of_a_dicom_slice(uploader, client):
    response = upload(api(uploader), ("a.dcm", bundled("MR_small.dcm")))
    case_id, image_id = response.json()["id"], response.json()["images"][0]["id"]
    row = Image.objects.get(id=image_id)
    client.force_login(RadiologistFactory(site=uploader.site_membership.site))

    full = client.get(f"/admin/diagnostics/case/{case_id}/images/{image_id}/")
    thumbnail = client.get(f"/admin/diagnostics/case/{case_id}/thumbnail/")

    assert full.status_code == 200 and full["Content-Type"] == "image/png"
    assert full.content == storage.get(row.rendering_key)
    assert thumbnail.status_code == 200 and thumbnail["Content-Type"] == "image/jpeg"


# --- One study, one case ---------------------------------------------------------------------


def test_later_slices_of_a_study_join_its_case(
    uploader, s3_keys, broker, django_capture_on_commit_callbacks
):
    client = api(uploader)
    first = upload(client, study_slice(1), study_slice(2))
    with django_capture_on_commit_callbacks(execute=True):
        later = upload(client, study_slice(3))

    assert (first.status_code, later.status_code) == (202, 202)
    assert later.json()["id"] == first.json()["id"]
    assert [image["position"] for image in later.json()["images"]] == [0, 1, 2]
    assert Case.objects.count() == 1 and Image.objects.count() == 3
    assert len(s3_keys()) == 6  # each slice and its rendering
    # The new slice's job was sent after the commit, and the trail says it was added.
    assert Image.objects.get(position=2).status == Status.QUEUED
    assert broker.llen("classify") == 1
    added = AuditEvent.objects.get(action="case.images_added")
    assert added.changes == {"images": [None, ["MR series 3 image 4.dcm"]]}


def test_slices_a_study_case_holds_already_are_skipped(uploader, s3_keys):
    client = api(uploader)
    upload(client, study_slice(1))
    upload(client, study_slice(2))
    keys_before = s3_keys()

    again = upload(client, study_slice(2), study_slice(1))
    mixed = upload(client, study_slice(1), study_slice(3))

    assert again.status_code == 200
    assert len(again.json()["images"]) == 2
    assert mixed.status_code == 202
    assert len(mixed.json()["images"]) == 3
    assert Image.objects.filter(case__site=uploader.site_membership.site).count() == 3
    assert len(s3_keys()) == len(keys_before) + 2  # only the new slice and its rendering


def test_a_slice_sent_twice_in_one_upload_is_stored_once(uploader):
    response = upload(api(uploader), study_slice(1), study_slice(1))

    assert response.status_code == 202
    assert len(response.json()["images"]) == 1


def test_the_same_study_at_two_sites_is_two_unrelated_cases():
    north, south = UserFactory(), UserFactory(site=SiteFactory())

    at_north = upload(api(north), study_slice(1)).json()
    at_south = upload(api(south), study_slice(1)).json()

    assert at_north["id"] != at_south["id"]
    assert at_north["study_uid"] != at_south["study_uid"]
    assert at_north["images"][0]["instance_uid"] != at_south["images"][0]["instance_uid"]


def test_an_upload_holds_one_study_and_no_other_images(uploader, s3_keys):
    client = api(uploader)
    two_studies = upload(client, study_slice(1), study_slice(2, study=f"{UID_ROOT}999"))
    mixed = client.post(
        "/api/v1/cases/",
        {
            "images": [
                SimpleUploadedFile(*study_slice(1)),
                SimpleUploadedFile("photo.jpg", image_bytes(seed=1)),
            ]
        },
    )

    assert two_studies.status_code == 400
    assert two_studies.json() == {
        "detail": "the DICOM files belong to 2 different studies; upload one study per request",
        "code": "invalid_image",
    }
    assert mixed.status_code == 400
    assert mixed.json() == {
        "detail": "DICOM files and other images cannot be mixed in one upload; send them "
        "separately",
        "code": "invalid_image",
    }
    assert Case.objects.count() == 0 and s3_keys() == []


def test_a_reviewed_study_takes_no_more_slices(uploader, s3_keys):
    client = api(uploader)
    case_id = upload(client, study_slice(1)).json()["id"]
    Case.objects.filter(id=case_id).update(review_status=ReviewStatus.CONFIRMED)
    keys_before = s3_keys()

    response = upload(client, study_slice(2))

    assert response.status_code == 409
    assert response.json() == {
        "detail": f"this DICOM study's case {case_id} has been reviewed already, so no slices "
        "can be added to it; 1 of the uploaded slices are not in it",
        "code": "study_reviewed",
    }
    assert Image.objects.count() == 1 and s3_keys() == keys_before


def test_an_idempotency_key_replayed_for_a_study_returns_its_case(uploader):
    client = api(uploader)
    first = upload(client, study_slice(1), HTTP_IDEMPOTENCY_KEY="k-1")
    replay = upload(client, study_slice(1), HTTP_IDEMPOTENCY_KEY="k-1")
    other = upload(client, study_slice(2), HTTP_IDEMPOTENCY_KEY="k-1")

    assert (first.status_code, replay.status_code) == (202, 200)
    assert replay.json()["id"] == first.json()["id"]
    assert other.status_code == 422
    assert Image.objects.count() == 1


def test_s3_down_while_slices_join_a_study_keeps_nothing(uploader, request):
    client = api(uploader)
    upload(client, study_slice(1))
    request.getfixturevalue("s3_down")

    response = upload(client, study_slice(2))

    assert response.status_code == 503
    assert Image.objects.count() == 1


# --- The target: no basic-profile value anywhere ---------------------------------------------


def database_text() -> str:
    """Every row of every table of this database, as JSON text."""
    with connection.cursor() as cursor:
        rows = []
        for table in connection.introspection.table_names(cursor):
            cursor.execute(f'SELECT row_to_json(t)::text FROM "{table}" t')
            rows.extend(row[0] for row in cursor.fetchall())
    return "\n".join(rows)


def test_a_dicom_with_every_basic_profile_attribute_leaves_none_in_s3_database_or_logs(
    caplog, capfd, s3_keys, tiny_classifier
):
    caplog.set_level(logging.DEBUG)
    dataset, markers = phi_slice()
    data = to_bytes(dataset)
    assert all(marker.encode() in data for marker in markers), "a marker was never uploaded"
    # The file name is as identifying as it gets, too.
    name = f"{dataset.PatientName}_{dataset.PatientID}.dcm"
    uploader = UserFactory()
    radiologist = RadiologistFactory(site=uploader.site_membership.site)

    response = upload(api(uploader), (name, data))
    assert response.status_code == 202, response.content
    case_id = response.json()["id"]
    image_id = response.json()["images"][0]["id"]
    services.image_classify(image_id=image_id, classifier=tiny_classifier)
    services.case_review(user=radiologist, case_id=case_id, version=0, decision="confirm")
    # The heatmap overlay is rendered on first view: view it, so that it is in S3 to check.
    heatmap = api(uploader).get(f"/api/v1/images/{image_id}/heatmap/")
    assert (heatmap.status_code, heatmap["Content-Type"]) == (200, "image/png")
    answers = [
        response.content.decode(),
        api(uploader).get(f"/api/v1/cases/{case_id}/").content.decode(),
        api(radiologist).get(f"/api/v1/cases/{case_id}/fhir/").content.decode(),
    ]

    objects = [storage.get(key) for key in s3_keys()]
    assert len(objects) == 3  # the de-identified DICOM, its rendering, the heatmap overlay
    in_database = database_text()
    assert case_id in in_database  # the dump has the case's rows in it
    assert caplog.records, "nothing was logged, so the logs' check below would prove nothing"
    logged = "\n".join(record.getMessage() for record in caplog.records)
    printed = "".join(capfd.readouterr())
    found = {
        where: sorted(
            what
            for marker, what in markers.items()
            if any(marker.encode() in blob for blob in blobs)
        )
        for where, blobs in {
            "s3": objects,
            "database": [in_database.encode()],
            "logs": [logged.encode(), printed.encode()],
            "api answers": [answer.encode() for answer in answers],
        }.items()
    }
    assert found == {"s3": [], "database": [], "logs": [], "api answers": []}
    assert json.loads(answers[2])["resourceType"] == "Bundle"

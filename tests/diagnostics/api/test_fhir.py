"""GET /api/v1/cases/{id}/fhir/: a reviewed case as a FHIR R4 Bundle, parsed back with
fhir.resources (its R4B models validate the FHIR schema)."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from fhir.resources.R4B.bundle import Bundle
from rest_framework.test import APIClient

from diagnostics import services
from diagnostics.models import Status
from tests.dicoms import bundled
from tests.factories import (
    CaseFactory,
    ImageFactory,
    PredictionFactory,
    RadiologistFactory,
    RejectedImageFactory,
    UserFactory,
    token_for,
)

pytestmark = pytest.mark.django_db

PROBABILITIES = {"glioma": 0.1, "meningioma": 0.75, "no_tumor": 0.05, "pituitary": 0.1}


def api(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(user)}")
    return client


def fhir_url(case) -> str:
    return f"/api/v1/cases/{case.id}/fhir/"


@pytest.fixture
def case():
    case = CaseFactory(status=Status.DONE, reference="study-0042")
    PredictionFactory(image__case=case, image__position=0)
    PredictionFactory(
        image__case=case, image__position=1, label="meningioma", probabilities=PROBABILITIES
    )
    return case


@pytest.fixture
def rita(case):
    return RadiologistFactory(site=case.site, username="rita")


def resources(bundle: Bundle, kind: str) -> list:
    return [entry.resource for entry in bundle.entry if entry.resource.get_resource_type() == kind]


def test_a_confirmed_case_is_a_valid_r4_bundle_with_report_observations_and_device(case, rita):
    services.case_review(user=rita, case_id=case.id, version=0, decision="confirm")

    response = api(rita).get(fhir_url(case))

    assert response.status_code == 200
    assert response["Content-Type"] == "application/fhir+json"
    bundle = Bundle.model_validate_json(response.content)
    assert bundle.type == "collection"
    assert [entry.fullUrl for entry in bundle.entry] == [
        f"urn:uuid:{entry.resource.id}" for entry in bundle.entry
    ]
    [report] = resources(bundle, "DiagnosticReport")
    observations = resources(bundle, "Observation")
    [device] = resources(bundle, "Device")
    assert report.status == "final"
    assert [(c.system, c.code, c.display) for c in report.code.coding] == [
        ("http://loinc.org", "24590-2", "MR Brain")
    ]
    assert report.category[0].coding[0].code == "RAD"
    # The subject is the pseudonymous study reference, never a patient record.
    assert report.subject.reference is None
    assert report.subject.identifier.value == "study-0042"
    assert [ref.reference for ref in report.result] == [
        f"urn:uuid:{observation.id}" for observation in observations
    ]
    # The model's label is its most confident slice's (0.75 over 0.7): confirmed.
    assert report.conclusion == "Meningioma: the radiologist confirmed the model's reading"
    assert report.conclusionCode[0].coding[0].code == "meningioma"
    assert report.resultsInterpreter[0].display == "rita"
    assert report.issued is not None

    second = observations[1]
    assert second.status == "final"
    assert second.valueCodeableConcept.coding[0].code == "meningioma"
    assert {
        component.code.coding[0].code: float(component.valueQuantity.value)
        for component in second.component
    } == PROBABILITIES
    assert {component.valueQuantity.code for component in second.component} == {"1"}
    assert second.device.reference == f"urn:uuid:{device.id}"
    assert device.deviceName[0].name == "tiny-test"
    assert [version.value for version in device.version] == ["0", "0" * 64, "keras"]


def test_an_override_reports_the_radiologists_label_and_reason(case, rita):
    services.case_review(
        user=rita,
        case_id=case.id,
        version=0,
        decision="override",
        label="pituitary",
        reason="sellar mass",
    )

    bundle = Bundle.model_validate_json(api(rita).get(fhir_url(case)).content)

    [report] = resources(bundle, "DiagnosticReport")
    assert report.conclusion == (
        "Pituitary: the radiologist overrode the model's reading (Meningioma); reason: sellar mass"
    )
    assert report.conclusionCode[0].coding[0].code == "pituitary"


def test_a_failed_slice_is_a_cancelled_observation_without_a_value(rita, case):
    ImageFactory(case=case, position=2, status=Status.FAILED, error="the model could not read")
    services.case_review(user=rita, case_id=case.id, version=0, decision="confirm")

    bundle = Bundle.model_validate_json(api(rita).get(fhir_url(case)).content)

    failed = resources(bundle, "Observation")[2]
    assert failed.status == "cancelled"
    assert failed.valueCodeableConcept is None
    assert failed.dataAbsentReason.coding[0].code == "error"
    assert failed.dataAbsentReason.text == "the model could not read"


def test_a_rejected_slice_is_a_final_observation_not_assessable_without_a_tumour_class(rita, case):
    reason = "not a brain MRI slice: the image is in colour (MRI slices are grayscale)"
    RejectedImageFactory(case=case, position=2, error=reason, ood_score=15321.4)
    services.case_review(user=rita, case_id=case.id, version=0, decision="confirm")

    bundle = Bundle.model_validate_json(api(rita).get(fhir_url(case)).content)

    rejected = resources(bundle, "Observation")[2]
    assert rejected.status == "final"
    assert rejected.valueCodeableConcept is None
    assert rejected.device is None  # no model result to attribute
    assert [(c.system, c.code) for c in rejected.dataAbsentReason.coding] == [
        ("http://terminology.hl7.org/CodeSystem/data-absent-reason", "not-applicable")
    ]
    assert rejected.dataAbsentReason.text == reason
    [interpretation] = rejected.interpretation
    assert [(c.system, c.code) for c in interpretation.coding] == [
        ("urn:brain-mri-diagnostics:interpretation", "not-assessable"),
        ("http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "IND"),
    ]
    assert interpretation.text == f"not assessable: {reason}"
    [score] = rejected.component
    assert (score.code.coding[0].code, float(score.valueQuantity.value)) == ("ood-score", 15321.4)
    # No label of any kind: neither as a value nor as a component.
    assert "urn:brain-mri-diagnostics:label" not in rejected.model_dump_json()


def test_a_prediction_the_model_flags_is_interpreted_as_needs_review(rita):
    case = CaseFactory(status=Status.DONE, uploaded_by=UserFactory(site=rita.site_membership.site))
    PredictionFactory(image__case=case, image__position=0, needs_review=True, ood_score=640.0)
    PredictionFactory(image__case=case, image__position=1, probabilities=PROBABILITIES)
    services.case_review(user=rita, case_id=case.id, version=0, decision="confirm")

    bundle = Bundle.model_validate_json(api(rita).get(fhir_url(case)).content)

    flagged, plain = resources(bundle, "Observation")
    [interpretation] = flagged.interpretation
    assert [(c.system, c.code) for c in interpretation.coding] == [
        ("urn:brain-mri-diagnostics:interpretation", "needs-review")
    ]
    assert flagged.valueCodeableConcept.coding[0].code == "glioma"
    assert [c.code.coding[0].code for c in flagged.component] == [
        "glioma",
        "meningioma",
        "no_tumor",
        "pituitary",
        "ood-score",
    ]
    assert float(flagged.component[-1].valueQuantity.value) == 640.0
    assert plain.interpretation is None
    assert len(plain.component) == 4  # no OOD score from this model


def test_a_case_without_a_final_reading_has_no_report(case, rita):
    response = api(rita).get(fhir_url(case))

    assert response.status_code == 409
    assert response.json() == {
        "detail": f"case {case.id} has no final reading yet (its review is unreviewed); its "
        "FHIR report exists once a radiologist has confirmed or overridden the model",
        "code": "not_reviewed",
    }


def test_another_sites_case_is_not_found_and_no_token_is_401(case, rita):
    services.case_review(user=rita, case_id=case.id, version=0, decision="confirm")

    elsewhere = api(RadiologistFactory()).get(fhir_url(case))
    anonymous = APIClient().get(fhir_url(case))

    assert elsewhere.status_code == 404
    assert anonymous.status_code == 401


def test_plain_json_is_served_on_request(case, rita):
    services.case_review(user=rita, case_id=case.id, version=0, decision="confirm")

    response = api(rita).get(fhir_url(case), HTTP_ACCEPT="application/json")

    assert response["Content-Type"] == "application/json"
    assert Bundle.model_validate(response.json()).type == "collection"


@pytest.mark.usefixtures("s3_bucket")
def test_a_dicom_case_names_its_study_and_slices_by_their_pseudonymous_uids(tiny_classifier):
    uploader = UserFactory()
    rita = RadiologistFactory(site=uploader.site_membership.site)
    body = (
        api(uploader)
        .post(
            "/api/v1/cases/",
            {"images": [SimpleUploadedFile("a.dcm", bundled("MR_small.dcm"))]},
        )
        .json()
    )
    services.image_classify(image_id=body["images"][0]["id"], classifier=tiny_classifier)
    services.case_review(user=rita, case_id=body["id"], version=0, decision="confirm")

    bundle = Bundle.model_validate_json(api(rita).get(f"/api/v1/cases/{body['id']}/fhir/").content)

    [report] = resources(bundle, "DiagnosticReport")
    [observation] = resources(bundle, "Observation")
    study = report.imagingStudy[0].identifier
    assert (study.system, study.value) == ("urn:dicom:uid", f"urn:oid:{body['study_uid']}")
    assert report.subject.identifier.value == body["study_uid"]
    assert [(i.system, i.value) for i in observation.identifier][1] == (
        "urn:dicom:uid",
        f"urn:oid:{body['images'][0]['instance_uid']}",
    )

"""A reviewed case as a FHIR R4 report: a Bundle (type collection) holding one
DiagnosticReport, one Observation per slice and one Device per model that classified them.

Built with `fhir.resources` (pydantic models of the FHIR specification), so what is produced
is validated against the FHIR schema as it is built. Its R4B package is used: fhir.resources
8 ships R5 (the default), R4B and STU3; R4B (4.3) is R4 with technical corrections, and the
resources used here have the same elements in both.

Each slice's Observation carries the model's trust signals: a slice the model rejected
(not a brain MRI slice, or unlike its training data) is `final` with no value, a
`dataAbsentReason` of not-applicable and the interpretation "not assessable" (v3 IND) with
the reason; a prediction below the model's review threshold has the interpretation "needs
review"; the out-of-distribution score is a component.

No patient data is in it: the subject is the case's pseudonymous study reference, never a
patient resource; times are the upload's and the reading's, never the study's own.
"""

import uuid

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from diagnostics.errors import Conflict
from diagnostics.models import Label, ReviewStatus, Status

FHIR_CONTENT_TYPE = "application/fhir+json"
LOINC = "http://loinc.org"
# LOINC 24590-2 "MR Brain": the report of a brain MRI.
REPORT_CODE = {"system": LOINC, "code": "24590-2", "display": "MR Brain"}
DIAGNOSTIC_SERVICE = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
UCUM = "http://unitsofmeasure.org"
# DICOM UIDs as FHIR identifiers (FHIR R4 "Identifier" guidance for DICOM).
DICOM_UID = "urn:dicom:uid"
RFC_3986 = "urn:ietf:rfc:3986"
# This system's own code systems: the classifier's labels, and the observation it makes.
LABEL_SYSTEM = "urn:brain-mri-diagnostics:label"
OBSERVATION_SYSTEM = "urn:brain-mri-diagnostics:observation"
# The model's trust signals on a slice: not assessable (rejected), needs review.
INTERPRETATION_SYSTEM = "urn:brain-mri-diagnostics:interpretation"
STUDY_REFERENCE_SYSTEM = "urn:brain-mri-diagnostics:study-reference"
# Device ids are derived from the model, so a model is the same Device in every report.
_DEVICE_NAMESPACE = uuid.UUID("2f1e8b8e-5a57-4d7b-9a53-0d4f0c1c6f10")

FINAL_REVIEW_STATUSES = (ReviewStatus.CONFIRMED, ReviewStatus.OVERRIDDEN)


class NotReported(Conflict):
    code = "not_reviewed"


def case_report_bundle(case) -> Bundle:
    """The case's report. `case` comes from `selectors.case_review_get` (images with their
    predictions, readings with their readers). Only a case with a final reading has one."""
    if case.review_status not in FINAL_REVIEW_STATUSES:
        raise NotReported(
            f"case {case.id} has no final reading yet (its review is "
            f"{ReviewStatus(case.review_status).label.lower()}); its FHIR report exists once a "
            "radiologist has confirmed or overridden the model"
        )
    subject = _subject(case)
    devices: dict[tuple, Device] = {}
    observations = [
        _observation(image, subject=subject, devices=devices) for image in case.images.all()
    ]
    report = _report(case, subject=subject, observations=observations)
    resources = [report, *observations, *devices.values()]
    return Bundle(
        type="collection",
        timestamp=case.reviewed_at,
        identifier={"system": RFC_3986, "value": f"urn:uuid:{case.id}"},
        entry=[
            {"fullUrl": f"urn:uuid:{resource.id}", "resource": resource} for resource in resources
        ],
    )


def _ref(resource) -> dict:
    return {"reference": f"urn:uuid:{resource.id}"}


def _subject(case) -> dict:
    """A logical reference: the pseudonymous study, never a patient record."""
    value = case.study_uid or case.reference or str(case.id)
    return {
        "type": "Patient",
        "identifier": {"system": STUDY_REFERENCE_SYSTEM, "value": value},
        "display": "pseudonymous study reference",
    }


def _label(label: str) -> dict:
    return {
        "coding": [{"system": LABEL_SYSTEM, "code": label, "display": Label(label).label}],
        "text": Label(label).label,
    }


def _device(prediction, devices: dict) -> Device:
    key = (prediction.model_name, prediction.model_version, prediction.model_sha256)
    if key not in devices:
        devices[key] = Device(
            id=str(uuid.uuid5(_DEVICE_NAMESPACE, "/".join(key))),
            status="active",
            deviceName=[{"name": prediction.model_name, "type": "model-name"}],
            type={"text": "brain MRI slice classifier (software)"},
            version=[
                {"value": prediction.model_version},
                {"type": {"text": "artifact sha256"}, "value": prediction.model_sha256},
                {"type": {"text": "runtime"}, "value": prediction.runtime},
            ],
        )
    return devices[key]


def _observation(image, *, subject: dict, devices: dict) -> Observation:
    identifiers = [{"system": RFC_3986, "value": f"urn:uuid:{image.id}"}]
    if image.instance_uid:
        identifiers.append({"system": DICOM_UID, "value": f"urn:oid:{image.instance_uid}"})
    common = {
        "id": str(image.id),
        "identifier": identifiers,
        "category": [
            {"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}
        ],
        "code": {
            "coding": [
                {
                    "system": OBSERVATION_SYSTEM,
                    "code": "slice-tumour-class",
                    "display": "Brain tumour class of an MRI slice (model prediction)",
                }
            ],
            "text": f"slice {image.position}: brain tumour class (model prediction)",
        },
        "subject": subject,
    }
    prediction = getattr(image, "prediction", None)
    if image.status == Status.REJECTED:
        # The model refused it (not a brain MRI slice, or unlike its training data): a
        # finished observation with no tumour class, and why.
        return Observation(
            **common,
            status="final",
            dataAbsentReason={
                "coding": [
                    {
                        "system": DATA_ABSENT_REASON,
                        "code": "not-applicable",
                        "display": "Not Applicable",
                    }
                ],
                "text": image.error or "not assessable by the model",
            },
            interpretation=[
                {
                    "coding": [
                        {
                            "system": INTERPRETATION_SYSTEM,
                            "code": "not-assessable",
                            "display": "Not assessable by the model",
                        },
                        {"system": INTERPRETATION, "code": "IND", "display": "Indeterminate"},
                    ],
                    "text": f"not assessable: {image.error}" if image.error else "not assessable",
                }
            ],
            **_ood_components(image.ood_score),
        )
    if prediction is None:
        # A failed slice (or one still waiting): reported as such, with no value.
        return Observation(
            **common,
            status="cancelled",
            dataAbsentReason={
                "coding": [{"system": DATA_ABSENT_REASON, "code": "error", "display": "Error"}],
                "text": image.error or f"no prediction ({Status(image.status).label})",
            },
        )
    device = _device(prediction, devices)
    flagged = {}
    if prediction.needs_review:
        flagged["interpretation"] = [
            {
                "coding": [
                    {
                        "system": INTERPRETATION_SYSTEM,
                        "code": "needs-review",
                        "display": "Needs review: model confidence below its review threshold",
                    }
                ],
                "text": "needs review: the model's calibrated confidence is below the "
                "threshold chosen on its validation data",
            }
        ]
    return Observation(
        **common,
        status="final",
        issued=prediction.created_at,
        device=_ref(device),
        valueCodeableConcept=_label(prediction.label),
        **flagged,
        component=[
            *(
                {
                    "code": _label(label),
                    "valueQuantity": {
                        "value": round(float(probability), 6),
                        "unit": "probability",
                        "system": UCUM,
                        "code": "1",
                    },
                }
                for label, probability in sorted(prediction.probabilities.items())
            ),
            *_ood_components(prediction.ood_score).get("component", []),
        ],
    )


def _ood_components(score: float | None) -> dict:
    """{"component": [the out-of-distribution score (dimensionless)]}, or {} without one
    (FHIR allows no empty lists)."""
    if score is None:
        return {}
    return {
        "component": [
            {
                "code": {
                    "coding": [
                        {
                            "system": OBSERVATION_SYSTEM,
                            "code": "ood-score",
                            "display": "Out-of-distribution score (higher: less like the "
                            "model's training data)",
                        }
                    ]
                },
                "valueQuantity": {
                    "value": round(float(score), 3),
                    "unit": "1",
                    "system": UCUM,
                    "code": "1",
                },
            }
        ]
    }


def _report(case, *, subject: dict, observations: list) -> DiagnosticReport:
    readings = list(case.reviews.all())
    final = readings[-1]
    report = {
        "id": str(case.id),
        "identifier": [{"system": RFC_3986, "value": f"urn:uuid:{case.id}"}],
        "status": "final",
        "category": [
            {"coding": [{"system": DIAGNOSTIC_SERVICE, "code": "RAD", "display": "Radiology"}]}
        ],
        "code": {"coding": [REPORT_CODE], "text": "MR Brain"},
        "subject": subject,
        "effectiveDateTime": case.created_at,
        "issued": case.reviewed_at,
        "resultsInterpreter": [{"display": final.reader.get_username()}],
        "result": [_ref(observation) for observation in observations],
        "conclusion": _conclusion(final),
        "conclusionCode": [_label(case.review_label)],
    }
    if case.study_uid:
        report["imagingStudy"] = [
            {
                "type": "ImagingStudy",
                "identifier": {"system": DICOM_UID, "value": f"urn:oid:{case.study_uid}"},
            }
        ]
    return DiagnosticReport(**report)


def _conclusion(reading) -> str:
    label = Label(reading.label).label
    if reading.decision == "confirm":
        text = f"{label}: the radiologist confirmed the model's reading"
    else:
        model = Label(reading.model_label).label if reading.model_label else "no label"
        text = f"{label}: the radiologist overrode the model's reading ({model})"
        if reading.reason:
            text += f"; reason: {reading.reason}"
    if reading.is_second_read:
        text += " (second read)"
    return text

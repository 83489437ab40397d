"""Migration 0008 (trust signals) applies to a database with cases in it, keeps the flag
the former rule gave old predictions, and teaches the worklist triggers `rejected`."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

BEFORE = [("diagnostics", "0007_dicom")]
AFTER = [("diagnostics", "0008_trust_signals")]


def _migrate(targets):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


@pytest.mark.django_db(transaction=True)
def test_0008_applies_and_keeps_old_flags():
    apps = _migrate(BEFORE)
    site = apps.get_model("diagnostics", "Site").objects.create(name="Old hospital")
    user = apps.get_model("auth", "User").objects.create(username="old-uploader")
    Case = apps.get_model("diagnostics", "Case")
    Image = apps.get_model("diagnostics", "Image")
    Prediction = apps.get_model("diagnostics", "Prediction")
    doubtful_case = Case.objects.create(site=site, uploaded_by=user)
    sure_case = Case.objects.create(site=site, uploaded_by=user)
    images = {}
    for case, probability in ((doubtful_case, 0.7), (sure_case, 0.9)):
        image = images[case.id] = Image.objects.create(
            case=case,
            position=0,
            s3_key=f"scans/{case.id}/0",
            sha256="0" * 64,
            size_bytes=1,
            content_type="image/jpeg",
            width=1,
            height=1,
            status="done",
        )
        Prediction.objects.create(
            image=image,
            label="glioma",
            probabilities={"glioma": probability, "meningioma": 1 - probability},
            model_name="old",
            model_version="1.0.0",
            model_sha256="0" * 64,
            runtime="litert",
            inference_ms=1,
            turnaround_ms=1,
        )

    try:
        apps = _migrate(AFTER)
        Case = apps.get_model("diagnostics", "Case")
        Image = apps.get_model("diagnostics", "Image")
        Prediction = apps.get_model("diagnostics", "Prediction")

        # Below the former REVIEW_CONFIDENCE_THRESHOLD default (0.8): still flagged.
        flagged = dict(Prediction.objects.values_list("image__case_id", "needs_review"))
        assert flagged == {doubtful_case.id: True, sure_case.id: False}
        assert Prediction.objects.filter(heatmap__isnull=False).count() == 0
        cases = {case.id: case for case in Case.objects.all()}
        assert cases[doubtful_case.id].has_flagged_image is True
        assert cases[sure_case.id].has_flagged_image is False
        assert cases[sure_case.id].has_rejected_image is False

        # The trigger now watches `rejected` as well as `failed`.
        Image.objects.filter(id=images[sure_case.id].id).update(status="rejected")
        sure = Case.objects.get(id=sure_case.id)
        assert (sure.has_rejected_image, sure.has_failed_image) == (True, False)
        Image.objects.filter(id=images[sure_case.id].id).update(status="failed")
        sure = Case.objects.get(id=sure_case.id)
        assert (sure.has_rejected_image, sure.has_failed_image) == (False, True)

        # And it can be undone.
        _migrate(BEFORE)
    finally:
        _migrate(AFTER)

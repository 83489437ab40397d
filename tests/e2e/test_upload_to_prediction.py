"""The whole path on the real services: HTTP upload to the live server -> S3 -> PostgreSQL
-> job on Redis -> a real `celery -A workers worker` process -> prediction -> HTTP poll."""

import pytest
import requests

from diagnostics.models import Image, Prediction
from tests.e2e.conftest import wait_for
from tests.factories import UserFactory, token_for
from tests.images import image_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_uploaded_slices_are_classified_by_a_real_worker(live_server, start_worker, broker):
    headers = {"Authorization": f"Token {token_for(UserFactory())}"}
    start_worker()

    upload = requests.post(
        f"{live_server.url}/api/v1/cases/",
        files=[
            ("images", ("a.jpg", image_bytes(seed=1), "image/jpeg")),
            ("images", ("b.png", image_bytes(format="PNG", seed=2), "image/png")),
        ],
        data={"reference": "e2e-study"},
        headers=headers,
        timeout=30,
    )
    assert upload.status_code == 202, upload.text
    poll_url = upload.headers["Location"]

    def finished():
        case = requests.get(poll_url, headers=headers, timeout=10).json()
        return case if case["status"] in ("done", "failed") else None

    case = wait_for(finished, timeout=120)

    assert case["status"] == "done"
    for image in case["images"]:
        assert image["status"] == "done"
        prediction = image["prediction"]
        assert prediction["label"] in ("glioma", "meningioma", "no_tumor", "pituitary")
        assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert prediction["model"]["name"] == "tiny-test"
        assert prediction["model"]["version"] == "0"
    assert Prediction.objects.count() == Image.objects.count() == 2

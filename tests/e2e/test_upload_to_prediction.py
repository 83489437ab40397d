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


def test_a_job_delivered_twice_writes_one_prediction(live_server, start_worker, broker):
    from diagnostics import jobs

    headers = {"Authorization": f"Token {token_for(UserFactory())}"}
    start_worker()

    def upload_and_wait(seed):
        response = requests.post(
            f"{live_server.url}/api/v1/cases/",
            files=[("images", ("a.jpg", image_bytes(seed=seed), "image/jpeg"))],
            headers=headers,
            timeout=30,
        )
        poll_url = response.headers["Location"]
        return wait_for(
            lambda: (
                (case := requests.get(poll_url, headers=headers, timeout=10).json())["status"]
                == "done"
                and case
            ),
            timeout=120,
        )

    first = upload_and_wait(seed=1)
    image_id = first["images"][0]["id"]
    jobs.send_classify(image_id)  # the same job again, as a broker redelivery would
    upload_and_wait(seed=2)  # one worker, one job at a time: the duplicate ran before this

    assert Prediction.objects.filter(image_id=image_id).count() == 1
    # The duplicate found the image done and did not even claim it.
    assert Image.objects.get(id=image_id).attempts == 1

"""Real workers on separate queues: a housekeeping-only worker (`-Q celery`) loads no model
and never takes a classification job; a `-Q classify` worker (a GPU node's) does."""

import pytest
import requests

from diagnostics.models import Image
from tests.e2e.conftest import assert_worker_ready, wait_for
from tests.factories import UserFactory, token_for
from tests.images import image_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_classification_jobs_wait_for_a_worker_on_the_classify_queue(
    live_server, processes, broker, tmp_path
):
    ready_file = tmp_path / "housekeeping-ready"
    processes.start("worker", "-Q", "celery", WORKER_READY_FILE=ready_file)
    assert_worker_ready(ready_file, timeout=60)

    headers = {"Authorization": f"Token {token_for(UserFactory())}"}
    upload = requests.post(
        f"{live_server.url}/api/v1/cases/",
        files=[("images", ("a.jpg", image_bytes(seed=1), "image/jpeg"))],
        headers=headers,
        timeout=30,
    )
    assert upload.status_code == 202, upload.text
    wait_for(lambda: broker.llen("classify") == 1, timeout=10)
    image_id = upload.json()["images"][0]["id"]
    # A batch waits at most CLASSIFY_BATCH_WAIT_MS: were the job taken, it would be done.
    with pytest.raises(AssertionError):
        wait_for(lambda: Image.objects.get(id=image_id).status != "queued", timeout=5)
    assert broker.llen("classify") == 1

    assert "loaded model" not in (tmp_path / "worker0.log").read_text()

    processes.start("worker", "-Q", "classify")
    wait_for(lambda: Image.objects.get(id=image_id).status == "done", timeout=120)
    assert broker.llen("classify") == 0

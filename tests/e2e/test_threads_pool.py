"""A real worker with CELERY_WORKER_POOL=threads: the threads share one model, the worker
reports ready once it is loaded, and every image gets exactly one prediction."""

import pytest
import requests

from diagnostics.models import Image, Prediction
from tests.e2e.conftest import assert_worker_ready, wait_for
from tests.factories import UserFactory, token_for
from tests.images import image_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_threads_pool_worker_is_ready_and_classifies_every_image_once(
    live_server, processes, broker, tmp_path
):
    ready_file = tmp_path / "worker-ready"
    processes.start(
        "worker",
        CELERY_WORKER_POOL="threads",
        CELERY_WORKER_CONCURRENCY=2,
        WORKER_READY_FILE=ready_file,
    )
    assert_worker_ready(ready_file, timeout=120)

    headers = {"Authorization": f"Token {token_for(UserFactory())}"}
    upload = requests.post(
        f"{live_server.url}/api/v1/cases/",
        files=[("images", (f"{n}.jpg", image_bytes(seed=n), "image/jpeg")) for n in range(6)],
        headers=headers,
        timeout=30,
    )
    assert upload.status_code == 202, upload.text

    def finished():
        case = requests.get(upload.headers["Location"], headers=headers, timeout=10).json()
        return case if case["status"] in ("done", "failed") else None

    case = wait_for(finished, timeout=120)
    assert case["status"] == "done"
    assert Image.objects.filter(status="done").count() == Prediction.objects.count() == 6

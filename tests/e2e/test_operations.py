"""Operating the stack with real processes (gunicorn, `celery worker`): readiness, the
signed webhook with a retry, Prometheus endpoints adding up every process, JSON logs that
follow the case from the API into the worker."""

import json
import subprocess
import sys

import pytest
import requests

from diagnostics.models import WebhookDelivery
from diagnostics.services import webhooks
from tests.e2e.conftest import REPO_ROOT, free_port, wait_for
from tests.factories import UserFactory, token_for
from tests.images import image_bytes
from tests.webhook_receiver import Receiver

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def metric(text: str, name: str, **labels) -> float | None:
    """The value of one sample in Prometheus' text format."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        sample_name, _, label_text = series.partition("{")
        found = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if sample_name == name and found == wanted:
            return float(value)
    return None


def test_ready_worker_signed_webhook_with_a_retry_metrics_and_case_id_in_logs(
    processes, broker, tmp_path
):
    ready_file = tmp_path / "worker-ready"
    worker_metrics_port = free_port()
    url = processes.web()
    worker = processes.start(
        "worker",
        WORKER_READY_FILE=ready_file,
        WORKER_METRICS_PORT=worker_metrics_port,
        WEBHOOK_BACKOFF_BASE_S=1,
    )
    user = UserFactory(roles=["uploader", "site admin"])
    headers = {"Authorization": f"Token {token_for(user)}"}
    probe = [sys.executable, "-m", "workers.health"]
    probe_env = {"WORKER_READY_FILE": str(ready_file), "PATH": ""}

    wait_for(ready_file.exists, timeout=120)
    assert subprocess.run(probe, cwd=REPO_ROOT, env=probe_env).returncode == 0
    assert requests.get(f"{url}/readyz", timeout=10).json()["status"] == "ok"

    with Receiver(statuses=[500]) as receiver:
        registered = requests.post(
            f"{url}/api/v1/webhooks/",
            json={"url": receiver.url, "events": ["case.completed"]},
            headers=headers,
            timeout=10,
        ).json()
        upload = requests.post(
            f"{url}/api/v1/cases/",
            files=[("images", ("DOE^JOHN.jpg", image_bytes(seed=7), "image/jpeg"))],
            data={"reference": "MRN-4711"},
            headers=headers,
            timeout=30,
        )
        case_id = upload.json()["id"]
        wait_for(lambda: len(receiver.received) == 2, timeout=120)

    first, second = receiver.received
    assert upload.status_code == 202
    # The 500 was retried: the same delivery, signed again.
    assert first.headers["X-Webhook-Delivery"] == second.headers["X-Webhook-Delivery"]
    assert webhooks.signature_verify(
        registered["secret"], second.headers["X-Webhook-Signature"], second.body
    )
    assert second.json["event"] == "case.completed"
    assert second.json["case"]["id"] == case_id and second.json["case"]["status"] == "done"
    delivery = WebhookDelivery.objects.get()
    wait_for(lambda: (delivery.refresh_from_db(), delivery.status)[1] == "delivered", timeout=10)
    assert (delivery.attempts, delivery.response_status) == (2, 200)

    # The worker's endpoint adds up its pool process's samples; its main process reads Redis.
    worker_metrics = requests.get(f"http://127.0.0.1:{worker_metrics_port}/metrics", timeout=10)
    text = worker_metrics.text
    assert metric(text, "diagnostics_classify_jobs_total", outcome="done") == 1.0
    assert metric(text, "diagnostics_inference_seconds_count") == 1.0
    assert metric(text, "diagnostics_webhook_deliveries_total", outcome="retry") == 1.0
    assert metric(text, "diagnostics_webhook_deliveries_total", outcome="delivered") == 1.0
    # One worker without -Q took the classify job and both webhook deliveries (celery queue).
    assert metric(text, "diagnostics_queue_depth", queue="classify") == 0.0
    assert metric(text, "diagnostics_queue_depth", queue="celery") == 0.0
    model_info = [line for line in text.splitlines() if line.startswith("diagnostics_model_info{")]
    assert len(model_info) == 1 and 'name="tiny-test"' in model_info[0]
    assert 'version="0"' in model_info[0] and model_info[0].endswith(" 1.0")

    # gunicorn's /metrics adds up both of its workers.
    web_metrics = requests.get(f"{url}/metrics", timeout=10).text
    name = "django_http_responses_total_by_status_view_method_total"
    assert metric(web_metrics, name, method="POST", status="202", view="case-list") == 1.0
    assert metric(web_metrics, name, method="POST", status="201", view="webhook-list") == 1.0

    # The worker's log is JSON lines; the job's lines carry the case id, and no PHI.
    processes.stop(worker)
    worker_log = next(tmp_path.glob("worker*.log")).read_text()
    records = [json.loads(line) for line in worker_log.splitlines() if line.startswith("{")]
    assert any(r.get("case_id") == case_id and " classified: " in r["message"] for r in records)
    assert "DOE^JOHN" not in worker_log and "MRN-4711" not in worker_log
    assert not ready_file.exists()  # removed when the worker stopped

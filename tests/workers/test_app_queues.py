"""Two queues: classification on `classify` (GPU nodes: `celery -A workers worker -Q classify`),
housekeeping on Celery's default `celery`; a worker without -Q consumes both."""

import json
import uuid

import pytest

import workers.tasks  # noqa: F401  (registers the tasks routed below)
import workers.webhooks  # noqa: F401
from diagnostics import jobs
from diagnostics.services import webhooks
from workers.app import CLASSIFY_QUEUE, HOUSEKEEPING_QUEUE, app

HOUSEKEEPING_TASKS = {
    "workers.tasks.resend_stuck_images",
    "workers.webhooks.deliver_webhook",
    "workers.webhooks.resend_stuck_webhooks",
}


def queue_of(task_name: str) -> str:
    """The queue Celery's router gives a task (what send_task and .delay use)."""
    return app.amqp.router.route({}, task_name)["queue"].name


def test_the_queues_are_named_classify_and_celery():
    assert (CLASSIFY_QUEUE, HOUSEKEEPING_QUEUE) == ("classify", "celery")
    assert app.conf.task_default_queue == "celery"
    for queue in app.conf.task_queues:
        assert (queue.exchange.name, queue.routing_key) == (queue.name, queue.name)
    assert {queue.name for queue in app.conf.task_queues} == {"classify", "celery"}


def test_classification_is_routed_to_the_classify_queue():
    assert jobs.CLASSIFY_TASK == "workers.tasks.classify_image"
    assert queue_of(jobs.CLASSIFY_TASK) == "classify"


def test_every_other_task_of_the_project_stays_on_the_default_queue():
    project_tasks = {name for name in app.tasks if name.startswith("workers.")}
    assert HOUSEKEEPING_TASKS <= project_tasks
    for name in project_tasks - {jobs.CLASSIFY_TASK}:
        assert queue_of(name) == "celery", name
    for entry in app.conf.beat_schedule.values():
        assert queue_of(entry["task"]) == "celery", entry["task"]


def test_a_worker_without_q_consumes_both_queues_and_q_classify_only_classify():
    # What `celery worker` does with its -Q option (WorkController.setup_queues).
    everything = app.amqp.Queues(app.conf.task_queues)
    assert set(everything.consume_from) == {"classify", "celery"}
    gpu_node = app.amqp.Queues(app.conf.task_queues)
    gpu_node.select(["classify"])
    assert set(gpu_node.consume_from) == {"classify"}


def waiting(broker, queue: str) -> list[dict]:
    return [json.loads(message)["headers"] for message in broker.lrange(queue, 0, -1)]


@pytest.mark.parametrize("times", [1, 3])
def test_send_classify_lands_in_the_classify_list_on_real_redis(broker, times):
    image_ids = [uuid.uuid4() for _ in range(times)]
    for image_id in image_ids:
        jobs.send_classify(image_id)

    headers = waiting(broker, "classify")
    assert [h["task"] for h in headers] == ["workers.tasks.classify_image"] * times
    assert {h["argsrepr"] for h in headers} == {f"['{image_id}']" for image_id in image_ids}
    assert broker.llen("celery") == 0


def test_housekeeping_jobs_land_in_the_celery_list_on_real_redis(broker):
    delivery_id = uuid.uuid4()
    assert webhooks.deliveries_send([delivery_id]) == 1
    # What beat sends on its schedule.
    for entry in app.conf.beat_schedule.values():
        app.send_task(entry["task"])

    headers = waiting(broker, "celery")
    assert sorted(h["task"] for h in headers) == sorted(
        ["workers.webhooks.deliver_webhook"]
        + [entry["task"] for entry in app.conf.beat_schedule.values()]
    )
    [delivery] = [h for h in headers if h["task"] == "workers.webhooks.deliver_webhook"]
    assert delivery["argsrepr"] == f"['{delivery_id}']"
    assert broker.llen("classify") == 0


def test_only_a_worker_that_takes_classify_jobs_loads_the_model():
    from workers.tasks import classifies

    queues = app.amqp.queues
    try:
        assert classifies()  # no -Q: every queue
        queues.select([HOUSEKEEPING_QUEUE])
        assert not classifies()
        queues.select([CLASSIFY_QUEUE])
        assert classifies()
    finally:
        queues._consume_from = None

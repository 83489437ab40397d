"""The worker's Prometheus endpoint: one per `celery worker`, on WORKER_METRICS_PORT,
adding up the samples of all its pool processes (prometheus_client's multiprocess mode),
plus the depth of each queue (classify, celery) read from Redis at each scrape.

workers.app calls `share_between_pool_processes` first thing; nothing here imports
prometheus_client at module level, because that directory must be set before it loads.
"""

import atexit
import logging
import os
import shutil
import sys
import tempfile

import redis
from celery.signals import worker_init
from django.conf import settings

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_between_pool_processes(argv: list[str] = sys.argv) -> None:
    """In `celery worker`'s main process, before anything imports prometheus_client (Celery
    imports the task modules, and with them Django's apps, before any worker signal): every
    pool process it forks then writes its samples to one directory, which this process serves.

    An operator's PROMETHEUS_MULTIPROC_DIR is emptied first (a previous run's samples would
    be added to this one's); without one, each worker gets a fresh temporary directory.
    """
    if "worker" not in argv[1:]:
        return
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory, exist_ok=True)
    else:
        directory = tempfile.mkdtemp(prefix="diagnostics-worker-metrics-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    os.environ[MULTIPROC_ENV] = directory
    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        # Already imported (flower's `celery` CLI plugin loads prometheus_client before the
        # app): make the metrics created from now on (workers.instruments) multiprocess too.
        values.ValueClass = values.get_value_class()


class QueueDepthCollector:
    """Jobs waiting in each queue (LLEN of its Celery list in Redis), read at scrape time."""

    def __init__(self, queues: list[str]):
        self.queues = queues

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily(
            "diagnostics_queue_depth", "Jobs waiting in the queue", labels=["queue"]
        )
        client = redis.Redis.from_url(
            settings.CELERY_BROKER_URL, socket_connect_timeout=2, socket_timeout=2
        )
        try:
            for queue in self.queues:
                depth.add_metric([queue], client.llen(queue))
        except redis.RedisError as exc:
            logger.warning("queue depth unavailable: %s", exc)
            return
        finally:
            client.close()
        yield depth


def registry(queues: list[str]):
    from prometheus_client import CollectorRegistry, multiprocess

    collected = CollectorRegistry()
    multiprocess.MultiProcessCollector(collected)
    collected.register(QueueDepthCollector(queues))
    return collected


@worker_init.connect
def _serve_metrics(sender=None, **_):
    port = settings.WORKER_METRICS_PORT
    if not port:
        return
    from prometheus_client import start_http_server

    # Every queue of the app (classify and housekeeping), whichever ones this worker consumes
    # (-Q): the depth is the deployment's backlog.
    queues = [queue.name for queue in sender.app.conf.task_queues]
    try:
        start_http_server(port, registry=registry(queues))
    except OSError as exc:
        # Another worker on this host has the port: this one runs on, unscraped.
        logger.warning("worker metrics not served on port %d: %s", port, exc)
        return
    logger.info("worker metrics on port %d", port)

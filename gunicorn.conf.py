"""gunicorn reads this file from its working directory (the repository, /app in the image).

Each gunicorn worker process counts its own requests; Prometheus must see their sum. With
prometheus_client's multiprocess mode every worker writes its samples to one directory and
/metrics adds them up (django-prometheus does this when PROMETHEUS_MULTIPROC_DIR is set).
The directory is set here, in the master, before any worker imports the application.
"""

import atexit
import os
import shutil
import tempfile

_directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _directory:
    # A previous run's samples would be added to this one's.
    shutil.rmtree(_directory, ignore_errors=True)
    os.makedirs(_directory, exist_ok=True)
else:
    _directory = tempfile.mkdtemp(prefix="diagnostics-web-metrics-")
    atexit.register(shutil.rmtree, _directory, ignore_errors=True)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _directory


def child_exit(server, worker):
    # A replaced worker's live gauges must not count any more.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)

"""Worker readiness: ready once a pool process has loaded the model (at once on a
housekeeping-only worker, which needs none).

The pool process that loads the model writes its pid to WORKER_READY_FILE; the main process
removes the file when it starts and when it stops. `python -m workers.health` (the compose
healthcheck, a Kubernetes exec probe) exits 0 only while the file names a live process.
"""

import os
import sys
from pathlib import Path

from celery.signals import worker_init, worker_process_init, worker_shutdown
from django.conf import settings


def _ready_file() -> Path:
    return Path(settings.WORKER_READY_FILE)


@worker_init.connect
@worker_shutdown.connect
def _not_ready(**_):
    _ready_file().unlink(missing_ok=True)


@worker_process_init.connect
def _ready_once_the_model_is_loaded(**_):
    from workers import instruments
    from workers.tasks import classifier, classifies

    if classifies():  # a housekeeping-only worker (-Q celery) is ready without a model
        instruments.model_loaded(classifier())  # loaded once per process; cached
    path = _ready_file()
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(f"{os.getpid()}\n")
    temporary.replace(path)  # atomic: a probe never reads half a file


def is_ready() -> tuple[bool, str]:
    path = _ready_file()
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return False, f"no model loaded yet ({path} missing)"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, f"the process that loaded the model ({pid}) is gone"
    except PermissionError:
        pass  # alive, owned by another user
    return True, f"model loaded by process {pid}"


if __name__ == "__main__":
    ready, reason = is_ready()
    print(reason)
    sys.exit(0 if ready else 1)

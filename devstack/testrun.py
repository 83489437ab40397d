"""`python -m devstack test`: pytest against real services, starting any not configured."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path

from devstack.up import start_missing_services


def run_tests(pytest_args: list[str]) -> int:
    """Run pytest with DATABASE_URL, REDIS_URL and S3_ENDPOINT_URL set, then stop what started.

    Servers started here keep their data in a throwaway folder: a test run starts clean.
    """
    with (
        tempfile.TemporaryDirectory(prefix="devstack-test-") as data_dir,
        contextlib.ExitStack() as running,
    ):
        env = start_missing_services(Path(data_dir), running)
        pytest = subprocess.Popen([sys.executable, "-m", "pytest", *pytest_args], env=env)
        try:
            return pytest.wait()
        except KeyboardInterrupt:
            # The terminal's Ctrl-C reached pytest too: let it report and exit before the
            # servers under it go away.
            return pytest.wait()

"""Command line: `python -m devstack up` and `python -m devstack test [pytest args]`."""

import argparse
import sys
from pathlib import Path

from devstack.testrun import run_tests
from devstack.up import DEFAULT_DATA_DIR, DEFAULT_PORT, up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser(
        "up",
        help="run the whole stack in the foreground; Ctrl-C stops it",
        description=(
            "Start PostgreSQL, Redis and S3 for each of DATABASE_URL, REDIS_URL and "
            "S3_ENDPOINT_URL not set in the environment, migrate, create the bucket and a "
            "demo user, then run the API (gunicorn) and one Celery worker."
        ),
    )
    up_parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="where the embedded services keep their data and logs (default: %(default)s)",
    )
    up_parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="API port (default: %(default)s)"
    )
    commands.add_parser(
        "test",
        help="run pytest (all arguments pass through) against real services",
        description=(
            "Start PostgreSQL, Redis and S3, in a throwaway folder, for each of DATABASE_URL, "
            "REDIS_URL and S3_ENDPOINT_URL not set in the environment, then run pytest with "
            "the given arguments."
        ),
        add_help=False,
    )
    argv = sys.argv[1:] if argv is None else argv
    # pytest's own options (-k, -x, ...) must reach pytest untouched, so they skip argparse.
    if argv[:1] == ["test"]:
        return run_tests(argv[1:])
    args = parser.parse_args(argv)
    return up(data_dir=args.data_dir, port=args.port)


if __name__ == "__main__":
    sys.exit(main())

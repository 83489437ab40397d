"""The local stack: real PostgreSQL, Redis and S3 from PyPI wheels, plus the API and a worker.

`python -m devstack up` (or `./stack up`) runs everything; `devstack.services` starts the
servers alone, for tests.
"""

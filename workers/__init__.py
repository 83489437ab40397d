"""The Celery app: `celery -A workers worker` runs on GPU or CPU nodes."""

from workers.app import app

__all__ = ["app"]

from django.conf import settings
from django.core.management.base import BaseCommand

from diagnostics import storage


class Command(BaseCommand):
    help = "Create the S3 bucket for scans if it does not exist."

    def handle(self, *args, **options):
        created = storage.ensure_bucket()
        state = "created" if created else "already exists"
        self.stdout.write(f"bucket {settings.S3_BUCKET} at {settings.S3_ENDPOINT_URL}: {state}")

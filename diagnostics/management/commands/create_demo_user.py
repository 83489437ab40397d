from django.core.management.base import BaseCommand

from diagnostics import services


class Command(BaseCommand):
    help = "Create (or reuse) a demo site and user and print the user's API token as TOKEN=..."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="demo")
        parser.add_argument("--site", default="Demo Hospital")
        parser.add_argument("--password", default=None, help="also allow admin login")

    def handle(self, *args, username, site, password, **options):
        token = services.demo_user_ensure(username=username, site_name=site, password=password)
        self.stdout.write(f"TOKEN={token}")

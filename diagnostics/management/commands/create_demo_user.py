from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from diagnostics import services
from diagnostics.models import Role


class Command(BaseCommand):
    help = (
        "Create (or reuse) a demo site and user with the given roles and print the user's "
        "API token as TOKEN=..."
    )

    def add_arguments(self, parser):
        parser.add_argument("--username", default="demo")
        parser.add_argument("--site", default="Demo Hospital")
        parser.add_argument("--password", default=None, help="also allow admin login")
        parser.add_argument(
            "--role",
            dest="roles",
            action="append",
            choices=Role.values,
            help="repeat for several; default: uploader and radiologist",
        )

    def handle(self, *args, username, site, password, roles, **options):
        token = services.demo_user_ensure(username=username, site_name=site, password=password)
        user = get_user_model().objects.get(username=username)
        services.user_roles_set(user=user, roles=roles or [Role.UPLOADER, Role.RADIOLOGIST])
        self.stdout.write(f"TOKEN={token}")

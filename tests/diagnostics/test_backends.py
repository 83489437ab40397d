import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.models import AnonymousUser, Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext

from diagnostics.backends import OneQueryModelBackend
from diagnostics.models import Role
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def _fresh(user):
    # Both backends cache on the user object: each reads a copy of its own.
    return get_user_model().objects.get(pk=user.pk)


def _users():
    own_and_role = UserFactory(roles=[Role.UPLOADER, Role.RADIOLOGIST])
    own_and_role.user_permissions.add(Permission.objects.get(codename="view_webhook"))
    return {
        "no role": UserFactory(roles=[]),
        "uploader": UserFactory(roles=[Role.UPLOADER]),
        "site admin": UserFactory(roles=[Role.SITE_ADMIN]),
        "own permission and two roles": own_and_role,
        "inactive": UserFactory(roles=[Role.RADIOLOGIST], is_active=False),
        "superuser": UserFactory(roles=[], is_superuser=True),
    }


def test_it_grants_exactly_what_djangos_model_backend_grants():
    for kind, user in _users().items():
        expected = ModelBackend().get_all_permissions(_fresh(user))
        assert OneQueryModelBackend().get_all_permissions(_fresh(user)) == expected, kind
    assert "diagnostics.add_case" in expected  # the superuser's: every permission


def test_a_users_permissions_cost_one_query_per_request():
    user = _fresh(UserFactory(roles=[Role.RADIOLOGIST]))
    with CaptureQueriesContext(connection) as queries:
        assert user.has_perm("diagnostics.review_case")
        assert not user.has_perm("diagnostics.delete_case")
    assert len(queries) == 1


def test_an_object_or_an_anonymous_user_has_no_model_permissions():
    user = _fresh(UserFactory(roles=[Role.RADIOLOGIST]))
    assert OneQueryModelBackend().get_all_permissions(user, obj=object()) == set()
    assert OneQueryModelBackend().get_all_permissions(AnonymousUser()) == set()

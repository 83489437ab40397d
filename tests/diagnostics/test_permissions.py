"""Every role against every operation, over the API and in the admin. The admin and the API
call the same services, so a role is refused the same thing in both."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from rest_framework.test import APIClient

from diagnostics.models import Role, Status
from tests.factories import (
    CaseFactory,
    PredictionFactory,
    SiteFactory,
    UserFactory,
    slice_stored,
    token_for,
)
from tests.images import image_bytes

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("s3_bucket")]

ROLES = ["uploader", "radiologist", "site_admin", "superuser", "other_site_radiologist"]


@pytest.fixture
def case():
    case = CaseFactory(status=Status.DONE)
    # Its heatmap is rendered by whichever role views it first.
    prediction = PredictionFactory(image__case=case, with_heatmap=True)
    slice_stored(prediction.image)
    return case


@pytest.fixture
def users(case):
    site = case.site
    colleague = UserFactory(site=site, roles=[Role.RADIOLOGIST])
    return {
        "uploader": UserFactory(site=site, roles=[Role.UPLOADER]),
        "radiologist": UserFactory(site=site, roles=[Role.RADIOLOGIST]),
        "site_admin": UserFactory(site=site, roles=[Role.SITE_ADMIN]),
        # A superuser belongs to a site of its own and still reaches every site's cases.
        "superuser": UserFactory(site=SiteFactory(), roles=[], is_superuser=True, is_staff=True),
        "other_site_radiologist": UserFactory(site=SiteFactory(), roles=[Role.RADIOLOGIST]),
        "colleague": colleague,
    }


def api(user):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(user)}")
    return client


FORBIDDEN_REVIEW = {"detail": "your role does not allow you to review cases", "code": "forbidden"}
FORBIDDEN_ASSIGN = {"detail": "your role does not allow you to assign cases", "code": "forbidden"}
NOT_FOUND = {"detail": "case not found", "code": "not_found"}


def upload(user, case, users):
    jpeg = SimpleUploadedFile("a.jpg", image_bytes(), content_type="image/jpeg")
    return api(user).post("/api/v1/cases/", {"images": [jpeg]})


def read_review(user, case, users):
    return api(user).get(f"/api/v1/cases/{case.id}/review/")


def claim(user, case, users):
    return api(user).post(f"/api/v1/cases/{case.id}/claim/", {"version": 0}, format="json")


def assign(user, case, users):
    body = {"assignee": users["colleague"].username, "version": 0}
    return api(user).put(f"/api/v1/cases/{case.id}/assignment/", body, format="json")


def confirm(user, case, users):
    body = {"decision": "confirm", "version": 0}
    return api(user).post(f"/api/v1/cases/{case.id}/review/", body, format="json")


def override(user, case, users):
    body = {"decision": "override", "label": "pituitary", "reason": "sella mass", "version": 0}
    return api(user).post(f"/api/v1/cases/{case.id}/review/", body, format="json")


def read_heatmap(user, case, users):
    return api(user).get(f"/api/v1/images/{case.images.get().id}/heatmap/")


FORBIDDEN_UPLOAD = {"detail": "your role does not allow you to upload cases", "code": "forbidden"}

# operation -> role -> (status, exact body or None when the body is checked elsewhere)
API_MATRIX = {
    upload: {
        "uploader": (202, None),
        "radiologist": (403, FORBIDDEN_UPLOAD),
        "site_admin": (403, FORBIDDEN_UPLOAD),
        "superuser": (202, None),
        "other_site_radiologist": (403, FORBIDDEN_UPLOAD),
    },
    read_review: {
        "uploader": (200, None),
        "radiologist": (200, None),
        "site_admin": (200, None),
        "superuser": (200, None),
        "other_site_radiologist": (404, {"detail": "Not found."}),
    },
    read_heatmap: {
        "uploader": (200, None),
        "radiologist": (200, None),
        "site_admin": (200, None),
        "superuser": (200, None),
        "other_site_radiologist": (
            404,
            {
                "detail": "no heatmap: no such image at your site, or it has none",
                "code": "not_found",
            },
        ),
    },
    claim: {
        "uploader": (403, FORBIDDEN_REVIEW),
        "radiologist": (200, None),
        "site_admin": (403, FORBIDDEN_REVIEW),
        "superuser": (200, None),
        "other_site_radiologist": (404, NOT_FOUND),
    },
    assign: {
        "uploader": (403, FORBIDDEN_ASSIGN),
        "radiologist": (403, FORBIDDEN_ASSIGN),
        "site_admin": (200, None),
        "superuser": (200, None),
        "other_site_radiologist": (403, FORBIDDEN_ASSIGN),
    },
    confirm: {
        "uploader": (403, FORBIDDEN_REVIEW),
        "radiologist": (200, None),
        "site_admin": (403, FORBIDDEN_REVIEW),
        "superuser": (200, None),
        "other_site_radiologist": (404, NOT_FOUND),
    },
    override: {
        "uploader": (403, FORBIDDEN_REVIEW),
        "radiologist": (200, None),
        "site_admin": (403, FORBIDDEN_REVIEW),
        "superuser": (200, None),
        "other_site_radiologist": (404, NOT_FOUND),
    },
}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("operation", list(API_MATRIX), ids=lambda op: op.__name__)
def test_api_role_permissions(operation, role, case, users):
    expected_status, expected_body = API_MATRIX[operation][role]

    response = operation(users[role], case, users)

    assert response.status_code == expected_status, response.content
    if expected_body is not None:
        assert response.json() == expected_body
    case.refresh_from_db()
    changed = case.review_version != 0
    writes = operation in (claim, assign, confirm, override)
    assert changed == (writes and expected_status == 200)


def test_the_case_list_shows_each_user_only_their_sites_cases(case, users):
    seen = {
        role: {item["id"] for item in api(users[role]).get("/api/v1/cases/").json()["results"]}
        for role in ROLES
    }

    assert str(case.id) in seen["uploader"] & seen["radiologist"] & seen["site_admin"]
    assert str(case.id) in seen["superuser"]
    assert str(case.id) not in seen["other_site_radiologist"]


# --- Admin -------------------------------------------------------------------------------


def admin_get(user, url):
    client = Client()
    client.force_login(user)
    return client.get(url)


ADMIN_MATRIX = {
    # Uploaders are not staff: the admin sends them to its login page.
    "uploader": {"list": 302, "page": 302, "image": 302, "heatmap": 302, "audit": 302},
    "radiologist": {"list": 200, "page": 200, "image": 200, "heatmap": 200, "audit": 200},
    "site_admin": {"list": 200, "page": 200, "image": 200, "heatmap": 200, "audit": 200},
    "superuser": {"list": 200, "page": 200, "image": 200, "heatmap": 200, "audit": 200},
    # Another site's case page does not exist for them (a redirect with a message), and its
    # image and heatmap are not found.
    "other_site_radiologist": {
        "list": 200,
        "page": 302,
        "image": 404,
        "heatmap": 404,
        "audit": 200,
    },
}


@pytest.mark.parametrize("role", ROLES)
def test_admin_role_permissions(role, case, users, s3_bucket):
    image = case.images.get()
    urls = {
        "list": "/admin/diagnostics/case/",
        "page": f"/admin/diagnostics/case/{case.id}/change/",
        "image": f"/admin/diagnostics/case/{case.id}/images/{image.id}/",
        "heatmap": f"/admin/diagnostics/case/{case.id}/images/{image.id}/heatmap/",
        "audit": "/admin/diagnostics/auditevent/",
    }

    statuses = {name: admin_get(users[role], url).status_code for name, url in urls.items()}

    assert statuses == ADMIN_MATRIX[role]
    if statuses["list"] == 200:
        listed = str(case.id)[:8] in admin_get(users[role], urls["list"]).text
        assert listed == (role != "other_site_radiologist")


@pytest.mark.parametrize("role", ["uploader", "site_admin", "other_site_radiologist"])
def test_admin_review_form_is_refused_like_the_api(role, case, users):
    client = Client()
    client.force_login(users[role])
    users[role].is_staff = True  # even as staff, the role decides
    users[role].save()

    response = client.post(
        f"/admin/diagnostics/case/{case.id}/change/",
        {"action": "review", "decision": "confirm", "version": 0},
    )

    case.refresh_from_db()
    assert case.review_version == 0
    if role == "other_site_radiologist":
        assert response.status_code == 302  # "doesn't exist"
    elif role == "uploader":
        assert response.status_code == 403  # no view permission at all
    else:
        assert response.status_code == 403
        # The admin shows the service's message (capitalised).
        assert "Your role does not allow you to review cases" in response.text

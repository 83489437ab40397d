import pytest

from tests.factories import CaseFactory, PredictionFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(client):
    user = UserFactory(is_staff=True)
    client.force_login(user)
    return user


def test_staff_see_their_sites_cases_in_the_admin(client, staff):
    own = PredictionFactory(image__case=CaseFactory(uploaded_by=staff)).image.case
    other = CaseFactory()

    response = client.get("/admin/diagnostics/case/")

    assert response.status_code == 200
    assert str(own.id) in response.text
    assert str(other.id) not in response.text


def test_the_case_page_shows_each_image_with_its_prediction(client, staff):
    prediction = PredictionFactory(image__case=CaseFactory(uploaded_by=staff))

    response = client.get(f"/admin/diagnostics/case/{prediction.image.case_id}/change/")

    assert response.status_code == 200
    assert "glioma" in response.text
    assert "70.0%" in response.text
    assert "tiny-test 0" in response.text


def test_another_sites_case_page_is_not_reachable(client, staff):
    response = client.get(f"/admin/diagnostics/case/{CaseFactory().id}/change/", follow=True)
    assert "doesn’t exist" in response.text

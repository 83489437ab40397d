import threading

import pytest
from django.db import connection

from diagnostics import services
from diagnostics.models import Case, Image
from tests.factories import UserFactory
from tests.images import image_bytes

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("s3_bucket")]


def test_the_same_bytes_uploaded_again_return_the_existing_case(s3_keys):
    user = UserFactory()
    first, created = services.case_create(user=user, uploads=[("a.jpg", image_bytes(seed=1))])
    again, created_again = services.case_create(
        user=user, uploads=[("renamed.jpg", image_bytes(seed=1))]
    )

    assert (created, created_again) == (True, False)
    assert again.id == first.id
    assert Case.objects.count() == 1 and len(s3_keys()) == 1


def test_the_same_bytes_at_another_site_are_another_case():
    data = [("a.jpg", image_bytes(seed=1))]
    first, _ = services.case_create(user=UserFactory(), uploads=data)
    other, created = services.case_create(user=UserFactory(), uploads=data)
    assert created and other.id != first.id


def test_an_idempotency_key_returns_the_case_it_created():
    user = UserFactory()
    uploads = [("a.jpg", image_bytes(seed=1)), ("b.jpg", image_bytes(seed=2))]
    first, _ = services.case_create(user=user, uploads=uploads, idempotency_key="req-42")
    again, created = services.case_create(
        user=user, uploads=list(reversed(uploads)), idempotency_key="req-42"
    )
    assert not created and again.id == first.id


def test_an_idempotency_key_reused_for_other_images_is_refused(s3_keys):
    user = UserFactory()
    services.case_create(user=user, uploads=[("a.jpg", image_bytes(seed=1))], idempotency_key="k")
    with pytest.raises(services.IdempotencyKeyReused) as refused:
        services.case_create(
            user=user, uploads=[("b.jpg", image_bytes(seed=2))], idempotency_key="k"
        )
    assert refused.value.detail == "this Idempotency-Key was already used for a different upload"
    assert len(s3_keys()) == 1


@pytest.mark.django_db(transaction=True)
def test_two_identical_uploads_at_once_make_one_case(s3_keys):
    user = UserFactory()
    uploads = [("a.jpg", image_bytes(seed=3))]
    start = threading.Barrier(2)
    results = []

    def upload():
        try:
            start.wait()
            results.append(services.case_create(user=user, uploads=uploads))
        finally:
            connection.close()

    threads = [threading.Thread(target=upload) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len({case.id for case, _ in results}) == 1
    assert sorted(created for _, created in results) == [False, True]
    assert Case.objects.count() == 1 and Image.objects.count() == 1
    # The loser's object was deleted again: one object, owned by the one row.
    assert s3_keys() == [Image.objects.get().s3_key]

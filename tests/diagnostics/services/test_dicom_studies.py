"""One DICOM study is one case, also when two uploads of a new study arrive at once."""

import threading

import pytest
from django.db import connection

from diagnostics import services, storage
from diagnostics.models import Case, Image
from tests.dicoms import UID_ROOT, mr_slice, to_bytes
from tests.factories import UserFactory

pytestmark = pytest.mark.usefixtures("s3_bucket")


@pytest.mark.django_db(transaction=True)
def test_two_uploads_of_a_new_study_at_once_make_one_case(s3_keys, monkeypatch):
    user = UserFactory()
    study = f"{UID_ROOT}90210"
    # Both requests have looked for the study's case (none yet) before either stores a byte:
    # the first insert wins, the second hits the unique study and joins its case.
    both_looked = threading.Barrier(2, timeout=30)
    put = storage.put
    waited = threading.local()

    def put_after_both_looked(*args, **kwargs):
        if not getattr(waited, "done", False):
            waited.done = True
            both_looked.wait()
        return put(*args, **kwargs)

    monkeypatch.setattr(storage, "put", put_after_both_looked)
    results = []

    def upload(seed):
        try:
            data = to_bytes(mr_slice(study_uid=study, seed=seed))
            results.append(services.case_create(user=user, uploads=[(f"{seed}.dcm", data)]))
        finally:
            connection.close()

    threads = [threading.Thread(target=upload, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(results) == 2
    assert len({case.id for case, _ in results}) == 1
    assert [created for _, created in results] == [True, True]  # both added a slice
    case = Case.objects.get()
    assert sorted(case.images.values_list("position", flat=True)) == [0, 1]
    # The loser's objects were written under its own case id, deleted, and written again.
    images = Image.objects.all()
    assert s3_keys() == sorted(
        [image.s3_key for image in images] + [image.rendering_key for image in images]
    )

import hashlib
import uuid

import factory
from django.contrib.auth import get_user_model
from rest_framework.authtoken.models import Token

from diagnostics import services, storage
from diagnostics.models import (
    Case,
    Image,
    Prediction,
    Role,
    Site,
    SiteMembership,
    Status,
    Webhook,
)
from tests.images import image_bytes


class SiteFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Site

    name = factory.Sequence(lambda n: f"Hospital {n}")


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")

    @factory.post_generation
    def site(user, create, extracted, **kwargs):
        if create:
            SiteMembership.objects.create(user=user, site=extracted or SiteFactory())

    @factory.post_generation
    def roles(user, create, extracted, **kwargs):
        # An uploader unless the test names other roles (roles=[] for none).
        if create:
            services.user_roles_set(
                user=user, roles=[Role.UPLOADER] if extracted is None else extracted
            )


class RadiologistFactory(UserFactory):
    @factory.post_generation
    def roles(user, create, extracted, **kwargs):
        if create:
            services.user_roles_set(user=user, roles=extracted or [Role.RADIOLOGIST])


class SiteAdminFactory(UserFactory):
    @factory.post_generation
    def roles(user, create, extracted, **kwargs):
        if create:
            services.user_roles_set(user=user, roles=extracted or [Role.SITE_ADMIN])


def token_for(user) -> str:
    return Token.objects.get_or_create(user=user)[0].key


class CaseFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Case

    uploaded_by = factory.SubFactory(UserFactory)
    site = factory.LazyAttribute(lambda case: case.uploaded_by.site_membership.site)


class ImageFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Image

    id = factory.LazyFunction(uuid.uuid4)
    case = factory.SubFactory(CaseFactory)
    position = factory.Sequence(lambda n: n)
    s3_key = factory.LazyAttribute(lambda image: f"scans/{image.case.id}/{image.id}")
    sha256 = factory.Sequence(lambda n: hashlib.sha256(str(n).encode()).hexdigest())
    size_bytes = 1000
    content_type = "image/jpeg"
    width = 64
    height = 64
    status = Status.QUEUED


def slice_stored(image, data: bytes | None = None) -> bytes:
    """Write `image`'s bytes to S3 under its key, as an upload leaves them (the factories
    write rows only); returns them."""
    data = image_bytes() if data is None else data
    storage.put(image.s3_key, data, content_type=image.content_type, sha256=image.sha256)
    return data


class PredictionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Prediction

    image = factory.SubFactory(ImageFactory, status=Status.DONE)
    label = "glioma"
    probabilities = {"glioma": 0.7, "meningioma": 0.1, "no_tumor": 0.1, "pituitary": 0.1}
    model_name = "tiny-test"
    model_version = "0"
    model_sha256 = "0" * 64
    runtime = "keras"
    inference_ms = 5.0
    turnaround_ms = 50.0

    class Params:
        # A prediction with a class activation map, as a worker records it: the overlay is
        # not rendered yet (no `heatmap_key`). Tests that fetch it store the slice it is
        # drawn over with `slice_stored`.
        with_heatmap = factory.Trait(
            heatmap=factory.LazyFunction(
                lambda: [[round((r + c) / 12, 4) for c in range(7)] for r in range(7)]
            ),
            ood_score=812.5,
        )


class RejectedImageFactory(ImageFactory):
    """A slice the model refused to read: not a brain MRI slice (no prediction)."""

    status = Status.REJECTED
    error = "not a brain MRI slice: the image is blank (almost a single grey level)"
    ood_score = 9120.0


class WebhookFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Webhook

    site = factory.SubFactory(SiteFactory)
    url = "http://127.0.0.1:9/hooks"
    secret = factory.Sequence(lambda n: f"{n:064x}")
    events = factory.LazyFunction(list)

from django.urls import reverse
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from diagnostics.dicom import CONTENT_TYPE as DICOM_CONTENT_TYPE
from diagnostics.models import Case, Image, Label, Prediction, Review, Status


class CaseCreateInput(serializers.Serializer):
    reference = serializers.CharField(max_length=128, required=False, allow_blank=True, default="")


class CaseListFilter(serializers.Serializer):
    status = serializers.ChoiceField(choices=Status.choices, required=False)


class ModelOutput(serializers.Serializer):
    """Which model made a prediction (only the OpenAPI schema uses this)."""

    name = serializers.CharField()
    version = serializers.CharField()
    sha256 = serializers.CharField()
    runtime = serializers.CharField()


class PredictionOutput(serializers.ModelSerializer):
    model = serializers.SerializerMethodField()
    # Where the heatmap overlay (PNG) of this prediction can be fetched; null when it has no
    # map. Set as soon as there is a map: the overlay is rendered on its first fetch.
    heatmap_url = serializers.SerializerMethodField()

    class Meta:
        model = Prediction
        fields = [
            "label",
            "probabilities",
            "needs_review",
            "ood_score",
            "heatmap_url",
            "model",
            "inference_ms",
            "turnaround_ms",
            "created_at",
        ]
        extra_kwargs = {
            "needs_review": {
                "help_text": "the calibrated top probability is below the model's review "
                "threshold (chosen on validation): a radiologist should look carefully"
            },
            "ood_score": {
                "help_text": "out-of-distribution score (squared Mahalanobis distance of the "
                "image's features to the nearest class; higher is less like the training "
                "data); null for models without an OOD detector"
            },
        }

    @extend_schema_field(ModelOutput)
    def get_model(self, prediction):
        return {
            "name": prediction.model_name,
            "version": prediction.model_version,
            "sha256": prediction.model_sha256,
            "runtime": prediction.runtime,
        }

    @extend_schema_field(serializers.URLField(allow_null=True))
    def get_heatmap_url(self, prediction) -> str | None:
        if prediction.heatmap is None:
            return None
        path = reverse("image-heatmap", kwargs={"image_id": prediction.image_id})
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request is not None else path


class ImageOutput(serializers.ModelSerializer):
    prediction = serializers.SerializerMethodField()
    ood_score = serializers.SerializerMethodField(
        help_text="the model's out-of-distribution score (higher is less like its training "
        "data), for rejected images too; null before classification"
    )
    # "dicom": a de-identified DICOM slice (with pseudonymous series and instance UIDs);
    # "image": any other accepted image.
    format = serializers.SerializerMethodField()

    class Meta:
        model = Image
        extra_kwargs = {
            "status": {
                "help_text": "done: it has a prediction; failed: it could not be read; "
                "rejected: not a brain MRI slice or unlike the model's training data (no "
                "label is given; `error` says why)"
            },
            "error": {"help_text": "why the image failed or was rejected"},
        }
        fields = [
            "id",
            "position",
            "original_name",
            "format",
            "content_type",
            "size_bytes",
            "width",
            "height",
            "sha256",
            "series_uid",
            "instance_uid",
            "status",
            "attempts",
            "error",
            "ood_score",
            "received_at",
            "queued_at",
            "processing_started_at",
            "finished_at",
            "prediction",
        ]

    @extend_schema_field(serializers.ChoiceField(choices=["dicom", "image"]))
    def get_format(self, image) -> str:
        return "dicom" if image.content_type == DICOM_CONTENT_TYPE else "image"

    @extend_schema_field(serializers.FloatField(allow_null=True))
    def get_ood_score(self, image) -> float | None:
        # Rejected images have it on the image (no prediction); others on the prediction.
        if image.ood_score is not None:
            return image.ood_score
        prediction = getattr(image, "prediction", None)
        return prediction.ood_score if prediction is not None else None

    @extend_schema_field(PredictionOutput(allow_null=True))
    def get_prediction(self, image):
        prediction = getattr(image, "prediction", None)
        return PredictionOutput(prediction, context=self.context).data if prediction else None


class CaseReviewStateOutput(serializers.ModelSerializer):
    status = serializers.CharField(source="review_status")
    label = serializers.CharField(source="review_label")
    assigned_to = serializers.CharField(
        source="assigned_to.username", default=None, allow_null=True
    )
    version = serializers.IntegerField(source="review_version")

    class Meta:
        model = Case
        fields = ["status", "label", "assigned_to", "version", "reviewed_at"]


class CaseOutput(serializers.ModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name="case-detail", lookup_url_kwarg="case_id")
    images = ImageOutput(many=True)
    # The radiologist's reading; details and actions at /cases/{id}/review/.
    review = CaseReviewStateOutput(source="*", read_only=True)

    class Meta:
        model = Case
        fields = [
            "id",
            "url",
            "reference",
            "study_uid",
            "status",
            "created_at",
            "updated_at",
            "completed_at",
            "images",
            "review",
        ]


# --- Review ----------------------------------------------------------------------------------


class ReviewInput(serializers.Serializer):
    decision = serializers.ChoiceField(choices=Review.Decision.choices)
    label = serializers.ChoiceField(choices=Label.choices, required=False, allow_null=True)
    reason = serializers.CharField(required=False, allow_blank=True, default="", max_length=5000)
    request_second_read = serializers.BooleanField(required=False, default=False)
    version = serializers.IntegerField(min_value=0)


class VersionInput(serializers.Serializer):
    version = serializers.IntegerField(min_value=0)


class AssignmentInput(serializers.Serializer):
    assignee = serializers.CharField(allow_null=True, max_length=150)
    version = serializers.IntegerField(min_value=0)


class ReadingOutput(serializers.ModelSerializer):
    reader = serializers.CharField(source="reader.username")

    class Meta:
        model = Review
        fields = [
            "reader",
            "decision",
            "label",
            "model_label",
            "reason",
            "is_second_read",
            "created_at",
        ]


class ReviewOutput(serializers.ModelSerializer):
    """The case's review state; `version` is what the next review call must send back."""

    case = serializers.UUIDField(source="id")
    status = serializers.CharField(source="review_status")
    label = serializers.CharField(source="review_label")
    model_label = serializers.CharField(source="predicted_label", allow_null=True)
    model_confidence = serializers.FloatField(source="predicted_confidence", allow_null=True)
    needs_review = serializers.BooleanField()
    assigned_to = serializers.CharField(
        source="assigned_to.username", default=None, allow_null=True
    )
    version = serializers.IntegerField(source="review_version")
    readings = ReadingOutput(source="reviews", many=True)

    class Meta:
        model = Case
        fields = [
            "case",
            "status",
            "label",
            "model_label",
            "model_confidence",
            "needs_review",
            "assigned_to",
            "version",
            "reviewed_at",
            "readings",
        ]

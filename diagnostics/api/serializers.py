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

    class Meta:
        model = Prediction
        fields = ["label", "probabilities", "model", "inference_ms", "turnaround_ms", "created_at"]

    @extend_schema_field(ModelOutput)
    def get_model(self, prediction):
        return {
            "name": prediction.model_name,
            "version": prediction.model_version,
            "sha256": prediction.model_sha256,
            "runtime": prediction.runtime,
        }


class ImageOutput(serializers.ModelSerializer):
    prediction = serializers.SerializerMethodField()
    # "dicom": a de-identified DICOM slice (with pseudonymous series and instance UIDs);
    # "image": any other accepted image.
    format = serializers.SerializerMethodField()

    class Meta:
        model = Image
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
            "received_at",
            "queued_at",
            "processing_started_at",
            "finished_at",
            "prediction",
        ]

    @extend_schema_field(serializers.ChoiceField(choices=["dicom", "image"]))
    def get_format(self, image) -> str:
        return "dicom" if image.content_type == DICOM_CONTENT_TYPE else "image"

    @extend_schema_field(PredictionOutput(allow_null=True))
    def get_prediction(self, image):
        prediction = getattr(image, "prediction", None)
        return PredictionOutput(prediction).data if prediction else None


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

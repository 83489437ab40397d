from rest_framework import serializers

from diagnostics.models import Case, Image, Prediction, Status


class CaseCreateInput(serializers.Serializer):
    reference = serializers.CharField(max_length=128, required=False, allow_blank=True, default="")


class CaseListFilter(serializers.Serializer):
    status = serializers.ChoiceField(choices=Status.choices, required=False)


class PredictionOutput(serializers.ModelSerializer):
    model = serializers.SerializerMethodField()

    class Meta:
        model = Prediction
        fields = ["label", "probabilities", "model", "inference_ms", "turnaround_ms", "created_at"]

    def get_model(self, prediction):
        return {
            "name": prediction.model_name,
            "version": prediction.model_version,
            "sha256": prediction.model_sha256,
            "runtime": prediction.runtime,
        }


class ImageOutput(serializers.ModelSerializer):
    prediction = serializers.SerializerMethodField()

    class Meta:
        model = Image
        fields = [
            "id",
            "position",
            "original_name",
            "content_type",
            "size_bytes",
            "width",
            "height",
            "sha256",
            "status",
            "attempts",
            "error",
            "received_at",
            "queued_at",
            "processing_started_at",
            "finished_at",
            "prediction",
        ]

    def get_prediction(self, image):
        prediction = getattr(image, "prediction", None)
        return PredictionOutput(prediction).data if prediction else None


class CaseOutput(serializers.ModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name="case-detail", lookup_url_kwarg="case_id")
    images = ImageOutput(many=True)

    class Meta:
        model = Case
        fields = [
            "id",
            "url",
            "reference",
            "status",
            "created_at",
            "updated_at",
            "completed_at",
            "images",
        ]

"""The OpenAPI description of the case and review views (drf-spectacular).

Kept beside the views rather than on them: the views stay plain and thin, and what the
schema promises (every status code and body) is in one place, checked against the live
server by schemathesis (tests/e2e/test_schemathesis.py). drf-spectacular finds these
extensions because diagnostics/api/urls.py imports this module.
"""

from drf_spectacular.extensions import OpenApiViewExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers

from diagnostics.api.serializers import (
    AssignmentInput,
    CaseOutput,
    ReviewInput,
    ReviewOutput,
    VersionInput,
)
from diagnostics.models import Status


class ErrorOutput(serializers.Serializer):
    detail = serializers.CharField(help_text="what went wrong, for a person")
    code = serializers.CharField(
        required=False, help_text="a stable machine-readable code, e.g. invalid_image, conflict"
    )


# DRF answers invalid input either with {"detail", "code"} or with the fields' errors.
VALIDATION_ERROR = OpenApiResponse(
    response={
        "type": "object",
        "additionalProperties": True,
        "description": '{"detail", "code"}, or {"<field>": ["<error>", ...]}',
    },
    description="invalid input",
)


def errors(*codes: int) -> dict:
    described = {
        400: VALIDATION_ERROR,
        401: OpenApiResponse(ErrorOutput, description="no or invalid token"),
        403: OpenApiResponse(ErrorOutput, description="your role does not allow this"),
        404: OpenApiResponse(ErrorOutput, description="no such case at your site"),
        409: OpenApiResponse(
            ErrorOutput, description="the review changed since you read it, or is not open"
        ),
        413: OpenApiResponse(ErrorOutput, description="a file or the request is too large"),
        422: OpenApiResponse(ErrorOutput, description="Idempotency-Key reused for other images"),
        503: OpenApiResponse(ErrorOutput, description="database or storage unavailable; retry"),
    }
    return {code: described[code] for code in (*codes, 401, 503)}


class CasePageOutput(serializers.Serializer):
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    results = CaseOutput(many=True)


UPLOAD_REQUEST = {
    "multipart/form-data": {
        "type": "object",
        "properties": {
            "images": {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "description": "one or more slices of the study (JPEG, PNG, ...)",
            },
            "reference": {
                "type": "string",
                "maxLength": 128,
                "description": "pseudonymous study reference; never a patient identifier",
            },
        },
        "required": ["images"],
    }
}


class CaseListCreateSchema(OpenApiViewExtension):
    target_class = "diagnostics.api.views.CaseListCreateApi"

    def view_replacement(self):
        class Described(self.target_class):
            @extend_schema(
                operation_id="cases_create",
                summary="Upload the slices of a study",
                request=UPLOAD_REQUEST,
                parameters=[
                    OpenApiParameter(
                        "Idempotency-Key",
                        OpenApiTypes.STR,
                        OpenApiParameter.HEADER,
                        description="repeat an upload safely: the same key returns the same case",
                    )
                ],
                responses={
                    202: OpenApiResponse(CaseOutput, description="accepted; poll its url"),
                    200: OpenApiResponse(CaseOutput, description="seen before: the existing case"),
                    **errors(400, 403, 413, 422),
                },
            )
            def post(self, request):
                return super().post(request)

            @extend_schema(
                operation_id="cases_list",
                summary="Your site's cases, newest first",
                parameters=[
                    OpenApiParameter("status", OpenApiTypes.STR, enum=Status.values),
                    OpenApiParameter("page_size", OpenApiTypes.INT, description="at most 200"),
                    OpenApiParameter("cursor", OpenApiTypes.STR, description="from next/previous"),
                ],
                responses={200: CasePageOutput, **errors(400, 404)},
            )
            def get(self, request):
                return super().get(request)

        return Described


class CaseDetailSchema(OpenApiViewExtension):
    target_class = "diagnostics.api.views.CaseDetailApi"

    def view_replacement(self):
        class Described(self.target_class):
            @extend_schema(
                operation_id="cases_retrieve",
                summary="A case with every image's status and prediction",
                responses={200: CaseOutput, **errors(404)},
            )
            def get(self, request, case_id):
                return super().get(request, case_id)

        return Described


REVIEW_ERRORS = errors(400, 403, 404, 409)


class CaseReviewSchema(OpenApiViewExtension):
    target_class = "diagnostics.api.reviews.CaseReviewApi"

    def view_replacement(self):
        class Described(self.target_class):
            @extend_schema(
                operation_id="cases_review_retrieve",
                summary="The case's review state and readings",
                responses={200: ReviewOutput, **errors(404)},
            )
            def get(self, request, case_id):
                return super().get(request, case_id)

            @extend_schema(
                operation_id="cases_review_create",
                summary="Record a reading: confirm the model, or override it",
                request=ReviewInput,
                responses={200: ReviewOutput, **REVIEW_ERRORS},
            )
            def post(self, request, case_id):
                return super().post(request, case_id)

        return Described


class CaseClaimSchema(OpenApiViewExtension):
    target_class = "diagnostics.api.reviews.CaseClaimApi"

    def view_replacement(self):
        class Described(self.target_class):
            @extend_schema(
                operation_id="cases_claim",
                summary="Assign the case to yourself",
                request=VersionInput,
                responses={200: ReviewOutput, **REVIEW_ERRORS},
            )
            def post(self, request, case_id):
                return super().post(request, case_id)

        return Described


class CaseReleaseSchema(OpenApiViewExtension):
    target_class = "diagnostics.api.reviews.CaseReleaseApi"

    def view_replacement(self):
        class Described(self.target_class):
            @extend_schema(
                operation_id="cases_release",
                summary="Give a claimed case back",
                request=VersionInput,
                responses={200: ReviewOutput, **REVIEW_ERRORS},
            )
            def post(self, request, case_id):
                return super().post(request, case_id)

        return Described


class CaseAssignmentSchema(OpenApiViewExtension):
    target_class = "diagnostics.api.reviews.CaseAssignmentApi"

    def view_replacement(self):
        class Described(self.target_class):
            @extend_schema(
                operation_id="cases_assign",
                summary="Assign the case to a radiologist of its site (site admins)",
                request=AssignmentInput,
                responses={200: ReviewOutput, **REVIEW_ERRORS},
            )
            def put(self, request, case_id):
                return super().put(request, case_id)

        return Described


class ImageHeatmapSchema(OpenApiViewExtension):
    target_class = "diagnostics.api.views.ImageHeatmapApi"

    def view_replacement(self):
        class Described(self.target_class):
            @extend_schema(
                operation_id="images_heatmap_retrieve",
                summary="An image's heatmap: where the model saw the evidence for its label",
                description=(
                    "The class activation map of the predicted label over the slice as the "
                    "model saw it (224x224 PNG); its URL is the prediction's `heatmap_url`. "
                    "Rendered on its first fetch and kept in object storage for later ones; "
                    "503 when object storage is unavailable."
                ),
                responses={
                    (200, "image/png"): OpenApiResponse(
                        OpenApiTypes.BINARY, description="the overlay (PNG)"
                    ),
                    404: OpenApiResponse(
                        ErrorOutput,
                        description="no such image at your site, or it has no heatmap",
                    ),
                    **errors(),
                },
            )
            def get(self, request, image_id):
                return super().get(request, image_id)

        return Described

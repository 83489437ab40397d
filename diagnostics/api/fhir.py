"""GET /api/v1/cases/{id}/fhir/: a reviewed case as a FHIR R4 Bundle (diagnostics.fhir)."""

import json

from django.http import Http404
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from diagnostics import fhir, selectors
from diagnostics.api.schema import ErrorOutput, errors


class FhirJSONRenderer(JSONRenderer):
    media_type = fhir.FHIR_CONTENT_TYPE
    format = "fhir"


class CaseFhirApi(APIView):
    # FHIR's own media type first; plain JSON for clients that ask for it.
    renderer_classes = [FhirJSONRenderer, JSONRenderer]

    @extend_schema(
        operation_id="cases_fhir_retrieve",
        summary="The reviewed case as a FHIR R4 Bundle: DiagnosticReport, Observations, Device",
        responses={
            200: OpenApiResponse(
                {"type": "object", "description": "a FHIR R4 Bundle of type collection"},
                description="the report",
            ),
            **errors(404),
            409: OpenApiResponse(ErrorOutput, description="the case has no final reading yet"),
        },
    )
    def get(self, request, case_id):
        case = selectors.case_review_get(user=request.user, case_id=case_id)
        if case is None:
            raise Http404
        bundle = fhir.case_report_bundle(case)
        # The library's JSON is the FHIR serialisation (no nulls, FHIR date formats).
        return Response(json.loads(bundle.model_dump_json()))

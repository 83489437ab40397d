from django.http import JsonResponse
from django.urls import path, re_path
from django.views.decorators.csrf import csrf_exempt

# Registers the OpenAPI description of the views below with drf-spectacular.
from diagnostics.api import schema  # noqa: F401
from diagnostics.api.fhir import CaseFhirApi
from diagnostics.api.reviews import (
    CaseAssignmentApi,
    CaseClaimApi,
    CaseReleaseApi,
    CaseReviewApi,
)
from diagnostics.api.views import CaseDetailApi, CaseListCreateApi, ImageHeatmapApi
from diagnostics.api.webhooks import WebhookDeliveryListApi, WebhookDetailApi, WebhookListCreateApi


@csrf_exempt  # like the API's own views: a 404 must not turn into an HTML CSRF 403
def api_not_found(request, *args, **kwargs):
    return JsonResponse({"detail": "Not found.", "code": "not_found"}, status=404)


urlpatterns = [
    path("cases/", CaseListCreateApi.as_view(), name="case-list"),
    path("cases/<uuid:case_id>/", CaseDetailApi.as_view(), name="case-detail"),
    path("cases/<uuid:case_id>/review/", CaseReviewApi.as_view(), name="case-review"),
    path("cases/<uuid:case_id>/claim/", CaseClaimApi.as_view(), name="case-claim"),
    path("cases/<uuid:case_id>/release/", CaseReleaseApi.as_view(), name="case-release"),
    path("cases/<uuid:case_id>/assignment/", CaseAssignmentApi.as_view(), name="case-assignment"),
    path("cases/<uuid:case_id>/fhir/", CaseFhirApi.as_view(), name="case-fhir"),
    path("images/<uuid:image_id>/heatmap/", ImageHeatmapApi.as_view(), name="image-heatmap"),
    path("webhooks/", WebhookListCreateApi.as_view(), name="webhook-list"),
    path("webhooks/<int:webhook_id>/", WebhookDetailApi.as_view(), name="webhook-detail"),
    path(
        "webhooks/<int:webhook_id>/deliveries/",
        WebhookDeliveryListApi.as_view(),
        name="webhook-deliveries",
    ),
    # Anything else under /api/v1/ (a malformed id, a typo) is a JSON 404 like the rest of
    # the API, not Django's HTML page (found by schemathesis).
    re_path(r"", api_not_found),
]

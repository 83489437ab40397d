from django.urls import path

# Registers the OpenAPI description of the views below with drf-spectacular.
from diagnostics.api import schema  # noqa: F401
from diagnostics.api.reviews import (
    CaseAssignmentApi,
    CaseClaimApi,
    CaseReleaseApi,
    CaseReviewApi,
)
from diagnostics.api.views import CaseDetailApi, CaseListCreateApi
from diagnostics.api.webhooks import WebhookDeliveryListApi, WebhookDetailApi, WebhookListCreateApi

urlpatterns = [
    path("cases/", CaseListCreateApi.as_view(), name="case-list"),
    path("cases/<uuid:case_id>/", CaseDetailApi.as_view(), name="case-detail"),
    path("cases/<uuid:case_id>/review/", CaseReviewApi.as_view(), name="case-review"),
    path("cases/<uuid:case_id>/claim/", CaseClaimApi.as_view(), name="case-claim"),
    path("cases/<uuid:case_id>/release/", CaseReleaseApi.as_view(), name="case-release"),
    path("cases/<uuid:case_id>/assignment/", CaseAssignmentApi.as_view(), name="case-assignment"),
    path("webhooks/", WebhookListCreateApi.as_view(), name="webhook-list"),
    path("webhooks/<int:webhook_id>/", WebhookDetailApi.as_view(), name="webhook-detail"),
    path(
        "webhooks/<int:webhook_id>/deliveries/",
        WebhookDeliveryListApi.as_view(),
        name="webhook-deliveries",
    ),
]

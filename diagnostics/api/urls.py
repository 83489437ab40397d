from django.urls import path

from diagnostics.api.reviews import (
    CaseAssignmentApi,
    CaseClaimApi,
    CaseReleaseApi,
    CaseReviewApi,
)
from diagnostics.api.views import CaseDetailApi, CaseListCreateApi

urlpatterns = [
    path("cases/", CaseListCreateApi.as_view(), name="case-list"),
    path("cases/<uuid:case_id>/", CaseDetailApi.as_view(), name="case-detail"),
    path("cases/<uuid:case_id>/review/", CaseReviewApi.as_view(), name="case-review"),
    path("cases/<uuid:case_id>/claim/", CaseClaimApi.as_view(), name="case-claim"),
    path("cases/<uuid:case_id>/release/", CaseReleaseApi.as_view(), name="case-release"),
    path("cases/<uuid:case_id>/assignment/", CaseAssignmentApi.as_view(), name="case-assignment"),
]

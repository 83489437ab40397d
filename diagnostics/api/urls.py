from django.urls import path

from diagnostics.api.views import CaseDetailApi, CaseListCreateApi

urlpatterns = [
    path("cases/", CaseListCreateApi.as_view(), name="case-list"),
    path("cases/<uuid:case_id>/", CaseDetailApi.as_view(), name="case-detail"),
]

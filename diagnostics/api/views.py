from django.http import Http404
from rest_framework import status
from rest_framework.pagination import CursorPagination
from rest_framework.response import Response
from rest_framework.views import APIView

from diagnostics import selectors, services
from diagnostics.api.serializers import CaseCreateInput, CaseListFilter, CaseOutput
from diagnostics.uploads import read_upload


class CasePagination(CursorPagination):
    # A cursor needs no COUNT(*) and stays fast however many cases a site has.
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 200
    ordering = "-created_at"


class CaseListCreateApi(APIView):
    def post(self, request):
        data = CaseCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        uploads = [read_upload(upload) for upload in request.FILES.getlist("images")]
        case, created = services.case_create(
            user=request.user,
            uploads=uploads,
            reference=data.validated_data["reference"],
            idempotency_key=request.headers.get("Idempotency-Key", "")[:255],
        )
        case = selectors.case_get(user=request.user, case_id=case.id)
        body = CaseOutput(case, context={"request": request}).data
        # 202: accepted for processing; 200: this upload was seen before, here is its case.
        return Response(
            body,
            status=status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK,
            headers={"Location": str(body["url"])},
        )

    def get(self, request):
        filters = CaseListFilter(data=request.query_params)
        filters.is_valid(raise_exception=True)
        cases = selectors.case_list(user=request.user, **filters.validated_data)
        paginator = CasePagination()
        page = paginator.paginate_queryset(cases, request, view=self)
        return paginator.get_paginated_response(
            CaseOutput(page, many=True, context={"request": request}).data
        )


class CaseDetailApi(APIView):
    def get(self, request, case_id):
        case = selectors.case_get(user=request.user, case_id=case_id)
        if case is None:
            raise Http404
        return Response(CaseOutput(case, context={"request": request}).data)

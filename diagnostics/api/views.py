from django.conf import settings
from django.http import Http404, HttpResponse
from rest_framework import status
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.pagination import CursorPagination
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from diagnostics import selectors, services, storage
from diagnostics.api.serializers import CaseCreateInput, CaseListFilter, CaseOutput
from diagnostics.errors import NotFound, ServiceUnavailable
from diagnostics.services.heatmaps import HEATMAP_CONTENT_TYPE
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


class JsonErrorsNegotiation(BaseContentNegotiation):
    """The PNG goes out as it is; everything else (errors) is JSON, whatever Accept says
    (an <img> asks for image/*, and must not get a 406 instead of the 404)."""

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class ImageHeatmapApi(APIView):
    """An image's heatmap overlay (PNG), served through the app (the bucket stays private)
    after the same site check as its case: rendered on first view, then read from S3."""

    renderer_classes = [JSONRenderer]
    content_negotiation_class = JsonErrorsNegotiation

    def get(self, request, image_id):
        try:
            png = services.image_heatmap_png(user=request.user, image_id=image_id)
        except storage.StorageUnavailable as exc:
            raise ServiceUnavailable("object storage is unavailable, retry later") from exc
        if png is None:
            # The same answer for another site's image as for one with no heatmap.
            raise NotFound("no heatmap: no such image at your site, or it has none")
        response = HttpResponse(png, content_type=HEATMAP_CONTENT_TYPE)
        response["Cache-Control"] = f"private, max-age={settings.REVIEW_IMAGE_CACHE_S}"
        response["X-Content-Type-Options"] = "nosniff"
        return response

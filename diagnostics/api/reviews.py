"""The radiologist's review over the API: the same service functions the admin calls."""

from django.http import Http404
from rest_framework.response import Response
from rest_framework.views import APIView

from diagnostics import selectors, services
from diagnostics.api.serializers import AssignmentInput, ReviewInput, ReviewOutput, VersionInput


def _review_state(request, case_id) -> Response:
    case = selectors.case_review_get(user=request.user, case_id=case_id)
    if case is None:
        raise Http404
    return Response(ReviewOutput(case).data)


class CaseReviewApi(APIView):
    def get(self, request, case_id):
        return _review_state(request, case_id)

    def post(self, request, case_id):
        data = ReviewInput(data=request.data)
        data.is_valid(raise_exception=True)
        services.case_review(user=request.user, case_id=case_id, **data.validated_data)
        return _review_state(request, case_id)


class CaseClaimApi(APIView):
    def post(self, request, case_id):
        data = VersionInput(data=request.data)
        data.is_valid(raise_exception=True)
        services.case_claim(user=request.user, case_id=case_id, **data.validated_data)
        return _review_state(request, case_id)


class CaseReleaseApi(APIView):
    def post(self, request, case_id):
        data = VersionInput(data=request.data)
        data.is_valid(raise_exception=True)
        services.case_release(user=request.user, case_id=case_id, **data.validated_data)
        return _review_state(request, case_id)


class CaseAssignmentApi(APIView):
    def put(self, request, case_id):
        data = AssignmentInput(data=request.data)
        data.is_valid(raise_exception=True)
        services.case_assign(
            user=request.user,
            case_id=case_id,
            version=data.validated_data["version"],
            assignee_username=data.validated_data["assignee"],
        )
        return _review_state(request, case_id)

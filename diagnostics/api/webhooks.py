"""Webhooks over the API: site admins register receivers and watch deliveries."""

from django.http import Http404
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import PermissionDenied
from rest_framework.response import Response
from rest_framework.views import APIView

from diagnostics import selectors, services
from diagnostics.api.schema import errors
from diagnostics.models import Webhook, WebhookDelivery, WebhookEvent

# Most recent deliveries one request lists.
DELIVERIES_SHOWN = 100


class WebhookInput(serializers.Serializer):
    url = serializers.CharField(max_length=500, help_text="http(s) URL that receives the POSTs")
    events = serializers.ListField(
        child=serializers.ChoiceField(choices=WebhookEvent.choices),
        required=False,
        default=list,
        help_text="events to send; empty or absent means every event",
    )


class WebhookOutput(serializers.ModelSerializer):
    events = serializers.ListField(child=serializers.ChoiceField(choices=WebhookEvent.choices))

    class Meta:
        model = Webhook
        fields = ["id", "url", "events", "is_active", "created_at"]


class WebhookCreatedOutput(WebhookOutput):
    secret = serializers.CharField(
        help_text="signs every delivery (HMAC-SHA256); shown only in this response"
    )

    class Meta(WebhookOutput.Meta):
        fields = [*WebhookOutput.Meta.fields, "secret"]


class WebhookDeliveryOutput(serializers.ModelSerializer):
    class Meta:
        model = WebhookDelivery
        fields = [
            "id",
            "event",
            "case_id",
            "status",
            "attempts",
            "response_status",
            "last_error",
            "created_at",
            "last_attempt_at",
            "delivered_at",
        ]


def _visible_webhooks(user):
    if not user.has_perm("diagnostics.view_webhook"):
        raise PermissionDenied("your role does not allow you to see webhooks")
    return selectors.webhooks_visible_to(user)


def _webhook_or_404(user, webhook_id) -> Webhook:
    webhook = _visible_webhooks(user).filter(id=webhook_id).first()
    if webhook is None:
        raise Http404
    return webhook


class WebhookListCreateApi(APIView):
    @extend_schema(
        operation_id="webhooks_list",
        summary="Your site's webhooks",
        responses={200: WebhookOutput(many=True), **errors(403)},
    )
    def get(self, request):
        return Response(WebhookOutput(_visible_webhooks(request.user), many=True).data)

    @extend_schema(
        operation_id="webhooks_create",
        summary="Register a webhook; the response shows its signing secret, once",
        request=WebhookInput,
        responses={201: WebhookCreatedOutput, **errors(400, 403)},
    )
    def post(self, request):
        data = WebhookInput(data=request.data)
        data.is_valid(raise_exception=True)
        webhook = services.webhook_create(user=request.user, **data.validated_data)
        return Response(WebhookCreatedOutput(webhook).data, status=status.HTTP_201_CREATED)


class WebhookDetailApi(APIView):
    @extend_schema(
        operation_id="webhooks_retrieve",
        summary="One webhook",
        responses={200: WebhookOutput, **errors(403, 404)},
    )
    def get(self, request, webhook_id):
        return Response(WebhookOutput(_webhook_or_404(request.user, webhook_id)).data)

    @extend_schema(
        operation_id="webhooks_destroy",
        summary="Stop sending to this webhook and forget it (and its deliveries)",
        responses={204: OpenApiResponse(description="deleted"), **errors(403, 404)},
    )
    def delete(self, request, webhook_id):
        webhook = _webhook_or_404(request.user, webhook_id)
        services.webhook_delete(user=request.user, webhook_id=webhook.id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class WebhookDeliveryListApi(APIView):
    @extend_schema(
        operation_id="webhooks_deliveries_list",
        summary=f"The webhook's {DELIVERIES_SHOWN} most recent deliveries",
        responses={200: WebhookDeliveryOutput(many=True), **errors(403, 404)},
    )
    def get(self, request, webhook_id):
        webhook = _webhook_or_404(request.user, webhook_id)
        if not request.user.has_perm("diagnostics.view_webhookdelivery"):
            raise PermissionDenied("your role does not allow you to see deliveries")
        deliveries = selectors.webhook_deliveries_visible_to(request.user).filter(webhook=webhook)
        return Response(WebhookDeliveryOutput(deliveries[:DELIVERIES_SHOWN], many=True).data)

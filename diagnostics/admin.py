"""The radiologists' worklist and case review page, and the read-only audit trail.

Thin on purpose: reads come from `selectors`, every change goes through `services` (the
same functions the API calls), and Django's permissions (the role groups) decide who sees
what. Every queryset is scoped to the user's site unless the user is a superuser.
"""

import io
import uuid

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.timesince import timesince
from PIL import Image as PilImage

from diagnostics import selectors, services, storage
from diagnostics.errors import DomainError
from diagnostics.models import (
    TERMINAL_STATUSES,
    AuditEvent,
    Case,
    Label,
    Review,
    ReviewStatus,
    Site,
    SiteMembership,
    Status,
    Webhook,
    WebhookDelivery,
    WebhookEvent,
)

THUMBNAIL_SIDE = 96
# Formats every browser shows as they are; anything else is converted to PNG to display.
BROWSER_IMAGE_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}


@admin.register(Site)
class SiteAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at"]
    search_fields = ["name"]


@admin.register(SiteMembership)
class SiteMembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "site"]
    list_select_related = ["user", "site"]
    autocomplete_fields = ["site"]

    def get_queryset(self, request):
        memberships = super().get_queryset(request)
        if not request.user.is_superuser:
            memberships = memberships.filter(site__in=selectors.sites_visible_to(request.user))
        return memberships


# --- The worklist ---------------------------------------------------------------------------


class PredictedLabelFilter(admin.SimpleListFilter):
    title = "predicted label"
    parameter_name = "predicted_label"

    def lookups(self, request, model_admin):
        return Label.choices

    def queryset(self, request, queryset):
        if self.value() in Label.values:
            return queryset.filter(predicted_label=self.value())
        return queryset


class NeedsReviewFilter(admin.SimpleListFilter):
    title = "needs review"
    parameter_name = "needs_review"

    def lookups(self, request, model_admin):
        return [("yes", "Yes"), ("no", "No")]

    def queryset(self, request, queryset):
        if self.value() in ("yes", "no"):
            return queryset.filter(needs_review=self.value() == "yes")
        return queryset


class SliceFilter(admin.SimpleListFilter):
    """Why a case needs review: which of its slices the model could not vouch for."""

    title = "slices"
    parameter_name = "slices"
    LOOKUPS = {
        "rejected": ("a slice was rejected (not a brain MRI)", "has_rejected_image"),
        "failed": ("a slice failed", "has_failed_image"),
        "flagged": ("the model is unsure of a slice", "has_flagged_image"),
    }

    def lookups(self, request, model_admin):
        return [(value, title) for value, (title, _) in self.LOOKUPS.items()]

    def queryset(self, request, queryset):
        if self.value() in self.LOOKUPS:
            return queryset.filter(**{self.LOOKUPS[self.value()][1]: True})
        return queryset


class AssignedFilter(admin.SimpleListFilter):
    title = "assigned to"
    parameter_name = "assigned"

    def lookups(self, request, model_admin):
        return [("me", "Me"), ("nobody", "Nobody")]

    def queryset(self, request, queryset):
        if self.value() == "me":
            return queryset.filter(assigned_to=request.user)
        if self.value() == "nobody":
            return queryset.filter(assigned_to__isnull=True)
        return queryset


class SiteFilter(admin.SimpleListFilter):
    """Only the sites the user may see (Django's related filter would list every site)."""

    title = "site"
    parameter_name = "site"

    def lookups(self, request, model_admin):
        return [(str(site.id), site.name) for site in selectors.sites_visible_to(request.user)]

    def queryset(self, request, queryset):
        if self.value() and self.value().isdigit():
            return queryset.filter(site_id=int(self.value()))
        return queryset


class ReviewForm(forms.Form):
    decision = forms.ChoiceField(choices=Review.Decision.choices, widget=forms.RadioSelect)
    label = forms.ChoiceField(
        choices=[("", "---------")] + Label.choices,
        required=False,
        help_text="the label you read, when you override",
    )
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), required=False)
    request_second_read = forms.BooleanField(
        required=False, label="ask a colleague for a second read (override only)"
    )
    version = forms.IntegerField(widget=forms.HiddenInput, min_value=0)


class VersionForm(forms.Form):
    version = forms.IntegerField(widget=forms.HiddenInput, min_value=0)


class AssignForm(VersionForm):
    assignee = forms.CharField(required=False)


@admin.register(Case)
class CaseAdmin(admin.ModelAdmin):
    list_display = [
        "thumbnail",
        "case",
        "status",
        "predicted",
        "confidence",
        "flagged",
        "assigned_to",
        "review_status",
        "age",
    ]
    list_display_links = ["case"]
    list_filter = [
        "status",
        PredictedLabelFilter,
        "review_status",
        NeedsReviewFilter,
        SliceFilter,
        AssignedFilter,
    ]
    search_fields = ["reference"]
    search_help_text = "a case id, or the start of a study reference"
    list_per_page = 50
    # The unfiltered total is one more COUNT(*) per page; the filtered one is enough.
    show_full_result_count = False
    actions = None

    def get_queryset(self, request):
        return selectors.case_review_list(user=request.user)

    def get_ordering(self, request):
        # Waiting for a reading first, flagged first among them, then newest.
        return ["review_rank", "-needs_review", "-created_at"]

    def get_list_display(self, request):
        if request.user.is_superuser:
            return [*self.list_display, "site"]
        return self.list_display

    def get_list_filter(self, request):
        if request.user.is_superuser:
            return [*self.list_filter, SiteFilter]
        return self.list_filter

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            return queryset.filter(id=uuid.UUID(term)), False
        except ValueError:
            return queryset.filter(reference__istartswith=term), False

    def has_add_permission(self, request):
        return False  # cases come from uploads (the API)

    def has_change_permission(self, request, obj=None):
        return False  # reviews go through the case page's forms, not a model form

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="")
    def thumbnail(self, case):
        url = reverse("admin:diagnostics_case_thumbnail", args=[case.id])
        return format_html(
            '<img src="{}" alt="" width="{}" height="{}" loading="lazy" '
            'style="object-fit: contain; background: #000">',
            url,
            THUMBNAIL_SIDE // 2,
            THUMBNAIL_SIDE // 2,
        )

    @admin.display(description="case", ordering="created_at")
    def case(self, case):
        return format_html(
            "{}<br><small>{}</small>", case.reference or "(no reference)", str(case.id)[:8]
        )

    @admin.display(description="predicted", ordering="predicted_label")
    def predicted(self, case):
        return case.predicted_label or "-"

    @admin.display(description="confidence", ordering="predicted_confidence")
    def confidence(self, case):
        if case.predicted_confidence is None:
            return "-"
        return f"{case.predicted_confidence:.0%}"

    @admin.display(description="needs review", boolean=True, ordering="needs_review")
    def flagged(self, case):
        return case.needs_review

    @admin.display(description="age", ordering="created_at")
    def age(self, case):
        return timesince(case.created_at, timezone.now()).split(",")[0]

    # --- The case page ---------------------------------------------------------------------

    def get_urls(self):
        # cacheable: the browser may keep a slice for a few minutes (private, not shared).
        image_view = self.admin_site.admin_view(self.image_view, cacheable=True)
        heatmap_view = self.admin_site.admin_view(self.heatmap_view, cacheable=True)
        thumbnail_view = self.admin_site.admin_view(self.thumbnail_view, cacheable=True)
        return [
            path(
                "<uuid:case_id>/images/<uuid:image_id>/",
                image_view,
                name="diagnostics_case_image",
            ),
            path(
                "<uuid:case_id>/images/<uuid:image_id>/heatmap/",
                heatmap_view,
                name="diagnostics_case_heatmap",
            ),
            path("<uuid:case_id>/thumbnail/", thumbnail_view, name="diagnostics_case_thumbnail"),
            *super().get_urls(),
        ]

    def thumbnail_view(self, request, case_id):
        """The worklist's thumbnail: the case's first slice, scaled down."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        image = selectors.case_thumbnail_image_get(user=request.user, case_id=case_id)
        if image is None:
            raise Http404("no such case, or it has no image")
        return _image_response(image, thumbnail=True)

    def image_view(self, request, case_id, image_id):
        """One slice's bytes, streamed from S3 through the app (the bucket stays private),
        after the same site check as the case itself."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        image = selectors.image_get(user=request.user, case_id=case_id, image_id=image_id)
        if image is None:
            raise Http404("no such image")
        return _image_response(image, thumbnail=request.GET.get("size") == "thumb")

    def heatmap_view(self, request, case_id, image_id):
        """A slice's heatmap overlay (PNG), after the same site check as the slice: rendered
        on first view, then read from S3 (the same service as the API's)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        try:
            png = services.image_heatmap_png(user=request.user, case_id=case_id, image_id=image_id)
        except storage.StorageUnavailable:
            return HttpResponse("object storage is unavailable", status=503)
        if png is None:
            raise Http404("no such image, or it has no heatmap")
        return _private_response(png, content_type="image/png")

    def change_view(self, request, object_id, form_url="", extra_context=None):
        if not self.has_view_permission(request):
            raise PermissionDenied
        try:
            case_id = uuid.UUID(str(object_id))
        except ValueError:
            case_id = None
        case = case_id and selectors.case_review_get(user=request.user, case_id=case_id)
        if not case:
            return self._get_obj_does_not_exist_redirect(request, self.opts, str(object_id))
        if request.method == "POST":
            error = self._act(request, case)
            if error is None:
                return HttpResponseRedirect(request.path)
            messages.error(request, error.detail)
            case = selectors.case_review_get(user=request.user, case_id=case_id)
            return self._render_case(request, case, status=error.status_code)
        return self._render_case(request, case)

    def _act(self, request, case) -> DomainError | None:
        """Run the posted action through the review services; the error, if any."""
        action = request.POST.get("action")
        form_class = {"review": ReviewForm, "assign": AssignForm}.get(action, VersionForm)
        form = form_class(request.POST)
        if action not in ("review", "claim", "release", "assign") or not form.is_valid():
            return services.InvalidReview(f"the form was incomplete: {form.errors.as_text()}")
        data = form.cleaned_data
        try:
            if action == "review":
                services.case_review(
                    user=request.user,
                    case_id=case.id,
                    version=data["version"],
                    decision=data["decision"],
                    label=data["label"] or None,
                    reason=data["reason"],
                    request_second_read=data["request_second_read"],
                )
                messages.success(request, "Your reading is recorded.")
            elif action == "claim":
                services.case_claim(user=request.user, case_id=case.id, version=data["version"])
                messages.success(request, "The case is assigned to you.")
            elif action == "release":
                services.case_release(user=request.user, case_id=case.id, version=data["version"])
                messages.success(request, "You gave the case back.")
            else:
                services.case_assign(
                    user=request.user,
                    case_id=case.id,
                    version=data["version"],
                    assignee_username=data["assignee"] or None,
                )
                messages.success(request, "The assignment is saved.")
        except DomainError as exc:
            return exc
        return None

    def _render_case(self, request, case, status=200):
        user = request.user
        may_review = user.has_perm("diagnostics.review_case")
        may_assign = user.has_perm("diagnostics.assign_case")
        is_open = case.review_status in (ReviewStatus.UNREVIEWED, ReviewStatus.SECOND_READ)
        images = [
            {
                "image": image,
                "url": reverse("admin:diagnostics_case_image", args=[case.id, image.id]),
                "heatmap_url": _heatmap_url(image),
                "ood_score": _ood_score(image),
                "probabilities": _probabilities(image),
            }
            for image in case.images.all()
        ]
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"Case {case.reference or case.id}",
            "subtitle": None,
            "case": case,
            "images": images,
            "readings": list(case.reviews.all()),
            "audit_events": list(selectors.audit_events_for_case(user=user, case_id=case.id)),
            "is_open": is_open,
            "is_finished": case.status in TERMINAL_STATUSES,
            "may_review": may_review and is_open and case.status in TERMINAL_STATUSES,
            "may_claim": may_review and is_open and case.assigned_to_id is None,
            "may_release": may_review and case.assigned_to_id == user.id and is_open,
            "may_assign": may_assign and is_open,
            "radiologists": (
                list(selectors.radiologists_of(site_id=case.site_id)) if may_assign else []
            ),
            "review_form": ReviewForm(initial={"version": case.review_version}),
            "failed": Status.FAILED,
            "rejected": Status.REJECTED,
        }
        return TemplateResponse(
            request, "admin/diagnostics/case/review.html", context, status=status
        )


def _image_response(image, *, thumbnail: bool) -> HttpResponse:
    # A DICOM slice is shown through its 8-bit rendering (what the model classified).
    try:
        data = storage.get(image.rendering_key or image.s3_key)
    except storage.StorageUnavailable:
        return HttpResponse("object storage is unavailable", status=503)
    content_type = "image/png" if image.rendering_key else image.content_type
    if thumbnail:
        data, content_type = _thumbnail(data), "image/jpeg"
    elif content_type not in BROWSER_IMAGE_TYPES:
        data, content_type = _as_png(data), "image/png"
    return _private_response(data, content_type=content_type)


def _private_response(data: bytes, *, content_type: str) -> HttpResponse:
    response = HttpResponse(data, content_type=content_type)
    response["Cache-Control"] = f"private, max-age={settings.REVIEW_IMAGE_CACHE_S}"
    response["X-Content-Type-Options"] = "nosniff"
    return response


def _ood_score(image) -> float | None:
    """The slice's OOD score: on the image (rejected ones have no prediction), else on
    its prediction."""
    if image.ood_score is not None:
        return image.ood_score
    prediction = getattr(image, "prediction", None)
    return prediction.ood_score if prediction is not None else None


def _heatmap_url(image) -> str | None:
    """Where the slice's overlay is served, whenever its prediction has a map (the overlay
    is rendered on first view, so it need not be in S3 yet)."""
    prediction = getattr(image, "prediction", None)
    if prediction is None or prediction.heatmap is None:
        return None
    return reverse("admin:diagnostics_case_heatmap", args=[image.case_id, image.id])


def _probabilities(image) -> list[tuple[str, str]]:
    prediction = getattr(image, "prediction", None)
    if prediction is None:
        return []
    ranked = sorted(prediction.probabilities.items(), key=lambda item: -item[1])
    return [(label, f"{probability:.1%}") for label, probability in ranked]


def _thumbnail(data: bytes) -> bytes:
    with PilImage.open(io.BytesIO(data)) as picture:
        picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        out = io.BytesIO()
        picture.convert("RGB").save(out, format="JPEG", quality=80)
    return out.getvalue()


def _as_png(data: bytes) -> bytes:
    with PilImage.open(io.BytesIO(data)) as picture:
        out = io.BytesIO()
        picture.save(out, format="PNG")
    return out.getvalue()


# --- The audit trail ----------------------------------------------------------------------


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """Read-only for everyone, superusers included; the database refuses changes too."""

    list_display = ["created_at", "actor_name", "source", "ip", "action", "object", "summary"]
    list_filter = ["action", "source", "object_type"]
    search_fields = ["=object_id", "actor_name"]
    search_help_text = "an object id (case, image, prediction or reading), or a user name"
    list_per_page = 100
    show_full_result_count = False
    actions = None

    def get_queryset(self, request):
        return selectors.audit_events_visible_to(request.user)

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        try:
            return queryset.filter(case_id=uuid.UUID(term)), False
        except ValueError:
            return super().get_search_results(request, queryset, search_term)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="object")
    def object(self, event):
        if event.case_id is None:
            return f"{event.object_type} {event.object_id}"
        url = reverse("admin:diagnostics_case_change", args=[event.case_id])
        return format_html(
            '{} {}<br><a href="{}">case {}</a>',
            event.object_type,
            event.object_id[:8],
            url,
            str(event.case_id)[:8],
        )

    @admin.display(description="changes")
    def summary(self, event):
        return "; ".join(f"{field}: {values}" for field, values in event.changes.items())[:300]


# --- Webhooks ----------------------------------------------------------------------------


class WebhookForm(forms.ModelForm):
    events = forms.MultipleChoiceField(
        choices=WebhookEvent.choices,
        widget=forms.CheckboxSelectMultiple,
        required=False,
        help_text="none ticked: every event",
    )

    class Meta:
        model = Webhook
        fields = ["site", "url", "events", "is_active"]


@admin.register(Webhook)
class WebhookAdmin(admin.ModelAdmin):
    """Site admins register their site's receivers. The secret is generated by the server
    and shown once, in the message after saving; it is never displayed again."""

    form = WebhookForm
    list_display = ["url", "site", "event_names", "is_active", "created_at"]
    list_filter = ["is_active"]
    actions = None

    def get_queryset(self, request):
        return selectors.webhooks_visible_to(request.user)

    def get_fields(self, request, obj=None):
        fields = ["url", "events", "is_active"]
        # Everyone else registers for their own site.
        return ["site", *fields] if request.user.is_superuser and obj is None else fields

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "site":
            kwargs["queryset"] = selectors.sites_visible_to(request.user)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    @admin.display(description="events")
    def event_names(self, webhook):
        return ", ".join(webhook.events) or "all"

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        try:
            if change:
                services.webhook_update(
                    user=request.user,
                    webhook=obj,
                    url=data["url"],
                    events=data["events"],
                    is_active=data["is_active"],
                )
                return
            created = services.webhook_create(
                user=request.user, url=data["url"], events=data["events"], site=data.get("site")
            )
        except DomainError as exc:
            raise PermissionDenied(exc.detail) from exc
        obj.pk, obj.site, obj.secret = created.pk, created.site, created.secret
        if not data["is_active"]:
            services.webhook_update(
                user=request.user,
                webhook=created,
                url=created.url,
                events=created.events,
                is_active=False,
            )
        messages.warning(
            request,
            f"The signing secret of this webhook is {created.secret} — copy it now into the "
            "receiver; it is not shown again.",
        )

    def delete_model(self, request, obj):
        services.webhook_delete(user=request.user, webhook_id=obj.id)


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    """Read-only: what was sent where, how many attempts, the receiver's answer."""

    list_display = [
        "created_at",
        "event",
        "case_id",
        "webhook",
        "status",
        "attempts",
        "response_status",
        "last_attempt_at",
    ]
    list_filter = ["status", "event"]
    search_fields = ["=case_id"]
    search_help_text = "a case id"
    readonly_fields = [
        "id",
        "webhook",
        "event",
        "case_id",
        "payload",
        "status",
        "attempts",
        "response_status",
        "last_error",
        "created_at",
        "last_attempt_at",
        "delivered_at",
    ]
    list_per_page = 100
    show_full_result_count = False
    actions = None

    def get_queryset(self, request):
        return selectors.webhook_deliveries_visible_to(request.user)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

"""The radiologists' view of cases. Read-only here: every change goes through services."""

from django.contrib import admin
from django.db.models import Count

from diagnostics import selectors
from diagnostics.models import Case, Image, Site, SiteMembership


@admin.register(Site)
class SiteAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at"]
    search_fields = ["name"]


@admin.register(SiteMembership)
class SiteMembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "site"]
    list_select_related = ["user", "site"]
    autocomplete_fields = ["site"]


class ReadOnlyAdminMixin:
    """Staff read; nobody edits here. Until review roles exist, every staff member of a
    site may read its cases (the queryset keeps them to their own site)."""

    def has_module_permission(self, request):
        return request.user.is_active and request.user.is_staff

    def has_view_permission(self, request, obj=None):
        return request.user.is_active and request.user.is_staff

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class ImageInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = Image
    fields = [
        "position",
        "original_name",
        "width",
        "height",
        "status",
        "attempts",
        "error",
        "predicted_label",
        "confidence",
        "model_version",
    ]
    readonly_fields = fields

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("prediction")

    @admin.display(description="label")
    def predicted_label(self, image):
        prediction = getattr(image, "prediction", None)
        return prediction.label if prediction else "-"

    @admin.display(description="confidence")
    def confidence(self, image):
        prediction = getattr(image, "prediction", None)
        return f"{max(prediction.probabilities.values()):.1%}" if prediction else "-"

    @admin.display(description="model")
    def model_version(self, image):
        prediction = getattr(image, "prediction", None)
        return f"{prediction.model_name} {prediction.model_version}" if prediction else "-"


@admin.register(Case)
class CaseAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["id", "site", "reference", "status", "image_count", "created_at"]
    list_filter = ["status", "site"]
    search_fields = ["=id", "reference"]
    list_select_related = ["site"]
    inlines = [ImageInline]

    def get_queryset(self, request):
        return selectors.cases_visible_to(request.user).annotate(image_count=Count("images"))

    @admin.display(ordering="image_count", description="images")
    def image_count(self, case):
        return case.image_count

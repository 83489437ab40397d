"""Every read the API and the admin make. Cases are always scoped to the user's site."""

from django.db.models import Prefetch, QuerySet

from diagnostics.models import Case, Image


def cases_visible_to(user) -> QuerySet[Case]:
    cases = Case.objects.all()
    if not user.is_superuser:
        cases = cases.filter(site__memberships__user=user)
    return cases


def case_list(*, user, status: str | None = None) -> QuerySet[Case]:
    cases = cases_visible_to(user)
    if status:
        cases = cases.filter(status=status)
    return cases.prefetch_related(
        Prefetch("images", queryset=Image.objects.select_related("prediction"))
    )


def case_get(*, user, case_id) -> Case | None:
    """The case if this user may see it; None both when it does not exist and when it is
    another site's, so the API cannot leak which ids exist."""
    return case_list(user=user).filter(id=case_id).first()

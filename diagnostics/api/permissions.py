from rest_framework.permissions import BasePermission

from diagnostics import services
from diagnostics.errors import Forbidden


class SiteRolePermission(BasePermission):
    """The default for every API view. Reading needs an account of a site (every query is
    scoped to it); uploading needs the uploader role. The review endpoints' rules are
    checked by the review services, which the admin calls too."""

    def has_permission(self, request, view):
        if not (request.user and request.user.is_authenticated):
            return False
        # Imported here: DRF loads this class while rest_framework.views is being imported.
        from diagnostics.api.views import CaseListCreateApi

        if isinstance(view, CaseListCreateApi) and request.method == "POST":
            services.site_for(request.user)  # no site: 403 no_site, the clearer reason
            if not request.user.has_perm("diagnostics.add_case"):
                raise Forbidden("your role does not allow you to upload cases")
        return True

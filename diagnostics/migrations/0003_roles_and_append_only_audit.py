"""Roles as Django groups with their permissions, and an audit table the database itself
keeps append-only."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

# Group name -> permission codenames (all of the diagnostics app). Superusers need no group.
ROLE_PERMISSIONS = {
    "uploader": ["add_case", "view_case", "view_image", "view_prediction"],
    "radiologist": [
        "view_case",
        "view_image",
        "view_prediction",
        "view_review",
        "review_case",
        "view_auditevent",
    ],
    "site admin": [
        "view_case",
        "view_image",
        "view_prediction",
        "view_review",
        "assign_case",
        "view_auditevent",
        "view_sitemembership",
    ],
}


def create_roles(apps, schema_editor):
    # Permissions are normally created after all migrations ran; create them now so the
    # groups can point at them.
    app_config = apps.get_app_config("diagnostics")
    app_config.models_module = True
    create_permissions(app_config, apps=apps, verbosity=0)
    app_config.models_module = None

    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for name, codenames in ROLE_PERMISSIONS.items():
        group, _ = Group.objects.get_or_create(name=name)
        permissions = Permission.objects.filter(
            content_type__app_label="diagnostics", codename__in=codenames
        )
        assert permissions.count() == len(codenames), (name, codenames)
        group.permissions.set(permissions)


def delete_roles(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=ROLE_PERMISSIONS).delete()


# Row-level triggers: TRUNCATE (a table owner's privilege, used by test flushes) is not
# covered; revoke it from the application's role in production.
APPEND_ONLY_SQL = """
CREATE FUNCTION diagnostics_audit_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is append-only: % on diagnostics_auditevent refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER diagnostics_audit_append_only
    BEFORE UPDATE OR DELETE ON diagnostics_auditevent
    FOR EACH ROW EXECUTE FUNCTION diagnostics_audit_append_only();
"""

DROP_APPEND_ONLY_SQL = """
DROP TRIGGER IF EXISTS diagnostics_audit_append_only ON diagnostics_auditevent;
DROP FUNCTION IF EXISTS diagnostics_audit_append_only();
"""


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("diagnostics", "0002_review_workflow"),
    ]

    operations = [
        migrations.RunPython(create_roles, delete_roles),
        migrations.RunSQL(APPEND_ONLY_SQL, DROP_APPEND_ONLY_SQL),
    ]

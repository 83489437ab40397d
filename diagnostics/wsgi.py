import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "diagnostics.settings")
application = get_wsgi_application()

# Uploads import pydicom on first use, to keep it out of the workers: a web process takes
# it now, not in its first DICOM upload.
import diagnostics.dicom  # noqa: E402, F401

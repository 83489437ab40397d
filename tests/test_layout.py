"""The project's shape: `ml` stands alone, and the web process never loads the model."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def imported_modules_after(statement: str) -> set[str]:
    code = f"{statement}\nimport sys\nprint('\\n'.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    return {name.split(".")[0] for name in out.stdout.split()}


def test_ml_imports_without_django():
    modules = imported_modules_after("import ml.data, ml.model, ml.export, ml.inference")
    assert "django" not in modules
    assert not {"diagnostics", "workers"} & modules


def test_the_web_process_does_not_import_the_model_runtime():
    modules = imported_modules_after(
        "import django, os\n"
        "os.environ['DJANGO_SETTINGS_MODULE'] = 'diagnostics.settings'\n"
        "django.setup()\n"
        "import diagnostics.urls, diagnostics.api.views, diagnostics.services"
    )
    assert not {"tensorflow", "keras", "ml"} & modules

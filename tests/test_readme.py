"""The README's configuration table stays true to the settings."""

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_every_environment_variable_the_settings_read_is_documented():
    settings = (REPO_ROOT / "diagnostics" / "settings.py").read_text()
    read = set(re.findall(r'env\.\w+\(\s*"([A-Z0-9_]+)"', settings))
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([A-Z0-9_]+)`", table))
    assert len(read) > 20
    assert read - documented == set()

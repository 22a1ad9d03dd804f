"""The package builds without setuptools warnings and ships its templates."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from tests.support import ROOT


def test_wheel_builds_without_package_warnings_and_ships_the_templates(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
         "--wheel-dir", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    output = built.stdout + built.stderr
    assert "would be ignored" not in output and "absent from the `packages`" not in output
    (wheel,) = tmp_path.glob("celery_api-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "celery_api/templates/docs.html" in names
    for shipped in ("templates/console/base.html", "templates/console/run.html",
                    "static/console.js", "static/console.css"):
        assert f"celery_api/console/{shipped}" in names
    assert not [n for n in names if "__pycache__" in n]

"""Interactive documentation at /api/docs/: Swagger UI from the flask-swagger-ui wheel.

No CDN: the machines that run this have no internet. Every URL in the page is built
with ``url_for``, so it follows the public path prefix behind a proxy.
"""

from __future__ import annotations

from pathlib import Path

import flask_swagger_ui
from flask import Blueprint, render_template, url_for

SWAGGER_DIST = Path(flask_swagger_ui.__file__).parent / "dist"

blp = Blueprint("docs", __name__, url_prefix="/api/docs", static_folder=str(SWAGGER_DIST),
                static_url_path="")


@blp.route("/")
def index():
    return render_template("docs.html", spec_url=url_for("api-docs.openapi_json"))

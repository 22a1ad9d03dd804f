"""Interactive documentation at /api/docs/: Swagger UI from the flask-swagger-ui wheel.

No CDN: the machines that run this have no internet. Every URL in the page is built
with ``url_for``, so it follows the public path prefix behind a proxy. The page has no
inline script or style (its Content-Security-Policy allows this origin's files only,
celery_api.edge): Swagger UI is started by ``docs.js``, which reads the document's URL
from its own ``data-spec-url`` attribute.
"""

from __future__ import annotations

from pathlib import Path

import flask_swagger_ui
from flask import Blueprint, Response, render_template, url_for

SWAGGER_DIST = Path(flask_swagger_ui.__file__).parent / "dist"

blp = Blueprint("docs", __name__, url_prefix="/api/docs", static_folder=str(SWAGGER_DIST),
                static_url_path="")


@blp.route("/")
def index():
    return render_template("docs.html", spec_url=url_for("api-docs.openapi_json"))


INIT_SCRIPT = """\
window.addEventListener("load", function () {
  var script = document.querySelector("script[data-spec-url]");
  window.ui = SwaggerUIBundle({
    url: script.getAttribute("data-spec-url"),
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    plugins: [SwaggerUIBundle.plugins.DownloadUrl],
    layout: "StandaloneLayout"
  });
});
"""


@blp.route("/docs.js")
def init_script():
    return Response(INIT_SCRIPT, mimetype="text/javascript")

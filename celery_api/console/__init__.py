"""The operator console at /console/: runs, launch, workers and queues, batches, schedules.

Server-rendered pages (Jinja templates in ``templates/console``) with one small script
and one stylesheet of our own (``static/``): no CDN, no build step. The pages call the
services (``celery_api.services``) directly, with the same queries as the API, never the
HTTP API itself. Live parts (the runs table, the workers page) poll the console's own
endpoints with ``fetch``; a run's page follows its run by the console's event stream
(the API's, through the same waiting hub), and polls only if that stream fails.

Who is looking: a server-side session (``sessions``), opened by signing in with an API
key when ``CELERY_API_AUTH=required``, or on the first visit when it is ``off``. The
browser holds only the session's random id, in a cookie that is HttpOnly,
SameSite=Strict, scoped to the console's path, and Secure when the request came over
https (``request.is_secure``: behind a proxy, the ``X-Forwarded-Proto`` that
``CELERY_API_TRUSTED_PROXIES`` lets through). Every state-changing request must come
from this origin (``Origin``) and carry the session's CSRF token.

Each view declares the scope it needs (``console_page``): the key's scopes decide which
links and buttons a page shows, and the view refuses (403) what the session lacks.

A page is added by a module of views (``runs``, ``launch`` ...), its templates, and an
entry in ``NAV``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from markupsafe import Markup, escape
from werkzeug.exceptions import HTTPException

from celery_api.auth import console_view
from celery_api.console import sessions
from celery_api.limits import rate_limited
from celery_api.services.errors import ServiceError

COOKIE = "celery_api_console"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
# Endpoints open without a session: signing in, and the static files.
OPEN = frozenset({"console.sign_in", "console.static"})

blp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates",
                static_folder="static", static_url_path="/static")


@dataclass(frozen=True)
class NavEntry:
    label: str
    endpoint: str
    scope: str  # shown to sessions holding this scope


# The console's pages, in the order of its navigation bar.
NAV = [
    NavEntry("Runs", "console.runs", "read"),
    NavEntry("Launch", "console.launch_index", "launch"),
    NavEntry("Workers & queues", "console.workers", "read"),
    NavEntry("Batches", "console.batches", "read"),
    NavEntry("Schedules", "console.schedules", "admin"),
    NavEntry("Webhooks", "console.webhooks", "admin"),
]


def console_page(scope: str, rate: str = "read"):
    """Declare a console view method: the scope it needs and the rate limit it counts
    against (the caller's API key's bucket, as its API calls)."""

    def decorator(func):
        @functools.wraps(func)
        def checked(*args, **kwargs):
            viewer = g.console_viewer
            if not viewer.can(scope):
                held = ", ".join(sorted(viewer.scopes)) or "none"
                abort(403, description=f"This needs an API key with the scope {scope} "
                                       f"(the key {viewer.name!r} has: {held}).")
            return func(*args, **kwargs)

        return console_view(rate_limited(rate)(checked))

    return decorator


def wants_json() -> bool:
    return (request.path.endswith((".json", "/events"))
            or request.args.get("fragment") == "1")


# Request hooks.

@blp.before_request
def load_viewer():
    if request.endpoint == "console.static":
        return None
    viewer = sessions.find(request.cookies.get(COOKIE))
    if viewer is None and current_app.config["AUTH"] == "off":
        g.console_new_session = sessions.open_session(None)
        viewer = sessions.find(g.console_new_session)
    g.console_viewer = viewer
    if viewer is not None:
        g.api_key = viewer.key  # who launches and revokes (auth.caller), and rate limits
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        if not same_origin():
            abort(403, description="This form was not sent from this console's own pages "
                                   "(its Origin header names another site).")
        if request.endpoint != "console.sign_in" and (
                viewer is None or not sessions.csrf_matches(
                    viewer, request.form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER))):
            abort(403, description="The form's CSRF token is missing or stale: reload the "
                                   "page and send it again.")
    if viewer is None and request.endpoint not in OPEN:
        if wants_json():
            abort(401, description="Sign in to the console first.")
        return redirect(url_for("console.sign_in",
                                next=request.script_root + request.full_path.rstrip("?")))
    return None


def same_origin() -> bool:
    """A state-changing request comes from this origin. Browsers send ``Origin`` on every
    POST (the console's ``Referrer-Policy: same-origin`` keeps it a real origin, not
    ``null``); a request without one is not a browser's cross-site form, and still
    needs the session's CSRF token."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    own = urlsplit(request.host_url)
    return origin.rstrip("/") == f"{own.scheme}://{own.netloc}"


@blp.after_request
def console_headers(response):
    new_session = g.get("console_new_session")
    if new_session:
        set_session_cookie(response, new_session)
    if request.endpoint != "console.static":
        response.headers["Cache-Control"] = "no-store"  # pages show live, per-key data
    # Same-origin requests keep their Origin (no-referrer would send "null").
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def cookie_path() -> str:
    return url_for("console.index")


def set_session_cookie(response, session_id: str) -> None:
    response.set_cookie(COOKIE, session_id, path=cookie_path(), httponly=True,
                        samesite="Strict", secure=request.is_secure,
                        max_age=int(current_app.config["CONSOLE_SESSION_HOURS"] * 3600))


def clear_session_cookie(response) -> None:
    response.delete_cookie(COOKIE, path=cookie_path(), httponly=True, samesite="Strict",
                           secure=request.is_secure)


@blp.context_processor
def page_context():
    viewer = g.get("console_viewer")
    return {
        "viewer": viewer,
        "nav": [e for e in NAV if viewer is not None and viewer.can(e.scope)],
        "auth_off": current_app.config["AUTH"] == "off",
        "csrf_token": viewer.csrf_token if viewer is not None else "",
    }


# Errors: pages for people, JSON for the live endpoints.

def error_page(status: int, detail: str):
    if wants_json():
        return jsonify({"status": status, "detail": detail}), status
    return render_template("console/error.html", status=status, detail=detail), status


@blp.errorhandler(ServiceError)
def service_error(exc: ServiceError):
    response = error_page(exc.status, exc.detail)
    return response[0], response[1], exc.headers


@blp.errorhandler(HTTPException)
def http_error(exc: HTTPException):
    return error_page(exc.code or 500, exc.description or exc.name)


# Template helpers.

def when(value: datetime | str | None) -> Markup:
    """A time: UTC in the page and on hover; the script shows it in the viewer's zone.
    Text (an ETA as a worker reports it) is shown as it is unless it reads as ISO 8601."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return Markup(escape(value))
        value = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if value is None:
        return Markup('<span class="muted">—</span>')
    value = value.astimezone(UTC)
    iso = value.isoformat().replace("+00:00", "Z")
    shown = value.strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup(f'<time datetime="{escape(iso)}" title="{escape(shown)}">'
                  f'{escape(shown)}</time>')


def pretty_json(value) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"


@blp.app_template_filter("console_when")
def _when_filter(value):
    return when(value)


@blp.app_template_filter("console_json")
def _json_filter(value):
    return pretty_json(value)


@blp.app_template_filter("console_duration")
def _duration_filter(value):
    return duration(value)


@blp.route("/")
@console_view
def index():
    viewer = g.console_viewer
    return redirect(url_for("console.runs" if viewer.can("read") else "console.launch_index"))


def init_app(app: Flask) -> None:
    """Register the console's pages (before ``auth.init_app`` checks every view)."""
    from celery_api.console import (  # noqa: F401 - the modules register their views
        batches,
        launch,
        runs,
        schedules,
        signin,
        webhooks,
        workers,
    )

    app.register_blueprint(blp)

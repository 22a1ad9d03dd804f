"""The HTTP edge: what every request and response goes through, whatever the route.

- **Bodies.** A body larger than ``CELERY_API_MAX_BODY_BYTES`` is a 413, whether its size
  is announced (``Content-Length``) or not (chunked: it is read up to the limit first,
  never truncated to it). A body must be ``application/json`` in UTF-8: another media
  type, a JSON-ish one (``text/json``, ``application/merge-patch+json``) or another
  charset is a 415 (only the console's pages also take HTML forms, ``form_post``),
  and so is any ``Content-Encoding`` (compressed bodies are refused,
  with ``Accept-Encoding: identity`` saying so, RFC 7694).
- **Security headers** on every response: ``X-Content-Type-Options: nosniff``,
  ``Referrer-Policy: no-referrer``, ``X-Frame-Options: DENY`` and a
  ``Content-Security-Policy`` with ``frame-ancestors 'none'``. API answers get
  ``default-src 'none'``; the /api/docs pages get exactly what Swagger UI needs, all
  from this origin (its scripts and styles are files: the page has no inline script);
  the console's pages get their own (``CONSOLE_POLICY``) and may post forms.
- **CORS** only for the origins listed in ``CELERY_API_CORS_ORIGINS`` (exact
  ``scheme://host[:port]`` values, comma separated); none by default, and then no CORS
  header at all. A preflight from a listed origin is answered 204 here, before
  authentication (browsers send preflights without credentials).
- **No Host reflection.** A ``Location`` pointing at this service is sent as a path, so
  a forged ``Host`` header never ends up in a redirect (Werkzeug builds its
  trailing-slash redirects from it).
"""

from __future__ import annotations

import io
from urllib.parse import urlsplit, urlunsplit

from flask import Flask, Response, current_app, request

from celery_api import settings
from celery_api.smorest import problem_response

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
JSON_CHARSETS = frozenset({"utf-8", "utf8"})

API_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# Swagger UI (flask-swagger-ui's files, templates/docs.html and docs.js): scripts and
# styles from this origin, plus the one <style> element its script creates (the logo's
# SVG, allowed by its hash; tests/test_edge.py checks the hash against the installed
# Swagger UI), its icons as data: URIs in its stylesheet, the OpenAPI document and
# "Try it out" requests to this origin.
SWAGGER_LOGO_STYLE = "'sha256-RL3ie0nH+Lzz2YNqQN83mnU0J1ot4QL7b99vMdIX99w='"
DOCS_POLICY = ("default-src 'none'; script-src 'self'; "
               f"style-src 'self' {SWAGGER_LOGO_STYLE}; img-src 'self' data:; "
               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
               "form-action 'none'")
# The operator console (celery_api.console): its own script and stylesheet, fetches to
# this origin, and forms posted to this origin only.
CONSOLE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                  "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                  "form-action 'self'")
# Blueprints whose pages post HTML forms (application/x-www-form-urlencoded).
FORM_BLUEPRINTS = frozenset({"console"})
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

POLICIES = {"docs": DOCS_POLICY, "console": CONSOLE_POLICY}

CORS_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE"
CORS_REQUEST_HEADERS = "Authorization, Content-Type, Idempotency-Key, X-Request-ID"
CORS_EXPOSED_HEADERS = ("Location, Retry-After, X-Request-ID, Idempotent-Replayed, Link, "
                        "WWW-Authenticate, RateLimit-Limit, RateLimit-Remaining, "
                        "RateLimit-Reset, RateLimit-Policy, X-RateLimit-Reset")
CORS_MAX_AGE = "600"

TOO_LARGE_FLAG = "celery_api.body_too_large"


def init_app(app: Flask) -> None:
    """Install the edge: a WSGI layer for chunked bodies, then the request hooks.

    The preflight answer comes before every other ``before_request`` hook (those of
    authentication included): a preflight carries no credentials. The body check comes
    after the hooks registered so far (request id, metrics timer).
    """
    app.config.setdefault("CORS_ORIGINS", settings.env_list("CELERY_API_CORS_ORIGINS"))
    app.config["CORS_ORIGINS"] = [o.rstrip("/") for o in app.config["CORS_ORIGINS"]]
    app.wsgi_app = ChunkedBodyLimit(app.wsgi_app, lambda: app.config["MAX_CONTENT_LENGTH"])
    app.before_request_funcs.setdefault(None, []).insert(0, answer_preflight)
    app.before_request(check_body)
    app.after_request(edge_headers)


class ChunkedBodyLimit:
    """WSGI middleware: a body of unannounced length (chunked) is read here, up to the
    limit plus one byte. Within the limit it is handed on with its length known; over
    it the app answers 413 (``check_body``) without reading it.

    Werkzeug would otherwise read such a body up to the limit and stop there silently:
    the view would parse a truncated body (a 400 "not valid JSON", or worse a valid
    prefix) instead of answering 413.
    """

    def __init__(self, wsgi_app, limit):
        self.wsgi_app = wsgi_app
        self.limit = limit

    def __call__(self, environ, start_response):
        limit = self.limit()
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if limit is not None and chunked and not environ.get("CONTENT_LENGTH"):
            stream = environ["wsgi.input"]
            parts, size = [], 0
            while size <= limit:
                part = stream.read(min(65536, limit + 1 - size))
                if not part:
                    break
                parts.append(part)
                size += len(part)
            if size > limit:
                environ[TOO_LARGE_FLAG] = True
            else:
                body = b"".join(parts)
                environ["wsgi.input"] = io.BytesIO(body)
                environ["CONTENT_LENGTH"] = str(len(body))
        return self.wsgi_app(environ, start_response)


def too_large(limit: int) -> Response:
    return problem_response(
        413, f"The request body is larger than this service accepts ({limit} bytes, "
             f"CELERY_API_MAX_BODY_BYTES).")


def check_body():
    """413 for a body over the limit; 415 unless it is plain application/json in UTF-8
    (an HTML form posted to the console excepted). A body is one with a length or a
    Transfer-Encoding; GET, HEAD, DELETE and OPTIONS are not checked for one."""
    req = request._get_current_object()  # one context lookup for the checks below
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    length = req.content_length or 0
    if req.environ.get(TOO_LARGE_FLAG) or (limit is not None and length > limit):
        return too_large(limit)
    if req.method not in BODY_METHODS:
        return None
    headers = req.headers
    if not length and not headers.get("Transfer-Encoding"):
        return None
    if form_post():
        return None
    encoding = headers.get("Content-Encoding", "").strip().lower()
    if encoding and encoding != "identity":
        return problem_response(
            415, f"Content-Encoding {encoding!r} is not accepted: send the body "
                 f"uncompressed.", headers={"Accept-Encoding": "identity"})
    mimetype = req.mimetype
    if mimetype != "application/json":
        return problem_response(
            415, f"Send the body as application/json (got {mimetype or 'no Content-Type'}).")
    charset = req.mimetype_params.get("charset")
    if charset is not None and charset.strip().lower() not in JSON_CHARSETS:
        return problem_response(
            415, f"Send the body as application/json in UTF-8 (got charset={charset[:40]}).")
    return None


def form_post() -> bool:
    """An HTML form posted to a page that takes forms (the console), within the limit."""
    return (request.blueprint in FORM_BLUEPRINTS
            and request.mimetype == "application/x-www-form-urlencoded"
            and not request.headers.get("Content-Encoding", "").strip())


def _allowed_origin() -> str | None:
    origin = request.headers.get("Origin")
    return origin if origin and origin in current_app.config["CORS_ORIGINS"] else None


def answer_preflight():
    """A CORS preflight from a configured origin: 204 with what it may send."""
    if (request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers
            or not _allowed_origin()):
        return None
    response = Response(status=204)
    response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
    response.headers["Access-Control-Allow-Headers"] = CORS_REQUEST_HEADERS
    response.headers["Access-Control-Max-Age"] = CORS_MAX_AGE
    return response


def edge_headers(response: Response) -> Response:
    headers = response.headers
    # One pass over the response's headers, then the missing ones added: a setdefault
    # each would scan them three times and raise a KeyError inside werkzeug when absent.
    present = {name.lower() for name, _ in headers}
    for name, value in SECURITY_HEADERS.items():
        if name.lower() not in present:
            headers.add(name, value)
    if "content-security-policy" not in present:
        headers.add("Content-Security-Policy", POLICIES.get(request.blueprint, API_POLICY))
    if current_app.config["CORS_ORIGINS"]:
        response.vary.add("Origin")
        origin = _allowed_origin()
        if origin:
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Expose-Headers"] = CORS_EXPOSED_HEADERS
    location = headers.get("Location") if "location" in present else None
    if location and not _is_path(location) and own_path(location) != location:
        # Werkzeug's redirect page repeats the absolute URL: replaced too.
        headers["Location"] = own_path(location)
        if 300 <= response.status_code < 400:
            response.set_data(f"Redirecting to {headers['Location']}\n")
            response.mimetype = "text/plain"
    return response


def _is_path(location: str) -> bool:
    """A path already ("/...", not "//host/..."): own_path would keep it as it is."""
    return location[:1] == "/" and location[1:2] != "/"


def own_path(location: str) -> str:
    """A Location on this service's host as a path (the host is the client's word)."""
    parts = urlsplit(location)
    if parts.netloc and parts.netloc.lower() == request.host.lower():
        # One leading slash: "//host/..." would be read as another host.
        path = "/" + parts.path.lstrip("/")
        return urlunsplit(("", "", path, parts.query, parts.fragment))
    return location

"""Authentication: API keys with scopes, on every operation (README, Authentication).

Each operation declares its scope once, on its view method, with ``@requires("read")``
(or ``@public`` / ``@requires("read", optional=True)``). That one declaration is both
what the request hook enforces and what the OpenAPI document says: the operation's
``security``, its ``x-required-scope``, a sentence in its description, and its 401 and
403 responses. ``init_app`` refuses to build an app in which a view declares nothing,
so no operation can be added open by accident (tests/test_auth.py checks the same
from the document).

``CELERY_API_AUTH``: ``required`` (the default everywhere but ``make run``) or ``off``.
gunicorn refuses to start (``check_before_serving``, from gunicorn.conf.py) when it is
``required`` and the database holds no active key; ``off`` is logged as a warning on
every start. Keys themselves (hashing, cache, last use) live in ``services.keys``.
"""

from __future__ import annotations

import http
import inspect
import logging
import os
from collections.abc import Callable

from flask import Flask, current_app, g, request
from flask_smorest import Blueprint, abort

from celery_api.services import keys
from celery_api.services.keys import SCOPES
from celery_api.settings import ConfigurationError, env_float

log = logging.getLogger("celery_api.auth")

MODES = ("required", "off")
SCHEME = "bearerAuth"
REALM = "celery-api"
SCOPE_ATTRIBUTE = "_celery_api_scope"
PUBLIC = "public"
# Endpoints outside the OpenAPI document that stay open: the document and its docs page.
OPEN_ENDPOINTS = frozenset({"api-docs.openapi_json", "docs.index", "docs.init_script",
                            "docs.static", "static", "console.static"})
# Views of the operator console: signed in by the console's own session (celery_api.console).
CONSOLE = "console"
CREATE_HINT = "flask --app wsgi keys create NAME --scope SCOPE [--scope SCOPE ...]"


def auth_mode(value: str | None) -> str:
    """``required`` (also when unset) or ``off``; anything else is refused."""
    mode = (value if value not in (None, "") else "required").strip().lower()
    if mode not in MODES:
        raise ConfigurationError(
            f"CELERY_API_AUTH must be 'required' or 'off', got {value!r}. "
            "Set CELERY_API_AUTH=required (the default) to demand an API key on every "
            "call, or CELERY_API_AUTH=off on a machine no one else can reach.")
    return mode


# Declaring an operation's scope.

def requires(scope: str, *, optional: bool = False) -> Callable:
    """The view method needs an API key with ``scope``. ``optional``: open to anyone,
    and the view asks ``granted(scope)`` to decide what to show (``/readyz``)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}: one of {', '.join(SCOPES)}")

    def decorator(func):
        if optional:
            note = (f"Open; an API key with scope `{scope}` (or `CELERY_API_AUTH=off`) "
                    "also gets the details.")
            security = [{}, {SCHEME: []}]
            responses = {"401": _ref("AuthRequired")}
        else:
            note = f"Requires an API key with scope `{scope}` (`Authorization: Bearer <key>`)."
            security = [{SCHEME: []}]
            responses = {"401": _ref("AuthRequired"), "403": _ref("ScopeRequired")}
        func = Blueprint.doc(**{"security": security, "x-required-scope": scope,
                                "responses": responses})(func)
        func.__doc__ = _with_note(func.__doc__, note)
        setattr(func, SCOPE_ATTRIBUTE, (scope, optional))
        return func

    return decorator


def public(func):
    """The view method is open to anyone, whatever ``CELERY_API_AUTH`` says."""
    func = Blueprint.doc(security=[])(func)
    setattr(func, SCOPE_ATTRIBUTE, (PUBLIC, True))
    return func


def console_view(func):
    """A view of the operator console: its session, not a Bearer key, says who calls
    (``celery_api.console`` checks it, and each view's scope, before the view runs)."""
    setattr(func, SCOPE_ATTRIBUTE, (CONSOLE, True))
    return func


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/responses/{name}"}


def _with_note(docstring: str | None, note: str) -> str:
    return f"{inspect.cleandoc(docstring or '')}\n\n{note}"


def _declaration(view_function, method: str):
    view_class = getattr(view_function, "view_class", None)
    if view_class is None:
        return getattr(view_function, SCOPE_ATTRIBUTE, None)
    handler = getattr(view_class, method.lower(), None)
    if handler is None and method == "HEAD":
        handler = getattr(view_class, "get", None)
    return getattr(handler, SCOPE_ATTRIBUTE, None)


def undeclared(app: Flask) -> list[str]:
    """``endpoint METHOD`` of every view that declares no scope (should be none)."""
    missing = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint in OPEN_ENDPOINTS:
            continue
        view = app.view_functions[rule.endpoint]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            if _declaration(view, method) is None:
                missing.append(f"{rule.endpoint} {method}")
    return missing


# Who is calling.

def caller() -> str | None:
    """The name of the request's API key (None with ``CELERY_API_AUTH=off``): what
    the runs it launches and revokes record as ``launched_by`` / ``revoked_by``."""
    key = g.get("api_key")
    return key.name if key is not None else None


def granted(scope: str) -> bool:
    """Does the request hold ``scope``? Always, with ``CELERY_API_AUTH=off``."""
    if current_app.config["AUTH"] == "off":
        return True
    key = g.get("api_key")
    return key is not None and scope in key.scopes


def _challenge(**params: str) -> str:
    return "Bearer " + ", ".join(f'{k}="{v}"' for k, v in {"realm": REALM, **params}.items())


def _refuse(status: int, detail: str, **params: str):
    abort(status, message=detail, headers={"WWW-Authenticate": _challenge(**params)})


def _presented_key() -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        _refuse(401, "Send the API key as `Authorization: Bearer <key>`.",
                error="invalid_token", error_description="not a Bearer credential")
    return credentials.strip()


def _identify():
    presented = _presented_key()
    if presented is None:
        return None
    try:
        record = keys.verify(presented)
    except keys.InvalidKey as exc:
        log.info("refused %s %s: %s", request.method, request.path, exc.reason)
        _refuse(401, f"{exc.reason} Create a key with `{CREATE_HINT}`.",
                error="invalid_token", error_description=exc.reason.rstrip("."))
    keys.touch(record)
    return record


def authenticate():
    """The request hook: 401 without a valid key, 403 without the operation's scope."""
    if current_app.config["AUTH"] == "off":
        return None
    if request.routing_exception is not None or request.endpoint in OPEN_ENDPOINTS:
        return None  # 404/405 as they are; the document and docs page are open
    if request.method == "OPTIONS" and getattr(request.url_rule, "provide_automatic_options",
                                               False):
        return None
    declared = _declaration(current_app.view_functions[request.endpoint], request.method)
    # Fail closed: a view that slipped past init_app's check needs the widest scope.
    scope, optional = declared or ("admin", False)
    if scope in (PUBLIC, CONSOLE):
        return None
    g.api_key = _identify()
    if optional:
        return None
    if g.api_key is None:
        _refuse(401, f"This operation needs an API key with scope {scope}: send "
                     f"`Authorization: Bearer <key>` (create one with `{CREATE_HINT}`).")
    if scope not in g.api_key.scopes:
        held = ", ".join(sorted(g.api_key.scopes, key=SCOPES.index)) or "none"
        _refuse(403, f"The API key {g.api_key.name!r} lacks the scope {scope} that "
                     f"{request.method} {request.path} needs (it has: {held}).",
                error="insufficient_scope", scope=scope,
                error_description=f"requires scope {scope}")
    return None


# Wiring.

def init_app(app: Flask) -> None:
    """Check ``AUTH``, refuse views without a declared scope, install the hook and
    document the scheme. Called once the blueprints are registered."""
    app.config["AUTH"] = auth_mode(app.config.get("AUTH", os.environ.get("CELERY_API_AUTH")))
    if "AUTH_CACHE_SECONDS" not in app.config:
        app.config["AUTH_CACHE_SECONDS"] = env_float("CELERY_API_AUTH_CACHE_SECONDS", 1.0)
    missing = undeclared(app)
    if missing:
        raise RuntimeError("These operations declare no scope; add @requires(scope) or "
                           f"@public (celery_api.auth): {', '.join(missing)}")
    app.before_request(authenticate)
    _document(app.extensions["celery_api.api"])


def _document(api) -> None:
    components = api.spec.components
    components.security_scheme(SCHEME, {
        "type": "http", "scheme": "bearer", "bearerFormat": "cak_<id>_<secret>",
        "description": "An API key: `Authorization: Bearer <key>`. Keys are made with "
                       f"`{CREATE_HINT}`; each operation says the scope it needs "
                       "(`x-required-scope`): read, launch, control or admin. Not "
                       "checked when the server runs with CELERY_API_AUTH=off.",
    })
    for name, status, header in (
        ("AuthRequired", 401, 'Bearer realm="celery-api" (plus error="invalid_token" '
                              "for a key that is malformed, unknown or revoked)"),
        ("ScopeRequired", 403, 'Bearer realm="celery-api", error="insufficient_scope", '
                               'scope="<the scope needed>"'),
    ):
        components.response(name, {
            "description": (http.HTTPStatus(status).phrase + ": " +
                            ("no valid API key" if status == 401
                             else "the API key lacks the operation's scope")),
            "headers": {"WWW-Authenticate": {"description": header,
                                             "schema": {"type": "string"}}},
            "content": {"application/problem+json": {"schema": api.ERROR_SCHEMA}},
        })
    api.spec.options["security"] = [{SCHEME: []}]


# gunicorn (make serve): refuse to serve without a key.

OFF_WARNING = ("⚠️ CELERY_API_AUTH=off: authentication is disabled, every operation is "
               "open to anyone who can reach this server. Use it only on a machine no one "
               "else can reach (make run does, on 127.0.0.1).")


def check_before_serving(logger) -> None:
    """Raise RuntimeError (gunicorn exits 1 with its message) when authentication is
    required and the database holds no active key; log the warning when it is off."""
    try:
        mode = auth_mode(os.environ.get("CELERY_API_AUTH"))
    except ValueError as exc:
        raise RuntimeError(str(exc)) from None
    if mode == "off":
        logger.warning(OFF_WARNING)
        return
    from sqlalchemy.exc import SQLAlchemyError

    from celery_api import create_app
    from celery_api.extensions import db

    app = create_app()
    with app.app_context():
        try:
            found = keys.has_active_key()
        except SQLAlchemyError as exc:
            raise RuntimeError(
                "CELERY_API_AUTH=required (the default) but the API keys cannot be read "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Apply the "
                "migrations (make migrate) and check DATABASE_URL, then create a key with "
                f"`{CREATE_HINT}`; or set CELERY_API_AUTH=off to serve without keys.",
            ) from None
        finally:
            db.session.remove()
            db.engine.dispose()  # no connection of this process is inherited by workers
    if not found:
        raise RuntimeError(
            "CELERY_API_AUTH=required (the default) and the database holds no active API "
            "key, so every request would be refused. Create one first:\n"
            f"    {CREATE_HINT}\n"
            "(e.g. flask --app wsgi keys create ops --scope read --scope launch --scope "
            "control --scope admin), or set CELERY_API_AUTH=off to serve without keys, on "
            "a machine no one else can reach.")
    logger.info("API keys required (CELERY_API_AUTH=required)")

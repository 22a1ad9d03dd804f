"""The HTTP edge: request hooks and the error handlers that answer problem+json.

Every error leaves as ``application/problem+json`` (``smorest.problem_response``):

- ``ServiceError`` (what services raise) with its own status, detail and headers;
- a database error no service caught: 503 with ``Retry-After`` when the database
  cannot serve (``services.database.is_unavailable``); anything else is re-raised, so
  Flask logs it with its traceback and answers 500;
- HTTP exceptions (``abort`` in a view, webargs' 422, Flask's 404/405/413, and the 500
  Flask makes of an unhandled exception) through ``smorest.Api.handle_http_exception``,
  where flask-smorest expects that handler.

The hooks give each request an id (echoed as ``X-Request-ID`` and put on every log
line); a body that is not JSON is refused by ``edge.check_body`` (415).
"""

from __future__ import annotations

import os
import re

from flask import Flask, current_app, g, request
from sqlalchemy import exc as sa_exc

from celery_api.services import database
from celery_api.services.errors import ServiceError
from celery_api.smorest import problem_response

# A caller's X-Request-ID is kept when it is short and plain; otherwise we make one.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def init_app(app: Flask) -> None:
    """Register the request hooks and the error handlers on ``app``."""
    app.before_request(assign_request_id)
    app.after_request(echo_request_id)
    app.register_error_handler(ServiceError, service_error)
    app.register_error_handler(sa_exc.SQLAlchemyError, database_error)


def assign_request_id() -> None:
    given = request.environ.get("HTTP_X_REQUEST_ID", "")  # the header, read directly
    g.request_id = given if REQUEST_ID.match(given) else os.urandom(16).hex()


def echo_request_id(response):
    if "request_id" in g:
        response.headers["X-Request-ID"] = g.request_id
    return response


def service_error(exc: ServiceError):
    return problem_response(exc.status, exc.detail, errors=exc.errors, headers=exc.headers)


def database_error(exc: sa_exc.SQLAlchemyError):
    # What a service did not catch. Connection refused or lost, pool exhausted,
    # SQLite locked past its busy timeout: the database cannot answer now, which is
    # not the client's fault (503). Anything else is a bug: re-raised, Flask logs it
    # with its traceback and answers 500 (Api.handle_http_exception).
    database.rollback()
    if not database.is_unavailable(exc):
        raise exc
    current_app.logger.error("❌ database unavailable during %s %s: %s", request.method,
                             request.path, exc)
    return problem_response(503, database.UNREACHABLE, headers={"Retry-After": "5"})

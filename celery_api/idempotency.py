"""``Idempotency-Key``: a POST that creates runs, sent twice, creates them once.

One decorator, ``@idempotent``, on each view that creates runs (launch, batch, retry,
schedule run-now). With the request header ``Idempotency-Key``:

- the first request claims the key by inserting a row of ``idempotency_keys`` (its
  primary key is ``(scope, key)``) and commits it before the view does any work;
- a 2xx answer is stored on the row (status, body, ``Location``); any other outcome
  (4xx, 5xx, an exception) deletes the row, so the key may be sent again;
- a duplicate's insert fails on the primary key, and it reads the row: the stored
  answer is replayed with ``Idempotent-Replayed: true`` when the request is the same
  (SHA-256 of the path and the canonical JSON body); 422 when the key was used for
  another request; 409 (``Retry-After: 1``) while the first one is still in progress.

The database decides, so this holds across gunicorn workers and API instances.
``scope`` is the caller's API key name ("" with ``CELERY_API_AUTH=off``), the method
and the route: two callers' keys never collide, nor one key on two operations. Keys
live ``CELERY_API_IDEMPOTENCY_SECONDS`` (24 h); an expired one is replaced on insert
and deleted by beat's purge (``purge_expired``). Why only 2xx answers are kept: see
the README (Idempotency-Key).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from datetime import datetime, timedelta

import sqlalchemy as sa
from flask import current_app, request
from sqlalchemy import exc as sa_exc

from celery_api.auth import caller
from celery_api.extensions import db
from celery_api.models import IdempotencyKey, utcnow
from celery_api.smorest import Blueprint, problem_response

log = logging.getLogger("celery_api.idempotency")

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
MAX_LENGTH = 255
# Visible ASCII but the double quote and the backslash (a UUID, base64, a ULID...).
# A structured-field string ("...", as the IETF draft writes it) is taken unquoted.
KEY = re.compile(r'^[!#-\[\]-~]{1,255}$')
KEY_PATTERN = KEY.pattern
STORED_HEADERS = ("Location", "Content-Type")
TABLE = IdempotencyKey.__table__

PARAMETER = {
    "in": "header", "name": HEADER, "required": False,
    "description": "Send the same request again with the same key and it runs once: a "
                   "repeat answers the first answer, with `Idempotent-Replayed: true`. "
                   "422 when the key was used with another request, 409 while the first "
                   "is still in progress. Kept 24 h (CELERY_API_IDEMPOTENCY_SECONDS); "
                   "only 2xx answers are kept. Up to 255 visible ASCII characters.",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_LENGTH,
               "pattern": KEY_PATTERN},
}
REPLAYED_DOC = {"description": "`true` on an answer replayed for a repeated "
                               "`Idempotency-Key` (absent on a first answer)",
                "schema": {"type": "string", "enum": ["true"]}}


def now() -> datetime:
    """The clock of key expiry (tests move it)."""
    return utcnow()


def idempotent(func):
    """The view (a POST that creates runs) honours ``Idempotency-Key``.

    Put it below ``@rate_limited``/``@requires`` and above ``@blp.arguments``: the
    caller is known, and a body refused by validation releases the key.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        raw = request.headers.get(HEADER)
        if raw is None:
            return func(*args, **kwargs)
        key = _parse(raw)
        if key is None:
            return problem_response(
                422, f"The {HEADER} header must be 1 to {MAX_LENGTH} visible ASCII "
                     "characters (no spaces, quotes or backslashes); a UUID will do.",
                errors={"headers": {HEADER: ["Not a valid idempotency key."]}})
        scope = f"{caller() or ''} {request.method} {request.url_rule.rule}"
        fingerprint = request_hash()
        refusal = _claim(scope, key, fingerprint)
        if refusal is not None:
            return refusal
        try:
            response = current_app.make_response(func(*args, **kwargs))
        except BaseException:
            _release(scope, key)
            raise
        if 200 <= response.status_code < 300:
            _store(scope, key, response)
        else:
            _release(scope, key)
        return response

    responses = {"409": {"$ref": "#/components/responses/CONFLICT"},
                 "422": {"$ref": "#/components/responses/UNPROCESSABLE_ENTITY"}}
    declared = getattr(func, "_apidoc", {}).get("response", {}).get("responses", {})
    for code in declared:
        if 200 <= int(code) < 300:
            responses[code] = {"headers": {REPLAYED: REPLAYED_DOC}}
    wrapper = Blueprint.doc(parameters=[PARAMETER], responses=responses)(wrapper)
    return wrapper


def _parse(raw: str) -> str | None:
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return value if KEY.match(value) else None


def request_hash() -> str:
    """SHA-256 of the path and the body (JSON in canonical form: sorted keys, compact;
    the bytes as sent when they are not JSON that can be read: the view refuses it)."""
    try:
        body = request.get_json(silent=True)
        canonical = None if body is None else json.dumps(
            body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
        ).encode("utf-8", "surrogatepass")  # a lone surrogate: the view refuses it
    except RecursionError:  # nested too deeply: the view answers 400
        canonical = None
    if canonical is None:
        canonical = request.get_data()
    digest = hashlib.sha256(request.path.encode() + b"\n")
    digest.update(canonical)
    return digest.hexdigest()


def _key_filter(scope: str, key: str):
    return sa.and_(TABLE.c.scope == scope, TABLE.c.key == key)


def _claim(scope: str, key: str, fingerprint: str):
    """None when this request holds the key now; else the answer to give (replay,
    409 or 422). Each statement is its own transaction, committed at once."""
    seconds = current_app.config["IDEMPOTENCY_SECONDS"]
    for _attempt in range(5):
        moment = now()
        try:
            with db.engine.begin() as conn:
                conn.execute(TABLE.insert().values(
                    scope=scope, key=key, request_hash=fingerprint, created_at=moment,
                    expires_at=moment + timedelta(seconds=seconds)))
            return None
        except sa_exc.IntegrityError:
            pass
        with db.engine.begin() as conn:
            row = conn.execute(sa.select(TABLE).where(_key_filter(scope, key))).first()
            if row is None:
                continue  # released meanwhile: claim it again
            if row.expires_at <= moment:
                # Expired: gone for good, whatever the other request does with it.
                conn.execute(TABLE.delete().where(_key_filter(scope, key),
                                                  TABLE.c.expires_at <= moment))
                continue
        return _answer_duplicate(row, key, fingerprint)
    raise RuntimeError(f"could not claim {HEADER} {key!r}")  # pragma: no cover


def _answer_duplicate(row, key: str, fingerprint: str):
    if row.request_hash != fingerprint:
        return problem_response(
            422, f"The {HEADER} {key!r} was already used with another request (a different "
                 "body or path). Send a new key for a new request.",
            errors={"headers": {HEADER: ["Already used with another request."]}})
    if row.status_code is None:
        return problem_response(
            409, f"A request with the {HEADER} {key!r} is still in progress; send it again "
                 "once it has answered, to get its answer.", headers={"Retry-After": "1"})
    log.info("replayed %s %s (%s %r)", request.method, request.path, HEADER, key)
    response = current_app.response_class(row.body, status=row.status_code)
    for name, value in (row.headers or {}).items():
        response.headers[name] = value
    response.headers[REPLAYED] = "true"
    return response


def _store(scope: str, key: str, response) -> None:
    headers = {name: response.headers[name] for name in STORED_HEADERS
               if name in response.headers}
    try:
        with db.engine.begin() as conn:
            conn.execute(TABLE.update().where(_key_filter(scope, key)).values(
                status_code=response.status_code, headers=headers,
                body=response.get_data(as_text=True)))
    except sa_exc.SQLAlchemyError as exc:
        # The work is done: answer it. The key stays in progress (409) until it
        # expires rather than be released and let a repeat run it twice.
        log.error("could not store the answer of %s %r: %s", HEADER, key, exc)


def _release(scope: str, key: str) -> None:
    """Forget a claim whose request did not succeed, so it may be sent again."""
    try:
        with db.engine.begin() as conn:
            conn.execute(TABLE.delete().where(_key_filter(scope, key),
                                              TABLE.c.status_code.is_(None)))
    except sa_exc.SQLAlchemyError as exc:  # the database is down: the key expires
        log.warning("could not release %s %r: %s", HEADER, key, exc)


def purge_expired() -> int:
    """Delete the expired keys (beat's purge calls this); how many."""
    with db.engine.begin() as conn:
        return conn.execute(TABLE.delete().where(TABLE.c.expires_at <= now())).rowcount

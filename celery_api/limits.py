"""Rate limits and load shedding (README, "Rate limits" and "Load shedding").

Every limit is kept by Flask-Limiter (and the ``limits`` library under it) in one
storage: Redis when ``REDIS_URL`` is set, so a limit holds across gunicorn workers and
API instances, else this process's memory (each process then counts alone).

- **Per caller.** Each operation declares its kind once, on its view method, with
  ``@rate_limited("launch")`` (launch, batch, retry: ``CELERY_API_RATE_LIMIT_LAUNCH``)
  or ``@rate_limited("read")`` (catalog, status, history, stats, batches:
  ``CELERY_API_RATE_LIMIT_READ``). The operations of a kind share one bucket per API key
  (per client address with ``CELERY_API_AUTH=off``; behind a proxy the address its
  ``X-Forwarded-For`` names, as ``CELERY_API_TRUSTED_PROXIES`` lets ProxyFix set it).
  The same declaration documents the 429 and the rate-limit headers in the OpenAPI
  document. Health, metrics, the document and the docs page declare nothing and are
  never limited.
- **Per task type.** A catalog entry may declare ``rate_limit="10/minute"``: launches
  of that task type, from every caller together, that pass it are refused. A batch
  counts each of its items against its task type's limit, all or nothing.
- **Load shedding.** When a queue holds ``CELERY_API_QUEUE_MAX_DEPTH`` messages (or its
  own bound from ``CELERY_API_QUEUE_MAX_DEPTHS``), launches to it are refused until it
  drains; reads are untouched.

All three answer 429 problem+json with ``Retry-After`` and a ``type`` telling them apart
(``RATE_LIMITED``, ``TASK_TYPE_RATE_LIMITED``, ``QUEUE_FULL``). A full queue is a 429,
not a 503: every dependency is up (the README's 503 means one is down); the service is
refusing more work for that queue, as the task type's limit does.

The task-type limit and the queue bound are checked by the launch services
(``admit``), after validation and before anything is recorded, for launches made in
an HTTP request; fan-out children, beat and held runs coming due are not refused.
"""

from __future__ import annotations

import http
import inspect
import logging
import math
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

from flask import Flask, current_app, has_request_context, request
from flask_limiter import HeaderNames, Limiter, RateLimitExceeded
from flask_smorest import Blueprint
from limits import RateLimitItem, parse_many

from celery_api import settings
from celery_api.auth import caller
from celery_api.fences.limits import one_trip, request_hooks_off
from celery_api.services.errors import ServiceError
from celery_api.smorest import problem_response

log = logging.getLogger("celery_api.limits")

EXTENSION = "celery_api.limits"
KEY_PREFIX = "celery-api"
ATTRIBUTE = "_celery_api_rate_limit"
OFF = frozenset({"", "off", "none", "0", "false", "no"})

# Problem types of the three refusals (RFC 9457 ``type``; tag URIs, RFC 4151).
RATE_LIMITED = "tag:celery-api,2025:rate-limited"
TASK_TYPE_RATE_LIMITED = "tag:celery-api,2025:task-type-rate-limited"
QUEUE_FULL = "tag:celery-api,2025:queue-full"
QUEUE_FULL_RETRY_AFTER = 5  # seconds: a queue drains at the workers' pace


@dataclass(frozen=True)
class Kind:
    config: str
    variable: str
    default: str
    what: str


KINDS = {
    "launch": Kind("RATE_LIMIT_LAUNCH", "CELERY_API_RATE_LIMIT_LAUNCH", "600/minute",
                   "launches (launch, batch, retry)"),
    "read": Kind("RATE_LIMIT_READ", "CELERY_API_RATE_LIMIT_READ", "3000/minute",
                 "reads (catalog, status, history, batches, stats)"),
}

# What the RateLimit headers say, for the OpenAPI document.
HEADERS_DOC = {
    "RateLimit-Limit": "Requests allowed in the window of the caller's tightest limit "
                       "(IETF draft-ietf-httpapi-ratelimit-headers)",
    "RateLimit-Remaining": "Requests left in that window, this one counted",
    "RateLimit-Reset": "Seconds until that window resets",
    "RateLimit-Policy": "The limit as `<requests>;w=<window seconds>`",
    "X-RateLimit-Reset": "When that window resets, in seconds since the Unix epoch",
}
RETRY_AFTER_DOC = "Seconds to wait before trying again"


def _header_docs(names) -> dict:
    return {name: {"description": HEADERS_DOC.get(name, RETRY_AFTER_DOC),
                   "schema": {"type": "integer" if name != "RateLimit-Policy" else "string"}}
            for name in names}


def limit_header_docs() -> dict:
    """The RateLimit headers of a success response, for a response documented by hand."""
    return _header_docs(HEADERS_DOC)


# Declaring an operation's limit.

def rate_limited(kind: str):
    """The view method counts against the caller's ``kind`` limit ("launch" or "read").

    Put it below ``@requires(...)`` and above ``@blp.response(...)``: it documents the
    429 response and the RateLimit headers of the success response.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown rate limit kind {kind!r}: one of {', '.join(KINDS)}")

    def decorator(func):
        responses: dict = {"429": {"$ref": "#/components/responses/RateLimited"}}
        declared = getattr(func, "_apidoc", {}).get("response", {}).get("responses", {})
        for code in declared:
            if 200 <= int(code) < 300:
                responses[code] = {"headers": _header_docs(HEADERS_DOC)}
        func = Blueprint.doc(responses=responses)(func)
        note = (f"Rate limited: counts against the caller's `{kind}` limit "
                f"(`{KINDS[kind].variable}`).")
        if kind == "launch":
            note += (" A task type may have its own limit, shared by all callers, and a "
                     "queue past its bound refuses launches (429, see the README).")
        func.__doc__ = f"{inspect.cleandoc(func.__doc__ or '')}\n\n{note}"
        setattr(func, ATTRIBUTE, kind)
        return func

    return decorator


# Settings.

def limit_setting(value: str | None, name: str) -> str | None:
    """A limit string (``600/minute``, ``10/second;500/hour``), or None when off."""
    if value is None or value.strip().lower() in OFF:
        return None
    try:
        parse_many(value)
    except ValueError as exc:
        raise ValueError(f"{name} must be a rate limit such as '600/minute' (several: "
                         f"'10/second;600/minute'), or 'off'; got {value!r}") from exc
    return value.strip()


def queue_bounds(value: str | None, name: str = "CELERY_API_QUEUE_MAX_DEPTHS") -> dict:
    """``celery:10000,parked:100`` as ``{"celery": 10000, "parked": 100}``."""
    bounds: dict[str, int] = {}
    for part in (value or "").split(","):
        if not part.strip():
            continue
        queue, separator, depth = part.strip().rpartition(":")
        depth = depth.strip()
        if not separator or not queue.strip() or not (depth.isascii() and depth.isdigit()):
            raise ValueError(f"{name} must list queue:depth pairs such as "
                             f"'celery:10000,parked:100' (0: no bound); got {value!r}")
        bounds[queue.strip()] = int(depth)
    return bounds


def _configure(app: Flask) -> None:
    config = app.config
    for kind in KINDS.values():
        value = config.get(kind.config, os.environ.get(kind.variable, kind.default))
        config[kind.config] = limit_setting(value, kind.variable)
    config.setdefault("RATE_LIMIT_STRATEGY",
                      os.environ.get("CELERY_API_RATE_LIMIT_STRATEGY") or "moving-window")
    config.setdefault("QUEUE_MAX_DEPTH", settings.env_int("CELERY_API_QUEUE_MAX_DEPTH", 0))
    if config["QUEUE_MAX_DEPTH"] < 0:
        raise ValueError("CELERY_API_QUEUE_MAX_DEPTH must be 0 (no bound) or more")
    bounds = config.get("QUEUE_MAX_DEPTHS", os.environ.get("CELERY_API_QUEUE_MAX_DEPTHS"))
    config["QUEUE_MAX_DEPTHS"] = bounds if isinstance(bounds, dict) else queue_bounds(bounds)
    config.setdefault("QUEUE_DEPTH_CACHE_SECONDS",
                      settings.env_float("CELERY_API_QUEUE_DEPTH_CACHE_SECONDS", 1.0))


def storage_uri(redis_url: str | None) -> str:
    """Flask-Limiter's storage for ``REDIS_URL`` (its scheme for a Unix socket differs)."""
    if not redis_url:
        return "memory://"
    for scheme in ("redis+socket://", "unix://"):
        if redis_url.startswith(scheme):
            return "redis+unix://" + redis_url[len(scheme):]
    return redis_url


# Who is counted.

def rate_key() -> str:
    """The caller's bucket: its API key's name, or its address when auth is off."""
    name = caller()
    return f"key:{name}" if name is not None else f"addr:{request.remote_addr or 'unknown'}"


def _who() -> str:
    name = caller()
    return f"API key {name!r}" if name is not None else f"address {request.remote_addr}"


# Wiring.

class LimitsState:
    """One app's limiter, queue bounds and the queue depths it read last."""

    def __init__(self, app: Flask, limiter: Limiter) -> None:
        self.limiter = limiter
        self.default_bound = app.config["QUEUE_MAX_DEPTH"]
        self.bounds = app.config["QUEUE_MAX_DEPTHS"]
        self.cache_seconds = app.config["QUEUE_DEPTH_CACHE_SECONDS"]
        self.lock = threading.Lock()
        # queue -> [depth read from the broker, when (monotonic), launched here since]
        self.depths: dict[str, list] = {}

    def bound(self, queue: str) -> int:
        return self.bounds.get(queue, self.default_bound)


def init_app(app: Flask) -> None:
    """Build the limiter, attach the declared limits, install the 429 handlers.

    Called after ``auth.init_app``: the caller is identified before it is counted.
    """
    _configure(app)
    limiter = Limiter(
        key_func=rate_key,
        storage_uri=storage_uri(app.config.get("REDIS_URL")),
        storage_options={"socket_timeout": app.config["BROKER_TIMEOUT"],
                         "socket_connect_timeout": app.config["BROKER_TIMEOUT"]}
        if app.config.get("REDIS_URL") else {},
        strategy=app.config["RATE_LIMIT_STRATEGY"],
        key_prefix=KEY_PREFIX,
        headers_enabled=True,
        # The IETF names. Flask-Limiter's "reset" is an epoch time, kept under its
        # conventional X- name; the delta it computes for Retry-After is the IETF
        # RateLimit-Reset. Retry-After itself is set by the 429s below only (Flask-Limiter
        # would put it on every response, and stretch a 503's to the window's reset).
        header_name_mapping={HeaderNames.LIMIT: "RateLimit-Limit",
                             HeaderNames.REMAINING: "RateLimit-Remaining",
                             HeaderNames.RESET: "X-RateLimit-Reset",
                             HeaderNames.RETRY_AFTER: "RateLimit-Reset"},
        # Redis down: count in this process's memory until it is back, never a 500.
        in_memory_fallback_enabled=True,
        swallow_errors=True,
    )
    limiter.init_app(app)
    # One Redis round trip per limit and request, headers included (fences/limits.py).
    one_trip(limiter)
    if all(app.config[kind.config] is None for kind in KINDS.values()):
        request_hooks_off(app, limiter)  # nothing to count per request (fences/limits.py)
    state = LimitsState(app, limiter)
    app.extensions[EXTENSION] = state
    _attach(app, limiter)
    app.after_request(_policy_header)
    app.register_error_handler(RateLimitExceeded, rate_limit_exceeded)
    app.register_error_handler(Refused, refused)
    _document(app.extensions["celery_api.api"])


def _declared(view_function) -> dict[str, list[str]]:
    """``{kind: [methods]}`` of a view's methods declared with ``rate_limited``."""
    view_class = getattr(view_function, "view_class", None)
    kinds: dict[str, list[str]] = {}
    for method in getattr(view_class, "methods", None) or ():
        kind = getattr(getattr(view_class, method.lower(), None), ATTRIBUTE, None)
        if kind is not None:
            kinds.setdefault(kind, []).append(method.lower())
            if method == "GET":
                kinds[kind].append("head")
    return kinds


def _attach(app: Flask, limiter: Limiter) -> None:
    for endpoint, view in list(app.view_functions.items()):
        for kind, methods in _declared(view).items():
            limit = app.config[KINDS[kind].config]
            if limit is None:
                continue
            # One bucket per caller for every operation of the kind (a shared limit).
            view = limiter.shared_limit(limit, scope=kind, methods=methods)(view)
        app.view_functions[endpoint] = view


def _policy_header(response):
    limiter = current_app.extensions[EXTENSION].limiter
    current = limiter.current_limit if limiter.enabled else None
    if current is not None:
        response.headers["RateLimit-Policy"] = (
            f"{current.limit.amount};w={current.limit.get_expiry()}")
    return response


def _retry_after(reset_at: float) -> int:
    return max(1, math.ceil(reset_at - time.time()))


def rate_limit_exceeded(error: RateLimitExceeded):
    limiter = current_app.extensions[EXTENSION].limiter
    current = limiter.current_limit
    retry = _retry_after(current.window.reset_time) if current is not None else 1
    kind = KINDS.get(error.limit.scope) if isinstance(error.limit.scope, str) else None
    what = kind.what if kind else "this operation"
    setting = f" ({kind.variable})" if kind else ""
    detail = (f"Rate limit exceeded: {error.limit.limit} for {what} by {_who()}{setting}. "
              f"Retry after {retry} s.")
    log.info("refused %s %s: %s", request.method, request.path, detail)
    return problem_response(429, detail, headers={"Retry-After": str(retry)},
                            type_=RATE_LIMITED)


# Task-type limits and load shedding, asked by the launch services.

class Refused(ServiceError):
    """A launch refused to protect a queue: its task type's limit, or the queue's bound."""

    status = 429

    def __init__(self, detail: str, *, type_: str, retry_after: int, outcome: str):
        super().__init__(detail, headers={"Retry-After": str(retry_after)})
        self.type = type_
        self.outcome = outcome


def refused(exc: Refused):
    log.info("refused %s %s: %s", request.method, request.path, exc.detail)
    return problem_response(exc.status, exc.detail, headers=exc.headers, type_=exc.type)


def admit(prepared: list) -> None:
    """Raise ``Refused`` unless the launches ``prepared`` (``services.launch.Prepared``,
    validated, not yet recorded) fit their queues' bounds and their task types' limits.

    Only launches made in an HTTP request are counted: fan-out children (in a worker),
    beat and held runs coming due are part of work already accepted.
    """
    if not prepared or not has_request_context():
        return
    state: LimitsState | None = current_app.extensions.get(EXTENSION)
    if state is None:
        return
    queued = Counter(p.record["queue"] for p in prepared if not p.held)
    bounded = {queue: n for queue, n in queued.items() if state.bound(queue) > 0}
    if bounded:
        _check_depths(state, bounded)
    _hit_task_types(state, Counter(p.record["task_type"] for p in prepared))
    if bounded:
        with state.lock:
            for queue, n in bounded.items():
                if queue in state.depths:
                    state.depths[queue][2] += n


def _depths(state: LimitsState, queues: list[str]) -> dict[str, int] | None:
    """Each queue's depth: read from the broker at most ``cache_seconds`` ago, plus what
    this process has launched to it since. None when the broker cannot be read (the
    publish that follows answers for it)."""
    from celery_api.services.stats import queue_lengths

    now = time.monotonic()
    with state.lock:
        stale = [q for q in queues
                 if q not in state.depths or now - state.depths[q][1] >= state.cache_seconds]
        if stale:
            try:
                read = queue_lengths(current_app.extensions["celery"], stale)
            except Exception as exc:  # noqa: BLE001 - the broker's failure, answered later
                log.warning("queue depths unreadable, launches not shed: %s", exc)
                return None
            for queue in stale:
                state.depths[queue] = [read.get(queue, 0), time.monotonic(), 0]
        return {q: state.depths[q][0] + state.depths[q][2] for q in queues}


def _check_depths(state: LimitsState, bounded: dict[str, int]) -> None:
    depths = _depths(state, sorted(bounded))
    if depths is None:
        return
    for queue, n in sorted(bounded.items()):
        bound, depth = state.bound(queue), depths[queue]
        if depth + n > bound:
            setting = ("CELERY_API_QUEUE_MAX_DEPTHS" if queue in state.bounds
                       else "CELERY_API_QUEUE_MAX_DEPTH")
            these = f"these {n} launches" if n > 1 else "this launch"
            raise Refused(
                f"Queue {queue!r} holds {depth} messages waiting for a worker, and "
                f"{these} would take it past its bound of {bound} ({setting}): refused "
                f"so work does not pile up. Retry after it drains "
                f"(Retry-After: {QUEUE_FULL_RETRY_AFTER} s).",
                type_=QUEUE_FULL, retry_after=QUEUE_FULL_RETRY_AFTER, outcome="queue_full")


def _identifiers(task_type: str) -> tuple[str, ...]:
    return (KEY_PREFIX, "task-type", task_type)


def _hit_task_types(state: LimitsState, counts: Counter) -> None:
    from celery_api.catalog import get_catalog

    catalog = get_catalog()
    checks: list[tuple[str, RateLimitItem, int]] = []
    for task_type, n in sorted(counts.items()):
        definition = catalog.get(task_type)
        if definition is not None and definition.rate_limit:
            checks.extend((task_type, item, n) for item in parse_many(definition.rate_limit))
    if not checks:
        return
    strategy = state.limiter.limiter
    try:
        # All or nothing: test every limit first, then take from each.
        for task_type, item, n in checks:
            if n > item.amount or not strategy.test(item, *_identifiers(task_type), cost=n):
                _refuse_task_type(strategy, task_type, item, n)
        for task_type, item, n in checks:
            if not strategy.hit(item, *_identifiers(task_type), cost=n):
                _refuse_task_type(strategy, task_type, item, n)
    except Refused:
        raise
    except Exception as exc:  # noqa: BLE001 - the limits' storage is down: not counted
        log.warning("task type limits unavailable, launches not counted: %s", exc)


def _refuse_task_type(strategy, task_type: str, item: RateLimitItem, n: int):
    reset_at, remaining = strategy.get_window_stats(item, *_identifiers(task_type))
    retry = _retry_after(reset_at)
    asked = f"{n} launches of it" if n > 1 else "one more launch"
    if n > item.amount:
        detail = (f"Task type {task_type!r} is limited to {item} (all callers together), "
                  f"fewer than the {n} launches of it in this batch: split the batch.")
    else:
        detail = (f"Task type {task_type!r} is limited to {item} (all callers together, "
                  f"to protect its queue): {remaining} left now, {asked} asked. Retry "
                  f"after {retry} s.")
    raise Refused(detail, type_=TASK_TYPE_RATE_LIMITED, retry_after=retry,
                  outcome="rate_limited")


# The OpenAPI document.

def _document(api) -> None:
    api.spec.components.response("RateLimited", {
        "description": (http.HTTPStatus(429).phrase + ": the caller's rate limit, the task "
                        "type's limit or the queue's bound (problem `type` "
                        f"`{RATE_LIMITED}`, `{TASK_TYPE_RATE_LIMITED}` or `{QUEUE_FULL}`)"),
        "headers": {"Retry-After": {"description": RETRY_AFTER_DOC,
                                    "schema": {"type": "integer"}},
                    **_header_docs(HEADERS_DOC)},
        "content": {"application/problem+json": {"schema": api.ERROR_SCHEMA}},
    })

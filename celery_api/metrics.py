"""Prometheus metrics at /metrics: what this process counts, and the exposition.

Request and launch counters are kept per process; under gunicorn they are summed over
its workers with prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``,
which gunicorn.conf.py sets up). Services record into this module (``record_launch``),
so it imports nothing from them: what is read from the rest of the system at scrape
time (queue depths, workers, run durations) is the collector of
``celery_api.metrics_collector``, handed to ``init_app`` by ``create_app``.
"""

from __future__ import annotations

import functools
import os
import time
from http import HTTPStatus

from flask import Flask, Response, current_app, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

HTTP_REQUESTS = Counter("celery_api_http_requests_total", "HTTP requests answered",
                        ["method", "endpoint", "status"])
HTTP_LATENCY = Histogram("celery_api_http_request_duration_seconds",
                         "Time to answer an HTTP request", ["method", "endpoint"],
                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
LAUNCHES = Counter("celery_api_task_launches_total", "Launch attempts by outcome",
                   ["task_type", "outcome"])
RESULT_CACHE = Counter("celery_api_result_cache_total",
                       "Launches that used the result cache: answered by an identical run "
                       "(hit) or starting one (miss)", ["task_type", "outcome"])
STATS_ROUNDS = Counter("celery_api_stats_rounds_total",
                       "Rounds of inspect broadcasts for /stats, by who sent them: the "
                       "refresher (one process for all) or a request (no fresh snapshot)",
                       ["by"])

# Label values come from a fixed set whatever clients send, so the number of series
# stays bounded: a method outside this set is "OTHER", a path no route matches is
# "unmatched" (the route's pattern is the label, never the path), and a status code is
# one of those HTTP defines, else its class ("4xx").
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "OTHER"


def status_label(status: int) -> str:
    try:
        return str(HTTPStatus(status).value)
    except ValueError:
        return f"{status // 100}xx" if 100 <= status < 600 else "other"


def record_launch(task_type: str, outcome: str) -> None:
    launch_series(task_type, outcome).inc()


@functools.lru_cache(maxsize=1024)
def launch_series(task_type: str, outcome: str):
    """The launch counter's series (``labels`` looks it up under a lock on every call).
    Task types are the catalog's (or "unknown") and outcomes a fixed set: bounded."""
    return LAUNCHES.labels(task_type=task_type, outcome=outcome)


def record_result_cache(task_type: str, outcome: str) -> None:
    RESULT_CACHE.labels(task_type=task_type, outcome=outcome).inc()


def record_stats_round(by: str) -> None:
    STATS_ROUNDS.labels(by=by).inc()


def init_app(app: Flask, system_collector) -> None:
    """Time every request; ``system_collector`` is read at each scrape (``collect()``)."""
    app.extensions["celery_api.metrics_collector"] = system_collector

    @app.before_request
    def start_timer():
        g.metrics_started = time.perf_counter()

    @app.after_request
    def observe(response):
        started = g.pop("metrics_started", None)
        if started is not None:
            req = request._get_current_object()
            rule = req.url_rule
            count, latency = request_series(method_label(req.method),
                                            rule.rule if rule else "unmatched",
                                            response.status_code)
            count.inc()
            latency.observe(time.perf_counter() - started)
        return response


@functools.lru_cache(maxsize=1024)
def request_series(method: str, endpoint: str, status: int) -> tuple:
    """The request's counter and latency series (what ``labels`` would look up, with its
    lock, on every request). The labels are a bounded set, so is this cache."""
    return (HTTP_REQUESTS.labels(method, endpoint, status_label(status)),
            HTTP_LATENCY.labels(method, endpoint))


def exposition() -> Response:
    """The /metrics body: this process (or every gunicorn worker) plus the system view."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        processes = CollectorRegistry()
        multiprocess.MultiProcessCollector(processes)
    else:
        processes = REGISTRY
    system = CollectorRegistry()
    system.register(current_app.extensions["celery_api.metrics_collector"])
    body = generate_latest(processes) + generate_latest(system)
    return Response(body, content_type=CONTENT_TYPE_LATEST)

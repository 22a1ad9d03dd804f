"""Prometheus metrics at /metrics.

Request and launch counters are kept per process; under gunicorn they are summed over
its workers with prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``,
which gunicorn.conf.py sets up). What the service knows about the rest of the system
is read at scrape time: queue depth per queue, workers online, and run durations per
task type over the last ``CELERY_API_METRICS_WINDOW_SECONDS`` from the history.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta

import sqlalchemy as sa
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
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily

from celery_api.extensions import db
from celery_api.models import TaskRun, utcnow
from celery_api.services.runstate import FINISHED

log = logging.getLogger("celery_api.metrics")

HTTP_REQUESTS = Counter("celery_api_http_requests_total", "HTTP requests answered",
                        ["method", "endpoint", "status"])
HTTP_LATENCY = Histogram("celery_api_http_request_duration_seconds",
                         "Time to answer an HTTP request", ["method", "endpoint"],
                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
LAUNCHES = Counter("celery_api_task_launches_total", "Launch attempts by outcome",
                   ["task_type", "outcome"])
RUN_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


def record_launch(task_type: str, outcome: str) -> None:
    LAUNCHES.labels(task_type=task_type, outcome=outcome).inc()


class SystemCollector:
    """Read at scrape time, from the app given at registration."""

    def __init__(self, app: Flask):
        self.app = app

    def collect(self):
        with self.app.app_context():
            yield from self._queues()
            yield from self._workers()
            yield from self._runs()

    def _queues(self):
        from celery_api.services import stats

        family = GaugeMetricFamily("celery_api_queue_depth", "Messages waiting, by queue",
                                   labels=["queue"])
        try:
            for queue, depth in stats.queue_lengths(
                    current_app.extensions["celery"], stats.known_queues()).items():
                family.add_metric([queue], depth)
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail on the broker
            log.warning("queue depth unavailable: %s", exc)
        yield family

    def _workers(self):
        celery_app = current_app.extensions["celery"]
        family = GaugeMetricFamily("celery_api_workers_online",
                                   "Workers that answered a ping")
        try:
            replies = celery_app.control.ping(timeout=current_app.config["INSPECT_TIMEOUT"])
            family.add_metric([], len(replies))
        except Exception as exc:  # noqa: BLE001
            log.warning("worker ping unavailable: %s", exc)
        yield family

    def _runs(self):
        window = current_app.config["METRICS_WINDOW_SECONDS"]
        since = utcnow() - timedelta(seconds=window)
        columns = [sa.func.sum(sa.case((TaskRun.runtime <= bound, 1), else_=0))
                   for bound in RUN_BUCKETS]
        family = GaugeHistogramMetricFamily(
            "celery_api_run_duration_seconds",
            f"Runtimes of the runs that finished in the last {int(window)} s, by task type "
            "and status (from the history)", labels=["task_type", "status"])
        try:
            rows = db.session.execute(
                sa.select(TaskRun.task_type, TaskRun.status, sa.func.count(),
                          sa.func.coalesce(sa.func.sum(TaskRun.runtime), 0.0), *columns)
                .where(TaskRun.finished_at >= since, TaskRun.status.in_(FINISHED),
                       TaskRun.runtime.is_not(None))
                .group_by(TaskRun.task_type, TaskRun.status)).all()
            db.session.rollback()
        except Exception as exc:  # noqa: BLE001
            log.warning("run durations unavailable: %s", exc)
            rows = []
        for task_type, status, count, total, *cumulative in rows:
            buckets = [(str(b), int(c or 0)) for b, c in zip(RUN_BUCKETS, cumulative,
                                                             strict=True)]
            buckets.append(("+Inf", int(count)))
            family.add_metric([task_type, status], buckets, float(total))
        yield family


def init_app(app: Flask) -> None:
    app.extensions["celery_api.metrics_collector"] = SystemCollector(app)

    @app.before_request
    def start_timer():
        g.metrics_started = time.perf_counter()

    @app.after_request
    def observe(response):
        started = g.pop("metrics_started", None)
        if started is not None:
            endpoint = request.url_rule.rule if request.url_rule else "unmatched"
            HTTP_REQUESTS.labels(request.method, endpoint, str(response.status_code)).inc()
            HTTP_LATENCY.labels(request.method, endpoint).observe(
                time.perf_counter() - started)
        return response


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

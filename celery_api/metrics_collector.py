"""What /metrics reads from the rest of the system at scrape time.

Queue depth per queue (from the broker), workers online (a ping) and the runtimes of
the runs that finished in the last ``CELERY_API_METRICS_WINDOW_SECONDS`` (from the
history, so every worker is covered). It reads services; ``celery_api.metrics``, which
services record into, does not import it: ``create_app`` hands it over.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import sqlalchemy as sa
from flask import current_app
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily

from celery_api.extensions import db
from celery_api.models import TaskRun, utcnow
from celery_api.services.runstate import FINISHED
from celery_api.services.stats import observed_queues, queue_lengths

log = logging.getLogger("celery_api.metrics")
RUN_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


class SystemCollector:
    """A prometheus_client collector, read inside the /metrics request's app context."""

    def collect(self):
        yield from self._queues()
        yield from self._workers()
        yield from self._runs()

    def _queues(self):
        family = GaugeMetricFamily("celery_api_queue_depth", "Messages waiting, by queue",
                                   labels=["queue"])
        try:
            for queue, depth in queue_lengths(current_app.extensions["celery"],
                                              observed_queues()).items():
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

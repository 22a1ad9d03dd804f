"""Worker and queue statistics.

Inspect replies are gathered with a short timeout (``CELERY_API_INSPECT_TIMEOUT``),
the four broadcasts in parallel, so a call costs one timeout at most. The
snapshot is kept ``CELERY_API_STATS_CACHE_SECONDS`` and served with its age,
so a burst of calls costs one round of broadcasts.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from flask import Flask, current_app

from celery_api.catalog import known_queues
from celery_api.services.errors import Unavailable
from celery_api.services.health import ensure_broker

log = logging.getLogger("celery_api.stats")
COMMANDS = ("stats", "active", "scheduled", "registered")


class StatsState:
    """One app's stats: the last snapshot and the threads that broadcast the inspects.

    The pool is started on the first collection, not when the module is imported or
    the app created: a worker or CLI process that never serves /stats starts no thread.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.taken = 0.0
        self.body: dict | None = None
        self._pool: ThreadPoolExecutor | None = None

    @property
    def pool(self) -> ThreadPoolExecutor:
        # Only read under ``lock`` (in snapshot), so it is created once.
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=len(COMMANDS),
                                            thread_name_prefix="inspect")
        return self._pool


def init_app(app: Flask) -> None:
    app.extensions["celery_api.stats"] = StatsState()


def queue_lengths(celery_app, queues: list[str]) -> dict[str, int]:
    lengths: dict[str, int] = {}
    with celery_app.connection_for_write() as conn:
        ensure_broker(conn, current_app.config["BROKER_TIMEOUT"])
        channel = conn.default_channel
        for name in queues:
            try:
                lengths[name] = channel.queue_declare(queue=name, passive=True).message_count
            except conn.channel_errors:
                lengths[name] = 0  # the queue does not exist yet: nothing waits in it
                channel = conn.channel()
    return lengths


def _inspect(celery_app, command: str, timeout: float):
    with celery_app.connection_for_write() as conn:
        inspector = celery_app.control.inspect(timeout=timeout, connection=conn)
        return getattr(inspector, command)() or {}


def snapshot() -> dict:
    cache_for = current_app.config["STATS_CACHE_SECONDS"]
    state: StatsState = current_app.extensions["celery_api.stats"]
    with state.lock:
        now = time.monotonic()
        if state.body is not None and now - state.taken < cache_for:
            return {**state.body, "snapshot_age_seconds": round(now - state.taken, 3)}
        body = _collect(state.pool)
        state.taken, state.body = time.monotonic(), body
        return {**body, "snapshot_age_seconds": 0.0}


def _collect(pool: ThreadPoolExecutor) -> dict:
    celery_app = current_app.extensions["celery"]
    timeout = current_app.config["INSPECT_TIMEOUT"]
    started = time.monotonic()
    try:
        lengths = queue_lengths(celery_app, known_queues())
        futures = {c: pool.submit(_inspect, celery_app, c, timeout) for c in COMMANDS}
        replies = {c: f.result() for c, f in futures.items()}
    except Exception as exc:  # noqa: BLE001
        log.error("❌ broker unreachable for stats: %s", exc)
        raise Unavailable("The task broker is unreachable; no statistics can be read.") from exc
    workers = sorted(set().union(*(r.keys() for r in replies.values())))
    registered = sorted({name for names in replies["registered"].values() for name in names})
    body = {
        "active_tasks": replies["active"],
        "scheduled_tasks": replies["scheduled"],
        "registered_tasks": registered,
        "worker_stats": replies["stats"],
        "workers_online": workers,
        "queues": lengths,
        "inspect_timeout": timeout,
        "collected_in_seconds": round(time.monotonic() - started, 3),
    }
    if not workers:
        body["note"] = f"No worker answered within {timeout} s: none may be running."
    return body

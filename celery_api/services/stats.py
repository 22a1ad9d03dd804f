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

from flask import current_app

from celery_api.catalog import known_queues
from celery_api.services.errors import Unavailable
from celery_api.services.health import ensure_broker

log = logging.getLogger("celery_api.stats")
_lock = threading.Lock()
_cache: dict = {}
_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="inspect")
COMMANDS = ("stats", "active", "scheduled", "registered")


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


def _inspect(celery_app, command: str, timeout: float, limit: int | None):
    with celery_app.connection_for_write() as conn:
        inspector = celery_app.control.inspect(timeout=timeout, connection=conn, limit=limit)
        return getattr(inspector, command)() or {}


def snapshot() -> dict:
    cache_for = current_app.config["STATS_CACHE_SECONDS"]
    with _lock:
        cached = _cache.get(current_app.name)
        now = time.monotonic()
        if cached and now - cached["taken"] < cache_for:
            return {**cached["body"], "snapshot_age_seconds": round(now - cached["taken"], 3)}
        body = _collect()
        _cache[current_app.name] = {"taken": time.monotonic(), "body": body}
        return {**body, "snapshot_age_seconds": 0.0}


def _collect() -> dict:
    celery_app = current_app.extensions["celery"]
    timeout = current_app.config["INSPECT_TIMEOUT"]
    started = time.monotonic()
    try:
        lengths = queue_lengths(celery_app, known_queues())
        futures = {c: _pool.submit(_inspect, celery_app, c, timeout, None)
                   for c in COMMANDS}
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

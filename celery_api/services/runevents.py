"""Run notifications: a small message each time a run may have changed, and the sources
an API process reads them from to wake the clients waiting on runs (README "Waiting
for a run").

A notification carries a run's id and nothing else: it only wakes. What a waiting
client is answered is always read from the record (``runs.describe``), so a lost or
duplicated message delays an answer or costs a read, and never makes one wrong.

- **Publishing**: each commit that changed a run's state (every writer goes through
  ``runstate``, which notes the runs it changed) and each ``report_progress`` sends one
  ``PUBLISH`` on :data:`CHANNEL` of the Redis named by ``REDIS_URL``, else of the broker
  when it is Redis. No Redis (a RabbitMQ broker and no ``REDIS_URL``): nothing is
  published, and API processes poll instead.
- **Listening**: each API process has one source for all its waiters: one Redis
  subscriber (:class:`RedisSource`), or one poller (:class:`PollSource`) that reads
  every waited run in one indexed query per tick. Either way the waiting hub re-reads
  every waited run's state at a short interval, so a lost message costs at most that.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
import sqlalchemy as sa
from flask import current_app

from celery_api.extensions import db
from celery_api.fences import celery as celery_fence
from celery_api.models import TaskRun
from celery_api.services import runstate

log = logging.getLogger("celery_api.runevents")
CHANNEL = "celery-api:run-changed"
_QUIET_SECONDS = 30.0  # one warning per this long while Redis is down
_clients: dict[str, redis.Redis] = {}
_clients_lock = threading.Lock()
_warned_at = 0.0


def notify_url(config) -> str | None:
    """The Redis URL notifications go through (redis-py's spelling), or None."""
    url = config.get("REDIS_URL") or config["CELERY"]["broker_url"]
    if not url:
        return None
    if url.startswith("redis+socket://"):
        return "unix://" + url[len("redis+socket://"):]
    if url.startswith(("redis://", "rediss://", "unix://")):
        return url
    return None


def _client(url: str) -> redis.Redis:
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            client = _clients[url] = redis.Redis.from_url(
                url, socket_timeout=0.5, socket_connect_timeout=0.5)
        return client


def publish(task_id: str | None) -> None:
    """Say that ``task_id`` may have changed (after its change is committed). Never
    raises: a notification that cannot be sent is caught up by the re-check."""
    global _warned_at
    if not task_id:
        return
    try:
        url = notify_url(current_app.config)
    except RuntimeError:  # no app context
        return
    if url is None:
        return
    try:
        _client(url).publish(CHANNEL, task_id)
    except Exception as exc:  # noqa: BLE001 - runs inside commits: must never raise
        now = time.monotonic()
        if now - _warned_at > _QUIET_SECONDS:
            _warned_at = now
            log.warning("run notification for %s not sent (waiters re-check): %s",
                        task_id, exc)


class RedisSource:
    """One subscriber for a whole process: yields the ids named by messages."""

    kind = "redis"

    def __init__(self, url: str):
        self.url = url
        self.pubsub = None
        self._retry_at = 0.0

    def _connect(self) -> bool:
        if self.pubsub is not None:
            return True
        if time.monotonic() < self._retry_at:
            return False
        try:
            client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5,
                                          socket_timeout=None)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(CHANNEL)
            self.pubsub = pubsub
            return True
        except redis.RedisError as exc:
            log.warning("run notifications unavailable (waiters re-check): %s", exc)
            self._retry_at = time.monotonic() + 1.0
            return False

    def wait(self, timeout: float) -> set[str]:
        """The ids notified within ``timeout`` seconds (returns at the first message,
        with every message already received)."""
        if not self._connect():
            time.sleep(min(timeout, 0.1))
            return set()
        ids: set[str] = set()
        try:
            message = self.pubsub.get_message(timeout=timeout)
            while message is not None:
                if message.get("type") == "message":
                    ids.add(message["data"].decode("ascii", "replace"))
                message = self.pubsub.get_message(timeout=0)
        except (redis.RedisError, OSError, ValueError) as exc:
            log.warning("run notifications interrupted (waiters re-check): %s", exc)
            self.close()
            self._retry_at = time.monotonic() + 1.0
        return ids

    def close(self) -> None:
        if self.pubsub is not None:
            try:
                self.pubsub.close()
            except (redis.RedisError, OSError):
                pass
            self.pubsub = None


class PollSource:
    """No Redis: no messages. The hub's re-check runs at the poll interval instead."""

    kind = "poll"

    def __init__(self):
        self.event = threading.Event()

    def wait(self, timeout: float) -> set[str]:
        self.event.wait(timeout)
        self.event.clear()
        return set()

    def close(self) -> None:
        self.event.set()


def source_for(config):
    url = notify_url(config)
    return RedisSource(url) if url else PollSource()


def fingerprint(status: str, progress: dict | None) -> tuple:
    """What a change of a run is, for the event stream: its state and its progress."""
    if not progress:
        return (status, None)
    return (status, progress.get("current"), progress.get("total"), progress.get("message"))


def current_fingerprints(task_ids: list[str]) -> dict[str, tuple]:
    """Every given run's :func:`fingerprint`, read in one indexed query on the record
    (plus one read of the result backend's live state for the unfinished ones, where
    progress lives). Runs that do not exist are left out. Call in an app context."""
    found: dict[str, tuple] = {}
    unfinished: list[str] = []
    for chunk_start in range(0, len(task_ids), 500):
        chunk = task_ids[chunk_start:chunk_start + 500]
        for task_id, status, meta in db.session.execute(
                sa.select(TaskRun.id, TaskRun.status, TaskRun.meta)
                .where(TaskRun.id.in_(chunk))):
            found[task_id] = fingerprint(status, _progress(meta))
            if not runstate.is_finished(status):
                unfinished.append(task_id)
    db.session.commit()  # end the read transaction: the next tick sees new commits
    if unfinished:
        try:
            metas = celery_fence.backend_metas(
                current_app.extensions["celery"].backend, unfinished)
        except Exception as exc:  # noqa: BLE001 - the record still answers
            log.debug("result backend unreadable during the re-check: %s", exc)
            metas = {}
        for task_id, meta in metas.items():
            state = meta.get("status") or "PENDING"
            if state == "PENDING":
                continue
            result = meta.get("result")
            progress = _progress(result) if state in ("PROGRESS", "STARTED") else None
            found[task_id] = fingerprint(state, progress)
    return found


def _progress(meta) -> dict | None:
    if isinstance(meta, dict) and {"current", "total"} <= meta.keys():
        return meta
    return None

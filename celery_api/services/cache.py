"""The response cache for successful runs.

A run that ended in SUCCESS never changes again (only FAILURE and REVOKED runs can
be retried, which adds to their ``retried_as``), so its status body is kept once
built: in this process's memory (a bounded TTL cache, no network at all) and, when
``REDIS_URL`` is set, in Redis, shared by every API process. ``CELERY_API_CACHE_SECONDS``
(0 turns it off) is how long an entry lives. The retention purge deletes the Redis
entries of the runs it removes; another process's memory may still answer for such a
run until its entry expires. A Redis cache that does not answer is skipped (memory and
the database answer), never an error.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from cachetools import TTLCache
from flask import Flask, current_app

log = logging.getLogger("celery_api.cache")
PREFIX = "celery-api:run:"
_QUIET_SECONDS = 30.0  # one warning per this long while Redis is down


class RunCache:
    def __init__(self, ttl: float, size: int, url: str | None = None, timeout: float = 0.5):
        self.ttl = ttl
        self.memory: TTLCache = TTLCache(maxsize=size, ttl=ttl)
        self.lock = threading.Lock()  # gthread workers share the process's cache
        self.client = (redis.Redis.from_url(url, socket_timeout=timeout,
                                            socket_connect_timeout=timeout)
                       if url else None)
        self._warned_at = 0.0

    def _failed(self, action: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at > _QUIET_SECONDS:
            self._warned_at = now
            log.warning("Redis cache unavailable (%s skipped): %s", action, exc)

    def get(self, task_id: str) -> bytes | None:
        with self.lock:
            body = self.memory.get(task_id)
        if body is not None or self.client is None:
            return body
        try:
            body = self.client.get(PREFIX + task_id)
        except redis.RedisError as exc:
            self._failed("read", exc)
            return None
        if body is not None:
            with self.lock:
                self.memory[task_id] = body
        return body

    def put(self, task_id: str, body: bytes) -> None:
        with self.lock:
            self.memory[task_id] = body
        if self.client is None:
            return
        try:
            self.client.set(PREFIX + task_id, body, ex=max(1, int(self.ttl)))
        except redis.RedisError as exc:
            self._failed("write", exc)

    def forget(self, *task_ids: str) -> None:
        if not task_ids:
            return
        with self.lock:
            for task_id in task_ids:
                self.memory.pop(task_id, None)
        if self.client is None:
            return
        try:
            self.client.delete(*(PREFIX + task_id for task_id in task_ids))
        except redis.RedisError as exc:
            self._failed("invalidation", exc)


def init_app(app: Flask) -> None:
    ttl = app.config.get("CACHE_SECONDS", 0)
    app.extensions["celery_api.cache"] = (
        RunCache(ttl, app.config["CACHE_SIZE"], app.config.get("REDIS_URL"),
                 app.config["BROKER_TIMEOUT"]) if ttl > 0 else None)


def run_cache() -> RunCache | None:
    return current_app.extensions.get("celery_api.cache")

"""The result cache: a launch answered by an identical run instead of a new one.

A launch *uses the cache* when its task type declares a ``cache_ttl`` in the catalog or
the launch sends ``cache_ttl`` (0 opts out), and it has no ``countdown``, ``eta`` or
``expires`` (README, "Result caching"). Its *identity* is the SHA-256 of the canonical
JSON (sorted keys, compact) of its task type, its params as the task's schema loaded
them (defaults applied), its queue and its priority. Such a launch is answered by the
newest run of the same identity that is unfinished (not revoked, no termination asked;
if PENDING, younger than ``pending_seconds``) or that succeeded less than ``cache_ttl``
seconds ago; otherwise it starts a run, which carries the identity in
``task_runs.cache_key``.

Who starts the run when identical launches race:

- with ``REDIS_URL``, a Redis key per identity names the run answering it. A launch
  that finds no key, or one naming a run that can no longer answer (failed, revoked,
  too old, purged), replaces it in one Lua compare-and-set; of two racing launches one
  sets it, and the other reads it again and is answered by the winner's run. The key
  lives ``cache_ttl`` plus an hour; the database record is always what says whether
  its run may answer.
- in every case, a unique index over the unfinished runs of an identity
  (``ux_task_runs_open_cache_key``) refuses a second one: the insert that loses is
  answered by the run that won. Without ``REDIS_URL`` (or while Redis does not answer,
  and for ``BREAKER_SECONDS`` after it failed) this index decides alone, and the lookup
  is an indexed query of ``task_runs``.
- the index covers unfinished runs only: a launch whose lookup missed while an
  identical run was in flight, and which inserts after that run succeeded, looks again
  before it publishes (``answered_by_other``) and yields to it.
- a Redis miss (no key, or one naming a run that cannot answer) asks the database
  before claiming: a flushed, restarted or expired key never hides a success.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import redis
import sqlalchemy as sa
from flask import Flask, current_app

from celery_api.extensions import db
from celery_api.models import TaskRun, utcnow
from celery_api.services import runstate

log = logging.getLogger("celery_api.result_cache")

PREFIX = "celery-api:result-cache:"
# A key outlives its success by cache_ttl; this much more covers the run's time in
# flight. A run in flight for longer is still deduplicated by the database's index.
IN_FLIGHT_SECONDS = 3600
_QUIET_SECONDS = 30.0  # one warning per this long while Redis is down
# After a Redis error the cache leaves Redis alone this long (the database decides): a
# Redis that hangs (frozen, a dead route) costs one socket timeout, not one per launch.
BREAKER_SECONDS = 5.0

# Set KEYS[1] to ARGV[1] (for ARGV[3] s) when it is missing or names ARGV[2].
_COMPARE_AND_SET = """
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[3]))
  return 1
end
return 0
"""
# Delete KEYS[1] if it names ARGV[1].
_COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def now() -> datetime:
    """The clock of cache_ttl (tests move it)."""
    return utcnow()


def monotonic() -> float:
    """The circuit breaker's clock (tests move it)."""
    return time.monotonic()


def pending_seconds(config=None) -> float:
    """How long a PENDING run answers identical launches: what reconcile waits before it
    calls a PENDING run stranded (its grace plus the broker's visibility timeout). A run
    whose launch died between its record and its publish never leaves PENDING; past
    this it answers no more, so it cannot hold its identity forever."""
    config = config or current_app.config
    transport = config["CELERY"].get("broker_transport_options") or {}
    return config["RECONCILE_GRACE_SECONDS"] + transport.get("visibility_timeout", 0)


def identity(record: dict) -> str:
    """The cache key of a prepared run's record: what makes two launches the same."""
    canonical = json.dumps(
        {"task_type": record["task_type"], "params": record["params"],
         "queue": record["queue"], "priority": record["priority"]},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def ttl_of(definition_ttl: int | None, cache_ttl: int | None, *, bypass: bool) -> int | None:
    """Seconds a success may answer this launch, or None when it does not use the cache.

    ``cache_ttl``: the launch's (None: the task type's ``definition_ttl``; 0: opted
    out). ``bypass``: it has a countdown, eta, expires or its own webhook_url.
    """
    if bypass or not current_app.config.get("RESULT_CACHE", True):
        return None
    ttl = definition_ttl if cache_ttl is None else cache_ttl
    return ttl or None


@dataclass(frozen=True)
class Hit:
    """The run that answers a launch."""

    id: str
    task_type: str
    status: str


def _servable(row, key: str, ttl: int, moment: datetime) -> bool:
    if row is None or row.cache_key != key:
        return False  # purged, or its termination was asked (the key is cleared)
    if row.status == "PENDING":
        return row.created_at > moment - timedelta(seconds=pending_seconds())
    if row.status in runstate.UNFINISHED:
        return True
    return (row.status == "SUCCESS" and row.finished_at is not None
            and moment - row.finished_at < timedelta(seconds=ttl))


_COLUMNS = (TaskRun.id, TaskRun.task_type, TaskRun.status, TaskRun.finished_at,
            TaskRun.cache_key, TaskRun.created_at)


def _answering(key: str, ttl: int, moment: datetime):
    """The condition of the runs of identity ``key`` that may answer at ``moment``."""
    return sa.and_(TaskRun.cache_key == key, sa.or_(
        TaskRun.status.in_(runstate.UNFINISHED - {"PENDING"}),
        sa.and_(TaskRun.status == "PENDING",
                TaskRun.created_at > moment - timedelta(seconds=pending_seconds())),
        sa.and_(TaskRun.status == "SUCCESS",
                TaskRun.finished_at > moment - timedelta(seconds=ttl))))


def find_in_database(key: str, ttl: int) -> Hit | None:
    """The newest run of identity ``key`` that may answer (unfinished and, if PENDING,
    younger than ``pending_seconds``; or succeeded less than ``ttl`` seconds ago)."""
    moment = now()
    with db.engine.connect() as conn:
        row = conn.execute(
            sa.select(*_COLUMNS).where(_answering(key, ttl, moment))
            .order_by(TaskRun.created_at.desc()).limit(1)).first()
    if row is None or not _servable(row, key, ttl, moment):
        return None
    return Hit(row.id, row.task_type, row.status)


def answered_by_other(key: str, ttl: int, record: dict) -> Hit | None:
    """After recording ``record`` (not published yet): another run of its identity that
    answers it instead. The unique index keeps a second unfinished run out, but not a run
    that finished (SUCCESS) between this launch's lookup and its insert; and without the
    index (Redis alone) the older of two unfinished runs wins, so only one yields."""
    moment = now()
    with db.engine.connect() as conn:
        rows = conn.execute(
            sa.select(*_COLUMNS)
            .where(_answering(key, ttl, moment), TaskRun.id != record["id"])
            .order_by(TaskRun.created_at.desc())).all()
    mine = (record["created_at"], record["id"])
    for row in rows:
        if _servable(row, key, ttl, moment) and (
                row.status == "SUCCESS" or (row.created_at, row.id) < mine):
            return Hit(row.id, row.task_type, row.status)
    return None


def release_stale(key: str) -> int:
    """Take identity ``key`` from its PENDING runs older than ``pending_seconds`` (never
    published, or their message lost): they answer no more, and the unique index must
    let a new run in. Guarded by the status, so a worker's claim of one wins or loses
    whole."""
    moment = now()
    with db.engine.begin() as conn:
        return conn.execute(
            sa.update(TaskRun)
            .where(TaskRun.cache_key == key, TaskRun.status == "PENDING",
                   TaskRun.created_at <= moment - timedelta(seconds=pending_seconds()))
            .values(cache_key=None)).rowcount


def _run(run_id: str):
    with db.engine.connect() as conn:
        return conn.execute(sa.select(*_COLUMNS).where(TaskRun.id == run_id)).first()


class DatabaseStore:
    """No REDIS_URL: the unique index decides; nothing to claim or release."""

    def find(self, key: str, ttl: int) -> tuple[Hit | None, str | None]:
        return find_in_database(key, ttl), None

    def claim(self, key: str, run_id: str, seen: str | None, ttl: int) -> bool:
        return True

    def point(self, key: str, run_id: str, expected: str, ttl: int) -> None:
        pass

    def release(self, key: str, run_id: str) -> None:
        pass


class RedisStore:
    """``REDIS_URL``: one key per identity names the run that answers it."""

    def __init__(self, url: str, timeout: float):
        self.client = redis.Redis.from_url(url, socket_timeout=timeout,
                                           socket_connect_timeout=timeout)
        self._set = self.client.register_script(_COMPARE_AND_SET)
        self._delete = self.client.register_script(_COMPARE_AND_DELETE)
        self._warned_at = 0.0
        self.down_until = 0.0  # the breaker: Redis is skipped until then

    def available(self) -> bool:
        return monotonic() >= self.down_until

    def failed(self, action: str, exc: Exception) -> None:
        self.down_until = monotonic() + BREAKER_SECONDS
        moment = time.monotonic()
        if moment - self._warned_at > _QUIET_SECONDS:
            self._warned_at = moment
            log.warning("Redis unavailable for the result cache (%s): the database "
                        "decides meanwhile: %s", action, exc)

    def find(self, key: str, ttl: int) -> tuple[Hit | None, str | None]:
        """The run the key names if it may answer; else the database's answer (a key
        lost to a flush, a restart or its expiry must not hide a success), pointed to
        by the key; else None and what the key named."""
        named = self.client.get(PREFIX + key)
        run_id = named.decode() if named is not None else None
        if run_id is not None:
            row = _run(run_id)
            if _servable(row, key, ttl, now()):
                return Hit(row.id, row.task_type, row.status), run_id
        hit = find_in_database(key, ttl)
        if hit is not None:
            self.claim(key, hit.id, run_id, ttl)  # lost to another launch: it names one
        return hit, run_id

    def claim(self, key: str, run_id: str, seen: str | None, ttl: int) -> bool:
        """Name ``run_id`` in the key if it still names ``seen`` (or nothing)."""
        return bool(self._set(keys=[PREFIX + key],
                              args=[run_id, seen or "", ttl + IN_FLIGHT_SECONDS]))

    def point(self, key: str, run_id: str, expected: str, ttl: int) -> None:
        """The database named another run: let the key name it (if still ours)."""
        try:
            self.claim(key, run_id, expected, ttl)
        except redis.RedisError as exc:
            self.failed("repoint", exc)

    def release(self, key: str, run_id: str) -> None:
        """The run was not started: forget the key if it still names it."""
        try:
            self._delete(keys=[PREFIX + key], args=[run_id])
        except redis.RedisError as exc:
            # The key names a run that does not exist: the next launch replaces it.
            self.failed("release", exc)


def init_app(app: Flask) -> None:
    url = app.config.get("REDIS_URL")
    app.extensions["celery_api.result_cache"] = (
        RedisStore(url, app.config["BROKER_TIMEOUT"]) if url else DatabaseStore())


def store() -> DatabaseStore | RedisStore:
    """The store that decides now: Redis's, unless it failed less than
    ``BREAKER_SECONDS`` ago (then the database's)."""
    chosen = current_app.extensions["celery_api.result_cache"]
    if isinstance(chosen, RedisStore) and not chosen.available():
        return DatabaseStore()
    return chosen

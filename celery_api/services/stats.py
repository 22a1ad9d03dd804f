"""Worker and queue statistics, answered at once for every caller.

An answer (workers, their tasks, queue lengths) is a *snapshot*, served with the time
its broadcasts were sent (``snapshot_at``) and its age, never older than
``STATS_MAX_AGE_SECONDS``: an older one is replaced before the call answers, and a
broker that is down then makes the call a 503. Reading it costs one Redis GET; reading
the queues alone from the broker cost more (kombu opens a Redis connection per
channel: 6 to 38 ms per call, measured), which is why they are in the snapshot too.

How the snapshot is kept fresh:

- With Redis (``REDIS_URL``, else the broker when it is Redis) the snapshot is one key
  that every API process reads with one GET. One process refreshes it, every
  ``STATS_REFRESH_SECONDS``, in a thread: the holder of a lock taken with SET NX PX
  and renewed each round. A caller that finds the snapshot stale (its refresher died,
  or stopped) takes the lock and starts refreshing in its own process. Without Redis
  (RabbitMQ and no ``REDIS_URL``) each process keeps its own snapshot the same way.
- Refreshing stops once nobody has asked for ``STATS_IDLE_SECONDS``, so an idle API
  broadcasts nothing; the next call then pays one round itself.
- A round asks only the workers known from the round before (``destination`` plus
  ``limit``: it returns as soon as the last of them has answered, not after the whole
  ``INSPECT_TIMEOUT``). A ``ping`` to every worker, sent in parallel by the refresher,
  finds the workers the next round asks: new ones join, stopped ones (which answer
  neither) drop out. With no worker known (the first call ever, or none running) a
  round asks everyone and waits the timeout.

Threads start on a process's first /stats call (after gunicorn's fork; never in a
worker or CLI process) and are stopped at exit, releasing the lock.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import redis
from flask import Flask, current_app

from celery_api import metrics
from celery_api.catalog import known_queues
from celery_api.services.errors import Unavailable
from celery_api.services.health import broker_connection
from celery_api.services.webhooks import QUEUE as WEBHOOKS_QUEUE
from celery_api.settings import ConfigurationError

log = logging.getLogger("celery_api.stats")
COMMANDS = ("stats", "active", "scheduled", "registered")
KEEP_SECONDS = 86400  # the last snapshot (and its known workers) outlives quiet periods
_QUIET_LOG_SECONDS = 30.0  # one warning per this long while the snapshot store is down


class Exiting(Exception):
    """The process is exiting: no new round can start."""


@dataclass
class Snapshot:
    body: dict  # the workers' part of an answer
    taken_at: float  # when its broadcasts were sent (epoch seconds)
    known: list[str]  # the workers the next round asks

    def age(self) -> float:
        return max(0.0, time.time() - self.taken_at)

    def dumps(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def loads(cls, raw: bytes | None) -> Snapshot | None:
        try:
            return cls(**json.loads(raw)) if raw else None
        except (ValueError, TypeError):
            return None  # written by another version: replaced by the next round


class MemoryStore:
    """One process's snapshot, when there is no Redis: each process refreshes its own."""

    shared = False

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.asked_at = float("-inf")

    def read(self, idle: float) -> Snapshot | None:
        self.asked_at = time.monotonic()
        return self.snapshot

    def peek(self) -> Snapshot | None:
        return self.snapshot

    def write(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def asked_within(self, idle: float) -> bool:
        return time.monotonic() - self.asked_at < idle

    def lead(self, owner: str, ttl: float) -> bool:
        return True

    def release(self, owner: str) -> None:
        pass


# SET NX PX when the lock is free; renewed (PEXPIRE) when its holder asks again.
_LEAD = """
local holder = redis.call('get', KEYS[1])
if not holder then
  redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
  return 1
elseif holder == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class RedisStore:
    """The snapshot every API process shares, the refresher's lock, and "someone asked"."""

    shared = True

    def __init__(self, url: str, namespace: str, timeout: float) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=timeout,
                                           socket_connect_timeout=timeout)
        prefix = f"celery-api:stats:{namespace}:"
        self.key, self.asked_key, self.lock_key = (
            prefix + "snapshot", prefix + "asked", prefix + "refresher")
        self._lead = self.client.register_script(_LEAD)
        self._release = self.client.register_script(_RELEASE)

    def read(self, idle: float) -> Snapshot | None:
        """The snapshot, and a mark that someone asked (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.key)
        pipe.set(self.asked_key, b"1", px=max(1, int(idle * 1000)))
        raw, _ = pipe.execute()
        return Snapshot.loads(raw)

    def peek(self) -> Snapshot | None:
        return Snapshot.loads(self.client.get(self.key))

    def write(self, snapshot: Snapshot) -> None:
        self.client.set(self.key, snapshot.dumps(), ex=KEEP_SECONDS)

    def asked_within(self, idle: float) -> bool:
        return bool(self.client.exists(self.asked_key))  # the mark expires after ``idle``

    def lead(self, owner: str, ttl: float) -> bool:
        return bool(self._lead(keys=[self.lock_key], args=[owner, max(1, int(ttl * 1000))]))

    def release(self, owner: str) -> None:
        self._release(keys=[self.lock_key], args=[owner])


def store_url(config: dict) -> str | None:
    """Where the shared snapshot lives: ``REDIS_URL``, else the broker when it is Redis."""
    if config.get("REDIS_URL"):
        return config["REDIS_URL"]
    broker = config["CELERY"]["broker_url"]
    if broker.startswith("redis+socket://"):  # kombu's Unix socket form (the embedded Redis)
        return "unix://" + broker[len("redis+socket://"):]
    return broker if broker.startswith(("redis://", "rediss://")) else None


class StatsState:
    """One app's snapshot, its store, and (in the process that refreshes) the thread."""

    def __init__(self, app: Flask) -> None:
        config = app.config
        self.app = app
        self.max_age = max(0.0, config["STATS_MAX_AGE_SECONDS"])
        self.refresh = max(0.1, config["STATS_REFRESH_SECONDS"])
        self.idle = max(config["STATS_IDLE_SECONDS"], self.refresh)
        self.timeout = config["INSPECT_TIMEOUT"]
        self.broker_timeout = config["BROKER_TIMEOUT"]
        check_bound(self.max_age, self.timeout, self.broker_timeout)
        # A round lasts about one timeout (the ping waits it out), two when a known worker
        # is silent. The lock outlives that; a snapshot older than a pause and two rounds
        # means its refresher is gone, and a caller takes over.
        self.stale_after = self.refresh + 2 * self.timeout
        self.lock_ttl = self.refresh + 3 * self.timeout + 1
        self._url = store_url(config)
        broker = config["CELERY"]["broker_url"].encode()
        self._namespace = hashlib.sha256(broker).hexdigest()[:12]  # one snapshot per broker
        self._exit_hook = False
        self._reset()

    def _reset(self) -> None:
        """Fresh per-process state: at creation, and in a process forked from this one."""
        self.pid = os.getpid()
        self.lock = threading.Lock()  # one round per process at a time
        self.thread_lock = threading.Lock()  # starting and stopping the refresher
        self.stopping = threading.Event()
        self.refresher: threading.Thread | None = None
        self.owner = f"{socket.gethostname()}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self.discovered: set[str] = set()  # workers the last ping found
        self.local: Snapshot | None = None  # the last one this process saw
        self._pool: ThreadPoolExecutor | None = None
        self.store = (RedisStore(self._url, self._namespace, self.broker_timeout)
                      if self._url else MemoryStore())
        self._warned_at = 0.0

    @property
    def pool(self) -> ThreadPoolExecutor:
        with self.thread_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=len(COMMANDS) + 1,
                                                thread_name_prefix="inspect")
            return self._pool

    # -- answering -----------------------------------------------------------------

    def current(self) -> Snapshot:
        """A snapshot no older than ``max_age``; a round of broadcasts when needed."""
        if os.getpid() != self.pid:
            self._reset()
        if self.max_age <= 0:  # no snapshot kept: every call asks every worker
            return self._collect(None, by="request")
        shared = True
        try:
            snapshot = self.store.read(self.idle)
        except redis.RedisError as exc:
            self._warn("read", exc)
            snapshot, shared = self.local, False
        if snapshot is not None:
            self.local = snapshot
        if shared and (snapshot is None or snapshot.age() > self.stale_after):
            self._take_over()
        if snapshot is not None and snapshot.age() <= self.max_age:
            return snapshot
        with self.lock:  # callers of this process wait for one round, then share it
            latest = self._latest() if shared else self.local
            if latest is not None and latest.age() <= self.max_age:
                return latest
            snapshot = self._collect((latest or snapshot).known if (latest or snapshot)
                                     else None, by="request")
            self._save(snapshot)
            return snapshot

    def _latest(self) -> Snapshot | None:
        try:
            return self.store.peek() or self.local
        except redis.RedisError as exc:
            self._warn("read", exc)
            return self.local

    def _save(self, snapshot: Snapshot) -> None:
        self.local = snapshot
        try:
            self.store.write(snapshot)
        except redis.RedisError as exc:
            self._warn("write", exc)

    def _warn(self, action: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at > _QUIET_LOG_SECONDS:
            self._warned_at = now
            log.warning("stats snapshot store unavailable (%s): %s; each API process "
                        "collects its own meanwhile", action, exc)

    # -- the round of broadcasts -----------------------------------------------------

    def _collect(self, known: list[str] | None, *, by: str) -> Snapshot:
        """One round: the four inspects in parallel, to ``known`` workers when given."""
        celery_app = current_app.extensions["celery"]
        taken_at, started = time.time(), time.monotonic()
        futures = {command: self._submit(celery_app, command, known) for command in COMMANDS}
        try:
            lengths = queue_lengths(celery_app, observed_queues(), self.broker_timeout)
            replies = {command: future.result() for command, future in futures.items()}
        except Exception as exc:  # noqa: BLE001
            log.error("❌ broker unreachable for stats: %s", exc)
            raise Unavailable("The task broker is unreachable; no statistics can be read.") \
                from exc
        metrics.record_stats_round(by)
        workers = sorted(set().union(*(r.keys() for r in replies.values())))
        registered = sorted({name for names in replies["registered"].values()
                             for name in names})
        body = {
            "active_tasks": replies["active"],
            "scheduled_tasks": replies["scheduled"],
            "registered_tasks": registered,
            "worker_stats": replies["stats"],
            "workers_online": workers,
            "queues": lengths,
            "inspect_timeout": self.timeout,
            "collected_in_seconds": round(time.monotonic() - started, 3),
        }
        if not workers:
            body["note"] = f"No worker answered within {self.timeout} s: none may be running."
        return Snapshot(body, taken_at, workers)

    def _submit(self, celery_app, command: str, known: list[str] | None) -> Future:
        try:
            return self.pool.submit(_replies, celery_app, command, self.timeout,
                                    self.broker_timeout, known)
        except RuntimeError as exc:  # concurrent.futures refuses new work at exit
            raise Exiting from exc

    # -- the refresher -----------------------------------------------------------------

    def _take_over(self) -> None:
        """Start refreshing in this process, if no process holds the lock."""
        with self.thread_lock:
            if self.refresher is not None:
                return
            try:
                if not self.store.lead(self.owner, self.lock_ttl):
                    return
            except redis.RedisError as exc:
                self._warn("lock", exc)
                return
            self.stopping.clear()
            self.refresher = threading.Thread(target=self._run, name="stats-refresher",
                                              daemon=True)
            self.refresher.start()
            if not self._exit_hook:
                atexit.register(self.close)
                self._exit_hook = True
        log.info("stats: this process (%s) refreshes the snapshot", self.owner)

    def _run(self) -> None:
        with self.app.app_context():
            while not self.stopping.is_set():
                started = time.monotonic()
                with self.thread_lock:
                    if not self._still_wanted():
                        self.refresher = None
                        return
                try:
                    self._round()
                except Unavailable:
                    pass  # logged; callers get 503 from the queue read meanwhile
                except Exiting:
                    break  # the interpreter is exiting (close() releases the lock)
                except Exception:  # noqa: BLE001 - the thread must outlive one bad round
                    log.exception("stats refresh failed")
                self.stopping.wait(max(0.0, self.refresh - (time.monotonic() - started)))
        with self.thread_lock:
            self.refresher = None

    def _still_wanted(self) -> bool:
        """Someone asked within ``idle`` and this process still holds the lock."""
        try:
            if not self.store.asked_within(self.idle):
                self.store.release(self.owner)
                log.info("stats: nobody asked for %s s, the snapshot is no longer refreshed",
                         self.idle)
                return False
            if not self.store.lead(self.owner, self.lock_ttl):
                log.info("stats: another process refreshes the snapshot")
                return False
        except redis.RedisError as exc:
            self._warn("refresh", exc)
            return False
        return True

    def _round(self) -> None:
        previous = self._latest()
        known = sorted(set(previous.known if previous else ()) | self.discovered)
        celery_app = current_app.extensions["celery"]
        # Who is out there, for the next round (only a full timeout can tell).
        ping = self._submit(celery_app, "ping", None) if known else None
        snapshot = self._collect(known or None, by="refresher")
        self._save(snapshot)
        if ping is not None:
            try:
                self.discovered = set(ping.result())
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("stats: worker discovery failed: %s", exc)

    def close(self) -> None:
        """Stop refreshing (at exit): the lock is released for another process."""
        if os.getpid() != self.pid:
            return
        self.stopping.set()
        thread = self.refresher
        if thread is not None:
            thread.join(3 * self.timeout + 1)
        try:
            self.store.release(self.owner)
        except redis.RedisError:
            pass
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _replies(celery_app, command: str, timeout: float, broker_timeout: float,
             known: list[str] | None) -> dict:
    # A dead broker fails fast, never hangs a round.
    with broker_connection(celery_app, broker_timeout) as conn:
        if known:
            inspector = celery_app.control.inspect(
                timeout=timeout, connection=conn, destination=list(known), limit=len(known))
        else:
            inspector = celery_app.control.inspect(timeout=timeout, connection=conn)
        return getattr(inspector, command)() or {}


def check_bound(max_age: float, timeout: float, broker_timeout: float) -> None:
    """Refuse a max age that a round itself can outlast: a snapshot is as old as its
    round when it is written (up to the inspect timeout plus the broker's), so /stats
    could not keep the bound it states. 0 (every call collects) has no bound to keep."""
    if max_age > 0 and timeout + broker_timeout >= max_age:
        raise ConfigurationError(
            f"CELERY_API_STATS_MAX_AGE_SECONDS ({max_age:g} s) must be greater than "
            f"CELERY_API_INSPECT_TIMEOUT ({timeout:g} s) plus CELERY_API_BROKER_TIMEOUT "
            f"({broker_timeout:g} s): a round of broadcasts takes up to that long, so "
            "/stats could answer older than its bound. Raise the max age (or set it to 0: "
            "every call collects), or lower the inspect timeout.")


def init_app(app: Flask) -> None:
    app.extensions["celery_api.stats"] = StatsState(app)


def observed_queues() -> list[str]:
    """The queues whose depth /stats and /metrics show: the catalog's, where tasks are
    launched, and the webhook deliveries' own (a backlog there is worth seeing too)."""
    return [*known_queues(), WEBHOOKS_QUEUE]


def queue_lengths(celery_app, queues: list[str], timeout: float | None = None
                  ) -> dict[str, int]:
    lengths: dict[str, int] = {}
    timeout = current_app.config["BROKER_TIMEOUT"] if timeout is None else timeout
    with broker_connection(celery_app, timeout) as conn:
        channel = conn.default_channel
        for name in queues:
            try:
                lengths[name] = channel.queue_declare(queue=name, passive=True).message_count
            except conn.channel_errors:
                lengths[name] = 0  # the queue does not exist yet: nothing waits in it
                channel = conn.channel()
    return lengths


def snapshot() -> dict:
    """The /stats answer: the snapshot, with its time and age."""
    state: StatsState = current_app.extensions["celery_api.stats"]
    current = state.current()
    return {**current.body, "snapshot_at": datetime.fromtimestamp(current.taken_at, UTC),
            "snapshot_age_seconds": round(current.age(), 3),
            "snapshot_max_age_seconds": state.max_age}

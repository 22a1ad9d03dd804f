"""Launching a run: validate, record, publish. The one path for API, fan-out, retry and beat."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import marshmallow as ma
import redis.exceptions
import sqlalchemy as sa
from celery.utils.nodenames import anon_nodename
from flask import current_app
from kombu.exceptions import OperationalError
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from celery_api import limits
from celery_api.catalog import get_catalog, known_queues
from celery_api.celery_app import forget_thread_producer, thread_producer
from celery_api.extensions import db
from celery_api.fences import celery as celery_fence
from celery_api.fences import kombu as kombu_fence
from celery_api.fences import sqlalchemy as sqlalchemy_fence
from celery_api.logging import current_request_id
from celery_api.metrics import record_launch, record_result_cache
from celery_api.models import TaskRun, TaskRunTag, company_id_of, storable_text, utcnow
from celery_api.services import database, result_cache, runstate
from celery_api.services.errors import Conflict, InvalidParams, Unavailable, UnknownTaskType
from celery_api.smorest import MAX_DETAIL_LINES, joined_lines

log = logging.getLogger("celery_api.launch")
# Table-level inserts: compiled once and cached, unlike an ORM insert built per call.
RUNS_INSERT = TaskRun.__table__.insert()
TAGS_INSERT = TaskRunTag.__table__.insert()
# What a publish raises when the broker (or the Redis result backend) cannot be reached.
BROKER_ERRORS = (OperationalError, redis.exceptions.RedisError, OSError, TimeoutError)


@dataclass
class LaunchOptions:
    priority: int | None = None
    countdown: float | None = None
    eta: datetime | None = None
    expires: datetime | float | None = None
    queue: str | None = None
    tags: list[str] = field(default_factory=list)
    # Seconds a successful identical run may answer this launch instead of a new run
    # (0: never; None: the task type's). Only launches made with ``cache=True`` (the
    # API's single launch) read it: see services.result_cache.
    cache_ttl: int | None = None
    webhook_url: str | None = None  # signed with CELERY_API_WEBHOOK_SECRET


@dataclass
class Lineage:
    parent_id: str | None = None
    root_id: str | None = None
    retry_of: str | None = None
    batch_id: str | None = None
    schedule_id: str | None = None
    launched_by: str | None = None
    scheduled_for: datetime | None = None  # the schedule's tick this run is for


def validate(task_type: str, params) -> tuple:
    """Return the catalog entry and the loaded, JSON-ready params, or raise."""
    catalog = get_catalog()
    definition = catalog.get(task_type)
    if definition is None:
        known = ", ".join(d.task_type for d in catalog)
        raise UnknownTaskType(f"Unknown task_type {task_type!r}. Known task types: {known}.")
    try:
        clean = definition.validate(params)
    except ma.ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        lines = [f"params.{k}: {' '.join(map(str, v)) if isinstance(v, list) else v}"
                 for k, v in itertools.islice(messages.items(), MAX_DETAIL_LINES)]
        raise InvalidParams(
            f"Invalid params for {task_type}: " + joined_lines(lines, len(messages)),
            errors={"json": {"params": messages}},
        ) from exc
    return definition, clean


@dataclass(frozen=True)
class Launched:
    """What a caller gets back from a launch (the record is in the database)."""

    id: str
    task_type: str
    status: str = "PENDING"
    cached: bool = False  # an identical run answered it (services.result_cache)


def launch(
    task_type: str,
    params,
    options: LaunchOptions | None = None,
    lineage: Lineage | None = None,
    *,
    cache: bool = False,
) -> Launched:
    """Validate, record (PENDING) and publish one run. A publish that fails closes the
    record as a FAILURE that never ran and raises Unavailable (the caller answers 503).

    ``cache``: the launch may be answered by an identical run (the result cache; the
    API's launches). Retries, fan-out and batches always start a run. (A schedule's
    tick records its run with its fire record instead: ``services.schedules``.)
    """
    try:
        launched = _launch(task_type, params, options or LaunchOptions(), lineage or Lineage(),
                           cache)
    except (UnknownTaskType, InvalidParams) as exc:
        record_refused(task_type, exc)
        raise
    except (Unavailable, limits.Refused) as exc:
        record_launch(task_type, exc.outcome)
        raise
    record_launch(task_type, "cached" if launched.cached else "accepted")
    return launched


def record_refused(task_type: str, exc: UnknownTaskType | InvalidParams) -> None:
    """Count a launch refused by the catalog (``prepare``'s errors) in the metrics."""
    if isinstance(exc, UnknownTaskType):
        record_launch("unknown", "unknown_task_type")
    else:
        record_launch(task_type, "invalid")


@dataclass
class Prepared:
    """A validated launch, ready to record and publish."""

    record: dict
    tags: list[str]
    celery_name: str
    options: LaunchOptions

    @property
    def held(self) -> bool:
        """Delayed past the hold horizon: kept in the database, published when due."""
        return self.record["dispatch_at"] is not None


def hold_seconds(config) -> float:
    """Runs due later than this are held in the database instead of the broker.

    A message a worker holds unacknowledged for longer than the broker's visibility
    timeout (Redis) is handed to another worker too, and RabbitMQ closes a consumer
    that holds one past its consumer timeout: long delays never wait in the broker.
    """
    hold = config["DELAY_HOLD_SECONDS"]
    transport = config["CELERY"].get("broker_transport_options") or {}
    if "visibility_timeout" in transport:
        hold = min(hold, transport["visibility_timeout"] / 2)
    return hold


def prepare(task_type: str, params, options: LaunchOptions, lineage: Lineage, *,
            held: bool = False) -> Prepared:
    """Validate and build the run's record; raise UnknownTaskType or InvalidParams.
    ``held``: recorded held even if not delayed, due now (beat's dispatch pass publishes
    it if its recorder does not: a schedule's tick)."""
    definition, clean = validate(task_type, params)
    from celery_api.services.webhooks import check_launch_webhook

    check_launch_webhook(options.webhook_url)
    task_id = str(uuid.uuid4())
    queue = options.queue or definition.queue or current_app.config["CELERY"]["task_default_queue"]
    allowed = known_queues()
    if queue not in allowed:
        raise InvalidParams(
            f"Unknown queue {queue!r}: no worker is configured to consume it. "
            f"Use one of: {', '.join(allowed)}.",
            errors={"json": {"queue": [f"Must be one of: {', '.join(allowed)}."]}})
    now = utcnow()
    eta = options.eta
    if eta is None and options.countdown:
        eta = now + timedelta(seconds=options.countdown)
    expires = options.expires
    dispatch_at = now if held and eta is None else None
    if eta is not None:
        hold = hold_seconds(current_app.config)
        if (eta - now).total_seconds() > hold:
            dispatch_at = eta - timedelta(seconds=hold)
    if dispatch_at is not None:
        if isinstance(expires, int | float):  # counted from the launch, not the publish
            expires = now + timedelta(seconds=expires)
        options = dataclasses.replace(options, countdown=None, eta=eta, expires=expires)
    record = {
        "id": task_id,
        "task_type": definition.task_type,
        "task_name": definition.celery_name,
        "params": clean,
        "status": "PENDING",
        "queue": queue,
        "priority": options.priority,
        "tags": list(options.tags),
        "eta": eta,
        "expires": expires if isinstance(expires, datetime) else None,
        "company_id": company_id_of(clean),
        "parent_id": lineage.parent_id,
        "root_id": lineage.root_id or task_id,
        "retry_of": lineage.retry_of,
        "batch_id": lineage.batch_id,
        "schedule_id": lineage.schedule_id,
        "scheduled_for": lineage.scheduled_for,
        "launched_by": lineage.launched_by,
        "retries": 0,
        "attempts": 0,
        "created_at": now,
        "dispatch_at": dispatch_at,
        "cache_key": None,
        "webhook_url": options.webhook_url,
    }
    return Prepared(record, sorted(set(options.tags)), definition.celery_name, options)


def record_runs(prepared: list[Prepared]) -> None:
    """Insert the records (PENDING) in one transaction, or raise Unavailable when the
    database is down. Anything else propagates: an IntegrityError is a rule of the
    history refusing it (one open retry per run), which ``control.retry`` answers as
    409; any other error is a bug."""
    # Core statements on a connection of its own, outside the request's ORM session:
    # nothing to refresh afterwards, no session state, a tenth of a launch's CPU less.
    # One record without tags (a single launch): one INSERT on the autocommit engine
    # (database.autocommit_bind), a transaction of its own: one round trip instead of
    # BEGIN, INSERT and COMMIT, and as durable (the database answers it once
    # committed). Many records: COPY on PostgreSQL, one executemany elsewhere, in one
    # explicit transaction.
    records = [p.record for p in prepared]
    tags = tag_rows(prepared)
    single = len(records) == 1 and not tags
    try:
        for attempt in (1, 2):
            committing = False
            try:
                if single:
                    _insert_alone(records[0], again=attempt > 1)
                    break
                with db.engine.connect() as connection:
                    # Begun explicitly: COPY goes through the driver's own cursor, which
                    # SQLAlchemy does not see, so without it commit() would have nothing
                    # to commit and the records would be rolled back with the connection.
                    connection.begin()
                    if len(records) > 1 and connection.dialect.name == "postgresql":
                        _copy_runs(connection, records)
                    else:
                        connection.execute(RUNS_INSERT,
                                           records[0] if len(records) == 1 else records)
                    if tags:
                        connection.execute(TAGS_INSERT, tags)
                    committing = True
                    connection.commit()
                    break
            except DBAPIError as exc:
                # A pooled connection found dead by its first statement (the pool checks
                # only idle ones: database.ping_when_idle): the records go in once more
                # on a new connection. In a transaction nothing was committed; alone, the
                # INSERT may have been (the connection was lost after the database
                # committed it): see _insert_alone. A failure of a COMMIT is never
                # retried (it may have been written): that is a 503, as before.
                if attempt == 1 and exc.connection_invalidated and not committing:
                    log.warning("recording on a lost connection, once more: %s", exc.orig)
                    continue
                raise
    except SQLAlchemyError as exc:
        if not database.is_unavailable(exc):
            raise  # in its own connection's transaction, rolled back on the way out
        log.error("❌ could not record %d launch(es): %s", len(prepared), exc)
        raise Unavailable(
            "The database is unreachable; nothing was launched. Retry later.",
            outcome="database_unavailable") from exc


def tag_rows(prepared: list[Prepared]) -> list[dict]:
    """The ``task_run_tags`` rows of ``prepared`` (the history's tag filter)."""
    return [{"run_id": p.record["id"], "tag": tag} for p in prepared for tag in p.tags]


def _insert_alone(record: dict, again: bool) -> None:
    """One record, one INSERT on the autocommit engine: with the driver's cursor
    (``fences.sqlalchemy.insert_row``, a tenth of a launch's CPU less than
    ``Connection.execute``). ``again``: the first try's connection was lost, maybe after
    the database committed it; if this one is refused because the run's id is already
    there, that row is this record: it is written."""
    engine = database.autocommit_engine()
    if engine is not None and not again:
        sqlalchemy_fence.insert_row(engine, RUNS_INSERT, record)
        return
    engine = engine or db.engine.execution_options(isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        try:
            connection.execute(RUNS_INSERT, record)
        except IntegrityError:
            if again and connection.execute(
                    sa.select(TaskRun.id).where(TaskRun.id == record["id"])).first():
                return
            raise


JSON_COLUMNS = frozenset(c.name for c in TaskRun.__table__.columns
                         if isinstance(c.type, sa.JSON))


def _copy_runs(connection, records: list[dict]) -> None:
    """Many records through PostgreSQL's COPY, in the connection's transaction: half the
    time of an executemany of INSERTs for a batch of 1,000 (docs/BENCHMARKS.md)."""
    columns = list(records[0])
    statement = f"COPY {TaskRun.__tablename__} ({', '.join(columns)}) FROM STDIN"
    cursor = connection.connection.driver_connection.cursor()
    with cursor, cursor.copy(statement) as copy:
        for record in records:
            copy.write_row([json.dumps(record[c]) if c in JSON_COLUMNS else record[c]
                            for c in columns])


def _launch(task_type: str, params, options: LaunchOptions, lineage: Lineage,
            cache: bool) -> Launched:
    prepared = prepare(task_type, params, options, lineage)
    if cache:
        definition = get_catalog().get(prepared.record["task_type"])
        ttl = result_cache.ttl_of(
            definition.cache_ttl, options.cache_ttl,
            bypass=bool(options.countdown or options.eta or options.expires is not None
                        or options.webhook_url))
        if ttl:
            return _launch_once(prepared, ttl)
    return _start(prepared)


CACHE_ATTEMPTS = 5


def _launch_once(prepared: Prepared, ttl: int) -> Launched:
    """The run answering this launch's identity, or a new one (services.result_cache)."""
    record = prepared.record
    key = record["cache_key"] = result_cache.identity(record)
    store = result_cache.store()
    for _attempt in range(CACHE_ATTEMPTS):
        try:
            with _database_reads():
                hit, seen = store.find(key, ttl)
            if hit is None and not store.claim(key, record["id"], seen, ttl):
                continue  # another launch named its run first: read it
        except redis.exceptions.RedisError as exc:
            store.failed("lookup", exc)
            store = result_cache.DatabaseStore()
            continue
        if hit is not None:
            record_result_cache(record["task_type"], "hit")
            log.info("📤 %s answered by run %s (%s) from the result cache",
                     record["task_type"], hit.id, hit.status)
            return Launched(id=hit.id, task_type=hit.task_type, status=hit.status, cached=True)
        try:
            launched = _start(prepared, check=functools.partial(_yield_to_other, key, ttl))
        except IntegrityError:
            # An unfinished run of this identity is in the database (the unique index),
            # one this launch's lookup did not see: it answers.
            with _database_reads():
                winner = result_cache.find_in_database(key, ttl)
                if winner is None:
                    # It finished meanwhile, or it is a PENDING run past the bound
                    # (never published): take the identity from the latter, look again.
                    result_cache.release_stale(key)
            if winner is None:
                continue
            store.point(key, winner.id, record["id"], ttl)
            record_result_cache(record["task_type"], "hit")
            return Launched(id=winner.id, task_type=winner.task_type, status=winner.status,
                            cached=True)
        except BaseException:
            store.release(key, record["id"])
            raise
        if launched.cached:
            store.point(key, launched.id, record["id"], ttl)
            record_result_cache(record["task_type"], "hit")
            return launched
        record_result_cache(record["task_type"], "miss")
        return launched
    raise Conflict(f"Identical launches of {record['task_type']} kept racing; "
                   "send the request again.")


def _yield_to_other(key: str, ttl: int, record: dict) -> Launched | None:
    """Recorded, not published: if another run of the identity answers after all (it
    succeeded between this launch's lookup and its insert), remove this record and
    answer with that run. A lookup that fails leaves the launch to go on."""
    try:
        other = result_cache.answered_by_other(key, ttl, record)
    except SQLAlchemyError as exc:
        log.warning("could not look again for a run answering %s: %s", record["id"], exc)
        return None
    if other is None:
        return None
    forget([record["id"]])
    log.info("📤 %s answered by run %s (%s) from the result cache, found after its record",
             record["task_type"], other.id, other.status)
    return Launched(id=other.id, task_type=other.task_type, status=other.status, cached=True)


def _database_reads():
    """The cache's lookups: a database that does not answer is a 503, as for a record."""
    return database.unavailable_as(
        "The database is unreachable; nothing was launched. Retry later.",
        outcome="database_unavailable")


def _start(prepared: Prepared, check=None) -> Launched:
    """Admit, record and publish a prepared run. ``check(record)``, called between the
    record and the publish, may answer instead (then nothing is published)."""
    task_type = prepared.record["task_type"]
    options = prepared.options
    limits.admit([prepared])  # the task type's limit and the queue's bound (429)
    record = prepared.record
    task_id = record["id"]
    record_runs([prepared])
    if check is not None and (answer := check(record)) is not None:
        return answer
    if prepared.held:
        log.info("📤 launching %s as %s on queue %s, held until %s", task_type, task_id,
                 record["queue"], record["dispatch_at"].isoformat())
        return Launched(id=task_id, task_type=record["task_type"])
    log.info("📤 launching %s as %s on queue %s", task_type, task_id, record["queue"])
    try:
        publish(record, prepared.celery_name, options)
    except BROKER_ERRORS as exc:
        log.error("❌ could not publish %s (%s): %s", task_id, task_type, exc)
        _unpublished(record, f"the task broker was unreachable: {exc}")
        raise Unavailable(
            "The task broker is unreachable; the task was not launched. Retry later.",
            outcome="broker_unavailable") from exc
    except BaseException as exc:
        log.exception("❌ could not publish %s (%s)", task_id, task_type)
        _unpublished(record, f"{type(exc).__name__}: {exc}")
        raise
    return Launched(id=task_id, task_type=record["task_type"])


def _unpublished(record: dict, reason: str) -> None:
    """Close the record of a run whose publish failed, as a FAILURE saying it never ran.

    It is kept, not removed: a publish that failed waiting for the broker's answer may
    have been written all the same (a broker that stopped answering takes it once it
    answers again), and a worker that gets such a message then finds the run finished
    and drops it. Removed, the run would be recorded by the worker as launched outside
    the API, and run: the launch that answered 503 would run after all. A run under the
    result cache may also have answered identical launches meanwhile: their id does not
    turn into a 404."""
    for attempt in range(1, FAILURE_WRITES + 1):
        try:
            runstate.finish(record["id"], "FAILURE", from_=runstate.QUEUED,
                            error=storable_text(f"not published, never ran: {reason}"))
            db.session.commit()
            return
        except SQLAlchemyError:
            db.session.rollback()
            if attempt == FAILURE_WRITES:
                # Left PENDING: it answers identical launches no longer than
                # result_cache.pending_seconds, and reconcile reports it stranded.
                log.exception("❌ could not record that %s was not published",
                              record["id"])
            else:
                time.sleep(0.1 * attempt)


FAILURE_WRITES = 3  # a database that blinks while the broker is down


def forget(task_ids: list[str]) -> None:
    """Remove the records of runs that were never published."""
    if not task_ids:
        return
    try:
        db.session.execute(sa.delete(TaskRunTag).where(TaskRunTag.run_id.in_(task_ids)))
        db.session.execute(sa.delete(TaskRun).where(TaskRun.id.in_(task_ids)))
        db.session.commit()
    except SQLAlchemyError:
        # Cleanup under the error being answered (the broker's): logged with its
        # traceback, never raised over it.
        db.session.rollback()
        log.exception("❌ could not remove the records of %d unpublished run(s)",
                      len(task_ids))


def broker_priority(celery_app, priority: int | None) -> int | None:
    """The API's 0 (highest) to 9 (lowest), as the broker orders them.

    Redis pops its priority lists lowest number first; RabbitMQ delivers the highest
    number first, so the scale is turned over there.
    """
    if priority is None:
        return None
    if celery_app.conf.broker_url.startswith(("amqp", "pyamqp", "amqps")):
        return 9 - priority
    return priority


# One retry: enough to replace a pooled connection the broker has closed, short
# enough to answer 503 quickly when the broker is really gone.
RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.1,
                "interval_max": 0.1}
REPR_LIMIT = 1024  # as Celery's kwargsrepr_maxsize


def publish(record: dict, celery_name: str, options: LaunchOptions, producer=None) -> None:
    """Send the run's message; ``record`` holds its id, params, queue and lineage.

    Celery's own message (protocol 2) built by ``app.amqp`` and published by it
    (``fences.celery``; the Redis client reuse is in ``fences.kombu``), without
    ``send_task``'s per-call routing, result object and repr of the arguments: the
    queue, the ids and the lineage are already decided here. Each queue is declared
    on its first publish by this process. ``producer``: one shared by many publishes
    (a batch), instead of this thread's (``celery_app.thread_producer``).
    """
    celery_app = current_app.extensions["celery"]
    params = record["params"]
    kwargsrepr = repr(params)
    if len(kwargsrepr) > REPR_LIMIT:
        kwargsrepr = kwargsrepr[:REPR_LIMIT] + "..."
    message = celery_fence.task_message(
        celery_app, record["id"], celery_name, kwargs=params, countdown=options.countdown,
        eta=options.eta, expires=options.expires, root_id=record.get("root_id"),
        parent_id=record.get("parent_id"), origin=_origin(), kwargsrepr=kwargsrepr)
    extra = {}
    if isinstance(options.expires, int | float):
        extra["expiration"] = options.expires  # the broker drops it then, too
    elif isinstance(options.expires, datetime):
        extra["expiration"] = max(0.0, (options.expires - utcnow()).total_seconds())
    request_id = current_request_id()
    queue = record["queue"]
    declared = celery_app.celery_api_declared_queues  # set in celery_init_app
    active = producer or thread_producer(celery_app)
    try:
        kombu_fence.reuse_redis_client(active.channel)
        with kombu_fence.reraise_as_library_errors(active.connection):
            celery_fence.send_task_message(
                celery_app, active, celery_name, message, queue=queue,
                priority=broker_priority(celery_app, options.priority),
                # The worker logs the caller's request id with the run.
                headers={"request_id": request_id} if request_id else None,
                declare=[] if queue in declared else None,
                retry=True, retry_policy=RETRY_POLICY, **extra)
    except BaseException:
        if producer is None:
            forget_thread_producer(celery_app)  # the next launch publishes on a new one
        raise
    declared.add(queue)


@functools.cache
def _origin() -> str:
    """The ``origin`` header Celery would write (this host and process), worked out once."""
    return anon_nodename()

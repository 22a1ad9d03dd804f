"""Schedules: a task launched on a trigger, fired by beat from the database.

A schedule has exactly one trigger: a 5-field ``cron`` expression read in an IANA
``timezone`` (UTC by default), a fixed ``interval_seconds`` (at least
``MIN_INTERVAL_SECONDS``), or a one-off ``run_at``. Its ``next_run_at`` is when beat
fires it next; the index on it (enabled schedules only) serves beat's query each tick.

Each tick (:func:`fire_due`, called by ``celery_api.beat.Scheduler`` every
``CELERY_API_DISPATCH_INTERVAL`` seconds) reads a page of due schedules and, for each:

1. inserts a fire record ``(schedule_id, scheduled_for)`` whose primary key is the
   guarantee that a tick fires once: a second beat's insert fails and it moves on;
2. in the same transaction advances ``next_run_at`` with an UPDATE guarded by the value
   it read (a schedule changed through the API since is left to the next tick);
3. launches the run through ``services.launch`` with ``Lineage(schedule_id,
   scheduled_for)``, so the history shows both, and records the run on the fire.

Catch-up: a schedule whose ticks were missed (beat down) fires once, for the first
missed tick, and ``next_run_at`` moves to the first tick after now. Overlap: with
``overlap="skip"`` (the default) a tick whose previous run is unfinished is recorded as
skipped (``runs_skipped``, ``last_skipped_at``, a log line) instead of launched.

Time: cron is evaluated by cronsim in the schedule's zone, with Debian cron's rules at
DST changes: a time the clock skips runs at the first minute after the change (02:30 on
the spring-forward night runs at 03:00), a time that repeats runs once (the first);
wildcard hours run on every real hour. Every time stored is UTC.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import sqlalchemy as sa
from cronsim import CronSim, CronSimError
from sqlalchemy.exc import IntegrityError

from celery_api.catalog import known_queues
from celery_api.extensions import db
from celery_api.metrics import record_launch
from celery_api.models import Schedule, ScheduleFire, TaskRun, utcnow
from celery_api.services import database, dispatch, runstate, webhooks
from celery_api.services import launch as launch_service
from celery_api.services.errors import (
    InvalidParams,
    NotFound,
    Unavailable,
    UnknownTaskType,
)

log = logging.getLogger("celery_api.schedules")

MIN_INTERVAL_SECONDS = 1.0
MAX_INTERVAL_SECONDS = 366 * 86400.0
PAGE = 500  # schedules read per query in a tick
OVERLAP = ("skip", "allow")
TRIGGERS = ("cron", "interval_seconds", "run_at")


# Triggers and the next-run computation (pure functions, ``now`` injected).

# Files of the system's zone database that are not IANA zones: the host's own zone
# (it differs from one host to the next) and tzdata's placeholder.
NOT_ZONES = frozenset({"localtime", "Factory", "posixrules"})


@lru_cache(maxsize=1)
def time_zones() -> tuple[str, ...]:
    return tuple(sorted(name for name in available_timezones() if name not in NOT_ZONES
                        and not name.startswith(("posix/", "right/"))))


def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``, or ValueError naming what to send."""
    if name not in time_zones():
        raise ValueError(f"Unknown time zone {name[:60]!r}: use an IANA name such as "
                         "'UTC' or 'America/Santiago'.")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:  # listed, yet unreadable
        raise ValueError(f"Unknown time zone {name[:60]!r}.") from exc


def check_cron(expression: str) -> str:
    """A valid 5-field cron expression (minute hour day-of-month month day-of-week),
    with single spaces; ValueError otherwise."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError("A cron expression has 5 fields: minute hour day-of-month month "
                         "day-of-week (e.g. '0 2 * * *').")
    normalized = " ".join(fields)
    if re.search(r"\d{5,}", normalized):  # none is above 59 (Python's message otherwise)
        raise ValueError("Invalid cron expression: a number in it is too long (minutes "
                         "0-59, hours 0-23, days 1-31, months 1-12, weekdays 0-7).")
    try:
        CronSim(normalized, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as exc:
        raise ValueError(f"Invalid cron expression: {exc}.") from exc
    return normalized


def next_run(*, now: datetime, cron: str | None = None, timezone: str = "UTC",
             interval_seconds: float | None = None, run_at: datetime | None = None,
             last: datetime | None = None) -> datetime | None:
    """The first tick of the trigger strictly after ``now`` (UTC), or None (a one-off
    whose time has passed, a cron with no further date).

    ``last``: the tick just fired; an interval keeps its phase from it (catch-up after
    a gap fires once, then lands on the next tick of the same phase).
    """
    if cron is not None:
        local = now.astimezone(zone(timezone))
        try:
            return next(iter(CronSim(cron, local))).astimezone(UTC)
        except (StopIteration, OverflowError, CronSimError):
            return None
    if interval_seconds is not None:
        step = timedelta(seconds=interval_seconds)
        if last is None:
            return now + step
        ticks = math.floor((now - last) / step) + 1 if now >= last else 1
        return last + step * ticks
    if run_at is not None:
        return run_at if run_at > now else None
    raise ValueError("no trigger")


def trigger_of(schedule: Schedule) -> dict:
    return {"cron": schedule.cron, "timezone": schedule.timezone or "UTC",
            "interval_seconds": schedule.interval_seconds, "run_at": schedule.run_at}


def next_run_of(schedule: Schedule, now: datetime, last: datetime | None = None):
    return next_run(now=now, last=last, **trigger_of(schedule))


# The API's operations.

def _field_error(field: str, message: str) -> InvalidParams:
    return InvalidParams(f"Invalid request: {field}: {message}",
                         errors={"json": {field: [message]}})


def _check_launch(task_type: str, params, queue: str | None) -> dict:
    """The params loaded as a launch would load them (422 naming the field otherwise),
    without the defaults that are worked out at each launch (a callable
    ``load_default``, such as the current year): each run gets those when it is
    launched, not the value of the day the schedule was made."""
    try:
        definition, clean = launch_service.validate(task_type, params)
    except UnknownTaskType as exc:
        raise InvalidParams(exc.detail, errors={"json": {"task_type": [exc.detail]}}) from exc
    allowed = known_queues()
    if queue is not None and queue not in allowed:
        raise _field_error("queue", f"Must be one of: {', '.join(allowed)}.")
    fields = definition.params_schema().fields
    return {name: value for name, value in clean.items()
            if name in params or not callable(getattr(fields.get(name), "load_default", None))}


def _check_name(name: str, schedule_id: str | None = None) -> None:
    taken = db.session.execute(sa.select(Schedule.id).where(Schedule.name == name)).scalar()
    if taken is not None and taken != schedule_id:
        raise _field_error("name", f"A schedule named {name!r} already exists ({taken}).")


def _commit_named(name: str) -> None:
    """Commit; a unique-name race lost to another request is the same 422."""
    try:
        db.session.commit()
    except IntegrityError as exc:
        db.session.rollback()
        raise _field_error("name", f"A schedule named {name!r} already exists.") from exc


def create(data: dict, *, created_by: str | None = None, now: datetime | None = None
           ) -> Schedule:
    now = now or utcnow()
    clean = _check_launch(data["task_type"], data.get("params") or {}, data.get("queue"))
    _check_name(data["name"])
    schedule = Schedule(
        id=str(uuid.uuid4()), name=data["name"], task_type=data["task_type"], params=clean,
        queue=data.get("queue"), priority=data.get("priority"), tags=data.get("tags") or [],
        expires=data.get("expires"), cron=data.get("cron"),
        timezone=data.get("timezone") or "UTC", interval_seconds=data.get("interval_seconds"),
        run_at=data.get("run_at"), enabled=data.get("enabled", True),
        overlap=data.get("overlap", "skip"), runs_fired=0, runs_skipped=0,
        created_by=created_by, created_at=now, updated_at=now)
    schedule.next_run_at = next_run_of(schedule, now) if schedule.enabled else None
    db.session.add(schedule)
    _commit_named(schedule.name)
    log.info("🗓️ schedule %s (%s) created: %s, next run %s", schedule.name, schedule.id,
             describe(schedule), _iso(schedule.next_run_at))
    return schedule


def get(schedule_id: str) -> Schedule:
    schedule = db.session.get(Schedule, schedule_id)
    if schedule is None:
        raise NotFound(f"No schedule {schedule_id}.")
    return schedule


def listing(*, task_type: str | None = None, enabled: bool | None = None, limit: int = 100,
            offset: int = 0) -> tuple[list[Schedule], int]:
    conditions = []
    if task_type is not None:
        conditions.append(Schedule.task_type == task_type)
    if enabled is not None:
        conditions.append(Schedule.enabled.is_(enabled))
    total = db.session.execute(
        sa.select(sa.func.count()).select_from(Schedule).where(*conditions)).scalar()
    rows = db.session.execute(
        sa.select(Schedule).where(*conditions).order_by(Schedule.name)
        .limit(limit).offset(offset)).scalars().all()
    return list(rows), total


def update(schedule_id: str, changes: dict, *, now: datetime | None = None) -> Schedule:
    """Apply a PATCH. A trigger field replaces the trigger (the other two are cleared);
    ``timezone`` belongs to a cron trigger. Takes effect at beat's next tick."""
    now = now or utcnow()
    schedule = get(schedule_id)
    if not changes:
        return schedule
    given = [t for t in TRIGGERS if t in changes]
    if len(given) > 1:
        raise InvalidParams(
            f"Give one trigger, not {' and '.join(given)}.",
            errors={"json": {t: ["Give one of cron, interval_seconds or run_at."]
                             for t in given}})
    if "timezone" in changes and "cron" not in changes and schedule.cron is None \
            and not given:
        raise _field_error("timezone", "A time zone belongs to a cron trigger.")
    if given and given[0] != "cron" and "timezone" in changes:
        raise _field_error("timezone", "A time zone belongs to a cron trigger.")
    if "name" in changes:
        _check_name(changes["name"], schedule.id)
    if {"task_type", "params", "queue"} & changes.keys():
        task_type = changes.get("task_type", schedule.task_type)
        params = changes.get("params", schedule.params)
        queue = changes.get("queue", schedule.queue)
        changes["params"] = _check_launch(task_type, params, queue)
    retrigger = bool(given) or "timezone" in changes or (
        "enabled" in changes and changes["enabled"] != schedule.enabled)
    if given:
        schedule.cron = schedule.interval_seconds = schedule.run_at = None
        if given[0] != "cron":
            schedule.timezone = "UTC"
    for key, value in changes.items():
        setattr(schedule, key, value)
    if retrigger:
        _reschedule(schedule, now)
    schedule.updated_at = now
    _commit_named(schedule.name)
    log.info("🗓️ schedule %s (%s) updated: %s, next run %s", schedule.name, schedule.id,
             describe(schedule), _iso(schedule.next_run_at))
    return schedule


def _reschedule(schedule: Schedule, now: datetime) -> None:
    """next_run_at from now: the next tick; a one-off that has not fired keeps its
    run_at (a passed one fires at the next tick); none while paused."""
    if not schedule.enabled:
        schedule.next_run_at = None
    elif schedule.run_at is not None:
        fired = db.session.execute(sa.select(ScheduleFire.schedule_id).where(
            ScheduleFire.schedule_id == schedule.id,
            ScheduleFire.scheduled_for == schedule.run_at)).first()
        schedule.next_run_at = None if fired else schedule.run_at
    else:
        schedule.next_run_at = next_run_of(schedule, now)


def delete(schedule_id: str) -> None:
    """Remove the schedule and its fire records; its runs stay in the history."""
    schedule = get(schedule_id)
    name = schedule.name
    db.session.expunge(schedule)
    db.session.execute(sa.delete(ScheduleFire).where(ScheduleFire.schedule_id == schedule_id))
    # By its id, counting the rows: of two requests deleting it at once, the one that
    # finds it gone answers 404 (the ORM's delete of a row already gone only warned).
    deleted = db.session.execute(sa.delete(Schedule).where(Schedule.id == schedule_id))
    if deleted.rowcount != 1:
        db.session.rollback()
        raise NotFound(f"No schedule {schedule_id}.")
    db.session.commit()
    log.info("🗓️ schedule %s (%s) deleted", name, schedule_id)


def set_enabled(schedule_id: str, enabled: bool, *, now: datetime | None = None) -> Schedule:
    """Pause or resume (idempotent). Resuming fires at the next tick after now: the
    ticks missed while paused are not caught up."""
    schedule = get(schedule_id)
    if schedule.enabled != enabled:
        schedule.enabled = enabled
        _reschedule(schedule, now or utcnow())
        schedule.updated_at = now or utcnow()
        db.session.commit()
        log.info("🗓️ schedule %s (%s) %s", schedule.name, schedule.id,
                 "resumed" if enabled else "paused")
    return schedule


def run_now(schedule_id: str, *, launched_by: str | None = None) -> launch_service.Launched:
    """Launch one run of the schedule now, whatever its trigger, pause or overlap:
    recorded as its run (schedule_id, scheduled_for = now)."""
    schedule = get(schedule_id)
    now = utcnow()
    run = launch_service.launch(
        schedule.task_type, schedule.params, options_of(schedule),
        launch_service.Lineage(schedule_id=schedule.id, scheduled_for=now,
                               launched_by=launched_by))
    db.session.execute(sa.update(Schedule).where(Schedule.id == schedule.id).values(
        last_run_id=run.id, last_run_at=now, runs_fired=Schedule.runs_fired + 1))
    webhooks.record_schedule_fired(run.id)  # in the same transaction (the outbox)
    db.session.commit()
    log.info("📤 schedule %s (%s) run now as %s", schedule.name, schedule.id, run.id)
    return run


def options_of(schedule: Schedule) -> launch_service.LaunchOptions:
    return launch_service.LaunchOptions(
        priority=schedule.priority, expires=schedule.expires, queue=schedule.queue,
        tags=list(schedule.tags or []))


def describe(schedule: Schedule) -> str:
    if schedule.cron is not None:
        return f"cron {schedule.cron!r} in {schedule.timezone}"
    if schedule.interval_seconds is not None:
        return f"every {schedule.interval_seconds:g} s"
    return f"once at {_iso(schedule.run_at)}"


def _iso(value: datetime | None) -> str:
    return value.isoformat() if value else "never"


def view(schedule: Schedule) -> dict:
    """The schedule as the API shows it, with its last run's status."""
    last_run = None
    if schedule.last_run_id is not None:
        status = db.session.execute(sa.select(TaskRun.status).where(
            TaskRun.id == schedule.last_run_id)).scalar()
        last_run = {"task_id": schedule.last_run_id, "at": schedule.last_run_at,
                    "status": status}
    return {
        "id": schedule.id, "name": schedule.name, "task_type": schedule.task_type,
        "params": schedule.params, "cron": schedule.cron,
        "timezone": schedule.timezone if schedule.cron is not None else None,
        "interval_seconds": schedule.interval_seconds, "run_at": schedule.run_at,
        "enabled": schedule.enabled, "overlap": schedule.overlap, "queue": schedule.queue,
        "priority": schedule.priority, "tags": list(schedule.tags or []),
        "expires": schedule.expires, "next_run_at": schedule.next_run_at,
        "last_run": last_run, "runs_fired": schedule.runs_fired,
        "runs_skipped": schedule.runs_skipped, "last_skipped_at": schedule.last_skipped_at,
        "created_by": schedule.created_by, "created_at": schedule.created_at,
        "updated_at": schedule.updated_at,
    }


# Beat's tick.

def fire_due(now: datetime | None = None, *, limit: int = PAGE) -> int:
    """Fire (or skip) every due schedule of one page; return how many this process
    fired or skipped. ``now``: the tick's time (tests inject it)."""
    now = now or utcnow()
    due = db.session.execute(
        sa.select(Schedule.id, Schedule.next_run_at)
        .where(Schedule.enabled.is_(True), Schedule.next_run_at <= now)
        .order_by(Schedule.next_run_at).limit(limit)).all()
    db.session.rollback()  # the read's transaction ends: no lock held between fires
    handled = 0
    broker = BrokerSeen()
    for schedule_id, scheduled_for in due:
        try:
            handled += _fire(schedule_id, scheduled_for, now, broker)
        except Unavailable:
            break  # the database is down: the next tick tries again
    return handled


@dataclass
class BrokerSeen:
    """What one pass of :func:`fire_due` learnt of the broker: once a publish failed,
    the pass's later runs are held without trying (each try waits for the broker's
    timeout), and beat publishes them all once it answers."""

    down: bool = False


def fire_all_due(now: datetime | None = None) -> int:
    """Pages of :func:`fire_due` until less than a page was handled."""
    total = 0
    while True:
        handled = fire_due(now)
        total += handled
        if handled < PAGE:
            return total


def _unfinished(run_id: str | None) -> bool:
    if run_id is None:
        return False
    status = db.session.execute(sa.select(TaskRun.status).where(TaskRun.id == run_id)).scalar()
    return status in runstate.UNFINISHED


def _fire(schedule_id: str, scheduled_for: datetime, now: datetime,
          broker: BrokerSeen) -> int:
    """Fire (or skip) one tick. Its fire record, the schedule's move to its next tick
    and the tick's run (recorded held, due now) are one transaction: a beat that dies
    after it leaves a held run that the dispatch pass publishes, and one that dies
    before it leaves the tick to the next pass. The run is then published at once;
    if the broker does not take it, it stays held and is published once it answers."""
    schedule = db.session.get(Schedule, schedule_id)
    if schedule is None or not schedule.enabled or schedule.next_run_at != scheduled_for:
        db.session.rollback()  # changed since the page was read: the next tick sees it
        return 0
    name, task_type, params = schedule.name, schedule.task_type, dict(schedule.params or {})
    options, last_run_id = options_of(schedule), schedule.last_run_id
    skip = schedule.overlap == "skip" and _unfinished(schedule.last_run_id)
    following = next_run_of(schedule, now, last=scheduled_for)
    counts = ({"runs_skipped": Schedule.runs_skipped + 1, "last_skipped_at": now} if skip
              else {"runs_fired": Schedule.runs_fired + 1})
    prepared, failure = None, None
    if not skip:
        try:
            prepared = launch_service.prepare(task_type, params, options, launch_service.Lineage(
                schedule_id=schedule_id, scheduled_for=scheduled_for), held=True)
        except (UnknownTaskType, InvalidParams) as exc:  # the catalog changed under it
            failure = exc
            launch_service.record_refused(task_type, exc)
    run_id = prepared.record["id"] if prepared is not None else None
    try:
        with database.unavailable_as("The database is unreachable.",
                                     outcome="database_unavailable"):
            if prepared is not None:
                db.session.execute(launch_service.RUNS_INSERT, prepared.record)
                if prepared.tags:
                    db.session.execute(launch_service.TAGS_INSERT,
                                       launch_service.tag_rows([prepared]))
                counts.update(last_run_id=run_id, last_run_at=now)
            # The fire record: of two beats, the second waits on this key and fails.
            db.session.execute(sa.insert(ScheduleFire).values(
                schedule_id=schedule_id, scheduled_for=scheduled_for, fired_at=now,
                outcome="skipped" if skip else "failed" if failure else "fired",
                run_id=run_id, error=failure.detail[:2000] if failure else None))
            moved = db.session.execute(
                sa.update(Schedule)
                .where(Schedule.id == schedule_id, Schedule.next_run_at == scheduled_for,
                       Schedule.enabled.is_(True))
                .values(next_run_at=following, **counts)).rowcount
            if moved != 1:
                db.session.rollback()  # changed through the API in between
                return 0
            if run_id is not None:
                webhooks.record_schedule_fired(run_id)  # in the same transaction (the outbox)
            db.session.commit()
    except IntegrityError:  # unavailable_as has rolled back
        log.info("🗓️ schedule %s: the tick of %s was fired by another beat", name,
                 scheduled_for.isoformat())
        return 0
    if skip:
        log.warning("🗓️ schedule %s (%s): skipped the tick of %s, its previous run %s is "
                    "unfinished (overlap=skip)", name, schedule_id, scheduled_for.isoformat(),
                    last_run_id)
        return 1
    if failure is not None:
        log.error("❌ schedule %s (%s): the tick of %s could not launch %s: %s", name,
                  schedule_id, scheduled_for.isoformat(), task_type, failure.detail)
        return 1
    record_launch(task_type, "accepted")
    _publish(name, run_id, scheduled_for, broker)
    return 1


def _publish(name: str, run_id: str, scheduled_for: datetime, broker: BrokerSeen) -> None:
    """Publish a tick's run, recorded held: if the broker does not take it, it stays held
    and beat's dispatch pass publishes it once the broker answers. Once a publish failed,
    the pass's later runs are left held without trying (each try waits for a timeout)."""
    if not broker.down:
        try:
            dispatch.publish_runs([run_id])
        except launch_service.BROKER_ERRORS as exc:
            broker.down = True
            log.error("❌ could not publish %s: %s", run_id, exc)
        else:
            log.info("📤 schedule %s fired the tick of %s as %s (%.3f s after its time)",
                     name, scheduled_for.isoformat(), run_id,
                     (utcnow() - scheduled_for).total_seconds())
            return
    log.warning("📤 schedule %s fired the tick of %s as %s, held until the task broker "
                "answers", name, scheduled_for.isoformat(), run_id)


# The SII calendar (``make run`` with CELERY_API_SEED_SCHEDULES=1, or ``flask schedules seed``).

SII_SCHEDULES = (
    {"name": "sii-nightly-documents", "task_type": "sii.sync_documents_all_companies",
     "params": {"months": 1}, "cron": "0 2 * * *", "timezone": "America/Santiago"},
    {"name": "sii-monthly-f29", "task_type": "sii.sync_f29_all_companies", "params": {},
     "cron": "0 6 13 * *", "timezone": "America/Santiago"},
)


def seed_sii() -> list[str]:
    """Create the SII schedules missing by name; return the names created."""
    created = []
    for data in SII_SCHEDULES:
        exists = db.session.execute(
            sa.select(Schedule.id).where(Schedule.name == data["name"])).first()
        if exists is None:
            create(dict(data), created_by="seed")
            created.append(data["name"])
    return created


def purge_fires(cutoff: datetime) -> int:
    """Delete the fire records of ticks before ``cutoff`` (the history's retention),
    but the one of a one-off, which tells that it has fired."""
    one_off = sa.exists().where(Schedule.id == ScheduleFire.schedule_id,
                                Schedule.run_at == ScheduleFire.scheduled_for)
    removed = db.session.execute(sa.delete(ScheduleFire).where(
        ScheduleFire.scheduled_for < cutoff, ~one_off)).rowcount
    db.session.commit()
    return removed

"""Run states and the transitions between them: the one module that says which state
may follow which, and the guarded update that makes each transition atomic.

::

    PENDING ──claim──► STARTED ──► PROGRESS ──► SUCCESS | FAILURE
       │  ▲               │           │
       │  └─── RETRY ◄────┴───────────┘   (Celery's retry: the next attempt claims it)
       └──revoke──► REVOKED ◄──terminate── STARTED | PROGRESS

Every write of a run's status goes through :func:`transition`, :func:`finish` or
:func:`claim`: one UPDATE whose WHERE names the states the run may leave. Of two
writers racing for one run (a worker starting it, an API revoking it, a redelivered
copy of its message) exactly one matches the row and the other learns that it lost
(no row changed). The database is the arbiter: a row lock on PostgreSQL, the single
writer on SQLite.

A worker *claims* a run before executing it. Each claim counts one attempt
(``attempts``) and the attempt's number is the claimant's token: only the current
attempt writes the run's end. A delivery that cannot claim its run (the run is
finished, revoked, or running elsewhere) is dropped without executing.

A transition to a final state or RETRY also writes its webhook events, in the same
transaction (``services.webhooks``: the outbox): they commit with the change or not
at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from celery_api.extensions import db
from celery_api.models import TaskRun, utcnow

QUEUED = frozenset({"PENDING", "RECEIVED", "RETRY"})
RUNNING = frozenset({"STARTED", "PROGRESS"})
FINISHED = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
UNFINISHED = QUEUED | RUNNING
RETRYABLE = frozenset({"FAILURE", "REVOKED"})  # states a client may retry
ALL = UNFINISHED | FINISHED

# For each state, the states a run may be in to move to it. A run's end may be written
# while it still reads queued: the result backend (or a worker) saw it end before the
# record saw it start.
ALLOWED_FROM: dict[str, frozenset[str]] = {
    "STARTED": QUEUED,
    "PROGRESS": RUNNING,
    "RETRY": RUNNING,
    "SUCCESS": UNFINISHED,
    "FAILURE": UNFINISHED,
    "REVOKED": UNFINISHED,
}

TERMINATE_REQUESTED = "terminate requested"  # the API's note until a worker confirms
# The states whose reaching is a webhook event (services.webhooks.STATE_EVENTS).
EVENTFUL = FINISHED | {"RETRY"}


def is_finished(status: str | None) -> bool:
    return status in FINISHED


def runtime(started_at: datetime | None, finished_at: datetime | None) -> float | None:
    """Seconds between a run's first start and its end (None when it never started)."""
    if started_at is None or finished_at is None:
        return None
    return max(0.0, (finished_at - started_at).total_seconds())


def termination_reason(base: str, recorded: str | None) -> str:
    """``base``, plus the caller's reason if the revoke request recorded one."""
    if recorded and recorded.startswith(TERMINATE_REQUESTED):
        return base + recorded[len(TERMINATE_REQUESTED):]
    if recorded and recorded.startswith("terminated"):
        return recorded  # the worker's confirmation already wrote it
    return base


def transition(task_ids: str | Iterable[str], to: str, *, from_: Iterable[str] | None = None,
               where: Iterable = (), **values) -> list[str]:
    """Move the runs among ``task_ids`` that are in one of ``from_`` (by default every
    state ``to`` may follow) to ``to``, with ``values``; return the ids moved.

    The caller commits. ``where`` adds conditions (an attempt's token, a note).
    """
    ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
    if not ids:
        return []
    sources = ALLOWED_FROM[to] if from_ is None else frozenset(from_)
    if not sources <= ALL:
        raise ValueError(f"unknown states {sorted(sources - ALL)}")
    statement = (
        sa.update(TaskRun)
        .where(TaskRun.id.in_(ids) if len(ids) > 1 else TaskRun.id == ids[0],
               TaskRun.status.in_(sources), *where)
        .values(status=to, **values)
        .returning(TaskRun.id, TaskRun.webhook_url, TaskRun.batch_id)
    )
    moved = db.session.execute(statement).all()
    if moved and to in EVENTFUL:
        # The webhook events of the change, in its transaction (the outbox).
        from celery_api.services import webhooks

        webhooks.record_run_events(moved, to)
    ids = [row.id for row in moved]
    changed(ids)
    return ids


def changed(task_ids: Iterable[str]) -> None:
    """Note runs whose state this session changed: their waiters are notified once the
    session commits (``services.runevents``), never before (they would read the old
    state)."""
    ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
    if ids:
        db.session.info.setdefault(CHANGED_KEY, set()).update(ids)


CHANGED_KEY = "celery_api.changed_runs"


@sa.event.listens_for(Session, "after_commit")
def _notify_committed(session: Session) -> None:
    """Each run this session changed is notified once the change is committed, whoever
    the writer (worker, API, beat)."""
    task_ids = session.info.pop(CHANGED_KEY, ())
    if task_ids:
        from celery_api.services.runevents import publish

        for task_id in task_ids:
            publish(task_id)


@sa.event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(CHANGED_KEY, None)


def finish(task_id: str, to: str, *, now: datetime | None = None,
           started_at: datetime | None = None, from_: Iterable[str] | None = None,
           where: Iterable = (), **values) -> bool:
    """Write a run's end (``to`` is SUCCESS, FAILURE or REVOKED) with its finish time and
    runtime; True when this call wrote it. ``started_at`` is read from the record when
    the caller does not know it. The caller commits."""
    if to not in FINISHED:
        raise ValueError(f"{to} is not a final state")
    now = now or utcnow()
    if started_at is None:
        started_at = db.session.execute(
            sa.select(TaskRun.started_at).where(TaskRun.id == task_id)).scalar_one_or_none()
    values.setdefault("finished_at", now)
    values.setdefault("runtime", runtime(started_at, values["finished_at"]))
    return bool(transition(task_id, to, from_=from_, where=where, **values))


@dataclass(frozen=True)
class Claim:
    """What a delivery found when it tried to take its run."""

    outcome: str  # claimed | missing | finished | stale | running
    attempt: int | None = None  # this delivery's token, when claimed
    status: str | None = None  # the record's status, when not claimed
    worker: str | None = None  # the worker the record names
    attempts: int | None = None  # the record's attempt count, when not claimed

    @property
    def claimed(self) -> bool:
        return self.outcome == "claimed"


def claim(task_id: str, *, worker: str, retries: int, now: datetime | None = None) -> Claim:
    """Take the run for one delivery of its message, before the task body runs.

    A queued run is taken by the first delivery of the current attempt (``retries``,
    Celery's retry count, at least the record's: a stale copy of an earlier attempt's
    message is refused). A running run is taken over only by the message of a later
    Celery retry, which is sent while the earlier attempt is still ending.
    """
    now = now or utcnow()
    return _take(
        sa.update(TaskRun)
        .where(TaskRun.id == task_id, sa.or_(
            sa.and_(TaskRun.status.in_(QUEUED), TaskRun.retries <= retries),
            sa.and_(TaskRun.status.in_(RUNNING), TaskRun.retries < retries)))
        .values(status="STARTED", started_at=sa.func.coalesce(TaskRun.started_at, now),
                worker=worker, retries=retries, attempts=TaskRun.attempts + 1),
        task_id, retries)


def take_over(task_id: str, seen: Claim, *, worker: str, retries: int,
              now: datetime | None = None) -> Claim:
    """Take a run recorded as running whose attempt is known to be dead (its worker
    process was lost and its message redelivered): only if nobody moved it since."""
    return _take(
        sa.update(TaskRun)
        .where(TaskRun.id == task_id, TaskRun.status.in_(RUNNING),
               TaskRun.attempts == seen.attempts)
        .values(status="STARTED", worker=worker, retries=retries,
                attempts=TaskRun.attempts + 1),
        task_id, retries)


def _take(update, task_id: str, retries: int) -> Claim:
    """Run a claiming UPDATE (it matches the run only when this delivery may take it):
    the claim with the new attempt count, or what the record says instead."""
    taken = db.session.execute(update.returning(TaskRun.attempts)).scalar_one_or_none()
    if taken is not None:
        changed(task_id)
        return Claim("claimed", attempt=taken)
    return _refused(task_id, retries)


def _refused(task_id: str, retries: int) -> Claim:
    row = db.session.execute(
        sa.select(TaskRun.status, TaskRun.retries, TaskRun.worker, TaskRun.attempts)
        .where(TaskRun.id == task_id)).one_or_none()
    if row is None:
        return Claim("missing")
    status, recorded_retries, worker, attempts = row
    if status in FINISHED:
        outcome = "finished"
    elif status in QUEUED or recorded_retries > retries:
        outcome = "stale"  # a copy of an earlier attempt's message
    else:
        outcome = "running"
    return Claim(outcome, status=status, worker=worker, attempts=attempts)


def current_attempt(attempt: int | None) -> tuple:
    """The condition that limits a write to the attempt holding ``attempt`` (no
    condition when the claim could not be made, e.g. the database was down then)."""
    return () if attempt is None else (TaskRun.attempts == attempt,)

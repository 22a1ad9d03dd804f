"""Delayed runs held in the database, published when they come due.

A run launched with a ``countdown`` or ``eta`` further away than the hold horizon
(``launch.hold_seconds``: ``CELERY_API_DELAY_HOLD_SECONDS``, at most half the Redis
visibility timeout) is recorded with ``dispatch_at`` and not published. Beat
(``celery_api.beat.Scheduler``) calls :func:`publish_due` every
``CELERY_API_DISPATCH_INTERVAL`` seconds; it publishes each due run with its ETA, so
the worker still starts it on time, and clears ``dispatch_at`` in the same
transaction. A crash between the publish and the commit publishes the run again on
the next pass: the worker's claim (``services.runstate``) runs it once all the same.
A run revoked while held is never published.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from flask import current_app

from celery_api.extensions import db
from celery_api.models import TaskRun, utcnow
from celery_api.services import launch as launch_service
from celery_api.services import runstate

log = logging.getLogger("celery_api.dispatch")

PAGE = 500  # runs published per transaction
COLUMNS = (TaskRun.id, TaskRun.task_type, TaskRun.task_name, TaskRun.params, TaskRun.queue,
           TaskRun.priority, TaskRun.eta, TaskRun.expires, TaskRun.root_id, TaskRun.parent_id)


def expire_held(now, *, limit: int = PAGE) -> list[str]:
    """Close the held runs whose ``expires`` passed before they were published: REVOKED,
    as Celery revokes a message past its expiry (a run "not started by then" is
    revoked), instead of PENDING until its ETA and then published with nothing left of
    its expiry (RabbitMQ drops such a message: the run would stay PENDING). The ids."""
    expired = list(db.session.execute(
        sa.select(TaskRun.id)
        .where(TaskRun.dispatch_at.is_not(None), TaskRun.status == "PENDING",
               TaskRun.expires <= now)
        .limit(limit)).scalars())
    if not expired:
        return []
    closed = runstate.transition(
        expired, "REVOKED", from_=["PENDING"], where=[TaskRun.dispatch_at.is_not(None)],
        dispatch_at=None, finished_at=now, cache_key=None,
        error="expired before it ran: its expires passed while it waited for its ETA")
    db.session.commit()
    for task_id in closed:
        log.info("🚫 held run %s expired before it ran", task_id)
    return closed


def publish_due(*, limit: int = PAGE) -> int:
    """Close the held runs that expired (``expire_held``), then publish up to ``limit``
    held runs whose time has come; return how many were published."""
    now = utcnow()
    expire_held(now, limit=limit)
    return _publish(
        sa.select(TaskRun.id)
        .where(TaskRun.dispatch_at <= now, TaskRun.status == "PENDING",
               sa.or_(TaskRun.expires.is_(None), TaskRun.expires > now))
        .order_by(TaskRun.dispatch_at).limit(limit))


def publish_runs(task_ids: list[str]) -> int:
    """Publish the held runs ``task_ids`` now (a schedule's tick, just recorded held with
    its fire record); those already published or closed are left alone. Raises what the
    publish raises (the broker down): then they stay held, for the next pass."""
    return _publish(sa.select(TaskRun.id).where(
        TaskRun.id.in_(task_ids), TaskRun.status == "PENDING",
        TaskRun.dispatch_at.is_not(None)))


def _publish(due) -> int:
    """Publish the held runs ``due`` selects and clear their ``dispatch_at``, in one
    transaction: committed after the publish, rolled back (still held) if it fails."""
    if db.engine.dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True)  # two beats never publish one run twice
    try:
        ids = list(db.session.execute(due).scalars())
        if not ids:
            db.session.rollback()
            return 0
        rows = db.session.execute(
            sa.update(TaskRun)
            .where(TaskRun.id.in_(ids), TaskRun.status == "PENDING",
                   TaskRun.dispatch_at.is_not(None))
            .values(dispatch_at=None)
            .returning(*COLUMNS)).mappings().all()
        celery_app = current_app.extensions["celery"]
        with celery_app.producer_or_acquire() as producer:
            for row in rows:
                options = launch_service.LaunchOptions(
                    priority=row["priority"], eta=row["eta"], expires=row["expires"])
                launch_service.publish(dict(row), row["task_name"], options,
                                       producer=producer)
        db.session.commit()
    except BaseException:
        db.session.rollback()  # still held: the next pass publishes them
        raise
    for row in rows:
        log.info("📤 published held run %s (%s), due %s", row["id"], row["task_type"],
                 row["eta"].isoformat() if row["eta"] else "now")
    return len(rows)

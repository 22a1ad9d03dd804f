"""Revoking and retrying runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import sqlalchemy as sa
from flask import current_app

from celery_api.extensions import db
from celery_api.models import FINISHED_STATES, TaskRun, utcnow
from celery_api.services import launch as launch_service
from celery_api.services.errors import Conflict, Unavailable
from celery_api.services.recorder import TERMINATE_REQUESTED
from celery_api.services.runs import describe

log = logging.getLogger("celery_api.control")

QUEUED_STATES = frozenset({"PENDING", "RECEIVED", "RETRY"})
RETRYABLE_STATES = frozenset({"FAILURE", "REVOKED"})
SIGNALS = ("SIGTERM", "SIGKILL", "SIGINT", "SIGQUIT", "SIGUSR1")


@dataclass
class RevokeOutcome:
    task_id: str
    status: str
    terminate: bool
    message: str
    accepted: bool  # True: the worker still has to confirm (terminate of a running run)


def revoke(task_id: str, *, terminate: bool = False, signal: str = "SIGTERM",
           reason: str | None = None) -> RevokeOutcome:
    view = describe(task_id, lineage=False)
    status = view.status
    if status in FINISHED_STATES:
        raise Conflict(f"Task {task_id} already finished with status {status}; "
                       "there is nothing to revoke.")
    running = status not in QUEUED_STATES
    if running and not terminate:
        raise Conflict(f"Task {task_id} is already running ({status}). Send terminate=true "
                       "to stop it with a signal.")
    note = f": {reason}" if reason else ""
    if running:
        # Kept so the worker's confirmation can say why the run was stopped.
        values = {"error": f"{TERMINATE_REQUESTED}{note}"}
    else:
        values = {"status": "REVOKED", "finished_at": utcnow(), "error": f"revoked{note}"}
    if not revoke_records([view.run], values, TaskRun.status.not_in(FINISHED_STATES),
                          terminate=terminate, signal=signal):
        raise Conflict(f"Task {task_id} finished while it was being revoked; "
                       "there is nothing to revoke.")
    if not running:
        log.info("🚫 revoked queued task %s%s", task_id, note)
        return RevokeOutcome(task_id, "REVOKED", terminate,
                             f"Task {task_id} revoked before it ran{note}.", accepted=False)
    log.info("🚫 terminating running task %s with %s%s", task_id, signal, note)
    return RevokeOutcome(
        task_id, status, terminate,
        f"{signal} sent to the worker running {task_id}{note}; its status becomes REVOKED "
        "once the worker confirms.", accepted=True)


def revoke_records(runs: list[TaskRun], values: dict, condition, *, terminate: bool = False,
                   signal: str = "SIGTERM") -> list[str]:
    """Write ``values`` (a revoke) into the records of ``runs`` that still meet
    ``condition``, then tell the workers; return the ids written.

    The record first: if the database cannot take it, nothing has been sent. If the
    broadcast fails, each record gets back what it said before (unless a worker has
    moved it on since) and the caller gets a 503.
    """
    before = {run.id: {"status": run.status, "finished_at": run.finished_at,
                       "error": run.error} for run in runs}
    written = list(db.session.execute(
        sa.update(TaskRun).where(TaskRun.id.in_(before), condition).values(**values)
        .returning(TaskRun.id)).scalars())
    db.session.commit()
    if not written:
        return written
    try:
        current_app.extensions["celery"].control.revoke(
            written, terminate=terminate, signal=signal)
    except Exception as exc:  # noqa: BLE001
        _put_back(written, values["error"], before)
        raise Unavailable("The task broker is unreachable; the revoke was not sent.") from exc
    return written


def _put_back(task_ids: list[str], written_error: str, before: dict) -> None:
    try:
        for task_id in task_ids:
            db.session.execute(
                sa.update(TaskRun)
                .where(TaskRun.id == task_id, TaskRun.error == written_error,
                       TaskRun.status.in_(("REVOKED", before[task_id]["status"])))
                .values(**before[task_id]))
        db.session.commit()
    except sa.exc.SQLAlchemyError:
        db.session.rollback()
        log.exception("❌ could not undo the revoke records of %d run(s)", len(task_ids))


def retry(task_id: str) -> launch_service.Launched:
    view = describe(task_id, lineage=False)
    if view.status not in RETRYABLE_STATES:
        raise Conflict(f"Task {task_id} is {view.status}; only FAILURE or REVOKED runs "
                       "can be retried.")
    original = view.run
    options = launch_service.LaunchOptions(
        priority=original.priority, queue=original.queue, tags=list(original.tags or []))
    lineage = launch_service.Lineage(
        retry_of=original.id, root_id=original.root_id or original.id,
        batch_id=original.batch_id)
    run = launch_service.launch(original.task_type, original.params, options, lineage)
    log.info("🔁 retry of %s launched as %s", task_id, run.id)
    return run


"""Revoking and retrying runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import sqlalchemy as sa
from flask import current_app
from sqlalchemy.exc import IntegrityError

from celery_api.extensions import db
from celery_api.models import TaskRun, utcnow
from celery_api.services import launch as launch_service
from celery_api.services import runstate, webhooks
from celery_api.services.errors import Conflict, Unavailable
from celery_api.services.health import broker_connection
from celery_api.services.runs import describe

log = logging.getLogger("celery_api.control")

SIGNALS = ("SIGTERM", "SIGKILL", "SIGINT", "SIGQUIT", "SIGUSR1")


@dataclass
class RevokeOutcome:
    task_id: str
    status: str
    terminate: bool
    message: str
    accepted: bool  # True: the worker still has to confirm (terminate of a running run)


def revoke(task_id: str, *, terminate: bool = False, signal: str = "SIGTERM",
           reason: str | None = None, revoked_by: str | None = None) -> RevokeOutcome:
    """Revoke a queued run, or (``terminate``) signal the worker running it.

    A queued revoke only ever wins over a run no worker has claimed: the record moves
    from a queued state to REVOKED in one guarded update, and a worker's claim is the
    same kind of update on the same row, so one of the two wins. When the worker wins,
    the run is answered as running (409, or terminated with ``terminate``).
    """
    note = f": {reason}" if reason else ""
    status = _revocable_status(task_id, terminate)
    if status in runstate.QUEUED:
        if revoke_records([task_id], f"revoked{note}", revoked_by=revoked_by):
            log.info("🚫 revoked queued task %s%s", task_id, note)
            return RevokeOutcome(task_id, "REVOKED", terminate,
                                 f"Task {task_id} revoked before it ran{note}.",
                                 accepted=False)
        # A worker claimed it (or it ended) between the read and the update.
        status = _revocable_status(task_id, terminate)
        if status in runstate.QUEUED:
            raise Conflict(f"Task {task_id} changed while it was being revoked; "
                           "send the request again.")
    if not revoke_records([task_id], f"{runstate.TERMINATE_REQUESTED}{note}",
                          terminate=True, signal=signal, revoked_by=revoked_by):
        raise Conflict(f"Task {task_id} finished while it was being revoked; "
                       "there is nothing to revoke.")
    log.info("🚫 terminating running task %s with %s%s", task_id, signal, note)
    return RevokeOutcome(
        task_id, status, terminate,
        f"{signal} sent to the worker running {task_id}{note}; its status becomes REVOKED "
        "once the worker confirms.", accepted=True)


def _revocable_status(task_id: str, terminate: bool) -> str:
    """The run's status, or Conflict when a revoke of this kind cannot apply to it."""
    status = describe(task_id, lineage=False).status
    if runstate.is_finished(status):
        raise Conflict(f"Task {task_id} already finished with status {status}; "
                       "there is nothing to revoke.")
    if status not in runstate.QUEUED and not terminate:
        raise Conflict(f"Task {task_id} is already running ({status}). Send terminate=true "
                       "to stop it with a signal.")
    return status


def revoke_records(task_ids: list[str], error: str, *, terminate: bool = False,
                   signal: str = "SIGTERM", revoked_by: str | None = None) -> list[str]:
    """Record a revoke of ``task_ids``, then tell the workers; return the ids written.

    Without ``terminate``: queued runs become REVOKED (runs a worker has claimed are
    left alone). With ``terminate``: runs not yet finished keep their status and get
    ``error`` as a note, until the worker confirms the termination. ``revoked_by``:
    the API key asking (None with authentication off), kept on each record written.

    The record first: if the database cannot take it, nothing has been sent. If the
    broadcast fails, each record gets back what it said before (unless a worker has
    moved it on since) and the caller gets a 503.
    """
    before = {run_id: {"status": status, "finished_at": finished_at, "error": old_error,
                       "revoked_by": old_revoked_by, "cache_key": cache_key}
              for run_id, status, finished_at, old_error, old_revoked_by, cache_key
              in db.session.execute(
                  sa.select(TaskRun.id, TaskRun.status, TaskRun.finished_at, TaskRun.error,
                            TaskRun.revoked_by, TaskRun.cache_key)
                  .where(TaskRun.id.in_(task_ids)))}
    if terminate:
        written = list(db.session.execute(
            sa.update(TaskRun)
            .where(TaskRun.id.in_(before), TaskRun.status.in_(runstate.UNFINISHED))
            # A run asked to stop no longer answers identical launches (result cache).
            .values(error=error, revoked_by=revoked_by, cache_key=None)
            .returning(TaskRun.id)).scalars())
    else:
        written = runstate.transition(before, "REVOKED", from_=runstate.QUEUED,
                                      finished_at=utcnow(), error=error,
                                      revoked_by=revoked_by)
    db.session.commit()
    if not written:
        return written
    celery_app = current_app.extensions["celery"]
    try:
        # Not on a pooled connection: one open when the broker went away would hold this
        # request until the broker is back (health.broker_connection).
        with broker_connection(celery_app, current_app.config["BROKER_TIMEOUT"]) as conn:
            celery_app.control.revoke(written, terminate=terminate, signal=signal,
                                      connection=conn)
    except Exception as exc:  # noqa: BLE001
        _put_back(written, error, before)
        raise Unavailable("The task broker is unreachable; the revoke was not sent.") from exc
    return written


def _put_back(task_ids: list[str], written_error: str, before: dict) -> None:
    """Give each record back what it said before the revoke, its result cache identity
    included. An identical run may have been recorded meanwhile (the revoke had taken
    this one out of the cache): then the unique index refuses the identity back, and
    the record is put back without it (that newer run answers identical launches)."""
    try:
        for task_id in task_ids:
            _put_back_one(task_id, written_error, before[task_id])
        # Their task.revoked events, not sent yet (the broker is what failed): dropped.
        webhooks.forget_pending(task_ids, "task.revoked")
        db.session.commit()
    except sa.exc.SQLAlchemyError:
        # Cleanup under the broker's error being answered: logged with its traceback,
        # never raised over it.
        db.session.rollback()
        log.exception("❌ could not undo the revoke records of %d run(s)", len(task_ids))


def _put_back_one(task_id: str, written_error: str, values: dict) -> None:
    statement = (sa.update(TaskRun)
                 .where(TaskRun.id == task_id, TaskRun.error == written_error,
                        TaskRun.status.in_(("REVOKED", values["status"]))))
    try:
        db.session.execute(statement.values(**values))
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        log.warning("🚫 %s put back without its result cache identity: an identical run "
                    "took it meanwhile", task_id)
        db.session.execute(statement.values(**dict(values, cache_key=None)))
        db.session.commit()


def retry(task_id: str, *, launched_by: str | None = None) -> launch_service.Launched:
    """A new run of a FAILURE/REVOKED run, linked by ``retry_of``; ``launched_by`` is
    the API key retrying it (not the original's)."""
    view = describe(task_id, lineage=False)
    if view.status not in runstate.RETRYABLE:
        raise Conflict(f"Task {task_id} is {view.status}; only FAILURE or REVOKED runs "
                       "can be retried.")
    original = view.run
    _refuse_if_retrying(task_id)
    options = launch_service.LaunchOptions(
        priority=original.priority, queue=original.queue, tags=list(original.tags or []),
        webhook_url=original.webhook_url)
    lineage = launch_service.Lineage(
        retry_of=original.id, root_id=original.root_id or original.id,
        batch_id=original.batch_id, launched_by=launched_by)
    try:
        run = launch_service.launch(original.task_type, original.params, options, lineage)
    except IntegrityError as exc:
        # A concurrent retry of the same run was recorded first (the open-retry index).
        _refuse_if_retrying(task_id)
        raise Conflict(f"Task {task_id} was retried by another request at the same "
                       "moment; see its retries in GET /api/celery/history?retry_of="
                       f"{task_id}.") from exc
    log.info("🔁 retry of %s launched as %s", task_id, run.id)
    return run


def _refuse_if_retrying(task_id: str) -> None:
    """409 naming the retry of ``task_id`` that has not finished yet, if there is one."""
    open_retry = db.session.execute(
        sa.select(TaskRun.id, TaskRun.status)
        .where(TaskRun.retry_of == task_id, TaskRun.status.in_(runstate.UNFINISHED))
    ).first()
    db.session.rollback()
    if open_retry is not None:
        raise Conflict(
            f"Task {task_id} is already being retried by {open_retry.id} "
            f"({open_retry.status}); follow that run, or retry again once it has finished.")

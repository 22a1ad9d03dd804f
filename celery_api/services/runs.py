"""Reading runs: the durable record merged with the live state of the result backend."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa
from flask import current_app
from sqlalchemy.exc import SQLAlchemyError

from celery_api.extensions import db
from celery_api.models import TaskRun, storable_text, utcnow
from celery_api.services import database, runstate
from celery_api.services.errors import NotFound

log = logging.getLogger("celery_api.status")


@dataclass
class RunView:
    """A run as the status endpoint shows it."""

    run: TaskRun
    status: str
    result: object = None
    error: str | None = None
    traceback: str | None = None
    meta: dict | None = None
    progress: dict | None = None
    children: list[str] = field(default_factory=list)
    retries_of_this: list[str] = field(default_factory=list)
    recorded: bool = True  # the answer is the record's (not the backend's, ahead of it)


def get_run(task_id: str, *, lineage: bool = False) -> tuple[TaskRun, list[str], list[str]]:
    """The run, and with ``lineage`` the ids of its children and of its retries."""
    with database.unavailable_as():
        run = db.session.get(TaskRun, task_id)
        children: list[str] = []
        retries: list[str] = []
        if run is not None and lineage:
            # Both columns are indexed; one query for the two lists.
            for run_id, parent_id in db.session.execute(
                sa.select(TaskRun.id, TaskRun.parent_id)
                .where(sa.or_(TaskRun.parent_id == task_id, TaskRun.retry_of == task_id))
                .order_by(TaskRun.created_at)
            ):
                (children if parent_id == task_id else retries).append(run_id)
    if run is None:
        raise NotFound(
            f"No task with id {task_id} was launched through this service "
            "(or its record has been purged)."
        )
    return run, children, retries


def _parse_date(value) -> datetime | None:
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _error_text(result) -> str | None:
    if isinstance(result, BaseException):  # the backend decodes stored exceptions
        if type(result).__name__ == "WorkerLostError":
            return f"worker lost: {result}"  # as the worker's own record says it
        return f"{type(result).__name__}: {result}"
    if isinstance(result, dict) and "exc_type" in result:
        message = result.get("exc_message")
        if isinstance(message, list | tuple):
            message = " ".join(str(m) for m in message)
        return f"{result['exc_type']}: {message}"
    if result is None:
        return None
    return str(result)


def describe(task_id: str, *, lineage: bool = True) -> RunView:
    """The run's record, refreshed from the result backend while it is not finished."""
    run, children, retries = get_run(task_id, lineage=lineage)
    view = RunView(run=run, status=run.status, result=run.result, error=run.error,
                   traceback=run.traceback, meta=run.meta, children=children,
                   retries_of_this=retries)
    if not runstate.is_finished(run.status):
        _merge_live_state(view)
    if isinstance(view.meta, dict) and {"current", "total"} <= view.meta.keys():
        view.progress = {k: view.meta.get(k) for k in ("current", "total", "percent", "message")}
    log.info("📊 status of %s: %s", task_id, view.status)
    return view


def _merge_live_state(view: RunView) -> None:
    celery_app = current_app.extensions["celery"]
    try:
        meta = celery_app.backend.get_task_meta(view.run.id)
    except Exception as exc:  # noqa: BLE001 - the record still answers
        log.warning("result backend unreachable while reading %s: %s", view.run.id, exc)
        return
    state = meta.get("status") or "PENDING"
    result = meta.get("result")
    if state == "PENDING":
        return  # the backend knows nothing yet: the record's state stands
    view.status = state
    if state in runstate.FINISHED:
        # Shown, not written: a read does not wait on a database write. The worker
        # records the end itself; beat's reconcile settles it if the worker could not.
        view.recorded = False
        db.session.expunge(view.run)
        for key, value in ended_values(view.run, meta).items():
            setattr(view.run, key, value)
        view.status = view.run.status
        view.result, view.error, view.traceback = (
            view.run.result, view.run.error, view.run.traceback)
        view.meta = view.run.meta
        return
    if state in ("PROGRESS", "STARTED") and isinstance(result, dict):
        view.meta = result
    elif state == "RETRY":
        view.error = _error_text(result)


def reconcile_from_meta(run: TaskRun, meta: dict) -> bool:
    """The backend saw an end before the worker recorded it (or could not): keep it.

    True when the record was changed (it was not finished yet). A database that is
    down leaves the run to the next pass; any other failure is a bug, logged with its
    traceback, and also leaves the run unchanged rather than stopping the pass: one run
    whose end cannot be written must not keep every other one unsettled.
    """
    values = ended_values(run, meta)
    try:
        changed = runstate.finish(run.id, values.pop("status"), started_at=run.started_at,
                                  **values)
        db.session.commit()
        db.session.refresh(run)
    except SQLAlchemyError as exc:
        database.rollback()
        if not database.is_unavailable(exc):
            log.exception("❌ could not record the end of %s reported by the result "
                          "backend", run.id)
        return False
    return bool(changed)


def ended_values(run: TaskRun, meta: dict) -> dict:
    """The record's columns for the end the result backend reports."""
    state, result = meta.get("status"), meta.get("result")
    trace, date_done = meta.get("traceback"), meta.get("date_done")
    finished = _parse_date(date_done) or utcnow()
    values: dict = {"status": state, "finished_at": finished,
                    "runtime": runstate.runtime(run.started_at, finished)}
    if state == "SUCCESS":
        values["result"] = result
    elif state == "REVOKED":
        values["error"] = (runstate.termination_reason("terminated", run.error)
                           if run.error else _error_text(result))
    else:
        values["error"] = storable_text(_error_text(result))
        values["traceback"] = storable_text(trace)
    return values

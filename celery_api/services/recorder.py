"""The worker side of the history: Celery signals keep each run's record current.

API launches are recorded before they are published (``services.launch``); the
worker then moves the record through STARTED, RETRY and its final state. A task
sent straight to Celery by someone else is recorded when a worker first runs it.
Recording never breaks a task: a database error is logged and the task goes on.
"""

from __future__ import annotations

import json
import logging
import traceback as tb
from datetime import timedelta

import sqlalchemy as sa
from billiard.exceptions import WorkerLostError
from celery import signals
from celery.exceptions import TimeLimitExceeded
from celery.worker import state as worker_state

from celery_api.catalog import get_catalog
from celery_api.extensions import db
from celery_api.models import FINISHED_STATES, TaskRun, utcnow

TERMINATE_REQUESTED = "terminate requested"  # written by services.control

log = logging.getLogger("celery_api.worker")
_connected = False


def _json_safe(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _flask_app(task):
    celery_app = getattr(task, "app", None)
    return getattr(celery_app, "flask_app", None)


INTERNAL_PREFIX = "celery_api."  # the service's own housekeeping tasks: not history


def _guarded(handler):
    """Run a signal handler in the Flask app context; log, never raise."""

    def wrapper(sender=None, **kwargs):
        task = kwargs.pop("task", None) or sender
        app = _flask_app(task)
        if app is None or getattr(task, "name", "").startswith(INTERNAL_PREFIX):
            return
        with app.app_context():
            try:
                handler(task, **kwargs)
                db.session.commit()
            except Exception:  # noqa: BLE001 - recording must not break the task
                db.session.rollback()
                log.exception("❌ could not record %s for task %s", handler.__name__,
                              kwargs.get("task_id") or getattr(kwargs.get("request"), "id", "?"))
            finally:
                db.session.remove()

    wrapper.__name__ = handler.__name__
    return wrapper


def _update(task_id: str, *conditions, **values) -> int:
    stmt = sa.update(TaskRun).where(TaskRun.id == task_id, *conditions).values(**values)
    return db.session.execute(stmt).rowcount


@_guarded
def on_prerun(task, task_id=None, args=None, kwargs=None, **_):
    request = task.request
    now = utcnow()
    request.celery_api_started = now  # for the runtime at postrun, without a query
    updated = _update(
        task_id,
        TaskRun.status.not_in(FINISHED_STATES),
        status="STARTED",
        started_at=sa.func.coalesce(TaskRun.started_at, now),
        worker=request.hostname,
        retries=request.retries or 0,
        attempts=TaskRun.attempts + 1,
    )
    if updated:
        log.info("▶️ started %s on %s", task_id, request.hostname)
        return
    existing = db.session.execute(
        sa.select(TaskRun.status).where(TaskRun.id == task_id)).scalar_one_or_none()
    if existing is not None:
        # Already finished: revoked while no worker was listening, most likely.
        request.celery_api_revoked = existing == "REVOKED"
        return
    # A task this API did not launch: record it now.
    definition = get_catalog().by_celery_name(task.name)
    params = kwargs or {}
    if args:
        params = {"args": list(args), "kwargs": kwargs or {}}
    delivery = request.delivery_info or {}
    db.session.add(
        TaskRun(
            id=task_id,
            task_type=definition.task_type if definition else task.name,
            task_name=task.name,
            params=_json_safe(params),
            status="STARTED",
            queue=delivery.get("routing_key"),
            priority=delivery.get("priority"),
            worker=request.hostname,
            retries=request.retries or 0,
            attempts=1,
            parent_id=request.parent_id,
            root_id=request.root_id or task_id,
            company_id=_company_id(params),
            created_at=now,
            started_at=now,
            tags=[],
        )
    )
    log.info("▶️ started %s (%s, not launched through the API) on %s",
             task_id, task.name, request.hostname)


def _company_id(params) -> str | None:
    value = params.get("company_id") if isinstance(params, dict) else None
    return str(value)[:36] if value else None


def _finish_values(task_id: str, now, request=None) -> dict:
    # The first start of this attempt is known to the process that ran it; the record
    # keeps the first start of all attempts, read only when it is not known here.
    started = getattr(request, "celery_api_started", None) if request is not None else None
    first_attempt = request is not None and not request.retries and not (
        request.delivery_info or {}).get("redelivered")
    if started is None or not first_attempt:
        started = db.session.execute(
            sa.select(TaskRun.started_at).where(TaskRun.id == task_id)
        ).scalar_one_or_none() or started
    runtime = (now - started).total_seconds() if started else None
    return {"finished_at": now, "runtime": runtime}


@_guarded
def on_postrun(task, task_id=None, retval=None, state=None, **_):
    now = utcnow()
    if state == "SUCCESS":
        _update(task_id, TaskRun.status != "REVOKED", status="SUCCESS", result=_json_safe(retval),
                error=None, traceback=None, **_finish_values(task_id, now, task.request))
        log.info("✅ %s succeeded", task_id)
    elif state == "FAILURE":
        error = f"{type(retval).__name__}: {retval}"
        trace = "".join(tb.format_exception(retval)) if isinstance(retval, BaseException) else None
        _update(task_id, TaskRun.status != "REVOKED", status="FAILURE", error=error,
                traceback=trace, **_finish_values(task_id, now, task.request))
        log.error("❌ %s failed: %s", task_id, error)
    elif state == "RETRY":
        reason = getattr(retval, "exc", None) or retval
        _update(task_id, TaskRun.status != "REVOKED", status="RETRY",
                retries=(task.request.retries or 0) + 1, error=f"retrying: {reason}")
        log.warning("🔁 %s will retry: %s", task_id, reason)
        return
    else:
        return
    _maybe_finish_parent(task, task_id, task.request.parent_id)


@_guarded
def on_revoked(task, request=None, terminated=False, signum=None, expired=False, **_):
    task_id = request.id
    now = utcnow()
    if expired:
        reason = "expired before it started"
    elif terminated:
        requested = db.session.execute(
            sa.select(TaskRun.error).where(TaskRun.id == task_id)).scalar_one_or_none()
        reason = termination_reason(f"terminated with signal {signum}", requested)
    else:
        reason = "revoked"
    # A run the API already marked REVOKED keeps its record (and the caller's reason).
    _update(task_id, TaskRun.status.not_in(FINISHED_STATES), status="REVOKED",
            error=reason, **_finish_values(task_id, now))
    log.info("🚫 %s revoked (%s)", task_id, reason)
    _maybe_finish_parent(task, task_id, getattr(request, "parent_id", None))


@_guarded
def on_failure(task, task_id=None, exception=None, **_):
    """A worker process lost mid-task, or killed at its hard time limit: no postrun then."""
    if isinstance(exception, WorkerLostError):
        reason = f"worker lost: {exception}"
    elif isinstance(exception, TimeLimitExceeded):
        reason = f"hard time limit exceeded: {exception}"
    else:
        return  # ordinary failures are recorded by on_postrun, with their traceback
    now = utcnow()
    _update(task_id, TaskRun.status.not_in(FINISHED_STATES), status="FAILURE",
            error=reason, **_finish_values(task_id, now))
    log.error("❌ %s failed: %s", task_id, reason)
    _maybe_finish_parent(task, task_id, getattr(task.request, "parent_id", None))


def termination_reason(base: str, recorded: str | None) -> str:
    """``base``, plus the caller's reason if the revoke request recorded one."""
    if recorded and recorded.startswith(TERMINATE_REQUESTED):
        return base + recorded[len(TERMINATE_REQUESTED):]
    if recorded and recorded.startswith("terminated"):
        return recorded  # the worker's confirmation already wrote it
    return base


def on_worker_ready(sender=None, **_):
    """Load runs revoked while this worker was away, so Celery discards them on receipt."""
    celery_app = getattr(sender, "app", None)
    app = getattr(celery_app, "flask_app", None)
    if app is None:
        return
    with app.app_context():
        try:
            horizon = utcnow() - timedelta(seconds=celery_app.conf.result_expires or 86400)
            ids = db.session.execute(
                sa.select(TaskRun.id).where(
                    TaskRun.status == "REVOKED",
                    TaskRun.started_at.is_(None),
                    TaskRun.created_at >= horizon,
                )
            ).scalars().all()
            for task_id in ids:
                worker_state.revoked.add(task_id)
            log.info("loaded %d revoked run(s) from the history", len(ids))
        except Exception:  # noqa: BLE001
            log.exception("❌ could not load revoked runs")
        finally:
            db.session.remove()


def _maybe_finish_parent(task, task_id: str, parent_id: str | None) -> None:
    """Close a fan-out parent once each of its children has finished."""
    if not parent_id:
        return
    db.session.commit()  # our own final state first, so the last child sees every sibling
    from celery_api.services import fanout

    fanout.finish_if_complete(parent_id, task.app)


def on_worker_process_init(**_):
    """A pool process starts as a fork of the worker, which may hold database
    connections: drop the inherited ones (without closing the parent's) so the two
    processes never share a socket."""
    from celery import current_app as current_celery

    app = getattr(current_celery, "flask_app", None)
    if app is None:
        return
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose(close=False)


def connect_signals() -> None:
    global _connected
    if _connected:
        return
    signals.task_prerun.connect(on_prerun, weak=False)
    signals.task_postrun.connect(on_postrun, weak=False)
    signals.task_revoked.connect(on_revoked, weak=False)
    signals.task_failure.connect(on_failure, weak=False)
    signals.worker_ready.connect(on_worker_ready, weak=False)
    signals.worker_process_init.connect(on_worker_process_init, weak=False)
    _connected = True

"""The worker side of the history: Celery signals keep each run's record current.

API launches are recorded before they are published (``services.launch``); the
worker then moves the record through STARTED, RETRY and its final state. A task
sent straight to Celery by someone else is recorded when a worker first runs it.
Recording never breaks a task: a database error is logged and the task goes on.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import traceback as tb
from datetime import datetime, timedelta

import sqlalchemy as sa
from billiard.exceptions import WorkerLostError
from celery import signals
from celery.exceptions import TimeLimitExceeded
from flask import current_app
from sqlalchemy.exc import IntegrityError

from celery_api.catalog import get_catalog
from celery_api.extensions import db
from celery_api.fences import celery as celery_fence
from celery_api.models import TaskRun, company_id_of, storable_text, utcnow
from celery_api.services import runstate

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


@_guarded
def on_prerun(task, task_id=None, args=None, kwargs=None, **_):
    """Claim the run for this delivery, or mark the delivery to be dropped unrun."""
    request = task.request
    now = utcnow()
    request.celery_api_started = now  # for the runtime at postrun, without a query
    retries = request.retries or 0
    found = runstate.claim(task_id, worker=request.hostname, retries=retries, now=now)
    if found.outcome == "missing":
        found = _record_external(task, task_id, args, kwargs, now)
    if found.outcome == "running" and _redelivered_after_loss(task, task_id, found):
        found = runstate.take_over(task_id, found, worker=request.hostname, retries=retries,
                                   now=now)
    if found.claimed:
        request.celery_api_attempt = found.attempt
        log.info("▶️ started %s on %s (attempt %d)", task_id, request.hostname, found.attempt)
        return
    # Finished, revoked, a stale copy of an earlier attempt, or running elsewhere: the
    # task body does not run (FlaskTask drops the delivery).
    request.celery_api_drop = found
    log.warning("⏭️ dropped a delivery of %s: the run is %s (%s%s)", task_id, found.status,
                found.outcome, f" on {found.worker}" if found.outcome == "running" else "")


def _record_external(task, task_id, args, kwargs, now) -> runstate.Claim:
    """A task this API did not launch (sent straight to Celery): record it, claimed."""
    request = task.request
    definition = get_catalog().by_celery_name(task.name)
    params = named_params(task, args, kwargs)
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
            company_id=company_id_of(params),
            created_at=now,
            started_at=now,
            tags=[],
        )
    )
    try:
        db.session.flush()
    except IntegrityError:
        # Another delivery of the same message recorded it first: claim like any copy.
        db.session.rollback()
        return runstate.claim(task_id, worker=request.hostname,
                              retries=request.retries or 0, now=now)
    log.info("📥 recording %s (%s), not launched through the API", task_id, task.name)
    return runstate.Claim("claimed", attempt=1)


def named_params(task, args, kwargs) -> dict:
    """A run's arguments as its params: positional ones named after the task's
    signature (``send_task("sii.sync_documents", args=[company, 2])`` is recorded as
    ``{"company_id": company, "months": 2}``), as the API records a launch. When they
    cannot be named (too many, or ``*args``): ``{"args": [...], "kwargs": {...}}``."""
    kwargs = dict(kwargs or {})
    if not args:
        return kwargs
    unnamed = {"args": list(args), "kwargs": kwargs}
    try:
        # task.run of a bound task (bind=True) is a bound method: ``self`` is not in it.
        signature = inspect.signature(task.run)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return unnamed
    params: dict = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            return unnamed
        if kind is inspect.Parameter.VAR_KEYWORD:
            params.update(value)
        else:
            params[name] = value
    return params


def redelivered_on_purpose(task) -> bool:
    """Task types safe to repeat are acknowledged late and requeued when their worker
    process is lost: only their copies may take over a run recorded as running."""
    return bool(task.acks_late and task.reject_on_worker_lost)


def _redelivered_after_loss(task, task_id: str, found: runstate.Claim) -> bool:
    """A run recorded as running met another delivery of its message. The delivery
    takes the run over only when the worker the record names *answers* and does not
    list the run among its active tasks (its pool process was lost). No answer is not
    an answer: a busy or stopped worker may still be running it, so the copy does not
    run (FlaskTask keeps a deferred copy that asks again later)."""
    if not redelivered_on_purpose(task) or not found.worker:
        return False
    from celery_api.services.maintenance import ask_silent_again

    db.session.commit()  # hold no write lock across the broadcast below
    timeout = current_app.config["INSPECT_TIMEOUT"]
    try:
        replies = task.app.control.inspect(
            destination=[found.worker], timeout=timeout).active() or {}
        replies = ask_silent_again(task.app, replies, [found.worker], timeout)
    except Exception as exc:  # noqa: BLE001 - cannot tell: never risk a second execution
        log.warning("could not ask %s whether it runs %s: %s", found.worker, task_id, exc)
        return False
    if found.worker not in replies:
        log.warning("%s did not answer whether it still runs %s: not taken over",
                    found.worker, task_id)
        return False
    # This delivery may be listed too (same node, this process): leave one such entry
    # out. Any other entry of the run is the original, still running.
    entries = [(host, running.get("worker_pid")) for host, active in replies.items()
               for running in active or [] if running.get("id") == task_id]
    me = (task.request.hostname, os.getpid())
    if me in entries:
        entries.remove(me)
    return not entries


def _finish_started(request) -> datetime | None:
    """The run's first start when this process knows it (its first attempt), else None
    (read from the record)."""
    first = (getattr(request, "celery_api_attempt", None) == 1 and not request.retries)
    return getattr(request, "celery_api_started", None) if first else None


# The current attempt's own end replaces anything but a revoke (it may replace a
# "worker lost" that reconcile wrote while the attempt was still running).
ENDABLE = runstate.ALL - {"REVOKED"}


@_guarded
def on_postrun(task, task_id=None, retval=None, state=None, **_):
    request = task.request
    mine = runstate.current_attempt(getattr(request, "celery_api_attempt", None))
    if state == "SUCCESS":
        runstate.finish(task_id, "SUCCESS", started_at=_finish_started(request), from_=ENDABLE,
                        where=mine, result=_json_safe(retval), error=None, traceback=None)
        log.info("✅ %s succeeded", task_id)
    elif state == "FAILURE":
        error = storable_text(f"{type(retval).__name__}: {retval}")
        trace = storable_text("".join(tb.format_exception(retval))
                              if isinstance(retval, BaseException) else None)
        runstate.finish(task_id, "FAILURE", started_at=_finish_started(request), from_=ENDABLE,
                        where=mine, error=error, traceback=trace)
        log.error("❌ %s failed: %s", task_id, error)
    elif state == "RETRY":
        reason = getattr(retval, "exc", None) or retval
        runstate.transition(task_id, "RETRY", where=mine, retries=(request.retries or 0) + 1,
                            error=storable_text(f"retrying: {reason}"))
        log.warning("🔁 %s will retry: %s", task_id, reason)
        return
    else:
        return
    _maybe_finish_parent(task, task_id, request.parent_id)


@_guarded
def on_revoked(task, request=None, terminated=False, signum=None, expired=False, **_):
    task_id = request.id
    if expired:
        reason = "expired before it started"
    elif terminated:
        requested = db.session.execute(
            sa.select(TaskRun.error).where(TaskRun.id == task_id)).scalar_one_or_none()
        reason = runstate.termination_reason(f"terminated with signal {signum}", requested)
    else:
        reason = "revoked"
    # A run the API already marked REVOKED keeps its record (and the caller's reason).
    # Only a termination stops a running run: an expired or revoked *copy* of a run
    # that another delivery is running says nothing about that run.
    runstate.finish(task_id, "REVOKED", error=reason,
                    from_=runstate.UNFINISHED if terminated else runstate.QUEUED)
    log.info("🚫 %s revoked (%s)", task_id, reason)
    _maybe_finish_parent(task, task_id, getattr(request, "parent_id", None))


@_guarded
def on_failure(task, task_id=None, exception=None, **_):
    """A worker process lost mid-task, or killed at its hard time limit: no postrun then."""
    if isinstance(exception, WorkerLostError):
        reason = storable_text(f"worker lost: {exception}")
    elif isinstance(exception, TimeLimitExceeded):
        reason = storable_text(f"hard time limit exceeded: {exception}")
    else:
        return  # ordinary failures are recorded by on_postrun, with their traceback
    runstate.finish(task_id, "FAILURE", error=reason)
    log.error("❌ %s failed: %s", task_id, reason)
    _maybe_finish_parent(task, task_id, getattr(task.request, "parent_id", None))


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
            celery_fence.remember_revoked(ids)
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

    fanout.finish_if_complete(parent_id, task.app,
                              hostname=getattr(task.request, "hostname", None))


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

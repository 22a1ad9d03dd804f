"""Keeping the history true: reconcile runs whose worker was lost, purge old runs.

Both run periodically under beat (``celery_api.reconcile_runs``,
``celery_api.purge_history``) and on demand (``flask history reconcile|purge``).
"""

from __future__ import annotations

import logging
from datetime import timedelta

import sqlalchemy as sa
from flask import current_app

from celery_api.catalog import get_catalog
from celery_api.extensions import db
from celery_api.fences import celery as celery_fence
from celery_api.fences import kombu as kombu_fence
from celery_api.models import TaskRun, TaskRunTag, utcnow
from celery_api.services import fanout, runstate
from celery_api.services.cache import run_cache
from celery_api.services.runs import reconcile_from_meta
from celery_api.services.stats import queue_lengths

log = logging.getLogger("celery_api.maintenance")


def reconcile(*, grace_seconds: float | None = None) -> dict:
    """Mark FAILURE ("worker lost") the runs recorded as running that no worker runs.

    A run counts as lost when it started more than ``grace_seconds`` ago and no live
    worker lists it among its active tasks (its worker is gone, or restarted and
    forgot it). Runs of task types declared safe to repeat are left alone until the
    broker's visibility timeout has passed too: the broker redelivers those.
    Fan-out parents waiting on their children are not running anywhere by design.
    """
    config = current_app.config
    grace = config["RECONCILE_GRACE_SECONDS"] if grace_seconds is None else grace_seconds
    now = utcnow()
    celery_app = current_app.extensions["celery"]
    settled = _settle_from_backend(celery_app, now - timedelta(seconds=grace))
    stranded = _stranded(celery_app, now, grace)
    candidates = list(db.session.execute(
        sa.select(TaskRun).where(TaskRun.status.in_(runstate.RUNNING),
                                 TaskRun.started_at < now - timedelta(seconds=grace))
    ).scalars())
    candidates = [r for r in candidates
                  if not (isinstance(r.meta, dict) and "fanout" in r.meta)]
    if not candidates:
        return {"checked": 0, "lost": 0, "settled": settled, **stranded}
    replies = celery_app.control.inspect(timeout=config["INSPECT_TIMEOUT"]).active() or {}
    active = {task["id"] for tasks in replies.values() for task in tasks or []}
    visibility = config["CELERY"]["broker_transport_options"].get("visibility_timeout", 3600)
    catalog = get_catalog()
    suspects = []
    for run in candidates:
        definition = catalog.by_celery_name(run.task_name)
        if run.id in active or (definition and definition.safe_to_repeat and
                                run.started_at > now - timedelta(seconds=visibility + grace)):
            continue
        suspects.append(run)
    replies = ask_silent_again(celery_app, replies, {run.worker for run in suspects},
                               config["INSPECT_TIMEOUT"])
    active = {task["id"] for tasks in replies.values() for task in tasks or []}
    lost: list[TaskRun] = []
    for run in suspects:
        if run.id in active:
            continue
        alive = "alive" if run.worker in replies else "gone"
        changed = runstate.finish(
            run.id, "FAILURE", now=now, started_at=run.started_at, from_=runstate.RUNNING,
            error=f"worker lost: {run.worker or 'unknown worker'} ({alive}) no "
                  "longer runs this task")
        db.session.commit()
        if changed:
            lost.append(run)
            celery_app.backend.mark_as_failure(
                run.id, RuntimeError(f"worker lost: {run.worker}"))
            log.error("❌ %s failed: worker lost (%s)", run.id, run.worker)
    if lost:
        # Fence them: a worker that was only slow to answer (stopped, overloaded) and
        # still runs one kills it when it reads this, before a retry can run it again.
        try:
            celery_app.control.revoke([run.id for run in lost], terminate=True,
                                      signal="SIGKILL")
        except Exception as exc:  # noqa: BLE001 - the record already says lost
            log.warning("could not fence %d lost run(s): %s", len(lost), exc)
    for run in lost:
        if run.parent_id:
            fanout.finish_if_complete(run.parent_id, celery_app)
    return {"checked": len(candidates), "lost": len(lost),
            "lost_ids": [r.id for r in lost], "settled": settled, **stranded}


QUEUE_READ_LIMIT = 10_000  # longer Redis queues are not read: their runs are not judged


def _stranded(celery_app, now, grace: float) -> dict:
    """PENDING runs whose message no queue and no worker holds: reported, not changed.

    A message a worker took but never acknowledged goes back to its queue after the
    visibility timeout (Redis) or as soon as the worker's connection drops (RabbitMQ),
    so a run older than that which is still PENDING, held by no queue and no worker,
    was lost on the way (a broker that lost its data, a queue deleted by hand). Those
    are logged and returned as ``stranded_ids`` for an operator to retry or revoke, and
    leave the result cache (their ``cache_key`` is cleared).
    """
    transport = current_app.config["CELERY"]["broker_transport_options"] or {}
    settle = grace + transport.get("visibility_timeout", 0)
    before = now - timedelta(seconds=settle)
    candidates = db.session.execute(
        sa.select(TaskRun.id, TaskRun.queue)
        .where(TaskRun.status == "PENDING", TaskRun.dispatch_at.is_(None),
               TaskRun.created_at < before,
               sa.or_(TaskRun.eta.is_(None), TaskRun.eta < before))
        .limit(1000)).all()
    if not candidates:
        return {"stranded": 0, "stranded_ids": []}
    queues = sorted({queue or "celery" for _, queue in candidates})
    try:
        in_broker, unknown_queues = _held_by_broker(celery_app, queues)
        inspect = celery_app.control.inspect(timeout=current_app.config["INSPECT_TIMEOUT"])
        in_workers = {task.get("id") for tasks in (inspect.reserved() or {}).values()
                      for task in tasks or []}
        in_workers |= {(task.get("request") or {}).get("id") for tasks in
                       (inspect.scheduled() or {}).values() for task in tasks or []}
    except Exception as exc:  # noqa: BLE001 - the broker is down: next pass
        log.warning("broker unreachable while looking for stranded runs: %s", exc)
        return {"stranded": 0, "stranded_ids": []}
    stranded = [run_id for run_id, queue in candidates
                if (queue or "celery") not in unknown_queues
                and run_id not in in_broker and run_id not in in_workers]
    for run_id in stranded:
        log.warning("⚠️ %s is PENDING but no queue or worker holds its message: retry or "
                    "revoke it", run_id)
    if stranded:
        # They answer identical launches no more (the result cache): a new one runs.
        db.session.execute(sa.update(TaskRun)
                           .where(TaskRun.id.in_(stranded), TaskRun.status == "PENDING",
                                  TaskRun.cache_key.is_not(None))
                           .values(cache_key=None))
        db.session.commit()
    return {"stranded": len(stranded), "stranded_ids": stranded}


def _held_by_broker(celery_app, queues: list[str]) -> tuple[set[str], set[str]]:
    """Ids of the messages the broker holds for ``queues``, and the queues it cannot
    tell about (too long to read on Redis; any non-empty queue elsewhere)."""
    with celery_app.connection_for_read() as conn:
        channel = conn.default_channel
        if kombu_fence.is_redis_channel(channel):
            ids = kombu_fence.redis_message_ids(channel, queues, QUEUE_READ_LIMIT)
            return (set(), set(queues)) if ids is None else (ids, set())
    lengths = queue_lengths(celery_app, queues)
    return set(), {queue for queue, length in lengths.items() if length}


def ask_silent_again(celery_app, replies: dict, workers, timeout: float) -> dict:
    """``replies`` to an ``inspect active``, with the ``workers`` missing from them asked
    again, alone and with three times ``timeout``: a reply can be missed on a busy
    machine. A reply that does not list a run is an answer; no reply is not. Used
    before a run is called lost (reconcile) or taken over (the worker's claim)."""
    silent = sorted({worker for worker in workers if worker and worker not in replies})
    if not silent:
        return replies
    again = celery_app.control.inspect(destination=silent, timeout=3 * timeout).active()
    return {**replies, **(again or {})}


def _settle_from_backend(celery_app, before, limit: int = 1000) -> int:
    """Runs the record shows unfinished but the result backend saw finish.

    The worker could not write their end (the database was down at that moment):
    take it from the backend, as a status read shows it, before anything is called lost.
    """
    runs = list(db.session.execute(
        sa.select(TaskRun)
        .where(TaskRun.status.in_(runstate.UNFINISHED), TaskRun.created_at < before)
        .order_by(TaskRun.created_at).limit(limit)
    ).scalars())
    try:
        metas = celery_fence.backend_metas(celery_app.backend, [run.id for run in runs])
    except Exception as exc:  # noqa: BLE001 - the backend is down: next pass
        log.warning("result backend unreachable while reconciling: %s", exc)
        return 0
    settled = 0
    for run in runs:
        meta = metas.get(run.id)
        if meta and meta.get("status") in runstate.FINISHED and reconcile_from_meta(run, meta):
            settled += 1
            log.info("settled %s as %s from the result backend", run.id, run.status)
            if run.parent_id:
                fanout.finish_if_complete(run.parent_id, celery_app)
    return settled


def purge(*, older_than_days: float | None = None, batch_size: int = 5000) -> int:
    """Delete finished runs that finished more than ``older_than_days`` ago."""
    days = current_app.config["HISTORY_RETENTION_DAYS"] if older_than_days is None \
        else older_than_days
    cutoff = utcnow() - timedelta(days=days)
    cache = run_cache()
    removed = 0
    while True:
        ids = list(db.session.execute(
            sa.select(TaskRun.id)
            .where(TaskRun.finished_at < cutoff, TaskRun.status.in_(runstate.FINISHED))
            .limit(batch_size)
        ).scalars())
        if not ids:
            break
        db.session.execute(sa.delete(TaskRunTag).where(TaskRunTag.run_id.in_(ids)))
        db.session.execute(sa.delete(TaskRun).where(TaskRun.id.in_(ids)))
        db.session.commit()
        if cache is not None:
            cache.forget(*ids)
        removed += len(ids)
    from celery_api.services import schedules  # the schedules' fire records, same cutoff

    fires = schedules.purge_fires(cutoff)
    from celery_api import idempotency  # expired Idempotency-Keys, on their own clock

    idempotency.purge_expired()
    from celery_api.services import webhooks  # finished delivery attempts, same cutoff

    webhooks.purge(cutoff)
    if removed or fires:
        log.info("purged %d run(s) finished before %s, and %d schedule fire record(s)",
                 removed, cutoff.isoformat(), fires)
    return removed

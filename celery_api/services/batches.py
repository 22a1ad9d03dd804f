"""Batches: many launches in one request, one transaction and one producer.

A batch is all or nothing at validation: one invalid item and nothing is launched,
with the errors keyed by item index. The records are inserted in one transaction,
then every message goes out through one producer; on Redis kombu pipelines them
(``Producer.batch``), so a batch of 1,000 costs one round trip, not 1,000. A broker
that refuses the connection means nothing was launched (the records are removed);
one that fails part way is reported as such, with the batch id to follow.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from dataclasses import dataclass

import redis.exceptions
import sqlalchemy as sa
from flask import current_app
from kombu.exceptions import BatchPublishError

from celery_api import limits
from celery_api.extensions import db
from celery_api.metrics import record_launch
from celery_api.models import TaskRun
from celery_api.services import control, database, runstate
from celery_api.services import launch as launch_service
from celery_api.services.errors import (
    Conflict,
    InvalidParams,
    NotFound,
    ServiceError,
    Unavailable,
)
from celery_api.services.launch import BROKER_ERRORS, Launched, LaunchOptions, Lineage

log = logging.getLogger("celery_api.launch")


MAX_WEBHOOK_URLS = 10  # distinct webhook_url values in one batch


@dataclass
class BatchItem:
    task_type: str
    params: dict
    options: LaunchOptions


def launch_batch(items: list[BatchItem], *, launched_by: str | None = None
                 ) -> tuple[str, list[Launched]]:
    batch_id = str(uuid.uuid4())
    lineage = Lineage(batch_id=batch_id, launched_by=launched_by)
    urls = {item.options.webhook_url for item in items if item.options.webhook_url}
    if len(urls) > MAX_WEBHOOK_URLS:
        # Each is resolved and checked before anything is launched: a name server that
        # answers slowly must not hold the request (a thread) for minutes.
        message = (f"A batch may name at most {MAX_WEBHOOK_URLS} distinct webhook_url "
                   f"values; this one names {len(urls)}. Split it, or subscribe with "
                   "POST /api/celery/webhooks.")
        record_launch("batch", "invalid")
        raise InvalidParams(message, errors={"json": {"tasks": [message]}})
    prepared, errors, details = [], {}, []
    for index, item in enumerate(items):
        try:
            prepared.append(launch_service.prepare(item.task_type, item.params, item.options,
                                                   lineage))
        except ServiceError as exc:
            errors[str(index)] = _item_errors(exc)
            details.append(f"tasks[{index}]: {exc.detail}")
    if errors:
        record_launch("batch", "invalid")
        shown = "; ".join(details[:5]) + ("; ..." if len(details) > 5 else "")
        raise InvalidParams(
            f"{len(errors)} of {len(items)} tasks are invalid; nothing was launched. {shown}",
            errors={"json": {"tasks": errors}})
    try:
        # Each item counts against its task type's limit and its queue's bound.
        limits.admit(prepared)
    except limits.Refused as exc:
        record_launch("batch", exc.outcome)
        raise
    launch_service.record_runs(prepared)
    published = _publish_all(batch_id, [p for p in prepared if not p.held])
    for p in prepared:
        record_launch(p.record["task_type"], "accepted")
    log.info("📤 launched batch %s: %d task(s)", batch_id, published)
    return batch_id, [Launched(id=p.record["id"], task_type=p.record["task_type"])
                      for p in prepared]


def _item_errors(exc: ServiceError) -> dict:
    """An item's field errors, as the single launch would report them under ``json``."""
    if exc.errors and "json" in exc.errors:
        return exc.errors["json"]
    return {"task_type": [exc.detail]}


def _publish_all(batch_id: str, prepared: list) -> int:
    if not prepared:
        return 0
    celery_app = current_app.extensions["celery"]
    sent = 0
    try:
        with celery_app.producer_or_acquire() as producer:
            # Redis: buffered and sent as one pipeline when the block ends. Other
            # transports publish one by one (each confirmed, on RabbitMQ).
            with producer.batch(max_size=max(len(prepared), 1)):
                for p in prepared:
                    launch_service.publish(p.record, p.celery_name, p.options,
                                           producer=producer)
                    sent += 1
        return len(prepared)
    except BatchPublishError as exc:
        if not _refused(exc.__cause__):
            # Part of the pipeline may have reached Redis: keep the records, say so.
            log.error("❌ batch %s: delivery uncertain: %r", batch_id, exc.__cause__)
            raise Unavailable(
                f"The task broker failed while batch {batch_id} was being sent: delivery "
                f"of its {len(prepared)} tasks is uncertain. Those that arrived will run; "
                f"follow GET /api/celery/batches/{batch_id} and revoke the batch (DELETE) "
                "before launching it again.", outcome="broker_unavailable") from exc
        sent = 0  # refused before anything was written: nothing was delivered
        failure: BaseException = exc
    except BROKER_ERRORS as exc:
        failure = exc
    except BaseException:
        launch_service.forget([p.record["id"] for p in prepared[sent:]])
        raise
    log.error("❌ batch %s: broker failed after %d of %d publish(es): %s",
              batch_id, sent, len(prepared), failure)
    launch_service.forget([p.record["id"] for p in prepared[sent:]])
    if sent:
        raise Unavailable(
            f"The task broker failed part way: the first {sent} of {len(prepared)} tasks "
            f"were launched in batch {batch_id} (see GET /api/celery/batches/{batch_id}); "
            "the rest were not. Launch those again later.",
            outcome="broker_unavailable") from failure
    raise Unavailable(
        "The task broker is unreachable; nothing in the batch was launched. Retry later.",
        outcome="broker_unavailable") from failure


def _refused(cause: BaseException | None) -> bool:
    """True when the pipeline failed to connect at all (so it sent nothing)."""
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return True
        if isinstance(cause, redis.exceptions.ConnectionError) and "connecting to" in str(cause):
            return True  # redis-py's wording for a failed connect, before any write
        cause = cause.__cause__ or cause.__context__
    return False


def runs_of(batch_id: str) -> list[TaskRun]:
    with database.unavailable_as():
        runs = list(db.session.execute(
            sa.select(TaskRun).where(TaskRun.batch_id == batch_id)
            .order_by(TaskRun.created_at, TaskRun.id)).scalars())
    if not runs:
        raise NotFound(f"No batch with id {batch_id} was launched through this service "
                       "(or its runs have been purged).")
    return runs


def summary(batch_id: str) -> dict:
    runs = runs_of(batch_id)
    counts = Counter(run.status for run in runs)
    return {
        "batch_id": batch_id,
        "total": len(runs),
        "counts": dict(sorted(counts.items())),
        "finished": all(runstate.is_finished(run.status) for run in runs),
        "created_at": min(run.created_at for run in runs),
        "tasks": runs,
    }


def revoke(batch_id: str, *, reason: str | None = None,
           revoked_by: str | None = None) -> dict:
    """Revoke every run of the batch still queued; running and finished ones stay."""
    runs = runs_of(batch_id)
    queued = [run for run in runs if run.status in runstate.QUEUED]
    if not queued:
        raise Conflict(f"No run of batch {batch_id} is still queued; there is nothing to "
                       "revoke (running runs are revoked one by one with terminate=true).")
    note = f": {reason}" if reason else ""
    revoked = control.revoke_records([run.id for run in queued],
                                     f"revoked with batch {batch_id}{note}",
                                     revoked_by=revoked_by)
    log.info("🚫 revoked %d queued run(s) of batch %s%s", len(revoked), batch_id, note)
    done = set(revoked)
    untouched = Counter(run.status for run in runs if run.id not in done)
    return {"batch_id": batch_id, "revoked": revoked,
            "not_revoked": dict(sorted(untouched.items())),
            "message": f"{len(revoked)} queued run(s) of batch {batch_id} revoked{note}."}

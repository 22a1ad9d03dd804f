"""Launching a run: validate, record, publish. The one path for API, fan-out, retry and beat."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime

import marshmallow as ma
import redis.exceptions
import sqlalchemy as sa
from flask import current_app
from kombu.exceptions import OperationalError
from sqlalchemy.exc import SQLAlchemyError

from celery_api.catalog import get_catalog
from celery_api.extensions import db
from celery_api.models import TaskRun, TaskRunTag, utcnow
from celery_api.services.errors import InvalidParams, Unavailable, UnknownTaskType
from celery_api.services.stats import known_queues

log = logging.getLogger("celery_api.launch")
# What a publish raises when the broker (or the Redis result backend) cannot be reached.
BROKER_ERRORS = (OperationalError, redis.exceptions.RedisError, OSError, TimeoutError)


@dataclass
class LaunchOptions:
    priority: int | None = None
    countdown: float | None = None
    eta: datetime | None = None
    expires: datetime | float | None = None
    queue: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Lineage:
    parent_id: str | None = None
    root_id: str | None = None
    retry_of: str | None = None
    batch_id: str | None = None
    schedule_id: str | None = None
    launched_by: str | None = None


def validate(task_type: str, params) -> tuple:
    """Return the catalog entry and the loaded, JSON-ready params, or raise."""
    catalog = get_catalog()
    definition = catalog.get(task_type)
    if definition is None:
        known = ", ".join(d.task_type for d in catalog)
        raise UnknownTaskType(f"Unknown task_type {task_type!r}. Known task types: {known}.")
    try:
        clean = definition.validate(params)
    except ma.ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        lines = [f"params.{k}: {' '.join(map(str, v)) if isinstance(v, list) else v}"
                 for k, v in messages.items()]
        raise InvalidParams(
            f"Invalid params for {task_type}: " + "; ".join(lines),
            errors={"json": {"params": messages}},
        ) from exc
    return definition, clean


def launch(
    task_type: str,
    params,
    options: LaunchOptions | None = None,
    lineage: Lineage | None = None,
) -> TaskRun:
    """Validate, record (PENDING) and publish one run; undo the record if publishing fails."""
    options = options or LaunchOptions()
    lineage = lineage or Lineage()
    definition, clean = validate(task_type, params)
    task_id = str(uuid.uuid4())
    queue = options.queue or definition.queue or current_app.config["CELERY"]["task_default_queue"]
    allowed = known_queues()
    if queue not in allowed:
        raise InvalidParams(
            f"Unknown queue {queue!r}: no worker is configured to consume it. "
            f"Use one of: {', '.join(allowed)}.",
            errors={"json": {"queue": [f"Must be one of: {', '.join(allowed)}."]}})
    expires = options.expires
    run = TaskRun(
        id=task_id,
        task_type=definition.task_type,
        task_name=definition.celery_name,
        params=clean,
        status="PENDING",
        queue=queue,
        priority=options.priority,
        tags=list(options.tags),
        eta=options.eta,
        expires=expires if isinstance(expires, datetime) else None,
        company_id=str(clean["company_id"]) if clean.get("company_id") else None,
        parent_id=lineage.parent_id,
        root_id=lineage.root_id or task_id,
        retry_of=lineage.retry_of,
        batch_id=lineage.batch_id,
        schedule_id=lineage.schedule_id,
        launched_by=lineage.launched_by,
        created_at=utcnow(),
    )
    try:
        db.session.add(run)
        db.session.add_all(TaskRunTag(run_id=task_id, tag=tag) for tag in sorted(set(run.tags)))
        db.session.commit()
    except SQLAlchemyError as exc:
        db.session.rollback()
        log.error("❌ could not record launch of %s: %s", task_type, exc)
        raise Unavailable(
            "The database is unreachable; nothing was launched. Retry later.") from exc

    log.info("📤 launching %s as %s on queue %s", task_type, task_id, queue)
    try:
        publish(run, definition.celery_name, options)
    except BROKER_ERRORS as exc:
        log.error("❌ could not publish %s (%s): %s", task_id, task_type, exc)
        _forget(run)
        raise Unavailable(
            "The task broker is unreachable; the task was not launched. Retry later."
        ) from exc
    except BaseException:
        log.exception("❌ could not publish %s (%s)", task_id, task_type)
        _forget(run)
        raise
    return run


def _forget(run: TaskRun) -> None:
    """Remove the record of a run that was never published."""
    try:
        db.session.execute(sa.delete(TaskRunTag).where(TaskRunTag.run_id == run.id))
        db.session.delete(run)
        db.session.commit()
    except SQLAlchemyError:
        db.session.rollback()
        log.exception("❌ could not remove the record of unpublished run %s", run.id)


def publish(run: TaskRun, celery_name: str, options: LaunchOptions) -> None:
    celery_app = current_app.extensions["celery"]
    kwargs = {}
    if lineage_parent := run.parent_id:
        kwargs["parent_id"] = lineage_parent
    if run.root_id and run.root_id != run.id:
        kwargs["root_id"] = run.root_id
    celery_app.send_task(
        celery_name,
        kwargs=run.params,
        task_id=run.id,
        queue=run.queue,
        priority=options.priority,
        countdown=options.countdown,
        eta=options.eta,
        expires=options.expires,
        retry=True,
        # One retry: enough to replace a pooled connection the broker has closed,
        # short enough to answer 503 quickly when the broker is really gone.
        retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.1,
                      "interval_max": 0.1},
        **kwargs,
    )

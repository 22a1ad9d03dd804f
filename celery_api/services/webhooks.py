"""Webhooks: subscriptions, the outbox of events, and their delivery (Standard Webhooks).

Events. A run reaching SUCCESS, FAILURE, REVOKED or RETRY is ``task.succeeded``,
``task.failed``, ``task.revoked`` or ``task.retried``; the last run of a batch to
finish makes ``batch.finished``; a schedule launching a run makes ``schedule.fired``.
``ping`` is sent on request to one subscription.

The outbox. Every writer of a run's state goes through ``services.runstate``, which
calls :func:`record_run_events` in the same transaction as the state change: one
``webhook_deliveries`` row (``pending``) per event and endpoint (each matching
subscription, and the run's own ``webhook_url``). The event commits with the state
change or not at all. When the session commits, the rows are published as
``celery_api.deliver_webhook`` tasks on the ``webhooks`` queue; if that publish fails
(the broker is down at that moment, the process dies between the commit and the
publish), beat's sweeper (:func:`sweep`) publishes every pending row that is due and
was never published (or whose publish failed) within
``CELERY_API_WEBHOOK_SWEEP_SECONDS``, and a published one not taken after the broker's
visibility timeout. A delivery task claims its row (``pending`` -> ``sending``, a
guarded update with a claim token), so a row published twice is sent once, and only
the claimer's update ends it.

Delivery (:func:`deliver`, on the webhook worker): the body is the event
``{type, timestamp, data}`` serialized once, signed with ``standardwebhooks`` (one
signature per active secret, so during a rotation's overlap both verify), POSTed
through the SSRF guard (``celery_api.ssrf``) with one deadline for the whole attempt. 2xx is
success; 410 disables the subscription; anything else (another status, a timeout, a
refused connection) schedules the next attempt after the next delay of
``CELERY_API_WEBHOOK_RETRY_SCHEDULE``, with +-20 % jitter. Each attempt is its own row,
listed by ``GET /webhooks/{id}/deliveries``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import random
import uuid
from datetime import datetime, timedelta

import sqlalchemy as sa
import urllib3
from flask import current_app, g, has_request_context
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from celery_api import ssrf
from celery_api.extensions import db
from celery_api.models import TaskRun, WebhookDelivery, WebhookSubscription, utcnow
from celery_api.services import database, runstate
from celery_api.services.errors import Conflict, InvalidParams, NotFound, ServiceError

log = logging.getLogger("celery_api.webhooks")

EVENT_TYPES = ("task.succeeded", "task.failed", "task.revoked", "task.retried",
               "batch.finished", "schedule.fired")
PING = "ping"
STATE_EVENTS = {"SUCCESS": "task.succeeded", "FAILURE": "task.failed",
                "REVOKED": "task.revoked", "RETRY": "task.retried"}
QUEUE = "webhooks"
TASK_NAME = "celery_api.deliver_webhook"
PAGE = 500  # rows the sweeper publishes per pass
MAX_OVERLAP_SECONDS = 7 * 86400
JITTER = 0.2
OUTBOX = "celery_api.webhooks.outbox"  # Session.info key: (delivery id, countdown) to publish
USER_AGENT = "celery-api-webhooks"


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


# The SSRF guard, as configured.

def allowed_hosts():
    return ssrf.parse_allowed(current_app.config["WEBHOOK_ALLOWED_HOSTS"])


def check_url(url: str, field: str, resolve: ssrf.Resolver = ssrf.system_resolve) -> None:
    """422 naming ``field`` when the guard refuses ``url``."""
    try:
        ssrf.check(url, allowed_hosts(), resolve)
    except ssrf.Refused as exc:
        message = f"Refused: {exc}."
        raise InvalidParams(f"Invalid request: {field}: {message}",
                            errors={"json": {field: [message]}}) from None


def check_launch_webhook(url: str | None) -> None:
    """A launch's ``webhook_url``: the signing secret must be configured, the URL pass.
    Within one request each URL is checked once (a batch's items often share one):
    its host's name is resolved once, not once per item."""
    if url is None:
        return
    if not current_app.config.get("WEBHOOK_SECRET"):
        message = ("This deployment does not sign launch webhooks: set "
                   "CELERY_API_WEBHOOK_SECRET (a whsec_ secret) to use webhook_url, or "
                   "subscribe with POST /api/celery/webhooks.")
        raise InvalidParams(f"Invalid request: webhook_url: {message}",
                            errors={"json": {"webhook_url": [message]}})
    checked = g.setdefault("celery_api_webhook_urls", {}) if has_request_context() else {}
    if url in checked:
        if checked[url] is not None:
            detail, errors = checked[url]
            raise InvalidParams(detail, errors=errors)
        return
    try:
        check_url(url, "webhook_url")
    except InvalidParams as exc:
        checked[url] = (exc.detail, exc.errors)
        raise
    checked[url] = None


# Subscriptions.

def _check_events(event_types: list[str]) -> list[str]:
    return sorted(set(event_types))


def create(data: dict, *, created_by: str | None = None) -> tuple[WebhookSubscription, str]:
    """A new subscription and its secret (shown once)."""
    check_url(data["url"], "url")
    now = utcnow()
    secret = new_secret()
    subscription = WebhookSubscription(
        id=str(uuid.uuid4()), url=data["url"], event_types=_check_events(data["event_types"]),
        task_type=data.get("task_type"), description=data.get("description"),
        enabled=data.get("enabled", True), secret=secret, created_by=created_by,
        created_at=now, updated_at=now)
    with database.unavailable_as():
        db.session.add(subscription)
        db.session.commit()
    log.info("🪝 webhook %s created for %s (%s)", subscription.id, subscription.url,
             ", ".join(subscription.event_types))
    return subscription, secret


def get(subscription_id: str) -> WebhookSubscription:
    with database.unavailable_as():
        subscription = db.session.get(WebhookSubscription, subscription_id)
    if subscription is None:
        raise NotFound(f"No webhook subscription with id {subscription_id}.")
    return subscription


def listing(*, limit: int, offset: int) -> tuple[list[WebhookSubscription], int]:
    with database.unavailable_as():
        total = db.session.execute(
            sa.select(sa.func.count()).select_from(WebhookSubscription)).scalar_one()
        rows = list(db.session.execute(
            sa.select(WebhookSubscription)
            .order_by(WebhookSubscription.created_at, WebhookSubscription.id)
            .limit(limit).offset(offset)).scalars())
    return rows, total


def update(subscription_id: str, changes: dict) -> WebhookSubscription:
    subscription = get(subscription_id)
    if "url" in changes:
        check_url(changes["url"], "url")
    if "event_types" in changes:
        changes["event_types"] = _check_events(changes["event_types"])
    for key, value in changes.items():
        setattr(subscription, key, value)
    if changes.get("enabled"):
        subscription.disabled_reason = None
    subscription.updated_at = utcnow()
    with database.unavailable_as():
        db.session.commit()
    return subscription


def delete(subscription_id: str) -> None:
    """Remove the subscription and its delivery log; a pending delivery is not sent."""
    subscription = get(subscription_id)
    with database.unavailable_as():
        db.session.execute(sa.delete(WebhookDelivery).where(
            WebhookDelivery.subscription_id == subscription_id))
        db.session.delete(subscription)
        db.session.commit()
    log.info("🪝 webhook %s deleted", subscription_id)


def rotate(subscription_id: str, overlap_seconds: float) -> tuple[WebhookSubscription, str]:
    """A new secret; the current one keeps signing (as a second signature) for
    ``overlap_seconds``, so receivers can switch without losing a delivery."""
    subscription = get(subscription_id)
    now = utcnow()
    secret = new_secret()
    if overlap_seconds > 0:
        subscription.previous_secret = subscription.secret
        subscription.previous_secret_expires_at = now + timedelta(seconds=overlap_seconds)
    else:
        subscription.previous_secret = subscription.previous_secret_expires_at = None
    subscription.secret = secret
    subscription.updated_at = now
    with database.unavailable_as():
        db.session.commit()
    log.info("🪝 webhook %s: secret rotated, the previous one signs for %g s more",
             subscription_id, overlap_seconds)
    return subscription, secret


def signing_secrets(subscription: WebhookSubscription, now: datetime) -> list[str]:
    secrets = [subscription.secret]
    if (subscription.previous_secret and subscription.previous_secret_expires_at
            and subscription.previous_secret_expires_at > now):
        secrets.append(subscription.previous_secret)
    return secrets


def view(subscription: WebhookSubscription, secret: str | None = None) -> dict:
    body = {
        "id": subscription.id, "url": subscription.url,
        "event_types": list(subscription.event_types or []),
        "task_type": subscription.task_type, "description": subscription.description,
        "enabled": subscription.enabled, "disabled_reason": subscription.disabled_reason,
        "previous_secret_expires_at": (
            subscription.previous_secret_expires_at
            if signing_secrets(subscription, utcnow())[1:] else None),
        "created_by": subscription.created_by, "created_at": subscription.created_at,
        "updated_at": subscription.updated_at,
    }
    if secret is not None:
        body["secret"] = secret
    return body


# Payloads.

def status_url(run_id: str) -> str:
    return f"{current_app.config['PUBLIC_URL']}/api/celery/tasks/{run_id}"


def run_documents(runs: list[TaskRun]) -> dict[str, dict]:
    """Each run's status document, as GET /tasks/{task_id} answers it, plus
    ``status_url``; a result larger than CELERY_API_WEBHOOK_MAX_RESULT_BYTES is left
    out (``result`` null, ``result_omitted`` true: read it at ``status_url``); an
    error or traceback longer than that is cut, meta or progress larger than that left
    out, each named in ``truncated`` (:func:`_bound`)."""
    from celery_api.resources.status.routes import STATUS_SCHEMA, _status_body
    from celery_api.services.runs import RunView

    ids = [run.id for run in runs]
    children: dict[str, list[str]] = {run_id: [] for run_id in ids}
    retried: dict[str, list[str]] = {run_id: [] for run_id in ids}
    for run_id, parent_id, retry_of in db.session.execute(
            sa.select(TaskRun.id, TaskRun.parent_id, TaskRun.retry_of)
            .where(sa.or_(TaskRun.parent_id.in_(ids), TaskRun.retry_of.in_(ids)))
            .order_by(TaskRun.created_at)):
        if parent_id in children:
            children[parent_id].append(run_id)
        if retry_of in retried:
            retried[retry_of].append(run_id)
    limit = current_app.config["WEBHOOK_MAX_RESULT_BYTES"]
    documents = {}
    for run in runs:
        meta = run.meta
        progress = None
        if isinstance(meta, dict) and {"current", "total"} <= meta.keys():
            progress = {k: meta.get(k) for k in ("current", "total", "percent", "message")}
        run_view = RunView(run=run, status=run.status, result=run.result, error=run.error,
                           traceback=run.traceback, meta=meta, progress=progress,
                           children=children[run.id], retries_of_this=retried[run.id])
        document = json.loads(json.dumps(STATUS_SCHEMA.dump(_status_body(run_view)),
                                         default=str))
        omitted = len(json.dumps(document["result"], default=str)) > limit
        if omitted:
            document["result"] = None
        document["result_omitted"] = omitted
        document["truncated"] = _bound(document, limit)
        document["status_url"] = status_url(run.id)
        documents[run.id] = document
    return documents


TRUNCATED = "… [truncated: the whole value is at status_url]"


def _bound(document: dict, limit: int) -> list[str]:
    """Bound the other free-form fields of a status document to ``limit`` characters
    each, as the result is: ``error`` keeps its start, ``traceback`` its end (where
    the exception is), both marked; ``meta`` and ``progress`` past the limit are left
    out (null). Returns the names of the fields cut or left out."""
    cut = []
    error = document.get("error")
    if isinstance(error, str) and len(error) > limit:
        document["error"] = error[:limit] + TRUNCATED
        cut.append("error")
    traceback = document.get("traceback")
    if isinstance(traceback, str) and len(traceback) > limit:
        document["traceback"] = TRUNCATED + "\n" + traceback[-limit:]
        cut.append("traceback")
    for field in ("meta", "progress"):
        if len(json.dumps(document.get(field), default=str)) > limit:
            document[field] = None
            cut.append(field)
    return cut


def envelope(event_type: str, data: dict, now: datetime) -> dict:
    """The Standard Webhooks payload shape."""
    return {"type": event_type, "timestamp": now.isoformat(), "data": data}


# The outbox.

def _enabled() -> list[WebhookSubscription]:
    return list(db.session.execute(sa.select(WebhookSubscription).where(
        WebhookSubscription.enabled.is_(True))).scalars())


def _subscribers(event_type: str, enabled: list | None = None) -> list[WebhookSubscription]:
    return [s for s in (_enabled() if enabled is None else enabled)
            if event_type in (s.event_types or [])]


def _row(event_type: str, url: str, payload: dict, now: datetime, *,
         subscription_id: str | None = None, run_id: str | None = None,
         message_id: str | None = None) -> dict:
    return {"message_id": message_id or f"msg_{uuid.uuid4().hex}", "attempt": 1,
            "subscription_id": subscription_id, "url": url, "event_type": event_type,
            "run_id": run_id, "payload": payload, "status": "pending", "due_at": now,
            "created_at": now}


def _insert(rows: list[dict], countdown: float | None = None, *,
            publish: bool = True) -> list[int]:
    """Insert delivery rows in the session's transaction (a repeated message attempt,
    or a second open attempt of a message, is skipped); with ``publish`` they are
    marked published (``published_at``) and published when the session commits (a
    publish that fails clears the mark: :func:`_publish_committed`)."""
    if not rows:
        return []
    dialect = db.session.get_bind().dialect.name
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert
              if dialect == "sqlite" else None)
    if insert is None:
        statement = sa.insert(WebhookDelivery)
    else:  # any unique index: (message_id, attempt) and one open attempt per message
        statement = insert(WebhookDelivery).on_conflict_do_nothing()
    if publish:
        rows = [dict(row, published_at=utcnow()) for row in rows]
    ids = [db.session.execute(statement.returning(WebhookDelivery.id), row).scalar()
           for row in rows]
    ids = [i for i in ids if i is not None]
    if publish:
        db.session.info.setdefault(OUTBOX, []).extend((i, countdown) for i in ids)
    return ids


def record_run_events(moved, status: str) -> int:
    """The events of the runs ``moved`` (rows of id, webhook_url, batch_id) to
    ``status``, written in the caller's transaction (``runstate.transition``).
    Returns the rows written. With no subscription and no launch webhook involved, it
    costs one query (the enabled subscriptions)."""
    event_type = STATE_EVENTS.get(status)
    if event_type is None or not moved:
        return 0
    enabled = _enabled()
    subscribers = _subscribers(event_type, enabled)
    batch_ids = ({row.batch_id for row in moved if row.batch_id}
                 if status in runstate.FINISHED and _subscribers("batch.finished", enabled)
                 else set())
    wanted = [row.id for row in moved if subscribers or row.webhook_url]
    runs = list(db.session.execute(
        sa.select(TaskRun).where(TaskRun.id.in_(wanted))
        .execution_options(populate_existing=True)).scalars()) if wanted else []
    now = utcnow()
    rows: list[dict] = []
    targeted = [run for run in runs if run.webhook_url or any(
        s.task_type in (None, run.task_type) for s in subscribers)]
    if targeted:
        documents = run_documents(targeted)
        for run in targeted:
            payload = envelope(event_type, documents[run.id], now)
            for subscription in subscribers:
                if subscription.task_type in (None, run.task_type):
                    rows.append(_row(event_type, subscription.url, payload, now,
                                     subscription_id=subscription.id, run_id=run.id))
            if run.webhook_url:
                rows.append(_row(event_type, run.webhook_url, payload, now, run_id=run.id))
    for batch_id in sorted(batch_ids):
        rows += _batch_finished(batch_id, now)
    return len(_insert(rows))


def _batch_finished(batch_id: str, now: datetime) -> list[dict]:
    """``batch.finished`` rows when no run of the batch is unfinished (in this
    transaction's view). Their message ids are derived from the batch: if two last runs
    finish at once and both see the batch finished, the second insert is skipped; if
    neither sees it (PostgreSQL, each before the other commits), the sweeper writes it
    (:func:`sweep_batches`)."""
    subscribers = _subscribers("batch.finished")
    if not subscribers:
        return []
    last = db.session.execute(sa.select(sa.func.max(TaskRun.finished_at))
                              .where(TaskRun.batch_id == batch_id)).scalar()
    # Only the subscriptions that existed when it finished.
    subscribers = [s for s in subscribers if last is None or s.created_at <= last]
    counts = dict(db.session.execute(
        sa.select(TaskRun.status, sa.func.count()).where(TaskRun.batch_id == batch_id)
        .group_by(TaskRun.status)).all())
    if not counts or set(counts) & runstate.UNFINISHED:
        return []
    types = set(db.session.execute(sa.select(TaskRun.task_type).distinct()
                                   .where(TaskRun.batch_id == batch_id)).scalars())
    created = db.session.execute(sa.select(sa.func.min(TaskRun.created_at))
                                 .where(TaskRun.batch_id == batch_id)).scalar()
    data = {"batch_id": batch_id, "total": sum(counts.values()),
            "counts": dict(sorted(counts.items())), "finished": True,
            "created_at": created.isoformat() if created else None,
            "status_url": f"{current_app.config['PUBLIC_URL']}/api/celery/batches/{batch_id}"}
    payload = envelope("batch.finished", data, now)
    return [_row("batch.finished", s.url, payload, now, subscription_id=s.id,
                 message_id="msg_" + uuid.uuid5(uuid.NAMESPACE_URL,
                                                f"batch.finished/{batch_id}/{s.id}").hex)
            for s in subscribers if s.task_type is None or s.task_type in types]


def forget_pending(run_ids: list[str], event_type: str) -> None:
    """Drop the unsent ``event_type`` deliveries of ``run_ids`` (a state change undone:
    a revoke whose broadcast failed), in the caller's transaction."""
    db.session.execute(sa.delete(WebhookDelivery).where(
        WebhookDelivery.run_id.in_(run_ids), WebhookDelivery.event_type == event_type,
        WebhookDelivery.status == "pending", WebhookDelivery.attempt == 1))


def record_schedule_fired(run_id: str) -> int:
    """``schedule.fired`` for the run a schedule just launched, in the caller's
    transaction (the one that records the run on the schedule)."""
    subscribers = _subscribers("schedule.fired")
    if not subscribers:
        return 0
    run = db.session.get(TaskRun, run_id, populate_existing=True)
    if run is None:
        return 0
    now = utcnow()
    payload = envelope("schedule.fired", run_documents([run])[run.id], now)
    return len(_insert([_row("schedule.fired", s.url, payload, now, subscription_id=s.id,
                             run_id=run.id)
                        for s in subscribers if s.task_type in (None, run.task_type)]))


def ping(subscription_id: str) -> WebhookDelivery:
    """A ``ping`` event to the subscription (enabled or not), through the webhook
    worker like any delivery; its attempts are listed with the others."""
    subscription = get(subscription_id)
    now = utcnow()
    payload = envelope(PING, {"webhook_id": subscription.id,
                              "message": "ping from celery-api"}, now)
    with database.unavailable_as():
        [delivery_id] = _insert([_row(PING, subscription.url, payload, now,
                                      subscription_id=subscription.id)])
        db.session.commit()
        return db.session.get(WebhookDelivery, delivery_id)


def resend(delivery_id: int, subscription_id: str | None,
           run_id: str | None = None) -> WebhookDelivery:
    """Send a finished delivery's message again: a new attempt of the same message
    (same ``webhook-id``, so a receiver that dedupes by it sees a repeat). The delivery
    belongs to the subscription ``subscription_id``, or (None) to the launch
    ``run_id``'s own webhook_url."""
    with database.unavailable_as():
        delivery = db.session.get(WebhookDelivery, delivery_id)
        if delivery is None or delivery.subscription_id != subscription_id or (
                run_id is not None and delivery.run_id != run_id):
            owner = (f"webhook {subscription_id}" if subscription_id
                     else f"the webhook_url of task {run_id}")
            raise NotFound(f"No delivery {delivery_id} of {owner}.")
        if delivery.status in ("pending", "sending"):
            raise Conflict(f"Delivery {delivery_id} is {delivery.status}; it can be re-sent "
                           "once it has finished.")
        later = db.session.execute(sa.select(sa.func.max(WebhookDelivery.attempt)).where(
            WebhookDelivery.message_id == delivery.message_id)).scalar()
        pending = db.session.execute(sa.select(WebhookDelivery.id).where(
            WebhookDelivery.message_id == delivery.message_id,
            WebhookDelivery.status.in_(("pending", "sending")))).first()
        if pending is not None:
            raise Conflict(f"Message {delivery.message_id} already has attempt {pending.id} "
                           "pending; follow it in the deliveries.")
        now = utcnow()
        row = _row(delivery.event_type, delivery.url, delivery.payload, now,
                   subscription_id=delivery.subscription_id, run_id=delivery.run_id,
                   message_id=delivery.message_id)
        row["attempt"] = later + 1
        inserted = _insert([row])
        if not inserted:  # a concurrent re-send inserted this attempt, or an open one
            db.session.rollback()
            raise Conflict(f"Message {delivery.message_id} is being re-sent by another "
                           "request; follow it in the deliveries.")
        [new_id] = inserted
        db.session.commit()
        log.info("🪝 delivery %s re-sent as %s (attempt %d of %s)", delivery_id, new_id,
                 later + 1, delivery.message_id)
        return db.session.get(WebhookDelivery, new_id)


# Delivery logs.

MAX_ID = 2**63 - 1  # the largest BIGINT


def encode_cursor(delivery_id: int) -> str:
    return base64.urlsafe_b64encode(f"d{delivery_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith("d") or not raw[1:].isascii() or not raw[1:].isdigit() \
                or len(raw) > 20:
            raise ValueError(raw)
        value = int(raw[1:])
        if not 1 <= value <= MAX_ID:  # a BIGINT id: anything else was never issued
            raise ValueError(raw)
        return value
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidParams(
            "Invalid request: cursor: not a cursor this service issued; pass next_cursor "
            "unchanged, or omit it for the first page.",
            errors={"query": {"cursor": ["Invalid cursor."]}}) from None


def deliveries(subscription_id: str, *, limit: int, cursor: str | None
               ) -> tuple[list[WebhookDelivery], str | None]:
    """A subscription's attempts, newest first, keyset-paginated by id."""
    get(subscription_id)
    conditions = [WebhookDelivery.subscription_id == subscription_id]
    if cursor:
        conditions.append(WebhookDelivery.id < decode_cursor(cursor))
    with database.unavailable_as():
        rows = list(db.session.execute(
            sa.select(WebhookDelivery).where(*conditions)
            .order_by(WebhookDelivery.id.desc()).limit(limit + 1)).scalars())
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, encode_cursor(rows[-1].id)
    return rows, None


def launch_deliveries(run_id: str) -> list[WebhookDelivery]:
    """The attempts to a run's own ``webhook_url``, oldest first."""
    from celery_api.services.runs import get_run

    get_run(run_id)  # 404 for a run this service never saw
    with database.unavailable_as():
        return list(db.session.execute(
            sa.select(WebhookDelivery).where(WebhookDelivery.run_id == run_id,
                                             WebhookDelivery.subscription_id.is_(None))
            .order_by(WebhookDelivery.id)).scalars())


def delivery_view(delivery: WebhookDelivery) -> dict:
    return {
        "id": delivery.id, "message_id": delivery.message_id, "attempt": delivery.attempt,
        "event_type": delivery.event_type, "task_id": delivery.run_id,
        "webhook_id": delivery.subscription_id, "url": delivery.url,
        "status": delivery.status, "status_code": delivery.status_code,
        "error": delivery.error, "duration_ms": delivery.duration_ms,
        "due_at": delivery.due_at, "started_at": delivery.started_at,
        "finished_at": delivery.finished_at, "next_retry_at": delivery.next_retry_at,
        "created_at": delivery.created_at,
    }


# Publishing: when the transaction commits, and beat's sweeper.

def publish(delivery_id: int, countdown: float | None = None) -> None:
    from celery_api.services.launch import RETRY_POLICY

    celery_app = current_app.extensions["celery"]
    celery_app.send_task(TASK_NAME, args=[delivery_id], queue=QUEUE, countdown=countdown,
                         retry=True, retry_policy=RETRY_POLICY)


@event.listens_for(Session, "after_commit")
def _publish_committed(session) -> None:
    """The delivery rows of the transaction just committed go to the webhook worker.
    A failure here loses nothing: the rows are pending, and the sweeper publishes them."""
    outbox = session.info.pop(OUTBOX, None)
    if not outbox:
        return
    unpublished = []
    for delivery_id, countdown in outbox:
        try:
            publish(delivery_id, countdown)
        except Exception as exc:  # noqa: BLE001 - the sweeper publishes it later
            unpublished.append(delivery_id)
            log.warning("🪝 delivery %s not published now (%s); beat's sweeper will",
                        delivery_id, exc)
    if unpublished:
        # Marked published when inserted: unmark them, so the sweeper's next pass (not
        # the re-publish horizon) publishes them. If this fails too, the horizon does.
        try:
            with db.engine.begin() as connection:
                connection.execute(sa.update(WebhookDelivery)
                                   .where(WebhookDelivery.id.in_(unpublished),
                                          WebhookDelivery.status == "pending")
                                   .values(published_at=None))
        except Exception as exc:  # noqa: BLE001 - the re-publish horizon covers it
            log.warning("🪝 could not unmark %d unpublished deliveries (%s); the sweeper "
                        "publishes them after the re-publish horizon", len(unpublished), exc)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session) -> None:
    session.info.pop(OUTBOX, None)


BATCH_WINDOW_SECONDS = 600  # how far back a starting sweeper looks for finished batches
_batches_swept_until: datetime | None = None  # this process's sweeper, so far


def sweep_batches(since: datetime, until: datetime) -> int:
    """``batch.finished`` for the batches with a run that finished in ``(since,
    until]`` and that are finished but have no such event: their last two runs finished
    in concurrent transactions, each of which saw the other unfinished. The message
    ids are the ones those transactions would have used, so a batch whose event exists
    is skipped by the insert."""
    if not _subscribers("batch.finished"):
        return 0
    batches = db.session.execute(
        sa.select(TaskRun.batch_id)
        .where(TaskRun.batch_id.is_not(None), TaskRun.finished_at > since,
               TaskRun.finished_at <= until)
        .distinct()).scalars().all()
    now = utcnow()
    written = 0
    for batch_id in batches:
        written += len(_insert(_batch_finished(batch_id, now)))
    if written:
        log.info("🪝 sweeper wrote %d batch.finished event(s) no transaction wrote", written)
    return written


MAX_RESETS = 3  # an attempt left sending this many times is ended failed


def republish_seconds(config) -> float:
    """How long a published, unclaimed delivery waits before the sweeper publishes it
    again: the broker's visibility timeout (after which Redis redelivers a message a
    dead worker held), never less than the sweep grace."""
    options = config.get("CELERY", {}).get("broker_transport_options") or {}
    return max(float(options.get("visibility_timeout") or 300),
               config["WEBHOOK_SWEEP_SECONDS"])


def stuck_seconds(config) -> float:
    """How long an attempt may stay ``sending`` before the sweeper gives it back: past
    its deadline (CELERY_API_WEBHOOK_TIMEOUT bounds the whole POST) with room for the
    connect, DNS and database work around it, plus the sweep grace."""
    return config["WEBHOOK_TIMEOUT"] * 2 + 30 + config["WEBHOOK_SWEEP_SECONDS"]


def sweep(now: datetime | None = None, *, limit: int = PAGE) -> int:
    """Publish the pending deliveries that are due and were never published (the
    publish at commit failed, or a long retry waits in the database), or were published
    longer ago than :func:`republish_seconds` and still not taken (the message was
    lost). Also gives back to ``pending`` the attempts left ``sending`` past
    :func:`stuck_seconds` by a worker that died mid-delivery, and ends ``failed`` one
    given back MAX_RESETS times. Returns how many were published."""
    global _batches_swept_until
    config = current_app.config
    now = now or utcnow()
    grace = timedelta(seconds=config["WEBHOOK_SWEEP_SECONDS"])
    # Each finished run is looked at once, after the grace: the transactions that
    # finish a batch have written its event by then, if one of them could.
    until = now - grace
    since = _batches_swept_until or until - timedelta(seconds=BATCH_WINDOW_SECONDS)
    if until > since:
        sweep_batches(since, until)
        db.session.commit()  # published when committed, like any event
        _batches_swept_until = until
    stuck = now - timedelta(seconds=stuck_seconds(config))
    left = (WebhookDelivery.status == "sending", WebhookDelivery.started_at < stuck)
    abandoned = db.session.execute(
        sa.update(WebhookDelivery)
        .where(*left, WebhookDelivery.resets >= MAX_RESETS - 1)
        .values(status="failed", finished_at=now, claim=None,
                resets=WebhookDelivery.resets + 1,
                error=f"abandoned: left sending {MAX_RESETS} times (its webhook worker "
                      "died or hung each time); re-send it once that is fixed")
        .execution_options(synchronize_session=False)).rowcount
    if abandoned:
        log.warning("🪝 sweeper ended %d delivery attempt(s) left sending %d times",
                    abandoned, MAX_RESETS)
    db.session.execute(
        sa.update(WebhookDelivery).where(*left)
        .values(status="pending", started_at=None, published_at=None, claim=None,
                resets=WebhookDelivery.resets + 1)
        .execution_options(synchronize_session=False))
    republish = now - timedelta(seconds=republish_seconds(config))
    due = (sa.select(WebhookDelivery.id)
           .where(WebhookDelivery.status == "pending", WebhookDelivery.due_at <= now - grace,
                  sa.or_(WebhookDelivery.published_at.is_(None),
                         WebhookDelivery.published_at <= republish))
           .order_by(WebhookDelivery.due_at).limit(limit))
    if db.engine.dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True)  # two beats never publish one twice
    try:
        ids = list(db.session.execute(due).scalars())
        if ids:
            db.session.execute(sa.update(WebhookDelivery)
                               .where(WebhookDelivery.id.in_(ids))
                               .values(published_at=now)
                               .execution_options(synchronize_session=False))
            for delivery_id in ids:
                publish(delivery_id)
        db.session.commit()
    except BaseException:
        db.session.rollback()  # still pending: the next pass publishes them
        raise
    if ids:
        log.info("🪝 sweeper published %d pending webhook deliveries", len(ids))
    return len(ids)


def purge(cutoff: datetime, batch_size: int = 5000) -> int:
    """Delete the finished delivery attempts created before ``cutoff`` (the history's
    retention, with the hourly purge); pending ones are kept."""
    removed = 0
    while True:
        ids = list(db.session.execute(
            sa.select(WebhookDelivery.id)
            .where(WebhookDelivery.created_at < cutoff,
                   WebhookDelivery.status.in_(("succeeded", "failed", "skipped")))
            .limit(batch_size)).scalars())
        if not ids:
            return removed
        db.session.execute(sa.delete(WebhookDelivery).where(WebhookDelivery.id.in_(ids)))
        db.session.commit()
        removed += len(ids)


# Delivering (the webhook worker).

def retry_delay(attempt: int, schedule: list[float]) -> float | None:
    """Seconds before the attempt after ``attempt`` (1-based), jittered; None when the
    schedule is spent."""
    if attempt > len(schedule):
        return None
    base = schedule[attempt - 1]
    return base * random.uniform(1 - JITTER, 1 + JITTER)  # noqa: S311 - not crypto


def sign(secrets: list[str], message_id: str, when: datetime, body: str) -> str:
    """The ``webhook-signature`` header: one ``v1,<base64>`` per secret, space separated."""
    return " ".join(Webhook(secret).sign(message_id, when, body) for secret in secrets)


def deliver(delivery_id: int, resolve: ssrf.Resolver = ssrf.system_resolve) -> str:
    """Send one attempt; return its outcome (succeeded, failed, skipped, not pending,
    not ours). The attempt is claimed with a token; only an update carrying that token
    ends it, so a copy the sweeper re-published after this one overran never writes
    over another's outcome. An unexpected error ends the attempt ``failed`` with it
    (never left ``sending``)."""
    now = utcnow()
    claim = uuid.uuid4().hex
    claimed = db.session.execute(
        sa.update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending")
        .values(status="sending", started_at=now, claim=claim)
        .execution_options(synchronize_session=False)).rowcount
    db.session.commit()
    if claimed != 1:
        return "not pending"  # sent by another copy of the task, or deleted
    delivery = db.session.get(WebhookDelivery, delivery_id, populate_existing=True)
    if delivery is None:
        return "not pending"  # deleted with its subscription since the claim
    db.session.expunge(delivery)  # read only: the outcome is a guarded update (_end)
    try:
        return _attempt(delivery, claim, now, resolve)
    except sa.exc.SQLAlchemyError:
        raise  # the database: deliver_safely decides (unavailable: the sweeper retries)
    except Exception as exc:  # noqa: BLE001 - a bug must not leave the row sending
        db.session.rollback()
        log.exception("🪝 delivery %s failed unexpectedly", delivery_id)
        return _end(delivery, claim, "failed",
                    error=f"unexpected error: {type(exc).__name__}: {exc}"[:2000])


def _attempt(delivery: WebhookDelivery, claim: str, now: datetime,
             resolve: ssrf.Resolver) -> str:
    config = current_app.config
    subscription = None
    if delivery.subscription_id is not None:
        subscription = db.session.get(WebhookSubscription, delivery.subscription_id)
        if subscription is None or (not subscription.enabled and delivery.event_type != PING):
            return _end(delivery, claim, "skipped", error="the webhook subscription is "
                        + ("deleted" if subscription is None else "disabled"))
        url, secrets = subscription.url, signing_secrets(subscription, now)
    else:
        url, secrets = delivery.url, [s for s in [config.get("WEBHOOK_SECRET")] if s]
        if not secrets:
            return _end(delivery, claim, "failed", error="CELERY_API_WEBHOOK_SECRET is not "
                        "set: launch webhooks cannot be signed")
    delivery.url = url  # detached: written by _end's update
    body = json.dumps(delivery.payload, separators=(",", ":"), ensure_ascii=False)
    sent_at = utcnow()
    headers = {"webhook-id": delivery.message_id,
               "webhook-timestamp": str(int(sent_at.timestamp())),
               "webhook-signature": sign(secrets, delivery.message_id, sent_at, body),
               "Content-Type": "application/json", "User-Agent": USER_AGENT}
    try:
        target = ssrf.check(url, allowed_hosts(), resolve)
    except ssrf.Refused as exc:
        # Final: the URL or its DNS points inside; re-send once that is fixed.
        return _end(delivery, claim, "failed", error=f"refused by the SSRF guard: {exc}")
    db.session.rollback()  # no transaction held open while the receiver answers
    try:
        answer = ssrf.post(target, body.encode(), headers, config["WEBHOOK_TIMEOUT"])
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        return _end(delivery, claim, "failed", error=f"{type(exc).__name__}: {exc}"[:2000],
                    retry=True)
    duration = answer.seconds * 1000
    if 200 <= answer.status < 300:
        return _end(delivery, claim, "succeeded", status_code=answer.status,
                    duration_ms=duration)
    error = f"HTTP {answer.status}: {answer.body}"[:2000]
    if answer.status == 410 and subscription is not None:
        at = utcnow()
        db.session.execute(
            sa.update(WebhookSubscription)
            .where(WebhookSubscription.id == delivery.subscription_id)
            .values(enabled=False, updated_at=at,
                    disabled_reason=f"the endpoint answered 410 Gone on {at.isoformat()} "
                                    f"(delivery {delivery.id})")
            .execution_options(synchronize_session=False))
        log.warning("🪝 webhook %s disabled: %s answered 410 Gone",
                    delivery.subscription_id, url)
        return _end(delivery, claim, "failed", status_code=410, duration_ms=duration,
                    error=error)
    return _end(delivery, claim, "failed", status_code=answer.status, duration_ms=duration,
                error=error, retry=answer.status != 410)


def _end(delivery: WebhookDelivery, claim: str, status: str, *, retry: bool = False,
         **values) -> str:
    """Write the attempt's outcome, and the next attempt when one is due, in one
    transaction; publish the next attempt (with its delay, when the broker may hold
    it) once committed. The outcome is an update guarded by the claim: when it matches
    no row (the subscription was deleted meanwhile, or the sweeper gave the row back
    and another copy claimed it), nothing is written."""
    now = utcnow()
    delay = retry_delay(delivery.attempt, current_app.config["WEBHOOK_RETRY_SCHEDULE"]) \
        if retry else None
    due = now + timedelta(seconds=delay) if delay is not None else None
    ended = db.session.execute(
        sa.update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery.id, WebhookDelivery.claim == claim,
               WebhookDelivery.status == "sending")
        .values(status=status, finished_at=now, url=delivery.url, next_retry_at=due,
                **values)
        .execution_options(synchronize_session=False)).rowcount
    if ended != 1:
        db.session.rollback()
        log.warning("🪝 delivery %s (attempt %d): outcome %s not written: the row is "
                    "deleted or no longer this task's (the sweeper gave it back)",
                    delivery.id, delivery.attempt, status)
        return "not ours"
    if delay is not None:
        from celery_api.services.launch import hold_seconds

        row = _row(delivery.event_type, delivery.url, delivery.payload, due,
                   subscription_id=delivery.subscription_id, run_id=delivery.run_id,
                   message_id=delivery.message_id)
        row["attempt"], row["created_at"] = delivery.attempt + 1, now
        # Short delays wait in the broker; longer ones in the database (the sweeper).
        held = delay > hold_seconds(current_app.config)
        _insert([row], countdown=delay, publish=not held)
    db.session.commit()
    level = logging.INFO if status == "succeeded" else logging.WARNING
    log.log(level, "🪝 delivery %s (%s, attempt %d) to %s: %s%s%s", delivery.id,
            delivery.event_type, delivery.attempt, delivery.url, status,
            f" {values['status_code']}" if values.get("status_code") else "",
            f", next attempt in {delay:.1f} s" if delay is not None else "")
    return status


def deliver_safely(delivery_id: int) -> str:
    """The task body: a database that is down leaves the row to the sweeper."""
    try:
        return deliver(delivery_id)
    except ServiceError:
        raise
    except sa.exc.SQLAlchemyError as exc:
        database.rollback()
        if not database.is_unavailable(exc):
            raise
        log.warning("🪝 delivery %s: database unavailable, the sweeper retries it: %s",
                    delivery_id, exc)
        return "database unavailable"

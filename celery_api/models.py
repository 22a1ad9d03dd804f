"""SQLAlchemy models: the durable record of every task run."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from celery_api.extensions import db


def utcnow() -> datetime:
    return datetime.now(UTC)


def company_id_of(params) -> str | None:
    """The company a run's params name, as the history's ``company_id`` column keeps it."""
    value = params.get("company_id") if isinstance(params, dict) else None
    return str(value)[:36] if value else None


def storable_text(text: str | None) -> str | None:
    """Text a worker or the result backend produced (an exception's message, a
    traceback), made storable on every database: PostgreSQL refuses NUL in text and
    no driver takes a lone surrogate. Both are written as escapes."""
    if text is None:
        return None
    text = text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class UTCDateTime(sa.types.TypeDecorator):
    """Timezone-aware UTC datetimes on every database (SQLite keeps them naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None:
            if value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
            value = value.astimezone(UTC)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def _sparse_index(name: str, column: str, *more: str) -> sa.Index:
    """An index of the rows where ``column`` is set: most runs have no parent, batch..."""
    where = sa.text(f"{column} IS NOT NULL")
    return sa.Index(name, column, *more, postgresql_where=where, sqlite_where=where)


OPEN_ATTEMPT = "status IN ('pending', 'sending')"  # a webhook delivery not finished
OPEN_RETRY = ("retry_of IS NOT NULL AND status IN "
              "('PENDING', 'RECEIVED', 'RETRY', 'STARTED', 'PROGRESS')")
OPEN_CACHE_KEY = ("cache_key IS NOT NULL AND status IN "
                  "('PENDING', 'RECEIVED', 'RETRY', 'STARTED', 'PROGRESS')")


class TaskRun(db.Model):
    """One run of a task: launched here, by a fan-out, a retry, a schedule, or seen by a worker."""

    __tablename__ = "task_runs"

    id: Mapped[str] = mapped_column(sa.String(155), primary_key=True)
    task_type: Mapped[str] = mapped_column(sa.String(200))
    task_name: Mapped[str] = mapped_column(sa.String(200))
    params: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    status: Mapped[str] = mapped_column(sa.String(20), default="PENDING")
    result: Mapped[Any | None] = mapped_column(sa.JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    traceback: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    meta: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON, nullable=True)
    queue: Mapped[str | None] = mapped_column(sa.String(200), nullable=True)
    priority: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    tags: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    eta: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    expires: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    worker: Mapped[str | None] = mapped_column(sa.String(255), nullable=True)
    retries: Mapped[int] = mapped_column(sa.Integer, default=0)
    # Deliveries to a worker: 2 or more after a redelivery (worker lost, safe to repeat).
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    # The name of the API key that launched the run, and of the one that revoked it
    # (null with CELERY_API_AUTH=off, and for runs started outside the API).
    launched_by: Mapped[str | None] = mapped_column(sa.String(200), nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(sa.String(200), nullable=True)
    company_id: Mapped[str | None] = mapped_column(sa.String(36), nullable=True)
    parent_id: Mapped[str | None] = mapped_column(sa.String(155), nullable=True)
    root_id: Mapped[str | None] = mapped_column(sa.String(155), nullable=True)
    retry_of: Mapped[str | None] = mapped_column(sa.String(155), nullable=True)
    batch_id: Mapped[str | None] = mapped_column(sa.String(36), nullable=True)
    schedule_id: Mapped[str | None] = mapped_column(sa.String(36), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    runtime: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    # Set while a delayed run is held here rather than in the broker: beat publishes
    # it at this time (services.dispatch).
    dispatch_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The tick a schedule fired this run for (schedule_id names the schedule).
    scheduled_for: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The result cache's identity of the run (services.result_cache): set on runs a
    # launch may be served from, cleared when a termination is requested.
    cache_key: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)
    # The launch's own webhook (``webhook_url`` option): its events are sent there too,
    # signed with CELERY_API_WEBHOOK_SECRET (services.webhooks).
    webhook_url: Mapped[str | None] = mapped_column(sa.String(2048), nullable=True)

    # The history is read newest first, (created_at, id) being the cursor: every index
    # that serves a filter ends with created_at so rows come out already in order.
    __table_args__ = (
        sa.Index("ix_task_runs_created_at_id", "created_at", "id"),
        sa.Index("ix_task_runs_task_type_created_at", "task_type", "created_at"),
        sa.Index("ix_task_runs_status_created_at", "status", "created_at"),
        sa.Index("ix_task_runs_task_type_status_created_at", "task_type", "status",
                 "created_at"),
        sa.Index("ix_task_runs_finished_at", "finished_at"),
        _sparse_index("ix_task_runs_company_id_created_at", "company_id", "created_at"),
        _sparse_index("ix_task_runs_parent_id", "parent_id"),
        sa.Index("ix_task_runs_root_id", "root_id"),
        _sparse_index("ix_task_runs_retry_of", "retry_of"),
        _sparse_index("ix_task_runs_batch_id", "batch_id"),
        _sparse_index("ix_task_runs_schedule_id", "schedule_id"),
        _sparse_index("ix_task_runs_dispatch_at", "dispatch_at"),
        _sparse_index("ix_task_runs_launched_by_created_at", "launched_by", "created_at"),
        _sparse_index("ix_task_runs_revoked_by_created_at", "revoked_by", "created_at"),
        # At most one unfinished retry of a run: concurrent retries of one run race
        # on this index, and all but one get a 409 naming the winner.
        sa.Index("ux_task_runs_open_retry", "retry_of", unique=True,
                 postgresql_where=sa.text(OPEN_RETRY), sqlite_where=sa.text(OPEN_RETRY)),
        # At most one unfinished run per result-cache identity: concurrent identical
        # launches race on this index, and all but one are served the winner.
        sa.Index("ux_task_runs_open_cache_key", "cache_key", unique=True,
                 postgresql_where=sa.text(OPEN_CACHE_KEY),
                 sqlite_where=sa.text(OPEN_CACHE_KEY)),
        # The result cache's lookup: an identity's newest runs.
        _sparse_index("ix_task_runs_cache_key_created_at", "cache_key", "created_at"),
    )

    @property
    def finished(self) -> bool:
        from celery_api.services.runstate import FINISHED  # the states live there

        return self.status in FINISHED

    def __repr__(self) -> str:
        return f"<TaskRun {self.id} {self.task_type} {self.status}>"


class TaskRunTag(db.Model):
    """One tag of one run: the history's ``tag`` filter reads this table."""

    __tablename__ = "task_run_tags"

    run_id: Mapped[str] = mapped_column(
        sa.String(155), sa.ForeignKey("task_runs.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(sa.String(64), primary_key=True)

    __table_args__ = (sa.Index("ix_task_run_tags_tag", "tag", "run_id"),)


class ApiKey(db.Model):
    """An API key: its public id, a SHA-256 of the whole key, its scopes (README,
    Authentication). The key itself is shown once, when created, and never stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    # Unique across revoked keys too: runs name the key that launched or revoked them.
    name: Mapped[str] = mapped_column(sa.String(64), unique=True)
    secret_hash: Mapped[str] = mapped_column(sa.String(64))
    scopes: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Written at most once a minute per key (services.keys.touch), not on every request.
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    def __repr__(self) -> str:
        return f"<ApiKey {self.name} {self.id}>"


class Schedule(db.Model):
    """A task launched on a trigger: a cron expression in a time zone, a fixed interval,
    or once at ``run_at`` (services.schedules; beat fires them, celery_api.beat)."""

    __tablename__ = "schedules"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    task_type: Mapped[str] = mapped_column(sa.String(200))
    params: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    # Launch options of every run it fires.
    queue: Mapped[str | None] = mapped_column(sa.String(200), nullable=True)
    priority: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    tags: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    expires: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    # Exactly one trigger: cron (+ timezone), interval_seconds or run_at.
    cron: Mapped[str | None] = mapped_column(sa.String(200), nullable=True)
    timezone: Mapped[str] = mapped_column(sa.String(64), default="UTC")
    interval_seconds: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    run_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    enabled: Mapped[bool] = mapped_column(sa.Boolean, default=True)
    overlap: Mapped[str] = mapped_column(sa.String(8), default="skip")
    # When beat fires it next: null when paused out of time (a one-off already fired).
    next_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_run_id: Mapped[str | None] = mapped_column(sa.String(155), nullable=True)
    last_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_skipped_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    runs_fired: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    runs_skipped: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    created_by: Mapped[str | None] = mapped_column(sa.String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    # Beat's query each tick: the enabled schedules that are due, soonest first.
    __table_args__ = (
        sa.Index("ix_schedules_next_run_at", "next_run_at",
                 postgresql_where=sa.text("enabled"), sqlite_where=sa.text("enabled")),
        sa.Index("ix_schedules_task_type", "task_type"),
    )

    def __repr__(self) -> str:
        return f"<Schedule {self.name} {self.id}>"


class ScheduleFire(db.Model):
    """One tick of one schedule, fired (a run) or skipped (overlap). The primary key
    is the guarantee that two beats never fire one tick twice: the second insert fails."""

    __tablename__ = "schedule_fires"

    schedule_id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    scheduled_for: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    fired_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    outcome: Mapped[str] = mapped_column(sa.String(16), default="fired")
    run_id: Mapped[str | None] = mapped_column(sa.String(155), nullable=True)
    error: Mapped[str | None] = mapped_column(sa.Text, nullable=True)

    def __repr__(self) -> str:
        return f"<ScheduleFire {self.schedule_id} {self.scheduled_for} {self.outcome}>"


class IdempotencyKey(db.Model):
    """One ``Idempotency-Key`` of one caller on one operation (celery_api.idempotency).

    The primary key is the guarantee: the first request inserts the row (in progress:
    ``status_code`` null) before it does any work; a duplicate's insert fails, and it
    replays the stored answer, or is refused (409 in progress, 422 another request)."""

    __tablename__ = "idempotency_keys"

    # The caller's API key name ("" with CELERY_API_AUTH=off), the method and the route.
    scope: Mapped[str] = mapped_column(sa.String(400), primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    # SHA-256 of the path and the canonical JSON body.
    request_hash: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # The stored answer; null while the first request is in progress.
    status_code: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    headers: Mapped[dict[str, str] | None] = mapped_column(sa.JSON, nullable=True)
    body: Mapped[str | None] = mapped_column(sa.Text, nullable=True)

    __table_args__ = (sa.Index("ix_idempotency_keys_expires_at", "expires_at"),)

    def __repr__(self) -> str:
        return f"<IdempotencyKey {self.scope} {self.key} {self.status_code}>"


class WebhookSubscription(db.Model):
    """An endpoint that receives the events it subscribed to (services.webhooks).

    The signing secret is kept in clear: it signs every delivery (Standard Webhooks,
    HMAC-SHA256), so it cannot be a hash. After a rotation the previous secret also
    signs until ``previous_secret_expires_at``.
    """

    __tablename__ = "webhook_subscriptions"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    url: Mapped[str] = mapped_column(sa.String(2048))
    event_types: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    task_type: Mapped[str | None] = mapped_column(sa.String(200), nullable=True)
    description: Mapped[str | None] = mapped_column(sa.String(500), nullable=True)
    enabled: Mapped[bool] = mapped_column(sa.Boolean, default=True)
    # Why it was disabled by the service (an answer 410 Gone), null otherwise.
    disabled_reason: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    secret: Mapped[str] = mapped_column(sa.String(100))
    previous_secret: Mapped[str | None] = mapped_column(sa.String(100), nullable=True)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime,
                                                                        nullable=True)
    created_by: Mapped[str | None] = mapped_column(sa.String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def __repr__(self) -> str:
        return f"<WebhookSubscription {self.id} {self.url}>"


class WebhookDelivery(db.Model):
    """One attempt to deliver one message (the outbox and the delivery log at once).

    The first attempt of an event is inserted in the transaction that changes the run
    (``pending``); the delivery task moves it to ``succeeded`` or ``failed`` and, to
    retry, inserts the next attempt (same ``message_id``, the ``webhook-id`` header).
    ``subscription_id`` is null for a launch's own ``webhook_url``.
    """

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(sa.String(64))
    attempt: Mapped[int] = mapped_column(sa.Integer, default=1)
    subscription_id: Mapped[str | None] = mapped_column(sa.String(36), nullable=True)
    url: Mapped[str] = mapped_column(sa.String(2048))
    event_type: Mapped[str] = mapped_column(sa.String(40))
    run_id: Mapped[str | None] = mapped_column(sa.String(155), nullable=True)
    payload: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    # pending -> sending -> succeeded | failed; skipped (its subscription was disabled
    # or deleted before it was sent).
    status: Mapped[str] = mapped_column(sa.String(16), default="pending")
    due_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Set by the sweeper when it (re)publishes the task (services.webhooks.sweep).
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    status_code: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    # The token of the delivery task that claimed the attempt (pending -> sending):
    # only its update ends the attempt, so a copy sent after the sweeper gave the row
    # back cannot overwrite another's outcome.
    claim: Mapped[str | None] = mapped_column(sa.String(32), nullable=True)
    # How often the sweeper gave it back to pending (left sending past its deadline).
    resets: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    duration_ms: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    # When the next attempt is due (it is inserted as its own row), if there is one.
    next_retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        # One row per attempt of a message: an event written twice (two last runs of
        # a batch finishing at once) is inserted once.
        sa.UniqueConstraint("message_id", "attempt"),
        sa.Index("ix_webhook_deliveries_subscription_id_id", "subscription_id", "id"),
        _sparse_index("ix_webhook_deliveries_run_id", "run_id"),
        # The sweeper's query: the pending attempts, by due time.
        sa.Index("ix_webhook_deliveries_pending_due_at", "due_at",
                 postgresql_where=sa.text("status = 'pending'"),
                 sqlite_where=sa.text("status = 'pending'")),
        # At most one open attempt per message (concurrent re-sends make one).
        sa.Index("ux_webhook_deliveries_open_message_id", "message_id", unique=True,
                 postgresql_where=sa.text(OPEN_ATTEMPT),
                 sqlite_where=sa.text(OPEN_ATTEMPT)),
    )

    def __repr__(self) -> str:
        return f"<WebhookDelivery {self.id} {self.event_type} #{self.attempt} {self.status}>"


class ConsoleSession(db.Model):
    """A browser signed in to the operator console (celery_api.console.sessions).

    The browser holds only a random session id (in an HttpOnly cookie); the database
    keeps its SHA-256, the API key it was opened with (null with CELERY_API_AUTH=off)
    and the session's CSRF token. The key's scopes are read from its row on every
    request, so revoking the key ends the session at once."""

    __tablename__ = "console_sessions"

    id_hash: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    key_id: Mapped[str | None] = mapped_column(sa.String(32), nullable=True)
    csrf_token: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (sa.Index("ix_console_sessions_expires_at", "expires_at"),
                      sa.Index("ix_console_sessions_key_id", "key_id"))

    def __repr__(self) -> str:
        return f"<ConsoleSession {self.id_hash[:8]} key={self.key_id}>"

"""Configuration, read once from the environment.

Every setting is documented in the README's configuration table. Names fixed by the
contract (``CELERY_BROKER_URL``, ``CELERY_RESULT_BACKEND``, ``DATABASE_URL``,
``REDIS_URL``, ``PORT``, ``LOG_LEVEL``, ``LOG_FORMAT``) keep their names.
"""

from __future__ import annotations

import os
from pathlib import Path

EMBEDDED_SOCKET_NAME = "embedded-redis.sock"


class ConfigurationError(ValueError):
    """A setting the service cannot start with; the message says how to fix it."""


def env_str(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _env_number(name: str, default, cast, kind: str):
    value = env_str(name)
    if value is None:
        return default
    try:
        return cast(value)
    except ValueError as exc:
        raise ConfigurationError(f"{name} must be {kind}, got {value!r}") from exc


def env_int(name: str, default: int) -> int:
    return _env_number(name, default, int, "an integer")


def env_float(name: str, default: float) -> float:
    return _env_number(name, default, float, "a number")


def env_switch(name: str, default: bool) -> bool:
    """``on`` or ``off`` (also true/false, 1/0); anything else is refused."""
    value = env_str(name)
    if value is None:
        return default
    words = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
    if value.strip().lower() not in words:
        raise ConfigurationError(f"{name} must be 'on' or 'off', got {value!r}")
    return words[value.strip().lower()]


def env_list(name: str) -> list[str]:
    value = env_str(name, "") or ""
    return [item.strip() for item in value.split(",") if item.strip()]


def default_instance_path() -> Path:
    """The instance folder: ``INSTANCE_PATH`` or ``./instance`` of the project."""
    return Path(env_str("INSTANCE_PATH") or Path(__file__).resolve().parent.parent / "instance")


def embedded_redis_url(instance_path: Path) -> str:
    return f"redis+socket://{instance_path / EMBEDDED_SOCKET_NAME}"


def normalize_database_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` mean psycopg 3 (the driver installed)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


# Threads of an API process that use the database besides its request threads: the
# waiting hub's checker and the /stats refresher.
BACKGROUND_THREADS = 2


def default_pool_size() -> int:
    """Database connections each engine of a process keeps open: one per thread that
    may use it at once (gunicorn's request threads and the background ones), at least
    SQLAlchemy's default of 5. A pool smaller than that closes the connections it has no
    room for as they come back, and opens new ones under load: with
    ``GUNICORN_THREADS=8`` and SQLAlchemy's default, 205 new PostgreSQL sessions in
    7,364 launches (docs/BENCHMARKS.md)."""
    return max(5, env_int("GUNICORN_THREADS", 4) + BACKGROUND_THREADS)


def pool_size() -> int:
    size = env_int("CELERY_API_DATABASE_POOL_SIZE", default_pool_size())
    if size < 1:
        raise ConfigurationError(
            f"CELERY_API_DATABASE_POOL_SIZE must be 1 or more, got {size}")
    return size


def from_environment(instance_path: Path) -> dict:
    """Build the Flask config mapping from the environment."""
    embedded = embedded_redis_url(instance_path)
    broker_url = env_str("CELERY_BROKER_URL", embedded)
    result_backend = env_str("CELERY_RESULT_BACKEND")
    if result_backend is None:
        # Same server as the broker when it is Redis; otherwise the embedded one.
        result_backend = broker_url if broker_url.startswith(("redis", "rediss")) else embedded
    database_url = normalize_database_url(
        env_str("DATABASE_URL") or f"sqlite:///{instance_path / 'celery_api.db'}")
    broker_timeout = env_float("CELERY_API_BROKER_TIMEOUT", 0.5)
    return {
        "SQLALCHEMY_DATABASE_URI": database_url,
        "REDIS_URL": env_str("REDIS_URL"),
        "LOG_LEVEL": (env_str("LOG_LEVEL", "INFO") or "INFO").upper(),
        "LOG_FORMAT": env_str("LOG_FORMAT", "text"),
        "TASK_MODULES": env_list("CELERY_API_TASK_MODULES"),
        "QUEUES": env_list("CELERY_API_QUEUES"),
        "TRUSTED_PROXIES": env_int("CELERY_API_TRUSTED_PROXIES", 0),
        "METRICS_WINDOW_SECONDS": env_float("CELERY_API_METRICS_WINDOW_SECONDS", 3600.0),
        "BROKER_TIMEOUT": broker_timeout,
        "CACHE_SECONDS": env_float("CELERY_API_CACHE_SECONDS", 300.0),
        "CACHE_SIZE": env_int("CELERY_API_CACHE_SIZE", 10_000),
        "DATABASE_CONNECT_TIMEOUT": env_int("CELERY_API_DATABASE_CONNECT_TIMEOUT", 2),
        "DATABASE_POOL_SIZE": pool_size(),
        "INSPECT_TIMEOUT": env_float("CELERY_API_INSPECT_TIMEOUT", 1.0),
        # /stats: an answer is never older than STATS_MAX_AGE_SECONDS (0: every call
        # collects); the snapshot is refreshed every STATS_REFRESH_SECONDS while anyone
        # asked within STATS_IDLE_SECONDS (services/stats.py).
        "STATS_MAX_AGE_SECONDS": env_float("CELERY_API_STATS_MAX_AGE_SECONDS", 5.0),
        "STATS_REFRESH_SECONDS": env_float("CELERY_API_STATS_REFRESH_SECONDS", 1.0),
        "STATS_IDLE_SECONDS": env_float("CELERY_API_STATS_IDLE_SECONDS", 60.0),
        "SII_CLIENT": env_str("SII_CLIENT", "celery_api.tasks.sii_client:SandboxSIIClient"),
        "SII_SANDBOX_STEP_SECONDS": env_float("SII_SANDBOX_STEP_SECONDS", 0.2),
        "SII_RETRY_BACKOFF_SECONDS": env_float("SII_RETRY_BACKOFF_SECONDS", 2.0),
        "SII_MAX_RETRIES": env_int("SII_MAX_RETRIES", 5),
        "MAX_CONTENT_LENGTH": env_int("CELERY_API_MAX_BODY_BYTES", 1024 * 1024),
        "HISTORY_RETENTION_DAYS": env_float("CELERY_API_HISTORY_RETENTION_DAYS", 90.0),
        "RECONCILE_GRACE_SECONDS": env_float("CELERY_API_RECONCILE_GRACE_SECONDS", 30.0),
        "DELAY_HOLD_SECONDS": env_float("CELERY_API_DELAY_HOLD_SECONDS", 60.0),
        "DISPATCH_INTERVAL": env_float("CELERY_API_DISPATCH_INTERVAL", 1.0),
        "IDEMPOTENCY_SECONDS": env_float("CELERY_API_IDEMPOTENCY_SECONDS", 24 * 3600.0),
        "RESULT_CACHE": env_switch("CELERY_API_RESULT_CACHE", True),
        # Webhooks (README, Webhooks).
        "WEBHOOK_SECRET": webhook_secret(),
        "WEBHOOK_ALLOWED_HOSTS": env_list("CELERY_API_WEBHOOK_ALLOWED_HOSTS"),
        "WEBHOOK_RETRY_SCHEDULE": retry_schedule(),
        "WEBHOOK_TIMEOUT": env_float("CELERY_API_WEBHOOK_TIMEOUT", 10.0),
        "WEBHOOK_MAX_RESULT_BYTES": env_int("CELERY_API_WEBHOOK_MAX_RESULT_BYTES", 64 * 1024),
        "WEBHOOK_SWEEP_SECONDS": env_float("CELERY_API_WEBHOOK_SWEEP_SECONDS", 30.0),
        "PUBLIC_URL": (env_str("CELERY_API_PUBLIC_URL", "") or "").rstrip("/"),
        # Waiting for a run (README "Waiting for a run").
        "WAIT_MAX_SECONDS": env_int("CELERY_API_MAX_WAIT_SECONDS", 30),
        "WAIT_MAX_WAITERS": env_int("CELERY_API_MAX_WAITERS", 1000),
        "WAIT_RECHECK_SECONDS": env_float("CELERY_API_WAIT_RECHECK_SECONDS", 1.0),
        "WAIT_POLL_SECONDS": env_float("CELERY_API_WAIT_POLL_SECONDS", 0.25),
        "EVENTS_KEEPALIVE_SECONDS": env_float("CELERY_API_EVENTS_KEEPALIVE_SECONDS", 15.0),
        "EVENTS_MAX_SECONDS": env_float("CELERY_API_EVENTS_MAX_SECONDS", 600.0),
        "CONSOLE_SESSION_HOURS": env_float("CELERY_API_CONSOLE_SESSION_HOURS", 12.0),
        "CELERY": celery_config(broker_url, result_backend, broker_timeout),
    }


# Svix's schedule: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h (8 attempts over ~28 h).
DEFAULT_WEBHOOK_RETRY_SCHEDULE = "5,300,1800,7200,18000,36000,36000"


def retry_schedule() -> list[float]:
    """CELERY_API_WEBHOOK_RETRY_SCHEDULE: the seconds before each retry of a delivery."""
    value = env_str("CELERY_API_WEBHOOK_RETRY_SCHEDULE", DEFAULT_WEBHOOK_RETRY_SCHEDULE)
    try:
        delays = [float(item) for item in value.split(",") if item.strip()]
    except ValueError as exc:
        raise ConfigurationError(
            "CELERY_API_WEBHOOK_RETRY_SCHEDULE must be comma separated seconds, e.g. "
            f"{DEFAULT_WEBHOOK_RETRY_SCHEDULE!r}; got {value!r}") from exc
    if any(delay < 0 for delay in delays) or len(delays) > 50:
        raise ConfigurationError("CELERY_API_WEBHOOK_RETRY_SCHEDULE: at most 50 delays, "
                                 f"none negative; got {value!r}")
    return delays


def webhook_secret() -> str | None:
    """CELERY_API_WEBHOOK_SECRET, checked: a Standard Webhooks secret (whsec_ + base64)."""
    value = env_str("CELERY_API_WEBHOOK_SECRET")
    if value is None:
        return None
    import binascii

    from standardwebhooks import Webhook
    from standardwebhooks.webhooks import EmptyWebhookSecretError

    try:
        Webhook(value)
        if not value.startswith("whsec_"):
            raise ValueError("no whsec_ prefix")
    except (ValueError, binascii.Error, RuntimeError, EmptyWebhookSecretError) as exc:
        raise ConfigurationError(
            "CELERY_API_WEBHOOK_SECRET must be whsec_ followed by base64 (at least 24 "
            "random bytes), e.g. the output of: python -c \"import base64, os; "
            "print('whsec_' + base64.b64encode(os.urandom(32)).decode())\"") from exc
    return value


def celery_config(broker_url: str, result_backend: str, broker_timeout: float) -> dict:
    """The one nested ``CELERY`` key the Celery app is built from.

    ``broker_timeout`` bounds each connect and each command on the broker; a publish
    is tried twice at most, so a launch answers 503 within about 2x that.
    """
    transport_options: dict = {}
    if broker_url.startswith(("redis", "rediss")):
        transport_options = {
            "socket_connect_timeout": broker_timeout,
            "socket_timeout": broker_timeout,
            # Priorities 0-9 are honoured on Redis with these steps (0 = highest). The key
            # separator stays kombu's default so plain Celery clients (and Flower) see the
            # same queues and broadcast bindings as this service.
            "priority_steps": list(range(10)),
            "queue_order_strategy": "priority",
            # An unacknowledged message (its worker died holding it) goes back to its
            # queue after this long. Safe to keep short: long delays are held in the
            # database (services.dispatch), and a copy redelivered while its run is
            # still running is dropped by the worker's claim (services.runstate).
            "visibility_timeout": env_int("CELERY_API_VISIBILITY_TIMEOUT", 300),
            # How often a worker looks for such messages (kombu's default is 100 s).
            "unacked_restore_interval": env_int("CELERY_API_UNACKED_RESTORE_INTERVAL", 10),
            "unacked_restore_throttle": 1,
        }
    amqp = broker_url.startswith(("amqp", "pyamqp", "amqps"))
    if amqp:
        # The broker confirms each publish before a launch answers 202.
        transport_options = {"confirm_publish": True}
    return {
        "broker_url": broker_url,
        "result_backend": result_backend,
        "broker_transport_options": transport_options,
        "broker_connection_timeout": broker_timeout,
        "broker_connection_retry_on_startup": True,
        "redis_socket_connect_timeout": broker_timeout,
        "redis_socket_timeout": max(broker_timeout, 2.0),
        "result_extended": True,
        "result_expires": env_int("CELERY_API_RESULT_EXPIRES", 7 * 24 * 3600),
        # The worker records STARTED in the history itself (services.recorder): a
        # second write to the result backend before the task body would only add a
        # round trip, and a failure point that drops the run when the backend is down.
        "task_track_started": False,
        "task_send_sent_event": False,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": env_str("CELERY_API_DEFAULT_QUEUE", "celery"),
        "task_acks_late": False,
        "worker_prefetch_multiplier": env_int("CELERY_API_PREFETCH_MULTIPLIER", 1),
        "worker_hijack_root_logger": False,
        "broker_channel_error_retry": False,
        # RabbitMQ honours priorities only on queues declared with x-max-priority.
        "task_queue_max_priority": 10 if amqp else None,
        "timezone": "UTC",
        "enable_utc": True,
        # Beat also publishes the runs held in the database when they come due.
        "beat_scheduler": "celery_api.beat:Scheduler",
        "beat_schedule": {
            "celery-api-reconcile-runs": {
                "task": "celery_api.reconcile_runs",
                "schedule": env_float("CELERY_API_RECONCILE_INTERVAL", 60.0),
            },
            "celery-api-purge-history": {
                "task": "celery_api.purge_history",
                "schedule": env_float("CELERY_API_PURGE_INTERVAL", 3600.0),
            },
        },
    }


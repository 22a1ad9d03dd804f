"""Liveness and readiness: is the process up; can it reach broker, backend, database."""

from __future__ import annotations

import time
from contextlib import contextmanager

import sqlalchemy as sa
from flask import current_app

from celery_api.extensions import db


def _timed(check) -> dict:
    started = time.perf_counter()
    try:
        detail = check()
        outcome = {"status": "up"}
        if detail:
            outcome["detail"] = detail
    except Exception as exc:  # noqa: BLE001 - any failure means "down", with the reason
        outcome = {"status": "down", "error": f"{type(exc).__name__}: {exc}"[:300]}
    outcome["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return outcome


def _database():
    db.session.execute(sa.text("SELECT 1"))
    db.session.rollback()
    return db.engine.dialect.name


def _broker():
    celery_app = current_app.extensions["celery"]
    timeout = current_app.config["BROKER_TIMEOUT"]
    with broker_connection(celery_app, timeout) as conn:
        # A connection can open on a broker that then fails commands: ask it something.
        try:
            conn.default_channel.queue_declare(
                queue=current_app.config["CELERY"]["task_default_queue"], passive=True)
        except conn.channel_errors:
            pass  # "no such queue yet" is an answer: the broker is up
        return conn.transport.driver_type


def _backend():
    celery_app = current_app.extensions["celery"]
    backend = celery_app.backend
    client = getattr(backend, "client", None)
    if client is not None and hasattr(client, "ping"):
        client.ping()
    else:
        backend.get_task_meta("celery-api-readiness-probe")
    return str(celery_app.conf.result_backend).split(":", 1)[0].split("+", 1)[0]


@contextmanager
def broker_connection(celery_app, timeout: float):
    """A broker connection of its own, connected first, retrying once at once: a dead
    broker fails in about ``timeout``. Celery's broadcasts (inspect, revoke) retry a
    lost connection without end, so they go on one of these rather than on a pooled
    connection that may have been open when the broker went away."""
    with celery_app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.1,
                               interval_max=0.1, timeout=timeout)
        yield conn


def readiness(detailed: bool = False) -> tuple[bool, dict]:
    """Each dependency's status and latency, and the kind of error when it is down.
    Only ``detailed`` adds what it is and the error's message: that names the broker's
    or database's address (host, port, socket path), which callers of an open /readyz
    must not learn."""
    checks = {"database": _timed(_database), "broker": _timed(_broker),
              "result_backend": _timed(_backend)}
    ready = all(c["status"] == "up" for c in checks.values())
    if not detailed:
        checks = {name: _public(check) for name, check in checks.items()}
    return ready, {"status": "ready" if ready else "unavailable", "checks": checks}


def _public(check: dict) -> dict:
    shown = {"status": check["status"], "latency_ms": check["latency_ms"]}
    if "error" in check:
        shown["error"] = check["error"].split(":", 1)[0]  # the exception's class name
    return shown


def readiness_details() -> tuple[bool, dict]:
    """The detailed view of ``readiness``: for callers allowed to see addresses."""
    return readiness(detailed=True)

"""Celery beat with three more duties: publishing the delayed runs held in the database,
firing the schedules stored there (``services.schedules``), and sweeping the webhook
outbox (``services.webhooks.sweep``: deliveries whose task was never published).

Configured as ``beat_scheduler`` (settings.celery_config), so ``make beat`` and
``make run`` use it with no option. Beat already runs once per deployment and wakes
on a timer; the held runs are published from its loop rather than from a periodic
task, so a queue of busy workers does not make them late.

Every ``CELERY_API_DISPATCH_INTERVAL`` seconds (1 s by default) a tick publishes the
held runs that are due, then fires the due schedules: a change made through the API
takes effect at the next tick. Two beats may run: the held runs are claimed with
``SKIP LOCKED`` (PostgreSQL) and each schedule tick by its unique fire record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from celery.beat import PersistentScheduler

log = logging.getLogger("celery_api.beat")


class Scheduler(PersistentScheduler):
    """Celery's file-backed scheduler, which also calls ``dispatch.publish_due``,
    ``schedules.fire_all_due`` and ``webhooks.sweep``."""

    def __init__(self, *args, **kwargs):
        self._next_dispatch = 0.0
        super().__init__(*args, **kwargs)

    def tick(self, *args, **kwargs):
        interval = super().tick(*args, **kwargs)
        flask_app = getattr(self.app, "flask_app", None)
        if flask_app is None:
            return interval
        every = flask_app.config["DISPATCH_INTERVAL"]
        now = time.monotonic()
        if now >= self._next_dispatch:
            self._next_dispatch = now + every
            self._publish_due(flask_app)
            self._fire_schedules(flask_app)
            self._sweep_webhooks(flask_app)
        return min(interval, max(0.05, self._next_dispatch - time.monotonic()))

    @staticmethod
    def _guarded(flask_app, work: Callable[[], object], failed: str) -> None:
        """Run ``work`` in an app context: whatever it raises is logged and beat keeps
        running (the next tick tries again); the session is always given back."""
        from celery_api.extensions import db
        from celery_api.services.launch import BROKER_ERRORS

        with flask_app.app_context():
            try:
                work()
            except BROKER_ERRORS as exc:
                # An outage, not a bug: one line per tick, not a traceback.
                log.error("❌ could not %s: the task broker is unreachable (%s: %s)",
                          failed, type(exc).__name__, exc)
                db.session.rollback()
            except Exception:  # noqa: BLE001 - beat keeps running; the next tick retries
                log.exception("❌ could not %s", failed)
                db.session.rollback()
            finally:
                db.session.remove()

    @classmethod
    def _publish_due(cls, flask_app) -> None:
        from celery_api.services import dispatch

        cls._guarded(flask_app, lambda: _drain(dispatch.publish_due, dispatch.PAGE),
                     "publish the held runs that are due")

    @classmethod
    def _fire_schedules(cls, flask_app) -> None:
        from celery_api.services import schedules

        cls._guarded(flask_app, schedules.fire_all_due, "fire the schedules that are due")

    @classmethod
    def _sweep_webhooks(cls, flask_app) -> None:
        from celery_api.services import webhooks

        cls._guarded(flask_app, lambda: _drain(webhooks.sweep, webhooks.PAGE),
                     "publish the pending webhook deliveries")


def _drain(step: Callable[[], int], page: int) -> None:
    """Call ``step`` until it handles less than a full ``page``: then nothing more is due."""
    while step() == page:
        pass

"""Celery beat with one more duty: publishing the delayed runs held in the database.

Configured as ``beat_scheduler`` (settings.celery_config), so ``make beat`` and
``make run`` use it with no option. Beat already runs once per deployment and wakes
on a timer; the held runs are published from its loop rather than from a periodic
task, so a queue of busy workers does not make them late.
"""

from __future__ import annotations

import logging
import time

from celery.beat import PersistentScheduler

log = logging.getLogger("celery_api.beat")


class Scheduler(PersistentScheduler):
    """Celery's file-backed scheduler, which also calls ``dispatch.publish_due``."""

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
        return min(interval, max(0.05, self._next_dispatch - time.monotonic()))

    @staticmethod
    def _publish_due(flask_app) -> None:
        from celery_api.extensions import db
        from celery_api.services import dispatch

        with flask_app.app_context():
            try:
                while dispatch.publish_due() == dispatch.PAGE:  # a full page: more are due
                    pass
            except Exception:  # noqa: BLE001 - beat keeps running; the next tick retries
                log.exception("❌ could not publish the held runs that are due")
            finally:
                db.session.remove()

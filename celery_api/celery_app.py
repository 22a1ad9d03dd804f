"""The Celery app, built in the factory from the ``CELERY`` config key.

Tasks run inside the Flask app context (``FlaskTask``). Before a task body runs, the
worker claims its run in the durable record (``services.recorder``); a delivery that
cannot claim it (the run finished, was revoked while no worker was listening, is a
stale or duplicate copy, or runs elsewhere) is dropped unrun.
"""

from __future__ import annotations

import logging
import os
import threading

import kombu
from celery import Celery, Task
from celery.exceptions import Ignore
from flask import Flask

from celery_api.fences import celery as celery_fence

log = logging.getLogger("celery_api.worker")


def celery_init_app(app: Flask) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args, **kwargs):
            with app.app_context():
                # The prerun handler could not claim the run for this delivery.
                dropped = getattr(self.request, "celery_api_drop", None)
                if dropped is not None:
                    if dropped.status == "REVOKED":  # revoked while no worker listened
                        self.backend.mark_as_revoked(
                            self.request.id, "revoked before it started",
                            request=self.request)
                        # Flower and other event consumers saw it start: say it ended.
                        try:
                            self.send_event("task-revoked", terminated=False, signum=None,
                                            expired=False)
                        except Exception as exc:  # noqa: BLE001 - advisory, like progress
                            log.warning("task-revoked event for %s not sent: %s",
                                        self.request.id, exc)
                    if dropped.outcome == "running" and recorder.redelivered_on_purpose(self):
                        self._keep_watching(dropped)
                    raise Ignore()
                return self.run(*args, **kwargs)

        def _keep_watching(self, dropped) -> None:
            """A copy of a run another worker is running, of a task type redelivered on
            purpose: the broker gave it out because the run outlived the visibility
            timeout, and it is now the run's only message. Acknowledging it would leave
            nothing to redeliver if that worker's process dies later, so a copy is sent
            again, due in half the visibility timeout, to ask again then."""
            transport = app.config["CELERY"].get("broker_transport_options") or {}
            countdown = transport.get("visibility_timeout", 3600) / 2
            try:
                self.signature_from_request(self.request).apply_async(countdown=countdown)
                log.info("%s runs on %s: a copy asks again in %.0f s", self.request.id,
                         dropped.worker, countdown)
            except Exception as exc:  # noqa: BLE001 - reconcile still watches the run
                log.warning("could not keep watching %s: %s", self.request.id, exc)

        def report_progress(self, current: int, total: int, message: str = "") -> None:
            """Publish PROGRESS with ``{current, total, percent, message}`` as meta."""
            percent = round(100.0 * current / total, 1) if total else 0.0
            try:
                self.update_state(
                    state="PROGRESS",
                    meta={"current": current, "total": total, "percent": percent,
                          "message": message},
                )
            except Exception as exc:  # noqa: BLE001 - progress is advisory
                # The result backend is down: the task goes on, the history records it.
                if not getattr(self.request, "celery_api_progress_lost", False):
                    self.request.celery_api_progress_lost = True  # once per run
                    log.warning("progress of %s not published: %s", self.request.id, exc)
                return
            from celery_api.services import runevents

            runevents.publish(self.request.id)  # wake the run's event streams

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    # Nothing in this service waits on a result with .get(): tell Celery so, as its
    # prefork workers do. The Redis result backend then skips its SUBSCRIBE on every
    # publish, one round trip less per launch and no hang when the backend is down.
    celery_fence.no_result_waits()
    celery_app.flask_app = app  # for worker signal handlers, which run outside any task
    celery_app.celery_api_declared_queues = set()  # declared by this process (launch)
    celery_app.celery_api_producers = threading.local()  # see thread_producer
    app.extensions["celery"] = celery_app

    # Task types safe to repeat are acknowledged after they run, and requeued if their
    # worker process dies, so a lost worker means a second attempt, not a lost run.
    catalog = app.extensions["celery_api.catalog"]
    annotations = {d.celery_name: {"acks_late": True, "reject_on_worker_lost": True}
                   for d in catalog if d.safe_to_repeat}
    celery_app.conf.task_annotations = [annotations]

    import celery_api.tasks.maintenance  # noqa: F401 - registers the periodic tasks
    import celery_api.tasks.webhooks  # noqa: F401 - registers the webhook delivery task
    from celery_api.services import recorder

    recorder.connect_signals()
    return celery_app


def thread_producer(celery_app: Celery) -> kombu.Producer:
    """This thread's producer for single launches, kept for the thread's life.

    Celery's producer pool, per publish, takes a producer and a broker connection from
    two pools, revives the producer on that connection's channel, and gives both back:
    0.026 ms of a launch's CPU (docs/BENCHMARKS.md). A thread publishes one message at
    a time, so it keeps one producer on a connection of its own (outside the pool:
    however many threads, none waits for the pool's limit). A connection the broker
    closed is reconnected by the publish's retry policy, as with a pooled producer. A
    forked child (a Celery prefork worker launching fan-out) makes its own: it never
    writes on its parent's socket."""
    mine = celery_app.celery_api_producers
    producer = getattr(mine, "producer", None)
    if producer is None or mine.pid != os.getpid():
        producer = kombu.Producer(celery_app.connection_for_write())
        mine.producer, mine.pid = producer, os.getpid()
    return producer


def forget_thread_producer(celery_app: Celery) -> None:
    """Drop this thread's producer after a publish that failed: kombu may have closed
    its channel on the way out (a broker that stopped answering), and a closed channel
    fails every later publish with an error its retry policy does not retry. The next
    launch on this thread makes a new producer on a new connection."""
    mine = celery_app.celery_api_producers
    producer = getattr(mine, "producer", None)
    mine.producer = None
    if producer is not None and mine.pid == os.getpid():
        try:
            producer.connection.release()
        except Exception:  # noqa: BLE001 - a connection already lost: nothing to close
            pass

"""Waiting for a run: GET /tasks/{id}?wait=N and the event stream GET /tasks/{id}/events
(README "Waiting for a run").

The views answer at once when they can (the run has finished, or ``wait=0``); otherwise
they park the request with this process's waiting hub (``celery_api.waiting``) and
return: no thread waits. Outside gunicorn there is no connection to park, and the view
waits in its thread for at most the wait asked (the event stream: for at most
``CELERY_API_EVENTS_MAX_SECONDS``).
"""

from __future__ import annotations

import time

from flask import Response, current_app, request, stream_with_context

from celery_api import waiting
from celery_api.extensions import db
from celery_api.services import runs, runstate
from celery_api.services.errors import Unavailable

STREAM_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx passes each event on at once (deploy/nginx.conf also turns buffering off).
    "X-Accel-Buffering": "no",
}
RETRY_HINT = b"retry: 1000\n\n"  # EventSource reconnects after 1 s


def _hub() -> waiting.Hub:
    hub = waiting.hub_for(current_app._get_current_object())
    if hub.full():
        raise Unavailable(
            f"This server process already holds {hub.capacity} waiting clients "
            "(CELERY_API_MAX_WAITERS); send the request again, or poll without `wait`.",
            retry_after=1)
    return hub


def _fresh_describe(task_id: str) -> runs.RunView:
    db.session.rollback()  # a new read: the record as committed now
    return runs.describe(task_id)


def wait_answer(task_id: str, view: runs.RunView, seconds: float, body_of, render):
    """The answer of GET /tasks/{id}?wait=N for a run not finished yet: parked, or
    (outside gunicorn) waited for here. ``body_of(view)`` is the status body,
    ``render(view)`` its bytes."""
    deadline = time.monotonic() + seconds
    hub = _hub()
    if request.environ.get(waiting.PARKING):
        waiter = waiting.Waiter(task_id, "wait", deadline, render=render)
        waiter.hub = hub
        request.environ[waiting.PARKED] = waiter
        return current_app.response_class(b"", status=200, mimetype="application/json")
    waiter = waiting.Waiter(task_id, "block", deadline)
    hub.register(waiter)
    try:
        while not runstate.is_finished(view.status):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            waiter.event.wait(remaining)
            waiter.event.clear()
            view = _fresh_describe(task_id)
    finally:
        hub.unregister(waiter)
    return body_of(view)


def event_bytes(view: runs.RunView, last: tuple | None, body_of) -> bytes:
    """One event of the stream: ``status`` when the state changed, else ``progress``;
    its data is the run's status document (as GET /tasks/{id} answers it)."""
    fingerprint = waiting.view_fingerprint(view)
    name = "status" if last is None or last[0] != view.status else "progress"
    data = current_app.json.dumps(body_of(view), indent=None, separators=(",", ":"))
    return waiting.sse_event(name, waiting.event_id(fingerprint), data)


def events_answer(task_id: str, last_event_id: str | None, body_of):
    """GET /tasks/{id}/events. ``body_of(view)`` is the dumped status document."""
    view = runs.describe(task_id)
    fingerprint = waiting.view_fingerprint(view)
    finished = runstate.is_finished(view.status)
    seen = last_event_id == waiting.event_id(fingerprint)
    if seen and finished:
        # The client saw the end already (an EventSource reconnecting): 204 tells it to
        # stop reconnecting.
        return Response(status=204)
    prelude = RETRY_HINT
    if not seen:
        prelude += event_bytes(view, None, body_of)
    if finished or request.method == "HEAD":  # (HEAD: the head alone, at once)
        return Response(prelude, status=200, mimetype="text/event-stream",
                        headers=STREAM_HEADERS)
    deadline = time.monotonic() + current_app.config["EVENTS_MAX_SECONDS"]
    hub = _hub()
    if request.environ.get(waiting.PARKING):
        waiter = waiting.Waiter(task_id, "stream", deadline, last=fingerprint,
                                prelude=prelude,
                                render=lambda v, last: event_bytes(v, last, body_of))
        waiter.hub = hub
        request.environ[waiting.PARKED] = waiter
        return Response(b"", status=200, mimetype="text/event-stream",
                        headers=STREAM_HEADERS)
    keepalive = current_app.config["EVENTS_KEEPALIVE_SECONDS"]

    def stream():
        yield prelude
        waiter = waiting.Waiter(task_id, "block", deadline)
        hub.register(waiter)
        last = fingerprint
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                if not waiter.event.wait(min(keepalive, remaining)):
                    yield waiting.KEEPALIVE_COMMENT
                    continue
                waiter.event.clear()
                current = _fresh_describe(task_id)
                now = waiting.view_fingerprint(current)
                if now != last:
                    yield event_bytes(current, last, body_of)
                    last = now
                if runstate.is_finished(current.status):
                    return
        finally:
            hub.unregister(waiter)

    return Response(stream_with_context(stream()), status=200,
                    mimetype="text/event-stream", headers=STREAM_HEADERS)

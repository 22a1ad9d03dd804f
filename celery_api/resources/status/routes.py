"""Following and controlling runs: GET/DELETE /tasks/{id}, POST /tasks/{id}/retry, and
the original's other paths, GET /tasks/{id}/status and POST /tasks/{id}/cancel
(deprecated aliases with the same behaviour)."""

from __future__ import annotations

import marshmallow as ma
from flask import current_app, request
from flask.views import MethodView

from celery_api.auth import caller
from celery_api.idempotency import idempotent
from celery_api.limits import limit_header_docs
from celery_api.resources.fields import known_state, parse_task_id, run_url
from celery_api.resources.operation import operation
from celery_api.resources.status.schemas import (
    CancelArgsSchema,
    RevokeArgsSchema,
    RevokeResponseSchema,
    TaskStatusResponseSchema,
    WaitArgsSchema,
)
from celery_api.resources.status.waits import events_answer, wait_answer
from celery_api.resources.tasks.routes import launch_response
from celery_api.resources.tasks.schemas import TaskLaunchResponseSchema
from celery_api.services import control, runs, runstate
from celery_api.services.cache import run_cache
from celery_api.smorest import Blueprint

blp = Blueprint("status", __name__, url_prefix="/api/celery", description="Status and control")


STATUS_SCHEMA = TaskStatusResponseSchema()


def _status_body(view: runs.RunView) -> dict:
    run = view.run
    return {
        "task_id": run.id, "status": known_state(view.status), "result": view.result,
        "error": view.error, "traceback": view.traceback, "meta": view.meta,
        "task_type": run.task_type, "params": run.params, "progress": view.progress,
        "queue": run.queue, "priority": run.priority, "tags": run.tags or [],
        "worker": run.worker, "retries": run.retries, "created_at": run.created_at,
        "started_at": run.started_at, "finished_at": run.finished_at,
        "runtime": run.runtime, "parent_id": run.parent_id, "root_id": run.root_id,
        "retry_of": run.retry_of, "batch_id": run.batch_id,
        "schedule_id": run.schedule_id, "scheduled_for": run.scheduled_for,
        "launched_by": run.launched_by,
        "revoked_by": run.revoked_by, "children": view.children,
        "retried_as": view.retries_of_this,
    }


def _json_response(data: bytes):
    """The serialized status body, as flask-smorest would send it (passed through)."""
    return current_app.response_class(data, status=200, mimetype="application/json")


def status_bytes(view: runs.RunView) -> bytes:
    """The status body as Flask's JSON responses are written (compact, sorted, a final
    newline): the same bytes whether answered at once, cached or after a wait."""
    return (current_app.json.dumps(STATUS_SCHEMA.dump(_status_body(view)), indent=None,
                                   separators=(",", ":")) + "\n").encode()


def status_answer(task_id: str, wait: int = 0):
    """GET /tasks/{task_id} (and its alias): the body, or the cached bytes of it; with
    ``wait``, when the run finishes or ``wait`` seconds have passed."""
    task_id = parse_task_id(task_id)
    cache = run_cache()
    if cache is not None:
        cached = cache.get(task_id)
        if cached is not None:
            return _json_response(cached)
    view = runs.describe(task_id)
    if wait and request.method == "GET" and not runstate.is_finished(view.status):
        return wait_answer(task_id, view, wait, _status_body, status_bytes)
    body = _status_body(view)
    if cache is not None and view.status == "SUCCESS" and view.recorded:
        # A successful run never changes again (only FAILURE/REVOKED can be retried).
        # As Flask's JSON responses are written (compact, sorted, a final newline),
        # so a cached answer is byte for byte the uncached one.
        data = status_bytes(view)
        cache.put(task_id, data)
        return _json_response(data)
    return body


def revoke_answer(task_id: str, args: dict):
    """DELETE /tasks/{task_id} (and POST .../cancel): the body and 200, or 202 when a
    running run was sent the signal."""
    outcome = control.revoke(parse_task_id(task_id), terminate=args["terminate"],
                             signal=args["signal"], reason=args.get("reason"),
                             revoked_by=caller())
    body = {"task_id": outcome.task_id, "status": known_state(outcome.status),
            "terminate": outcome.terminate, "message": outcome.message}
    return body, 202 if outcome.accepted else 200


@blp.route("/tasks/<task_id:task_id>")
class TaskRunItem(MethodView):
    @operation(blp, "getTaskStatus", scope="read", limit="read", errors=(404, 422, 503))
    @blp.arguments(WaitArgsSchema(), location="query", unknown=ma.EXCLUDE)
    @blp.response(200, TaskStatusResponseSchema)
    def get(self, args, task_id):
        """Get a run's status, result and progress

        404 for an id this service never saw (Celery alone would say PENDING). With
        `wait=N`, the answer comes as soon as the run finishes, or after N seconds with
        its current state (no server thread is held meanwhile). 503 also when this
        server process holds `CELERY_API_MAX_WAITERS` waiting clients already.
        """
        return status_answer(task_id, args["wait"])

    @operation(blp, "revokeTask", scope="control", errors=(404, 409, 503))
    @blp.arguments(RevokeArgsSchema(), location="query", unknown=ma.RAISE)
    @blp.response(200, RevokeResponseSchema)
    @blp.alt_response(202, schema=RevokeResponseSchema,
                      description="Running run: the stop signal was sent")
    def delete(self, args, task_id):
        """Revoke (cancel) a run

        A queued run is revoked at once (200) and never runs, even if no worker is up
        now. A running one needs `terminate=true`: the signal is sent and 202 answered.
        409 when it already finished.
        """
        return revoke_answer(task_id, args)


# One event of the stream, as the SSE format names its fields: what OpenAPI 3.2 calls the
# stream's itemSchema. A 3.0 document has no place for it (its ``schema`` is the whole
# body's), so it is not in /api/openapi.json; tests/schemathesis_hooks.py gives it to
# the fuzzer, which checks every event it reads against it.
EVENT_ITEM_SCHEMA = {
    "type": "object",
    "required": ["id", "event", "data"],
    "properties": {
        "id": {"type": "string", "description": "Names the state the event carries"},
        "event": {"type": "string", "enum": ["status", "progress"]},
        "data": {"type": "string", "description": "The run's status document, "
                 "`TaskStatusResponse` as JSON on one line"},
        "retry": {"type": "integer", "description": "Milliseconds to wait before "
                  "reconnecting"},
    },
}

EVENT_STREAM_DOC = {
    "description": (
        "A Server-Sent Events stream. Each event's `data` is the run's status document "
        "(as `getTaskStatus` answers it); `event` is `status` when its state changed, "
        "`progress` when only its progress did; `id` names that state. The stream "
        "starts with the current state and ends after the run's final state; "
        "`: keep-alive` comments keep idle connections open."),
    # The stream's text (as /metrics documents its text): generated clients read it as
    # a string, where an object schema made them parse the stream as JSON and fail.
    # (Documented here, not with @blp.response, which has no schema for a stream; the
    # RateLimit headers as rate_limited documents them on other success responses.)
    "headers": limit_header_docs(),
    "content": {"text/event-stream": {"schema": {
        "type": "string",
        "description": (
            "Blocks separated by a blank line: first `retry: 1000` (milliseconds to "
            "wait before reconnecting), then one block per event, of the lines "
            "`id: <16 hex digits naming the state>`, `event: status` or "
            "`event: progress`, and `data: <the run's TaskStatusResponse as JSON on "
            "one line>`; `: keep-alive` comment lines in between."),
        "example": ('retry: 1000\n\nid: 3f1c0e9a7b2d4c58\nevent: status\n'
                    'data: {"task_id": "...", "status": "SUCCESS", ...}\n\n'),
    }}},
}


@blp.route("/tasks/<task_id:task_id>/events")
class TaskRunEvents(MethodView):
    @operation(blp, "streamTaskEvents", scope="read", limit="read", errors=(404, 422, 503),
               responses={"200": EVENT_STREAM_DOC}, parameters=[{
                   "in": "header", "name": "Last-Event-ID", "required": False,
                   "schema": {"type": "string"},
                   "description": ("The `id` of the last event received: on reconnecting, "
                                   "the state it names is not sent again (any other value: "
                                   "the current state is sent).")}])
    @blp.alt_response(204, description=(
        "The run has finished and `Last-Event-ID` names its final state: nothing more "
        "will come (an EventSource stops reconnecting)."))
    def get(self, task_id):
        """Follow a run's state changes and progress (Server-Sent Events)

        Ends when the run finishes (at the latest after
        `CELERY_API_EVENTS_MAX_SECONDS`: reconnect with `Last-Event-ID`). Each event
        carries the run's whole state, so a reconnecting client is sent the current
        state (unless it already saw it), not every step it missed. No server thread
        is held while the stream is open.
        """
        return events_answer(parse_task_id(task_id), request.headers.get("Last-Event-ID"),
                             lambda view: STATUS_SCHEMA.dump(_status_body(view)))


@blp.route("/tasks/<task_id:task_id>/retry")
class TaskRunRetry(MethodView):
    @operation(blp, "retryTask", scope="launch", limit="launch", errors=(404, 409, 422, 503))
    @idempotent
    @blp.response(202, TaskLaunchResponseSchema, headers={
        "Location": {"description": "URL of the new run's status", "schema": {"type": "string"}}})
    def post(self, task_id):
        """Retry a failed or revoked run

        Launches a new run with the same task type and params, linked to the original
        by `retry_of`.
        """
        run = control.retry(parse_task_id(task_id), launched_by=caller())
        location = run_url(run.id)
        body = launch_response(run, location)
        body["message"] = f"Retry of {task_id} queued as {run.id}"
        return body, 202, {"Location": location}


# The original's other consumers call these paths (SPEC: deprecated aliases).

@blp.route("/tasks/<task_id:task_id>/status")
class TaskRunStatusLegacy(MethodView):
    @operation(blp, "getTaskStatusLegacy",
               scope="read", limit="read", errors=(404, 422, 503), deprecated=True)
    @blp.response(200, TaskStatusResponseSchema)
    def get(self, task_id):
        """Get a run's status (deprecated: use GET /tasks/{task_id})

        Same answer as `getTaskStatus`.
        """
        return status_answer(task_id)


@blp.route("/tasks/<task_id:task_id>/cancel")
class TaskRunCancelLegacy(MethodView):
    @operation(blp, "cancelTaskLegacy",
               scope="control", errors=(404, 409, 415, 422, 503), deprecated=True)
    @blp.arguments(RevokeArgsSchema(), location="query", unknown=ma.RAISE)
    @blp.arguments(CancelArgsSchema(), location="json", required=False)
    @blp.response(200, RevokeResponseSchema)
    @blp.alt_response(202, schema=RevokeResponseSchema,
                      description="Running run: the stop signal was sent")
    def post(self, query, body, task_id):
        """Cancel (revoke) a run (deprecated: use DELETE /tasks/{task_id})

        Same behaviour and answer as `revokeTask`: a queued run is revoked at once (200)
        and never runs; a running one needs `terminate=true` (202); 409 when it already
        finished. `terminate`, `signal` and `reason` may be sent in the query, as for
        DELETE, or in an optional JSON body (which wins for a field given in both).
        """
        return revoke_answer(task_id, merge_cancel_args(query, body or {}))


def merge_cancel_args(query: dict, body: dict) -> dict:
    """The query's arguments (with their defaults), each overridden by the body's."""
    return {**query, **body}

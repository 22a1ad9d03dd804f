"""Schemas of the status and control operations.

Every field of a response is ``required``: the server always sends it (``null`` where the
field allows it), so generated clients do not handle ``undefined`` for nothing.
"""

from __future__ import annotations

import marshmallow as ma
from flask import current_app

from celery_api.resources.fields import RunLineageSchema, TaskStatus
from celery_api.services.control import SIGNALS
from celery_api.smorest import RequestSchema, Schema


class ProgressSchema(Schema):
    """What a running task last reported (``report_progress``)."""

    current = ma.fields.Integer(required=True, allow_none=True,
                                metadata={"description": "Steps done"})
    total = ma.fields.Integer(required=True, allow_none=True,
                              metadata={"description": "Steps in all"})
    percent = ma.fields.Float(required=True, allow_none=True,
                              metadata={"description": "0 to 100"})
    message = ma.fields.String(required=True, allow_none=True,
                               metadata={"description": "The current step"})


class TaskStatusResponseSchema(RunLineageSchema):
    task_id = ma.fields.String(required=True)
    status = TaskStatus(required=True)
    result = ma.fields.Raw(required=True, allow_none=True,
                           metadata={"description": "The task's return value"})
    error = ma.fields.String(required=True, allow_none=True)
    traceback = ma.fields.String(required=True, allow_none=True)
    meta = ma.fields.Dict(required=True, allow_none=True,
                          metadata={"description": "Progress or fan-out state"})
    task_type = ma.fields.String(required=True)
    params = ma.fields.Dict(required=True)
    progress = ma.fields.Nested(
        ProgressSchema, required=True, allow_none=True,
        metadata={"description": "What the task last reported; null when it reported nothing"})
    queue = ma.fields.String(required=True, allow_none=True)
    priority = ma.fields.Integer(required=True, allow_none=True)
    tags = ma.fields.List(ma.fields.String(), required=True)
    worker = ma.fields.String(required=True, allow_none=True)
    retries = ma.fields.Integer(required=True,
                                metadata={"description": "Automatic retries so far"})
    created_at = ma.fields.DateTime(required=True)
    started_at = ma.fields.DateTime(required=True, allow_none=True)
    finished_at = ma.fields.DateTime(required=True, allow_none=True)
    runtime = ma.fields.Float(required=True, allow_none=True,
                              metadata={"description": "Seconds"})
    children = ma.fields.List(ma.fields.String(), required=True,
                              metadata={"description": "Fan-out children"})
    retried_as = ma.fields.List(ma.fields.String(), required=True,
                                metadata={"description": "Runs launched by retrying this one"})


class RevokeArgsSchema(RequestSchema):
    terminate = ma.fields.Boolean(
        load_default=False,
        metadata={"description": "Also stop the run if it has started (sends `signal`)"})
    signal = ma.fields.String(load_default="SIGTERM", validate=ma.validate.OneOf(SIGNALS))
    reason = ma.fields.String(validate=ma.validate.Length(max=500),
                              metadata={"description": "Kept in the history"})


class CancelArgsSchema(RequestSchema):
    """The optional JSON body of POST /tasks/{task_id}/cancel: RevokeArgs' fields, with
    the defaults coming from the query's schema."""

    terminate = ma.fields.Boolean(
        metadata={"description": "Also stop the run if it has started (sends `signal`)"})
    signal = ma.fields.String(validate=ma.validate.OneOf(SIGNALS))
    reason = ma.fields.String(validate=ma.validate.Length(max=500),
                              metadata={"description": "Kept in the history"})


class RevokeResponseSchema(Schema):
    task_id = ma.fields.String(required=True)
    status = TaskStatus(required=True)
    terminate = ma.fields.Boolean(required=True)
    message = ma.fields.String(required=True)


class WaitArgsSchema(RequestSchema):
    wait = ma.fields.Integer(
        load_default=0, strict=False, validate=ma.validate.Range(min=0),
        metadata={"maximum_setting": "WAIT_MAX_SECONDS", "description": (
            "Seconds to wait for the run to finish: the answer comes as soon as it "
            "finishes, or after this long with its current state. 0 (the default) "
            "answers at once; at most `CELERY_API_MAX_WAIT_SECONDS` (30 by default).")})

    @ma.validates("wait")
    def _bounded(self, value, **_kwargs):
        limit = current_app.config["WAIT_MAX_SECONDS"]
        if value is not None and value > limit:
            raise ma.ValidationError(
                f"Wait at most {limit} seconds (CELERY_API_MAX_WAIT_SECONDS); "
                "for longer, wait again or follow GET /tasks/{task_id}/events.")

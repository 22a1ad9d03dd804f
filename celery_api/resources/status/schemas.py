from __future__ import annotations

import marshmallow as ma

from celery_api.services.control import SIGNALS
from celery_api.smorest import RequestSchema, Schema

STATUS_DESCRIPTION = ("Celery state: PENDING, RECEIVED, STARTED, PROGRESS, RETRY, SUCCESS, "
                      "FAILURE or REVOKED")


class ProgressSchema(Schema):
    current = ma.fields.Integer(allow_none=True)
    total = ma.fields.Integer(allow_none=True)
    percent = ma.fields.Float(allow_none=True)
    message = ma.fields.String(allow_none=True)


class TaskStatusResponseSchema(Schema):
    task_id = ma.fields.String(required=True)
    status = ma.fields.String(required=True, metadata={"description": STATUS_DESCRIPTION})
    result = ma.fields.Raw(allow_none=True, metadata={"description": "The task's return value"})
    error = ma.fields.String(allow_none=True)
    traceback = ma.fields.String(allow_none=True)
    meta = ma.fields.Dict(allow_none=True, metadata={"description": "Progress or fan-out state"})
    task_type = ma.fields.String(required=True)
    params = ma.fields.Dict()
    progress = ma.fields.Nested(ProgressSchema, allow_none=True)
    queue = ma.fields.String(allow_none=True)
    priority = ma.fields.Integer(allow_none=True)
    tags = ma.fields.List(ma.fields.String())
    worker = ma.fields.String(allow_none=True)
    retries = ma.fields.Integer(metadata={"description": "Automatic retries so far"})
    created_at = ma.fields.DateTime(required=True)
    started_at = ma.fields.DateTime(allow_none=True)
    finished_at = ma.fields.DateTime(allow_none=True)
    runtime = ma.fields.Float(allow_none=True, metadata={"description": "Seconds"})
    parent_id = ma.fields.String(allow_none=True)
    root_id = ma.fields.String(allow_none=True)
    retry_of = ma.fields.String(allow_none=True)
    batch_id = ma.fields.String(allow_none=True)
    schedule_id = ma.fields.String(allow_none=True)
    launched_by = ma.fields.String(
        allow_none=True, metadata={"description": "The API key that launched the run"})
    revoked_by = ma.fields.String(
        allow_none=True, metadata={"description": "The API key that revoked the run"})
    children = ma.fields.List(ma.fields.String(), metadata={"description": "Fan-out children"})
    retried_as = ma.fields.List(ma.fields.String(),
                                metadata={"description": "Runs launched by retrying this one"})


class RevokeArgsSchema(RequestSchema):
    terminate = ma.fields.Boolean(
        load_default=False,
        metadata={"description": "Also stop the run if it has started (sends `signal`)"})
    signal = ma.fields.String(load_default="SIGTERM", validate=ma.validate.OneOf(SIGNALS))
    reason = ma.fields.String(validate=ma.validate.Length(max=500),
                              metadata={"description": "Kept in the history"})


class RevokeResponseSchema(Schema):
    task_id = ma.fields.String(required=True)
    status = ma.fields.String(required=True)
    terminate = ma.fields.Boolean(required=True)
    message = ma.fields.String(required=True)

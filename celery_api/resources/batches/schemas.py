from __future__ import annotations

import marshmallow as ma

from celery_api.resources.history.schemas import HistoryRowSchema
from celery_api.resources.tasks.schemas import LaunchEnvelopeSchema, TaskLaunchResponseSchema
from celery_api.smorest import RequestSchema, Schema

MAX_BATCH_TASKS = 1000


class BatchRequestSchema(RequestSchema):
    tasks = ma.fields.List(
        ma.fields.Nested(LaunchEnvelopeSchema), required=True,
        validate=ma.validate.Length(1, MAX_BATCH_TASKS),
        metadata={"description": f"1 to {MAX_BATCH_TASKS} launch requests"})


class BatchResponseSchema(Schema):
    batch_id = ma.fields.String(required=True)
    tasks = ma.fields.List(ma.fields.Nested(TaskLaunchResponseSchema), required=True,
                           metadata={"description": "In the order of the request"})
    status_url = ma.fields.String(required=True,
                                  metadata={"description": "Where to follow the batch"})


class BatchSummarySchema(Schema):
    batch_id = ma.fields.String(required=True)
    total = ma.fields.Integer(required=True)
    counts = ma.fields.Dict(keys=ma.fields.String(), values=ma.fields.Integer(), required=True,
                            metadata={"description": "Runs per status"})
    finished = ma.fields.Boolean(required=True,
                                 metadata={"description": "Every run has finished"})
    created_at = ma.fields.DateTime(required=True)
    tasks = ma.fields.List(ma.fields.Nested(HistoryRowSchema), required=True,
                           metadata={"description": "Every run, in launch order"})


class BatchRevokeArgsSchema(RequestSchema):
    reason = ma.fields.String(validate=ma.validate.Length(max=500),
                              metadata={"description": "Kept in the history"})


class BatchRevokeResponseSchema(Schema):
    batch_id = ma.fields.String(required=True)
    revoked = ma.fields.List(ma.fields.String(), required=True,
                             metadata={"description": "The queued runs now REVOKED"})
    not_revoked = ma.fields.Dict(
        keys=ma.fields.String(), values=ma.fields.Integer(), required=True,
        metadata={"description": "Runs left alone (running or finished), per status"})
    message = ma.fields.String(required=True)

"""Batches: POST /tasks/batch, GET and DELETE /batches/{batch_id}."""

from __future__ import annotations

import marshmallow as ma
from flask import url_for
from flask.views import MethodView

from celery_api.auth import caller
from celery_api.idempotency import idempotent
from celery_api.resources.batches.schemas import (
    MAX_BATCH_TASKS,
    BatchRequestSchema,
    BatchResponseSchema,
    BatchRevokeArgsSchema,
    BatchRevokeResponseSchema,
    BatchSummarySchema,
)
from celery_api.resources.fields import parse_uuid, run_url
from celery_api.resources.operation import operation
from celery_api.resources.tasks.routes import launch_options, launch_response
from celery_api.services import batches
from celery_api.smorest import Blueprint

blp = Blueprint("batches", __name__, url_prefix="/api/celery", description="Batches")

BATCH_REQUEST_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {
        "type": "object",
        "required": ["tasks"],
        "properties": {"tasks": {
            "type": "array", "minItems": 1, "maxItems": MAX_BATCH_TASKS,
            "items": {"$ref": "#/components/schemas/TaskLaunchRequest"}}},
        "additionalProperties": False,
    }}},
}


@blp.route("/tasks/batch")
class TaskBatch(MethodView):
    @operation(blp, "launchBatch",
               scope="launch", limit="launch", errors=(413, 415, 503),
               requestBody=BATCH_REQUEST_BODY)
    @idempotent
    @blp.arguments(BatchRequestSchema())
    @blp.response(202, BatchResponseSchema, headers={
        "Location": {"description": "URL of the batch", "schema": {"type": "string"}}})
    def post(self, body):
        """Launch many tasks at once

        Every item is validated first: one invalid item (unknown `task_type` included)
        and nothing is launched; the 422 lists the errors under `errors.json.tasks.<index>`.
        The runs are recorded in one transaction and published through one producer
        (one pipeline on Redis). They share a `batch_id` (a history filter).
        """
        items = [batches.BatchItem(task["task_type"], task["params"], launch_options(task))
                 for task in body["tasks"]]
        batch_id, launched = batches.launch_batch(items, launched_by=caller())
        location = url_for("batches.Batch", batch_id=batch_id)
        tasks = [launch_response(run, run_url(run.id)) for run in launched]
        return ({"batch_id": batch_id, "tasks": tasks, "status_url": location}, 202,
                {"Location": location})


@blp.route("/batches/<uuid_path:batch_id>")
class Batch(MethodView):
    @operation(blp, "getBatch", scope="read", limit="read", errors=(404, 422, 503))
    @blp.response(200, BatchSummarySchema)
    def get(self, batch_id):
        """Get a batch: counts per status and every run"""
        return batches.summary(parse_uuid(batch_id, "batch_id"))

    @operation(blp, "revokeBatch", scope="control", errors=(404, 409, 503))
    @blp.arguments(BatchRevokeArgsSchema(), location="query", unknown=ma.RAISE)
    @blp.response(200, BatchRevokeResponseSchema)
    def delete(self, args, batch_id):
        """Revoke the runs of a batch that are still queued

        They never run. Running and finished runs are left alone (revoke a running
        one with `DELETE /tasks/{task_id}?terminate=true`). 409 when none is queued.
        """
        return batches.revoke(parse_uuid(batch_id, "batch_id"), reason=args.get("reason"),
                              revoked_by=caller())

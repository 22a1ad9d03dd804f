from __future__ import annotations

import marshmallow as ma

from celery_api.catalog import MAX_CACHE_TTL
from celery_api.resources.fields import DATETIME_PATTERN, DateTime, Expires, TaskStatus
from celery_api.smorest import RequestSchema, Schema

TAG = ma.fields.String(validate=ma.validate.Length(1, 64))


class AvailableTaskSchema(Schema):
    task_type = ma.fields.String(required=True, metadata={"example": "sii.sync_documents"})
    name = ma.fields.String(required=True)
    description = ma.fields.String(required=True)
    parameters = ma.fields.Dict(
        required=True,
        metadata={"description": "JSON Schema of `params`, generated from the task's "
                                 "marshmallow schema"})
    queue = ma.fields.String(required=True, allow_none=True,
                             metadata={"description": "Default queue"})
    safe_to_repeat = ma.fields.Boolean(
        required=True,
        metadata={"description": "Whether a run may be redelivered after its worker is lost"})
    cache_ttl = ma.fields.Integer(
        required=True, allow_none=True,
        metadata={"description": "Seconds a successful run answers identical launches "
                                 "(result cache); null: only launches sending `cache_ttl`"})


class LaunchOptionsSchema(RequestSchema):
    # strict: 2.5 (or "2") is refused, as the document's "integer" says, not truncated.
    priority = ma.fields.Integer(
        strict=True, validate=ma.validate.Range(0, 9),
        metadata={"description": "0 (highest) to 9 (lowest), as Celery's Redis transport orders"
                                 " them"})
    countdown = ma.fields.Float(
        validate=ma.validate.Range(0, 30 * 86400),
        metadata={"description": "Seconds to wait before running (at most 30 days)"})
    eta = DateTime(metadata={"description": "Earliest time to run (ISO 8601)"})
    expires = Expires(metadata={
        "description": "Seconds from now, or an ISO 8601 date-time, after which the run is "
                       "discarded (REVOKED) if it has not started",
        "oneOf": [{"type": "number", "minimum": 0, "exclusiveMinimum": True,
                   "maximum": 365 * 86400},
                  {"type": "string", "format": "date-time", "pattern": DATETIME_PATTERN}]})
    queue = ma.fields.String(
        validate=ma.validate.Regexp(r"^[A-Za-z0-9_.:-]{1,100}$"),
        metadata={"description": "Queue to publish to; one of the configured queues"})
    tags = ma.fields.List(TAG, validate=ma.validate.Length(max=20),
                          metadata={"description": "Free labels kept in the history"})
    cache_ttl = ma.fields.Integer(
        strict=True, validate=ma.validate.Range(0, MAX_CACHE_TTL),
        metadata={"description": "Result cache: answer this launch (200, `cached: true`) "
                                 "with an identical run in flight or one that succeeded "
                                 "less than this many seconds ago. 0: always a new run. "
                                 "Default: the task type's `cache_ttl`. Ignored with "
                                 "webhook_url, countdown, eta or expires, and in a batch"})
    webhook_url = ma.fields.Url(
        schemes={"http", "https"}, require_tld=False, validate=ma.validate.Length(max=2048),
        metadata={"description": "Also send this run's events (task.succeeded, task.failed, "
                                 "task.revoked, task.retried) here, signed with the "
                                 "deployment's CELERY_API_WEBHOOK_SECRET (Standard "
                                 "Webhooks). Refused (422) when that setting is unset or "
                                 "the URL fails the SSRF guard"})

    @ma.validates_schema
    def _one_start_time(self, data, **kwargs):
        if data.get("countdown") is not None and data.get("eta") is not None:
            raise ma.ValidationError("Give either countdown or eta, not both.", "eta")


class LaunchEnvelopeSchema(LaunchOptionsSchema):
    """What the launch endpoint validates; the OpenAPI document shows the typed variants
    of ``TaskLaunchRequest`` instead (one per task type, see ``launch_request_component``)."""

    task_type = ma.fields.String(
        required=True, validate=ma.validate.Length(1, 200),
        metadata={"description": "One of the task types listed by GET /tasks",
                  "example": "sii.sync_documents"})
    params = ma.fields.Dict(
        load_default=dict,
        metadata={"description": "Parameters, validated by the task type's schema",
                  "example": {"company_id": "94d8658c-c8bf-58e5-aaca-c14fac456724", "months": 1}})


class TaskLaunchResponseSchema(Schema):
    success = ma.fields.Boolean(required=True)
    task_id = ma.fields.String(required=True)
    task_type = ma.fields.String(required=True)
    status = TaskStatus(required=True)
    message = ma.fields.String(required=True)
    status_url = ma.fields.String(required=True,
                                  metadata={"description": "Where to follow the run"})
    cached = ma.fields.Boolean(
        required=True,
        metadata={"description": "true: no new run; an identical run (in flight, or "
                                 "succeeded within the cache_ttl) answers, with its "
                                 "status (200)"})

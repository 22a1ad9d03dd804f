"""Schemas of the webhook operations: subscriptions, their deliveries, a launch's own."""

from __future__ import annotations

import marshmallow as ma

from celery_api.resources.fields import RequiredOnCreate, page_limit, page_offset
from celery_api.services import webhooks
from celery_api.smorest import RequestSchema, Schema

MAX_PAGE = 200

URL = ma.fields.Url(
    schemes={"http", "https"}, require_tld=False, validate=ma.validate.Length(max=2048),
    metadata={"description": "Where events are POSTed: http or https, to a public address "
                             "(or a host in CELERY_API_WEBHOOK_ALLOWED_HOSTS)",
              "example": "https://hooks.example.com/celery"})


class WebhookFieldsSchema(RequestSchema):
    """Every field a client sets; none required here (PATCH)."""

    url = URL
    event_types = ma.fields.List(
        ma.fields.String(validate=ma.validate.OneOf(webhooks.EVENT_TYPES)),
        validate=ma.validate.Length(1, len(webhooks.EVENT_TYPES)),
        metadata={"description": "The events to receive", "example": ["task.failed"]})
    task_type = ma.fields.String(
        allow_none=True, validate=ma.validate.Length(1, 200),
        metadata={"description": "Only events of runs of this task type (null: all)"})
    description = ma.fields.String(allow_none=True, validate=ma.validate.Length(max=500))
    enabled = ma.fields.Boolean(metadata={"description": "False: nothing is sent (default "
                                                         "true)"})


class WebhookCreateSchema(RequiredOnCreate, WebhookFieldsSchema):
    required_on_create = ("url", "event_types")


class WebhookSchema(Schema):
    id = ma.fields.String(required=True)
    url = ma.fields.String(required=True)
    event_types = ma.fields.List(ma.fields.String(), required=True)
    task_type = ma.fields.String(required=True, allow_none=True)
    description = ma.fields.String(required=True, allow_none=True)
    enabled = ma.fields.Boolean(required=True)
    disabled_reason = ma.fields.String(
        required=True, allow_none=True,
        metadata={"description": "Why the service disabled it (an answer 410 Gone)"})
    previous_secret_expires_at = ma.fields.DateTime(
        required=True, allow_none=True,
        metadata={"description": "After a rotation: until when the previous secret also "
                                 "signs; null when only one secret signs"})
    created_by = ma.fields.String(required=True, allow_none=True)
    created_at = ma.fields.DateTime(required=True)
    updated_at = ma.fields.DateTime(required=True)


class WebhookWithSecretSchema(WebhookSchema):
    secret = ma.fields.String(
        required=True,
        metadata={"description": "The signing secret (whsec_...): shown this once only"})


class WebhookListArgsSchema(RequestSchema):
    limit = page_limit(1000)
    offset = page_offset()


class WebhookListSchema(Schema):
    items = ma.fields.List(ma.fields.Nested(WebhookSchema), required=True,
                           metadata={"description": "Oldest first"})
    total = ma.fields.Integer(required=True)
    limit = ma.fields.Integer(required=True)
    offset = ma.fields.Integer(required=True)


class RotateArgsSchema(RequestSchema):
    overlap_seconds = ma.fields.Float(
        load_default=24 * 3600.0,
        validate=ma.validate.Range(0, webhooks.MAX_OVERLAP_SECONDS),
        metadata={"description": "How long the previous secret keeps signing too (default "
                                 "one day, at most 7 days; 0: stop at once)"})


class DeliverySchema(Schema):
    id = ma.fields.Integer(required=True, metadata={"description": "This attempt's id"})
    message_id = ma.fields.String(
        required=True, metadata={"description": "The `webhook-id` header: the same for "
                                                "every attempt of one event"})
    attempt = ma.fields.Integer(required=True, metadata={"description": "1 for the first"})
    event_type = ma.fields.String(required=True)
    task_id = ma.fields.String(required=True, allow_none=True)
    webhook_id = ma.fields.String(required=True, allow_none=True,
                                  metadata={"description": "Null: a launch's webhook_url"})
    url = ma.fields.String(required=True)
    status = ma.fields.String(
        required=True,
        metadata={"enum": ["pending", "sending", "succeeded", "failed", "skipped"]})
    status_code = ma.fields.Integer(required=True, allow_none=True,
                                    metadata={"description": "The receiver's answer"})
    error = ma.fields.String(required=True, allow_none=True)
    duration_ms = ma.fields.Float(required=True, allow_none=True)
    due_at = ma.fields.DateTime(required=True)
    started_at = ma.fields.DateTime(required=True, allow_none=True)
    finished_at = ma.fields.DateTime(required=True, allow_none=True)
    next_retry_at = ma.fields.DateTime(
        required=True, allow_none=True,
        metadata={"description": "When the next attempt is due (a failed one that retries)"})
    created_at = ma.fields.DateTime(required=True)


class DeliveryArgsSchema(RequestSchema):
    limit = ma.fields.Integer(load_default=50, validate=ma.validate.Range(1, MAX_PAGE),
                              metadata={"description": f"1 to {MAX_PAGE}"})
    cursor = ma.fields.String(validate=[ma.validate.Length(1, 40),
                                        ma.validate.Regexp(r"^[A-Za-z0-9_-]+$")],
                              metadata={"description": "The `next_cursor` of the previous "
                                                       "page"})


class DeliveryPageSchema(Schema):
    items = ma.fields.List(ma.fields.Nested(DeliverySchema), required=True,
                           metadata={"description": "Newest first"})
    next_cursor = ma.fields.String(required=True, allow_none=True)
    limit = ma.fields.Integer(required=True)


class LaunchDeliveriesSchema(Schema):
    items = ma.fields.List(ma.fields.Nested(DeliverySchema), required=True,
                           metadata={"description": "Oldest first"})

"""Webhooks: /webhooks (subscriptions), their ping, secret rotation and deliveries, and
the deliveries of a launch's own ``webhook_url`` (/tasks/{task_id}/webhook-deliveries)."""

from __future__ import annotations

import marshmallow as ma
from flask import request, url_for
from flask.views import MethodView
from werkzeug.routing import BaseConverter

from celery_api.auth import caller
from celery_api.resources.fields import (
    ECHO_LIMIT,
    offset_page,
    parse_task_id,
    parse_uuid,
    require_patch_body,
)
from celery_api.resources.operation import operation
from celery_api.resources.webhooks.schemas import (
    DeliveryArgsSchema,
    DeliveryPageSchema,
    DeliverySchema,
    LaunchDeliveriesSchema,
    RotateArgsSchema,
    WebhookCreateSchema,
    WebhookFieldsSchema,
    WebhookListArgsSchema,
    WebhookListSchema,
    WebhookSchema,
    WebhookWithSecretSchema,
)
from celery_api.services import webhooks
from celery_api.services.errors import InvalidParams
from celery_api.smorest import Blueprint

blp = Blueprint("webhooks", __name__, url_prefix="/api/celery", description="Webhooks")

LOCATION = {"Location": {"description": "URL of the webhook", "schema": {"type": "string"}}}
DELIVERY = "<delivery_id:delivery_id>"
MAX_DELIVERY_ID = 2**63 - 1  # 64-bit ids


class DeliveryIdConverter(BaseConverter):
    """Any path segment, documented as a delivery id (a positive 64-bit integer); the
    view checks it is one and answers a 422 naming it if not (as path UUIDs are)."""


DELIVERY_PARAMETER = {"type": "integer", "format": "int64", "minimum": 1,
                      "maximum": MAX_DELIVERY_ID}


def register_converter(app, api) -> None:
    app.url_map.converters["delivery_id"] = DeliveryIdConverter
    api.register_converter(DeliveryIdConverter, lambda _c: dict(DELIVERY_PARAMETER))


def _id(value: str) -> str:
    return parse_uuid(value, "id")


def _delivery_id(value: str) -> int:
    if value.isascii() and value.isdigit() and len(value) <= 19 \
            and 1 <= int(value) <= MAX_DELIVERY_ID:
        return int(value)
    raise InvalidParams(f"delivery_id must be a positive integer (a delivery's id), got "
                        f"{value[:ECHO_LIMIT]!r}.",
                        errors={"path": {"delivery_id": ["Not a valid delivery id."]}})


@blp.route("/webhooks")
class Webhooks(MethodView):
    @operation(blp, "listWebhooks", scope="admin", errors=(503,))
    @blp.arguments(WebhookListArgsSchema(), location="query", unknown=ma.RAISE)
    @blp.response(200, WebhookListSchema)
    def get(self, args):
        """List webhook subscriptions, oldest first (secrets are never shown again)"""
        rows, total = webhooks.listing(limit=args["limit"], offset=args["offset"])
        return offset_page([webhooks.view(s) for s in rows], total, args)

    @operation(blp, "createWebhook", scope="admin", errors=(413, 415, 503))
    @blp.arguments(WebhookCreateSchema())
    @blp.response(201, WebhookWithSecretSchema, headers=LOCATION)
    def post(self, body):
        """Subscribe an endpoint to events

        `url` and `event_types` (task.succeeded, task.failed, task.revoked,
        task.retried, batch.finished, schedule.fired); optional `task_type` filter,
        `description`, `enabled`. The answer carries the signing `secret` (whsec_...),
        shown this once. A URL whose host resolves to a loopback, private, link-local,
        multicast, reserved or metadata address is refused (422 on `url`).
        """
        subscription, secret = webhooks.create(body, created_by=caller())
        location = url_for("webhooks.WebhookItem", id=subscription.id)
        return webhooks.view(subscription, secret), 201, {"Location": location}


@blp.route("/webhooks/<uuid_path:id>")
class WebhookItem(MethodView):
    @operation(blp, "getWebhook", scope="admin", errors=(404, 422, 503))
    @blp.response(200, WebhookSchema)
    def get(self, id):
        """Get a webhook subscription"""
        return webhooks.view(webhooks.get(_id(id)))

    @operation(blp, "updateWebhook", scope="admin", errors=(404, 413, 415, 503))
    @blp.arguments(WebhookFieldsSchema())
    @blp.response(200, WebhookSchema)
    def patch(self, body, id):
        """Change a webhook subscription

        Only the fields sent change. A new `url` passes the SSRF guard again;
        `enabled: true` re-enables one the service disabled (410) and clears
        `disabled_reason`.
        """
        require_patch_body()
        return webhooks.view(webhooks.update(_id(id), body))

    @operation(blp, "deleteWebhook", scope="admin", errors=(404, 422, 503))
    @blp.response(204)
    def delete(self, id):
        """Delete a webhook subscription and its delivery log"""
        webhooks.delete(_id(id))
        return None


@blp.route("/webhooks/<uuid_path:id>/rotate-secret")
class WebhookRotate(MethodView):
    @operation(blp, "rotateWebhookSecret", scope="admin", errors=(404, 503))
    @blp.arguments(RotateArgsSchema(), location="query", unknown=ma.RAISE)
    @blp.response(200, WebhookWithSecretSchema)
    def post(self, args, id):
        """Rotate the signing secret

        Answers the new `secret` (shown this once). For `overlap_seconds` (default one
        day) deliveries carry two signatures, one per secret, so a receiver verifies
        with either while it switches.
        """
        subscription, secret = webhooks.rotate(_id(id), args["overlap_seconds"])
        return webhooks.view(subscription, secret)


@blp.route("/webhooks/<uuid_path:id>/ping")
class WebhookPing(MethodView):
    @operation(blp, "pingWebhook", scope="admin", errors=(404, 422, 503))
    @blp.response(202, DeliverySchema)
    def post(self, id):
        """Send a `ping` event

        Delivered by the webhook worker like any event (enabled or not), signed, and
        listed in the deliveries: the answer is the pending delivery.
        """
        return webhooks.delivery_view(webhooks.ping(_id(id)))


@blp.route("/webhooks/<uuid_path:id>/deliveries")
class WebhookDeliveries(MethodView):
    @operation(blp, "listWebhookDeliveries", scope="admin", errors=(404, 503))
    @blp.arguments(DeliveryArgsSchema(), location="query", unknown=ma.RAISE)
    @blp.response(200, DeliveryPageSchema, headers={
        "Link": {"description": 'The next page, as `<url>; rel="next"`',
                 "schema": {"type": "string"}}})
    def get(self, args, id):
        """List every delivery attempt, newest first

        One row per attempt: its status code, error, duration, attempt number and,
        when it failed and will be retried, `next_retry_at`. Pages follow
        `next_cursor` (keyset pagination, as /history).
        """
        rows, next_cursor = webhooks.deliveries(_id(id), limit=args["limit"],
                                                cursor=args.get("cursor"))
        headers = {}
        if next_cursor:
            params = request.args.to_dict(flat=False)
            params["cursor"] = [next_cursor]
            headers["Link"] = (f'<{url_for("webhooks.WebhookDeliveries", id=_id(id), **params)}'
                               '>; rel="next"')
        return ({"items": [webhooks.delivery_view(d) for d in rows],
                 "next_cursor": next_cursor, "limit": args["limit"]}, 200, headers)


@blp.route(f"/webhooks/<uuid_path:id>/deliveries/{DELIVERY}/resend")
class WebhookResend(MethodView):
    @operation(blp, "resendWebhookDelivery", scope="admin", errors=(404, 409, 422, 503))
    @blp.response(202, DeliverySchema)
    def post(self, id, delivery_id):
        """Send a delivery's event again

        A new attempt of the same message (same `webhook-id`), sent now; it continues
        the message's retry schedule if it fails. 409 while an attempt of the message
        is still pending.
        """
        return webhooks.delivery_view(webhooks.resend(_delivery_id(delivery_id), _id(id)))


@blp.route("/tasks/<task_id:task_id>/webhook-deliveries")
class TaskWebhookDeliveries(MethodView):
    @operation(blp, "listTaskWebhookDeliveries", scope="read", limit="read", errors=(404, 422, 503))
    @blp.response(200, LaunchDeliveriesSchema)
    def get(self, task_id):
        """List the deliveries to the run's own `webhook_url`, oldest first

        Every attempt of every event of the run sent to the URL given at launch
        (subscriptions' deliveries are listed under /webhooks/{id}/deliveries).
        """
        rows = webhooks.launch_deliveries(parse_task_id(task_id))
        return {"items": [webhooks.delivery_view(d) for d in rows]}


@blp.route(f"/tasks/<task_id:task_id>/webhook-deliveries/{DELIVERY}/resend")
class TaskWebhookResend(MethodView):
    @operation(blp, "resendTaskWebhookDelivery",
               scope="launch", limit="launch", errors=(404, 409, 422, 503))
    @blp.response(202, DeliverySchema)
    def post(self, task_id, delivery_id):
        """Send an event of the run to its `webhook_url` again (a new attempt)"""
        return webhooks.delivery_view(
            webhooks.resend(_delivery_id(delivery_id), None, run_id=parse_task_id(task_id)))

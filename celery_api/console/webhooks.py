"""Webhooks: subscriptions (create, enable/disable, rotate the secret, ping, delete),
a subscription's deliveries with re-send, and a run's own webhook_url deliveries. The
subscriptions need the admin scope, as the API's /webhooks; a run's deliveries are
shown to its page's readers and re-sent with the launch scope, as the API's."""

from __future__ import annotations

import marshmallow as ma
from flask import redirect, render_template, request, url_for
from flask.views import MethodView

from celery_api.auth import caller
from celery_api.console import blp, console_page
from celery_api.resources.fields import parse_task_id, parse_uuid
from celery_api.resources.webhooks.routes import _delivery_id
from celery_api.resources.webhooks.schemas import WebhookCreateSchema
from celery_api.services import webhooks
from celery_api.services.errors import InvalidParams

PAGE = 200  # subscriptions listed
DELIVERY_PAGE = 50
SECRET_NOTICES = {
    "created": "Subscription created.",
    "rotated": "Secret rotated: the previous one also signs for one more day.",
}


def _form_values(form) -> dict:
    return {"url": (form.get("url") or "").strip(),
            "event_types": form.getlist("event_types"),
            "task_type": (form.get("task_type") or "").strip(),
            "description": (form.get("description") or "").strip()}


def _render_list(values=None, errors=(), status=200):
    rows, total = webhooks.listing(limit=PAGE, offset=0)
    return render_template("console/webhooks.html", subscriptions=rows, total=total,
                           event_types=webhooks.EVENT_TYPES,
                           values=values or {"event_types": []},
                           errors=list(errors)), status


class WebhooksPage(MethodView):
    @console_page("admin")
    def get(self):
        """The subscriptions, oldest first, and the form to add one."""
        return _render_list()

    @console_page("admin", rate="launch")
    def post(self):
        """Create a subscription: its secret is shown on the answer, once."""
        values = _form_values(request.form)
        body = {"url": values["url"], "event_types": values["event_types"],
                "task_type": values["task_type"] or None,
                "description": values["description"] or None}
        try:
            loaded = WebhookCreateSchema().load(body)
            subscription, secret = webhooks.create(loaded, created_by=caller())
        except ma.ValidationError as exc:
            errors = [f"{name}: {' '.join(map(str, msgs if isinstance(msgs, list) else [msgs]))}"
                      for name, msgs in exc.messages.items()]
            return _render_list(values, errors, 422)
        except InvalidParams as exc:
            return _render_list(values, [exc.detail], 422)
        return _secret_page(subscription, secret, "created")


def _secret_page(subscription, secret: str, notice: str):
    return render_template("console/webhook_secret.html", subscription=subscription,
                           secret=secret, notice=SECRET_NOTICES[notice])


class WebhookPage(MethodView):
    @console_page("admin")
    def get(self, webhook_id):
        """A subscription and its delivery attempts, newest first (keyset pages)."""
        webhook_id = parse_uuid(webhook_id, "id")
        subscription = webhooks.get(webhook_id)
        cursor = request.args.get("cursor") or None
        rows, next_cursor = webhooks.deliveries(webhook_id, limit=DELIVERY_PAGE,
                                                cursor=cursor)
        return render_template(
            "console/webhook.html", subscription=subscription, deliveries=rows,
            next_url=(url_for("console.webhook", webhook_id=webhook_id, cursor=next_cursor)
                      if next_cursor else None),
            newest_url=url_for("console.webhook", webhook_id=webhook_id) if cursor else None)


class WebhookAction(MethodView):
    @console_page("admin", rate="launch")
    def post(self, webhook_id, action):
        """enable, disable, rotate (the new secret shown once), ping, delete."""
        webhook_id = parse_uuid(webhook_id, "id")
        if action == "rotate":
            subscription, secret = webhooks.rotate(webhook_id, 24 * 3600.0)
            return _secret_page(subscription, secret, "rotated")
        if action == "ping":
            webhooks.ping(webhook_id)
            return redirect(url_for("console.webhook", webhook_id=webhook_id))
        if action == "delete":
            webhooks.delete(webhook_id)
            return redirect(url_for("console.webhooks"))
        webhooks.update(webhook_id, {"enabled": action == "enable"})
        return redirect(url_for("console.webhooks"))


class WebhookResend(MethodView):
    @console_page("admin", rate="launch")
    def post(self, webhook_id, delivery_id):
        """Send a finished delivery's event again (a new attempt of its message)."""
        webhook_id = parse_uuid(webhook_id, "id")
        webhooks.resend(_delivery_id(delivery_id), webhook_id)
        return redirect(url_for("console.webhook", webhook_id=webhook_id))


class RunWebhookResend(MethodView):
    @console_page("launch", rate="launch")
    def post(self, task_id, delivery_id):
        """Send an event of the run to its own webhook_url again."""
        task_id = parse_task_id(task_id)
        webhooks.resend(_delivery_id(delivery_id), None, run_id=task_id)
        return redirect(url_for("console.run", task_id=task_id) + "#webhook-deliveries")


blp.add_url_rule("/webhooks", view_func=WebhooksPage.as_view("webhooks"))
blp.add_url_rule("/webhooks/<webhook_id>", view_func=WebhookPage.as_view("webhook"))
blp.add_url_rule("/webhooks/<webhook_id>/<any(enable, disable, rotate, ping, delete):action>",
                 view_func=WebhookAction.as_view("webhook_action"))
blp.add_url_rule("/webhooks/<webhook_id>/deliveries/<delivery_id>/resend",
                 view_func=WebhookResend.as_view("webhook_resend"))
blp.add_url_rule("/runs/<task_id>/webhook-deliveries/<delivery_id>/resend",
                 view_func=RunWebhookResend.as_view("run_webhook_resend"))

"""Launch: a form per task type, built from the catalog's JSON Schema of its params.

The form is generated at request time from the same JSON Schema GET /tasks shows
(``params_json_schema``): a task module added to the catalog gets its form with no
change here. The browser checks what the schema says (required, min/max, pattern,
formats); the server's validation is the authority: the launch service's 422 field
errors are shown next to their fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import marshmallow as ma
from flask import abort, current_app, redirect, render_template, request, url_for
from flask.views import MethodView

from celery_api.auth import caller
from celery_api.catalog import get_catalog, known_queues
from celery_api.console import blp, console_page
from celery_api.resources.tasks.routes import params_json_schema
from celery_api.resources.tasks.schemas import MAX_CACHE_TTL, LaunchOptionsSchema
from celery_api.services import launch as launch_service
from celery_api.services.errors import InvalidParams

PARAM_PREFIX = "p."
UUID_PATTERN = "[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"


@dataclass
class FormField:
    """One input of a generated form."""

    name: str  # the form field's name
    key: str  # the param (or option) it sets
    label: str
    widget: str  # text, number, select, checkbox, json, datetime
    required: bool = False
    help: str = ""
    attrs: dict = field(default_factory=dict)
    options: list = field(default_factory=list)
    value: str = ""
    errors: list[str] = field(default_factory=list)


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize()


def param_fields(schema: dict) -> list[FormField]:
    """The form's inputs for a params JSON Schema (an object of simple properties)."""
    required = set(schema.get("required") or ())
    fields = []
    for name, prop in (schema.get("properties") or {}).items():
        kind = prop.get("type")
        kind = next((k for k in kind if k != "null"), "string") if isinstance(kind, list) \
            else kind
        f = FormField(name=PARAM_PREFIX + name, key=name, label=_label(name), widget="text",
                      required=name in required, help=prop.get("description", ""))
        hints = []
        if "enum" in prop:
            f.widget = "select"
            f.options = [str(v) for v in prop["enum"] if v is not None]
        elif kind in ("integer", "number"):
            f.widget = "number"
            f.attrs["step"] = "1" if kind == "integer" else "any"
            for bound, attr in (("minimum", "min"), ("maximum", "max")):
                if bound in prop:
                    f.attrs[attr] = prop[bound]
                    hints.append(f"{attr} {prop[bound]}")
        elif kind == "boolean":
            f.widget = "checkbox"
        elif kind in ("object", "array"):
            f.widget = "json"
            hints.append(f"JSON {kind}")
        else:
            fmt = prop.get("format")
            if fmt == "uuid":
                f.attrs["pattern"] = UUID_PATTERN
                f.attrs["placeholder"] = "550e8400-e29b-41d4-a716-446655440000"
                hints.append("a UUID")
            elif fmt == "date-time":
                f.attrs["placeholder"] = "2026-01-31T12:00:00Z"
                hints.append("ISO 8601 date-time")
            elif fmt in ("email", "uri", "url"):
                f.attrs["type"] = "email" if fmt == "email" else "url"
            if "pattern" in prop and "pattern" not in f.attrs and "\\u0000" not in prop["pattern"]:
                f.attrs["pattern"] = prop["pattern"].removeprefix("^").removesuffix("$")
                hints.append(f"pattern {prop['pattern']}")
            for bound, attr in (("minLength", "minlength"), ("maxLength", "maxlength")):
                if bound in prop:
                    f.attrs[attr] = prop[bound]
        if "default" in prop:
            default = prop["default"]
            f.value = (json.dumps(default) if f.widget == "json" else
                       ("1" if default else "") if f.widget == "checkbox" else str(default))
            hints.append(f"default {json.dumps(default)}")
        if f.required:
            f.attrs["required"] = True
        f.help = "; ".join(x for x in (f.help, ", ".join(hints)) if x)
        fields.append(f)
    return fields


def option_fields() -> list[FormField]:
    """The launch options, as POST /tasks/launch takes them."""
    return [
        FormField("o.priority", "priority", "Priority", "select",
                  options=[str(n) for n in range(10)],
                  help="0 (highest) to 9 (lowest); empty: the queue's order"),
        FormField("o.countdown", "countdown", "Countdown (seconds)", "number",
                  attrs={"min": 0, "max": 30 * 86400, "step": "any"},
                  help="Wait this long before running (or give an ETA)"),
        FormField("o.eta", "eta", "ETA (your time zone)", "datetime",
                  help="Earliest time to run"),
        FormField("o.expires", "expires", "Expires after (seconds)", "number",
                  attrs={"min": 0, "step": "any"},
                  help="Discarded (REVOKED) if it has not started by then"),
        FormField("o.queue", "queue", "Queue", "select", options=known_queues(),
                  help="Empty: the task type's queue"),
        FormField("o.tags", "tags", "Tags", "text",
                  attrs={"placeholder": "nightly, ops"}, help="Comma separated"),
        FormField("o.cache_ttl", "cache_ttl", "Result cache (seconds)", "number",
                  attrs={"min": 0, "max": MAX_CACHE_TTL, "step": "1"},
                  help="An identical run in flight, or one that succeeded this recently, "
                       "answers instead of a new run; 0: always a new run; empty: the "
                       "task type's default"),
        FormField("o.webhook_url", "webhook_url", "Webhook URL", "text",
                  attrs={"type": "url", "placeholder": "https://hooks.example.com/run"},
                  help="Also send this run's events here, signed with the deployment's "
                       "CELERY_API_WEBHOOK_SECRET"),
    ]


def _convert(f: FormField, raw: str):
    """The form's text as the JSON value the schema expects; text the browser let
    through unconverted is sent as it is, for the server's validation to name."""
    if f.widget == "checkbox":
        return raw in ("1", "on", "true")
    if f.widget == "number":
        try:
            number = float(raw)
        except ValueError:
            return raw
        return int(number) if f.attrs.get("step") == "1" and number.is_integer() else number
    if f.widget == "json":
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):  # validation names the field
            return raw
    return raw


def _time_from_form(raw: str) -> str:
    """A date-time-local value in the viewer's zone (offset sent by the script) as ISO."""
    try:
        offset = max(-1440, min(1440, int(request.form.get("tz_offset", "0"))))
    except ValueError:
        offset = 0
    try:
        parsed = datetime.fromisoformat(raw)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC) + timedelta(minutes=offset)
        return parsed.astimezone(UTC).isoformat()
    except (ValueError, OverflowError):
        return raw  # the options schema names the field


def read_form(params: list[FormField], options: list[FormField]) -> tuple[dict, dict]:
    form = request.form
    values: dict = {}
    for f in params:
        f.value = form.get(f.name, "")
        if f.widget == "checkbox":
            values[f.key] = _convert(f, f.value)
        elif f.value.strip():
            values[f.key] = _convert(f, f.value.strip())
    chosen: dict = {}
    for f in options:
        f.value = form.get(f.name, "").strip()
        if not f.value:
            continue
        if f.key == "tags":
            chosen["tags"] = [t.strip() for t in f.value.split(",") if t.strip()]
        elif f.key == "eta":
            chosen["eta"] = _time_from_form(f.value)
        else:
            chosen[f.key] = _convert(f, f.value) if f.widget == "number" else f.value
    if "priority" in chosen:
        try:
            chosen["priority"] = int(chosen["priority"])
        except ValueError:
            pass  # the options schema names the field
    return values, chosen


def _attach(fields: list[FormField], messages) -> list[str]:
    """Put each message on its field; return those that belong to no field."""
    by_key = {f.key: f for f in fields}
    left = []
    if not isinstance(messages, dict):
        return [str(messages)]
    for key, message in messages.items():
        texts = message if isinstance(message, list) else [message]
        texts = [t if isinstance(t, str) else json.dumps(t) for t in texts]
        if key in by_key:
            by_key[key].errors.extend(texts)
        else:
            left.extend(f"{key}: {t}" for t in texts)
    return left


def _definition(task_type: str):
    definition = get_catalog().get(task_type)
    if definition is None:
        abort(404, description=f"No task type {task_type!r} in the catalog.")
    return definition


class LaunchIndex(MethodView):
    @console_page("launch")
    def get(self):
        """The catalog: one form per task type."""
        return render_template("console/launch_index.html", catalog=list(get_catalog()))


class LaunchForm(MethodView):
    def _render(self, definition, params, options, errors=(), status=200):
        return render_template("console/launch.html", definition=definition, params=params,
                               options=options, errors=list(errors)), status

    @console_page("launch")
    def get(self, task_type):
        """The form generated from the task type's JSON Schema."""
        definition = _definition(task_type)
        return self._render(definition, param_fields(params_json_schema(definition)),
                            option_fields())

    @console_page("launch", rate="launch")
    def post(self, task_type):
        """Launch from the form; a 422 comes back as the form with its field errors."""
        definition = _definition(task_type)
        params, options = (param_fields(params_json_schema(definition)), option_fields())
        values, chosen = read_form(params, options)
        try:
            loaded = LaunchOptionsSchema().load(chosen)
        except ma.ValidationError as exc:
            left = _attach(options, exc.messages)
            return self._render(definition, params, options,
                                ["Check the launch options.", *left], 422)
        try:
            launched = launch_service.launch(
                definition.task_type, values,
                launch_service.LaunchOptions(
                    priority=loaded.get("priority"), countdown=loaded.get("countdown"),
                    eta=loaded.get("eta"), expires=loaded.get("expires"),
                    queue=loaded.get("queue"), tags=loaded.get("tags") or [],
                    cache_ttl=loaded.get("cache_ttl"), webhook_url=loaded.get("webhook_url")),
                launch_service.Lineage(launched_by=caller()),
                cache=True)  # as the API's launches: the result cache may answer
        except InvalidParams as exc:
            body = (exc.errors or {}).get("json", {})
            left = _attach(params, body.get("params", {}))
            left += _attach(options, {k: v for k, v in body.items() if k != "params"})
            current_app.logger.info("console launch of %s refused: %s", task_type, exc.detail)
            return self._render(definition, params, options, [exc.detail, *left], 422)
        return redirect(url_for("console.run", task_id=launched.id,
                                notice="cached" if launched.cached else "launched"))


blp.add_url_rule("/launch", view_func=LaunchIndex.as_view("launch_index"))
blp.add_url_rule("/launch/<task_type>", view_func=LaunchForm.as_view("launch"))

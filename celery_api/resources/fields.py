"""Fields, converters and request checks shared by the resources."""

from __future__ import annotations

import functools
import uuid
from datetime import UTC, datetime

import marshmallow as ma
from flask import request, url_for
from werkzeug.routing import BaseConverter

from celery_api.services import runstate
from celery_api.services.errors import InvalidParams, ServiceError
from celery_api.smorest import Schema


class TaskIdConverter(BaseConverter):
    """Matches any path segment but the fixed ones beside it (``/tasks/launch``,
    ``/tasks/batch``); the view checks it is a UUID and says so if not."""

    regex = r"(?!(?:launch|batch)$)[^/]+"


class UuidPathConverter(BaseConverter):
    """Any path segment, documented as a UUID (``format: uuid``); the view checks it is
    one and answers a 422 naming the parameter if not (``parse_uuid``)."""


UUID_PARAMETER = {"type": "string", "format": "uuid"}

RUN_ID_PLACEHOLDER = "00000000-0000-0000-0000-000000000000"


def run_url(task_id: str) -> str:
    """A run's status URL, as ``url_for("status.TaskRunItem", task_id=...)`` makes it.

    A path that differs between requests only by its prefix (``SCRIPT_NAME``, set from
    X-Forwarded-Prefix behind a proxy) and the id, which is a UUID (nothing to quote):
    built once per prefix. One url_for per launch was 2% of its CPU, per run of a batch
    of 1,000 a fifth of the request.
    """
    return _run_url_template(request.script_root).replace(RUN_ID_PLACEHOLDER, task_id)


@functools.lru_cache(maxsize=64)
def _run_url_template(_script_root: str) -> str:
    return url_for("status.TaskRunItem", task_id=RUN_ID_PLACEHOLDER)


class InvalidTaskId(ServiceError):
    status = 422


def parse_task_id(value: str) -> str:
    return parse_uuid(value, "task_id")


ECHO_LIMIT = 60  # characters of a refused value repeated in an error's detail


def parse_uuid(value: str, name: str) -> str:
    """A path id in its canonical form, or a 422 naming the parameter.

    Anything else (NUL, a megabyte of text) is refused here, before any lookup, and
    only the first characters of it are repeated in the detail.
    """
    try:
        if len(value) > 45:  # the longest form uuid.UUID reads: "urn:uuid:" + 36
            raise ValueError("too long")
        return str(uuid.UUID(value))
    except ValueError as exc:
        shown = repr(value[:ECHO_LIMIT]) + (f" (first {ECHO_LIMIT} of {len(value)} characters)"
                                            if len(value) > ECHO_LIMIT else "")
        raise InvalidTaskId(
            f"{name} must be a UUID such as 550e8400-e29b-41d4-a716-446655440000, got "
            f"{shown}.",
            errors={"path": {name: ["Not a valid UUID."]}},
        ) from exc


def require_patch_body() -> None:
    """A PATCH with no body is a 422 on ``json``: ``{}`` is the way to change nothing."""
    if not request.get_data(cache=True):
        raise InvalidParams("Send a JSON object with the fields to change ({} changes "
                            "nothing).", errors={"json": ["Missing request body."]})


class RequiredOnCreate:
    """A resource's create schema, made from its fields schema (which serves PATCH: every
    field optional) by requiring the fields named in ``required_on_create``. Put it first
    among the bases."""

    required_on_create: tuple[str, ...] = ()

    def on_bind_field(self, field_name, field_obj):
        if field_name in self.required_on_create:
            field_obj.required = True
        super().on_bind_field(field_name, field_obj)


def page_limit(maximum: int, default: int = 100) -> ma.fields.Integer:
    """The ``limit`` query argument of an offset-paged list: 1 to ``maximum``."""
    return ma.fields.Integer(load_default=default, validate=ma.validate.Range(1, maximum),
                             metadata={"description": f"1 to {maximum}"})


def page_offset() -> ma.fields.Integer:
    """The ``offset`` query argument of an offset-paged list."""
    return ma.fields.Integer(load_default=0, validate=ma.validate.Range(0, 10**9))


def offset_page(items: list, total: int, args: dict) -> dict:
    """The answer of an offset-paged list: its items, the total matching, and the
    ``limit`` and ``offset`` it was asked with."""
    return {"items": items, "total": total, "limit": args["limit"], "offset": args["offset"]}


# Date-times are refused outside the years 0002 to 9998 as written. Whatever the offset,
# such a value converts to UTC and stays representable when PostgreSQL renders it in any
# session time zone (Python's datetime ends at years 1 and 9999, so without that margin
# ``0001-01-01T00:00:00+14:00`` has no UTC equivalent and fails inside the database
# driver). A rule on the written year, unlike one on the UTC instant, is one the OpenAPI
# document can state: ``DATETIME_PATTERN``.
FIRST_YEAR, LAST_YEAR = 2, 9998
DATETIME_PATTERN = ("^(?:000[2-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-8][0-9]{3}|9[0-8][0-9]{2}"
                    "|99[0-8][0-9]|999[0-8])-")
RANGE_MESSAGE = "Must be an ISO 8601 date-time with a year from 0002 to 9998."
# What a history cursor (a created_at this service wrote) may hold.
EARLIEST = datetime(FIRST_YEAR, 1, 1, tzinfo=UTC)
LATEST = datetime(LAST_YEAR, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


class DateTime(ma.fields.AwareDateTime):
    """An ISO 8601 date-time, UTC when it names no offset, with a year from 0002 to
    9998 (a 422 naming the field otherwise; see ``DATETIME_PATTERN``)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("default_timezone", UTC)
        kwargs["metadata"] = {"pattern": DATETIME_PATTERN, **kwargs.get("metadata", {})}
        super().__init__(**kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        parsed = super()._deserialize(value, attr, data, **kwargs)
        if not FIRST_YEAR <= parsed.year <= LAST_YEAR:
            raise ma.ValidationError(RANGE_MESSAGE)
        return parsed


class Expires(ma.fields.Field):
    """Seconds from now (a number above 0, at most a year) or an ISO 8601 date-time."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool):
            raise ma.ValidationError("Must be a number of seconds or an ISO 8601 date-time.")
        if isinstance(value, int | float):
            if not 0 < value <= 365 * 86400:
                raise ma.ValidationError("Seconds must be between 0 and 31536000 (one year).")
            return float(value)
        if isinstance(value, str):
            return DateTime()._deserialize(value, attr, data, **kwargs)
        raise ma.ValidationError("Must be a number of seconds or an ISO 8601 date-time.")

    def _serialize(self, value, attr, obj, **kwargs):
        if isinstance(value, datetime):
            return value.isoformat()
        return value


# Celery's states, in the order a run goes through them: the ``TaskStatus`` enum of the
# OpenAPI document (generated clients get a closed type: comparing with "success" does
# not compile in TypeScript).
STATES = ("PENDING", "RECEIVED", "STARTED", "PROGRESS", "RETRY", "SUCCESS", "FAILURE",
          "REVOKED")
TASK_STATUS_COMPONENT = {
    "type": "string",
    "enum": list(STATES),
    "description": "A run's Celery state: PENDING, RECEIVED, STARTED, PROGRESS, RETRY "
                   "(queued or running), SUCCESS, FAILURE, REVOKED (finished). A custom "
                   "state a task reports while it runs is shown as STARTED.",
}


def known_state(status: str) -> str:
    """``status`` if it is one of ``STATES``; STARTED for a custom state a task set with
    ``update_state`` while running (the enum of the document is a promise to clients)."""
    return status if status in runstate.ALL else "STARTED"


class TaskStatus(ma.fields.String):
    """A run's status, documented as ``$ref: TaskStatus`` (see ``smorest.document_component``)."""

    def __init__(self, **kwargs):
        kwargs["metadata"] = {**kwargs.get("metadata", {}),
                              "component": ("TaskStatus", TASK_STATUS_COMPONENT)}
        super().__init__(**kwargs)


class RunLineageSchema(Schema):
    """Where a run comes from and who acted on it: the fields a run's status and its
    history row share (all always sent, null where they do not apply)."""

    parent_id = ma.fields.String(required=True, allow_none=True)
    root_id = ma.fields.String(required=True, allow_none=True)
    retry_of = ma.fields.String(required=True, allow_none=True)
    batch_id = ma.fields.String(required=True, allow_none=True)
    schedule_id = ma.fields.String(required=True, allow_none=True)
    scheduled_for = ma.fields.DateTime(
        required=True, allow_none=True,
        metadata={"description": "The schedule's tick this run was for"})
    launched_by = ma.fields.String(
        required=True, allow_none=True,
        metadata={"description": "The API key that launched the run"})
    revoked_by = ma.fields.String(
        required=True, allow_none=True,
        metadata={"description": "The API key that revoked the run"})

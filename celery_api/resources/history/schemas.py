from __future__ import annotations

import re
from datetime import UTC

import marshmallow as ma

from celery_api.resources.fields import (
    EARLIEST,
    LATEST,
    STATES,
    DateTime,
    RunLineageSchema,
    TaskStatus,
    known_state,
)
from celery_api.services.history import MAX_LIMIT, InvalidCursor, decode_cursor
from celery_api.smorest import RequestSchema, Schema, unstorable_text

ID = ma.fields.String(validate=ma.validate.Length(1, 155))
CURSOR_MESSAGE = ("Not a cursor this service issued: pass the next_cursor of the previous page "
                  "unchanged, or omit it for the first page.")


CURSOR_CHARACTERS = re.compile(r"^[A-Za-z0-9_-]+$")


def _issued_cursor(value: str) -> None:
    """A cursor decodes to a (created_at, id) that the database can compare with (one
    of URL-safe base64's characters only: the Regexp validator checks those)."""
    if not CURSOR_CHARACTERS.match(value):
        return  # the Regexp validator (which documents the pattern) says so already
    try:
        created, run_id = decode_cursor(value)
        if not EARLIEST <= created.astimezone(UTC) <= LATEST:
            raise ValueError("out of range")
    except (InvalidCursor, OverflowError, ValueError):
        raise ma.ValidationError(CURSOR_MESSAGE) from None
    if not 1 <= len(run_id) <= 155 or unstorable_text(run_id):
        raise ma.ValidationError(CURSOR_MESSAGE)


class HistoryArgsSchema(RequestSchema):
    task_type = ma.fields.List(
        ma.fields.String(validate=ma.validate.Length(1, 200)),
        validate=ma.validate.Length(max=50),
        metadata={"description": "Repeatable: any of these task types"})
    status = ma.fields.List(
        ma.fields.String(validate=ma.validate.OneOf(STATES)),
        validate=ma.validate.Length(max=len(STATES)),
        metadata={"description": "Repeatable: any of these statuses"})
    tag = ma.fields.String(validate=ma.validate.Length(1, 64))
    company_id = ma.fields.UUID(metadata={"description": "SII tasks: the company"})
    parent_id = ID
    root_id = ID
    retry_of = ID
    batch_id = ID
    schedule_id = ID
    launched_by = ma.fields.String(
        validate=ma.validate.Length(1, 200),
        metadata={"description": "Runs launched (or retried) with this API key"})
    revoked_by = ma.fields.String(
        validate=ma.validate.Length(1, 200),
        metadata={"description": "Runs revoked with this API key"})
    created_after = DateTime(metadata={"description": "Inclusive"})
    created_before = DateTime(metadata={"description": "Exclusive"})
    finished_after = DateTime(metadata={"description": "Inclusive"})
    finished_before = DateTime(metadata={"description": "Exclusive"})
    limit = ma.fields.Integer(load_default=50, validate=ma.validate.Range(1, MAX_LIMIT),
                              metadata={"description": f"Rows per page, 1 to {MAX_LIMIT}"})
    cursor = ma.fields.String(
        validate=[ma.validate.Length(1, 400),
                  ma.validate.Regexp(CURSOR_CHARACTERS, error=CURSOR_MESSAGE),
                  _issued_cursor],
        metadata={"description": "The `next_cursor` of the previous page"})


class HistoryRowSchema(RunLineageSchema):
    """A run as the history lists it: every field is always sent (null where allowed)."""

    task_id = ma.fields.String(required=True, attribute="id")
    task_type = ma.fields.String(required=True)
    status = TaskStatus(required=True)
    params = ma.fields.Dict(required=True)
    result = ma.fields.Raw(required=True, allow_none=True)
    error = ma.fields.String(required=True, allow_none=True)
    queue = ma.fields.String(required=True, allow_none=True)
    priority = ma.fields.Integer(required=True, allow_none=True)
    tags = ma.fields.List(ma.fields.String(), required=True)
    worker = ma.fields.String(required=True, allow_none=True)
    retries = ma.fields.Integer(required=True)
    attempts = ma.fields.Integer(required=True,
                                 metadata={"description": "Deliveries to a worker"})
    company_id = ma.fields.String(required=True, allow_none=True)
    created_at = ma.fields.DateTime(required=True)
    started_at = ma.fields.DateTime(required=True, allow_none=True)
    finished_at = ma.fields.DateTime(required=True, allow_none=True)
    runtime = ma.fields.Float(required=True, allow_none=True)

    @ma.post_dump
    def _never_missing(self, data, **_kwargs):
        # Rows written before a column had its default may hold NULL: still a list, an
        # object and a number, as the document promises.
        for key, empty in (("params", {}), ("tags", []), ("retries", 0), ("attempts", 0)):
            if data.get(key) is None:
                data[key] = empty
        data["status"] = known_state(data["status"])
        return data


class HistoryPageSchema(Schema):
    items = ma.fields.List(ma.fields.Nested(HistoryRowSchema), required=True)
    next_cursor = ma.fields.String(
        allow_none=True, required=True,
        metadata={"description": "Pass as `cursor` for the next page; null on the last"})
    limit = ma.fields.Integer(required=True)

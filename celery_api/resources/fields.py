"""Fields and converters shared by the resources."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import marshmallow as ma
from werkzeug.routing import BaseConverter

from celery_api.services.errors import ServiceError


class TaskIdConverter(BaseConverter):
    """Matches any path segment but the fixed ones beside it (``/tasks/launch``,
    ``/tasks/batch``); the view checks it is a UUID and says so if not."""

    regex = r"(?!(?:launch|batch)$)[^/]+"


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


# The instants every database stores and reads back: Python's datetime range (years 1
# to 9999) less a day at each end, so a value stays representable when PostgreSQL
# renders it in any session time zone (offsets reach +14:00 and -12:00).
EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
LATEST = datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC)
RANGE_MESSAGE = ("Must be between 0001-01-02T00:00:00Z and 9999-12-30T23:59:59Z once converted "
                 "to UTC.")


class DateTime(ma.fields.AwareDateTime):
    """An ISO 8601 date-time, UTC when it names no offset, stored as a UTC instant.

    Refuses, with a 422 naming the field, instants outside ``EARLIEST``..``LATEST``:
    ``0001-01-01T00:00:00+14:00`` parses but has no UTC equivalent, and would otherwise
    fail inside the database driver.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("default_timezone", UTC)
        super().__init__(**kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        parsed = super()._deserialize(value, attr, data, **kwargs)
        try:
            utc = parsed.astimezone(UTC)
        except OverflowError:
            raise ma.ValidationError(RANGE_MESSAGE) from None
        if not EARLIEST <= utc <= LATEST:
            raise ma.ValidationError(RANGE_MESSAGE)
        return parsed


class Expires(ma.fields.Field):
    """Seconds from now (number) or an ISO 8601 date-time with a timezone."""

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

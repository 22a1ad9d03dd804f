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


def parse_uuid(value: str, name: str) -> str:
    """A path id in its canonical form, or a 422 naming the parameter."""
    try:
        return str(uuid.UUID(value))
    except ValueError as exc:
        raise InvalidTaskId(
            f"{name} must be a UUID such as 550e8400-e29b-41d4-a716-446655440000, got "
            f"{value!r}.",
            errors={"path": {name: ["Not a valid UUID."]}},
        ) from exc


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
            return ma.fields.AwareDateTime(default_timezone=UTC)._deserialize(
                value, attr, data, **kwargs)
        raise ma.ValidationError("Must be a number of seconds or an ISO 8601 date-time.")

    def _serialize(self, value, attr, obj, **kwargs):
        if isinstance(value, datetime):
            return value.isoformat()
        return value

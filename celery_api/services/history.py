"""The history of runs: filtered, newest first, read with an opaque keyset cursor.

The cursor encodes the (created_at, id) of the last row of a page; the next page
is every row strictly older. Rows inserted meanwhile are newer, so they never
shift a page that is being read, and a deep page costs the same as the first.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa

from celery_api.extensions import db
from celery_api.models import TaskRun, TaskRunTag, UTCDateTime
from celery_api.services import database
from celery_api.services.errors import ServiceError

MAX_LIMIT = 500


class InvalidCursor(ServiceError):
    status = 422


@dataclass
class HistoryQuery:
    task_types: list[str] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    tag: str | None = None
    company_id: str | None = None
    parent_id: str | None = None
    root_id: str | None = None
    retry_of: str | None = None
    batch_id: str | None = None
    schedule_id: str | None = None
    launched_by: str | None = None
    revoked_by: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    finished_after: datetime | None = None
    finished_before: datetime | None = None
    limit: int = 50
    cursor: str | None = None


def encode_cursor(run: TaskRun) -> str:
    raw = json.dumps([run.created_at.isoformat(), run.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, run_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        parsed = datetime.fromisoformat(created)
        if not isinstance(run_id, str) or parsed.tzinfo is None:
            raise ValueError("bad cursor")
        return parsed, run_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidCursor(
            "cursor is not one this service issued: pass the next_cursor of the previous "
            "page unchanged, or omit it for the first page.",
            errors={"query": {"cursor": ["Invalid cursor."]}}) from exc


def build_statement(query: HistoryQuery) -> sa.Select:
    stmt = sa.select(TaskRun)
    conditions = []
    if query.task_types:
        conditions.append(TaskRun.task_type.in_(query.task_types))
    if query.statuses:
        conditions.append(TaskRun.status.in_(query.statuses))
    for column, value in ((TaskRun.company_id, query.company_id),
                          (TaskRun.parent_id, query.parent_id),
                          (TaskRun.root_id, query.root_id),
                          (TaskRun.retry_of, query.retry_of),
                          (TaskRun.batch_id, query.batch_id),
                          (TaskRun.schedule_id, query.schedule_id),
                          (TaskRun.launched_by, query.launched_by),
                          (TaskRun.revoked_by, query.revoked_by)):
        if value is not None:
            conditions.append(column == value)
    if query.tag is not None:
        conditions.append(sa.exists().where(TaskRunTag.run_id == TaskRun.id,
                                            TaskRunTag.tag == query.tag))
    if query.created_after is not None:
        conditions.append(TaskRun.created_at >= query.created_after)
    if query.created_before is not None:
        conditions.append(TaskRun.created_at < query.created_before)
    if query.finished_after is not None:
        conditions.append(TaskRun.finished_at >= query.finished_after)
    if query.finished_before is not None:
        conditions.append(TaskRun.finished_at < query.finished_before)
    if query.cursor:
        created, run_id = decode_cursor(query.cursor)
        # A row-value comparison: the index on (created_at, id) serves it as a range.
        conditions.append(sa.tuple_(TaskRun.created_at, TaskRun.id) <
                          sa.tuple_(sa.literal(created, UTCDateTime), sa.literal(run_id)))
    return (stmt.where(*conditions)
            .order_by(TaskRun.created_at.desc(), TaskRun.id.desc())
            .limit(min(query.limit, MAX_LIMIT) + 1))


def page(query: HistoryQuery) -> tuple[list[TaskRun], str | None]:
    """One page of runs and the cursor of the next page (None on the last)."""
    with database.unavailable_as():
        rows = list(db.session.execute(build_statement(query)).scalars())
    limit = min(query.limit, MAX_LIMIT)
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, encode_cursor(rows[-1])
    return rows, None

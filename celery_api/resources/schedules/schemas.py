from __future__ import annotations

import marshmallow as ma

from celery_api.models import utcnow
from celery_api.resources.fields import DateTime, RequiredOnCreate, page_limit, page_offset
from celery_api.resources.tasks.schemas import TAG
from celery_api.services import schedules
from celery_api.smorest import RequestSchema, Schema

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.:/-]{0,199}$"
# Five fields of cron's characters, single spaces; cronsim checks the rest (ranges,
# steps, names), answered as a 422 on `cron`.
CRON_PATTERN = r"^[0-9A-Za-z*,/?#-]{1,40}( [0-9A-Za-z*,/?#-]{1,40}){4}$"
MAX_PAGE = 1000
# The characters of IANA zone names; the server checks the name is a zone it knows (an
# enum of ~600 names would not do: generated clients fold GMT+0 and GMT-0 into one key).
ZONE_PATTERN = r"^[A-Za-z0-9_+/-]{1,64}$"
ZONE_MESSAGE = "Unknown time zone: use an IANA name such as 'UTC' or 'America/Santiago'."


def _zone(value: str) -> None:
    if value not in schedules.time_zones():
        raise ma.ValidationError(ZONE_MESSAGE)


def _cron(value: str) -> None:
    try:
        schedules.check_cron(value)
    except ValueError as exc:
        raise ma.ValidationError(str(exc)) from None


def _future(value) -> None:
    if value <= utcnow():
        raise ma.ValidationError("Must be in the future.")


class ScheduleFieldsSchema(RequestSchema):
    """Every field a client sets; none required here (PATCH)."""

    name = ma.fields.String(
        validate=ma.validate.Regexp(NAME_PATTERN, error="1 to 200 letters, digits, spaces and "
                                    "_ . : / -, starting with a letter or digit."),
        metadata={"description": "Unique", "example": "sii-nightly-documents"})
    task_type = ma.fields.String(
        validate=ma.validate.Length(1, 200),
        metadata={"description": "One of the task types listed by GET /tasks",
                  "example": "sii.sync_documents_all_companies"})
    params = ma.fields.Dict(metadata={
        "description": "The task type's params, validated as a launch validates them",
        "example": {"months": 1}})
    cron = ma.fields.String(
        validate=[ma.validate.Regexp(CRON_PATTERN, error="Must be 5 cron fields separated "
                                     "by single spaces."), _cron],
        metadata={"description": "Trigger: a 5-field cron expression (minute hour "
                                 "day-of-month month day-of-week), read in `timezone`",
                  "example": "0 2 * * *"})
    timezone = ma.fields.String(
        validate=[ma.validate.Regexp(ZONE_PATTERN, error=ZONE_MESSAGE), _zone],
        metadata={"description": "IANA time zone of `cron` (default UTC), one of the "
                                 "zones of the server's tz database",
                  "example": "America/Santiago"})
    interval_seconds = ma.fields.Float(
        validate=ma.validate.Range(schedules.MIN_INTERVAL_SECONDS,
                                   schedules.MAX_INTERVAL_SECONDS),
        metadata={"description": f"Trigger: every this many seconds (at least "
                                 f"{schedules.MIN_INTERVAL_SECONDS:g})"})
    run_at = DateTime(validate=_future,
                      metadata={"description": "Trigger: once, at this time (in the future)"})
    enabled = ma.fields.Boolean(metadata={"description": "False: paused (default true)"})
    overlap = ma.fields.String(
        validate=ma.validate.OneOf(schedules.OVERLAP),
        metadata={"description": "A tick whose previous run is unfinished: `skip` it "
                                 "(default; counted in `runs_skipped`) or `allow` it"})
    queue = ma.fields.String(
        validate=ma.validate.Regexp(r"^[A-Za-z0-9_.:-]{1,100}$"),
        metadata={"description": "Queue of its runs; one of the configured queues"})
    priority = ma.fields.Integer(strict=True, validate=ma.validate.Range(0, 9),
                                 metadata={"description": "0 (highest) to 9 (lowest)"})
    tags = ma.fields.List(TAG, validate=ma.validate.Length(max=20),
                          metadata={"description": "Tags of its runs"})
    expires = ma.fields.Float(
        validate=ma.validate.Range(0, 365 * 86400, min_inclusive=False),
        metadata={"description": "Seconds after firing past which a run that has not "
                                 "started is discarded (REVOKED)"})


class ScheduleCreateSchema(RequiredOnCreate, ScheduleFieldsSchema):
    """What POST /schedules takes: a name, a task type and exactly one trigger."""

    required_on_create = ("name", "task_type")

    @ma.validates_schema
    def _one_trigger(self, data, **kwargs):
        given = [t for t in schedules.TRIGGERS if data.get(t) is not None]
        if len(given) != 1:
            message = ("Give exactly one trigger: cron (with timezone), interval_seconds "
                       "or run_at.")
            raise ma.ValidationError({t: [message] for t in (given or schedules.TRIGGERS)})
        if data.get("timezone") is not None and given != ["cron"]:
            raise ma.ValidationError("A time zone belongs to a cron trigger.", "timezone")


class LastRunSchema(Schema):
    task_id = ma.fields.String(required=True)
    at = ma.fields.DateTime(required=True, metadata={"description": "When it was launched"})
    status = ma.fields.String(allow_none=True, required=True,
                              metadata={"description": "Its status now"})


class ScheduleSchema(Schema):
    id = ma.fields.String(required=True)
    name = ma.fields.String(required=True)
    task_type = ma.fields.String(required=True)
    params = ma.fields.Dict(required=True)
    cron = ma.fields.String(allow_none=True, required=True)
    timezone = ma.fields.String(allow_none=True, required=True,
                                metadata={"description": "Of a cron trigger; null otherwise"})
    interval_seconds = ma.fields.Float(allow_none=True, required=True)
    run_at = ma.fields.DateTime(allow_none=True, required=True)
    enabled = ma.fields.Boolean(required=True)
    overlap = ma.fields.String(required=True, metadata={"enum": list(schedules.OVERLAP)})
    queue = ma.fields.String(allow_none=True, required=True)
    priority = ma.fields.Integer(allow_none=True, required=True)
    tags = ma.fields.List(ma.fields.String(), required=True)
    expires = ma.fields.Float(allow_none=True, required=True)
    next_run_at = ma.fields.DateTime(
        allow_none=True, required=True,
        metadata={"description": "When beat fires it next; null when paused or done"})
    last_run = ma.fields.Nested(LastRunSchema, allow_none=True, required=True)
    runs_fired = ma.fields.Integer(required=True,
                                   metadata={"description": "Runs launched (ticks and /run)"})
    runs_skipped = ma.fields.Integer(required=True,
                                     metadata={"description": "Ticks skipped (overlap)"})
    last_skipped_at = ma.fields.DateTime(allow_none=True, required=True)
    created_by = ma.fields.String(allow_none=True, required=True,
                                  metadata={"description": "The API key that created it"})
    created_at = ma.fields.DateTime(required=True)
    updated_at = ma.fields.DateTime(required=True)


class ScheduleListArgsSchema(RequestSchema):
    task_type = ma.fields.String(validate=ma.validate.Length(1, 200))
    enabled = ma.fields.Boolean()
    limit = page_limit(MAX_PAGE)
    offset = page_offset()


class ScheduleListSchema(Schema):
    items = ma.fields.List(ma.fields.Nested(ScheduleSchema), required=True,
                           metadata={"description": "By name"})
    total = ma.fields.Integer(required=True, metadata={"description": "Matching schedules"})
    limit = ma.fields.Integer(required=True)
    offset = ma.fields.Integer(required=True)


class ScheduleRunSchema(Schema):
    task_id = ma.fields.String(required=True)
    schedule_id = ma.fields.String(required=True)
    status = ma.fields.String(required=True)
    status_url = ma.fields.String(required=True)

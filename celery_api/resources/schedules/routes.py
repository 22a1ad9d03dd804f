"""Schedules: /schedules, /schedules/{id} and the actions pause, resume, run."""

from __future__ import annotations

import marshmallow as ma
from flask import url_for
from flask.views import MethodView

from celery_api.auth import caller
from celery_api.idempotency import idempotent
from celery_api.resources.fields import (
    offset_page,
    parse_uuid,
    require_patch_body,
    run_url,
)
from celery_api.resources.operation import operation
from celery_api.resources.schedules.schemas import (
    ScheduleCreateSchema,
    ScheduleFieldsSchema,
    ScheduleListArgsSchema,
    ScheduleListSchema,
    ScheduleRunSchema,
    ScheduleSchema,
)
from celery_api.resources.variants import register_task_type_variants
from celery_api.services import schedules
from celery_api.smorest import Blueprint

blp = Blueprint("schedules", __name__, url_prefix="/api/celery", description="Schedules")

CREATE_BODY = {
    "required": True,
    "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ScheduleCreateRequest"}}},
}
LOCATION = {"Location": {"description": "URL of the schedule", "schema": {"type": "string"}}}


def _id(value: str) -> str:
    return parse_uuid(value, "id")


@blp.route("/schedules")
class Schedules(MethodView):
    @operation(blp, "listSchedules", scope="admin", errors=(503,))
    @blp.arguments(ScheduleListArgsSchema(), location="query", unknown=ma.RAISE)
    @blp.response(200, ScheduleListSchema)
    def get(self, args):
        """List schedules, by name

        Filters: `task_type`, `enabled`.
        """
        rows, total = schedules.listing(
            task_type=args.get("task_type"), enabled=args.get("enabled"),
            limit=args["limit"], offset=args["offset"])
        return offset_page([schedules.view(s) for s in rows], total, args)

    @operation(blp, "createSchedule",
               scope="admin", errors=(413, 415, 503), requestBody=CREATE_BODY)
    @blp.arguments(ScheduleCreateSchema())
    @blp.response(201, ScheduleSchema, headers=LOCATION)
    def post(self, body):
        """Create a schedule

        A unique `name`, a `task_type` and its `params` (validated as a launch validates
        them), launch options (`queue`, `priority`, `tags`, `expires` in seconds), and
        exactly one trigger: `cron` (+ `timezone`, default UTC), `interval_seconds`, or
        `run_at` (once). Beat fires it from its next tick on. Every refusal is a 422
        naming the field: an unknown task type or time zone, an invalid cron expression
        or params, an interval under the minimum, a `run_at` in the past, no trigger or
        two, a name already taken.
        """
        schedule = schedules.create(body, created_by=caller())
        location = url_for("schedules.ScheduleItem", id=schedule.id)
        return schedules.view(schedule), 201, {"Location": location}


@blp.route("/schedules/<uuid_path:id>")
class ScheduleItem(MethodView):
    @operation(blp, "getSchedule", scope="admin", errors=(404, 422, 503))
    @blp.response(200, ScheduleSchema)
    def get(self, id):
        """Get a schedule: its trigger, next run, last run and counts"""
        return schedules.view(schedules.get(_id(id)))

    @operation(blp, "updateSchedule", scope="admin", errors=(404, 413, 415, 503))
    @blp.arguments(ScheduleFieldsSchema())
    @blp.response(200, ScheduleSchema)
    def patch(self, body, id):
        """Change a schedule

        Only the fields sent change. A trigger field (`cron`, `interval_seconds` or
        `run_at`) replaces the trigger; `timezone` belongs to a cron trigger. A new
        trigger or `enabled` recomputes `next_run_at` from now. Beat sees the change at
        its next tick (within `CELERY_API_DISPATCH_INTERVAL`).
        """
        require_patch_body()
        return schedules.view(schedules.update(_id(id), body))

    @operation(blp, "deleteSchedule", scope="admin", errors=(404, 422, 503))
    @blp.response(204)
    def delete(self, id):
        """Delete a schedule

        Its runs stay in the history (`GET /history?schedule_id=`).
        """
        schedules.delete(_id(id))
        return None


@blp.route("/schedules/<uuid_path:id>/pause")
class SchedulePause(MethodView):
    @operation(blp, "pauseSchedule", scope="admin", errors=(404, 422, 503))
    @blp.response(200, ScheduleSchema)
    def post(self, id):
        """Pause a schedule (idempotent): beat fires none of its ticks"""
        return schedules.view(schedules.set_enabled(_id(id), False))


@blp.route("/schedules/<uuid_path:id>/resume")
class ScheduleResume(MethodView):
    @operation(blp, "resumeSchedule", scope="admin", errors=(404, 422, 503))
    @blp.response(200, ScheduleSchema)
    def post(self, id):
        """Resume a schedule (idempotent)

        It fires from its next tick after now; ticks missed while paused are not run.
        A one-off whose `run_at` passed while paused fires at beat's next tick.
        """
        return schedules.view(schedules.set_enabled(_id(id), True))


@blp.route("/schedules/<uuid_path:id>/run")
class ScheduleRun(MethodView):
    @operation(blp, "runSchedule", scope="admin", errors=(404, 422, 503))
    @idempotent
    @blp.response(202, ScheduleRunSchema, headers={
        "Location": {"description": "URL of the run's status", "schema": {"type": "string"}}})
    def post(self, id):
        """Run a schedule now

        One run with the schedule's task, params and options, recorded as its run
        (`schedule_id`, `scheduled_for` = now), whether paused or not; the overlap rule
        does not apply. Its trigger and `next_run_at` are unchanged.
        """
        run = schedules.run_now(_id(id), launched_by=caller())
        location = run_url(run.id)
        return ({"task_id": run.id, "schedule_id": _id(id), "status": run.status,
                 "status_url": location}, 202, {"Location": location})


def register_schedule_request(api, catalog) -> None:
    """``ScheduleCreateRequest``: one variant per task type, told apart by ``task_type``
    (as ``TaskLaunchRequest``), so a generated client gets typed params."""
    register_task_type_variants(
        api, catalog, "ScheduleCreateRequest", prefix="Schedule",
        description="A task type of the catalog, its params, launch options and one "
                    "trigger: cron (+ timezone), interval_seconds or run_at",
        variant_description="A schedule of {d.task_type}: {d.name}",
        properties=api.ma_plugin.converter.schema2jsonschema(
            ScheduleCreateSchema())["properties"],
        required=("name",))

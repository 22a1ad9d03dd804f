"""The catalog and launching: GET /tasks, POST /tasks/launch."""

from __future__ import annotations

from flask import current_app
from flask.views import MethodView

from celery_api.auth import caller
from celery_api.catalog import get_catalog
from celery_api.idempotency import idempotent
from celery_api.resources.fields import run_url
from celery_api.resources.operation import operation
from celery_api.resources.tasks.schemas import (
    AvailableTaskSchema,
    LaunchEnvelopeSchema,
    LaunchOptionsSchema,
    TaskLaunchResponseSchema,
)
from celery_api.resources.variants import register_task_type_variants
from celery_api.services import launch as launch_service
from celery_api.smorest import Blueprint

blp = Blueprint("tasks", __name__, url_prefix="/api/celery", description="Catalog and launch")

LOCATION = {"Location": {"description": "URL of the run's status",
                         "schema": {"type": "string"}}}
LAUNCH_REQUEST_BODY = {
    "required": True,
    "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/TaskLaunchRequest"}}},
}


def params_json_schema(definition) -> dict:
    api = current_app.extensions["celery_api.api"]
    return api.ma_plugin.converter.schema2jsonschema(definition.params_schema())


@blp.route("/tasks")
class TaskCatalog(MethodView):
    @operation(blp, "listTasks", scope="read", limit="read")
    @blp.response(200, AvailableTaskSchema(many=True))
    def get(self):
        """List the task types that may be launched

        Each entry carries the JSON Schema of its `params`.
        """
        return [
            {"task_type": d.task_type, "name": d.name, "description": d.description,
             "parameters": params_json_schema(d), "queue": d.queue,
             "safe_to_repeat": d.safe_to_repeat, "cache_ttl": d.cache_ttl}
            for d in get_catalog()
        ]


@blp.route("/tasks/launch")
class TaskLaunch(MethodView):
    @operation(blp, "launchTask",
               scope="launch", limit="launch", errors=(400, 413, 415, 503),
               requestBody=LAUNCH_REQUEST_BODY)
    @idempotent
    @blp.arguments(LaunchEnvelopeSchema())
    @blp.response(202, TaskLaunchResponseSchema, headers=LOCATION)
    @blp.alt_response(200, schema=TaskLaunchResponseSchema, headers=LOCATION,
                      success=True,
                      description="Answered by an identical run (result cache): no new run")
    def post(self, body):
        """Launch a task

        Validates `params` against the task type's schema, records the run and
        publishes it. Answers 202 with the status URL in `Location`. With the result
        cache (the task type's `cache_ttl`, or the launch's), an identical run in
        flight or one that succeeded within the TTL answers instead: 200, `cached: true`,
        its id and status, and no new run.
        """
        run = launch_service.launch(body["task_type"], body["params"], launch_options(body),
                                    launch_service.Lineage(launched_by=caller()), cache=True)
        location = run_url(run.id)
        return launch_response(run, location), 200 if run.cached else 202, {
            "Location": location}


def launch_options(body: dict) -> launch_service.LaunchOptions:
    return launch_service.LaunchOptions(
        priority=body.get("priority"), countdown=body.get("countdown"),
        eta=body.get("eta"), expires=body.get("expires"), queue=body.get("queue"),
        tags=body.get("tags") or [], cache_ttl=body.get("cache_ttl"),
        webhook_url=body.get("webhook_url"))


def register_launch_request(api, catalog, queues: list[str]) -> None:
    """``TaskLaunchRequest``: one variant per task type, told apart by ``task_type``.

    The wire format is the original's ``{task_type, params, ...options}``; a generated
    client gets a typed ``params`` model for each task type.
    """
    components = api.spec.components
    if "LaunchOptions" not in components.schemas:
        components.schema("LaunchOptions", schema=LaunchOptionsSchema)
    options = api.ma_plugin.converter.schema2jsonschema(LaunchOptionsSchema())
    # The queues this deployment consumes: any other is refused with a 422.
    options["properties"]["queue"] = {**options["properties"]["queue"], "enum": queues}
    register_task_type_variants(
        api, catalog, "TaskLaunchRequest", prefix="Launch",
        description="A task type of the catalog, its params, and launch options",
        variant_description="Launch {d.task_type}: {d.name}",
        properties=options["properties"],
        # LaunchOptionsSchema refuses both together.
        extra={"not": {"required": ["countdown", "eta"]}})


def launch_response(run, location: str) -> dict:
    message = (f"Task {run.task_type} answered by the identical run {run.id} ({run.status}) "
               "from the result cache" if run.cached
               else f"Task {run.task_type} queued as {run.id}")
    return {
        "success": True, "task_id": run.id, "task_type": run.task_type, "status": run.status,
        "message": message, "status_url": location, "cached": run.cached,
    }

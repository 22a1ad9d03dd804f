"""A Python client generated from /api/openapi.json (openapi-python-client) drives a live
server that requires API keys: the client sends its key (AuthenticatedClient) for the
catalog, launch with typed params, status, revoke, retry, and parses errors."""

from __future__ import annotations

import importlib
import json
import uuid

import pytest
import requests
from openapi_spec_validator import validate

from celery_api.tasks.sii_client import SANDBOX_COMPANIES
from tests.support import LiveServer, create_key, python_client, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def generated(tmp_path_factory, stack):
    folder = tmp_path_factory.mktemp("client")
    # Authentication as in production: the server refuses calls without a key.
    key = create_key(stack.app, "generated-client", "read", "launch", "control", "admin")
    api = LiveServer(stack.env(), folder / "gunicorn.log", CELERY_API_AUTH="required").start()
    spec = requests.get(f"{api.url}/api/openapi.json", timeout=5).json()
    validate(spec)  # a valid OpenAPI 3 document, or this raises
    try:
        with python_client(json.dumps(spec), folder, "celery_api_client") as package:
            yield package, api.url, key
    finally:
        api.stop()


def module(name):
    return importlib.import_module(f"celery_api_client.{name}")


@pytest.mark.parametrize("stack", [("redis", "sqlite")], indirect=True, ids=["redis-sqlite"])
def test_generated_client_runs_the_whole_flow(stack, generated):
    package, url, key = generated
    client = package.AuthenticatedClient(base_url=url, token=key,
                                         raise_on_unexpected_status=True)
    models = module("models")
    list_tasks = module("api.tasks.list_tasks")
    launch_task = module("api.tasks.launch_task")
    get_status = module("api.status.get_task_status")
    revoke_task = module("api.status.revoke_task")
    retry_task = module("api.status.retry_task")

    anonymous = list_tasks.sync(client=package.Client(base_url=url,
                                                      raise_on_unexpected_status=True))
    assert isinstance(anonymous, models.Problem) and anonymous.status == 401

    catalog = list_tasks.sync(client=client)
    assert "sii.sync_documents" in {entry.task_type for entry in catalog}

    body = models.LaunchSiiSyncDocuments(
        task_type=models.LaunchSiiSyncDocumentsTaskType("sii.sync_documents"),
        params=models.SyncDocumentsParams(company_id=uuid.UUID(SANDBOX_COMPANIES[0]), months=2),
        tags=["generated-client"])
    launched = launch_task.sync(client=client, body=body)
    assert isinstance(launched, models.TaskLaunchResponse) and launched.status == "PENDING"

    def finished():
        status = get_status.sync(uuid.UUID(launched.task_id), client=client)
        return status if status.status == "SUCCESS" else None

    done = wait_for(finished, timeout=60, interval=0.2, message="SUCCESS via the client")
    assert done.result["compras"]["total"] >= 0 and done.task_type == "sii.sync_documents"

    # The event stream, as the client reads it: its text (an object schema made the
    # client parse the stream as JSON and raise on every 200).
    stream_events = module("api.status.stream_task_events")
    streamed = stream_events.sync_detailed(uuid.UUID(launched.task_id), client=client)
    assert streamed.status_code == 200 and isinstance(streamed.parsed, str)
    assert streamed.parsed.startswith("retry: 1000\n\n"), streamed.parsed[:200]
    data = [line[len("data: "):] for line in streamed.parsed.splitlines()
            if line.startswith("data: ")]
    assert json.loads(data[-1])["status"] == "SUCCESS"

    later = launch_task.sync(client=client, body=models.LaunchSiiSyncF29(
        task_type=models.LaunchSiiSyncF29TaskType("sii.sync_f29"),
        params=models.SyncF29Params(company_id=uuid.UUID(SANDBOX_COMPANIES[1])),
        countdown=600))
    revoked = revoke_task.sync(uuid.UUID(later.task_id), client=client, reason="not needed")
    assert isinstance(revoked, models.RevokeResponse) and revoked.status == "REVOKED"

    boom = launch_task.sync(client=client, body=models.LaunchAcmeBoom(
        task_type=models.LaunchAcmeBoomTaskType("acme.boom")))
    wait_for(lambda: get_status.sync(uuid.UUID(boom.task_id), client=client).status
             == "FAILURE", timeout=60, message="FAILURE via the client")
    retried = retry_task.sync(uuid.UUID(boom.task_id), client=client)
    assert isinstance(retried, models.TaskLaunchResponse) and retried.task_id != boom.task_id

    problem = get_status.sync(uuid.uuid4(), client=client)
    assert isinstance(problem, models.Problem) and problem.status == 404 and problem.detail
    conflict = retry_task.sync(uuid.UUID(launched.task_id), client=client)
    assert isinstance(conflict, models.Problem) and conflict.status == 409
    invalid = launch_task.sync(client=client, body=models.LaunchSiiSyncDocuments.from_dict(
        {"task_type": "sii.sync_documents", "params": {"company_id": SANDBOX_COMPANIES[0],
                                                        "months": 13}}))
    assert isinstance(invalid, models.Problem) and invalid.status == 422
    assert "months" in invalid.detail


@pytest.mark.parametrize("stack", [("redis", "sqlite")], indirect=True, ids=["redis-sqlite"])
def test_generated_client_manages_schedules(stack, generated):
    """Schedules through the generated client: typed create (one variant per task type,
    like launches), get, pause, run now (a run of the schedule), delete."""
    package, url, key = generated
    client = package.AuthenticatedClient(base_url=url, token=key,
                                         raise_on_unexpected_status=True)
    models = module("models")
    schedules = {name: module(f"api.schedules.{name}") for name in (
        "create_schedule", "get_schedule", "pause_schedule", "run_schedule",
        "delete_schedule", "list_schedules")}
    get_status = module("api.status.get_task_status")

    created = schedules["create_schedule"].sync(client=client, body=models.ScheduleSiiSyncF29(
        task_type=models.ScheduleSiiSyncF29TaskType("sii.sync_f29"),
        name=f"f29-{uuid.uuid4().hex[:8]}",
        params=models.SyncF29Params(company_id=uuid.UUID(SANDBOX_COMPANIES[0])),
        cron="0 6 13 * *", timezone="America/Santiago"))
    assert isinstance(created, models.Schedule), created
    assert created.enabled and created.next_run_at is not None and created.runs_fired == 0
    schedule_id = uuid.UUID(created.id)
    assert schedules["get_schedule"].sync(schedule_id, client=client).name == created.name
    paused = schedules["pause_schedule"].sync(schedule_id, client=client)
    assert isinstance(paused, models.Schedule) and paused.enabled is False
    ran = schedules["run_schedule"].sync(schedule_id, client=client)
    assert isinstance(ran, models.ScheduleRun) and ran.schedule_id == created.id
    status = get_status.sync(uuid.UUID(ran.task_id), client=client)
    assert status.schedule_id == created.id and status.scheduled_for is not None
    listed = schedules["list_schedules"].sync(client=client)
    assert created.id in {item.id for item in listed.items}
    schedules["delete_schedule"].sync(schedule_id, client=client)
    missing = schedules["get_schedule"].sync(schedule_id, client=client)
    assert isinstance(missing, models.Problem) and missing.status == 404

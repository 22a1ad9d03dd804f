"""The HTTP contract with the Flask test client: shapes, codes and every bad input."""

from __future__ import annotations

import logging
import uuid

import pytest

from celery_api.extensions import db
from celery_api.models import TaskRun
from celery_api.tasks.sii_client import SANDBOX_COMPANIES
from tests.support import assert_problem, stored_run

COMPANY = SANDBOX_COMPANIES[0]


def launch(client, task_type="sii.sync_documents", params=None, **options):
    body = {"task_type": task_type, "params": params if params is not None else
            {"company_id": COMPANY}}
    body.update(options)
    return client.post("/api/celery/tasks/launch", json=body)


def test_factory_applies_overrides(tmp_path, redis_server):
    from celery_api import create_app

    app = create_app({"INSTANCE_PATH": tmp_path, "CELERY": {"broker_url": redis_server.url},
                      "INSPECT_TIMEOUT": 0.25})
    assert app.config["INSPECT_TIMEOUT"] == 0.25
    assert app.config["CELERY"]["broker_url"] == redis_server.url
    # The other Celery keys survive a partial override.
    assert app.config["CELERY"]["result_extended"] is True
    assert app.extensions["celery"].conf.broker_url == redis_server.url



def test_ensure_sync_is_asked_once_per_function(client, app, monkeypatch):
    """celery_api.App answers Flask's per-request ``ensure_sync`` from what it found the
    first time (methods by their function: a view's instance is new per request); a
    coroutine function still goes through Flask's own ``ensure_sync``."""
    import inspect

    import celery_api

    asked = []
    monkeypatch.setattr(celery_api, "iscoroutinefunction",
                        lambda func: asked.append(func) or inspect.iscoroutinefunction(func))
    app._is_coroutine.cache_clear()
    assert client.get("/api/celery/tasks").status_code == 200
    first = len(asked)
    assert first > 0
    assert client.get("/api/celery/tasks").status_code == 200
    assert len(asked) == first, asked[first:]  # the second request asked nothing

    def plain():
        return None

    async def coroutine():
        return None

    assert app.ensure_sync(plain) is plain
    with pytest.raises(RuntimeError, match="async"):  # Flask's own answer, no asgiref
        app.ensure_sync(coroutine)


def test_list_tasks(client):
    response = client.get("/api/celery/tasks")
    assert response.status_code == 200
    tasks = {t["task_type"]: t for t in response.get_json()}
    assert {"sii.sync_documents", "sii.sync_documents_all_companies", "sii.sync_f29",
            "sii.sync_f29_all_companies", "acme.add"} <= tasks.keys()
    docs = tasks["sii.sync_documents"]
    assert docs["name"] and docs["description"]
    schema = docs["parameters"]
    assert schema["required"] == ["company_id"]
    assert schema["properties"]["company_id"]["format"] == "uuid"
    assert schema["properties"]["months"] == {
        "type": "integer", "minimum": 1, "maximum": 12, "default": 1,
        "description": "How many months to sync, 1 to 12"}
    assert schema["properties"]["month_offset"]["minimum"] == 0
    assert "required" not in tasks["sii.sync_f29_all_companies"]["parameters"]


def test_launch_records_and_answers_202(client, app, caplog):
    caplog.set_level(logging.INFO)
    response = launch(client, params={"company_id": COMPANY, "months": 2})
    assert response.status_code == 202
    body = response.get_json()
    assert body["success"] is True
    assert body["task_type"] == "sii.sync_documents"
    assert body["status"] == "PENDING"
    uuid.UUID(body["task_id"])
    assert response.headers["Location"] == f"/api/celery/tasks/{body['task_id']}"
    with app.app_context():
        run = db.session.get(TaskRun, body["task_id"])
        assert run.status == "PENDING"
        assert run.params == {"company_id": COMPANY, "months": 2, "month_offset": 0}
        assert run.root_id == run.id and run.company_id == COMPANY
    assert any("📤" in r.message and body["task_id"] in r.message for r in caplog.records)
    status = client.get(response.headers["Location"])
    assert status.status_code == 200
    assert status.get_json()["status"] == "PENDING"
    assert any("📊" in r.message and body["task_id"] in r.message for r in caplog.records)


def test_launch_applies_defaults_for_f29(client, app):
    from datetime import date

    body = launch(client, "sii.sync_f29").get_json()
    with app.app_context():
        assert db.session.get(TaskRun, body["task_id"]).params == {
            "company_id": COMPANY, "year": str(date.today().year)}


def test_malformed_json_is_400(client):
    response = client.post("/api/celery/tasks/launch", data=b'{"task_type": ',
                           content_type="application/json")
    assert_problem(response, 400, "not valid JSON")


def test_non_utf8_body_is_400(client):
    response = client.post("/api/celery/tasks/launch", data=b'{"task_type": "\xff\xfe"}',
                           content_type="application/json")
    assert_problem(response, 400)


def test_unknown_task_type_is_400(client):
    body = assert_problem(launch(client, "sii.nope"), 400, "sii.nope", "sii.sync_documents")
    assert "Known task types" in body["detail"]


@pytest.mark.parametrize(("params", "field"), [
    ({}, "company_id"),
    ({"company_id": "not-a-uuid"}, "company_id"),
    ({"company_id": COMPANY, "months": 0}, "months"),
    ({"company_id": COMPANY, "months": 13}, "months"),
    ({"company_id": COMPANY, "months": "three"}, "months"),
    ({"company_id": COMPANY, "month_offset": -1}, "month_offset"),
    ({"company_id": COMPANY, "colour": "blue"}, "colour"),
])
def test_invalid_params_are_422_with_field_errors(client, params, field):
    body = assert_problem(launch(client, params=params), 422, f"params.{field}")
    assert field in body["errors"]["json"]["params"]


@pytest.mark.parametrize("year", ["25", "2O25", "1999", "3000", 2025])
def test_invalid_year_is_422(client, year):
    assert_problem(launch(client, "sii.sync_f29", {"company_id": COMPANY, "year": year}), 422,
                   "params.year")


@pytest.mark.parametrize(("body", "field"), [
    ({"params": {}}, "task_type"),
    ({"task_type": "sii.sync_documents", "params": [1]}, "params"),
    ({"task_type": 7}, "task_type"),
    ({"task_type": "sii.sync_documents", "surprise": 1}, "surprise"),
    ({"task_type": "sii.sync_documents", "priority": 10}, "priority"),
    ({"task_type": "sii.sync_documents", "countdown": -1}, "countdown"),
    ({"task_type": "sii.sync_documents", "countdown": 5, "eta": "2030-01-01T00:00:00Z"}, "eta"),
    ({"task_type": "sii.sync_documents", "eta": "tomorrow"}, "eta"),
    ({"task_type": "sii.sync_documents", "expires": True}, "expires"),
    ({"task_type": "sii.sync_documents", "queue": "bad queue!"}, "queue"),
    ({"task_type": "sii.sync_documents", "tags": ["x" * 65]}, "tags"),
])
def test_invalid_request_bodies_are_422(client, body, field):
    response = client.post("/api/celery/tasks/launch", json=body)
    problem = assert_problem(response, 422, field)
    assert field in problem["errors"]["json"]


def test_unknown_queue_is_422(client):
    problem = assert_problem(
        launch(client, queue="nobody-listens"), 422, "nobody-listens", "celery")
    assert "queue" in problem["errors"]["json"]


def test_launch_options_are_recorded(client, app):
    response = launch(client, priority=3, countdown=60, queue="parked", tags=["nightly"],
                      expires=3600)
    assert response.status_code == 202
    with app.app_context():
        run = db.session.get(TaskRun, response.get_json()["task_id"])
        assert (run.priority, run.queue, run.tags) == (3, "parked", ["nightly"])


def test_wrong_content_type_is_415(client):
    response = client.post("/api/celery/tasks/launch", data="task_type=sii.sync_documents",
                           content_type="application/x-www-form-urlencoded")
    assert_problem(response, 415, "application/json")


def test_oversized_body_is_413(client):
    huge = {"task_type": "sii.sync_documents", "params": {"company_id": "x" * 2_000_000}}
    assert_problem(client.post("/api/celery/tasks/launch", json=huge), 413)


def test_method_not_allowed_keeps_allow_header(client):
    response = client.put("/api/celery/tasks/launch", json={})
    assert_problem(response, 405)
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize("method", ["get", "delete"])
def test_non_uuid_task_id_is_422(client, method):
    response = getattr(client, method)("/api/celery/tasks/not-a-uuid")
    body = assert_problem(response, 422, "UUID", "not-a-uuid")
    assert body["errors"] == {"path": {"task_id": ["Not a valid UUID."]}}


def test_non_uuid_retry_is_422(client):
    assert_problem(client.post("/api/celery/tasks/1%20OR%201=1/retry"), 422, "UUID")


def test_path_traversal_is_a_404_problem(client):
    assert_problem(client.post("/api/celery/tasks/..%2F..%2Fetc/retry"), 404)


@pytest.mark.parametrize("call", [
    lambda c, i: c.get(f"/api/celery/tasks/{i}"),
    lambda c, i: c.delete(f"/api/celery/tasks/{i}"),
    lambda c, i: c.post(f"/api/celery/tasks/{i}/retry"),
])
def test_unknown_task_id_is_404(client, call):
    unknown = str(uuid.uuid4())
    assert_problem(call(client, unknown), 404, unknown)


@pytest.mark.parametrize("status", ["SUCCESS", "FAILURE", "REVOKED"])
def test_revoke_finished_is_409(client, app, status):
    task_id = stored_run(app, status)
    assert_problem(client.delete(f"/api/celery/tasks/{task_id}"), 409, status)


def test_revoke_bad_signal_is_422(client, app):
    task_id = stored_run(app, "PENDING")
    assert_problem(client.delete(f"/api/celery/tasks/{task_id}?signal=SIGNOPE"), 422, "signal")


@pytest.mark.parametrize("status", ["PENDING", "STARTED", "SUCCESS"])
def test_retry_of_unfinished_or_successful_run_is_409(client, app, status):
    task_id = stored_run(app, status)
    assert_problem(client.post(f"/api/celery/tasks/{task_id}/retry"), 409, "FAILURE or REVOKED")


def test_retry_of_failed_run_links_new_run(client, app):
    task_id = stored_run(app, "FAILURE", error="boom")
    response = client.post(f"/api/celery/tasks/{task_id}/retry")
    assert response.status_code == 202
    new_id = response.get_json()["task_id"]
    assert new_id != task_id
    new = client.get(f"/api/celery/tasks/{new_id}").get_json()
    assert new["retry_of"] == task_id and new["root_id"] == task_id
    assert new["params"] == {"company_id": COMPANY, "months": 1, "month_offset": 0}
    assert client.get(f"/api/celery/tasks/{task_id}").get_json()["retried_as"] == [new_id]


def test_stats_without_workers_answers_and_says_so(client):
    response = client.get("/api/celery/stats")
    assert response.status_code == 200
    body = response.get_json()
    assert body["workers_online"] == []
    assert "No worker answered" in body["note"]
    # Bounded by the inspect timeout (how long it took is reported, not asserted).
    assert body["inspect_timeout"] == 0.5 and body["collected_in_seconds"] >= 0
    assert set(body) >= {"active_tasks", "scheduled_tasks", "registered_tasks", "worker_stats",
                         "queues"}
    assert "celery" in body["queues"] and "webhooks" in body["queues"]


def test_openapi_document(client):
    spec = client.get("/api/openapi.json").get_json()
    operations = [op for path in spec["paths"].values() for op in path.values()
                  if isinstance(op, dict) and "responses" in op]
    ids = {op["operationId"] for op in operations}
    assert {"listTasks", "launchTask", "getTaskStatus", "revokeTask", "retryTask",
            "getStats"} <= ids
    assert len(ids) == len(operations)
    problem = spec["components"]["responses"]["NOT_FOUND"]["content"]
    assert "application/problem+json" in problem
    assert "detail" in spec["components"]["schemas"]["Problem"]["required"]
    launch_op = spec["paths"]["/api/celery/tasks/launch"]["post"]
    assert {"202", "400", "422", "503"} <= launch_op["responses"].keys()
    assert "SyncDocumentsParams" in spec["components"]["schemas"]
    assert "AddParams" in spec["components"]["schemas"]
    request = spec["components"]["schemas"]["TaskLaunchRequest"]
    assert request["discriminator"]["propertyName"] == "task_type"
    assert request["discriminator"]["mapping"]["sii.sync_documents"] == \
        "#/components/schemas/LaunchSiiSyncDocuments"
    variant = spec["components"]["schemas"]["LaunchSiiSyncDocuments"]
    assert variant["properties"]["params"] == {"$ref": "#/components/schemas/SyncDocumentsParams"}
    assert variant["required"] == ["task_type", "params"]
    assert launch_op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TaskLaunchRequest"}
    error_responses = {response["$ref"].rsplit("/", 1)[1] for op in operations
                       for code, response in op["responses"].items()
                       if code.startswith(("4", "5")) and "$ref" in response}
    assert {"BAD_REQUEST", "NOT_FOUND"} <= error_responses
    for name in error_responses:
        assert "application/problem+json" in spec["components"]["responses"][name]["content"]
    from openapi_spec_validator import validate

    validate(spec)


def test_docs_page_needs_no_cdn(client):
    page = client.get("/api/docs/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "/api/openapi.json" in html
    assert "https://" not in html and "http://" not in html.replace("http://localhost", "")
    asset = client.get("/api/docs/swagger-ui-bundle.js")
    assert asset.status_code == 200 and len(asset.data) > 100_000


def test_unknown_query_parameter_is_422(client, app):
    task_id = stored_run(app, "PENDING")
    problem = assert_problem(client.delete(f"/api/celery/tasks/{task_id}?terminat=true"), 422,
                             "terminat")
    assert "terminat" in problem["errors"]["query"]


def test_deeply_nested_json_is_400(client):
    nested = b'{"task_type": "sii.sync_documents", "params": ' + b"[" * 100_000 + \
        b"]" * 100_000 + b"}"
    assert_problem(client.post("/api/celery/tasks/launch", data=nested,
                               content_type="application/json"), 400, "nested too deeply")


def test_huge_string_in_params_is_422_without_echoing_it(client):
    response = launch(client, params={"company_id": "x" * 900_000})
    assert_problem(response, 422, "params.company_id")
    assert len(response.get_data()) < 2000


@pytest.mark.parametrize("path", [
    "/api/celery/tasks/'%20OR%201=1--", "/api/celery/tasks/%00", "/api/celery/tasks/..",
])
def test_hostile_task_ids_are_422(client, path):
    # Not a UUID: 422 with the path error, as every malformed task id (see the README).
    body = assert_problem(client.get(path), 422, "must be a UUID")
    assert "task_id" in body["errors"]["path"]


def test_openapi_document_states_what_the_server_enforces(client):
    """Issue 11 item 7: the constraints the server checks are in the document (and
    tests/test_fuzz.py runs schemathesis' positive_data_acceptance against it)."""
    import re

    from celery_api.resources.fields import DATETIME_PATTERN
    from celery_api.smorest import NO_NUL_PATTERN

    spec = client.get("/api/openapi.json").get_json()
    paths, schemas = spec["paths"], spec["components"]["schemas"]

    def parameter(path, method, name):
        for p in paths[path].get(method, {}).get("parameters", []) + \
                paths[path].get("parameters", []):
            if p["name"] == name:
                return p["schema"]
        raise AssertionError(f"{method} {path}: no {name}")

    for path, name in (("/api/celery/tasks/{task_id}", "task_id"),
                       ("/api/celery/batches/{batch_id}", "batch_id")):
        assert parameter(path, "get", name) == {"type": "string", "format": "uuid"}
    for path in ("/api/celery/tasks/{task_id}", "/api/celery/batches/{batch_id}"):
        assert parameter(path, "delete", "reason") == {
            "type": "string", "maxLength": 500, "pattern": NO_NUL_PATTERN}
    history = "/api/celery/history"
    assert parameter(history, "get", "tag") == {
        "type": "string", "minLength": 1, "maxLength": 64, "pattern": NO_NUL_PATTERN}
    assert parameter(history, "get", "task_type")["items"]["pattern"] == NO_NUL_PATTERN
    assert parameter(history, "get", "cursor")["pattern"] == "^[A-Za-z0-9_-]+$"
    for name in ("created_after", "created_before", "finished_after", "finished_before"):
        assert parameter(history, "get", name) == {
            "type": "string", "format": "date-time", "pattern": DATETIME_PATTERN}
    variant = schemas["LaunchAcmeCount"]
    assert variant["not"] == {"required": ["countdown", "eta"]}
    options = variant["properties"]
    assert options["tags"]["items"] == {"type": "string", "minLength": 1, "maxLength": 64,
                                        "pattern": NO_NUL_PATTERN}
    assert options["eta"]["pattern"] == DATETIME_PATTERN
    assert options["expires"]["oneOf"][0] == {"type": "number", "minimum": 0,
                                              "exclusiveMinimum": True, "maximum": 31536000}
    assert options["expires"]["oneOf"][1]["pattern"] == DATETIME_PATTERN
    assert options["priority"] == {**options["priority"], "type": "integer", "minimum": 0,
                                   "maximum": 9}
    # Task params (the catalog's own schemas) carry the NUL rule too.
    assert schemas["CountParams"]["properties"]["key"]["pattern"] == NO_NUL_PATTERN
    # Responses do not: a worker may record any text.
    assert "pattern" not in schemas["TaskStatusResponse"]["properties"]["error"]
    catalog = {t["task_type"]: t for t in client.get("/api/celery/tasks").get_json()}
    assert catalog["acme.count"]["parameters"]["properties"]["key"]["pattern"] == \
        NO_NUL_PATTERN

    # The patterns say what the server does, in both directions.
    nul = re.compile(NO_NUL_PATTERN)
    assert nul.search("ñandú 🚀 \x01") and not nul.search("a\x00b")
    years = re.compile(DATETIME_PATTERN)
    for year in range(0, 10000):
        written = f"{year:04d}-06-15T12:00:00Z"
        accepted = launch(client, "acme.add", {"a": 1, "b": 2}, eta=written,
                          queue="parked").status_code == 202 if year in (
            0, 1, 2, 3, 10, 999, 1000, 2025, 9997, 9998, 9999) else None
        assert bool(years.search(written)) == (2 <= year <= 9998), written
        if accepted is not None:
            assert accepted == (2 <= year <= 9998), written


@pytest.mark.parametrize(("params", "field"), [
    ({"company_id": COMPANY, "months": 2.5}, "months"),
    ({"company_id": COMPANY, "months": "2"}, "months"),
    ({"company_id": COMPANY, "month_offset": 1e-42}, "month_offset"),
])
def test_integer_params_are_integers(client, params, field):
    """An "integer" in the document is one on the wire: 2.5 was truncated to 2."""
    assert_problem(launch(client, params=params), 422, f"params.{field}")


@pytest.mark.parametrize("priority", [2.5, "2", 1e-42])
def test_priority_is_an_integer(client, priority):
    assert_problem(launch(client, priority=priority), 422, "priority")

"""What generated clients rely on (issue 13): typed response schemas (progress, required
fields, the TaskStatus enum, no ``nullable`` without ``type``), the original's other
paths (GET .../status, POST .../cancel) as deprecated aliases, trailing slashes, and a
404 for an unknown route that does not read like an unknown task's.

The TypeScript client is in tests/test_ts_client.py; the Python one in
tests/test_generated_client.py."""

from __future__ import annotations

import uuid

import pytest

from celery_api.extensions import db
from celery_api.models import TaskRun
from celery_api.resources.fields import STATES
from celery_api.services import runstate
from tests.support import assert_problem, python_client, stored_run

BASE = "/api/celery"
PROGRESS = {"current": 2, "total": 8, "percent": 25.0, "message": "compras 202501"}
# Every field of these responses is always sent (null where it may be).
ALWAYS_SENT = ("TaskStatusResponse", "TaskLaunchResponse", "HistoryRow", "HistoryPage",
               "BatchResponse", "BatchSummary", "RevokeResponse", "AvailableTask")


@pytest.fixture(scope="module")
def spec(app):
    return app.test_client().get("/api/openapi.json").get_json()


def schemas(spec):
    return spec["components"]["schemas"]


def walk(node, path=()):
    """Every schema-like mapping in ``node`` with its path."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, (*path, index))


# 1. Typed schemas.

def test_no_nullable_without_a_type_anywhere(spec):
    # OpenAPI 3.0 ignores it, and strict validators (ajv) refuse it.
    wrong = ["/".join(map(str, path)) for path, node in walk(spec)
             if "nullable" in node and "type" not in node]
    assert wrong == []


def test_no_untyped_anyof_object_branch(spec):
    # apispec's nullable Nested (anyOf: [{type: object, nullable: true}, {$ref}]) makes
    # an untyped model in openapi-python-client and `unknown` in TypeScript.
    wrong = ["/".join(map(str, path)) for path, node in walk(spec)
             for key in ("anyOf", "oneOf") if isinstance(node.get(key), list)
             and {"type": "object", "nullable": True} in node[key]]
    assert wrong == []


def test_progress_is_a_typed_nullable_object(spec):
    progress = schemas(spec)["TaskStatusResponse"]["properties"]["progress"]
    assert progress["type"] == "object" and progress["nullable"] is True
    assert set(progress["properties"]) == {"current", "total", "percent", "message"}
    assert set(progress["required"]) == set(progress["properties"])
    assert progress["properties"]["percent"] == {
        "type": "number", "nullable": True, "description": "0 to 100"}
    # The same shape is the Progress component (a named type for clients).
    named = schemas(spec)["Progress"]
    assert {k: v for k, v in progress.items() if k not in ("nullable", "description")} == named


@pytest.mark.parametrize("name", ALWAYS_SENT)
def test_fields_the_server_always_sends_are_required(spec, name):
    schema = schemas(spec)[name]
    assert set(schema["required"]) == set(schema["properties"])


@pytest.mark.parametrize(("name", "optional"), [
    ("Stats", {"note"}),  # only when no worker answered
    # instance: not in the problems nginx and the gunicorn edge write; errors: 422 only
    ("Problem", {"instance", "errors"}),
])
def test_fields_always_sent_are_required_and_the_others_are_named(spec, name, optional):
    schema = schemas(spec)[name]
    assert set(schema["required"]) == set(schema["properties"]) - optional


def test_responses_are_open_to_fields_added_later_and_requests_are_not(spec):
    """A response component (and any object inside one) leaves additionalProperties
    unsaid: a field a later version adds must not break a client (openapi-generator's
    Java client throws on a field the document forbids). Request bodies keep false:
    an unknown field there is a 422."""
    every = schemas(spec)

    def closed(node) -> list:
        if isinstance(node, dict):
            return ([node] if node.get("additionalProperties") is False else []) + [
                n for value in node.values() for n in closed(value)]
        if isinstance(node, list):
            return [n for value in node for n in closed(value)]
        return []

    for name in ("TaskStatusResponse", "TaskLaunchResponse", "HistoryPage", "HistoryRow",
                 "Stats", "Problem", "Schedule", "Webhook", "Progress", "BatchResponse"):
        assert closed(every[name]) == [], name
    for name in ("LaunchOptions", "LaunchSiiSyncDocuments", "SyncDocumentsParams",
                 "WebhookCreate"):
        assert every[name].get("additionalProperties") is False, (name, every[name])


def test_status_is_the_task_status_enum(spec):
    assert set(STATES) == runstate.ALL
    assert schemas(spec)["TaskStatus"] == {
        "type": "string", "enum": list(STATES),
        "description": schemas(spec)["TaskStatus"]["description"]}
    for name in ("TaskStatusResponse", "TaskLaunchResponse", "HistoryRow", "RevokeResponse"):
        assert schemas(spec)[name]["properties"]["status"] == {
            "$ref": "#/components/schemas/TaskStatus"}, name


def test_status_body_matches_the_document(app, client, spec):
    """A real answer has every required field, progress typed, status in the enum."""
    from openapi_schema_validator import OAS30Validator

    task_id = stored_run(app, "PROGRESS", meta=dict(PROGRESS), started_at=None)
    body = client.get(f"{BASE}/tasks/{task_id}").get_json()
    assert body["progress"] == PROGRESS
    document = {**schemas(spec)["TaskStatusResponse"], "components": spec["components"]}
    OAS30Validator(document).validate(body)
    queued = client.get(f"{BASE}/tasks/{stored_run(app, 'PENDING')}").get_json()
    assert queued["progress"] is None and queued["children"] == [] and queued["tags"] == []
    OAS30Validator(document).validate(queued)


def test_a_custom_state_is_shown_as_started(app, client):
    # A deployment's task may call update_state(state="CRUNCHING"): the enum holds.
    task_id = stored_run(app, "CRUNCHING")
    assert client.get(f"{BASE}/tasks/{task_id}").get_json()["status"] == "STARTED"
    with app.app_context():
        row = client.get(f"{BASE}/history", query_string={"limit": 200}).get_json()
    shown = {item["task_id"]: item["status"] for item in row["items"]}
    assert shown[task_id] == "STARTED"


def test_python_client_reads_progress_typed(tmp_path, app, client, spec):
    """openapi-python-client builds a model for progress (``progress.percent``)."""
    import importlib
    import json

    with python_client(json.dumps(spec), tmp_path, "typed_client"):
        models = importlib.import_module("typed_client.models")
        task_id = stored_run(app, "PROGRESS", meta=dict(PROGRESS))
        status = models.TaskStatusResponse.from_dict(
            client.get(f"{BASE}/tasks/{task_id}").get_json())
        assert status.progress.percent == 25.0 and status.progress.message == PROGRESS["message"]
        assert status.status == models.TaskStatus.PROGRESS
        queued = models.TaskStatusResponse.from_dict(
            client.get(f"{BASE}/tasks/{stored_run(app, 'PENDING')}").get_json())
        assert queued.progress is None and queued.children == []


# 3. The original's other consumers.

def test_legacy_aliases_are_documented_deprecated_with_scopes(spec):
    status = spec["paths"][f"{BASE}/tasks/{{task_id}}/status"]["get"]
    cancel = spec["paths"][f"{BASE}/tasks/{{task_id}}/cancel"]["post"]
    assert status["operationId"] == "getTaskStatusLegacy" and status["deprecated"] is True
    assert cancel["operationId"] == "cancelTaskLegacy" and cancel["deprecated"] is True
    assert status["x-required-scope"] == "read" and cancel["x-required-scope"] == "control"
    current = spec["paths"][f"{BASE}/tasks/{{task_id}}"]
    assert "deprecated" not in current["get"] and "deprecated" not in current["delete"]
    assert (status["responses"]["200"]["content"]
            == current["get"]["responses"]["200"]["content"])
    query = {p["name"] for p in cancel["parameters"] if p["in"] == "query"}
    assert query == {"terminate", "signal", "reason"}
    assert cancel["requestBody"]["required"] is False
    body = cancel["requestBody"]["content"]["application/json"]["schema"]
    assert set(schemas(spec)[body["$ref"].rsplit("/", 1)[1]]["properties"]) == query


def test_legacy_status_answers_as_get_task(app, client):
    task_id = stored_run(app, "PROGRESS", meta=dict(PROGRESS))
    legacy = client.get(f"{BASE}/tasks/{task_id}/status")
    assert legacy.status_code == 200
    assert legacy.get_json() == client.get(f"{BASE}/tasks/{task_id}").get_json()
    assert_problem(client.get(f"{BASE}/tasks/{uuid.uuid4()}/status"), 404, "No task with id")
    assert_problem(client.get(f"{BASE}/tasks/not-a-uuid/status"), 422, "task_id")


def test_legacy_cancel_revokes_a_queued_run(app, client):
    task_id = stored_run(app, "PENDING")
    response = client.post(f"{BASE}/tasks/{task_id}/cancel")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json() == {
        "task_id": task_id, "status": "REVOKED", "terminate": False,
        "message": f"Task {task_id} revoked before it ran."}
    with app.app_context():
        assert db.session.get(TaskRun, task_id).status == "REVOKED"
        db.session.remove()
    # Finished now: 409, as DELETE answers.
    assert_problem(client.post(f"{BASE}/tasks/{task_id}/cancel"), 409, "already finished")
    assert_problem(client.post(f"{BASE}/tasks/{uuid.uuid4()}/cancel"), 404, "No task with id")


@pytest.mark.parametrize("how", ["query", "json"])
def test_legacy_cancel_takes_the_arguments_of_delete(app, client, how):
    task_id = stored_run(app, "PENDING")
    args = {"reason": "no longer needed"}
    response = (client.post(f"{BASE}/tasks/{task_id}/cancel", query_string=args)
                if how == "query" else client.post(f"{BASE}/tasks/{task_id}/cancel", json=args))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["message"].endswith(": no longer needed.")
    with app.app_context():
        assert db.session.get(TaskRun, task_id).error == "revoked: no longer needed"
        db.session.remove()


def test_legacy_cancel_refuses_bad_arguments_and_the_body_wins(app, client):
    task_id = stored_run(app, "PENDING")
    url = f"{BASE}/tasks/{task_id}/cancel"
    assert_problem(client.post(url, json={"signal": "SIGNOPE"}), 422, "signal")
    assert_problem(client.post(url, json={"nope": 1}), 422, "nope")
    assert_problem(client.post(url, query_string={"nope": 1}), 422, "nope")
    assert_problem(client.post(url, data="reason=x"), 415)
    with app.app_context():
        assert db.session.get(TaskRun, task_id).status == "PENDING"
        db.session.remove()
    response = client.post(url, query_string={"reason": "query"}, json={"reason": "body"})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["message"].endswith(": body.")


# Trailing slashes and unknown routes.

@pytest.mark.parametrize("method, path, target", [
    ("GET", "/tasks/", "/tasks"),
    ("GET", "/history/?limit=5&status=SUCCESS", "/history?limit=5&status=SUCCESS"),
    ("POST", "/tasks/launch/", "/tasks/launch"),
    ("GET", "/tasks/550e8400-e29b-41d4-a716-446655440000/", "/tasks/"
                                                            "550e8400-e29b-41d4-a716-446655440000"),
    ("DELETE", "/tasks/550e8400-e29b-41d4-a716-446655440000//",
     "/tasks/550e8400-e29b-41d4-a716-446655440000"),
])
def test_a_trailing_slash_redirects_keeping_method_and_body(client, method, path, target):
    response = client.open(BASE + path, method=method, json={"x": 1} if method == "POST"
                           else None, headers={"Host": "evil.example"})
    assert response.status_code == 308, response.get_data(as_text=True)
    # Relative, from the path alone: never from the Host header.
    assert response.headers["Location"] == BASE + target


def test_a_trailing_slash_redirect_is_followed(client):
    response = client.get(f"{BASE}/tasks/", follow_redirects=True)
    assert response.status_code == 200 and isinstance(response.get_json(), list)


@pytest.mark.parametrize("path", ["//evil.example/", f"{BASE}/nothing/", f"{BASE}//tasks/",
                                  "/", "/api//celery/tasks", f"{BASE}/tasks/%2e%2e%2f/status",
                                  f"{BASE}//tasks"])
def test_no_redirect_but_to_a_route(client, path):
    """Only a trailing slash is redirected: "//" inside a path is no route (werkzeug
    merged it with a text/plain 308, following "%2e%2e%2f" up to "../")."""
    response = client.get(path)
    assert response.status_code == 404 and "Location" not in response.headers
    assert response.mimetype == "application/problem+json"


@pytest.mark.parametrize("method, path", [
    ("GET", f"{BASE}/task/550e8400-e29b-41d4-a716-446655440000/state"),
    ("POST", f"{BASE}/tasks/550e8400-e29b-41d4-a716-446655440000/abort"),
    ("GET", "/api/celery/nothing"),
])
def test_an_unknown_route_is_not_an_unknown_task(client, method, path):
    body = assert_problem(client.open(path, method=method), 404, "No such route",
                          f"{method} {path}", "/api/docs")
    assert "task" not in body["detail"].replace(path, "").lower()
    unknown_task = assert_problem(client.get(f"{BASE}/tasks/{uuid.uuid4()}"), 404)
    assert "No such route" not in unknown_task["detail"]


def test_an_unknown_route_echoes_a_bounded_path(client):
    body = assert_problem(client.get(f"{BASE}/{'x' * 5000}"), 404, "No such route")
    assert len(body["detail"]) < 400


def test_a_websocket_upgrade_is_told_what_to_do(client):
    """werkzeug refuses a websocket request to an HTTP route with its generic 400
    ("The browser (or proxy) sent a request..."): the detail says what to send."""
    body = assert_problem(client.get(f"{BASE}/tasks", headers={
        "Upgrade": "websocket", "Connection": "Upgrade"}), 400, "does not speak WebSocket",
        "/events")
    assert "browser (or proxy)" not in body["detail"]

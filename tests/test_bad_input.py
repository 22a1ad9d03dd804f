"""Bad bytes and edge dates (issue 10), on SQLite and on PostgreSQL: every string and
date the API reads is checked before any database sees it, so NUL characters, lone
surrogates and instants outside the storable range are a 422 naming the field, never
a 500 or a 503 "database unreachable"."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timedelta
from urllib.parse import quote

import marshmallow as ma
import pytest
import sqlalchemy as sa

from celery_api.extensions import db
from celery_api.models import TaskRun, utcnow
from tests.support import COMPANY, PROBLEM, assert_problem

LAUNCH = "/api/celery/tasks/launch"
BATCH = "/api/celery/tasks/batch"
HISTORY = "/api/celery/history"
NUL_TEXT = "contain the NUL character (\\u0000)"
RANGE_TEXT = "Must be an ISO 8601 date-time with a year from 0002 to 9998."

# Date-times that parse but that no database stores and reads back in every time zone.
UNSTORABLE_DATES = [
    "0001-01-01T00:00:00+14:00",  # before year 1 in UTC: no datetime at all
    "9999-12-31T23:00:00-14:00",  # after year 9999 in UTC
    "0001-06-01T00:00:00Z",  # year 1: year 0 in a session time zone west of UTC
    "9999-01-01T12:00:00Z",  # year 9999: year 10000 in one east of UTC, near the end
]
# The first and last instants accepted, with the offsets that take them furthest out.
EDGE_DATES = ["0002-01-01T00:00:00+14:00", "9998-12-31T23:59:59.999999-14:00"]


@pytest.fixture(scope="module")
def client(history_app):
    return history_app.test_client()


def problem_422(response, *path) -> dict:
    """A 422 problem whose ``errors`` hold ``path`` and whose detail names it."""
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.mimetype == PROBLEM
    body = response.get_json()
    assert body["status"] == 422
    node = body["errors"]
    for part in path:
        assert isinstance(node, dict) and str(part) in node, (path, body["errors"])
        node = node[str(part)]
    assert isinstance(node, list) and node and all(isinstance(m, str) for m in node), node
    shown = ".".join(str(p) for p in path[1:])  # the detail leaves out the location
    assert f"{shown}: " in body["detail"], body["detail"]
    assert "\x00" not in body["detail"]
    return body


def stored_run(app, status="PENDING", **fields) -> str:
    task_id = str(uuid.uuid4())
    with app.app_context():
        db.session.add(TaskRun(id=task_id, task_type="acme.add", task_name="acme.add",
                               params={"a": 1, "b": 2}, status=status, tags=[],
                               root_id=task_id, created_at=utcnow(), **fields))
        db.session.commit()
    return task_id


def status_of(app, task_id) -> str:
    with app.app_context():
        db.session.expire_all()
        return db.session.get(TaskRun, task_id).status


def count_runs(app) -> int:
    with app.app_context():
        return db.session.query(TaskRun).count()


def add(**body) -> dict:
    return {"task_type": "acme.add", "params": {"a": 1, "b": 2}, **body}


# -- launch bodies ------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "path"), [
    (add(task_type="acme.add\x00"), ("task_type",)),
    ({"task_type": "acme.count", "params": {"key": "nul\x00here"}}, ("params", "key")),
    ({"task_type": "acme.count", "params": {"key": "k", "deep": {"list": ["ok", "x\x00"]}}},
     ("params", "deep", "list", 1)),
    ({"task_type": "acme.count", "params": {"key": "k", "bad\x00key": 1}},
     ("params", "bad\\u0000key")),
    ({"task_type": "sii.sync_documents", "params": {"company_id": COMPANY + "\x00"}},
     ("params", "company_id")),
    ({"task_type": "acme.add", "params": "\x00"}, ("params",)),
    (add(tags=["fine", "bad\x00"]), ("tags", 1)),
    (add(queue="celery\x00"), ("queue",)),
    (add(eta="2030-01-01T00:00:00\x00Z"), ("eta",)),
    (add(expires="2030-01-01T00:00:00Z\x00"), ("expires",)),
    (add(**{"surprise\x00": 1}), ("surprise\\u0000",)),
])
def test_nul_anywhere_in_a_launch_is_422_naming_the_field(history_app, client, body, path):
    before = count_runs(history_app)
    problem = problem_422(client.post(LAUNCH, json=body), "json", *path)
    assert NUL_TEXT in problem["detail"]
    assert count_runs(history_app) == before


@pytest.mark.parametrize("depth", [10, 900])
def test_nul_deep_in_params_is_422(client, depth):
    body = (b'{"task_type": "acme.count", "params": {"key": "k", "deep": ' + b"[" * depth
            + b'"\\u0000"' + b"]" * depth + b"}}")
    response = client.post(LAUNCH, data=body, content_type="application/json")
    # The path is named down to 32 parts: params, deep and 30 list indexes.
    problem_422(response, "json", "params", "deep", *[0] * min(depth, 30))
    assert len(response.data) < 2000


def test_many_nul_strings_make_a_short_answer(client):
    params = {"key": "k", **{f"f{i}": "\x00" for i in range(5000)}}
    response = client.post(LAUNCH, json={"task_type": "acme.count", "params": params})
    problem_422(response, "json", "params", "f0")
    assert len(response.get_json()["errors"]["json"]["params"]) == 20
    assert len(response.data) < 5000


@pytest.mark.parametrize(("raw", "path"), [
    (b'{"task_type": "acme.count", "params": {"key": "a\\ud800b"}}', ("params", "key")),
    (b'{"task_type": "acme.count", "params": {"key": "k", "\\udfff": 1}}',
     ("params", "\\udfff")),
    (b'{"task_type": "acme.add", "params": {"a": 1, "b": 2}, "tags": ["\\udc80"]}',
     ("tags", 0)),
])
def test_lone_surrogates_are_422(history_app, client, raw, path):
    before = count_runs(history_app)
    response = client.post(LAUNCH, data=raw, content_type="application/json")
    assert "surrogate" in problem_422(response, "json", *path)["detail"]
    assert count_runs(history_app) == before


@pytest.mark.parametrize("field", ["eta", "expires"])
@pytest.mark.parametrize("value", UNSTORABLE_DATES)
def test_launch_dates_outside_the_storable_range_are_422(history_app, client, field, value):
    before = count_runs(history_app)
    problem = problem_422(client.post(LAUNCH, json=add(**{field: value})), "json", field)
    assert RANGE_TEXT in problem["detail"]
    assert count_runs(history_app) == before


def test_nul_in_one_batch_item_is_422_and_launches_nothing(history_app, client):
    before = count_runs(history_app)
    body = {"tasks": [add(), {"task_type": "acme.count", "params": {"key": "\x00"}},
                      add(eta=UNSTORABLE_DATES[0])]}
    problem = problem_422(client.post(BATCH, json=body), "json", "tasks", 1, "params", "key")
    assert problem["errors"]["json"]["tasks"].keys() == {"1"}  # the first problem found
    assert count_runs(history_app) == before
    body["tasks"][1] = add()
    problem_422(client.post(BATCH, json=body), "json", "tasks", 2, "eta")
    assert count_runs(history_app) == before


def test_params_given_to_the_catalog_directly_are_held_to_the_same_rule(history_app):
    """Launches that do not pass the HTTP schemas (schedules, fan-out) are checked too."""
    with history_app.app_context():
        definition = history_app.extensions["celery_api.catalog"].get("acme.count")
        with pytest.raises(ma.ValidationError) as caught:
            definition.validate({"key": "k", "nested": {"a\x00": ["\ud800"]}})
    assert caught.value.messages == {
        "nested": {"a\\u0000": ["Names must not contain the NUL character (\\u0000)."]}}


# -- query strings ------------------------------------------------------------------------

@pytest.mark.parametrize(("query", "path"), [
    ("task_type=acme.add&task_type=x%00", ("task_type", 1)),
    ("status=SUCCESS&status=FAILURE%00", ("status", 1)),
    ("tag=night%00ly", ("tag",)),
    ("company_id=" + COMPANY + "%00", ("company_id",)),
    ("parent_id=p%00", ("parent_id",)),
    ("root_id=%00", ("root_id",)),
    ("retry_of=r%00", ("retry_of",)),
    ("batch_id=b%00", ("batch_id",)),
    ("schedule_id=s%00", ("schedule_id",)),
    ("created_after=2025-01-01T00:00:00Z%00", ("created_after",)),
    ("finished_before=%00", ("finished_before",)),
    ("cursor=abc%00", ("cursor",)),
    ("limit=5%00", ("limit",)),
    ("ta%00g=x", ("ta\\u0000g",)),
])
def test_nul_in_history_filters_is_422(client, query, path):
    problem = problem_422(client.get(f"{HISTORY}?{query}"), "query", *path)
    assert NUL_TEXT in problem["detail"]


@pytest.mark.parametrize("field", ["created_after", "created_before", "finished_after",
                                   "finished_before"])
@pytest.mark.parametrize("value", UNSTORABLE_DATES)
def test_history_dates_outside_the_storable_range_are_422(client, field, value):
    problem = problem_422(client.get(HISTORY, query_string={field: value}), "query", field)
    assert RANGE_TEXT in problem["detail"]


@pytest.mark.parametrize(("field", "value"), [
    ("created_after", EDGE_DATES[0]),
    ("finished_after", "0002-01-01T00:00:00Z"),
    ("created_before", EDGE_DATES[1]),
    ("finished_before", "9998-12-31T23:59:59Z"),
])
def test_history_dates_at_the_edges_of_the_range_are_read(history_app, client, field, value):
    task_id = stored_run(history_app, "SUCCESS", finished_at=utcnow())
    response = client.get(HISTORY, query_string={field: value, "limit": 500})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert task_id in [row["task_id"] for row in response.get_json()["items"]]


def _cursor(created: str, run_id) -> str:
    raw = json.dumps([created, run_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [
    _cursor("2025-01-01T00:00:00+00:00", "run\x00id"),
    _cursor("2025-01-01T00:00:00+00:00", "\ud800"),
    _cursor("2025-01-01T00:00:00+00:00", "x" * 156),
    _cursor("0001-01-01T00:00:00+14:00", "id"),
    _cursor("9999-12-31T23:00:00-14:00", "id"),
    _cursor("0001-06-01T00:00:00+00:00", "id"),
    _cursor("2025-01-01T00:00:00", "id"),  # no offset: not one we issue
    _cursor("2025-01-01T00:00:00+00:00", 5),
])
def test_forged_cursors_are_422(client, cursor):
    problem = problem_422(client.get(HISTORY, query_string={"cursor": cursor}),
                          "query", "cursor")
    assert "next_cursor" in problem["detail"]


@pytest.mark.parametrize("eta", EDGE_DATES)
def test_edge_dates_are_stored_and_read_back_in_any_session_time_zone(history_app, client,
                                                                      eta):
    """The accepted extremes survive a round trip, on PostgreSQL even in a session whose
    time zone is 14 hours east or 12 hours west of UTC."""
    response = client.post(LAUNCH, json=add(eta=eta, queue="parked"))
    assert response.status_code == 202, response.get_data(as_text=True)
    task_id = response.get_json()["task_id"]
    assert client.get(f"/api/celery/tasks/{task_id}").status_code == 200
    with history_app.app_context():
        zones = (["Pacific/Kiritimati", "Etc/GMT+12"]
                 if db.engine.dialect.name == "postgresql" else [None])
        for zone in zones:
            with db.engine.connect() as connection:
                if zone:
                    connection.exec_driver_sql(f"SET TIME ZONE '{zone}'")
                stored = connection.execute(
                    sa.select(TaskRun.eta).where(TaskRun.id == task_id)).scalar_one()
            assert stored == datetime.fromisoformat(eta), zone


# -- revoke reasons -----------------------------------------------------------------------

@pytest.mark.parametrize("reason", ["stuck%00", "%ED%A0%80%00"])
def test_nul_in_a_revoke_reason_is_422_and_revokes_nothing(history_app, client, reason):
    task_id = stored_run(history_app)
    problem = problem_422(client.delete(f"/api/celery/tasks/{task_id}?reason={reason}"),
                          "query", "reason")
    assert NUL_TEXT in problem["detail"]
    assert status_of(history_app, task_id) == "PENDING"


def test_nul_in_a_batch_revoke_reason_is_422_and_revokes_nothing(history_app, client):
    batch_id = str(uuid.uuid4())
    task_id = stored_run(history_app, batch_id=batch_id)
    problem_422(client.delete(f"/api/celery/batches/{batch_id}?reason=oops%00"),
                "query", "reason")
    assert status_of(history_app, task_id) == "PENDING"


# -- path parameters ----------------------------------------------------------------------

LONG = "a" * 20_000


@pytest.mark.parametrize(("method", "path", "name"), [
    ("get", "/api/celery/tasks/%00", "task_id"),
    ("get", "/api/celery/tasks/{uuid}%00", "task_id"),
    ("get", f"/api/celery/tasks/{LONG}", "task_id"),
    ("get", "/api/celery/tasks/%ED%A0%80", "task_id"),
    ("delete", "/api/celery/tasks/%00", "task_id"),
    ("delete", f"/api/celery/tasks/{LONG}?reason=x", "task_id"),
    ("post", "/api/celery/tasks/%00/retry", "task_id"),
    ("post", f"/api/celery/tasks/{LONG}/retry", "task_id"),
    ("get", "/api/celery/batches/%00", "batch_id"),
    ("get", f"/api/celery/batches/{LONG}", "batch_id"),
    ("delete", "/api/celery/batches/{uuid}%00", "batch_id"),
])
def test_nul_or_absurd_path_ids_are_422_with_a_short_detail(client, method, path, name):
    response = getattr(client, method)(path.replace("{uuid}", str(uuid.uuid4())))
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.mimetype == PROBLEM
    body = response.get_json()
    assert body["errors"] == {"path": {name: ["Not a valid UUID."]}}
    assert body["detail"].startswith(f"{name} must be a UUID")
    assert len(body["detail"]) < 300 and "\x00" not in body["detail"]


def test_a_long_id_says_how_long_it_was(client):
    detail = client.get(f"/api/celery/tasks/{LONG}").get_json()["detail"]
    assert "first 60 of 20000 characters" in detail


# -- what is still accepted ---------------------------------------------------------------

def test_unicode_that_can_be_stored_is_accepted(history_app, client):
    """Only NUL and lone surrogates are refused: other control characters, emoji and
    astral characters are text like any other."""
    response = client.post(LAUNCH, json={
        "task_type": "acme.add", "params": {"a": 1, "b": 2},
        "tags": ["\x01\x1f", "🚀", "ñandú", "\U0010fffd"],
        "eta": (utcnow() + timedelta(days=1)).isoformat()})
    assert response.status_code == 202, response.get_data(as_text=True)
    task_id = response.get_json()["task_id"]
    row = client.get(HISTORY, query_string={"tag": "🚀"}).get_json()["items"][0]
    assert row["task_id"] == task_id
    assert sorted(row["tags"]) == sorted(["\x01\x1f", "🚀", "ñandú", "\U0010fffd"])
    revoked = client.delete(f"/api/celery/tasks/{task_id}?reason={quote('ñ 🚀')}")
    assert revoked.status_code == 200, revoked.get_data(as_text=True)
    assert client.get(f"/api/celery/tasks/{task_id}").get_json()["error"] == "revoked: ñ 🚀"


def test_every_schema_derives_from_the_project_schema(history_app):
    """A new resource whose schema forgot the base would let NUL reach the database, and
    one that reads a request without ``RequestSchema`` would not document the rule."""
    import importlib
    import pkgutil

    import celery_api.resources as resources
    from celery_api.smorest import ProblemSchema, RequestSchema, Schema

    found = []
    for info in pkgutil.walk_packages(resources.__path__, "celery_api.resources."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, ma.Schema)
                    and value.__module__ == module.__name__):
                found.append(value)
                assert issubclass(value, Schema), f"{value.__module__}.{value.__name__}"
    assert len(found) > 10 and issubclass(ProblemSchema, Schema)
    loaded = []
    for view in history_app.view_functions.values():
        view_class = getattr(view, "view_class", None)
        for method in (view_class.methods or []) if view_class else []:
            doc = getattr(getattr(view_class, method.lower()), "_apidoc", {})
            loaded += [type(p["schema"]) for p in doc.get("arguments", {}).get("parameters", [])]
    assert len(loaded) >= 5
    for schema in loaded:
        assert issubclass(schema, RequestSchema), schema.__name__


# -- JSON that Python cannot read, with and without an Idempotency-Key ---------------------

LONG_INTEGER = "1" * 4301  # past sys.get_int_max_str_digits(): int() refuses it
DEEP = "[" * 5000 + "]" * 5000  # past the recursion limit


def _raw_post(client, path, text: str, key: str | None = None):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(path, data=text.encode(), headers=headers)


@pytest.mark.parametrize("key", [None, "long-number"])
@pytest.mark.parametrize("path", [LAUNCH, BATCH, "/api/celery/schedules", "/api/celery/webhooks"])
def test_an_integer_too_long_to_read_is_a_400(client, history_app, path, key):
    """A JSON integer of more than 4,300 digits: Python's json refuses to convert it
    with a ValueError that is not a syntax error (it was a 500)."""
    before = count_runs(history_app)
    text = ('{"task_type": "acme.add", "params": {"a": 1, "b": 2}, "priority": '
            + LONG_INTEGER + "}")
    assert_problem(_raw_post(client, path, text, key), 400, "4,300", "send it as a string")
    assert count_runs(history_app) == before


@pytest.mark.parametrize("path", [LAUNCH, BATCH])
def test_bodies_python_cannot_read_with_an_idempotency_key_are_4xx(client, history_app, path):
    """With an Idempotency-Key, the request's fingerprint is taken before the body is
    validated: a lone surrogate and JSON nested past the recursion limit made it fail
    with a 500. They get the answers they get without the key, and the key is free
    for a valid request afterwards."""
    key = f"k-{uuid.uuid4()}"
    before = count_runs(history_app)
    assert_problem(_raw_post(client, path, DEEP, key), 400, "nested too deeply")
    surrogate = _raw_post(client, path, '{"task_type": "acme.add", "params": {"a": 1, '
                                         '"b": 2}, "tags": ["\\udfff"]}', key)
    assert surrogate.status_code == 422, surrogate.get_data(as_text=True)
    assert surrogate.mimetype == PROBLEM
    assert count_runs(history_app) == before
    body = add() if path == LAUNCH else {"tasks": [add()]}
    accepted = client.post(path, json=body, headers={"Idempotency-Key": key})
    assert accepted.status_code == 202, accepted.get_data(as_text=True)


def test_retry_with_an_idempotency_key_and_a_body_python_cannot_read(client, history_app):
    """The retry takes no body, but the key's fingerprint reads it: not a 500."""
    task_id = stored_run(history_app, status="FAILURE")
    response = _raw_post(client, f"/api/celery/tasks/{task_id}/retry", DEEP, "retry-deep")
    assert response.status_code < 500, response.get_data(as_text=True)


def test_a_body_with_very_many_bad_fields_gets_a_short_answer(client, history_app):
    """60,000 unknown keys (in params, then at the top): the 422 names the first few in
    detail and at most MAX_ERROR_FIELDS in errors (100,000 in params answered 5.76 MB,
    2.9 MB of it detail)."""
    from celery_api.smorest import MAX_DETAIL_LINES, MAX_ERROR_FIELDS

    many = {f"k{n}": 0 for n in range(60_000)}  # under CELERY_API_MAX_BODY_BYTES
    for body in ({"task_type": "acme.add", "params": {"a": 1, "b": 2, **many}},
                 {"task_type": "acme.add", "params": {"a": 1, "b": 2}, **many}):
        response = client.post(LAUNCH, json=body)
        assert response.status_code == 422, response.get_data(as_text=True)[:500]
        assert len(response.get_data()) < 100_000
        problem = response.get_json()
        assert problem["detail"].count("Unknown field") == MAX_DETAIL_LINES
        assert f"(and {60_000 - MAX_DETAIL_LINES} more)" in problem["detail"]
        errors = problem["errors"]["json"]
        fields = errors["params"] if "params" in errors else errors
        assert len(fields) == MAX_ERROR_FIELDS


@pytest.mark.parametrize(("text", "got"), [("null", "null"), ("[]", "an array"),
                                           ('"launch"', "a string"), ("7", "a number"),
                                           ("true", "a boolean")])
@pytest.mark.parametrize("path", [LAUNCH, BATCH, "/api/celery/schedules", "/api/celery/webhooks"])
def test_a_body_that_is_not_an_object_says_what_it_is(client, history_app, path, text, got):
    """A JSON body that is not an object was a 422 '_schema: Invalid input type.'."""
    before = count_runs(history_app)
    body = assert_problem(_raw_post(client, path, text), 422,
                          f"The request body must be a JSON object; it is {got}.")
    assert "_schema" not in body["detail"]
    assert count_runs(history_app) == before


@pytest.mark.parametrize("headers", [{"Content-Type": "application/json"}, {}])
def test_an_empty_body_says_it_is_empty(client, history_app, headers):
    """Zero bytes: the 422 says the body is empty before naming the missing field."""
    before = count_runs(history_app)
    assert_problem(client.post(LAUNCH, data=b"", headers=headers), 422,
                   "The request body is empty: send a JSON object.",
                   "task_type: Missing data for required field.")
    assert count_runs(history_app) == before

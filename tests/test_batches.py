"""Batches: POST /tasks/batch, GET and DELETE /batches/{id}."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
import redis
import sqlalchemy as sa

from celery_api.extensions import db
from celery_api.models import TaskRun
from tests.support import RedisServer, assert_problem, build_app, make_config, wait_for

BATCH = "/api/celery/tasks/batch"


def add(a: int, b: int, **options) -> dict:
    return {"task_type": "acme.add", "params": {"a": a, "b": b}, **options}


def runs_of(app, batch_id: str) -> list[TaskRun]:
    with app.app_context():
        runs = list(db.session.scalars(sa.select(TaskRun).where(TaskRun.batch_id == batch_id)))
        db.session.expunge_all()
        return runs


def count_all(app) -> int:
    with app.app_context():
        return db.session.execute(sa.select(sa.func.count()).select_from(TaskRun)).scalar_one()


def test_batch_records_every_run_with_its_options_and_answers_202(history_app):
    """On SQLite (executemany) and PostgreSQL (COPY): every column as a single launch."""
    app, client = history_app, history_app.test_client()
    eta = "2030-01-02T03:04:05+02:00"
    tasks = [add(1, 2), add(3, 4, priority=1, tags=["nightly", "x"], queue="parked", eta=eta,
                           expires="2030-01-03T00:00:00Z"),
             {"task_type": "sii.sync_f29", "params": {"company_id": str(uuid.uuid4())}}]
    response = client.post(BATCH, json={"tasks": tasks})
    assert response.status_code == 202, response.get_data(as_text=True)
    body = response.get_json()
    batch_id = body["batch_id"]
    assert response.headers["Location"] == f"/api/celery/batches/{batch_id}"
    assert [t["task_type"] for t in body["tasks"]] == ["acme.add", "acme.add", "sii.sync_f29"]
    assert all(t["status"] == "PENDING" and t["success"] for t in body["tasks"])
    runs = {run.id: run for run in runs_of(app, batch_id)}
    assert list(runs) != [] and set(runs) == {t["task_id"] for t in body["tasks"]}
    second = runs[body["tasks"][1]["task_id"]]
    assert (second.priority, second.tags, second.queue) == (1, ["nightly", "x"], "parked")
    assert second.eta == datetime.fromisoformat(eta)
    assert second.expires == datetime(2030, 1, 3, tzinfo=UTC)
    assert second.params == {"a": 3, "b": 4} and second.batch_id == batch_id
    assert second.root_id == second.id and second.attempts == 0
    first = runs[body["tasks"][0]["task_id"]]
    assert first.tags == [] and first.eta is None and first.created_at.tzinfo is not None
    f29 = runs[body["tasks"][2]["task_id"]]
    assert f29.params["year"]  # the task type's defaults applied, as in a single launch

    summary = client.get(f"/api/celery/batches/{batch_id}")
    assert summary.status_code == 200
    data = summary.get_json()
    assert data["total"] == 3 and data["counts"] == {"PENDING": 3}
    assert data["finished"] is False
    assert [t["task_id"] for t in data["tasks"]] == [t["task_id"] for t in body["tasks"]]
    history = client.get(f"/api/celery/history?batch_id={batch_id}").get_json()
    assert len(history["items"]) == 3
    tagged = client.get(f"/api/celery/history?batch_id={batch_id}&tag=nightly").get_json()
    assert [row["task_id"] for row in tagged["items"]] == [second.id]


def test_a_batch_without_tags_is_recorded_too(history_app):
    """On PostgreSQL a batch's records go in through COPY, on the driver's own cursor:
    with no tag to insert nothing else begins the transaction, which must still commit
    (it was rolled back with the connection once: a 202 whose runs were never recorded)."""
    app, client = history_app, history_app.test_client()
    response = client.post(BATCH, json={"tasks": [add(1, 2), add(3, 4), add(5, 6)]})
    assert response.status_code == 202, response.get_data(as_text=True)
    body = response.get_json()
    recorded = {run.id for run in runs_of(app, body["batch_id"])}
    assert recorded == {t["task_id"] for t in body["tasks"]} and len(recorded) == 3


def test_one_invalid_item_launches_nothing_and_names_each_bad_index(client, app):
    before = count_all(app)
    tasks = [add(1, 2), {"task_type": "acme.nope", "params": {}}, add(1, -5),
             {"task_type": "acme.add", "params": {"a": 1, "b": 2}, "queue": "nowhere"}]
    body = assert_problem(client.post(BATCH, json={"tasks": tasks}), 422,
                          "3 of 4 tasks are invalid; nothing was launched", "tasks[1]")
    errors = body["errors"]["json"]["tasks"]
    assert set(errors) == {"1", "2", "3"}
    assert "Unknown task_type 'acme.nope'" in errors["1"]["task_type"][0]
    assert "b" in errors["2"]["params"]
    assert "queue" in errors["3"]
    assert count_all(app) == before


@pytest.mark.parametrize("body, field", [
    ({"tasks": []}, "tasks"),
    ({"tasks": [add(1, 1)] * 1001}, "tasks"),
    ({}, "tasks"),
    ({"tasks": [{"params": {}}]}, "tasks"),
    ({"tasks": [add(1, 1, priority=10)]}, "tasks"),
    ({"tasks": "all of them"}, "tasks"),
    ({"tasks": [add(1, 1)], "extra": 1}, "extra"),
])
def test_bad_batch_bodies_are_422(client, app, body, field):
    before = count_all(app)
    problem = assert_problem(client.post(BATCH, json=body), 422)
    assert field in problem["errors"]["json"], problem
    assert count_all(app) == before


def test_unknown_and_malformed_batch_ids(client):
    assert_problem(client.get(f"/api/celery/batches/{uuid.uuid4()}"), 404, "No batch")
    assert_problem(client.delete(f"/api/celery/batches/{uuid.uuid4()}"), 404, "No batch")
    body = assert_problem(client.get("/api/celery/batches/not-a-uuid"), 422, "batch_id")
    assert body["errors"] == {"path": {"batch_id": ["Not a valid UUID."]}}
    assert_problem(client.delete("/api/celery/batches/x?reason=y&bogus=1"), 422)


def test_revoking_a_batch_revokes_its_queued_runs_once(client, app):
    body = client.post(BATCH, json={"tasks": [add(1, 1, queue="parked"),
                                              add(2, 2, queue="parked")]}).get_json()
    batch_id = body["batch_id"]
    response = client.delete(f"/api/celery/batches/{batch_id}?reason=wrong+month")
    assert response.status_code == 200, response.get_data(as_text=True)
    outcome = response.get_json()
    assert sorted(outcome["revoked"]) == sorted(t["task_id"] for t in body["tasks"])
    assert outcome["not_revoked"] == {}
    assert {run.id: (run.status, "wrong month" in run.error)
            for run in runs_of(app, batch_id)} == {
        t["task_id"]: ("REVOKED", True) for t in body["tasks"]}
    summary = client.get(f"/api/celery/batches/{batch_id}").get_json()
    assert summary["counts"] == {"REVOKED": 2} and summary["finished"] is True
    assert_problem(client.delete(f"/api/celery/batches/{batch_id}"), 409, "nothing to revoke")


def test_batch_with_the_broker_down_is_503_and_records_nothing(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    app = build_app(make_config(tmp_path / "app", server.url))
    client = app.test_client()
    try:
        assert client.post(BATCH, json={"tasks": [add(1, 1)]}).status_code == 202
        server.stop()
        response = client.post(BATCH, json={"tasks": [add(i, i) for i in range(20)]})
        assert_problem(response, 503, "nothing in the batch was launched")
        assert int(response.headers["Retry-After"]) > 0
        assert count_all(app) == 1
    finally:
        server.stop()


def test_batch_runs_end_to_end(stack):
    """200 runs in one request: each runs once on the worker, the batch reads finished."""
    key = f"batch-{stack.kind}-{uuid.uuid4().hex[:8]}"
    tasks = [{"task_type": "acme.count", "params": {"key": key}} for _ in range(200)]
    response = stack.client.post(BATCH, json={"tasks": tasks})
    assert response.status_code == 202, response.get_data(as_text=True)
    body = response.get_json()
    ids = {t["task_id"] for t in body["tasks"]}
    assert len(ids) == 200

    def finished():
        summary = stack.client.get(f"/api/celery/batches/{body['batch_id']}").get_json()
        return summary if summary["finished"] else None

    summary = wait_for(finished, timeout=120, interval=0.25, message="the batch to finish")
    assert summary["counts"] == {"SUCCESS": 200}
    backend = redis.Redis.from_url(stack.config["CELERY"]["result_backend"]
                                   .replace("redis+socket://", "unix://"))
    executed = {member.decode() for member in backend.smembers(f"acme:runs:{key}")}
    assert executed == ids  # every run exactly once (a set: duplicates would show in count)
    assert int(backend.get(f"acme:count:{key}")) == 200

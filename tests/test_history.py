"""GET /history, retention and migrations, on SQLite and on PostgreSQL."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import timedelta

import flask_migrate
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from celery_api.extensions import db
from celery_api.models import TaskRun, TaskRunTag, utcnow
from celery_api.services import maintenance

T0 = utcnow().replace(microsecond=0) - timedelta(days=10)


def add_run(app, *, minutes: float, task_type="sii.sync_documents", status="SUCCESS",
            tags=(), finished_minutes: float | None = None, **fields) -> str:
    task_id = fields.pop("id", None) or str(uuid.uuid4())
    created = T0 + timedelta(minutes=minutes)
    finished = None
    if status in ("SUCCESS", "FAILURE", "REVOKED"):
        finished = created + timedelta(minutes=finished_minutes or 1)
    with app.app_context():
        db.session.add(TaskRun(id=task_id, task_type=task_type, task_name=task_type,
                               params={}, status=status, tags=list(tags),
                               created_at=created, finished_at=finished,
                               root_id=fields.pop("root_id", task_id), **fields))
        db.session.add_all(TaskRunTag(run_id=task_id, tag=t) for t in tags)
        db.session.commit()
    return task_id


@pytest.fixture(scope="module")
def runs(history_app):
    """A small known history: 30 runs a minute apart, with types, statuses, lineage."""
    app = history_app
    ids = {}
    company = str(uuid.uuid4())
    for i in range(30):
        ids[i] = add_run(
            app, minutes=i,
            task_type="sii.sync_f29" if i % 3 == 0 else "sii.sync_documents",
            status=("FAILURE" if i % 5 == 0 else "SUCCESS") if i < 25 else "STARTED",
            tags=["nightly"] if i % 4 == 0 else (),
            company_id=company if i % 2 == 0 else None)
    parent = ids[10]
    for i in (11, 12):
        with app.app_context():
            db.session.execute(sa.update(TaskRun).where(TaskRun.id == ids[i])
                               .values(parent_id=parent, root_id=parent))
            db.session.commit()
    with app.app_context():
        db.session.execute(sa.update(TaskRun).where(TaskRun.id == ids[13])
                           .values(retry_of=ids[5], root_id=ids[5], batch_id="b-1",
                                   schedule_id="s-1"))
        db.session.commit()
    return {"ids": ids, "company": company, "app": app}


def history(client, **params):
    response = client.get("/api/celery/history", query_string=params)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def created_minutes(rows):
    return [round((__import__("datetime").datetime.fromisoformat(r["created_at"]) - T0)
                  .total_seconds() / 60) for r in rows]


def test_newest_first_with_every_field(runs):
    client = runs["app"].test_client()
    page = history(client, limit=5, created_after=T0.isoformat(),
                   created_before=(T0 + timedelta(hours=1)).isoformat())
    assert created_minutes(page["items"]) == [29, 28, 27, 26, 25]
    row = page["items"][0]
    assert {"task_id", "task_type", "status", "params", "result", "error", "queue",
            "priority", "tags", "worker", "retries", "attempts", "created_at", "started_at",
            "finished_at", "runtime", "parent_id", "root_id", "retry_of", "batch_id",
            "schedule_id", "company_id"} <= row.keys()
    assert page["next_cursor"] and page["limit"] == 5


def in_window(**params):
    return dict(params, created_after=T0.isoformat(),
                created_before=(T0 + timedelta(hours=1)).isoformat())


@pytest.mark.parametrize(("params", "expected"), [
    ({"task_type": "sii.sync_f29"}, [i for i in range(30) if i % 3 == 0]),
    ({"task_type": ["sii.sync_f29", "sii.sync_documents"]}, list(range(30))),
    ({"status": "FAILURE"}, [0, 5, 10, 15, 20]),
    ({"status": ["FAILURE", "STARTED"]}, [0, 5, 10, 15, 20, 25, 26, 27, 28, 29]),
    ({"task_type": "sii.sync_f29", "status": "FAILURE"}, [0, 15]),
    ({"tag": "nightly"}, [i for i in range(30) if i % 4 == 0]),
    ({"tag": "nightly", "status": "FAILURE"}, [0, 20]),
])
def test_filters(runs, params, expected):
    page = history(runs["app"].test_client(), limit=100, **in_window(**params))
    assert sorted(created_minutes(page["items"])) == expected
    assert page["next_cursor"] is None


def test_lineage_company_and_time_filters(runs):
    client = runs["app"].test_client()
    ids = runs["ids"]
    assert {r["task_id"] for r in history(client, parent_id=ids[10])["items"]} == \
        {ids[11], ids[12]}
    assert {r["task_id"] for r in history(client, root_id=ids[10])["items"]} == \
        {ids[10], ids[11], ids[12]}
    assert [r["task_id"] for r in history(client, retry_of=ids[5])["items"]] == [ids[13]]
    assert [r["task_id"] for r in history(client, batch_id="b-1")["items"]] == [ids[13]]
    assert [r["task_id"] for r in history(client, schedule_id="s-1")["items"]] == [ids[13]]
    company = history(client, company_id=runs["company"], limit=100)["items"]
    assert sorted(created_minutes(company)) == list(range(0, 30, 2))
    window = history(client, created_after=(T0 + timedelta(minutes=3)).isoformat(),
                     created_before=(T0 + timedelta(minutes=6)).isoformat())["items"]
    assert created_minutes(window) == [5, 4, 3]
    finished = history(client, finished_after=(T0 + timedelta(minutes=21)).isoformat(),
                       finished_before=(T0 + timedelta(minutes=24)).isoformat())["items"]
    assert created_minutes(finished) == [22, 21, 20]  # each finished a minute after creation


def test_cursor_walk_is_complete_and_stable_under_inserts(runs):
    app = runs["app"]
    client = app.test_client()
    seen, cursor, pages = [], None, 0
    while True:
        params = in_window(limit=7)
        if cursor:
            params["cursor"] = cursor
        page = history(client, **params)
        seen.extend(r["task_id"] for r in page["items"])
        pages += 1
        if pages == 2:  # runs arriving meanwhile are newer: they never shift a page
            add_run(app, minutes=45, task_type="sii.sync_f29", tags=["late"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    window_ids = [runs["ids"][i] for i in range(29, -1, -1)]
    assert seen == window_ids
    assert pages == 5


def test_link_header_points_at_next_page(runs):
    client = runs["app"].test_client()
    response = client.get("/api/celery/history?limit=2&status=SUCCESS&status=FAILURE")
    link = response.headers["Link"]
    assert link.endswith('>; rel="next"') and "cursor=" in link and "status=FAILURE" in link
    follow = client.get(link[1:link.index(">")])
    assert follow.status_code == 200 and len(follow.get_json()["items"]) == 2


def tampered_cursor(run_id: str) -> str:
    raw = json.dumps(["2026-01-01T00:00:00+00:00", run_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("query", [
    "limit=0", "limit=-5", "limit=501", "limit=99999999999999999999", "limit=abc",
    "status=DONE", "created_after=yesterday", "company_id=../../etc/passwd",
    "cursor=not-a-cursor", "cursor=eyJ4IjoxfQ", "cursor=%40%40%40", "task_type=" + "x" * 201,
    "limit=%EF%BC%91",  # a fullwidth 1: int() reads it, the contract says an integer
    # Tampered cursors (a NUL in the run id, a run id too long): 422, never a 500.
    "cursor=" + tampered_cursor("a\x00b"), "cursor=" + tampered_cursor("x" * 300),
    "tag=' OR 1=1 --x", "unknown_filter=1",
])
def test_bad_queries_are_422(runs, query):
    response = runs["app"].test_client().get(f"/api/celery/history?{query}")
    if query.startswith("tag="):  # a SQL-looking tag is just a tag nobody used
        assert response.status_code == 200 and response.get_json()["items"] == []
        return
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["detail"]
    if query.startswith("cursor="):  # one message, whatever is wrong with it
        assert response.get_json()["detail"].count("Not a cursor") == 1


def test_a_parameter_of_one_value_given_twice_is_422(runs):
    """limit=1&limit=2 was read as limit=1 without a word; a repeatable filter
    (task_type) still takes every value."""
    client = runs["app"].test_client()
    response = client.get("/api/celery/history?limit=1&limit=2&status=SUCCESS")
    assert response.status_code == 422, response.get_data(as_text=True)
    body = response.get_json()
    assert body["errors"]["query"] == {"limit": ["Given more than once: send it once."]}
    assert "limit: Given more than once" in body["detail"]
    listed = client.get("/api/celery/history?task_type=acme.add&task_type=acme.count")
    assert listed.status_code == 200, listed.get_data(as_text=True)


def test_purge_removes_only_old_finished_runs(history_app):
    app = history_app
    old_done = add_run(app, minutes=-200 * 24 * 60, tags=["old"])
    old_running = add_run(app, minutes=-200 * 24 * 60, status="STARTED")
    recent = add_run(app, minutes=-1)
    with app.app_context():
        removed = maintenance.purge(older_than_days=100)
        assert removed >= 1
        assert db.session.get(TaskRun, old_done) is None
        assert db.session.get(TaskRun, old_running) is not None
        assert db.session.get(TaskRun, recent) is not None
        assert db.session.execute(
            sa.select(TaskRunTag).where(TaskRunTag.run_id == old_done)).first() is None
    result = app.test_cli_runner().invoke(args=["history", "purge", "--older-than-days",
                                                "100"])
    assert result.exit_code == 0 and "purged 0 run(s)" in result.output


def test_migrations_down_and_up_and_match_the_models(history_app):
    app = history_app
    with app.app_context():
        db.session.remove()
        flask_migrate.downgrade(revision="base")
        assert "task_runs" not in sa.inspect(db.engine).get_table_names()
        flask_migrate.upgrade(revision="0001")
        # A run recorded before the tags table existed keeps its tags after the upgrade.
        db.session.execute(sa.text(
            "INSERT INTO task_runs (id, task_type, task_name, params, status, tags, retries,"
            " created_at) VALUES ('legacy-1', 't', 't', '{}', 'SUCCESS', '[\"a\", \"b\"]', 0,"
            " :now)"), {"now": utcnow()})
        db.session.commit()
        flask_migrate.upgrade()
        tags = db.session.execute(sa.select(TaskRunTag.tag).where(
            TaskRunTag.run_id == "legacy-1").order_by(TaskRunTag.tag)).scalars().all()
        assert tags == ["a", "b"]
        assert db.session.get(TaskRun, "legacy-1").attempts == 0
        with db.engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), db.metadata)
        assert diff == []

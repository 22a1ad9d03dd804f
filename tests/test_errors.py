"""Database failures (issue 11): a 503 means the database is down, never a bug.

A connection-level failure is a 503 with ``Retry-After``, whether a service turned it
into ``Unavailable`` or the app's handler caught what a service did not. Any other
database error (bad data, a missing table, SQL the database refuses) is a 500
problem+json, logged with its traceback, and is not dressed up as an outage.
"""

from __future__ import annotations

import logging
import sqlite3
import uuid

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from celery_api import create_app
from celery_api.extensions import db
from celery_api.models import TaskRun
from celery_api.services import control, history, launch
from celery_api.services.database import is_unavailable
from tests.support import COMPANY, assert_problem, free_port, make_config, stored_run

LAUNCH = {"task_type": "acme.add", "params": {"a": 1, "b": 2}}
INTERNAL = "Internal error; it has been logged"


def refused() -> sa_exc.OperationalError:
    """What SQLAlchemy raises when PostgreSQL refuses the connection."""
    return sa_exc.OperationalError(
        None, None, psycopg.OperationalError("connection failed: Connection refused"))


def data_error() -> sa_exc.DataError:
    return sa_exc.DataError("SELECT 1 / 0", {}, psycopg.errors.DivisionByZero(
        "division by zero"))


def integrity_error() -> sa_exc.IntegrityError:
    return sa_exc.IntegrityError("INSERT ...", {}, sqlite3.IntegrityError(
        "UNIQUE constraint failed: task_runs.id"))


def run_count(app) -> int:
    with app.app_context():
        return db.session.execute(sa.select(sa.func.count()).select_from(TaskRun)).scalar_one()


def logged_with_traceback(caplog, kind: type[BaseException]) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info
            and isinstance(r.exc_info[1], kind)]


# --- Through a service (services.database.unavailable_as, launch.record_runs)


def no_such_table(*_args):
    # A real failure of the statement: SQLite's sqlite3 raises OperationalError for it,
    # the class that also carries "database is locked", so only the code tells them apart.
    return sa.select(sa.text("* FROM no_such_table"))


def test_a_failing_statement_in_a_service_is_a_logged_500(client, caplog, monkeypatch):
    monkeypatch.setattr(history, "build_statement", no_such_table)
    response = client.get("/api/celery/history")
    body = assert_problem(response, 500, INTERNAL)
    assert "errors" not in body and "Retry-After" not in response.headers
    assert logged_with_traceback(caplog, sa_exc.OperationalError)


@pytest.mark.parametrize("error", [data_error, integrity_error])
def test_a_data_error_in_a_service_is_a_logged_500(client, caplog, monkeypatch, error):
    def fail(_query):
        raise error()

    monkeypatch.setattr(history, "build_statement", fail)
    response = client.get("/api/celery/history")
    assert_problem(response, 500, INTERNAL)
    assert logged_with_traceback(caplog, sa_exc.DBAPIError)


def test_a_connection_error_in_a_service_is_503_with_retry_after(client, monkeypatch):
    def fail(_query):
        raise refused()

    monkeypatch.setattr(history, "build_statement", fail)
    response = client.get("/api/celery/history")
    assert_problem(response, 503, "database is unreachable")
    assert int(response.headers["Retry-After"]) > 0
    # The session was rolled back: the next request reads normally.
    monkeypatch.undo()
    assert client.get("/api/celery/history").status_code == 200


def test_a_failing_launch_record_is_a_logged_500_and_launches_nothing(client, app, caplog,
                                                                      monkeypatch):
    before = run_count(app)
    monkeypatch.setattr(launch, "RUNS_INSERT", sa.text("INSERT INTO no_such_table VALUES (1)"))
    response = client.post("/api/celery/tasks/launch", json=LAUNCH)
    assert_problem(response, 500, INTERNAL)
    assert logged_with_traceback(caplog, sa_exc.OperationalError)
    assert run_count(app) == before


# --- What no service caught: the app's handler (celery_api.http)


@pytest.mark.parametrize("error", [data_error, integrity_error])
def test_an_uncaught_data_error_is_a_logged_500(client, app, caplog, monkeypatch, error):
    task_id = stored_run(app, "FAILURE", error="boom")

    def fail(_task_id):
        raise error()

    monkeypatch.setattr(control, "_refuse_if_retrying", fail)
    response = client.post(f"/api/celery/tasks/{task_id}/retry")
    assert_problem(response, 500, INTERNAL)
    assert "Retry-After" not in response.headers
    assert logged_with_traceback(caplog, sa_exc.DBAPIError)


def test_an_uncaught_connection_error_is_503_with_retry_after(client, app, caplog,
                                                              monkeypatch):
    task_id = stored_run(app, "FAILURE", error="boom")

    def fail(_task_id):
        raise refused()

    monkeypatch.setattr(control, "_refuse_if_retrying", fail)
    response = client.post(f"/api/celery/tasks/{task_id}/retry")
    assert_problem(response, 503, "database is unreachable")
    assert int(response.headers["Retry-After"]) > 0
    assert any("database unavailable" in r.getMessage() for r in caplog.records)
    assert not logged_with_traceback(caplog, sa_exc.SQLAlchemyError)


def test_a_database_that_refuses_connections_is_503_everywhere(tmp_path, redis_server):
    """A real refused connection (a PostgreSQL URL on a closed port), on every path."""
    app = create_app(make_config(tmp_path, redis_server.url,
                                 f"postgresql://postgres@127.0.0.1:{free_port()}/none"))
    client = app.test_client()
    some_id = str(uuid.uuid4())
    for method, path, body in [
        ("post", "/api/celery/tasks/launch", LAUNCH),
        ("post", "/api/celery/tasks/batch", {"tasks": [LAUNCH]}),
        ("get", "/api/celery/history", None),
        ("get", f"/api/celery/tasks/{some_id}", None),
        ("delete", f"/api/celery/tasks/{some_id}", None),
        ("post", f"/api/celery/tasks/{some_id}/retry", None),
        ("get", f"/api/celery/batches/{some_id}", None),
    ]:
        response = getattr(client, method)(path, json=body)
        assert_problem(response, 503, "database is unreachable")
        assert int(response.headers["Retry-After"]) > 0, path


# --- The rule itself, on the drivers' own errors


def _raised(engine, statement: str, **params) -> sa_exc.SQLAlchemyError:
    with pytest.raises(sa_exc.SQLAlchemyError) as caught:
        with engine.begin() as connection:
            connection.execute(sa.text(statement), params)
    return caught.value


def test_sqlite_busy_is_unavailable_and_statement_errors_are_not(tmp_path):
    path = tmp_path / "rule.db"
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE t (x INTEGER NOT NULL UNIQUE)"))
        connection.execute(sa.text("INSERT INTO t VALUES (1)"))
    holder = sqlite3.connect(path)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        locked = _raised(engine, "INSERT INTO t VALUES (2)")
    finally:
        holder.rollback()
        holder.close()
    assert "database is locked" in str(locked) and is_unavailable(locked)
    for statement in ("SELECT * FROM no_such_table", "SELEC 1", "INSERT INTO t VALUES (1)",
                      "INSERT INTO t VALUES (NULL)"):
        assert not is_unavailable(_raised(engine, statement)), statement
    cannot_open = sa.create_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    with pytest.raises(sa_exc.OperationalError) as caught:
        cannot_open.connect()
    assert is_unavailable(caught.value)
    engine.dispose()


def test_postgres_connection_failures_are_unavailable_and_statement_errors_are_not(
        postgres_admin):
    url = postgres_admin.replace("postgresql://", "postgresql+psycopg://")
    closed = sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x")
    with pytest.raises(sa_exc.OperationalError) as caught:
        closed.connect()
    assert is_unavailable(caught.value)
    engine = sa.create_engine(url)
    try:
        terminated = _raised(engine, "SELECT pg_terminate_backend(pg_backend_pid())")
        assert is_unavailable(terminated)  # 57P01, and the connection invalidated
        for statement in ("SELECT 1 / 0", "SELECT 'x'::integer", "SELECT * FROM no_such_table",
                          "SELECT :company::integer"):
            assert not is_unavailable(_raised(engine, statement, company=COMPANY)), statement
    finally:
        engine.dispose()
    assert not is_unavailable(sa_exc.InvalidRequestError("a misuse of SQLAlchemy"))
    assert is_unavailable(sa_exc.TimeoutError("QueuePool limit reached"))

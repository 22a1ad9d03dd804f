"""Pooled database connections without a ping per request (services.database.ping_when_idle).

A connection idle for ``PING_AFTER_IDLE_SECONDS`` is checked before use; one used a
moment ago is not. These tests kill the server side of every pooled connection
(``pg_terminate_backend``, what a PostgreSQL restart does to them) and set the idle
bound so that the path under test is the one taken, whatever the machine's speed.
"""

from __future__ import annotations

import contextlib
import logging

import psycopg
import pytest
import sqlalchemy as sa

from celery_api.extensions import db
from celery_api.models import TaskRun
from celery_api.services import database
from tests.support import LogLines, build_app, close_app, make_config

LAUNCH = "/api/celery/tasks/launch"
ADD = {"task_type": "acme.add", "params": {"a": 1, "b": 2}}


@pytest.fixture
def make_app(request, tmp_path, redis_server, pg_databases, postgres_admin, monkeypatch):
    def make(idle_seconds: float):
        monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", idle_seconds)
        url = pg_databases.create()
        name = url.rsplit("/", 1)[1]
        app = build_app(make_config(tmp_path / name, redis_server.url, url))
        app.config["TEST_DATABASE"] = name
        request.addfinalizer(lambda: close_app(app))
        return app

    return make


def kill_connections(app, admin_url: str) -> int:
    """Terminate every server process of the app's database: its pooled connections."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        return len(conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (app.config["TEST_DATABASE"],)).fetchall())


def runs(app) -> set[str]:
    """The runs recorded, read on a new connection (the app's pool may hold connections
    a test killed: single launches are recorded through the autocommit engine's)."""
    with app.app_context():
        db.engine.dispose()
        ids = set(db.session.scalars(sa.select(TaskRun.id)))
        db.session.remove()
        return ids


@contextlib.contextmanager
def launch_warnings():
    """The warnings the launch service logs meanwhile (a list of messages, filled in)."""
    lines, logger = LogLines(logging.WARNING), logging.getLogger("celery_api.launch")
    logger.addHandler(lines)
    try:
        yield lines.lines
    finally:
        logger.removeHandler(lines)


RETRIED = "recording on a lost connection, once more"


def test_a_launch_on_a_connection_lost_a_moment_ago_is_recorded_once_more(
        make_app, postgres_admin):
    app = make_app(idle_seconds=3600)  # never pinged: the lost connection is used
    client = app.test_client()
    first = client.post(LAUNCH, json=ADD)
    assert first.status_code == 202
    assert kill_connections(app, postgres_admin) >= 1
    with launch_warnings() as logged:
        second = client.post(LAUNCH, json=ADD)
    assert second.status_code == 202, second.get_data(as_text=True)
    assert any(RETRIED in line for line in logged)
    assert runs(app) == {first.get_json()["task_id"], second.get_json()["task_id"]}


def test_an_idle_connection_lost_is_replaced_before_use(make_app, postgres_admin):
    app = make_app(idle_seconds=0)  # every connection checked before use
    client = app.test_client()
    task_id = client.post(LAUNCH, json=ADD).get_json()["task_id"]
    assert kill_connections(app, postgres_admin) >= 1
    response = client.get(f"/api/celery/tasks/{task_id}")  # a read: no retry of its own
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["status"] == "PENDING"


def test_a_read_on_a_connection_lost_a_moment_ago_is_a_503_then_recovers(
        make_app, postgres_admin):
    """The price of not pinging busy connections: right after a restart, one read per
    process on a connection it held answers 503 (a retry cures it), never a 500."""
    app = make_app(idle_seconds=3600)
    client = app.test_client()
    task_id = client.post(LAUNCH, json=ADD).get_json()["task_id"]
    client.get(f"/api/celery/tasks/{task_id}")
    assert kill_connections(app, postgres_admin) >= 1
    lost = client.get(f"/api/celery/tasks/{task_id}")
    assert lost.status_code == 503, lost.get_data(as_text=True)
    assert lost.mimetype == "application/problem+json"
    again = client.get(f"/api/celery/tasks/{task_id}")
    assert again.status_code == 200, again.get_data(as_text=True)


def test_a_launch_committed_whose_answer_was_lost_is_recorded_once(make_app, monkeypatch):
    """A single launch's record is one INSERT on the autocommit engine
    (services.launch.record_runs, services.database.autocommit_bind), run with the
    driver's cursor (fences.sqlalchemy.insert_row). Held at the window, in the driver:
    the database commits it, then the connection is lost before the client hears so.
    The second try on a new connection meets the run's own id: that is the record
    written, not a conflict: 202, one row."""
    app = make_app(idle_seconds=3600)
    client = app.test_client()
    lost = []
    execute = psycopg.Cursor.execute

    def commit_then_lose_the_answer(cursor, query, params=None, **kwargs):
        if lost or not str(query).startswith("INSERT INTO task_runs"):
            return execute(cursor, query, params, **kwargs)  # executed as usual
        execute(cursor, query, params, **kwargs)  # autocommit: it is written now
        lost.append(params)
        cursor.connection.close()
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    with monkeypatch.context() as patched, launch_warnings() as logged:
        patched.setattr(psycopg.Cursor, "execute", commit_then_lose_the_answer)
        response = client.post(LAUNCH, json=ADD)
    assert lost, "the hook never held a launch's INSERT"
    assert response.status_code == 202, response.get_data(as_text=True)
    assert any(RETRIED in line for line in logged)
    assert runs(app) == {response.get_json()["task_id"]}


def test_a_single_launch_on_sqlite_runs_its_insert_and_nothing_else(tmp_path, redis_server):
    """The record goes through the autocommit engine (services.database.autocommit_bind):
    SQLite executes the INSERT alone, no BEGIN and COMMIT around it (the write lock held
    across Python code between them) and no switch of isolation level per checkout (a
    PRAGMA at each check-in), as SQLite's own trace shows."""
    app = build_app(make_config(tmp_path, redis_server.url))
    statements: list[str] = []
    try:
        with app.app_context():
            engine = db.engines[database.AUTOCOMMIT_BIND]
            engine.dispose()  # its connections from now on are traced

            @sa.event.listens_for(engine, "connect")
            def trace(dbapi_connection, _record):
                dbapi_connection.set_trace_callback(statements.append)

        client = app.test_client()
        client.post(LAUNCH, json=ADD)  # a first connection: its PRAGMAs on connect
        statements.clear()
        response = client.post(LAUNCH, json=ADD)
        assert response.status_code == 202, response.get_data(as_text=True)
        assert [s.split(" (")[0] for s in statements] == ["INSERT INTO task_runs"], statements
        assert response.get_json()["task_id"] in runs(app)
    finally:
        close_app(app)


def test_an_in_memory_sqlite_database_has_no_autocommit_engine():
    """A second engine on ":memory:" would be another, empty database: the app's engine
    is switched to autocommit per connection instead."""
    assert database.autocommit_bind("sqlite://", {}) is None
    assert database.autocommit_bind("sqlite:///:memory:", {}) is None
    assert database.autocommit_bind("sqlite:////tmp/a.db", {"pool_size": 3}) == {
        "url": "sqlite:////tmp/a.db", "pool_size": 3, "isolation_level": "AUTOCOMMIT",
        "pool_reset_on_return": None}


def _backend_pids(engine, count: int) -> set[int]:
    """Check ``count`` connections out of ``engine`` at once, as that many request
    threads do under load, and give them all back: their server processes."""
    connections = [engine.connect() for _ in range(count)]
    try:
        return {c.exec_driver_sql("SELECT pg_backend_pid()").scalar() for c in connections}
    finally:
        for connection in connections:
            connection.close()


def test_the_pool_keeps_a_connection_for_every_thread(make_app, monkeypatch):
    """With GUNICORN_THREADS=8, ten threads (eight request threads and the two
    background ones) use each engine at once, and every connection goes back to the pool
    to be used again: none is closed and opened anew under load. SQLAlchemy's default
    pool of 5 closed 5 of them at every such peak (205 new PostgreSQL sessions in 7,364
    launches under wrk)."""
    monkeypatch.setenv("GUNICORN_THREADS", "8")
    app = make_app(idle_seconds=3600)
    assert app.config["DATABASE_POOL_SIZE"] == 10
    with app.app_context():
        for engine in (db.engine, database.autocommit_engine()):
            first = _backend_pids(engine, 10)
            assert len(first) == 10
            assert engine.pool.checkedin() == 10
            assert _backend_pids(engine, 10) == first  # the same ten sessions


def test_the_pool_size_follows_the_threads_or_the_setting(monkeypatch):
    from celery_api import settings

    monkeypatch.delenv("GUNICORN_THREADS", raising=False)
    monkeypatch.delenv("CELERY_API_DATABASE_POOL_SIZE", raising=False)
    assert settings.default_pool_size() == 6  # 4 request threads, 2 background ones
    monkeypatch.setenv("GUNICORN_THREADS", "1")
    assert settings.default_pool_size() == 5  # never below SQLAlchemy's default
    monkeypatch.setenv("GUNICORN_THREADS", "16")
    assert settings.default_pool_size() == 18
    monkeypatch.setenv("CELERY_API_DATABASE_POOL_SIZE", "3")
    assert settings.from_environment(settings.default_instance_path())[
        "DATABASE_POOL_SIZE"] == 3
    monkeypatch.setenv("CELERY_API_DATABASE_POOL_SIZE", "0")
    with pytest.raises(settings.ConfigurationError, match="POOL_SIZE must be 1 or more"):
        settings.pool_size()

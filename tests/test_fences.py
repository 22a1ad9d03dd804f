"""The library internals this service reaches below the public API of, checked.

Each check names what ``celery_api/fences`` (and ``celery_api/smorest.py``, the
flask-smorest and webargs fence) relies on. An upgrade that renames or reshapes one
fails here, loudly, instead of in a launch.
"""

from __future__ import annotations

import inspect
import os

import kombu
import pytest
import redis as redis_lib
from kombu.transport import redis as redis_transport
from kombu.transport import virtual

from celery_api.fences import kombu as kombu_fence


def parameters(func) -> list[str]:
    return list(inspect.signature(func).parameters)


def test_kombu_redis_channel_internals():
    channel = redis_transport.Channel
    assert parameters(channel._create_client) == ["self", "asynchronous"]
    assert parameters(channel._q_for_pri) == ["self", "queue", "pri"]
    assert isinstance(channel.priority_steps, list)
    assert channel.unacked_key == "unacked"
    assert isinstance(inspect.getattr_static(channel, "client"), property) or \
        hasattr(channel, "client")
    assert isinstance(inspect.getattr_static(channel, "pool"), property)


def test_kombu_reraise_as_library_errors(redis_server):
    import redis

    assert parameters(kombu.Connection._reraise_as_library_errors)[0] == "self"
    with kombu.Connection(redis_server.url) as connection, \
            pytest.raises(kombu.exceptions.OperationalError), \
            kombu_fence.reraise_as_library_errors(connection):
        raise redis.exceptions.ConnectionError("the transport's own error")


def test_redis_client_reuse_applies_only_to_the_redis_transport(redis_server):
    with kombu.Connection("memory://") as memory:
        channel = memory.default_channel
        assert isinstance(channel, virtual.Channel)
        kombu_fence.reuse_redis_client(channel)
        assert not getattr(channel, "_celery_api_reuses_client", False)
    with kombu.Connection(redis_server.url) as redis:
        channel = redis.default_channel
        kombu_fence.reuse_redis_client(channel)
        assert channel._celery_api_reuses_client
        first = channel._create_client()
        assert channel._create_client() is first  # one client per channel and pool
        assert first.ping()
        # It holds one connection of the channel's pool: its commands neither take one
        # from the pool nor give it back (redis-py's single_connection_client).
        held = first.connection
        assert held is not None and held in channel.pool._in_use_connections
        taken = []
        get_connection = channel.pool.get_connection
        channel.pool.get_connection = lambda *a, **k: taken.append(1) or get_connection(
            *a, **k)
        try:
            assert first.lpush("fence-held", "x") == 1 and first.ping()
        finally:
            del channel.pool.get_connection
        assert taken == [] and first.connection is held
        # A connection the server closed fails the next command with an error kombu
        # counts as a connection error (its ensure() then publishes again on a revived
        # channel: test_outage), and the command after it reconnects.
        killer = redis_lib.Redis.from_url(redis_server.url)
        assert killer.client_kill_filter(_id=first.client_id()) == 1
        killer.close()
        with pytest.raises(redis.connection_errors):
            first.llen("fence-held")
        assert first.llen("fence-held") == 1
        first.delete("fence-held")
        # A forked child builds a client of its own: never its parent's socket.
        pid = os.fork()
        if pid == 0:
            try:
                own = channel._create_client()
                ok = own is not first and own.connection is not first.connection
                os._exit(0 if ok and own.ping() else 1)
            except BaseException:  # noqa: BLE001 - the child's failure is its exit code
                os._exit(2)
        _pid, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert channel._create_client() is first and first.ping()  # the parent's intact


def test_redis_message_ids_read_queues_and_unacked(redis_server):
    url = redis_server.url.replace("/0", "/7")
    with kombu.Connection(url) as connection:
        queue = kombu.Queue("fence-check", routing_key="fence-check")
        producer = connection.Producer()
        producer.publish({"x": 1}, routing_key="fence-check", declare=[queue],
                         headers={"id": "waiting-id"}, priority=3)
        channel = connection.default_channel
        assert kombu_fence.redis_message_ids(channel, ["fence-check"], limit=100) == {
            "waiting-id"}
        assert kombu_fence.redis_message_ids(channel, ["fence-check"], limit=0) is None
        queue(channel).purge()


def test_celery_internals(app):
    from celery import _state
    from celery.app.amqp import AMQP
    from celery.backends.base import KeyValueStoreBackend
    from celery.worker import state as worker_state

    assert parameters(_state._set_task_join_will_block) == ["blocks"]
    as_task = parameters(AMQP.as_task_v2)
    for name in ("task_id", "name", "kwargs", "countdown", "eta", "expires", "root_id",
                 "parent_id", "origin", "argsrepr", "kwargsrepr"):
        assert name in as_task, name
    send = parameters(app.extensions["celery"].amqp.send_task_message)
    assert send[:3] == ["producer", "name", "message"]
    # priority and expiration go through **kwargs to kombu's Producer.publish
    for name in ("queue", "headers", "declare", "retry", "retry_policy", "kwargs"):
        assert name in send, name
    assert hasattr(worker_state.revoked, "add")
    for name in ("mget", "get_key_for_task", "decode_result"):
        assert callable(getattr(KeyValueStoreBackend, name)), name


def test_celery_message_round_trip(app):
    """The message the launch path builds is the one Celery's own send_task builds."""
    from celery_api.fences import celery as celery_fence

    celery_app = app.extensions["celery"]
    message = celery_fence.task_message(
        celery_app, "fence-id", "acme.add", kwargs={"a": 1, "b": 2}, countdown=None,
        eta=None, expires=None, root_id="fence-id", parent_id=None, origin="here",
        kwargsrepr="{'a': 1, 'b': 2}")
    headers, properties, body = message.headers, message.properties, message.body
    assert headers["id"] == "fence-id" and headers["task"] == "acme.add"
    assert headers["root_id"] == "fence-id" and headers["origin"] == "here"
    assert body[1] == {"a": 1, "b": 2}
    assert properties["correlation_id"] == "fence-id"


def test_flask_smorest_and_webargs_internals():
    """celery_api/smorest.py overrides these private hooks of flask-smorest and webargs."""
    from flask_smorest import Api
    from webargs.flaskparser import FlaskParser

    for name in ("_init_spec", "_register_responses", "_openapi_json",
                 "_register_error_handlers"):
        assert callable(getattr(Api, name, None)), name
    assert parameters(FlaskParser._raw_load_json) == ["self", "req"]


def test_gunicorn_gthread_internals():
    """celery_api/fences/gunicorn.py (EdgeThreadWorker) overrides and calls these."""
    from gunicorn.http import wsgi as gunicorn_wsgi
    from gunicorn.workers import base, gthread

    worker = gthread.ThreadWorker
    for name, params in {
        "accept": ["self", "listener"],
        "on_client_socket_readable": ["self", "conn", "client"],
        "_cap_keepalive": ["self", "deadline"],
        "handle": ["self", "conn"],
        "handle_error": ["self", "req", "client", "addr", "exc"],
        "finish_request": ["self", "conn", "fs"],
        "enqueue_req": ["self", "conn"],
        "handle_request": ["self", "req", "conn"],
        "run": ["self"],
        "init_process": ["self"],
    }.items():
        assert parameters(getattr(worker, name)) == params, name
    assert parameters(base.Worker.load_wsgi) == ["self"]
    assert "self.wsgi = self.app.wsgi()" in inspect.getsource(base.Worker.load_wsgi)
    assert parameters(gthread.TConn.__init__) == ["self", "cfg", "sock", "client", "server"]
    for name in ("init", "close"):
        assert callable(getattr(gthread.TConn, name)), name
    # A parked request: the app is called with the Response's own start_response; a
    # Response whose headers count as sent writes nothing on close; must_close stops
    # the keep-alive; the client socket is in the environ.
    handle_request = inspect.getsource(worker.handle_request)
    assert "self.wsgi(environ, resp.start_response)" in handle_request
    assert "resp.should_close()" in handle_request
    assert "if not self.headers_sent" in inspect.getsource(gunicorn_wsgi.Response.close)
    assert "self.must_close" in inspect.getsource(gunicorn_wsgi.Response.should_close)
    assert '"gunicorn.socket": sock' in inspect.getsource(gunicorn_wsgi)
    # finish_request is run in the event loop through the method queue, with the future.
    assert "self.method_queue.defer(self.finish_request, conn, fut)" in \
        inspect.getsource(worker.enqueue_req)
    # The worker loop reads these.
    source = inspect.getsource(worker)
    for attribute in ("self.poller", "self.pending_conns", "self.keepalived_conns",
                      "self.nr_conns"):
        assert attribute in source, attribute


def test_flask_limiter_strategy_and_limits_redis_storage_internals(redis_server):
    """fences/limits.py replaces ``Limiter._limiter`` and uses the Redis storage's
    ``prefixed_key`` and ``get_connection`` (its scripts' key and client)."""
    import flask
    from flask_limiter import Limiter
    from limits.storage import RedisStorage
    from limits.strategies import MovingWindowRateLimiter

    from celery_api.fences import limits as limits_fence

    app = flask.Flask("fence")
    limiter = Limiter(key_func=lambda: "k", storage_uri=redis_server.url,
                      strategy="moving-window")
    limiter.init_app(app)
    assert type(limiter._limiter) is MovingWindowRateLimiter
    assert isinstance(limiter._limiter.storage, RedisStorage)
    assert limiter._limiter.storage.prefixed_key("x").endswith(":x")
    assert limits_fence.one_trip(limiter)
    assert limiter.limiter is limiter._limiter  # what Flask-Limiter asks is ours
    assert isinstance(limiter._limiter, limits_fence.OneTripMovingWindow)

    # The one script answers the window the library's own script reads back.
    from limits import parse

    item, strategy = parse("3/hour"), limiter._limiter
    reference = MovingWindowRateLimiter(strategy.storage)
    with app.test_request_context():
        for _ in range(4):
            strategy.hit(item, "fence", "check")
            ours = strategy.get_window_stats(item, "fence", "check")
            theirs = reference.get_window_stats(item, "fence", "check")
            assert ours.remaining == theirs.remaining
            assert abs(ours.reset_time - theirs.reset_time) < 0.01  # Lua's %.14g of theirs
        assert ours.remaining == 0


def test_flask_limiter_request_hooks_come_off(redis_server):
    """fences/limits.py ``request_hooks_off``: the three request hooks ``init_app``
    registers are found by the limiter they are bound to and removed, nothing is counted
    per request any more, while ``limiter.limiter`` (the strategy the per-task-type
    limits use) still works."""
    import uuid

    import flask
    from flask_limiter import Limiter
    from limits import parse

    from celery_api.fences import limits as limits_fence

    app = flask.Flask("fence")
    caller = uuid.uuid4().hex  # a bucket of this test's own in the shared server
    limiter = Limiter(key_func=lambda: caller, storage_uri=redis_server.url,
                      strategy="moving-window", default_limits=["1/hour"])
    limiter.init_app(app)
    app.add_url_rule("/x", "x", lambda: "ok")
    client = app.test_client()
    assert client.get("/x").status_code == 200
    assert client.get("/x").status_code == 429  # the hooks count while enabled
    hooks = [function for table in (app.before_request_funcs, app.after_request_funcs,
                                    app.teardown_request_funcs)
             for function in table.get(None, ())]
    assert limits_fence.request_hooks_off(app, limiter) == 3  # all it registered
    assert not [function for table in (app.before_request_funcs, app.after_request_funcs,
                                       app.teardown_request_funcs)
                for function in table.get(None, ()) if function in hooks]
    assert [client.get("/x").status_code for _ in range(3)] == [200, 200, 200]
    item = parse("1/hour")
    with app.test_request_context():
        assert limiter.limiter.hit(item, caller, "task-type")
        assert not limiter.limiter.hit(item, caller, "task-type")


def test_urllib3_connections_keep_their_socket():
    """celery_api.fences.urllib3: a connection's ``connect()`` leaves its socket in
    ``sock``, which the attempt's deadline shuts down."""
    import socket

    import urllib3

    from celery_api.fences.urllib3 import deadline_connection

    seen = []
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        cls = deadline_connection(urllib3.HTTPConnectionPool.ConnectionCls, seen.append)
        conn = cls("127.0.0.1", listener.getsockname()[1], timeout=5)
        conn.connect()
        assert seen == [conn.sock] and isinstance(conn.sock, socket.socket)
        conn.close()
    finally:
        listener.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_sqlalchemy_insert_row_stores_what_core_stores(kind, tmp_path, redis_server,
                                                       pg_databases):
    """fences.sqlalchemy.insert_row against ``Connection.execute`` of the same INSERT:
    every column of the row read back the same (the types' bind processors: JSON,
    the UTC datetimes), a duplicate id refused as SQLAlchemy's IntegrityError, and the
    statement compiled once per engine and column set."""
    import datetime
    import uuid

    import sqlalchemy as sa

    from celery_api.extensions import db
    from celery_api.fences import sqlalchemy as sqlalchemy_fence
    from celery_api.models import TaskRun
    from celery_api.services import database
    from celery_api.services.launch import RUNS_INSERT
    from tests.support import build_app, close_app, make_config

    url = pg_databases.create() if kind == "postgresql" else None
    app = build_app(make_config(tmp_path, redis_server.url, url))
    now = datetime.datetime.now(datetime.UTC)

    def row() -> dict:
        run_id = str(uuid.uuid4())
        return {
            "id": run_id, "task_type": "acme.add", "task_name": "acme.add",
            "params": {"a": 1, "text": "é ✓", "nested": [1, None, {"b": True}]},
            "status": "PENDING", "queue": "celery", "priority": 3, "tags": ["x", "y"],
            "eta": now + datetime.timedelta(hours=1), "expires": None,
            "company_id": "76354771-K", "parent_id": None, "root_id": run_id,
            "retry_of": None, "batch_id": None, "schedule_id": None,
            "scheduled_for": now, "launched_by": "ops", "retries": 0, "attempts": 0,
            "created_at": now, "dispatch_at": None, "cache_key": None,
            "webhook_url": "https://example.com/hook",
        }

    try:
        with app.app_context():
            engine = database.autocommit_engine()
            assert engine is not None and engine.dialect.name == kind
            by_core, by_fence = row(), row()
            with engine.connect() as connection:
                connection.execute(RUNS_INSERT, by_core)
            sqlalchemy_fence.insert_row(engine, RUNS_INSERT, by_fence)
            with db.engine.connect() as connection:  # another engine: committed
                stored = {r.id: r._asdict() for r in connection.execute(
                    sa.select(TaskRun.__table__)).all()}
            core, fence = stored[by_core["id"]], stored[by_fence["id"]]
            for name in ("id", "root_id"):
                core.pop(name), fence.pop(name)
            assert fence == core
            assert fence["params"] == by_fence["params"] and fence["eta"] == by_fence["eta"]
            with pytest.raises(sa.exc.IntegrityError):
                sqlalchemy_fence.insert_row(engine, RUNS_INSERT, by_fence)
            assert len(sqlalchemy_fence._compiled[engine]) == 1
            with pytest.raises(ValueError, match="created_at"):  # a default it would skip
                sqlalchemy_fence.insert_row(engine, RUNS_INSERT, {
                    k: v for k, v in row().items() if k != "created_at"})
    finally:
        close_app(app)

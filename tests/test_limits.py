"""Rate limits (per API key or address, per task type, shared on Redis) and load shedding."""

from __future__ import annotations

import itertools

import marshmallow as ma
import pytest
import redis
import requests
import sqlalchemy as sa

from celery_api import limits
from celery_api.catalog import Catalog, CatalogError
from celery_api.extensions import db
from celery_api.models import TaskRun
from tests.support import (
    LiveServer,
    RedisServer,
    assert_problem,
    build_app,
    close_app,
    create_key,
    free_port,
    make_config,
    service_env,
    stored_run,
    wait_for,
)

LAUNCH = "/api/celery/tasks/launch"
BATCH = "/api/celery/tasks/batch"
CATALOG = "/api/celery/tasks"
IETF_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "RateLimit-Policy")


def add(a: int = 1, b: int = 2, **options) -> dict:
    return {"task_type": "acme.add", "params": {"a": a, "b": b}, **options}


def echo(value: int = 0, **options) -> dict:
    return {"task_type": "limited.echo", "params": {"value": value}, **options}


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory):
    """This module's own Redis: its queue depths and limit counters are its alone."""
    server = RedisServer(tmp_path_factory.mktemp("limits-redis")).start()
    yield server
    server.stop()


_databases = itertools.count(1)


@pytest.fixture
def make_app(request, tmp_path, private_redis):
    """An app on a fresh database of the private Redis (broker), with ``extra`` config."""

    def make(**extra):
        number = next(_databases)
        url = private_redis.url.replace("/0", f"/{number}")
        redis.Redis.from_url(url).flushdb()
        config = make_config(tmp_path / f"app{number}", url,
                             TASK_MODULES=["acme_tasks", "limited_tasks"], **extra)
        app = build_app(config)
        app.config["TEST_CONFIG"] = config
        request.addfinalizer(lambda: close_app(app))
        return app

    return make


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_rate_headers(response, limit: int, remaining: int, window: int) -> None:
    for name in IETF_HEADERS:
        assert name in response.headers, (name, dict(response.headers))
    assert response.headers["RateLimit-Limit"] == str(limit)
    assert response.headers["RateLimit-Remaining"] == str(remaining)
    assert 0 < int(response.headers["RateLimit-Reset"]) <= window
    assert response.headers["RateLimit-Policy"] == f"{limit};w={window}"
    assert int(response.headers["X-RateLimit-Reset"]) > 1_700_000_000  # epoch seconds


def assert_rate_limited(response, *fragments) -> dict:
    body = assert_problem(response, 429, *fragments)
    assert body["type"] == limits.RATE_LIMITED
    assert 0 < int(response.headers["Retry-After"]) <= 3600
    return body


# Per caller.

def test_each_api_key_has_its_own_launch_bucket_shared_by_launch_batch_and_retry(make_app):
    app = make_app(AUTH="required", RATE_LIMIT_LAUNCH="3/hour", RATE_LIMIT_READ="100/hour")
    client = app.test_client()
    first = bearer(create_key(app, "first", "launch", "read"))
    second = bearer(create_key(app, "second", "launch", "read"))
    failed = stored_run(app, "FAILURE")

    response = client.post(LAUNCH, json=add(), headers=first)
    assert response.status_code == 202
    assert_rate_headers(response, 3, 2, 3600)
    response = client.post(BATCH, json={"tasks": [add(), add()]}, headers=first)
    assert response.status_code == 202
    assert_rate_headers(response, 3, 1, 3600)  # a batch is one request of the caller
    response = client.post(f"/api/celery/tasks/{failed}/retry", headers=first)
    assert response.status_code == 202
    assert_rate_headers(response, 3, 0, 3600)

    refused = client.post(LAUNCH, json=add(), headers=first)
    body = assert_rate_limited(refused, "3 per 1 hour", "API key 'first'",
                               "CELERY_API_RATE_LIMIT_LAUNCH")
    assert body["instance"] == LAUNCH
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert abs(int(refused.headers["Retry-After"]) - int(refused.headers["RateLimit-Reset"])) <= 1
    assert client.post(BATCH, json={"tasks": [add()]}, headers=first).status_code == 429
    assert client.post(f"/api/celery/tasks/{failed}/retry", headers=first).status_code == 429

    # Another key has its own bucket; reads are a separate limit.
    response = client.post(LAUNCH, json=add(), headers=second)
    assert response.status_code == 202
    assert_rate_headers(response, 3, 2, 3600)
    response = client.get(CATALOG, headers=first)
    assert response.status_code == 200
    assert_rate_headers(response, 100, 99, 3600)
    # A refused request is not a run: 3 launches of "first" (one of them a batch of 2)
    # and 1 of "second" were recorded, besides the stored one.
    with app.app_context():
        by = dict(db.session.execute(sa.select(TaskRun.launched_by, sa.func.count())
                                     .group_by(TaskRun.launched_by)).all())
    assert by == {"first": 4, "second": 1, None: 1}


def test_without_auth_each_client_address_has_its_own_bucket(make_app):
    app = make_app(RATE_LIMIT_READ="2/minute")
    client = app.test_client()
    one, other = {"REMOTE_ADDR": "10.0.0.1"}, {"REMOTE_ADDR": "10.0.0.2"}
    assert [client.get(CATALOG, environ_base=one).status_code for _ in range(2)] == [200, 200]
    assert_rate_limited(client.get(CATALOG, environ_base=one), "2 per 1 minute",
                        "address 10.0.0.1", "CELERY_API_RATE_LIMIT_READ")
    # Every read shares the bucket: status, history, stats, batches.
    assert client.get("/api/celery/history", environ_base=one).status_code == 429
    assert client.get("/api/celery/stats", environ_base=one).status_code == 429
    response = client.get(CATALOG, environ_base=other)
    assert response.status_code == 200
    assert_rate_headers(response, 2, 1, 60)


def test_behind_a_trusted_proxy_the_forwarded_address_is_the_bucket(make_app):
    app = make_app(RATE_LIMIT_READ="1/minute", TRUSTED_PROXIES=1)
    client = app.test_client()

    def read(address):
        return client.get(CATALOG, headers={"X-Forwarded-For": address},
                          environ_base={"REMOTE_ADDR": "127.0.0.1"}).status_code

    assert (read("203.0.113.7"), read("203.0.113.7"), read("198.51.100.2")) == (200, 429, 200)


def test_rate_limit_headers_only_on_limited_operations(make_app):
    app = make_app(RATE_LIMIT_READ="5/hour")
    client = app.test_client()
    response = client.get(CATALOG)
    assert response.status_code == 200
    assert_rate_headers(response, 5, 4, 3600)
    assert "Retry-After" not in response.headers  # only a refusal says when to come back
    for path in ("/healthz", "/readyz", "/metrics", "/api/openapi.json", "/api/docs/"):
        for _ in range(6):  # past the read limit: never counted, never refused
            response = client.get(path)
            assert response.status_code in (200, 503), (path, response.status_code)
        assert not set(IETF_HEADERS) & set(response.headers.keys()), path
    assert client.get(CATALOG).headers["RateLimit-Remaining"] == "3"


def test_limits_off_send_no_headers(make_app):
    app = make_app(RATE_LIMIT_LAUNCH="off", RATE_LIMIT_READ="")
    client = app.test_client()
    assert app.config["RATE_LIMIT_LAUNCH"] is None and app.config["RATE_LIMIT_READ"] is None
    for _ in range(3):
        response = client.post(LAUNCH, json=add())
        assert response.status_code == 202
        assert not set(IETF_HEADERS) & set(response.headers.keys())


def test_settings_are_checked_at_start():
    assert limits.limit_setting("10/second;600/minute", "X") == "10/second;600/minute"
    for value in (None, "", "off", "OFF", "0"):
        assert limits.limit_setting(value, "X") is None
    with pytest.raises(ValueError, match="CELERY_API_RATE_LIMIT_LAUNCH"):
        limits.limit_setting("lots", "CELERY_API_RATE_LIMIT_LAUNCH")
    assert limits.queue_bounds("celery:10000, parked:100") == {"celery": 10000, "parked": 100}
    for value in ("celery", "celery:-1", ":3", "celery:x"):
        with pytest.raises(ValueError, match="CELERY_API_QUEUE_MAX_DEPTHS"):
            limits.queue_bounds(value)
    assert limits.storage_uri(None) == "memory://"
    assert limits.storage_uri("redis+socket:///tmp/r.sock") == "redis+unix:///tmp/r.sock"
    assert limits.storage_uri("redis://h:6379/2") == "redis://h:6379/2"


def test_the_openapi_document_declares_429_on_every_limited_operation(make_app):
    doc = make_app().test_client().get("/api/openapi.json").get_json()
    assert "RateLimited" in doc["components"]["responses"]
    assert "Retry-After" in doc["components"]["responses"]["RateLimited"]["headers"]
    limited = set()
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            scope = operation.get("x-required-scope")
            # Every launch operation and every read but /readyz (open) and /metrics.
            expected = (scope == "launch" or scope == "read" and path.startswith("/api/"))
            assert ("429" in operation["responses"]) == expected, (method, path)
            if expected:
                limited.add(operation["operationId"])
                success = next(c for c in operation["responses"] if c.startswith("2"))
                assert "RateLimit-Remaining" in operation["responses"][success]["headers"]
    assert {"launchTask", "launchBatch", "retryTask", "listTasks", "getTaskStatus",
            "listHistory", "getStats", "getBatch"} <= limited


def test_an_unreachable_limit_storage_counts_in_memory_never_fails(make_app):
    app = make_app(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", RATE_LIMIT_READ="2/hour")
    client = app.test_client()
    statuses = [client.get(CATALOG).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


# Per task type.

def test_catalog_refuses_an_invalid_task_type_limit():
    with pytest.raises(CatalogError, match="rate_limit"):
        Catalog().add("acme.x", celery_name="acme.x", params_schema=ma.Schema,
                      name="x", description="x", rate_limit="often")


def test_a_task_type_limit_is_shared_by_all_callers(make_app):
    app = make_app(RATE_LIMIT_LAUNCH="100/hour")
    client = app.test_client()
    one, other = {"REMOTE_ADDR": "10.0.0.1"}, {"REMOTE_ADDR": "10.0.0.2"}
    assert client.post(LAUNCH, json=echo(), environ_base=one).status_code == 202
    assert client.post(LAUNCH, json=echo(), environ_base=one).status_code == 202
    assert client.post(LAUNCH, json=echo(), environ_base=other).status_code == 202
    refused = client.post(LAUNCH, json=echo(), environ_base=other)
    body = assert_problem(refused, 429, "'limited.echo'", "3 per 1 hour", "all callers")
    assert body["type"] == limits.TASK_TYPE_RATE_LIMITED
    assert 0 < int(refused.headers["Retry-After"]) <= 3600
    # The caller's own bucket is reported as usual; other task types are not limited.
    assert refused.headers["RateLimit-Limit"] == "100"
    assert client.post(LAUNCH, json=add(), environ_base=other).status_code == 202
    # An invalid launch takes nothing from the task type's limit (validated first).
    assert client.post(LAUNCH, json=echo(value="x")).status_code == 422
    with app.app_context():
        count = db.session.scalar(sa.select(sa.func.count()).select_from(TaskRun)
                                  .where(TaskRun.task_type == "limited.echo"))
    assert count == 3


def test_a_batch_counts_each_item_against_its_task_type_all_or_nothing(make_app):
    app = make_app()
    client = app.test_client()
    assert client.post(BATCH, json={"tasks": [echo(1), add(), echo(2)]}).status_code == 202
    refused = client.post(BATCH, json={"tasks": [add(), echo(3), echo(4)]})
    body = assert_problem(refused, 429, "'limited.echo'", "1 left now",
                          "2 launches of it asked")
    assert body["type"] == limits.TASK_TYPE_RATE_LIMITED
    too_big = client.post(BATCH, json={"tasks": [echo(n) for n in range(4)]})
    assert_problem(too_big, 429, "fewer than the 4 launches", "split the batch")
    # Nothing of the refused batches was recorded or taken from the limit.
    assert client.post(BATCH, json={"tasks": [echo(5)]}).status_code == 202
    assert client.post(LAUNCH, json=echo(6)).status_code == 429
    with app.app_context():
        count = db.session.scalar(sa.select(sa.func.count()).select_from(TaskRun))
    assert count == 4  # 2 + 1 echoes and one add


# Shared by API processes on Redis.

def test_limits_are_shared_by_api_processes_on_redis(tmp_path, private_redis):
    broker = private_redis.url.replace("/0", "/14")
    storage = private_redis.url.replace("/0", "/15")
    for url in (broker, storage):
        redis.Redis.from_url(url).flushdb()
    config = make_config(tmp_path / "shared", broker)
    app = build_app(config)
    with app.app_context():
        db.engine.dispose()
    env = service_env(config)
    servers = [LiveServer(env, tmp_path / f"gunicorn-{n}.log", REDIS_URL=storage,
                          WEB_CONCURRENCY="2", CELERY_API_RATE_LIMIT_READ="7/hour").start()
               for n in range(2)]
    try:
        answers = []
        with requests.Session() as first, requests.Session() as second:
            for n in range(16):
                server, session = ((servers[0], first) if n % 2 == 0
                                   else (servers[1], second))
                response = session.get(f"{server.url}{CATALOG}", timeout=10)
                answers.append((server.port, response.status_code))
                if response.status_code == 429:
                    assert response.headers["Content-Type"] == "application/problem+json"
                    assert int(response.headers["Retry-After"]) > 0
        allowed = [port for port, code in answers if code == 200]
        assert len(allowed) == 7, answers  # the limit, across both processes together
        assert {port for port, _ in answers} == {s.port for s in servers}
        assert all(code == 429 for _, code in answers[7:]), answers
    finally:
        for server in servers:
            server.stop()



def test_a_limited_request_costs_one_redis_round_trip(make_app, private_redis):
    """On Redis with the moving window (the default), the check and the window the
    headers report come from one script: one round trip per limited request, refused
    or not (fences/limits.py; two before: acquire, then read the window back)."""
    storage = private_redis.url.replace("/0", "/13")
    redis.Redis.from_url(storage).flushdb()
    app = make_app(REDIS_URL=storage, RATE_LIMIT_READ="4/hour")
    server = redis.Redis(port=private_redis.port)

    def scripts() -> int:
        stats = server.info("commandstats")
        return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0)
                   for name in ("eval", "evalsha", "eval_ro", "evalsha_ro"))

    client = app.test_client()
    assert_rate_headers(client.get(CATALOG), 4, 3, 3600)  # loads the script once
    before = scripts()
    for remaining in (2, 1, 0):
        response = client.get(CATALOG)
        assert response.status_code == 200
        assert_rate_headers(response, 4, remaining, 3600)
    assert_rate_limited(client.get(CATALOG), "Rate limit exceeded")
    assert scripts() - before == 4


# Load shedding.

def test_a_full_queue_refuses_launches_until_it_drains(make_app):
    app = make_app(QUEUE_MAX_DEPTHS="parked:3", QUEUE_DEPTH_CACHE_SECONDS=0.5)
    client = app.test_client()
    celery_app = app.extensions["celery"]
    accepted = []
    for n in range(3):
        response = client.post(LAUNCH, json=add(n, queue="parked"))
        assert response.status_code == 202, response.get_data(as_text=True)
        accepted.append(response.get_json()["task_id"])
    refused = client.post(LAUNCH, json=add(queue="parked"))
    body = assert_problem(refused, 429, "'parked'", "holds 3 messages", "bound of 3",
                          "CELERY_API_QUEUE_MAX_DEPTHS")
    assert body["type"] == limits.QUEUE_FULL
    assert refused.headers["Retry-After"] == str(limits.QUEUE_FULL_RETRY_AFTER)
    # Batches and retries to that queue are refused too; other queues and reads are not.
    assert client.post(BATCH, json={"tasks": [add(), add(queue="parked")]}).status_code == 429
    failed = stored_run(app, "FAILURE", queue="parked")
    assert_problem(client.post(f"/api/celery/tasks/{failed}/retry"), 429, "'parked'")
    assert client.post(LAUNCH, json=add()).status_code == 202
    assert client.get(f"/api/celery/tasks/{accepted[0]}").status_code == 200
    assert client.get("/api/celery/history?limit=5").status_code == 200
    # A run held in the database (due later than the hold) does not wait in the queue.
    assert client.post(LAUNCH, json=add(queue="parked", countdown=3600)).status_code == 202
    with app.app_context():
        queued = db.session.scalar(sa.select(sa.func.count()).select_from(TaskRun)
                                   .where(TaskRun.queue == "parked"))
    assert queued == 3 + 1 + 1  # the three, the stored failure, the held one

    with celery_app.connection_for_write() as conn:
        assert conn.default_channel.queue_purge("parked") == 3
    # Accepted again once this process reads the depth anew (its cache expires).
    response = wait_for(
        lambda: (r := client.post(LAUNCH, json=add(queue="parked"))).status_code == 202 and r,
        timeout=10, interval=0.1, message="launches to the drained queue to be accepted")
    assert response.status_code == 202

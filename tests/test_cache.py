"""The status cache of successful runs in the Redis at REDIS_URL."""

from __future__ import annotations

from datetime import timedelta

import redis

from celery_api.extensions import db
from celery_api.models import TaskRun
from celery_api.services import maintenance
from celery_api.services.cache import PREFIX
from tests.support import assert_problem, build_app, free_port, make_config, stored_run


def cached_app(tmp_path, redis_server, cache_url=None):
    """Two apps on one tmp_path share the SQLite file: two API processes, one database."""
    config = make_config(tmp_path, redis_server.url,
                         REDIS_URL=cache_url or redis_server.url.replace("/0", "/9"),
                         CACHE_SECONDS=60)
    if tmp_path.name == "other":
        config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path.parent / 'test.db'}"
    return build_app(config)


def test_a_successful_run_is_served_from_the_cache_once_read(tmp_path, redis_server):
    app = cached_app(tmp_path, redis_server)
    client = app.test_client()
    cache = redis.Redis.from_url(redis_server.url.replace("/0", "/9"))
    done = stored_run(app, "SUCCESS", result={"sum": 3})
    failed = stored_run(app, "FAILURE", error="RuntimeError: no")
    queued = stored_run(app, "PENDING")

    first = client.get(f"/api/celery/tasks/{done}")
    assert first.status_code == 200 and first.mimetype == "application/json"
    assert cache.ttl(PREFIX + done) > 0
    # Proof the second answer comes from the cache: change the record under it.
    with app.app_context():
        db.session.get(TaskRun, done).result = {"sum": 999}
        db.session.commit()
    second = client.get(f"/api/celery/tasks/{done}")
    assert second.get_json() == first.get_json()
    assert second.get_json()["result"] == {"sum": 3}

    # Another API process (an app of its own) finds it in Redis, not in its memory.
    other = cached_app(tmp_path / "other", redis_server)
    assert other.extensions["celery_api.cache"].memory.get(done) is None
    assert other.test_client().get(f"/api/celery/tasks/{done}").get_json()["result"] == {
        "sum": 3}

    # Runs that may still change are never cached: FAILURE can be retried.
    for task_id in (failed, queued):
        assert client.get(f"/api/celery/tasks/{task_id}").status_code == 200
        assert not cache.exists(PREFIX + task_id)


def test_purge_forgets_cached_runs(tmp_path, redis_server):
    app = cached_app(tmp_path, redis_server)
    client = app.test_client()
    cache = redis.Redis.from_url(redis_server.url.replace("/0", "/9"))
    old = stored_run(app, "SUCCESS", result=1)
    assert client.get(f"/api/celery/tasks/{old}").status_code == 200
    assert cache.exists(PREFIX + old)
    with app.app_context():
        run = db.session.get(TaskRun, old)
        run.finished_at = run.finished_at - timedelta(days=400)
        db.session.commit()
        assert maintenance.purge(older_than_days=90) == 1
    assert not cache.exists(PREFIX + old)
    assert_problem(client.get(f"/api/celery/tasks/{old}"), 404)


def test_without_redis_the_memory_cache_still_answers(tmp_path, redis_server):
    app = build_app(make_config(tmp_path, redis_server.url, CACHE_SECONDS=60))
    client = app.test_client()
    done = stored_run(app, "SUCCESS", result=5)
    assert client.get(f"/api/celery/tasks/{done}").get_json()["result"] == 5
    with app.app_context():
        db.session.get(TaskRun, done).result = 6
        db.session.commit()
    assert client.get(f"/api/celery/tasks/{done}").get_json()["result"] == 5
    off = build_app(make_config(tmp_path / "off", redis_server.url, CACHE_SECONDS=0))
    assert off.extensions["celery_api.cache"] is None


def test_a_cache_that_does_not_answer_is_skipped(tmp_path, redis_server):
    app = cached_app(tmp_path, redis_server, cache_url=f"redis://127.0.0.1:{free_port()}/0")
    client = app.test_client()
    done = stored_run(app, "SUCCESS", result={"sum": 3})
    for _ in range(2):
        response = client.get(f"/api/celery/tasks/{done}")
        assert response.status_code == 200 and response.get_json()["result"] == {"sum": 3}


def test_cached_answers_are_written_as_every_other_answer(tmp_path, redis_server):
    """Compact, sorted JSON with a final newline, as Flask writes the uncached ones."""
    app = build_app(make_config(tmp_path, redis_server.url, CACHE_SECONDS=60))
    client = app.test_client()
    done = stored_run(app, "SUCCESS", result={"b": 1, "a": [1, 2]})
    first = client.get(f"/api/celery/tasks/{done}").get_data()
    assert client.get(f"/api/celery/tasks/{done}").get_data() == first
    running = stored_run(app, "STARTED")
    plain = client.get(f"/api/celery/tasks/{running}").get_data()
    for body in (first, plain):
        assert b'": ' not in body and b", " not in body and body.endswith(b"}\n"), body
    assert first.index(b'"batch_id"') < first.index(b'"task_id"')  # sorted keys

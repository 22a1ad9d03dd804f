"""The producer a single launch publishes with (celery_api.celery_app.thread_producer):
one per thread, kept, on a broker connection of its own; a forked child's its own."""

from __future__ import annotations

import json
import os
import threading

import pytest
import redis

from celery_api.celery_app import thread_producer
from tests.support import build_app, close_app, make_config

LAUNCH = "/api/celery/tasks/launch"
ADD = {"task_type": "acme.add", "params": {"a": 1, "b": 2}}


@pytest.fixture
def app(tmp_path, redis_server):
    # A pool of one broker connection: a thread's producer must not wait for it.
    app = build_app(make_config(tmp_path, redis_server.url, CELERY={
        "broker_url": redis_server.url, "result_backend": redis_server.url,
        "broker_pool_limit": 1}))
    yield app
    close_app(app)


def queued_ids(redis_server) -> set[str]:
    client = redis.Redis.from_url(redis_server.url)
    try:
        return {json.loads(raw)["headers"]["id"] for raw in client.lrange("celery", 0, -1)}
    finally:
        client.close()


def test_a_thread_keeps_its_producer_and_threads_do_not_share_one(app, redis_server):
    """Launches of one thread publish with one producer on one connection; launches of
    eight threads at once (the pool holds one connection) all publish, each thread with
    its own, none waiting for the pool."""
    celery_app = app.extensions["celery"]
    client = app.test_client()
    first = client.post(LAUNCH, json=ADD)
    producer = thread_producer(celery_app)
    second = client.post(LAUNCH, json=ADD)
    assert first.status_code == second.status_code == 202
    assert thread_producer(celery_app) is producer

    seen, answers, start = [], [], threading.Barrier(8)

    def launch():
        start.wait(timeout=30)
        answers.append(app.test_client().post(LAUNCH, json=ADD))
        seen.append(thread_producer(celery_app))

    threads = [threading.Thread(target=launch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [a.status_code for a in answers] == [202] * 8
    assert len({id(p) for p in seen}) == 8 and producer not in seen
    assert len({id(p.connection) for p in [producer, *seen]}) == 9
    launched = {a.get_json()["task_id"] for a in [first, second, *answers]}
    assert queued_ids(redis_server) >= launched


def test_a_forked_child_publishes_with_a_producer_of_its_own(app, redis_server):
    """A process forked after its parent published (a Celery prefork worker's child
    launching fan-out) must not write on the parent's socket: it makes its own
    producer, and both publish."""
    celery_app = app.extensions["celery"]
    client = app.test_client()
    assert client.post(LAUNCH, json=ADD).status_code == 202
    parent = thread_producer(celery_app)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(read)
            own = thread_producer(celery_app)
            response = app.test_client().post(LAUNCH, json=ADD)
            ok = own is not parent and own.connection is not parent.connection
            os.write(write, json.dumps({"ok": ok, "status": response.status_code,
                                        "id": response.get_json()["task_id"]}).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = json.loads(pipe.read() or "{}")
    os.waitpid(pid, 0)
    assert child == {"ok": True, "status": 202, "id": child.get("id")}
    after = client.post(LAUNCH, json=ADD)  # the parent's producer, still sound
    assert after.status_code == 202 and thread_producer(celery_app) is parent
    assert {child["id"], after.get_json()["task_id"]} <= queued_ids(redis_server)

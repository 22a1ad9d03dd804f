"""GET /stats from one snapshot kept fresh for every API process (services/stats.py).

Real gunicorn processes, real workers, a private redis-server (and RabbitMQ for the
stack without Redis). Nothing here asserts how fast an answer comes: each test waits
for a condition with a deadline, and every answer is checked against the bound it
states (``snapshot_age_seconds <= snapshot_max_age_seconds``), which the service
enforces by refreshing before it answers.
"""

from __future__ import annotations

import os
import re
import signal
import threading

import pytest
import requests

from tests.support import (
    LiveServer,
    RedisServer,
    Worker,
    build_app,
    free_port,
    make_config,
    service_env,
    wait_for,
)

pytestmark = pytest.mark.integration

FAST = {
    "CELERY_API_INSPECT_TIMEOUT": "0.5",
    "CELERY_API_STATS_REFRESH_SECONDS": "0.3",
    "CELERY_API_STATS_IDLE_SECONDS": "4",
}
WORKERS_PART = {"active_tasks", "scheduled_tasks", "registered_tasks", "worker_stats",
                "workers_online"}


def ask(server: LiveServer) -> dict:
    """One GET /stats; the answer has every field and is within the bound it states."""
    response = requests.get(f"{server.url}/api/celery/stats", timeout=15)
    assert response.status_code == 200, response.text
    body = response.json()
    assert WORKERS_PART | {"queues", "snapshot_at", "snapshot_age_seconds"} <= set(body)
    assert body["snapshot_max_age_seconds"] == 5.0
    assert 0 <= body["snapshot_age_seconds"] <= body["snapshot_max_age_seconds"], body
    return body


def rounds(server: LiveServer) -> dict[str, float]:
    """The server's ``celery_api_stats_rounds_total``, by who sent the round."""
    text = requests.get(f"{server.url}/metrics", timeout=15).text
    found = re.findall(r'^celery_api_stats_rounds_total\{by="(\w+)"\} ([\d.e+]+)$', text, re.M)
    counts = {"refresher": 0.0, "request": 0.0}
    counts.update({by: float(value) for by, value in found})
    return counts


class Shared:
    def __init__(self, folder, redis_server):
        self.redis = redis_server
        config = make_config(folder, redis_server.url)
        self.app = build_app(config)
        self.celery = self.app.extensions["celery"]
        # The test's own view of the store the API processes share (same broker: same keys).
        self.store = self.app.extensions["celery_api.stats"].store
        self.env = dict(service_env(config), **FAST)
        self.folder = folder
        host = os.uname().nodename
        self.worker = Worker(self.env, f"stats-1@{host}", folder / "worker-1.log").start(
            self.celery)
        self.apis = [LiveServer(self.env, folder / f"api-{n}.log", WEB_CONCURRENCY="1")
                     .start() for n in ("a", "b")]

    def holder(self) -> str | None:
        value = self.store.client.get(self.store.lock_key)
        return value.decode() if value else None

    def logs(self) -> str:
        return "".join(api.log_path.read_text(errors="replace") for api in self.apis)

    def stop(self):
        for process in (*self.apis, self.worker):
            process.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stats-shared")
    server = RedisServer(folder / "redis").start()
    system = Shared(folder, server)
    yield system
    system.stop()
    server.stop()


def test_one_refresher_serves_every_process(shared):
    a, b = shared.apis
    # Both processes answer with the very same snapshot (taken once, read from Redis).
    wait_for(lambda: ask(a)["snapshot_at"] == ask(b)["snapshot_at"], timeout=30,
             message="both API processes to serve one snapshot")
    before = [rounds(a), rounds(b)]
    seen = set()
    wait_for(lambda: seen.update({ask(a)["snapshot_at"], ask(b)["snapshot_at"]})
             or len(seen) >= 4, timeout=30, message="the snapshot to be refreshed")
    after = [rounds(a), rounds(b)]
    refreshed = [after[n]["refresher"] - before[n]["refresher"] for n in (0, 1)]
    # One process sent every round; the other only read; no caller paid a round.
    assert sorted(refreshed)[0] == 0 and sorted(refreshed)[1] >= 3, refreshed
    assert [after[n]["request"] - before[n]["request"] for n in (0, 1)] == [0, 0]
    assert shared.worker.name in ask(a)["workers_online"]


def test_a_new_worker_appears_and_a_stopped_one_disappears(shared):
    a, b = shared.apis
    ask(a)  # someone is asking: the refresher runs
    second = Worker(shared.env, f"stats-2@{os.uname().nodename}",
                    shared.folder / "worker-2.log").start(shared.celery)
    try:
        wait_for(lambda: second.name in ask(a)["workers_online"]
                 and second.name in ask(b)["worker_stats"], timeout=30,
                 message="the new worker in the snapshot")
    finally:
        second.stop()
    body = wait_for(lambda: (body := ask(b)) and second.name not in body["workers_online"]
                    and body, timeout=30, message="the stopped worker to leave the snapshot")
    assert shared.worker.name in body["workers_online"]
    assert second.name not in body["active_tasks"]


def test_when_the_refreshing_process_dies_another_takes_over(shared):
    a, b = shared.apis
    # A caller that finds the snapshot stale starts refreshing (one that finds it fresh
    # just reads it): ask until some process holds the lock.
    holder = wait_for(lambda: ask(a) and shared.holder(), timeout=30,
                      message="a refresher to hold the lock")
    pid = int(holder.split(":")[1])
    os.kill(pid, signal.SIGKILL)  # a gunicorn worker of ours: its master starts another
    # The other callers go on being answered within the bound, and one of them takes over.
    taken = wait_for(lambda: ask(b) and ask(a) and (now := shared.holder()) and now != holder
                     and now, timeout=60, message="another process to take over refreshing")
    assert int(taken.split(":")[1]) != pid
    first = ask(b)["snapshot_at"]
    wait_for(lambda: ask(b)["snapshot_at"] != first, timeout=30,
             message="the new refresher to refresh")


def test_refreshing_stops_when_nobody_asks(shared):
    a, _b = shared.apis
    wait_for(lambda: ask(a) and shared.holder(), timeout=30, message="a refresher to run")
    marker = shared.logs().count("nobody asked")
    # Nobody asks now. Were it still refreshed, the stored snapshot would stay young.
    wait_for(lambda: shared.logs().count("nobody asked") > marker, timeout=60,
             message="the refresher to stop after the quiet period")
    quiet = rounds(a)["refresher"] + rounds(shared.apis[1])["refresher"]
    wait_for(lambda: shared.store.peek().age() > 2.0, timeout=30,
             message="the unrefreshed snapshot to age")
    assert shared.holder() is None
    assert rounds(a)["refresher"] + rounds(shared.apis[1])["refresher"] == quiet
    # The next caller gets an answer within the bound, and refreshing starts again.
    wait_for(lambda: ask(a) and shared.holder(), timeout=30,
             message="refreshing to start again")


def test_broker_down_is_503_then_recovers(shared):
    a, _b = shared.apis
    ask(a)
    shared.redis.stop()  # the broker, and the store of the snapshot

    def refused():
        response = requests.get(f"{a.url}/api/celery/stats", timeout=30)
        if response.status_code == 200:  # the last snapshot, while within its bound
            body = response.json()
            assert body["snapshot_age_seconds"] <= body["snapshot_max_age_seconds"], body
            return None
        return (response,)  # a tuple: a 503 Response is falsy

    try:
        (response,) = wait_for(refused, timeout=30, message="stats to answer 503")
        assert response.status_code == 503, response.text
        assert response.headers["Content-Type"] == "application/problem+json"
        assert "broker" in response.json()["detail"]
        assert int(response.headers["Retry-After"]) > 0
    finally:
        shared.redis.start()
    wait_for(lambda: requests.get(f"{a.url}/api/celery/stats", timeout=15).status_code == 200,
             timeout=60, message="stats to answer once the broker is back")
    wait_for(lambda: shared.worker.name in ask(a)["workers_online"], timeout=60,
             message="the worker in the snapshot again")


def test_without_redis_each_process_refreshes_its_own(tmp_path, rabbitmq_vhost, redis_server):
    """RabbitMQ broker, no REDIS_URL: a snapshot per process, refreshed in the process."""
    config = make_config(tmp_path, rabbitmq_vhost)
    config["CELERY"]["result_backend"] = redis_server.url.replace("/0", "/13")
    app = build_app(config)
    env = dict(service_env(config), **FAST)
    env.pop("REDIS_URL", None)
    worker = Worker(env, f"stats-rabbit@{os.uname().nodename}", tmp_path / "worker.log",
                    queues="stats-rabbit").start(app.extensions["celery"])
    api = LiveServer(env, tmp_path / "api.log", WEB_CONCURRENCY="1").start()
    try:
        assert rounds(api)["refresher"] == 0  # no thread before the first call
        ask(api)
        wait_for(lambda: rounds(api)["refresher"] >= 2, timeout=30,
                 message="the process's own refresher to run")
        first = ask(api)["snapshot_at"]
        body = wait_for(lambda: (body := ask(api))["snapshot_at"] != first and body,
                        timeout=30, message="a refreshed snapshot")
        assert worker.name in body["workers_online"]
    finally:
        api.stop()
        worker.stop()


def test_the_refresher_starts_on_the_first_call_and_stops_cleanly(tmp_path):
    """No thread at app creation (so none in a worker, a CLI or before gunicorn's
    fork); one after the first call; close() (run at exit) stops it and frees the lock."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        app = build_app(make_config(tmp_path, server.url, STATS_MAX_AGE_SECONDS=5,
                                    STATS_REFRESH_SECONDS=0.3))
        state = app.extensions["celery_api.stats"]

        def refreshers():
            return [t for t in threading.enumerate() if t.name == "stats-refresher"]

        assert refreshers() == [] and state.refresher is None
        body = app.test_client().get("/api/celery/stats").get_json()
        assert body["snapshot_age_seconds"] <= body["snapshot_max_age_seconds"] == 5
        assert len(refreshers()) == 1
        assert state.store.client.get(state.store.lock_key).decode() == state.owner
        state.close()
        assert refreshers() == []
        assert state.store.client.get(state.store.lock_key) is None
    finally:
        server.stop()


def test_a_max_age_that_a_round_can_outlast_is_refused_at_startup(tmp_path):
    """A round is as old as its inspect timeout (plus the broker's) when it is written:
    with a max age at or below that, /stats could not keep the bound it states."""
    from celery_api.settings import ConfigurationError

    broker = f"redis://127.0.0.1:{free_port()}/0"
    for inspect, max_age in ((6.0, 5.0), (4.5, 5.0)):  # + the 0.5 s broker timeout
        with pytest.raises(ConfigurationError) as refused:
            build_app(make_config(tmp_path / f"{inspect}", broker, INSPECT_TIMEOUT=inspect,
                                  STATS_MAX_AGE_SECONDS=max_age, BROKER_TIMEOUT=0.5))
        assert "CELERY_API_STATS_MAX_AGE_SECONDS" in str(refused.value)
        assert "CELERY_API_INSPECT_TIMEOUT" in str(refused.value)
    for inspect, max_age in ((4.4, 5.0), (6.0, 0)):  # 0: every call collects, no bound
        app = build_app(make_config(tmp_path / f"ok-{inspect}", broker,
                                    INSPECT_TIMEOUT=inspect, STATS_MAX_AGE_SECONDS=max_age,
                                    BROKER_TIMEOUT=0.5))
        assert app.extensions["celery_api.stats"].max_age == max_age

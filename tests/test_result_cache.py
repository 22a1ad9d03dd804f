"""The result cache (services.result_cache): a launch answered by an identical run in
flight or recently succeeded, with REDIS_URL (Redis decides) and without it (the
database's unique index decides), against a real worker and real gunicorn servers.

Executions are counted by the task itself (``acme.count_cached``: an INCRBY and an SADD
of its id in the result backend's Redis), never by the history.
"""

from __future__ import annotations

import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import redis
import requests
import sqlalchemy as sa

from celery_api.extensions import db
from celery_api.models import TaskRun
from celery_api.services import maintenance, result_cache, runstate
from tests.support import (
    LiveServer,
    RedisServer,
    Worker,
    build_app,
    close_app,
    database_url,
    final_record,
    make_config,
    raising,
    record,
    service_env,
    wait_for,
    wait_status,
)

pytestmark = pytest.mark.integration

LAUNCH = "/api/celery/tasks/launch"


@dataclass
class CacheStack:
    """An app with the result cache on (``mode``: redis or database), a real worker on
    the ``celery`` queue (``parked`` is never consumed: runs there stay in flight)."""

    mode: str
    app: object
    config: dict
    worker: Worker
    folder: Path
    redis_url: str | None

    def __post_init__(self):
        self.client = self.app.test_client()
        self.celery = self.app.extensions["celery"]

    def env(self) -> dict:
        env = dict(service_env(self.config), CELERY_API_RESULT_CACHE="on")
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        return env


@pytest.fixture(scope="module")
def cache_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("cache-redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=[("redis", "sqlite"), ("database", "sqlite"),
                                        ("database", "postgres")],
                ids=["redis-sqlite", "database-sqlite", "database-postgres"])
def cs(request, tmp_path_factory, cache_redis):
    mode, database = request.param
    folder = tmp_path_factory.mktemp(f"cache-{mode}-{database}")
    broker = cache_redis.url.replace("/0", f"/{request.param_index}")
    redis_url = cache_redis.url.replace("/0", "/5") if mode == "redis" else None
    config = make_config(folder, broker, database_url(request, database),
                         RESULT_CACHE=True, REDIS_URL=redis_url)
    app = build_app(config)
    worker = Worker(service_env(config), f"cache-{mode}-{database}@{os.uname().nodename}",
                    folder / "worker.log")
    worker.start(app.extensions["celery"])
    yield CacheStack(mode, app, config, worker, folder, redis_url)
    worker.stop()
    close_app(app)


def post(cs, task_type="acme.count_cached", params=None, client=None, headers=None,
         **options):
    body = {"task_type": task_type, "params": params if params is not None else {}, **options}
    return (client or cs.client).post(LAUNCH, json=body, headers=headers)


def new(response) -> str:
    """The id of a new run (202, not cached)."""
    assert response.status_code == 202, response.get_data(as_text=True)
    body = response.get_json()
    assert body["cached"] is False
    return body["task_id"]


def served(response) -> dict:
    """A launch answered by an identical run: 200, cached, its Location."""
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["cached"] is True and body["success"] is True
    assert response.headers["Location"] == f"/api/celery/tasks/{body['task_id']}"
    assert body["status_url"] == response.headers["Location"]
    return body


def counted(cs, key: str) -> tuple[int, set[str]]:
    client = cs.celery.backend.client
    count = int(client.get(f"acme:count:{key}") or 0)
    return count, {member.decode() for member in client.smembers(f"acme:runs:{key}")}


def runs_of(cs, task_type: str, key: str) -> list[str]:
    """The recorded runs of ``task_type`` whose params name ``key``."""
    with cs.app.app_context():
        rows = db.session.execute(sa.select(TaskRun.id, TaskRun.params)
                                  .where(TaskRun.task_type == task_type)).all()
        db.session.remove()
    return [run_id for run_id, params in rows if params.get("key") == key]


def pointer(cs, task_id: str) -> str | None:
    """What the Redis key of ``task_id``'s identity names (redis mode)."""
    run = record(cs, task_id)
    client = redis.Redis.from_url(cs.redis_url)
    named = client.get(result_cache.PREFIX + run.cache_key)
    return named.decode() if named else None


def test_an_identical_launch_in_flight_is_answered_by_it(cs):
    key = uuid.uuid4().hex
    first = new(post(cs, params={"key": key}, queue="parked"))
    # The same params in another order, and with the defaults the schema applies.
    again = served(post(cs, params={"seconds": 0, "step": 1, "key": key}, queue="parked"))
    assert again["task_id"] == first and again["status"] == "PENDING"
    assert "result cache" in again["message"]
    # Other params, another queue, a delay, an opt-out: each a run of its own.
    others = [post(cs, params={"key": key, "step": 2}, queue="parked"),
              post(cs, params={"key": key}, queue="parked", priority=3),
              post(cs, params={"key": key}, queue="parked", countdown=600),
              post(cs, params={"key": key}, queue="parked", expires=600),
              post(cs, params={"key": key}, queue="parked", cache_ttl=0),
              post(cs, params={"key": key}, queue="parked", cache_ttl=0)]
    ids = {new(response) for response in others}
    assert len(ids) == 6 and first not in ids
    assert len(runs_of(cs, "acme.count_cached", key)) == 7
    # Revoked: never served again; the next launch is a new run, which then answers.
    assert cs.client.delete(f"/api/celery/tasks/{first}").status_code == 200
    second = new(post(cs, params={"key": key}, queue="parked"))
    assert served(post(cs, params={"key": key}, queue="parked"))["task_id"] == second
    for run_id in ids | {second}:
        cs.client.delete(f"/api/celery/tasks/{run_id}")


def test_a_launch_with_its_own_webhook_url_is_a_run_of_its_own(cs, monkeypatch):
    from celery_api.services import webhooks

    monkeypatch.setitem(cs.app.config, "WEBHOOK_SECRET", webhooks.new_secret())
    monkeypatch.setitem(cs.app.config, "WEBHOOK_ALLOWED_HOSTS", ["127.0.0.1:9"])
    key = uuid.uuid4().hex
    first = new(post(cs, params={"key": key}, queue="parked"))
    # Its events must reach that URL: an identical run in flight does not answer it.
    hooked = new(post(cs, params={"key": key}, queue="parked",
                      webhook_url="http://127.0.0.1:9/hook"))
    assert hooked != first
    assert served(post(cs, params={"key": key}, queue="parked"))["task_id"] == first
    for run_id in (first, hooked):
        cs.client.delete(f"/api/celery/tasks/{run_id}")


def test_a_success_answers_for_its_ttl_and_not_a_moment_longer(cs, monkeypatch):
    key = uuid.uuid4().hex
    first = new(post(cs, params={"key": key}))
    run = final_record(cs, first)
    assert (run.status, run.result) == ("SUCCESS", 1)
    again = served(post(cs, params={"key": key}))
    assert (again["task_id"], again["status"]) == (first, "SUCCESS")
    # acme.count_cached declares 60 s: served until 60 s after the run finished...
    monkeypatch.setattr(result_cache, "now",
                        lambda: run.finished_at + timedelta(seconds=60, microseconds=-1))
    assert served(post(cs, params={"key": key}))["task_id"] == first
    # ... and a new run from that moment on, which then answers in its turn.
    monkeypatch.setattr(result_cache, "now", lambda: run.finished_at + timedelta(seconds=60))
    second = new(post(cs, params={"key": key}))
    assert served(post(cs, params={"key": key}))["task_id"] == second
    assert final_record(cs, second).result == 2
    assert counted(cs, key) == (2, {first, second})
    # A launch's own cache_ttl is the age it accepts: a shorter one asks for a new run.
    finished = final_record(cs, second).finished_at
    monkeypatch.setattr(result_cache, "now", lambda: finished + timedelta(seconds=5))
    third = new(post(cs, params={"key": key}, cache_ttl=5))
    wait_status(cs, third, "SUCCESS")
    assert counted(cs, key)[0] == 3


def test_failures_are_never_served_and_types_without_a_ttl_opt_in(cs):
    # acme.boom declares no cache_ttl: the launch opts in with its own.
    failed = new(post(cs, "acme.boom", cache_ttl=60))
    assert final_record(cs, failed).status == "FAILURE"
    again = new(post(cs, "acme.boom", cache_ttl=60))
    assert again != failed
    # Without cache_ttl, a type that declares none is never deduplicated...
    key = uuid.uuid4().hex
    plain = [new(post(cs, "acme.count", {"key": key}, queue="parked")) for _ in range(2)]
    assert plain[0] != plain[1]
    # ... and with it, it is.
    opted = new(post(cs, "acme.count", {"key": key}, queue="parked", cache_ttl=30))
    assert served(post(cs, "acme.count", {"key": key}, queue="parked",
                       cache_ttl=30))["task_id"] == opted
    for run_id in [*plain, opted]:
        cs.client.delete(f"/api/celery/tasks/{run_id}")


def test_a_served_run_that_then_fails_answers_no_more(cs):
    key = uuid.uuid4().hex
    first = new(post(cs, params={"key": key}, queue="parked"))
    assert served(post(cs, params={"key": key}, queue="parked"))["task_id"] == first
    with cs.app.app_context():  # the end its worker would write
        assert runstate.finish(first, "FAILURE", error="RuntimeError: it failed")
        db.session.commit()
    second = new(post(cs, params={"key": key}, queue="parked"))
    assert second != first
    if cs.mode == "redis":
        assert pointer(cs, second) == second
    cs.client.delete(f"/api/celery/tasks/{second}")


def test_a_run_asked_to_terminate_answers_no_more(cs):
    key = uuid.uuid4().hex
    first = new(post(cs, params={"key": key, "seconds": 30}))
    wait_status(cs, first, {"STARTED", "PROGRESS"})
    stop = cs.client.delete(f"/api/celery/tasks/{first}?terminate=true")
    assert stop.status_code == 202, stop.get_data(as_text=True)
    # Still running until the worker confirms, but no longer an answer.
    second = new(post(cs, params={"key": key, "seconds": 30}))
    assert second != first
    assert final_record(cs, first).status == "REVOKED"
    stop = cs.client.delete(f"/api/celery/tasks/{second}?terminate=true")
    assert stop.status_code in (200, 202)
    final_record(cs, second)


def test_a_purged_run_answers_no_more(cs):
    """Its record is gone; with REDIS_URL the key still names it until replaced."""
    key = uuid.uuid4().hex
    first = new(post(cs, params={"key": key}))
    run = final_record(cs, first)
    if cs.mode == "redis":
        assert pointer(cs, first) == first
    wait_for(lambda: result_cache.now() > run.finished_at, message="the clock to pass it")
    with cs.app.app_context():
        purged = maintenance.purge(older_than_days=0)
        db.session.remove()
    assert purged >= 1 and record(cs, first) is None
    second = new(post(cs, params={"key": key}))
    assert served(post(cs, params={"key": key}))["task_id"] == second
    if cs.mode == "redis":
        assert pointer(cs, second) == second
    wait_status(cs, second, "SUCCESS")


def test_a_batch_always_launches_its_runs(cs):
    key = uuid.uuid4().hex
    first = new(post(cs, params={"key": key}, queue="parked"))
    item = {"task_type": "acme.count_cached", "params": {"key": key}, "queue": "parked",
            "cache_ttl": 60}
    answer = cs.client.post("/api/celery/tasks/batch", json={"tasks": [item, item]})
    assert answer.status_code == 202, answer.get_data(as_text=True)
    tasks = answer.get_json()["tasks"]
    assert [t["cached"] for t in tasks] == [False, False]
    ids = {t["task_id"] for t in tasks}
    assert len(ids) == 2 and first not in ids
    # Batch runs carry no identity: the single launch is still answered by its own.
    assert served(post(cs, params={"key": key}, queue="parked"))["task_id"] == first
    cs.client.delete(f"/api/celery/batches/{answer.get_json()['batch_id']}")
    cs.client.delete(f"/api/celery/tasks/{first}")


def test_idempotency_key_replays_its_own_first_answer(cs):
    key = uuid.uuid4().hex
    params = {"key": key}

    def keyed(name):
        return {"Idempotency-Key": f"{key}-{name}"}

    first = post(cs, params=params, queue="parked", headers=keyed("a"))
    run_id = new(first)
    by_cache = post(cs, params=params, queue="parked", headers=keyed("b"))
    assert served(by_cache)["task_id"] == run_id
    # Each key replays the answer it got first: 202 for a, 200 (cached) for b.
    replay_a = post(cs, params=params, queue="parked", headers=keyed("a"))
    assert replay_a.status_code == 202 and replay_a.headers["Idempotent-Replayed"] == "true"
    assert replay_a.get_json() == first.get_json()
    assert cs.client.delete(f"/api/celery/tasks/{run_id}").status_code == 200
    replay_b = post(cs, params=params, queue="parked", headers=keyed("b"))
    assert replay_b.status_code == 200 and replay_b.headers["Idempotent-Replayed"] == "true"
    assert replay_b.get_json() == by_cache.get_json()
    # A new key after the revoke: a new run.
    fresh = new(post(cs, params=params, queue="parked", headers=keyed("c")))
    assert fresh != run_id
    cs.client.delete(f"/api/celery/tasks/{fresh}")


def test_a_launch_held_between_its_lookup_and_its_claim_is_answered_by_the_winner(
        cs, monkeypatch):
    """The race, reproduced: launch A looks up (a miss) and is held there while launch B
    looks up (a miss), starts its run and answers. A's lookup is then stale (a run of
    the identity exists); A must still not start a second run: the claim (Redis) or the
    unique index (database) refuses it, and B's run answers A."""
    key = uuid.uuid4().hex
    params = {"key": key}
    store_class = type(cs.app.extensions["celery_api.result_cache"])
    real_find = store_class.find
    held, first_call = threading.Event(), threading.Lock()
    answers: dict = {}
    stale: list = []

    def find(self, cache_key, ttl):
        found = real_find(self, cache_key, ttl)
        if first_call.acquire(blocking=False):  # launch A, once
            assert found[0] is None
            held.set()
            wait_for(lambda: "b" in answers, timeout=30, message="launch B to answer")
            stale.append(runs_of(cs, "acme.count_cached", key))
        return found

    monkeypatch.setattr(store_class, "find", find)

    def launch_a():
        answers["a"] = post(cs, params=params, queue="parked", client=cs.app.test_client())

    thread = threading.Thread(target=launch_a)
    thread.start()
    assert held.wait(30)
    answers["b"] = post(cs, params=params, queue="parked", client=cs.app.test_client())
    thread.join(30)
    winner = new(answers["b"])
    # A really was in the window: it saw a miss, yet B's run was recorded by then.
    assert stale == [[winner]]
    assert served(answers["a"])["task_id"] == winner
    assert runs_of(cs, "acme.count_cached", key) == [winner]
    cs.client.delete(f"/api/celery/tasks/{winner}")


def test_a_run_whose_publish_fails_after_answering_others_says_it_never_ran(
        cs, monkeypatch):
    """Launch A's publish fails (the broker, after its timeout) once launch B has been
    answered by A's run: B's id must not become a 404. A answers 503; its run stays, a
    FAILURE that says it never ran, and answers no more."""
    from kombu.exceptions import OperationalError

    from celery_api.services import launch as launch_service

    key = uuid.uuid4().hex
    answers: dict = {}

    def publish(*args, **kwargs):
        wait_for(lambda: "b" in answers, timeout=30, message="launch B to answer")
        raise OperationalError("the broker is down (injected)")

    monkeypatch.setattr(launch_service, "publish", publish)

    def launch_a():
        answers["a"] = post(cs, params={"key": key}, client=cs.app.test_client())

    thread = threading.Thread(target=launch_a)
    thread.start()
    wait_for(lambda: runs_of(cs, "acme.count_cached", key), timeout=30,
             message="launch A to record its run")
    answers["b"] = post(cs, params={"key": key}, client=cs.app.test_client())
    thread.join(30)
    assert answers["a"].status_code == 503, answers["a"].get_data(as_text=True)
    doomed = served(answers["b"])["task_id"]
    monkeypatch.undo()
    shown = cs.client.get(f"/api/celery/tasks/{doomed}")
    assert shown.status_code == 200 and shown.get_json()["status"] == "FAILURE"
    assert "not published, never ran" in shown.get_json()["error"]
    fresh = new(post(cs, params={"key": key}))
    assert fresh != doomed
    wait_status(cs, fresh, "SUCCESS")
    assert counted(cs, key) == (1, {fresh})


def test_concurrent_duplicates_on_two_gunicorns_make_one_run(cs):
    key = uuid.uuid4().hex
    servers = []
    for n in (1, 2):
        metrics = cs.folder / f"metrics-{n}-{key}"
        metrics.mkdir()
        servers.append(LiveServer(cs.env(), cs.folder / f"api-{n}.log", WEB_CONCURRENCY="2",
                                  PROMETHEUS_MULTIPROC_DIR=str(metrics)).start())
    try:
        start = threading.Barrier(20)

        def send(n: int):
            start.wait(30)
            return requests.post(f"{servers[n % 2].url}{LAUNCH}", timeout=30, json={
                "task_type": "acme.count_cached", "params": {"key": key, "seconds": 0.5}})

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(send, range(20)))
        codes = sorted(a.status_code for a in answers)
        assert codes == [200] * 19 + [202], [a.text for a in answers]
        assert len({a.json()["task_id"] for a in answers}) == 1
        assert [a.json()["cached"] for a in answers].count(False) == 1
        task_id = answers[0].json()["task_id"]
        assert runs_of(cs, "acme.count_cached", key) == [task_id]
        assert final_record(cs, task_id).status == "SUCCESS"
        assert counted(cs, key) == (1, {task_id})
        metrics = requests.get(f"{servers[0].url}/metrics", timeout=10).text
        assert 'celery_api_result_cache_total{outcome="hit",task_type="acme.count_cached"}' \
            in metrics or 'celery_api_result_cache_total{task_type="acme.count_cached",' \
            'outcome="hit"}' in metrics
    finally:
        for server in servers:
            server.stop()


def test_the_contract_documents_the_cache(cs):
    spec = cs.client.get("/api/openapi.json").get_json()
    launch = spec["paths"]["/api/celery/tasks/launch"]["post"]
    assert {"200", "202"} <= launch["responses"].keys()
    for code in ("200", "202"):
        assert {"Location", "Idempotent-Replayed"} <= launch["responses"][code]["headers"].keys()
    response = spec["components"]["schemas"]["TaskLaunchResponse"]
    assert "cached" in response["required"]
    options = spec["components"]["schemas"]["LaunchOptions"]["properties"]
    assert options["cache_ttl"]["minimum"] == 0
    catalog = {t["task_type"]: t for t in cs.client.get("/api/celery/tasks").get_json()}
    assert catalog["acme.count_cached"]["cache_ttl"] == 60
    assert catalog["acme.count"]["cache_ttl"] is None
    assert catalog["sii.sync_documents"]["cache_ttl"] == 300
    assert catalog["sii.sync_f29"]["cache_ttl"] == 3600


def test_the_setting_is_on_or_off(monkeypatch):
    from celery_api.settings import ConfigurationError, env_switch

    for value, expected in (("on", True), (" OFF ", False), ("1", True), ("false", False)):
        monkeypatch.setenv("CELERY_API_RESULT_CACHE", value)
        assert env_switch("CELERY_API_RESULT_CACHE", True) is expected
    monkeypatch.setenv("CELERY_API_RESULT_CACHE", "sometimes")
    with pytest.raises(ConfigurationError, match="CELERY_API_RESULT_CACHE must be 'on' or"):
        env_switch("CELERY_API_RESULT_CACHE", True)


def test_the_cache_can_be_turned_off(cs, tmp_path):
    off = build_app(dict(cs.config, RESULT_CACHE=False, INSTANCE_PATH=tmp_path))
    client = off.test_client()
    key = uuid.uuid4().hex
    ids = [new(post(cs, params={"key": key}, queue="parked", client=client))
           for _ in range(2)]
    assert ids[0] != ids[1]
    for run_id in ids:
        client.delete(f"/api/celery/tasks/{run_id}")


def test_a_redis_that_does_not_answer_leaves_the_database_to_decide(cs, tmp_path):
    if cs.mode != "redis":
        pytest.skip("REDIS_URL only")
    from tests.support import free_port

    down = build_app(dict(cs.config, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                          INSTANCE_PATH=tmp_path))
    client = down.test_client()
    key = uuid.uuid4().hex
    first = new(post(cs, params={"key": key}, queue="parked", client=client))
    assert served(post(cs, params={"key": key}, queue="parked", client=client))[
        "task_id"] == first
    # The Redis-backed app still finds it: its insert meets the database's index.
    assert served(post(cs, params={"key": key}, queue="parked"))["task_id"] == first
    client.delete(f"/api/celery/tasks/{first}")


def test_with_redis_the_claim_alone_decides(cs, monkeypatch):
    """The same race with the database's index dropped: Redis's compare-and-set alone
    keeps it to one run (without it, and without the index, A starts a second run)."""
    if cs.mode != "redis":
        pytest.skip("REDIS_URL only")
    index = next(i for i in TaskRun.__table__.indexes if i.name == "ux_task_runs_open_cache_key")
    with cs.app.app_context():
        index.drop(db.engine)
    try:
        test_a_launch_held_between_its_lookup_and_its_claim_is_answered_by_the_winner(
            cs, monkeypatch)
    finally:
        with cs.app.app_context():
            index.create(db.engine)


def test_a_generated_client_reads_a_cached_answer(cs, tmp_path):
    """openapi-python-client types both success codes of launchTask: 202 and 200."""
    if cs.mode != "redis":
        pytest.skip("the contract is the same on every store: once")
    import importlib
    import json

    from tests.support import python_client

    api = LiveServer(cs.env(), tmp_path / "api.log").start()
    try:
        spec = requests.get(f"{api.url}/api/openapi.json", timeout=5).json()
        with python_client(json.dumps(spec), tmp_path, "cache_client") as package:
            client = package.Client(base_url=api.url, raise_on_unexpected_status=True)
            models = importlib.import_module("cache_client.models")
            launch_task = importlib.import_module("cache_client.api.tasks.launch_task")
            body = models.LaunchAcmeCountCached.from_dict({
                "task_type": "acme.count_cached", "params": {"key": uuid.uuid4().hex},
                "queue": "parked"})
            first = launch_task.sync_detailed(client=client, body=body)
            again = launch_task.sync_detailed(client=client, body=body)
    finally:
        api.stop()
    assert first.status_code == 202 and first.parsed.cached is False
    assert again.status_code == 200 and isinstance(again.parsed, models.TaskLaunchResponse)
    assert again.parsed.cached is True and again.parsed.task_id == first.parsed.task_id
    cs.client.delete(f"/api/celery/tasks/{first.parsed.task_id}")


def test_a_launch_recorded_after_an_identical_run_succeeded_is_answered_by_it(
        cs, monkeypatch):
    """Launch B misses and is held just before its insert while launch A records,
    publishes and succeeds (with REDIS_URL, A finds the key naming B's run, not recorded
    yet). The unique index covers unfinished runs only, so B's insert passes: B must
    look again before it publishes, remove its record and be answered by A's run."""
    from celery_api.services import launch as launch_service

    key = uuid.uuid4().hex
    real_record = launch_service.record_runs
    arrived, gate = threading.Event(), threading.Event()

    def record_runs(prepared):
        if threading.current_thread().name == "launch-b":
            arrived.set()
            assert gate.wait(30)
        return real_record(prepared)

    monkeypatch.setattr(launch_service, "record_runs", record_runs)
    answers: dict = {}

    def launch_b():
        answers["b"] = post(cs, params={"key": key}, client=cs.app.test_client())

    thread = threading.Thread(target=launch_b, name="launch-b")
    thread.start()
    assert arrived.wait(30)
    first = new(post(cs, params={"key": key}))
    assert final_record(cs, first).status == "SUCCESS"
    gate.set()
    thread.join(30)
    assert served(answers["b"])["task_id"] == first
    assert runs_of(cs, "acme.count_cached", key) == [first]
    assert served(post(cs, params={"key": key}))["task_id"] == first
    if cs.mode == "redis":
        assert pointer(cs, first) == first
    assert counted(cs, key) == (1, {first})


def test_a_success_is_found_when_the_redis_key_is_gone(cs):
    """A FLUSHDB, a restart without persistence or the key's own expiry (set from a
    launch's short cache_ttl) must not hide a success from a launch that accepts it."""
    if cs.mode != "redis":
        pytest.skip("REDIS_URL only")
    key = uuid.uuid4().hex
    client = redis.Redis.from_url(cs.redis_url)
    first = new(post(cs, params={"key": key}))
    assert final_record(cs, first).status == "SUCCESS"
    client.flushdb()
    assert served(post(cs, params={"key": key}))["task_id"] == first
    assert pointer(cs, first) == first  # the key names it again
    # A run started by a launch with cache_ttl=1; its key gone as at that expiry.
    other = {"key": key, "step": 2}
    short = new(post(cs, params=other, cache_ttl=1))
    assert final_record(cs, short).status == "SUCCESS"
    client.delete(result_cache.PREFIX + record(cs, short).cache_key)
    assert served(post(cs, params=other, cache_ttl=86400))["task_id"] == short
    assert counted(cs, key) == (3, {first, short})


def test_a_terminate_that_was_not_sent_leaves_the_run_in_the_cache(cs, monkeypatch):
    """The revoke broadcast fails (503): the run, still running, is put back with its
    identity, so an identical launch is still answered by it, not a second run."""
    key = uuid.uuid4().hex
    params = {"key": key, "seconds": 30}
    first = new(post(cs, params=params))
    wait_status(cs, first, {"STARTED", "PROGRESS"})

    monkeypatch.setattr(cs.celery.control, "revoke",
                        raising(OSError("the broker is down (injected)")))
    stop = cs.client.delete(f"/api/celery/tasks/{first}?terminate=true")
    assert stop.status_code == 503, stop.get_data(as_text=True)
    monkeypatch.undo()
    run = record(cs, first)
    assert run.cache_key is not None and run.error is None
    assert served(post(cs, params=params))["task_id"] == first
    assert cs.client.delete(f"/api/celery/tasks/{first}?terminate=true").status_code == 202
    assert final_record(cs, first).status == "REVOKED"


def test_a_revoke_not_sent_after_an_identical_run_took_the_identity(cs, monkeypatch):
    """Between a revoke's record and its failed broadcast an identical launch starts a
    run (the revoked one no longer answers). The put-back cannot give the first run its
    identity back (the unique index): it is put back PENDING without it, so a revoke
    answered "not sent" never leaves it REVOKED, and the newer run answers."""
    key = uuid.uuid4().hex
    first = new(post(cs, params={"key": key}, queue="parked"))
    taken: list = []

    def revoke(*args, **kwargs):
        taken.append(new(post(cs, params={"key": key}, queue="parked",
                              client=cs.app.test_client())))
        raise OSError("the broker is down (injected)")

    monkeypatch.setattr(cs.celery.control, "revoke", revoke)
    answer = cs.client.delete(f"/api/celery/tasks/{first}")
    assert answer.status_code == 503, answer.get_data(as_text=True)
    monkeypatch.undo()
    run = record(cs, first)
    assert (run.status, run.cache_key, run.error) == ("PENDING", None, None)
    assert served(post(cs, params={"key": key}, queue="parked"))["task_id"] == taken[0]
    for run_id in (first, taken[0]):
        assert cs.client.delete(f"/api/celery/tasks/{run_id}").status_code == 200


def test_a_run_never_published_answers_no_longer_than_the_stranded_bound(
        cs, monkeypatch):
    """The publish fails and so does every write of its FAILURE (or the API process
    dies between record and publish): the run stays PENDING, never published. It
    answers identical launches no longer than reconcile's stranded threshold; then the
    next launch takes the identity and runs."""
    from kombu.exceptions import OperationalError
    from sqlalchemy.exc import OperationalError as DatabaseError

    from celery_api.services import launch as launch_service

    key = uuid.uuid4().hex
    monkeypatch.setattr(launch_service, "publish",
                        raising(OperationalError("the broker is down (injected)")))
    monkeypatch.setattr(runstate, "finish", raising(
        DatabaseError("UPDATE", {}, Exception("the database blinked (injected)"))))
    assert post(cs, params={"key": key}).status_code == 503
    monkeypatch.undo()
    [stranded] = runs_of(cs, "acme.count_cached", key)
    run = record(cs, stranded)
    assert run.status == "PENDING" and run.cache_key is not None
    # README: CELERY_API_RECONCILE_GRACE_SECONDS plus the broker's visibility timeout.
    transport = cs.app.config["CELERY"].get("broker_transport_options") or {}
    bound = (cs.app.config["RECONCILE_GRACE_SECONDS"]
             + transport.get("visibility_timeout", 0))
    monkeypatch.setattr(result_cache, "now",
                        lambda: run.created_at + timedelta(seconds=bound - 1))
    assert served(post(cs, params={"key": key}))["task_id"] == stranded
    monkeypatch.setattr(result_cache, "now",
                        lambda: run.created_at + timedelta(seconds=bound))
    fresh = new(post(cs, params={"key": key}))
    assert record(cs, stranded).cache_key is None
    assert final_record(cs, fresh).status == "SUCCESS"
    assert counted(cs, key) == (1, {fresh})
    cs.client.delete(f"/api/celery/tasks/{stranded}")


def test_a_failure_write_that_fails_once_is_retried(cs, monkeypatch):
    from kombu.exceptions import OperationalError
    from sqlalchemy.exc import OperationalError as DatabaseError

    from celery_api.services import launch as launch_service

    key = uuid.uuid4().hex
    real_finish = runstate.finish
    calls: list = []

    def finish(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise DatabaseError("UPDATE", {}, Exception("the database blinked (injected)"))
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(launch_service, "publish",
                        raising(OperationalError("the broker is down (injected)")))
    monkeypatch.setattr(runstate, "finish", finish)
    assert post(cs, params={"key": key}).status_code == 503
    monkeypatch.undo()
    [doomed] = runs_of(cs, "acme.count_cached", key)
    run = record(cs, doomed)
    assert run.status == "FAILURE" and "not published, never ran" in run.error
    assert new(post(cs, params={"key": key}, queue="parked")) != doomed


def test_reconcile_takes_stranded_runs_out_of_the_cache(cs, monkeypatch):
    """A PENDING run whose message no queue holds (here: never published, the API
    process gone before its publish) answers no more once reconcile finds it."""
    from celery_api.services import launch as launch_service

    key = uuid.uuid4().hex
    monkeypatch.setattr(launch_service, "_unpublished", lambda record, reason: None)
    monkeypatch.setattr(launch_service, "publish",
                        raising(SystemExit("the API process dies here (injected)")))
    with pytest.raises(SystemExit):
        post(cs, params={"key": key}, queue="parked")
    monkeypatch.undo()
    [lost] = runs_of(cs, "acme.count_cached", key)
    queued = new(post(cs, params={"key": key, "step": 2}, queue="parked"))
    assert served(post(cs, params={"key": key}, queue="parked"))["task_id"] == lost
    later = record(cs, lost).created_at + timedelta(seconds=3600)
    monkeypatch.setattr(maintenance, "utcnow", lambda: later)
    with cs.app.app_context():
        found = maintenance.reconcile(grace_seconds=0)
        db.session.remove()
    assert lost in found["stranded_ids"] and queued not in found["stranded_ids"]
    assert record(cs, lost).cache_key is None
    assert record(cs, queued).cache_key is not None  # its message is in the queue
    fresh = new(post(cs, params={"key": key}, queue="parked"))
    for run_id in (lost, queued, fresh):
        cs.client.delete(f"/api/celery/tasks/{run_id}")


def test_after_a_redis_failure_the_cache_leaves_redis_alone_for_a_while(
        cs, tmp_path, monkeypatch):
    """A Redis that fails (here: refuses; frozen, it would cost the socket timeout on
    every launch) is asked once, then skipped for BREAKER_SECONDS: launches go straight
    to the database, then Redis is tried again."""
    if cs.mode != "redis":
        pytest.skip("REDIS_URL only")
    from tests.support import free_port

    down = build_app(dict(cs.config, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                          INSTANCE_PATH=tmp_path))
    client = down.test_client()
    asked: list = []
    real_find = result_cache.RedisStore.find

    def find(self, cache_key, ttl):
        asked.append(cache_key)
        return real_find(self, cache_key, ttl)

    monkeypatch.setattr(result_cache.RedisStore, "find", find)
    ids = [new(post(cs, params={"key": uuid.uuid4().hex}, queue="parked", client=client))
           for _ in range(3)]
    assert len(asked) == 1
    breaker = down.extensions["celery_api.result_cache"]
    assert not breaker.available()
    moment = result_cache.monotonic()
    monkeypatch.setattr(result_cache, "monotonic",
                        lambda: moment + result_cache.BREAKER_SECONDS)
    ids.append(new(post(cs, params={"key": uuid.uuid4().hex}, queue="parked",
                        client=client)))
    assert len(asked) == 2
    for run_id in ids:
        client.delete(f"/api/celery/tasks/{run_id}")

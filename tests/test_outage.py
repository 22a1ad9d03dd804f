"""Outages of the broker, the database and the result backend under a running API and
worker: clear 503s, nothing lost or run that should not be, recovery without restarts."""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass

import pytest
import redis
import sqlalchemy as sa

from celery_api.extensions import db
from celery_api.models import TaskRun
from celery_api.services import maintenance
from celery_api.tasks.sii_client import SANDBOX_COMPANIES
from tests.support import (
    PostgresServer,
    RedisServer,
    Worker,
    answered,
    build_app,
    close_app,
    final_record,
    launch,
    make_config,
    optional_component,
    postgres_binaries,
    record,
    service_env,
    status,
    wait_for,
    wait_status,
)

LAUNCH = {"task_type": "sii.sync_documents", "params": {"company_id": SANDBOX_COMPANIES[0]}}


def count_runs(app) -> int:
    with app.app_context():
        return db.session.execute(sa.select(sa.func.count()).select_from(TaskRun)).scalar_one()


def test_broker_outage_503_fast_then_recovers_and_loses_nothing(tmp_path):
    """Redis (with its append-only file, as in production) stopped under an API and a
    worker: 503s fast, reads answer, and after the restart the 202s all run, the 503s
    never do, with neither API nor worker restarted."""
    server, stack, backend, key, count = _counting_stack(tmp_path, "broker-outage",
                                                         persistent=True)
    try:
        ran = launch(stack, "acme.count", {"key": key})
        wait_status(stack, ran, "SUCCESS")
        # Accepted while no worker consumes its queue: it waits in the broker.
        waiting = launch(stack, "acme.count", {"key": key}, queue="parked")

        server.stop()

        response = answered(lambda: stack.client.post("/api/celery/tasks/launch", json=count))
        _problem(response, 503, "broker is unreachable")
        assert int(response.headers["Retry-After"]) > 0
        # The two published, and the 503 launch's record closed as never run.
        assert count_runs(stack.app) == 3
        assert _never_ran(stack.app) == 1
        # Reads still answer from the record; what needs the broker says so.
        assert status(stack, ran)["status"] == "SUCCESS"
        assert status(stack, waiting)["status"] == "PENDING"
        assert stack.client.get("/api/celery/history").status_code == 200
        _problem(stack.client.get("/api/celery/stats"), 503, "broker")
        _problem(stack.client.delete(f"/api/celery/tasks/{waiting}"), 503, "broker")
        assert status(stack, waiting)["status"] == "PENDING"  # the failed revoke undone
        ready = stack.client.get("/readyz")
        assert ready.status_code == 503
        assert int(ready.headers["Retry-After"]) > 0  # as every 503
        assert ready.get_json()["checks"]["broker"]["status"] == "down"

        server.start()

        # The same API and worker, reconnected.
        after = wait_for(lambda: _accepted(stack.client.post(
            "/api/celery/tasks/launch", json=count)), timeout=30,
            message="launches to be accepted again")
        wait_status(stack, after, "SUCCESS", timeout=60)
        # The run accepted before the outage is still in the broker: a worker for its
        # queue runs it.
        late = Worker(stack.worker.env, f"parked@{os.uname().nodename}",
                      tmp_path / "parked.log", queues="parked").start(
                          stack.app.extensions["celery"])
        try:
            wait_status(stack, waiting, "SUCCESS", timeout=60)
        finally:
            late.stop()
        executed = {member.decode() for member in backend.smembers(f"acme:runs:{key}")}
        assert executed == {ran, waiting, after}  # the 503 launch never ran
        assert int(backend.get(f"acme:count:{key}")) == 3
        assert count_runs(stack.app) == 4
        assert _never_ran(stack.app) == 1
    finally:
        stack.worker.stop()
        server.stop()


def _never_ran(app) -> int:
    """Runs closed because their publish failed (each launch answered 503)."""
    with app.app_context():
        return db.session.execute(
            sa.select(sa.func.count()).select_from(TaskRun)
            .where(TaskRun.status == "FAILURE",
                   TaskRun.error.like("not published, never ran%"))).scalar_one()


def _counting_stack(tmp_path, name: str, persistent: bool = False):
    """A private redis-server (broker and results), an API and a worker on it, and
    what counts the runs of one key (acme.count): (server, stack, backend, key, the
    launch body)."""
    server = RedisServer(tmp_path / "redis", persistent=persistent).start()
    stack = _start_stack(tmp_path, server.url, server.url, None, name)
    key = f"{name}-{uuid.uuid4().hex[:8]}"
    return (server, stack, redis.Redis(port=server.port), key,
            {"task_type": "acme.count", "params": {"key": key}})


def _accepted(response) -> str | None:
    if response.status_code == 202:
        return response.get_json()["task_id"]
    assert response.status_code == 503, response.get_data(as_text=True)
    return None


def test_launch_is_503_fast_when_broker_accepts_but_never_answers(tmp_path):
    """A hung broker (TCP open, no replies) must not hang the API worker."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held = []

    def accept_forever():
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_forever, daemon=True).start()
    url = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    app = build_app(make_config(tmp_path, url))
    try:
        response = answered(lambda: app.test_client().post("/api/celery/tasks/launch",
                                                           json=LAUNCH))
        assert response.status_code == 503, response.get_data(as_text=True)
        assert count_runs(app) == _never_ran(app) == 1  # closed: never run
    finally:
        listener.close()
        for conn in held:
            conn.close()


# --- Database outage: a private PostgreSQL server stopped under a running API and worker.


@dataclass
class OutageStack:
    app: object
    client: object
    worker: Worker
    redis: RedisServer


@pytest.fixture
def private_postgres(tmp_path):
    binaries = postgres_binaries()
    if binaries is None:
        optional_component("PostgreSQL server", "no initdb/pg_ctl under /usr/lib/postgresql")
    server = PostgresServer(tmp_path / "pg", binaries).init().start()
    yield server
    try:
        server.stop()
    except AssertionError:
        pass  # already stopped by the test


def _start_stack(tmp_path, broker_url: str, backend_url: str, database_url: str | None,
                 name: str) -> OutageStack:
    config = make_config(tmp_path / "app", broker_url, database_url, STATS_MAX_AGE_SECONDS=0)
    config["CELERY"]["result_backend"] = backend_url
    app = build_app(config)
    worker = Worker(service_env(config), f"{name}@{os.uname().nodename}",
                    tmp_path / "worker.log").start(app.extensions["celery"])
    return OutageStack(app, app.test_client(), worker, None)


def _problem(response, status: int, words: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert words in body["detail"], body
    return body


def test_database_outage_answers_503_loses_nothing_and_recovers(tmp_path, private_postgres):
    redis_server = RedisServer(tmp_path / "redis").start()
    stack = _start_stack(tmp_path, redis_server.url, redis_server.url,
                         private_postgres.create_database("outage"), "db-outage")
    stack.redis = redis_server
    backend = redis.Redis(port=redis_server.port)
    key = f"db-outage-{uuid.uuid4().hex[:8]}"
    try:
        done = launch(stack, "acme.add", {"a": 1, "b": 2})
        wait_status(stack, done, "SUCCESS")
        # The status showed the backend's end: wait for the record, then read it once
        # (only a recorded SUCCESS enters the status cache the outage is read from).
        final_record(stack, done)
        assert status(stack, done)["result"] == {"sum": 3}
        slow = launch(stack, "acme.sleep", {"seconds": 3})
        wait_status(stack, slow, {"STARTED", "PROGRESS"})
        queued_revoke = launch(stack, "acme.add", {"a": 5, "b": 5}, queue="parked")

        private_postgres.stop()

        # Writes and reads that need the record: 503 problem+json, fast, nothing sent.
        response = answered(lambda: stack.client.post(
            "/api/celery/tasks/launch",
            json={"task_type": "acme.count", "params": {"key": key}}))
        _problem(response, 503, "database is unreachable")
        assert int(response.headers["Retry-After"]) > 0
        # A successful run read before is answered from the cache; others need the record.
        assert status(stack, done)["result"] == {"sum": 3}
        _problem(stack.client.get(f"/api/celery/tasks/{queued_revoke}"), 503, "database")
        _problem(stack.client.get("/api/celery/history"), 503, "database")
        _problem(stack.client.delete(f"/api/celery/tasks/{queued_revoke}"), 503, "database")
        _problem(stack.client.post(f"/api/celery/tasks/{done}/retry"), 503, "database")
        ready = stack.client.get("/readyz")
        assert ready.status_code == 503
        checks = ready.get_json()["checks"]
        assert checks["database"]["status"] == "down"
        assert checks["broker"]["status"] == "up"
        assert stack.client.get("/healthz").status_code == 200
        assert stack.client.get("/api/celery/stats").status_code == 200  # broker only

        # The running task finishes although its worker cannot write the record.
        wait_for(lambda: backend.exists(f"celery-task-meta-{slow}") and
                 stack.app.extensions["celery"].AsyncResult(slow).state == "SUCCESS",
                 timeout=30, message="the slow run to finish during the outage")
        wait_for(lambda: "could not record on_postrun" in stack.worker.log_text(),
                 timeout=10, message="the worker to log the failed record")

        private_postgres.start()

        # Recovery with neither the API nor the worker restarted. Beat's reconcile
        # takes the end the worker could not record from the result backend: the
        # run is not mistaken for one whose worker was lost.
        with stack.app.app_context():
            outcome = maintenance.reconcile(grace_seconds=0)
        assert outcome["settled"] == 1 and outcome["lost"] == 0, outcome
        after = launch(stack, "acme.count", {"key": key})
        assert wait_status(stack, after, "SUCCESS")["result"] == 1
        slow_body = wait_status(stack, slow, "SUCCESS")  # reconciled from the backend
        assert slow_body["result"] == {"slept": 3}
        assert status(stack, done)["result"] == {"sum": 3}
        revoked = stack.client.delete(f"/api/celery/tasks/{queued_revoke}")
        assert revoked.status_code == 200, revoked.get_data(as_text=True)
        # The 503 launch never ran: one execution for the key, the one after recovery.
        assert int(backend.get(f"acme:count:{key}")) == 1
        with stack.app.app_context():
            rows = {run.id: run for run in db.session.scalars(sa.select(TaskRun))}
            db.session.expunge_all()
        assert set(rows) == {done, slow, queued_revoke, after}
        assert rows[slow].status == "SUCCESS" and rows[slow].finished_at is not None
        assert rows[queued_revoke].status == "REVOKED"
    finally:
        stack.worker.stop()
        with stack.app.app_context():
            db.engine.dispose()
        redis_server.stop()


def test_result_backend_outage_keeps_launching_and_recording(tmp_path):
    """Results live in a Redis of their own; it goes away, the broker and database stay.

    The history is the durable record: runs launched and finished during the outage
    keep their results there, and the API answers from it.
    """
    broker = RedisServer(tmp_path / "broker").start()
    results = RedisServer(tmp_path / "results").start()
    stack = _start_stack(tmp_path, broker.url, results.url, None, "backend-outage")
    celery_app = stack.app.extensions["celery"]
    try:
        before = launch(stack, "acme.add", {"a": 1, "b": 2})
        wait_status(stack, before, "SUCCESS")

        results.stop()

        response = answered(lambda: stack.client.post(
            "/api/celery/tasks/launch",
            json={"task_type": "acme.add", "params": {"a": 20, "b": 22}}))
        assert response.status_code == 202, response.get_data(as_text=True)
        during = response.get_json()["task_id"]
        reporting = launch(stack, "acme.sleep", {"seconds": 0.5})  # progress can't be sent
        assert wait_status(stack, during, "SUCCESS", timeout=30)["result"] == {"sum": 42}
        assert wait_status(stack, reporting, "SUCCESS", timeout=30)["result"] == {
            "slept": 0.5}
        assert status(stack, before)["result"] == {"sum": 3}
        history = stack.client.get("/api/celery/history?task_type=acme.add")
        assert history.status_code == 200
        assert {row["task_id"]: row["status"] for row in history.get_json()["items"]} == {
            before: "SUCCESS", during: "SUCCESS"}
        ready = stack.client.get("/readyz")
        assert ready.status_code == 503
        checks = ready.get_json()["checks"]
        assert checks["result_backend"]["status"] == "down"
        assert checks["broker"]["status"] == "up" and checks["database"]["status"] == "up"
        assert stack.client.get("/api/celery/stats").status_code == 200

        results.start()

        after = launch(stack, "acme.add", {"a": 2, "b": 2})
        assert wait_status(stack, after, "SUCCESS")["result"] == {"sum": 4}
        final_record(stack, after)  # the status showed the backend's end: wait for the record
        wait_for(lambda: celery_app.AsyncResult(after).state == "SUCCESS", timeout=10,
                 message="the backend to hold results again")
        assert stack.client.get("/readyz").status_code == 200
        # Nothing corrupted: each run once, each with its own result.
        with stack.app.app_context():
            rows = {run.id: (run.status, run.result)
                    for run in db.session.scalars(sa.select(TaskRun))}
        assert rows == {before: ("SUCCESS", {"sum": 3}), during: ("SUCCESS", {"sum": 42}),
                        reporting: ("SUCCESS", {"slept": 0.5}),
                        after: ("SUCCESS", {"sum": 4})}
    finally:
        stack.worker.stop()
        broker.stop()
        results.stop()


def test_launches_after_the_broker_closed_every_connection_are_accepted(tmp_path):
    """The broker drops the API's connections (a restart, an idle timeout, a proxy):
    the publishing channel holds one connection (fences.kombu.reuse_redis_client), found
    closed by the next publish, which goes out again on a new one: 202 each time, and
    every accepted run's message is in the queue."""
    server = RedisServer(tmp_path / "redis").start()
    app = build_app(make_config(tmp_path, server.url))
    client = app.test_client()
    admin = redis.Redis(port=server.port)
    try:
        accepted = []
        for _ in range(4):
            response = client.post("/api/celery/tasks/launch", json=LAUNCH)
            assert response.status_code == 202, response.get_data(as_text=True)
            accepted.append(response.get_json()["task_id"])
            assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
        queued = {json.loads(raw)["headers"]["id"] for raw in admin.lrange("celery", 0, -1)}
        assert queued == set(accepted)
    finally:
        admin.close()
        close_app(app)
        server.stop()



def test_a_broker_that_stopped_answering_a_launch_never_runs_it_and_launches_resume(
        tmp_path):
    """The broker stops answering (paused: its connections stay open, nothing comes
    back) during a launch: 503. Its message may have been written before the broker
    stopped, and the broker takes it once it answers again; the run's record stays, as
    a FAILURE that never ran, so a worker that gets the message drops it: the 503 launch
    never runs (README: "A 503 launch was not published: it never runs"). And the failed
    publish left the thread's producer on a closed channel: the next launches on the
    same thread publish on a new one, 202 (seen before: 20 of 24 launches answered 500
    for minutes after a 2 s pause, until the API restarted)."""
    import signal

    server, stack, backend, key, count = _counting_stack(tmp_path, "paused-broker")
    try:
        first = launch(stack, "acme.count", {"key": key})
        wait_status(stack, first, "SUCCESS")
        server.process.send_signal(signal.SIGSTOP)
        try:
            refused = stack.client.post("/api/celery/tasks/launch", json=count)
            _problem(refused, 503, "broker is unreachable")
            # A batch publishes through Celery's producer pool: 503 too, its delivery
            # uncertain (README): the client revokes the batch it names.
            batch = stack.client.post("/api/celery/tasks/batch", json={"tasks": [count]})
            uncertain = _problem(batch, 503, "uncertain")
        finally:
            server.process.send_signal(signal.SIGCONT)
        batch_id = re.search(r"batches/([0-9a-f-]{36})", uncertain["detail"]).group(1)
        revoked = stack.client.delete(f"/api/celery/batches/{batch_id}")
        assert revoked.status_code == 200, revoked.get_data(as_text=True)
        batch = stack.client.post("/api/celery/tasks/batch", json={"tasks": [count] * 2})
        assert batch.status_code == 202, batch.get_data(as_text=True)
        batched = [task["task_id"] for task in batch.get_json()["tasks"]]
        after = []
        for _ in range(3):
            response = stack.client.post("/api/celery/tasks/launch", json=count)
            assert response.status_code == 202, response.get_data(as_text=True)
            after.append(response.get_json()["task_id"])
        for task_id in [*after, *batched]:
            wait_status(stack, task_id, "SUCCESS")
        with stack.app.app_context():
            unpublished = db.session.execute(
                sa.select(TaskRun).where(TaskRun.id.not_in([first, *after, *batched]),
                                         TaskRun.batch_id.is_(None))).scalars().all()
            in_doubt = db.session.execute(
                sa.select(TaskRun.id).where(TaskRun.batch_id == batch_id)).scalars().all()
        assert len(unpublished) == 1  # the 503 launch's record, kept
        assert unpublished[0].status == "FAILURE"
        assert "not published, never ran" in unpublished[0].error
        # Whatever the broker took of it has been delivered by now (the worker ran the
        # launches sent after it): dropped, never run.
        wait_for(lambda: backend.llen("celery") == 0, timeout=30, message="queue drained")
        executed = {member.decode() for member in backend.smembers(f"acme:runs:{key}")}
        assert executed == {first, *after, *batched}
        assert final_record(stack, unpublished[0].id).status == "FAILURE"
        assert [record(stack, task_id).status for task_id in in_doubt] == ["REVOKED"]
    finally:
        stack.worker.stop()
        close_app(stack.app)
        server.stop()


def _schedule_runs(app, schedule_id: str) -> list[TaskRun]:
    with app.app_context():
        rows = db.session.execute(sa.select(TaskRun).where(
            TaskRun.schedule_id == schedule_id)).scalars().all()
        db.session.expunge_all()
        return list(rows)


def test_a_schedule_ticking_through_a_broker_outage_runs_each_tick_once(tmp_path):
    """The broker stops answering while an every-second schedule fires: each tick's run
    is recorded and held, and beat publishes it once the broker answers. One run per
    tick, each executed once, none closed as a FAILURE (before: the fire was undone and
    retried with a new run at each tick, leaving one FAILURE 'not published, never ran'
    and one task.failed webhook per try: 8 for one tick of a 20 s pause)."""
    import signal
    from collections import Counter

    from tests.support import Beat

    server, stack, backend, key, _ = _counting_stack(tmp_path, "schedule-outage")
    schedule_id = None

    def succeeded() -> int:
        return sum(run.status == "SUCCESS" for run in _schedule_runs(stack.app, schedule_id))

    try:
        env = dict(service_env(dict(stack.app.config, INSTANCE_PATH=tmp_path / "app")),
                   CELERY_API_DISPATCH_INTERVAL="0.2",
                   CELERY_API_RECONCILE_INTERVAL="3600", CELERY_API_PURGE_INTERVAL="3600")
        created = stack.client.post("/api/celery/schedules", json={
            "name": f"outage-{key}", "task_type": "acme.count", "params": {"key": key},
            "interval_seconds": 1, "overlap": "allow"})
        assert created.status_code == 201, created.get_data(as_text=True)
        schedule_id = created.get_json()["id"]
        with Beat(env, tmp_path / "beat") as beat:
            wait_for(lambda: succeeded() >= 2, timeout=60, interval=0.2,
                     message="two ticks ran before the outage")
            server.process.send_signal(signal.SIGSTOP)
            try:
                wait_for(lambda: beat.log_text().count("held until the task broker") >= 2,
                         timeout=90, interval=0.2, message="two ticks held in the outage")
            finally:
                server.process.send_signal(signal.SIGCONT)
            held = [run.id for run in _schedule_runs(stack.app, schedule_id)
                    if run.status == "PENDING"]
            assert len(held) >= 2, held
            # After the outage: the held runs are published and run, and ticks go on.
            wait_for(lambda: all(run.status == "SUCCESS" for run in _schedule_runs(
                stack.app, schedule_id) if run.id in held), timeout=60, interval=0.2,
                message="the held runs to run")
            ran_before = succeeded()
            wait_for(lambda: succeeded() >= ran_before + 2, timeout=60, interval=0.2,
                     message="two more ticks after the outage")
            paused = stack.client.post(f"/api/celery/schedules/{schedule_id}/pause")
            assert paused.status_code == 200, paused.get_data(as_text=True)
        wait_for(lambda: all(run.finished for run in _schedule_runs(stack.app, schedule_id)),
                 timeout=60, interval=0.2, message="every run to finish")
        # Whatever the failed publishes wrote reached the worker by now: dropped.
        wait_for(lambda: backend.llen("celery") == 0, timeout=30, message="queue drained")
        assert "Traceback" not in beat.log_text()
        runs = _schedule_runs(stack.app, schedule_id)
        assert [run for run in runs if run.status != "SUCCESS"] == []
        per_tick = Counter(run.scheduled_for for run in runs)
        assert max(per_tick.values()) == 1, per_tick
        executed = {member.decode() for member in backend.smembers(f"acme:runs:{key}")}
        assert executed == {run.id for run in runs}
        assert int(backend.get(f"acme:count:{key}")) == len(runs)
    finally:
        if schedule_id is not None:
            stack.client.delete(f"/api/celery/schedules/{schedule_id}")
        stack.worker.stop()
        close_app(stack.app)
        server.stop()

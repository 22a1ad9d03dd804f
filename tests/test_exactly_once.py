"""Exactly once, whatever the timing: duplicate and late deliveries, delays past the
broker's visibility timeout, a revoke at the start line, repeated retries, and the
messages of a worker killed before it started them.

Executions are counted by the task itself (``acme.count``: an INCR and an SADD of its
id in the result backend's Redis), never by the history.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from celery_api.extensions import db
from celery_api.models import TaskRun, utcnow
from celery_api.services import control, maintenance
from celery_api.services import launch as launch_service
from celery_api.services.errors import Conflict
from tests.support import (
    Beat,
    Worker,
    final_record,
    launch,
    record,
    status,
    wait_for,
    wait_status,
)

pytestmark = pytest.mark.integration


def counted(stack, key: str) -> tuple[int, set[str]]:
    """How many times ``acme.count`` ran for ``key``, and under which task ids."""
    client = stack.celery.backend.client
    count = int(client.get(f"acme:count:{key}") or 0)
    ids = {member.decode() for member in client.smembers(f"acme:runs:{key}")}
    return count, ids


def drops(worker: Worker, task_id: str) -> int:
    """Deliveries of ``task_id`` that ``worker`` dropped unrun (its log says so)."""
    return worker.log_text().count(f"dropped a delivery of {task_id}")


def send_copy(stack, task_id: str, key: str, **options) -> None:
    """Another delivery of a run's message: what a broker's redelivery looks like."""
    stack.celery.send_task("acme.count", kwargs={"key": key}, task_id=task_id, **options)


def test_duplicate_and_late_deliveries_execute_once(stack):
    key = uuid.uuid4().hex
    task_id = launch(stack, "acme.count", {"key": key}, countdown=1)
    # Two more copies while the first waits for its ETA: the worker's two processes
    # take them at the same moment, and the claim lets one of the three run.
    send_copy(stack, task_id, key, countdown=1)
    send_copy(stack, task_id, key, countdown=1)
    wait_status(stack, task_id, "SUCCESS")
    wait_for(lambda: drops(stack.worker, task_id) == 2, timeout=30,
             message="the worker to drop the two copies")
    # A copy that arrives after the run finished does not run either.
    send_copy(stack, task_id, key)
    wait_for(lambda: drops(stack.worker, task_id) == 3, timeout=30,
             message="the worker to drop the late copy")
    assert counted(stack, key) == (1, {task_id})
    run = final_record(stack, task_id)
    assert (run.status, run.attempts, run.result) == ("SUCCESS", 1, 1)


def test_copy_of_a_revoked_run_never_runs(stack):
    key = uuid.uuid4().hex
    task_id = launch(stack, "acme.count", {"key": key}, queue="parked")
    assert stack.client.delete(f"/api/celery/tasks/{task_id}").status_code == 200
    send_copy(stack, task_id, key)  # on the consumed queue: the worker gets it at once
    # Dropped by Celery (the revoke broadcast reached this worker) or by the claim.
    wait_for(lambda: drops(stack.worker, task_id) == 1 or
             f"Discarding revoked task: acme.count[{task_id}]" in stack.worker.log_text(),
             timeout=30, message="the worker to drop the revoked run's copy")
    assert counted(stack, key) == (0, set())
    assert record(stack, task_id).status == "REVOKED"


def test_revoke_that_loses_the_start_line_answers_409_and_the_run_is_recorded(
        stack, monkeypatch):
    """The revoke read the run as queued; before its update, the worker claimed it.
    The revoke must not win: it answers 409, and the run's end is recorded."""
    key = uuid.uuid4().hex
    task_id = launch(stack, "acme.count", {"key": key}, countdown=2)
    real = control.revoke_records

    def held_at_the_window(task_ids, error, **kwargs):
        # The API is between its read (queued) and its update: let the worker start.
        wait_for(lambda: record(stack, task_id).status != "PENDING", timeout=30,
                 message="the worker to claim the run")
        return real(task_ids, error, **kwargs)

    monkeypatch.setattr(control, "revoke_records", held_at_the_window)
    response = stack.client.delete(f"/api/celery/tasks/{task_id}")
    assert response.status_code == 409, response.get_data(as_text=True)
    assert "running" in response.get_json()["detail"] or \
        "finished" in response.get_json()["detail"]
    run = final_record(stack, task_id)
    assert (run.status, run.result) == ("SUCCESS", 1)
    assert counted(stack, key) == (1, {task_id})
    assert status(stack, task_id)["status"] == "SUCCESS"


def test_revoke_that_wins_the_start_line_keeps_the_run_from_running(stack):
    """The worker reaches its claim while the revoke holds the run's row (PostgreSQL
    row lock): the revoke commits first, and the worker drops the run unrun."""
    if stack.database != "postgres":
        pytest.skip("holds a row lock, which PostgreSQL has (SQLite locks the database)")
    key = uuid.uuid4().hex
    task_id = launch(stack, "acme.count", {"key": key}, countdown=1)
    with stack.app.app_context():
        db.session.execute(sa.select(TaskRun.id).where(TaskRun.id == task_id)
                           .with_for_update())

        def worker_waits_on_the_row():
            with db.engine.connect() as other:
                return other.execute(sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query ILIKE 'UPDATE task_runs%'")).scalar()

        wait_for(worker_waits_on_the_row, timeout=30, interval=0.1,
                 message="the worker's claim to wait on the row")
        outcome = control.revoke(task_id, reason="at the start line")
        db.session.remove()
    assert outcome.status == "REVOKED" and "before it ran" in outcome.message
    wait_for(lambda: drops(stack.worker, task_id) == 1, timeout=30,
             message="the worker to drop the revoked run")
    assert counted(stack, key) == (0, set())
    run = record(stack, task_id)
    assert run.status == "REVOKED" and run.started_at is None and run.attempts == 0


def test_concurrent_retries_of_one_run_make_one_new_run(stack):
    # A revoked run on a queue nobody consumes: its retries stay unfinished.
    failed = launch(stack, "acme.add", {"a": 1, "b": 1}, queue="parked")
    assert stack.client.delete(f"/api/celery/tasks/{failed}").status_code == 200
    start = threading.Barrier(10)
    answers: list = [None] * 10

    def retry(index: int) -> None:
        client = stack.app.test_client()
        start.wait()
        answers[index] = client.post(f"/api/celery/tasks/{failed}/retry")

    threads = [threading.Thread(target=retry, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    codes = sorted(answer.status_code for answer in answers)
    assert codes == [202] + [409] * 9, [a.get_data(as_text=True) for a in answers]
    (accepted,) = [a for a in answers if a.status_code == 202]
    new_id = accepted.get_json()["task_id"]
    for answer in answers:
        if answer.status_code == 409:
            assert answer.content_type == "application/problem+json"
            assert new_id in answer.get_json()["detail"]
    with stack.app.app_context():
        retries = db.session.execute(
            sa.select(TaskRun.id).where(TaskRun.retry_of == failed)).scalars().all()
    assert retries == [new_id]
    # Once that retry has finished, a deliberate new retry is allowed.
    assert stack.client.delete(f"/api/celery/tasks/{new_id}").status_code == 200
    again = stack.client.post(f"/api/celery/tasks/{failed}/retry")
    assert again.status_code == 202, again.get_data(as_text=True)
    assert stack.client.delete(
        f"/api/celery/tasks/{again.get_json()['task_id']}").status_code == 200


def test_open_retry_rule_holds_without_the_read_before_it(stack, monkeypatch):
    """Two retries that both passed the read: the database's rule refuses the second."""
    failed = launch(stack, "acme.add", {"a": 1, "b": 1}, queue="parked")
    assert stack.client.delete(f"/api/celery/tasks/{failed}").status_code == 200
    with stack.app.app_context():
        first = launch_service.launch(
            "acme.boom", {}, launch_service.LaunchOptions(queue="parked"),
            launch_service.Lineage(retry_of=failed, root_id=failed))
        checks = []
        real = control._refuse_if_retrying

        def read_saw_nothing_the_first_time(task_id):
            checks.append(task_id)
            if len(checks) > 1:
                real(task_id)

        monkeypatch.setattr(control, "_refuse_if_retrying", read_saw_nothing_the_first_time)
        with pytest.raises(Conflict) as refused:
            control.retry(failed)
        db.session.remove()
    assert first.id in refused.value.detail
    assert len(checks) == 2


def test_delays_past_the_visibility_timeout_execute_once(stack):
    """Two workers whose broker hands an unacknowledged message to another worker after
    2 s; runs delayed 6 s are handed around several times and still run once each."""
    if stack.kind not in ("redis", "embedded"):
        pytest.skip("the visibility timeout belongs to the Redis transport")
    env = dict(stack.env(), CELERY_API_VISIBILITY_TIMEOUT="2",
               CELERY_API_UNACKED_RESTORE_INTERVAL="1")
    node = os.uname().nodename
    workers = [Worker(env, f"vis{i}-{stack.kind}-{stack.database}@{node}",
                      stack.folder / f"vis{i}.log", queues="parked") for i in (1, 2)]
    for worker in workers:
        worker.start(stack.celery)
    try:
        key = uuid.uuid4().hex
        ids = [launch(stack, "acme.count", {"key": key}, countdown=6, queue="parked")
               for _ in range(4)]
        for task_id in ids:
            wait_status(stack, task_id, "SUCCESS", timeout=60)
        for task_id in ids:
            final_record(stack, task_id)
        # The copies were handed around: at least one was dropped by the claim.
        assert sum(drops(worker, task_id) for worker in workers for task_id in ids) >= 1
    finally:
        for worker in workers:
            worker.stop()
    assert counted(stack, key) == (4, set(ids))
    assert [record(stack, task_id).attempts for task_id in ids] == [1, 1, 1, 1]


def test_long_delays_are_held_in_the_database_and_published_when_due(stack, monkeypatch):
    monkeypatch.setitem(stack.app.config, "DELAY_HOLD_SECONDS", 1.0)
    key = uuid.uuid4().hex
    held = launch(stack, "acme.count", {"key": key}, countdown=4)
    revoked = launch(stack, "acme.count", {"key": key}, countdown=4)
    # Held too, but it expires (1 s after its launch) long before its ETA: beat revokes
    # it as expired, and it never runs (published with its expiry passed, RabbitMQ
    # would drop it and leave it PENDING).
    expiring = launch(stack, "acme.count", {"key": key}, countdown=4, expires=1)
    assert stack.client.delete(f"/api/celery/tasks/{revoked}").status_code == 200
    run = record(stack, held)
    assert run.dispatch_at is not None and run.eta is not None
    assert run.dispatch_at == run.eta - timedelta(seconds=1)
    env = dict(stack.env(), CELERY_API_DISPATCH_INTERVAL="0.2",
               CELERY_API_RECONCILE_INTERVAL="3600", CELERY_API_PURGE_INTERVAL="3600")
    with Beat(env, stack.folder):
        shown = wait_status(stack, expiring, "REVOKED", timeout=60)
        assert "expired before it ran" in shown["error"]
        wait_status(stack, held, "SUCCESS", timeout=60)
        run = final_record(stack, held)
    assert run.dispatch_at is None
    assert run.started_at >= run.eta - timedelta(seconds=0.5)  # not before its time
    assert counted(stack, key) == (1, {held})
    assert record(stack, expiring).dispatch_at is None
    assert record(stack, revoked).status == "REVOKED"
    assert stack.celery.backend.get_task_meta(revoked)["status"] != "SUCCESS"


def test_messages_of_a_killed_worker_run_elsewhere_once(stack):
    """A worker killed holding a message it had not started: the message goes back to
    its queue (after the visibility timeout on Redis, at once on RabbitMQ) and another
    worker runs it, once; the run the killed worker was running is reconciled."""
    node = os.uname().nodename
    env = dict(stack.env(), CELERY_API_VISIBILITY_TIMEOUT="2",
               CELERY_API_UNACKED_RESTORE_INTERVAL="1")
    doomed = Worker(env, f"prefetch-{stack.kind}-{stack.database}@{node}",
                    stack.folder / "prefetch.log", queues="parked", concurrency=1)
    doomed.start(stack.celery)
    key = uuid.uuid4().hex
    try:
        busy = launch(stack, "acme.sleep", {"seconds": 60}, queue="parked")
        wait_status(stack, busy, "PROGRESS")
        waiting = [launch(stack, "acme.count", {"key": key}, queue="parked")
                   for _ in range(3)]

        def prefetched():
            replies = stack.celery.control.inspect(
                destination=[doomed.name], timeout=1).reserved() or {}
            return [t["id"] for t in replies.get(doomed.name, []) if t["id"] in waiting]

        wait_for(prefetched, timeout=30, interval=0.2, message="a prefetched message")
        for pid in _children(doomed.process.pid) + [doomed.process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        doomed.process.wait(10)
    finally:
        doomed.stop()
    for task_id in waiting:
        assert record(stack, task_id).status == "PENDING"
    rescuer = Worker(env, f"rescuer-{stack.kind}-{stack.database}@{node}",
                     stack.folder / "rescuer.log", queues="parked")
    rescuer.start(stack.celery)
    try:
        for task_id in waiting:
            wait_status(stack, task_id, "SUCCESS", timeout=60)
            final_record(stack, task_id)
    finally:
        rescuer.stop()
    assert counted(stack, key) == (3, set(waiting))
    with stack.app.app_context():
        outcome = maintenance.reconcile(grace_seconds=0)
    assert busy in outcome["lost_ids"]


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(line) for line in found.stdout.split()]


def test_reconcile_reports_pending_runs_that_no_queue_holds(stack):
    with stack.app.app_context():
        # The lost one on the consumed queue, which is empty: RabbitMQ cannot be read
        # without consuming, so runs of a queue holding messages are not judged there.
        lost = launch_service.prepare("acme.add", {"a": 1, "b": 1},
                                      launch_service.LaunchOptions(),
                                      launch_service.Lineage())
        options = launch_service.LaunchOptions(queue="parked")
        launch_service.record_runs([lost])  # recorded, never published
        kept = launch_service.launch("acme.add", {"a": 2, "b": 2}, options)  # in "parked"
        old = utcnow() - timedelta(hours=2)
        db.session.execute(sa.update(TaskRun).where(
            TaskRun.id.in_([lost.record["id"], kept.id])).values(created_at=old))
        db.session.commit()
        outcome = maintenance.reconcile(grace_seconds=0)
        db.session.remove()
    assert lost.record["id"] in outcome["stranded_ids"]
    assert kept.id not in outcome["stranded_ids"]
    assert stack.client.delete(f"/api/celery/tasks/{kept.id}").status_code == 200


@contextlib.contextmanager
def long_safe_run(stack, label: str, seconds: float):
    """A safe-to-repeat run of ``seconds`` on one of two one-process workers on "parked"
    whose broker hands out again, after 3 s, a message held unacknowledged (the run
    outlives the visibility timeout). Yields (key, task_id, owner, other worker)."""
    if stack.kind not in ("redis", "embedded"):
        pytest.skip("the visibility timeout belongs to the Redis transport")
    env = dict(stack.env(), CELERY_API_VISIBILITY_TIMEOUT="3",
               CELERY_API_UNACKED_RESTORE_INTERVAL="1")
    node = os.uname().nodename
    workers = []
    try:
        for i in (1, 2):
            workers.append(Worker(env, f"{label}{i}-{stack.kind}-{stack.database}@{node}",
                                  stack.folder / f"{label}{i}.log", queues="parked",
                                  concurrency=1).start(stack.celery))
        key = uuid.uuid4().hex
        task_id = launch(stack, "acme.count_slowly", {"key": key, "seconds": seconds},
                         queue="parked")
        wait_status(stack, task_id, "PROGRESS")
        owner = wait_for(lambda: next((w for w in workers
                                       if record(stack, task_id).worker == w.name), None),
                         timeout=30, message=f"{task_id} claimed by a worker")
        yield key, task_id, owner, next(w for w in workers if w is not owner)
    finally:
        for worker in workers:
            worker.stop()


def test_a_worker_that_does_not_answer_keeps_its_run(stack):
    """A safe-to-repeat run outlives the visibility timeout, so the broker hands its
    message to the other worker, which asks the running worker whether it still runs
    it. That worker's main process is stopped (SIGSTOP): no answer is not an answer,
    and the copy does not run. The run executes once."""
    with long_safe_run(stack, "mute", 12) as (key, task_id, owner, other):
        os.kill(owner.process.pid, signal.SIGSTOP)  # its pool process keeps running
        try:
            wait_for(lambda: f"did not answer whether it still runs {task_id}"
                     in other.log_text(), timeout=60, message="the copy to ask and hold")
        finally:
            os.kill(owner.process.pid, signal.SIGCONT)
        wait_status(stack, task_id, "SUCCESS", timeout=60)
        run = final_record(stack, task_id)
    assert counted(stack, key) == (1, {task_id})
    assert (run.attempts, run.worker) == (1, owner.name)


def test_a_long_safe_run_whose_process_dies_after_a_redelivery_runs_again(stack):
    """The broker handed out the run's message again while it ran (visibility
    timeout), so the copy is its only message; the copy is dropped but keeps a copy
    that asks again later. When the running pool process is then killed, that copy
    finds the worker alive without the run and takes it over: attempt 2 finishes."""
    with long_safe_run(stack, "watch", 8) as (key, task_id, owner, other):
        wait_for(lambda: f"{task_id} runs on {owner.name}: a copy asks again"
                 in other.log_text() + owner.log_text(), timeout=60,
                 message="a copy to be dropped and kept watching")
        children = _children(owner.process.pid)
        assert children, "the owner's pool process"
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        wait_status(stack, task_id, "SUCCESS", timeout=90)
        run = final_record(stack, task_id)
    count, ids = counted(stack, key)
    assert (count, ids) == (2, {task_id})  # the killed attempt, and the one that finished
    assert run.attempts == 2 and run.result == 2

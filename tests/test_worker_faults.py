"""Killed workers: no run stays STARTED forever; safe ones run again. Then the history
tells the truth about a mix of launches, fan-out, retry, revoke, failure and kills."""

from __future__ import annotations

import os
import signal

import pytest

from celery_api.extensions import db
from celery_api.models import TaskRun
from celery_api.services import maintenance
from tests.support import Worker, final_record, launch, record, status, wait_for, wait_status

pytestmark = pytest.mark.integration


def running_pid(stack, worker_name, task_id):
    def find():
        replies = stack.celery.control.inspect(destination=[worker_name], timeout=1).active()
        for task in (replies or {}).get(worker_name, []):
            if task["id"] == task_id and task.get("worker_pid"):
                return task["worker_pid"]
        return None

    return wait_for(find, timeout=30, interval=0.2, message=f"{task_id} active with a pid")


def test_killed_pool_process_fails_unsafe_run_and_redelivers_safe_one(stack):
    unsafe = launch(stack, "acme.sleep", {"seconds": 30})
    wait_status(stack, unsafe, "PROGRESS")
    os.kill(running_pid(stack, stack.worker.name, unsafe), signal.SIGKILL)
    body = wait_status(stack, unsafe, "FAILURE", timeout=30)
    assert "WorkerLostError" in body["error"] or "worker lost" in body["error"]
    assert final_record(stack, unsafe).error.startswith("worker lost")

    safe = launch(stack, "acme.sleep_safely", {"seconds": 1.5})
    wait_status(stack, safe, "PROGRESS")
    os.kill(running_pid(stack, stack.worker.name, safe), signal.SIGKILL)
    body = wait_status(stack, safe, "SUCCESS", timeout=60)
    assert body["result"] == {"slept": 1.5}
    assert final_record(stack, safe).attempts == 2


def test_worker_killed_outright_is_reconciled_as_lost(stack):
    doomed = Worker(stack.env(), f"doomed-{stack.kind}-{stack.database}@{os.uname().nodename}",
                    stack.folder / "doomed-worker.log", queues="parked", concurrency=1)
    doomed.start(stack.celery)
    try:
        task_id = launch(stack, "acme.sleep", {"seconds": 60}, queue="parked")
        wait_status(stack, task_id, "PROGRESS")
        pid = running_pid(stack, doomed.name, task_id)
        os.kill(doomed.process.pid, signal.SIGKILL)  # the whole worker: nobody reports
        os.kill(pid, signal.SIGKILL)
        doomed.process.wait(10)
    finally:
        doomed.stop()
    assert record(stack, task_id).status in ("STARTED", "PROGRESS")
    with stack.app.app_context():
        outcome = maintenance.reconcile(grace_seconds=0)
    assert task_id in outcome["lost_ids"]
    run = record(stack, task_id)
    assert run.status == "FAILURE" and "worker lost" in run.error and doomed.name in run.error
    assert status(stack, task_id)["status"] == "FAILURE"
    # Runs still running on a live worker are left alone.
    alive = launch(stack, "acme.sleep", {"seconds": 3})
    wait_status(stack, alive, "PROGRESS")
    with stack.app.app_context():
        assert alive not in maintenance.reconcile(grace_seconds=0).get("lost_ids", [])
    wait_status(stack, alive, "SUCCESS")


def test_history_tells_the_truth_about_a_mixed_day(stack):
    client = stack.client
    tag = f"mixed-{stack.kind}-{stack.database}"

    ok = launch(stack, "acme.add", {"a": 1, "b": 2}, tags=[tag])
    failed = launch(stack, "acme.boom", {}, tags=[tag])
    revoked = launch(stack, "acme.add", {"a": 0, "b": 0}, tags=[tag], countdown=120)
    fan = launch(stack, "sii.sync_f29_all_companies", {}, tags=[tag])
    killed = launch(stack, "acme.sleep", {"seconds": 30}, tags=[tag])
    assert client.delete(f"/api/celery/tasks/{revoked}").status_code == 200
    wait_status(stack, failed, "FAILURE")
    retry = client.post(f"/api/celery/tasks/{failed}/retry").get_json()["task_id"]
    wait_status(stack, killed, "PROGRESS")
    os.kill(running_pid(stack, stack.worker.name, killed), signal.SIGKILL)
    for task_id, final in ((ok, "SUCCESS"), (retry, "FAILURE"), (killed, "FAILURE")):
        wait_status(stack, task_id, final)
    for task_id in (ok, failed, retry, killed):
        final_record(stack, task_id)  # the worker's own record, which the history reads
    fan_body = wait_status(stack, fan, "SUCCESS", timeout=90)
    children = set(fan_body["children"])
    assert len(children) == 4

    def rows(**params):
        response = client.get("/api/celery/history", query_string={"limit": 500, **params})
        assert response.status_code == 200
        return {r["task_id"]: r for r in response.get_json()["items"]}

    tagged = rows(tag=tag)  # the fan-out children inherit the tag
    assert set(tagged) == {ok, failed, revoked, fan, killed, retry} | children
    assert {k: tagged[k]["status"] for k in (ok, failed, revoked, fan, killed, retry)} == {
        ok: "SUCCESS", failed: "FAILURE", revoked: "REVOKED", fan: "SUCCESS",
        killed: "FAILURE", retry: "FAILURE"}
    assert tagged[retry]["retry_of"] == failed and tagged[retry]["root_id"] == failed
    assert tagged[fan]["result"] == {"total_companies": 5, "synced": 4, "failed": 0,
                                     "skipped": 1}
    assert set(rows(parent_id=fan)) == children
    assert set(rows(root_id=fan)) == children | {fan}
    assert set(rows(retry_of=failed)) == {retry}
    assert set(rows(tag=tag, status="FAILURE")) == {failed, killed, retry}
    assert set(rows(tag=tag, status=["REVOKED", "SUCCESS"], task_type="acme.add")) == \
        {ok, revoked}
    assert tagged[revoked]["started_at"] is None
    assert tagged[killed]["error"].startswith("worker lost")
    assert all(tagged[c]["worker"] == stack.worker.name for c in children)
    with stack.app.app_context():
        assert db.session.get(TaskRun, ok).runtime is not None


def test_worker_stopped_gracefully_finishes_its_run_first(stack):
    worker = Worker(stack.env(), f"graceful-{stack.kind}-{stack.database}@{os.uname().nodename}",
                    stack.folder / "graceful-worker.log", queues="parked", concurrency=1)
    worker.start(stack.celery)
    task_id = launch(stack, "acme.sleep", {"seconds": 2}, queue="parked")
    wait_status(stack, task_id, "PROGRESS")
    worker.process.send_signal(signal.SIGTERM)  # warm shutdown: finish, then exit
    assert worker.process.wait(60) == 0
    worker.stop()
    body = status(stack, task_id)
    assert body["status"] == "SUCCESS" and body["result"] == {"slept": 2}
    assert final_record(stack, task_id).status == "SUCCESS"


def test_failure_text_no_database_stores_as_is_is_recorded_escaped(stack):
    """A task's exception message holds a NUL and a lone surrogate (PostgreSQL refuses
    the first, every driver the second): the failure is recorded, escaped."""
    task_id = launch(stack, "acme.garble", {})
    run = final_record(stack, task_id)
    assert run.status == "FAILURE"
    assert run.error == "RuntimeError: bad\\x00byte \\ud800 here"
    assert "\\x00" in run.traceback and "\x00" not in run.traceback

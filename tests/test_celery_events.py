"""What plain Celery and Flower see of this service's runs.

Flower builds each task's state from the workers' events (``celery.events.state.State``
fed by an events ``Receiver`` in a thread); these tests do the same against a real
worker started with ``-E``, and read the result backend as ``AsyncResult`` does.
"""

from __future__ import annotations

import os
import threading
import uuid

import pytest

from celery_api.services.recorder import named_params
from celery_api.tasks.sii_client import SANDBOX_COMPANIES
from tests.support import (
    Worker,
    build_app,
    final_record,
    launch,
    make_config,
    service_env,
    wait_for,
    wait_status,
)

COMPANY = SANDBOX_COMPANIES[0]


class EventsStack:
    def __init__(self, app, config, worker, folder):
        self.app, self.config, self.worker, self.folder = app, config, worker, folder
        self.client = app.test_client()
        self.celery = app.extensions["celery"]


class Monitor:
    """What Flower does: a Receiver in a thread feeding a celery.events State."""

    def __init__(self, celery_app):
        self.celery = celery_app
        self.state = celery_app.events.State()
        self.receiver = None
        self.thread = threading.Thread(target=self._capture, daemon=True)

    def _capture(self):
        with self.celery.connection_for_read() as connection:
            self.receiver = self.celery.events.Receiver(
                connection, handlers={"*": self.state.event})
            self.receiver.capture(limit=None, timeout=None, wakeup=True)

    def start(self, worker_name: str) -> Monitor:
        self.thread.start()
        # Receiving the worker's heartbeats means the receiver is bound: every later
        # event reaches it (Redis delivers events to subscribers only).
        wait_for(lambda: (w := self.state.workers.get(worker_name)) and w.alive,
                 timeout=30, interval=0.2, message=f"heartbeats of {worker_name}")
        return self

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(10)

    def task(self, task_id):
        return self.state.tasks.get(task_id)


@pytest.fixture(scope="module")
def events_stack(tmp_path_factory, redis_server):
    pytest.importorskip("flower")  # the monitor whose model State is (requirements-test)
    folder = tmp_path_factory.mktemp("events")
    url = redis_server.url.replace("/0", "/5")
    config = make_config(folder, url)
    app = build_app(config)
    worker = Worker(service_env(config), f"wev@{os.uname().nodename}", folder / "worker.log",
                    events=True)
    worker.start(app.extensions["celery"])
    stack = EventsStack(app, config, worker, folder)
    monitor = Monitor(stack.celery).start(worker.name)
    stack.monitor = monitor
    yield stack
    monitor.stop()
    worker.stop()


@pytest.mark.integration
def test_fan_out_parent_ends_success_in_events_and_backend(events_stack):
    stack, monitor = events_stack, events_stack.monitor
    parent_id = launch(stack, "sii.sync_documents_all_companies", {"months": 1})
    body = wait_status(stack, parent_id, "SUCCESS", timeout=90)
    summary = {"total_companies": 5, "synced": 4, "failed": 0, "skipped": 1}
    assert body["result"] == summary

    def parent_done():
        task = monitor.task(parent_id)
        return task if task is not None and task.state == "SUCCESS" else None

    seen = wait_for(parent_done, timeout=30, interval=0.1,
                    message="the events' state of the fan-out parent to be SUCCESS")
    assert seen.name == "sii.sync_documents_all_companies"  # from its task-received
    assert seen.result == repr(summary) and seen.runtime > 0
    assert seen.started is not None and seen.succeeded >= seen.started
    # Each child, as Flower shows it: SUCCESS, with its parent.
    for child_id in body["children"]:
        child = wait_for(lambda c=child_id: (t := monitor.task(c)) and t.state == "SUCCESS"
                         and t, timeout=30, message=f"child {child_id} SUCCESS in events")
        assert child.parent_id == parent_id and child.root_id == parent_id
    # The result backend (AsyncResult, Flower's task page) agrees.
    result = stack.celery.AsyncResult(parent_id)
    assert result.state == "SUCCESS" and result.result == summary
    assert "task-succeeded event of" not in stack.worker.log_text()


def recorded(stack, task_id, wanted):
    """Wait for the worker to record a task sent straight to Celery, then for ``wanted``."""
    wait_for(lambda: stack.client.get(f"/api/celery/tasks/{task_id}").status_code == 200,
             timeout=30, message=f"the worker to record {task_id}")
    return wait_status(stack, task_id, wanted)


@pytest.mark.integration
def test_positional_args_of_a_task_sent_straight_to_celery_are_named(events_stack):
    stack = events_stack
    sent = stack.celery.send_task("sii.sync_documents", args=[COMPANY, 2])
    body = recorded(stack, sent.id, "SUCCESS")
    assert body["params"] == {"company_id": COMPANY, "months": 2}
    run = final_record(stack, sent.id)
    assert run.params == {"company_id": COMPANY, "months": 2} and run.company_id == COMPANY

    mixed = stack.celery.send_task("acme.add", args=[1], kwargs={"b": 2})
    assert recorded(stack, mixed.id, "SUCCESS")["params"] == {"a": 1, "b": 2}

    # Too many to name: recorded as sent, and the task fails as Celery runs it.
    extra = stack.celery.send_task("acme.add", args=[1, 2, 3])
    failed = recorded(stack, extra.id, "FAILURE")
    assert failed["params"] == {"args": [1, 2, 3], "kwargs": {}}
    assert final_record(stack, extra.id).company_id is None


def test_named_params_follow_the_signature():
    from acme_tasks import add

    from celery_api.tasks.sii import sync_documents

    company = str(uuid.uuid4())
    # A bound task (bind=True): its `self` is not a parameter.
    assert named_params(sync_documents, [company, 3], {"month_offset": 1}) == \
        {"company_id": company, "months": 3, "month_offset": 1}
    assert named_params(sync_documents, [], {"company_id": company}) == {"company_id": company}
    assert named_params(add, (1, 2), None) == {"a": 1, "b": 2}
    assert named_params(add, (1, 2, 3), {}) == {"args": [1, 2, 3], "kwargs": {}}
    assert named_params(add, (1,), {"a": 2}) == {"args": [1], "kwargs": {"a": 2}}

    class Starred:
        @staticmethod
        def run(first, *rest, **extra):
            return None

    assert named_params(Starred, (1,), {"x": 2}) == {"first": 1, "x": 2}
    assert named_params(Starred, (1, 2), {}) == {"args": [1, 2], "kwargs": {}}

"""Webhooks: the subscription resource and its refusals (the SSRF guard at creation, a
launch's webhook_url without CELERY_API_WEBHOOK_SECRET), then the real thing: a task
worker writing events in the outbox, a webhook worker on the ``webhooks`` queue
delivering them, and a real HTTP receiver on 127.0.0.1 verifying every signature with
``standardwebhooks``; retries, 410, rotation, re-send, and beat's sweeper publishing
what could not be published when the run finished."""

from __future__ import annotations

import json
import os
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from celery_api.extensions import db
from celery_api.models import TaskRun, WebhookDelivery, WebhookSubscription
from celery_api.services import runstate, webhooks
from celery_api.tasks.sii_client import SandboxSIIClient
from tests.support import (
    COMPANY,
    Beat,
    WebhookReceiver,
    Worker,
    assert_problem,
    build_app,
    free_port,
    launch,
    make_config,
    status,
    stored_run,
    wait_for,
    wait_status,
)

BASE = "/api/celery/webhooks"
SECRET = webhooks.new_secret()  # the deployment's CELERY_API_WEBHOOK_SECRET here
TASK_EVENTS = ["task.succeeded", "task.failed", "task.revoked", "task.retried"]
# The embedded default (make run), Redis + SQLite, and Redis + PostgreSQL (SKIP LOCKED,
# ON CONFLICT on its side).
STACKS = [pytest.param(("embedded", "sqlite"), id="embedded-sqlite"),
          pytest.param(("redis", "sqlite"), id="redis-sqlite"),
          pytest.param(("redis", "postgres"), id="redis-postgres")]


@pytest.fixture(scope="module")
def receiver():
    server = WebhookReceiver()
    yield server
    server.stop()


# The resource, on the app without workers.

@pytest.fixture
def guarded(app, monkeypatch):
    """The shared app with the SSRF guard as a deployment has it (no allowlist) and no
    launch secret; restored afterwards."""
    monkeypatch.setitem(app.config, "WEBHOOK_ALLOWED_HOSTS", [])
    monkeypatch.setitem(app.config, "WEBHOOK_SECRET", None)
    return app.test_client()


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1:8080/hook", "loopback address 127.0.0.1"),
    ("http://10.0.0.5/hook", "private address 10.0.0.5"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata address"),
    ("http://localhost:5000/hook", "'localhost' resolves to a loopback address"),
    ("http://[::1]:8080/hook", "loopback address ::1"),
    ("http://[fd00:ec2::254]/", "cloud metadata address"),
])
def test_a_url_to_a_non_public_address_is_refused_at_creation(guarded, url, reason):
    body = assert_problem(guarded.post(BASE, json={"url": url, "event_types": ["task.failed"]}),
                          422, "url", reason)
    assert reason in body["errors"]["json"]["url"][0]


def test_a_url_is_checked_again_when_it_changes(guarded, app, monkeypatch):
    monkeypatch.setitem(app.config, "WEBHOOK_ALLOWED_HOSTS", ["127.0.0.1:9"])
    created = guarded.post(BASE, json={"url": "http://127.0.0.1:9/x",
                                       "event_types": ["task.failed"]})
    assert created.status_code == 201
    hook = created.get_json()
    assert_problem(guarded.patch(f"{BASE}/{hook['id']}", json={"url": "http://127.0.0.1:10/"}),
                   422, "url", "loopback")
    assert guarded.delete(f"{BASE}/{hook['id']}").status_code == 204


def test_create_get_list_update_rotate_delete(app, monkeypatch):
    monkeypatch.setitem(app.config, "WEBHOOK_ALLOWED_HOSTS", ["127.0.0.1"])
    client = app.test_client()
    created = client.post(BASE, json={"url": "http://127.0.0.1:9/hook",
                                      "event_types": ["task.failed", "task.succeeded"],
                                      "task_type": "acme.add", "description": "ops"})
    assert created.status_code == 201, created.get_data(as_text=True)
    hook = created.get_json()
    assert hook["secret"].startswith("whsec_") and created.headers["Location"].endswith(hook["id"])
    assert hook["event_types"] == ["task.failed", "task.succeeded"] and hook["enabled"]
    shown = client.get(f"{BASE}/{hook['id']}").get_json()
    assert "secret" not in shown and shown["task_type"] == "acme.add"
    assert hook["id"] in [h["id"] for h in client.get(BASE).get_json()["items"]]
    changed = client.patch(f"{BASE}/{hook['id']}", json={"enabled": False, "task_type": None})
    assert changed.get_json()["enabled"] is False and changed.get_json()["task_type"] is None
    assert_problem(client.patch(f"{BASE}/{hook['id']}", json={"event_types": ["task.nope"]}),
                   422)
    rotated = client.post(f"{BASE}/{hook['id']}/rotate-secret?overlap_seconds=60").get_json()
    assert rotated["secret"] != hook["secret"] and rotated["previous_secret_expires_at"]
    with app.app_context():
        stored = db.session.get(WebhookSubscription, hook["id"])
        assert stored.previous_secret == hook["secret"] and stored.secret == rotated["secret"]
    assert client.delete(f"{BASE}/{hook['id']}").status_code == 204
    assert_problem(client.get(f"{BASE}/{hook['id']}"), 404)
    assert_problem(client.get(f"{BASE}/{hook['id']}/deliveries"), 404)


def test_a_launch_webhook_url_needs_the_deployment_secret(guarded, app, monkeypatch):
    task = {"task_type": "sii.sync_documents", "params": {"company_id": COMPANY},
            "webhook_url": "https://hooks.example.com/in"}
    body = assert_problem(guarded.post("/api/celery/tasks/launch", json=task), 422,
                          "CELERY_API_WEBHOOK_SECRET")
    assert "webhook_url" in body["errors"]["json"]
    monkeypatch.setitem(app.config, "WEBHOOK_SECRET", SECRET)
    body = assert_problem(guarded.post("/api/celery/tasks/launch", json=dict(
        task, webhook_url="http://192.168.0.10/in")), 422, "webhook_url", "private")
    body = assert_problem(guarded.post("/api/celery/tasks/batch", json={"tasks": [
        dict(task, webhook_url="http://127.0.0.1/in")]}), 422, "tasks[0]", "loopback")
    assert "webhook_url" in body["errors"]["json"]["tasks"]["0"]
    assert_problem(guarded.post("/api/celery/tasks/launch", json=dict(
        task, webhook_url="ftp://hooks.example.com/")), 422, "webhook_url")


def test_a_result_past_the_size_limit_is_left_out_with_a_link(app, monkeypatch):
    monkeypatch.setitem(app.config, "WEBHOOK_MAX_RESULT_BYTES", 100)
    monkeypatch.setitem(app.config, "PUBLIC_URL", "https://tasks.example.com")
    small = stored_run(app, "SUCCESS", result={"n": 1})
    large = stored_run(app, "SUCCESS", result={"rows": "x" * 200})
    with app.app_context():
        runs = [db.session.get(TaskRun, i) for i in (small, large)]
        documents = webhooks.run_documents(runs)
    assert documents[small]["result"] == {"n": 1} and not documents[small]["result_omitted"]
    assert documents[large]["result"] is None and documents[large]["result_omitted"]
    assert documents[large]["status_url"] == f"https://tasks.example.com/api/celery/tasks/{large}"
    assert documents[small]["truncated"] == []


def test_an_error_traceback_and_meta_past_the_size_limit_are_bounded_and_marked(
        app, monkeypatch):
    monkeypatch.setitem(app.config, "WEBHOOK_MAX_RESULT_BYTES", 100)
    huge = stored_run(app, "FAILURE", error="E" * 5000,
                      traceback="Traceback ...\n" + "  frame\n" * 1000 + "ValueError: boom",
                      meta={"current": 1, "total": 2, "message": "m" * 5000})
    with app.app_context():
        [document] = webhooks.run_documents([db.session.get(TaskRun, huge)]).values()
    assert document["error"].startswith("E" * 100) and len(document["error"]) < 200
    assert document["traceback"].endswith("ValueError: boom")
    assert len(document["traceback"]) < 200
    assert document["meta"] is None and document["progress"] is None
    assert document["truncated"] == ["error", "traceback", "meta", "progress"]
    assert len(json.dumps(document)) < 2000


def test_a_revoke_undone_because_the_broker_is_down_sends_no_event(tmp_path):
    """The revoke's record (and its task.revoked event) commits first; the broadcast then
    fails and the record is put back: its event must not be sent later by the sweeper."""
    app = build_app(make_config(tmp_path, f"redis://127.0.0.1:{free_port()}/0"))
    task_id = stored_run(app, "PENDING")
    with app.app_context():
        db.session.add(WebhookSubscription(
            id=str(uuid.uuid4()), url="https://hooks.example.com/r", enabled=True,
            event_types=["task.revoked"], secret=webhooks.new_secret(),
            created_at=webhooks.utcnow(), updated_at=webhooks.utcnow()))
        db.session.commit()
    assert_problem(app.test_client().delete(f"/api/celery/tasks/{task_id}"), 503, "broker")
    with app.app_context():
        assert db.session.get(TaskRun, task_id).status == "PENDING"
        assert db.session.execute(sa.select(WebhookDelivery).where(
            WebhookDelivery.run_id == task_id)).scalars().all() == []


def test_the_history_purge_removes_old_finished_deliveries(app):
    from celery_api.services import maintenance

    old = webhooks.utcnow() - timedelta(days=200)
    with app.app_context():
        rows = [webhooks._row("ping", "https://hooks.example.com/p", {}, old)
                for _ in range(3)]
        rows[1]["status"], rows[2]["status"] = "succeeded", "failed"
        ids = webhooks._insert(rows)
        db.session.info.pop(webhooks.OUTBOX, None)  # nothing to publish: a fixture
        db.session.commit()
        maintenance.purge(older_than_days=90)
        kept = db.session.execute(sa.select(WebhookDelivery.id).where(
            WebhookDelivery.id.in_(ids))).scalars().all()
        assert kept == [ids[0]]  # the pending one stays
        db.session.execute(sa.delete(WebhookDelivery).where(WebhookDelivery.id == ids[0]))
        db.session.commit()


def test_a_short_retry_waits_in_the_broker_a_long_one_in_the_database(
        app, receiver, redis_server, monkeypatch):
    """deliver() in this process against the real receiver: a retry due within the hold
    horizon is published at once with its countdown; a later one is left to the sweeper,
    which publishes it once it is due (an injected clock)."""
    import redis

    queue = redis.Redis(port=redis_server.port, db=0)
    monkeypatch.setitem(app.config, "WEBHOOK_ALLOWED_HOSTS", [receiver.host])
    monkeypatch.setitem(app.config, "WEBHOOK_SWEEP_SECONDS", 30.0)
    monkeypatch.setattr(webhooks, "_batches_swept_until", None)  # the clock jumps ahead
    where = path()
    receiver.plan(where, [500, 500])
    with app.app_context():
        db.session.add(WebhookSubscription(
            id=(hook_id := str(uuid.uuid4())), url=receiver.url(where), enabled=True,
            event_types=["task.failed"], secret=webhooks.new_secret(),
            created_at=webhooks.utcnow(), updated_at=webhooks.utcnow()))
        db.session.commit()
        [first] = webhooks._insert([webhooks._row("ping", receiver.url(where), {"n": 1},
                                                  webhooks.utcnow(), subscription_id=hook_id)])
        db.session.info.pop(webhooks.OUTBOX)  # delivered by hand below
        db.session.commit()
        try:
            # Short: 1 s is within the hold horizon (60 s): published now, with a countdown.
            monkeypatch.setitem(app.config, "WEBHOOK_RETRY_SCHEDULE", [1.0, 3600.0])
            before = queue.llen(webhooks.QUEUE)
            assert webhooks.deliver(first) == "failed"
            assert queue.llen(webhooks.QUEUE) == before + 1
            second = db.session.execute(sa.select(WebhookDelivery).where(
                WebhookDelivery.message_id == db.session.get(WebhookDelivery, first)
                .message_id, WebhookDelivery.attempt == 2)).scalar_one()
            assert second.status == "pending"
            # Long: an hour is past the horizon: not published, held in the database.
            assert webhooks.deliver(second.id) == "failed"
            third = db.session.execute(sa.select(WebhookDelivery).where(
                WebhookDelivery.message_id == second.message_id,
                WebhookDelivery.attempt == 3)).scalar_one()
            assert queue.llen(webhooks.QUEUE) == before + 1 and third.published_at is None
            assert webhooks.sweep(now=webhooks.utcnow()) == 0  # not due yet
            later = third.due_at + timedelta(seconds=31)
            assert webhooks.sweep(now=later) == 1
            assert queue.llen(webhooks.QUEUE) == before + 2
            db.session.refresh(third)
            assert third.published_at == later
            assert [r["status"] for r in receiver.at(where)] == [500, 500]
        finally:
            db.session.execute(sa.delete(WebhookDelivery).where(
                WebhookDelivery.subscription_id == hook_id))
            db.session.execute(sa.delete(WebhookSubscription).where(
                WebhookSubscription.id == hook_id))
            db.session.commit()


def test_the_retry_schedule_is_jittered_and_ends():
    schedule = [10.0, 100.0]
    assert 8.0 <= webhooks.retry_delay(1, schedule) <= 12.0
    assert 80.0 <= webhooks.retry_delay(2, schedule) <= 120.0
    assert webhooks.retry_delay(3, schedule) is None


# The real thing: a task worker, a webhook worker, a receiver.

class Hooks:
    def __init__(self, stack, receiver, app, worker):
        self.stack, self.receiver, self.app, self.worker = stack, receiver, app, worker
        self.client = app.test_client()

    def subscribe(self, path: str, event_types, statuses=(), **fields) -> tuple[dict, str]:
        url = self.receiver.url(path)
        response = self.client.post(BASE, json={"url": url, "event_types": event_types,
                                                **fields})
        assert response.status_code == 201, response.get_data(as_text=True)
        hook = response.get_json()
        self.receiver.plan(path, statuses, [hook["secret"]])
        return hook, hook["secret"]

    def deliveries(self, hook_id: str) -> list[dict]:
        response = self.client.get(f"{BASE}/{hook_id}/deliveries?limit=200")
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()["items"]

    def events(self, path: str, task_id: str | None = None, kind: str | None = None):
        return [r for r in self.receiver.at(path)
                if (task_id is None or (r["payload"]["data"].get("task_id") == task_id))
                and (kind is None or r["payload"]["type"] == kind)]

    def wait_event(self, path: str, kind: str, task_id: str | None = None, count: int = 1):
        return wait_for(lambda: (found := self.events(path, task_id, kind))
                        and len(found) >= count and found,
                        timeout=30, message=f"{kind} at {path}")


def webhook_env(stack, receiver) -> dict:
    return dict(stack.env(), CELERY_API_WEBHOOK_ALLOWED_HOSTS=receiver.host,
                CELERY_API_WEBHOOK_SECRET=SECRET, CELERY_API_WEBHOOK_RETRY_SCHEDULE="0.3,0.3,0.3",
                CELERY_API_WEBHOOK_TIMEOUT="5")


@pytest.fixture(scope="module")
def webhook_stack(stack, receiver):
    app = build_app(dict(stack.config, WEBHOOK_ALLOWED_HOSTS=[receiver.host],
                         WEBHOOK_SECRET=SECRET))
    # As make webhook-worker runs it: the webhooks queue only, in threads.
    worker = Worker(webhook_env(stack, receiver),
                    f"hooks-{stack.kind}-{stack.database}@{os.uname().nodename}",
                    stack.folder / "webhook-worker.log", queues="webhooks", pool="threads",
                    concurrency=4)
    worker.start(stack.celery)
    yield Hooks(stack, receiver, app, worker)
    worker.stop()


@pytest.fixture
def hooks(webhook_stack):
    """The webhook stack; each test's subscriptions are deleted after it, so no later
    test (of this module or another on the stack) sends them events."""
    yield webhook_stack
    with webhook_stack.app.app_context():
        db.session.execute(sa.delete(WebhookSubscription))
        db.session.commit()
        db.session.remove()


def path() -> str:
    return f"/hook-{uuid.uuid4().hex[:10]}"


def without_extras(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in ("result_omitted", "status_url",
                                                           "truncated")}


@pytest.mark.integration
@pytest.mark.parametrize("stack", STACKS, indirect=True)
def test_run_events_are_signed_and_carry_the_status_document(hooks):
    where = path()
    hook, secret = hooks.subscribe(where, TASK_EVENTS)
    ok = launch(hooks.stack, "acme.add", {"a": 2, "b": 3})
    [delivered] = hooks.wait_event(where, "task.succeeded", ok)
    assert delivered["verified"] == [secret]
    headers = {k.lower(): v for k, v in delivered["headers"].items()}
    assert headers["webhook-id"].startswith("msg_") and headers["webhook-timestamp"].isdigit()
    payload = delivered["payload"]
    assert set(payload) == {"type", "timestamp", "data"}
    assert without_extras(payload["data"]) == status(hooks.stack, ok)
    assert payload["data"]["result"] == {"sum": 5} and payload["data"]["result_omitted"] is False
    assert payload["data"]["status_url"].endswith(f"/api/celery/tasks/{ok}")

    failed = launch(hooks.stack, "acme.boom", {})
    [event] = hooks.wait_event(where, "task.failed", failed)
    assert "acme exploded on purpose" in event["payload"]["data"]["error"]

    held = launch(hooks.stack, "acme.add", {"a": 1, "b": 1}, countdown=30)
    assert hooks.client.delete(f"/api/celery/tasks/{held}").status_code == 200
    [event] = hooks.wait_event(where, "task.revoked", held)
    assert event["payload"]["data"]["status"] == "REVOKED" and event["verified"] == [secret]

    # The sandbox's flaky company fails twice (SII unavailable), then succeeds.
    flaky = launch(hooks.stack, "sii.sync_f29",
                   {"company_id": SandboxSIIClient.FLAKY_ID, "year": "2025"})
    retried = hooks.wait_event(where, "task.retried", flaky, count=2)
    assert {e["payload"]["data"]["status"] for e in retried} == {"RETRY"}
    hooks.wait_event(where, "task.succeeded", flaky)
    assert all(r["verified"] == [secret] for r in hooks.receiver.at(where))
    rows = hooks.deliveries(hook["id"])
    assert {r["status"] for r in rows} == {"succeeded"} and len(rows) == len(
        hooks.receiver.at(where))


@pytest.mark.integration
@pytest.mark.parametrize("stack", STACKS, indirect=True)
def test_a_task_type_filter_and_batch_finished(hooks):
    only_boom = path()
    hooks.subscribe(only_boom, ["task.failed", "task.succeeded"],
                                   task_type="acme.boom")
    batches = path()
    hooks.subscribe(batches, ["batch.finished"])
    response = hooks.client.post("/api/celery/tasks/batch", json={"tasks": [
        {"task_type": "acme.add", "params": {"a": 1, "b": 2}},
        {"task_type": "acme.boom", "params": {}},
        {"task_type": "acme.add", "params": {"a": 3, "b": 4}}]})
    assert response.status_code == 202, response.get_data(as_text=True)
    batch_id = response.get_json()["batch_id"]

    def finished():
        # What beat's sweeper does at each tick: on PostgreSQL the batch's last two runs
        # can finish in concurrent transactions, neither of which sees the batch
        # finished; the sweeper then writes batch.finished (exactly once, checked below).
        with hooks.app.app_context():
            now = datetime.now(UTC)
            webhooks.sweep_batches(now - timedelta(minutes=10), now + timedelta(seconds=1))
            db.session.commit()
            db.session.remove()
        return [r for r in hooks.receiver.at(batches)
                if r["payload"]["data"]["batch_id"] == batch_id]

    [event] = wait_for(finished, timeout=30, message="batch.finished")
    assert event["payload"]["type"] == "batch.finished" and event["verified"]
    assert event["payload"]["data"]["counts"] == {"FAILURE": 1, "SUCCESS": 2}
    assert event["payload"]["data"]["total"] == 3
    # Every run has finished, so every event is written: the boom subscriber got the
    # failure and nothing of acme.add.
    boom_id = response.get_json()["tasks"][1]["task_id"]
    hooks.wait_event(only_boom, "task.failed", boom_id)
    assert {r["payload"]["data"]["task_type"] for r in hooks.receiver.at(only_boom)} == {
        "acme.boom"}
    with hooks.app.app_context():
        assert db.session.execute(sa.select(sa.func.count()).select_from(WebhookDelivery)
                                  .where(WebhookDelivery.event_type == "batch.finished",
                                         WebhookDelivery.payload.is_not(None),
                                         WebhookDelivery.url == hooks.receiver.url(batches))
                                  ).scalar() == 1


@pytest.mark.integration
@pytest.mark.parametrize("stack", STACKS, indirect=True)
def test_schedule_fired(hooks):
    where = path()
    hooks.subscribe(where, ["schedule.fired"])
    created = hooks.client.post("/api/celery/schedules", json={
        "name": f"hook-{uuid.uuid4().hex[:8]}", "task_type": "acme.add",
        "params": {"a": 1, "b": 1}, "interval_seconds": 3600})
    assert created.status_code == 201, created.get_data(as_text=True)
    schedule = created.get_json()
    try:
        run = hooks.client.post(f"/api/celery/schedules/{schedule['id']}/run").get_json()
        [event] = hooks.wait_event(where, "schedule.fired", run["task_id"])
        assert event["payload"]["data"]["schedule_id"] == schedule["id"] and event["verified"]
    finally:
        hooks.client.delete(f"/api/celery/schedules/{schedule['id']}")


@pytest.mark.integration
@pytest.mark.parametrize("stack", STACKS, indirect=True)
def test_a_failing_receiver_is_retried_until_it_answers_2xx(hooks):
    where = path()
    hook, secret = hooks.subscribe(where, ["task.succeeded"], statuses=[500, 503])
    task_id = launch(hooks.stack, "acme.add", {"a": 1, "b": 1})
    hooks.wait_event(where, "task.succeeded", task_id, count=3)
    got = hooks.events(where, task_id)
    assert [r["status"] for r in got] == [500, 503, 200]
    assert len({r["headers"]["webhook-id"] for r in got}) == 1  # one message, 3 attempts
    assert all(r["verified"] == [secret] for r in got)
    rows = sorted(wait_for(lambda: (rows := [r for r in hooks.deliveries(hook["id"])
                                             if r["task_id"] == task_id])
                           and all(r["status"] != "sending" for r in rows) and rows,
                           message="the attempts' outcomes"), key=lambda r: r["attempt"])
    assert [(r["attempt"], r["status"], r["status_code"]) for r in rows] == [
        (1, "failed", 500), (2, "failed", 503), (3, "succeeded", 200)]
    assert rows[0]["next_retry_at"] and rows[1]["next_retry_at"] and not rows[2]["next_retry_at"]
    assert "HTTP 500" in rows[0]["error"] and rows[2]["duration_ms"] is not None


@pytest.mark.integration
@pytest.mark.parametrize("stack", STACKS, indirect=True)
def test_410_disables_the_subscription(hooks):
    where = path()
    hook, _ = hooks.subscribe(where, ["task.succeeded"], statuses=[410])
    task_id = launch(hooks.stack, "acme.add", {"a": 1, "b": 1})
    wait_for(lambda: not hooks.client.get(f"{BASE}/{hook['id']}").get_json()["enabled"],
             timeout=30, message="the subscription disabled")
    shown = hooks.client.get(f"{BASE}/{hook['id']}").get_json()
    assert "410" in shown["disabled_reason"]
    [row] = hooks.deliveries(hook["id"])
    assert (row["status"], row["status_code"], row["next_retry_at"]) == ("failed", 410, None)
    assert [r["status"] for r in hooks.events(where, task_id)] == [410]


@pytest.mark.integration
@pytest.mark.parametrize("stack", STACKS, indirect=True)
def test_rotation_signs_with_both_secrets_during_the_overlap(hooks):
    where = path()
    hook, old = hooks.subscribe(where, ["task.succeeded"])
    new = hooks.client.post(f"{BASE}/{hook['id']}/rotate-secret?overlap_seconds=3600"
                            ).get_json()["secret"]
    hooks.receiver.plan(where, secrets=[old, new])
    ping = hooks.client.post(f"{BASE}/{hook['id']}/ping")
    assert ping.status_code == 202 and ping.get_json()["event_type"] == "ping"
    [event] = hooks.wait_event(where, "ping")
    assert event["verified"] == [old, new]
    assert len(event["headers"]["webhook-signature"].split(" ")) == 2
    newest = hooks.client.post(f"{BASE}/{hook['id']}/rotate-secret?overlap_seconds=0"
                               ).get_json()["secret"]
    hooks.receiver.plan(where, secrets=[old, new, newest])
    hooks.client.post(f"{BASE}/{hook['id']}/ping")
    second = hooks.wait_event(where, "ping", count=2)[1]
    assert second["verified"] == [newest]


@pytest.mark.integration
@pytest.mark.parametrize("stack", STACKS, indirect=True)
def test_a_failed_delivery_is_resent(hooks):
    where = path()
    hook, secret = hooks.subscribe(where, ["task.failed"], statuses=[500] * 4)
    task_id = launch(hooks.stack, "acme.boom", {})
    hooks.wait_event(where, "task.failed", task_id, count=4)  # 1 + the schedule's 3
    rows = wait_for(lambda: (rows := hooks.deliveries(hook["id"])) and len(rows) == 4
                    and all(r["status"] == "failed" for r in rows) and rows,
                    message="4 failed attempts")
    last = max(rows, key=lambda r: r["attempt"])
    assert last["next_retry_at"] is None  # the schedule is spent
    resent = hooks.client.post(f"{BASE}/{hook['id']}/deliveries/{last['id']}/resend")
    assert resent.status_code == 202, resent.get_data(as_text=True)
    assert resent.get_json()["attempt"] == 5
    again = hooks.wait_event(where, "task.failed", task_id, count=5)[-1]
    assert again["status"] == 200 and again["verified"] == [secret]
    assert again["headers"]["webhook-id"] == hooks.events(where, task_id)[0]["headers"][
        "webhook-id"]
    assert_problem(hooks.client.post(f"{BASE}/{hook['id']}/deliveries/999999999/resend"), 404)


@pytest.mark.integration
@pytest.mark.parametrize("stack", STACKS, indirect=True)
def test_a_launch_webhook_url_is_signed_with_the_deployment_secret(hooks):
    where = path()
    hooks.receiver.plan(where, secrets=[SECRET])
    task_id = launch(hooks, "acme.add", {"a": 4, "b": 4}, webhook_url=hooks.receiver.url(where))
    [event] = hooks.wait_event(where, "task.succeeded", task_id)
    assert event["verified"] == [SECRET]
    rows = wait_for(lambda: (rows := hooks.client.get(
        f"/api/celery/tasks/{task_id}/webhook-deliveries").get_json()["items"])
        and rows[0]["status"] == "succeeded" and rows, message="the launch's deliveries")
    assert rows[0]["webhook_id"] is None and rows[0]["url"] == hooks.receiver.url(where)
    batch = hooks.client.post("/api/celery/tasks/batch", json={"tasks": [
        {"task_type": "acme.boom", "params": {}, "webhook_url": hooks.receiver.url(where)}]})
    assert batch.status_code == 202, batch.get_data(as_text=True)
    item = batch.get_json()["tasks"][0]["task_id"]
    [event] = hooks.wait_event(where, "task.failed", item)
    assert event["verified"] == [SECRET]
    resent = hooks.client.post(
        f"/api/celery/tasks/{task_id}/webhook-deliveries/{rows[0]['id']}/resend")
    assert resent.status_code == 202, resent.get_data(as_text=True)
    hooks.wait_event(where, "task.succeeded", task_id, count=2)


@pytest.mark.integration
@pytest.mark.parametrize("stack", STACKS, indirect=True)
def test_the_guard_runs_again_at_delivery_time_and_redirects_are_not_followed(hooks):
    with hooks.app.app_context():  # written past the API's check: the worker refuses it
        inside = WebhookSubscription(
            id=str(uuid.uuid4()), url="http://127.0.0.1:1/admin", event_types=["task.failed"],
            enabled=True, secret=webhooks.new_secret(), created_at=webhooks.utcnow(),
            updated_at=webhooks.utcnow())
        db.session.add(inside)
        db.session.commit()
        inside_id = inside.id
    hooks.client.post(f"{BASE}/{inside_id}/ping")
    [row] = wait_for(lambda: (rows := hooks.deliveries(inside_id)) and rows[0]["status"]
                     == "failed" and rows, message="the refused delivery")
    assert "refused by the SSRF guard" in row["error"] and row["next_retry_at"] is None
    hooks.client.delete(f"{BASE}/{inside_id}")

    where, elsewhere = path(), path()
    hook, _ = hooks.subscribe(where, ["task.succeeded"])
    hooks.receiver.plan(where, [302], headers={"Location": hooks.receiver.url(elsewhere)})
    hooks.client.post(f"{BASE}/{hook['id']}/ping")
    hooks.wait_event(where, "ping", count=2)  # the 302 is an answer: retried, not followed
    assert [r["status"] for r in hooks.receiver.at(where)] == [302, 200]
    assert hooks.receiver.at(elsewhere) == []


@pytest.mark.integration
@pytest.mark.parametrize("stack", STACKS, indirect=True)
def test_task_workers_do_not_consume_the_webhooks_queue(hooks):
    queues = hooks.stack.celery.control.inspect(timeout=2).active_queues() or {}
    assert {q["name"] for q in queues[hooks.stack.worker.name]} == {"celery"}
    assert {q["name"] for q in queues[hooks.worker.name]} == {"webhooks"}


@pytest.mark.integration
@pytest.mark.parametrize("stack", STACKS, indirect=True)
def test_an_event_that_could_not_be_published_is_sent_by_the_sweeper(hooks):
    """The run finishes while the broker cannot be reached from the finishing process:
    its event is in the outbox (committed with the SUCCESS), not in the broker. Beat's
    sweeper publishes it; the webhook worker delivers it."""
    where = path()
    hook, secret = hooks.subscribe(where, ["task.succeeded"])
    config = hooks.stack.config
    cut_off = build_app(dict(config, CELERY=dict(
        config["CELERY"], broker_url=f"redis://127.0.0.1:{free_port()}/0")))
    task_id = stored_run(cut_off, "STARTED")
    with cut_off.app_context():
        assert runstate.finish(task_id, "SUCCESS", result={"ok": True})
        db.session.commit()  # the publish after the commit fails: nothing listens there
        [row] = db.session.execute(sa.select(WebhookDelivery).where(
            WebhookDelivery.run_id == task_id,
            WebhookDelivery.subscription_id == hook["id"])).scalars().all()
        assert (row.status, row.published_at) == ("pending", None)
    env = dict(webhook_env(hooks.stack, hooks.receiver), CELERY_API_DISPATCH_INTERVAL="0.2",
               CELERY_API_WEBHOOK_SWEEP_SECONDS="0.5", CELERY_API_RECONCILE_INTERVAL="3600",
               CELERY_API_PURGE_INTERVAL="3600")
    with Beat(env, hooks.stack.folder / f"beat-{uuid.uuid4().hex[:6]}") as beat:
        [event] = hooks.wait_event(where, "task.succeeded", task_id)
    assert event["verified"] == [secret] and event["payload"]["data"]["result"] == {"ok": True}
    assert "sweeper published" in beat.log_text()
    [shown] = [r for r in hooks.deliveries(hook["id"]) if r["task_id"] == task_id]
    assert shown["status"] == "succeeded"
    wait_status(hooks.stack, task_id, "SUCCESS")


def test_two_last_runs_finishing_at_once_still_finish_the_batch(history_app):
    """PostgreSQL, READ COMMITTED: the last two runs of a batch finish in concurrent
    transactions, each before the other commits, so neither sees the batch finished and
    neither writes ``batch.finished`` (reproduced by holding the first transaction open
    across the second). The sweeper writes it, once."""
    if history_app.config["TEST_DATABASE"] != "postgres":
        pytest.skip("SQLite serializes the two writers: the second sees the first's end")
    app, batch_id = history_app, str(uuid.uuid4())
    first, second = (stored_run(app, "STARTED", batch_id=batch_id) for _ in range(2))
    with app.app_context():
        subscription = WebhookSubscription(
            id=str(uuid.uuid4()), url="https://hooks.example.com/b",
            event_types=["batch.finished"], enabled=True, secret=webhooks.new_secret(),
            created_at=webhooks.utcnow() - timedelta(minutes=1),
            updated_at=webhooks.utcnow())
        db.session.add(subscription)
        db.session.commit()
        subscription_id = subscription.id
    written, go_on = threading.Event(), threading.Event()

    def finish_first():
        with app.app_context():
            runstate.finish(first, "SUCCESS", result=1)
            written.set()
            go_on.wait(30)
            db.session.commit()
            db.session.remove()

    holder = threading.Thread(target=finish_first)
    holder.start()
    assert written.wait(30)
    with app.app_context():
        runstate.finish(second, "SUCCESS", result=2)  # sees the first still STARTED
        db.session.commit()
        db.session.remove()
    go_on.set()
    holder.join(30)

    def events():
        with app.app_context():
            rows = db.session.execute(sa.select(WebhookDelivery).where(
                WebhookDelivery.subscription_id == subscription_id)).scalars().all()
            db.session.expunge_all()
            return rows

    try:
        assert events() == []  # the race: neither transaction wrote it
        with app.app_context():
            now = webhooks.utcnow()
            assert webhooks.sweep_batches(now - timedelta(minutes=1), now) == 1
            db.session.commit()
            assert webhooks.sweep_batches(now - timedelta(minutes=1), now) == 0  # once
            db.session.commit()
        [event] = events()
        assert event.payload["data"]["counts"] == {"SUCCESS": 2}
    finally:
        with app.app_context():
            db.session.execute(sa.delete(WebhookSubscription).where(
                WebhookSubscription.id == subscription_id))
            db.session.commit()


def test_the_webhook_settings_are_checked_at_start(monkeypatch):
    from celery_api import settings

    monkeypatch.setenv("CELERY_API_WEBHOOK_SECRET", "not-a-secret")
    with pytest.raises(settings.ConfigurationError, match="whsec_"):
        settings.webhook_secret()
    monkeypatch.setenv("CELERY_API_WEBHOOK_SECRET", SECRET)
    assert settings.webhook_secret() == SECRET
    monkeypatch.setenv("CELERY_API_WEBHOOK_RETRY_SCHEDULE", "5,soon")
    with pytest.raises(settings.ConfigurationError, match="comma separated seconds"):
        settings.retry_schedule()
    monkeypatch.setenv("CELERY_API_WEBHOOK_RETRY_SCHEDULE", "1, 2.5,60")
    assert settings.retry_schedule() == [1.0, 2.5, 60.0]


# Delivery under adversity, in this process against held receivers (deterministic: the
# receiver holds the first request until the test releases it).

class HeldReceiver:
    """An HTTP receiver on 127.0.0.1 that holds each request until ``release`` (then
    answers 200), counting what it received, keyed by ``webhook-id``."""

    def __init__(self):
        import http.server

        receiver = self
        self.arrived = threading.Semaphore(0)
        self.go = threading.Event()
        self.received: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.received.append(self.headers.get("webhook-id"))
                receiver.arrived.release()
                receiver.go.wait(60)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/held"

    def stop(self):
        self.go.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def held(app, monkeypatch):
    """A subscription to a HeldReceiver, one pending delivery of it (not published: it
    is delivered by hand), and a helper running deliver() in a thread."""
    receiver = HeldReceiver()
    monkeypatch.setitem(app.config, "WEBHOOK_ALLOWED_HOSTS", ["127.0.0.1"])
    monkeypatch.setitem(app.config, "WEBHOOK_TIMEOUT", 60.0)
    monkeypatch.setitem(app.config, "WEBHOOK_RETRY_SCHEDULE", [])
    with app.app_context():
        now = webhooks.utcnow()
        db.session.add(WebhookSubscription(
            id=(hook_id := str(uuid.uuid4())), url=receiver.url(), enabled=True,
            event_types=["task.failed"], secret=webhooks.new_secret(), created_at=now,
            updated_at=now))
        db.session.commit()
        [delivery_id] = webhooks._insert([webhooks._row(
            "ping", receiver.url(), {"n": 1}, now, subscription_id=hook_id)])
        db.session.info.pop(webhooks.OUTBOX)
        db.session.commit()

    outcomes: list[str] = []

    def in_thread() -> threading.Thread:
        def run():
            with app.app_context():
                try:
                    outcomes.append(webhooks.deliver(delivery_id))
                except Exception as exc:  # noqa: BLE001 - the test looks at it
                    outcomes.append(repr(exc))
                finally:
                    db.session.remove()
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    yield receiver, hook_id, delivery_id, in_thread, outcomes
    receiver.stop()
    with app.app_context():
        db.session.execute(sa.delete(WebhookDelivery).where(
            WebhookDelivery.subscription_id == hook_id))
        db.session.execute(sa.delete(WebhookSubscription).where(
            WebhookSubscription.id == hook_id))
        db.session.commit()


def test_an_attempt_given_back_by_the_sweeper_is_ended_by_its_new_claimer_only(
        app, held, monkeypatch):
    """The first attempt overruns (held by the receiver); the sweeper gives the row
    back and a second copy sends it and succeeds. When the first finally returns, its
    outcome is not written: the row keeps the second copy's claim and start."""
    receiver, _hook_id, delivery_id, in_thread, outcomes = held
    monkeypatch.setattr(webhooks, "_batches_swept_until", None)
    monkeypatch.setattr(webhooks, "publish", lambda *_a, **_k: None)  # delivered by hand
    first = in_thread()
    assert receiver.arrived.acquire(timeout=30)  # the first copy is at the receiver
    with app.app_context():
        later = webhooks.utcnow() + timedelta(
            seconds=webhooks.stuck_seconds(app.config) + 1)
        webhooks.sweep(now=later)  # left sending past its deadline: given back
        row = db.session.get(WebhookDelivery, delivery_id)
        assert (row.status, row.resets) == ("pending", 1)
    second = in_thread()
    assert receiver.arrived.acquire(timeout=30)
    receiver.go.set()
    first.join(60)
    second.join(60)
    assert sorted(outcomes) == ["not ours", "succeeded"]
    with app.app_context():
        row = db.session.get(WebhookDelivery, delivery_id)
        assert row.status == "succeeded" and row.started_at is not None


def test_a_subscription_deleted_during_a_send_ends_the_attempt_quietly(app, held):
    receiver, hook_id, delivery_id, in_thread, outcomes = held
    thread = in_thread()
    assert receiver.arrived.acquire(timeout=30)
    with app.app_context():
        webhooks.delete(hook_id)
    receiver.go.set()
    thread.join(60)
    assert outcomes == ["not ours"]  # not StaleDataError
    with app.app_context():
        assert db.session.get(WebhookDelivery, delivery_id) is None


def test_an_unexpected_error_ends_the_attempt_failed_and_never_leaves_it_sending(
        app, held):
    """A resolver answering something that is not an address (a ValueError deep in
    the guard, no handler expects it): the attempt ends failed with the error."""
    _receiver, hook_id, delivery_id, _in_thread, _outcomes = held
    with app.app_context():
        db.session.execute(sa.update(WebhookSubscription)
                           .where(WebhookSubscription.id == hook_id)
                           .values(url="http://hooks.example.com/in"))
        db.session.commit()
        outcome = webhooks.deliver(delivery_id, resolve=lambda _host, _port: ["garbage"])
        row = db.session.get(WebhookDelivery, delivery_id)
        assert (outcome, row.status) == ("failed", "failed")
        assert row.error.startswith("unexpected error: ValueError")


def test_an_attempt_left_sending_again_and_again_is_ended_failed(app, held, monkeypatch):
    _receiver, _hook_id, delivery_id, _in_thread, _outcomes = held
    monkeypatch.setattr(webhooks, "_batches_swept_until", None)
    monkeypatch.setattr(webhooks, "publish", lambda *_a, **_k: None)
    with app.app_context():
        now = webhooks.utcnow()
        for resets in range(1, webhooks.MAX_RESETS + 1):
            db.session.execute(sa.update(WebhookDelivery)
                               .where(WebhookDelivery.id == delivery_id)
                               .values(status="sending", started_at=now))
            db.session.commit()
            now += timedelta(seconds=webhooks.stuck_seconds(app.config) + 1)
            webhooks.sweep(now=now)
            row = db.session.get(WebhookDelivery, delivery_id, populate_existing=True)
            assert row.resets == resets
        assert row.status == "failed" and row.error.startswith("abandoned")


def test_the_sweeper_publishes_a_published_backlog_again_only_after_the_horizon(
        app, redis_server, monkeypatch):
    """Pending rows published at commit but not taken (the webhook worker is down) are
    not published again at every sweep: only once the re-publish horizon (the
    broker's visibility timeout) has passed. A row whose publish failed is."""
    import redis

    queue = redis.Redis(port=redis_server.port, db=0)
    monkeypatch.setattr(webhooks, "_batches_swept_until", None)
    with app.app_context():
        now = webhooks.utcnow()
        rows = [webhooks._row("ping", "https://hooks.example.com/p", {"n": n}, now)
                for n in range(3)]
        ids = webhooks._insert(rows)
        db.session.info.pop(webhooks.OUTBOX)  # "published": nothing consumes them here
        db.session.commit()
        db.session.execute(sa.update(WebhookDelivery).where(WebhookDelivery.id == ids[2])
                           .values(published_at=None))  # its publish failed
        db.session.commit()
        try:
            grace = app.config["WEBHOOK_SWEEP_SECONDS"]
            before = queue.llen(webhooks.QUEUE)
            for step in (1, 2, 3):  # sweeps within the horizon: only the unpublished one
                assert webhooks.sweep(now=now + timedelta(seconds=grace + step)) == \
                    (1 if step == 1 else 0)
            assert queue.llen(webhooks.QUEUE) == before + 1
            horizon = webhooks.republish_seconds(app.config)
            assert webhooks.sweep(now=now + timedelta(seconds=horizon + 1)) == 2
        finally:
            db.session.execute(sa.delete(WebhookDelivery).where(WebhookDelivery.id.in_(ids)))
            db.session.commit()


@pytest.mark.parametrize("competing_attempt", [0, 1], ids=["same-attempt", "next-attempt"])
def test_a_resend_that_loses_the_race_is_a_409_and_leaves_one_open_attempt(
        app, monkeypatch, competing_attempt):
    """Two re-sends of a finished delivery at once: both pass the check for an open
    attempt, then insert. Held at that window (the competing re-send's row is inserted
    first, by a hook on the insert), the loser answers 409, never 500, and the message
    keeps one open attempt (the unique index on the open attempts of a message)."""
    with app.app_context():
        now = webhooks.utcnow()
        db.session.add(WebhookSubscription(
            id=(hook_id := str(uuid.uuid4())), url="https://hooks.example.com/in",
            enabled=True, event_types=["task.failed"], secret=webhooks.new_secret(),
            created_at=now, updated_at=now))
        row = webhooks._row("ping", "https://hooks.example.com/in", {}, now,
                            subscription_id=hook_id)
        [first] = webhooks._insert([dict(row, status="failed")])
        db.session.info.pop(webhooks.OUTBOX)
        db.session.commit()
        insert = webhooks._insert

        def competing_first(rows, *args, **kwargs):
            winner = dict(rows[0], attempt=rows[0]["attempt"] + competing_attempt,
                          message_id=rows[0]["message_id"])
            db.session.execute(sa.insert(WebhookDelivery), winner)
            return insert(rows, *args, **kwargs)

        monkeypatch.setattr(webhooks, "_insert", competing_first)
        try:
            with pytest.raises(webhooks.Conflict, match="re-sent by another request"):
                webhooks.resend(first, hook_id)
            db.session.rollback()
            monkeypatch.setattr(webhooks, "_insert", insert)
            message = db.session.get(WebhookDelivery, first).message_id
            statement = sa.insert(WebhookDelivery)
            db.session.execute(statement, dict(row, message_id=message, attempt=2))
            with pytest.raises(sa.exc.IntegrityError):  # a second open attempt
                db.session.execute(statement, dict(row, message_id=message, attempt=3))
            db.session.rollback()
        finally:
            db.session.rollback()
            db.session.execute(sa.delete(WebhookDelivery).where(
                WebhookDelivery.subscription_id == hook_id))
            db.session.execute(sa.delete(WebhookSubscription).where(
                WebhookSubscription.id == hook_id))
            db.session.commit()


@pytest.mark.parametrize("raw", ["d9223372036854775808", "d99999999999999999999", "d0",
                                 "d\u0661\u0662"])
def test_a_tampered_deliveries_cursor_is_a_422(app, monkeypatch, raw):
    """Out of the BIGINT range (OverflowError on SQLite, out of range on PostgreSQL),
    zero, non-ASCII digits: never issued, so 422."""
    import base64

    monkeypatch.setitem(app.config, "WEBHOOK_ALLOWED_HOSTS", ["127.0.0.1"])
    client = app.test_client()
    hook = client.post(BASE, json={"url": "http://127.0.0.1:9/hook",
                                   "event_types": ["task.failed"]}).get_json()
    try:
        cursor = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
        body = assert_problem(client.get(f"{BASE}/{hook['id']}/deliveries?cursor={cursor}"),
                              422, "cursor")
        assert body["errors"]["query"]["cursor"]
    finally:
        client.delete(f"{BASE}/{hook['id']}")


def test_a_batch_resolves_each_webhook_host_once_and_names_few(guarded, app, monkeypatch):
    """A batch's items usually share one webhook_url: its host is resolved once per
    request, not once per item (1,000 items behind a slow name server held a thread for
    199 s). A batch naming more than MAX_WEBHOOK_URLS distinct URLs is refused before
    any is resolved."""
    import socket

    from celery_api.services import batches

    monkeypatch.setitem(app.config, "WEBHOOK_SECRET", SECRET)
    asked = []
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host.endswith(".hooks.example.com"):
            asked.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    task = {"task_type": "sii.sync_documents", "params": {"company_id": COMPANY},
            "countdown": 3000, "webhook_url": "https://one.hooks.example.com/in"}
    accepted = guarded.post("/api/celery/tasks/batch", json={"tasks": [task] * 50})
    assert accepted.status_code == 202, accepted.get_data(as_text=True)
    assert asked == ["one.hooks.example.com"]

    asked.clear()
    many = [dict(task, webhook_url=f"https://h{n}.hooks.example.com/in")
            for n in range(batches.MAX_WEBHOOK_URLS + 1)]
    body = assert_problem(guarded.post("/api/celery/tasks/batch", json={"tasks": many}),
                          422, f"at most {batches.MAX_WEBHOOK_URLS} distinct webhook_url")
    assert body["errors"]["json"]["tasks"]
    assert asked == []
    revoked = guarded.delete(accepted.headers["Location"])
    assert revoked.status_code == 200, revoked.get_data(as_text=True)

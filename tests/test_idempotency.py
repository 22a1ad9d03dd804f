"""Idempotency-Key on the POSTs that create runs (celery_api.idempotency)."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import requests
import sqlalchemy as sa

from celery_api import idempotency
from celery_api.extensions import db
from celery_api.models import IdempotencyKey, TaskRun
from celery_api.services import launch as launch_service
from celery_api.services import maintenance
from celery_api.services.errors import Unavailable
from tests.support import (
    COMPANY,
    LiveServer,
    assert_problem,
    build_app,
    close_app,
    create_key,
    database_url,
    make_config,
    raising,
    service_env,
    stored_run,
)

LAUNCH = "/api/celery/tasks/launch"
BODY = {"task_type": "sii.sync_documents", "params": {"company_id": COMPANY, "months": 1}}


def new_key() -> str:
    return str(uuid.uuid4())


def run_count(app) -> int:
    with app.app_context():
        count = db.session.scalar(sa.select(sa.func.count()).select_from(TaskRun))
        db.session.remove()
        return count


def keyed(key: str, **headers) -> dict:
    return {"Idempotency-Key": key, **headers}


def test_a_repeat_replays_the_first_answer_and_creates_no_second_run(app, client):
    key = new_key()
    first = client.post(LAUNCH, json=BODY, headers=keyed(key))
    assert first.status_code == 202, first.get_data(as_text=True)
    assert "Idempotent-Replayed" not in first.headers
    before = run_count(app)
    # The same body with its keys in another order is the same request.
    again = client.post(LAUNCH, json={"params": BODY["params"], "task_type": BODY["task_type"]},
                        headers=keyed(key))
    assert again.status_code == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json() == first.get_json()
    assert again.headers["Location"] == first.headers["Location"]
    assert again.mimetype == "application/json"
    assert run_count(app) == before
    # Without the key, or with another one, a launch is a new run.
    other = client.post(LAUNCH, json=BODY, headers=keyed(new_key()))
    assert other.get_json()["task_id"] != first.get_json()["task_id"]


def test_the_same_key_with_another_body_is_422(client):
    key = new_key()
    assert client.post(LAUNCH, json=BODY, headers=keyed(key)).status_code == 202
    changed = {**BODY, "params": {"company_id": COMPANY, "months": 2}}
    body = assert_problem(client.post(LAUNCH, json=changed, headers=keyed(key)), 422,
                          "Idempotency-Key")
    assert "Idempotency-Key" in body["errors"]["headers"]


@pytest.mark.parametrize("key", ["x" * 256, "has space", "quote\"d", ""])
def test_a_malformed_key_is_422(client, key):
    answer = client.post(LAUNCH, json=BODY, headers=keyed(key))
    assert_problem(answer, 422, "Idempotency-Key")


def test_a_key_of_255_characters_and_a_quoted_key_are_taken(client):
    key = "k" * 255
    first = client.post(LAUNCH, json=BODY, headers=keyed(key))
    assert first.status_code == 202
    quoted = client.post(LAUNCH, json=BODY, headers=keyed(f'"{key}"'))
    assert quoted.headers["Idempotent-Replayed"] == "true"


def test_a_repeat_while_the_first_is_in_progress_is_409(app, monkeypatch):
    real = launch_service.launch
    entered, release = threading.Event(), threading.Event()

    def held(*args, **kwargs):
        entered.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(launch_service, "launch", held)
    key, answers = new_key(), {}

    def first():
        answers["first"] = app.test_client().post(LAUNCH, json=BODY, headers=keyed(key))

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert entered.wait(30)
        busy = app.test_client().post(LAUNCH, json=BODY, headers=keyed(key))
        assert_problem(busy, 409, "in progress")
        assert busy.headers["Retry-After"] == "1"
    finally:
        release.set()
        thread.join(30)
    assert answers["first"].status_code == 202
    monkeypatch.setattr(launch_service, "launch", real)
    again = app.test_client().post(LAUNCH, json=BODY, headers=keyed(key))
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["task_id"] == answers["first"].get_json()["task_id"]


def test_a_503_releases_the_key(app, client, monkeypatch):
    monkeypatch.setattr(launch_service, "launch",
                        raising(Unavailable("The broker is unreachable.")))
    key = new_key()
    assert_problem(client.post(LAUNCH, json=BODY, headers=keyed(key)), 503)
    monkeypatch.undo()
    retried = client.post(LAUNCH, json=BODY, headers=keyed(key))
    assert retried.status_code == 202 and "Idempotent-Replayed" not in retried.headers
    replayed = client.post(LAUNCH, json=BODY, headers=keyed(key))
    assert replayed.get_json()["task_id"] == retried.get_json()["task_id"]


def test_a_4xx_is_not_kept(client):
    key = new_key()
    bad = {"task_type": "sii.sync_documents", "params": {"months": "many"}}
    assert client.post(LAUNCH, json=bad, headers=keyed(key)).status_code == 422
    # Not replayed: the key was released, so a corrected request with it launches.
    fixed = client.post(LAUNCH, json=BODY, headers=keyed(key))
    assert fixed.status_code == 202 and "Idempotent-Replayed" not in fixed.headers


def test_batch_retry_and_run_now_replay(app, client):
    batch = {"tasks": [BODY, BODY]}
    key = new_key()
    first = client.post("/api/celery/tasks/batch", json=batch, headers=keyed(key))
    assert first.status_code == 202, first.get_data(as_text=True)
    again = client.post("/api/celery/tasks/batch", json=batch, headers=keyed(key))
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["batch_id"] == first.get_json()["batch_id"]

    failed = stored_run(app, "FAILURE")
    key = new_key()
    retry = client.post(f"/api/celery/tasks/{failed}/retry", headers=keyed(key))
    assert retry.status_code == 202, retry.get_data(as_text=True)
    again = client.post(f"/api/celery/tasks/{failed}/retry", headers=keyed(key))
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["task_id"] == retry.get_json()["task_id"]
    # The same key on another run's retry is another request.
    other = stored_run(app, "FAILURE")
    assert_problem(client.post(f"/api/celery/tasks/{other}/retry", headers=keyed(key)), 422)

    schedule = client.post("/api/celery/schedules", json={
        "name": f"s-{uuid.uuid4().hex[:12]}", "task_type": "sii.sync_documents_all_companies",
        "params": {"months": 1}, "interval_seconds": 3600}).get_json()
    key = new_key()
    path = f"/api/celery/schedules/{schedule['id']}/run"
    ran = client.post(path, headers=keyed(key))
    assert ran.status_code == 202, ran.get_data(as_text=True)
    again = client.post(path, headers=keyed(key))
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["task_id"] == ran.get_json()["task_id"]


def test_keys_expire(app, client, monkeypatch):
    key = new_key()
    first = client.post(LAUNCH, json=BODY, headers=keyed(key)).get_json()["task_id"]
    later = idempotency.now() + timedelta(hours=24, seconds=1)
    monkeypatch.setattr(idempotency, "now", lambda: later)
    second = client.post(LAUNCH, json=BODY, headers=keyed(key))
    assert "Idempotent-Replayed" not in second.headers
    assert second.get_json()["task_id"] != first
    # The purge deletes the keys expired by then (with the history's purge).
    old_key = new_key()
    monkeypatch.undo()
    client.post(LAUNCH, json=BODY, headers=keyed(old_key))
    monkeypatch.setattr(idempotency, "now", lambda: later + timedelta(hours=25))
    with app.app_context():
        maintenance.purge()
        left = db.session.scalars(sa.select(IdempotencyKey.key).where(
            IdempotencyKey.key.in_([key, old_key]))).all()
        db.session.remove()
    assert left == []


def test_a_setting_of_zero_keeps_no_key(tmp_path, redis_server):
    app = build_app(make_config(tmp_path, redis_server.url, IDEMPOTENCY_SECONDS=0))
    client, key = app.test_client(), new_key()
    first = client.post(LAUNCH, json=BODY, headers=keyed(key)).get_json()["task_id"]
    second = client.post(LAUNCH, json=BODY, headers=keyed(key))
    assert "Idempotent-Replayed" not in second.headers
    assert second.get_json()["task_id"] != first


def test_keys_are_scoped_per_api_key(tmp_path, redis_server):
    config = make_config(tmp_path, redis_server.url.replace("/0", "/10"), AUTH="required")
    app = build_app(config)
    client = app.test_client()
    alice, bob = create_key(app, "alice", "launch"), create_key(app, "bob", "launch")
    key = new_key()
    answers = [client.post(LAUNCH, json=BODY,
                           headers=keyed(key, Authorization=f"Bearer {who}"))
               for who in (alice, bob, alice)]
    assert [a.status_code for a in answers] == [202, 202, 202]
    ids = [a.get_json()["task_id"] for a in answers]
    assert ids[0] != ids[1] and ids[2] == ids[0]
    assert "Idempotent-Replayed" not in answers[1].headers
    assert answers[2].headers["Idempotent-Replayed"] == "true"
    assert run_count(app) == 2
    # Without a valid key, nothing is claimed or replayed: 401.
    assert client.post(LAUNCH, json=BODY, headers=keyed(key)).status_code == 401


def test_the_operations_document_the_headers(client):
    spec = client.get("/api/openapi.json").get_json()
    for path in ("/tasks/launch", "/tasks/batch", "/tasks/{task_id}/retry",
                 "/schedules/{id}/run"):
        operation = spec["paths"][f"/api/celery{path}"]["post"]
        parameter = next(p for p in operation["parameters"] if p["name"] == "Idempotency-Key")
        assert parameter["in"] == "header" and parameter["required"] is False
        assert "Idempotent-Replayed" in operation["responses"]["202"]["headers"]
        assert {"409", "422"} <= operation["responses"].keys()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def two_apis(request, tmp_path_factory, redis_server):
    """Two gunicorn servers (two workers each) on one database."""
    folder = tmp_path_factory.mktemp(f"idem-{request.param}")
    config = make_config(folder, redis_server.url.replace("/0", "/12"),
                         database_url(request, request.param))
    app = build_app(config)
    env = service_env(config)
    servers = [LiveServer(env, folder / f"api-{n}.log", WEB_CONCURRENCY="2").start()
               for n in (1, 2)]
    yield app, servers
    for server in servers:
        server.stop()
    close_app(app)


@pytest.mark.integration
def test_concurrent_duplicates_on_two_instances_make_one_run(two_apis):
    app, servers = two_apis
    key, before = new_key(), run_count(app)
    start = threading.Barrier(10)
    conflicts = []

    def send(n: int):
        url = f"{servers[n % 2].url}{LAUNCH}"
        start.wait(30)
        deadline = time.monotonic() + 30
        while True:
            answer = requests.post(url, json=BODY, headers=keyed(key), timeout=30)
            if answer.status_code != 409 or time.monotonic() > deadline:
                return answer
            conflicts.append(n)  # the first is in progress: send it again, as a client would
            time.sleep(0.02)

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(send, range(10)))
    assert [a.status_code for a in answers] == [202] * 10, [a.text for a in answers]
    assert len({a.json()["task_id"] for a in answers}) == 1
    assert len({a.headers["Location"] for a in answers}) == 1
    replayed = [a.headers.get("Idempotent-Replayed") for a in answers]
    assert replayed.count("true") == 9 and replayed.count(None) == 1
    assert run_count(app) == before + 1

"""Broker down: launch answers 503 fast and records nothing; reads still answer."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from celery_api.extensions import db
from celery_api.models import TaskRun
from celery_api.tasks.sii_client import SANDBOX_COMPANIES
from tests.conftest import build_app, make_config
from tests.support import RedisServer

LAUNCH = {"task_type": "sii.sync_documents", "params": {"company_id": SANDBOX_COMPANIES[0]}}


@pytest.fixture
def fragile(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    app = build_app(make_config(tmp_path / "app", server.url, STATS_CACHE_SECONDS=0))
    yield server, app
    server.stop()


def count_runs(app) -> int:
    with app.app_context():
        return db.session.execute(sa.select(sa.func.count()).select_from(TaskRun)).scalar_one()


def test_launch_is_503_when_broker_is_down_and_nothing_is_recorded(fragile):
    server, app = fragile
    client = app.test_client()
    accepted = client.post("/api/celery/tasks/launch", json=LAUNCH)
    assert accepted.status_code == 202
    task_id = accepted.get_json()["task_id"]
    server.stop()

    started = time.monotonic()
    response = client.post("/api/celery/tasks/launch", json=LAUNCH)
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    assert "broker is unreachable" in response.get_json()["detail"]
    assert int(response.headers["Retry-After"]) > 0
    assert elapsed < 2.0, f"503 took {elapsed:.2f} s; the contract is 2 s"
    assert count_runs(app) == 1  # only the one that was really published

    # Reads still answer from the record.
    status = client.get(f"/api/celery/tasks/{task_id}")
    assert status.status_code == 200 and status.get_json()["status"] == "PENDING"
    stats = client.get("/api/celery/stats")
    assert stats.status_code == 503 and stats.mimetype == "application/problem+json"

    server.start()
    recovered = client.post("/api/celery/tasks/launch", json=LAUNCH)
    assert recovered.status_code == 202, recovered.get_data(as_text=True)
    assert count_runs(app) == 2


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
        started = time.monotonic()
        response = app.test_client().post("/api/celery/tasks/launch", json=LAUNCH)
        elapsed = time.monotonic() - started
        assert response.status_code == 503, response.get_data(as_text=True)
        assert elapsed < 2.0, f"503 took {elapsed:.2f} s; the contract is 2 s"
        assert count_runs(app) == 0
    finally:
        listener.close()
        for conn in held:
            conn.close()

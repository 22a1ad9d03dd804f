"""Operations: health, readiness, request ids in JSON logs from API to worker."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import build_app, make_config
from tests.support import RedisServer, Worker, wait_for
from tests.test_integration import wait_status


def test_healthz_is_alive(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.get_json() == {"status": "alive"}


def test_readyz_reports_each_dependency(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"database", "broker", "result_backend"}
    for check in body["checks"].values():
        assert check["status"] == "up" and check["latency_ms"] >= 0


def test_readyz_is_503_naming_the_dependency_that_is_down(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    app = build_app(make_config(tmp_path / "app", server.url))
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    server.stop()
    response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.get_json()["checks"]
    assert checks["broker"]["status"] == "down" and "error" in checks["broker"]
    assert checks["result_backend"]["status"] == "down"
    assert checks["database"]["status"] == "up"
    server.start()
    wait_for(lambda: client.get("/readyz").status_code == 200, timeout=15,
             message="readiness to recover")


def test_request_id_is_echoed_or_made(client):
    given = client.get("/healthz", headers={"X-Request-ID": "req-123.abc"})
    assert given.headers["X-Request-ID"] == "req-123.abc"
    made = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert made.headers["X-Request-ID"] != "bad id with spaces"
    assert len(made.headers["X-Request-ID"]) == 32


@pytest.mark.integration
def test_request_id_reaches_the_worker_json_logs(stack):
    env = dict(stack.env(), LOG_FORMAT="json")
    worker = Worker(env, f"json-{stack.kind}-{stack.database}@{os.uname().nodename}",
                    stack.folder / "json-worker.log", queues="parked", concurrency=1)
    worker.start(stack.celery)
    try:
        response = stack.client.post(
            "/api/celery/tasks/launch", headers={"X-Request-ID": "trace-me-42"},
            json={"task_type": "acme.add", "params": {"a": 1, "b": 2}, "queue": "parked"})
        assert response.headers["X-Request-ID"] == "trace-me-42"
        task_id = response.get_json()["task_id"]
        wait_status(stack, task_id, "SUCCESS")

        def logged():
            lines = [json.loads(line) for line in worker.log_text().splitlines()
                     if line.startswith("{")]
            return [r for r in lines if task_id in r["message"]
                    and r.get("request_id") == "trace-me-42"]

        records = wait_for(logged, timeout=15, message="worker JSON lines with the request id")
        assert any("✅" in r["message"] for r in records)
        assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    finally:
        worker.stop()

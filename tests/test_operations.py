"""Operations: health, readiness, request ids in JSON logs from API to worker."""

from __future__ import annotations

import json
import os

import pytest

from tests.support import (
    RedisServer,
    Worker,
    build_app,
    final_record,
    make_config,
    wait_for,
    wait_status,
)


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
    try:
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
    finally:
        server.stop()  # the restarted server too


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
            records = [r for r in lines if task_id in r["message"]
                       and r.get("request_id") == "trace-me-42"]
            # The status shows SUCCESS from the result backend a moment before the
            # worker's own record (and its ✅ line) is written: wait for that line.
            return records if any("✅" in r["message"] for r in records) else None

        records = wait_for(logged, timeout=15, message="worker JSON lines with the request id")
        assert any("✅" in r["message"] for r in records)
        assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    finally:
        worker.stop()


def metric_samples(text: str, name: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            samples[labels] = float(value)
    return samples


@pytest.mark.integration
def test_metrics_cover_requests_launches_queues_workers_and_runs(stack):
    task_id = stack.client.post("/api/celery/tasks/launch", json={
        "task_type": "acme.add", "params": {"a": 3, "b": 4}}).get_json()["task_id"]
    wait_status(stack, task_id, "SUCCESS")
    final_record(stack, task_id)  # the run durations are read from the worker's records
    stack.client.post("/api/celery/tasks/launch", json={"task_type": "acme.add", "params": {}})
    response = stack.client.get("/metrics")
    assert response.status_code == 200 and response.content_type.startswith("text/plain")
    text = response.get_data(as_text=True)
    launches = metric_samples(text, "celery_api_task_launches_total")
    assert launches['celery_api_task_launches_total{outcome="accepted",task_type="acme.add"}'] >= 1
    assert launches['celery_api_task_launches_total{outcome="invalid",task_type="acme.add"}'] >= 1
    requests_total = metric_samples(text, "celery_api_http_requests_total")
    assert any('endpoint="/api/celery/tasks/launch"' in k and 'status="202"' in k
               for k in requests_total)
    assert any('endpoint="/api/celery/tasks/<task_id:task_id>"' in k for k in requests_total)
    assert metric_samples(text, "celery_api_workers_online")["celery_api_workers_online"] >= 1
    assert 'celery_api_queue_depth{queue="celery"}' in metric_samples(
        text, "celery_api_queue_depth")
    runs = metric_samples(text, "celery_api_run_duration_seconds_gcount")
    key = 'celery_api_run_duration_seconds_gcount{status="SUCCESS",task_type="acme.add"}'
    assert runs[key] >= 1


def test_metrics_sum_every_gunicorn_worker(tmp_path, redis_server):
    import requests

    from tests.support import LiveServer, service_env

    config = make_config(tmp_path / "app", redis_server.url.replace("/0", "/6"))
    build_app(config)
    api = LiveServer(service_env(config), tmp_path / "gunicorn.log", WEB_CONCURRENCY="3",
                     PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics")).start()
    def healthz_count():
        text = requests.get(f"{api.url}/metrics", timeout=10,
                            headers={"Connection": "close"}).text
        served = metric_samples(text, "celery_api_http_requests_total")
        return sum(v for k, v in served.items() if 'endpoint="/healthz"' in k)

    try:
        before = healthz_count()
        for _ in range(60):
            requests.get(f"{api.url}/healthz", timeout=5, headers={"Connection": "close"})
        # Whichever worker answers the scrape, it reports every worker's requests.
        assert [healthz_count() - before for _ in range(5)] == [60] * 5
        assert len(list((tmp_path / "metrics").glob("counter_*.db"))) >= 2
    finally:
        api.stop()

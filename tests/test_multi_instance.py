"""Two API processes and two workers sharing Redis and PostgreSQL act as one service."""

from __future__ import annotations

import os

import pytest
import requests

from tests.support import (
    LiveServer,
    Worker,
    build_app,
    database_url,
    get_until,
    make_config,
    service_env,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_of_each(request, tmp_path_factory, redis_server):
    folder = tmp_path_factory.mktemp("multi")
    config = make_config(folder, redis_server.url.replace("/0", "/7"),
                         database_url(request, "postgres"))
    app = build_app(config)
    env = service_env(config)
    host = os.uname().nodename
    workers = [Worker(env, f"multi-{n}@{host}", folder / f"worker-{n}.log").start(
        app.extensions["celery"]) for n in (1, 2)]
    apis = [LiveServer(env, folder / f"api-{n}.log", WEB_CONCURRENCY="1").start()
            for n in (1, 2)]
    yield apis, workers
    for process in (*apis, *workers):
        process.stop()



def test_instances_share_runs_revokes_retries_and_workers(two_of_each):
    (a, b), workers = two_of_each
    api_a, api_b = f"{a.url}/api/celery", f"{b.url}/api/celery"

    # Launched on A, followed on B.
    done = requests.post(f"{api_a}/tasks/launch", timeout=5, json={
        "task_type": "acme.add", "params": {"a": 40, "b": 2}}).json()["task_id"]
    assert get_until(f"{api_b}/tasks/{done}", {"SUCCESS"})["result"] == {"sum": 42}

    # Launched on A, revoked on B, never runs.
    later = requests.post(f"{api_a}/tasks/launch", timeout=5, json={
        "task_type": "acme.add", "params": {"a": 1, "b": 1}, "countdown": 3}).json()["task_id"]
    revoked = requests.delete(f"{api_b}/tasks/{later}", timeout=5)
    assert revoked.status_code == 200 and revoked.json()["status"] == "REVOKED"
    marker = requests.post(f"{api_a}/tasks/launch", timeout=5, json={
        "task_type": "acme.add", "params": {"a": 0, "b": 0}, "countdown": 4}).json()["task_id"]
    get_until(f"{api_a}/tasks/{marker}", {"SUCCESS"})
    assert requests.get(f"{api_a}/tasks/{later}", timeout=5).json()["started_at"] is None

    # Failed on A, retried on B, linked everywhere.
    failed = requests.post(f"{api_a}/tasks/launch", timeout=5, json={
        "task_type": "acme.boom", "params": {}}).json()["task_id"]
    get_until(f"{api_b}/tasks/{failed}", {"FAILURE"})
    retried = requests.post(f"{api_b}/tasks/{failed}/retry", timeout=5)
    assert retried.status_code == 202
    assert get_until(f"{api_a}/tasks/{retried.json()['task_id']}", {"FAILURE"})["retry_of"] \
        == failed
    # The history reads the workers' records, which follow the status by a moment.
    wait_for(lambda: [r["status"] for r in requests.get(
        f"{api_a}/history", params={"root_id": failed}, timeout=5).json()["items"]]
        == ["FAILURE", "FAILURE"], timeout=15, message="both records final")
    history_a = requests.get(f"{api_a}/history", params={"root_id": failed}, timeout=5).json()
    history_b = requests.get(f"{api_b}/history", params={"root_id": failed}, timeout=5).json()
    assert history_a["items"] == history_b["items"] and len(history_a["items"]) == 2

    # Both workers are seen from either API, and both take work.
    for api in (api_a, api_b):
        online = requests.get(f"{api}/stats", timeout=10).json()["workers_online"]
        assert {w.name for w in workers} <= set(online)
    burst = [requests.post(f"{api_a if i % 2 else api_b}/tasks/launch", timeout=5, json={
        "task_type": "acme.sleep", "params": {"seconds": 0.3}}).json()["task_id"]
        for i in range(8)]
    finished = [get_until(f"{api_a}/tasks/{task_id}", {"SUCCESS"}) for task_id in burst]
    assert {run["worker"] for run in finished} == {w.name for w in workers}

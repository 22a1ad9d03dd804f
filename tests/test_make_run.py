"""`make run` as a user meets it: the embedded stack over real HTTP, then Ctrl-C.

Runs ``python -m celery_api.devstack`` (what ``make run`` runs) with no broker or
database configured, walks the README quick start with an HTTP client, and checks
that SIGINT stops API, worker, beat and the embedded Redis.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import requests

from celery_api.tasks.sii_client import SANDBOX_COMPANIES
from tests.support import free_port, get_until, start_devstack, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def devstack():
    folder = Path(tempfile.mkdtemp(prefix="ca-run-"))  # short: holds a Unix socket
    port = free_port()
    started = []

    def start(log_name="devstack.log"):
        process, root, log_path = start_devstack(folder, port, log_name)
        started.append(process)
        return process, root, folder, log_path

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)



def test_quick_start_walkthrough_then_ctrl_c_and_restart(devstack):
    process, root, folder, log_path = devstack()
    base = f"{root}/api/celery"
    # The local demo runs without API keys, and its banner says so.
    assert "authentication: OFF (CELERY_API_AUTH=off" in log_path.read_text()
    catalog = requests.get(f"{base}/tasks", timeout=5).json()
    assert "sii.sync_documents" in {t["task_type"] for t in catalog}

    launched = requests.post(f"{base}/tasks/launch", timeout=5, json={
        "task_type": "sii.sync_documents",
        "params": {"company_id": SANDBOX_COMPANIES[0], "months": 3}})
    assert launched.status_code == 202
    task_id = launched.json()["task_id"]
    location = launched.headers["Location"]
    done = get_until(f"{root}{location}", {"SUCCESS"})
    assert done["result"]["compras"]["total"] >= 0 and done["runtime"] > 0

    later = requests.post(f"{base}/tasks/launch", timeout=5, json={
        "task_type": "sii.sync_documents", "params": {"company_id": SANDBOX_COMPANIES[1]},
        "countdown": 600}).json()["task_id"]
    revoked = requests.delete(f"{base}/tasks/{later}", timeout=5)
    assert revoked.status_code == 200 and revoked.json()["status"] == "REVOKED"

    bad = requests.post(f"{base}/tasks/launch", timeout=5, json={
        "task_type": "sii.sync_documents", "params": {"company_id": str(uuid.uuid4())}})
    failed = get_until(f"{base}/tasks/{bad.json()['task_id']}", {"FAILURE"})
    assert "CompanyNotFound" in failed["error"]
    retried = requests.post(f"{base}/tasks/{failed['task_id']}/retry", timeout=5)
    assert retried.status_code == 202
    assert get_until(f"{base}/tasks/{retried.json()['task_id']}", {"FAILURE"})["retry_of"] \
        == failed["task_id"]

    assert requests.get(f"{root}/api/docs/", timeout=5).status_code == 200
    # The webhook worker runs beside the task worker (README, Webhooks).
    wait_for(lambda: any(name.startswith("webhooks@") for name in requests.get(
        f"{base}/stats", timeout=5).json()["worker_stats"]),
        timeout=30, message="the webhook worker to answer")

    # A run held by the worker for its countdown must survive Ctrl-C and a restart.
    held = requests.post(f"{base}/tasks/launch", timeout=5, json={
        "task_type": "sii.sync_f29", "params": {"company_id": SANDBOX_COMPANIES[2]},
        "countdown": 4}).json()["task_id"]
    wait_for(lambda: held in json.dumps(requests.get(f"{base}/stats", timeout=5).json()
                                        ["scheduled_tasks"]),
             timeout=30, message="the worker to hold the countdown run")

    # Ctrl-C: SIGINT to the foreground process group stops everything.
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=60) == 0
    log = log_path.read_text(errors="replace")
    for marker, run_id in (("📤", task_id), ("✅", task_id), ("📊", task_id),
                           ("🚫", later), ("❌", failed["task_id"])):
        assert any(marker in line and run_id in line for line in log.splitlines()), \
            f"no {marker} line for {run_id}"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{base}/tasks", timeout=2)
    assert not (folder / "embedded-redis.sock").exists() or not _redis_answers(folder)
    leftovers = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"processes left running: {leftovers.stdout}"

    process, root, _, _ = devstack("devstack-2.log")
    after = get_until(f"{root}/api/celery/tasks/{held}", {"SUCCESS"}, timeout=60)
    assert after["result"]["f29"]["year"]
    assert get_until(f"{root}/api/celery/tasks/{task_id}", {"SUCCESS"})["result"] == \
        done["result"]
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=60) == 0


def _redis_answers(folder: Path) -> bool:
    import redis

    try:
        return redis.Redis(unix_socket_path=str(folder / "embedded-redis.sock"),
                           socket_timeout=0.5).ping()
    except (redis.RedisError, OSError):
        return False


def test_json_log_format_is_one_object_per_line(capsys):
    import logging

    from celery_api.logging import configure_logging

    try:
        configure_logging("INFO", "json", force=True)
        logging.getLogger("celery_api.test").info("📤 launching %s", "abc")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        record = json.loads(line)
        assert record["message"] == "📤 launching abc" and record["level"] == "INFO"
    finally:
        configure_logging("INFO", "text", force=True)

"""`make run` protects itself: one stack per instance folder, a dead broker's leftovers
cleaned up and a live one never taken over, and every Ctrl-C a clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from celery_api.embedded import BrokerInUse, EmbeddedRedis
from celery_api.tasks.sii_client import SANDBOX_COMPANIES
from tests.support import ROOT, devstack_env, free_port, get_until, start_devstack

pytestmark = pytest.mark.integration
KILLED = ("SIGKILL", "Perhaps out of memory")


def short_folder(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))  # short: holds a Unix socket


def ctrl_c(process) -> int:
    """SIGINT to the foreground process group, as the terminal sends it."""
    os.killpg(process.pid, signal.SIGINT)
    return process.wait(timeout=60)


@pytest.fixture
def stacks():
    started = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_second_make_run_in_the_same_folder_is_refused(stacks):
    folder, port = short_folder("ca-lock-"), free_port()
    first, root, log_path = start_devstack(folder, port, "first.log")
    stacks.append(first)
    # The banner names the docs' final URL, which answers without a redirect.
    assert f"(docs: {root}/api/docs/)" in log_path.read_text()
    assert requests.get(f"{root}/api/docs/", timeout=5, allow_redirects=False) \
        .status_code == 200
    # And the console's, which opens without a key (make run: authentication off).
    assert f"operator console: {root}/console/" in log_path.read_text()
    console = requests.get(f"{root}/console/", timeout=5)
    assert console.status_code == 200 and "Authentication is off" in console.text

    second = subprocess.run([sys.executable, "-m", "celery_api.devstack"], cwd=ROOT,
                            env=devstack_env(folder, free_port()), capture_output=True,
                            text=True, timeout=60)
    assert second.returncode != 0
    assert "already running" in second.stderr
    assert f"pid {first.pid}" in second.stderr and root in second.stderr
    # The first stack never noticed: its broker is the one it started, and it serves.
    assert requests.get(f"{root}/readyz", timeout=5).status_code == 200
    launched = requests.post(f"{root}/api/celery/tasks/launch", timeout=5, json={
        "task_type": "sii.sync_f29", "params": {"company_id": SANDBOX_COMPANIES[0]}})
    get_until(f"{root}{launched.headers['Location']}", {"SUCCESS"})
    assert ctrl_c(first) == 0

    # Stopped, the folder is free again.
    again, root, _ = start_devstack(folder, port, "again.log")
    stacks.append(again)
    assert requests.get(f"{root}/readyz", timeout=5).status_code == 200
    assert ctrl_c(again) == 0


def test_a_dead_brokers_leftovers_are_cleaned_and_a_live_one_is_kept():
    folder = short_folder("ca-left-")
    # What a killed server leaves: a socket file nobody listens on, and its pid file.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(folder / "embedded-redis.sock"))
    stale.close()
    (folder / "embedded-redis.pid").write_text("999999\n")
    server = EmbeddedRedis(folder, persistent=False).start()
    try:
        assert server._ping()
        assert int((folder / "embedded-redis.pid").read_text()) == server.process.pid
        # A second start in the folder finds it answering: refused, never shut down.
        with pytest.raises(BrokerInUse, match=f"pid {server.process.pid}"):
            EmbeddedRedis(folder, persistent=False).start()
        assert server._ping()
    finally:
        server.stop()
    assert not (folder / "embedded-redis.pid").exists()


def test_every_ctrl_c_stops_cleanly(stacks):
    """Ctrl-C while clients hold connections (idle, kept alive, a request in flight):
    five stops, each ending with status 0 and no process killed. The stop times are
    measured in docs/RELIABILITY.md, not asserted."""
    folder, port = short_folder("ca-stop-"), free_port()
    for cycle in range(5):
        process, root, log_path = start_devstack(folder, port, f"cycle-{cycle}.log")
        stacks.append(process)
        launched = requests.post(f"{root}/api/celery/tasks/launch", timeout=5, json={
            "task_type": "sii.sync_documents", "params": {"company_id": SANDBOX_COMPANIES[0]}})
        get_until(f"{root}{launched.headers['Location']}", {"SUCCESS"})
        idle = socket.create_connection(("127.0.0.1", port))
        session = requests.Session()
        session.get(f"{root}/api/celery/tasks", timeout=5)
        in_flight = threading.Thread(
            target=_quietly, args=(requests.get, f"{root}/api/celery/stats"),
            kwargs={"timeout": 30}, daemon=True)
        in_flight.start()
        time.sleep(0.05 * cycle)
        try:
            assert ctrl_c(process) == 0, log_path.read_text(errors="replace")[-3000:]
        finally:
            idle.close()
            session.close()
        log = log_path.read_text(errors="replace")
        killed = [line for line in log.splitlines() if any(k in line for k in KILLED)]
        assert not killed, f"cycle {cycle}: {killed}"
        leftovers = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True,
                                   text=True)
        assert leftovers.stdout.strip() == "", f"processes left running: {leftovers.stdout}"


def _quietly(call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except requests.RequestException:
        pass  # the server stopped under it: expected

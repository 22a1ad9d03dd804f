"""deploy/nginx.conf in front of gunicorn (gunicorn.conf.py), under the /tasks-api/ prefix."""

from __future__ import annotations

import json
import re
import threading

import pytest
import requests

from celery_api.tasks.sii_client import SANDBOX_COMPANIES
from tests.support import (
    LiveServer,
    Nginx,
    build_app,
    make_config,
    service_env,
)


@pytest.fixture(scope="module")
def behind_nginx(tmp_path_factory, redis_server):
    folder = tmp_path_factory.mktemp("nginx")
    config = make_config(folder / "app", redis_server.url.replace("/0", "/5"))
    build_app(config)  # migrates the database gunicorn will use
    api = LiveServer(service_env(config), folder / "gunicorn.log",
                     CELERY_API_TRUSTED_PROXIES="1", WEB_CONCURRENCY="2").start()
    nginx = Nginx(folder, api.port).start()
    yield nginx.base
    nginx.stop()
    api.stop()


def test_api_is_served_under_the_prefix(behind_nginx):
    base = f"{behind_nginx}/tasks-api"
    catalog = requests.get(f"{base}/api/celery/tasks", timeout=5)
    assert catalog.status_code == 200 and catalog.json()
    launched = requests.post(f"{base}/api/celery/tasks/launch", timeout=5, json={
        "task_type": "sii.sync_documents", "params": {"company_id": SANDBOX_COMPANIES[0]}})
    assert launched.status_code == 202
    task_id = launched.json()["task_id"]
    assert launched.headers["Location"] == f"/tasks-api/api/celery/tasks/{task_id}"
    assert launched.json()["status_url"] == launched.headers["Location"]
    followed = requests.get(f"{behind_nginx}{launched.headers['Location']}", timeout=5)
    assert followed.status_code == 200 and followed.json()["task_id"] == task_id


def test_openapi_servers_and_docs_use_the_public_prefix(behind_nginx):
    base = f"{behind_nginx}/tasks-api"
    spec = requests.get(f"{base}/api/openapi.json", timeout=5).json()
    assert spec["servers"][0]["url"] == "/tasks-api"
    page = requests.get(f"{base}/api/docs/", timeout=5)
    assert page.status_code == 200
    assert '"/tasks-api/api/openapi.json"' in page.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(a.startswith("/tasks-api/api/docs/") for a in assets)
    for asset in assets:
        assert requests.get(f"{behind_nginx}{asset}", timeout=5).status_code == 200


def test_errors_and_request_ids_pass_through(behind_nginx):
    base = f"{behind_nginx}/tasks-api"
    unknown = "00000000-0000-4000-8000-000000000000"
    missing = requests.get(f"{base}/api/celery/tasks/{unknown}", timeout=5,
                           headers={"X-Request-ID": "via-nginx-1"})
    assert missing.status_code == 404
    assert missing.headers["Content-Type"] == "application/problem+json"
    assert missing.json()["instance"] == f"/tasks-api/api/celery/tasks/{unknown}"
    assert missing.headers["X-Request-ID"] == "via-nginx-1"
    made = requests.get(f"{base}/healthz", timeout=5)
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["X-Request-ID"])  # nginx's $request_id
    assert requests.get(f"{behind_nginx}/tasks-api", timeout=5,
                        allow_redirects=False).status_code == 308


def test_waits_and_event_streams_pass_through(behind_nginx):
    """GET ?wait=N and the event stream through deploy/nginx.conf: the stream's events
    reach the client while it is open (no buffering), and both end on a revoke."""
    base = f"{behind_nginx}/tasks-api/api/celery/tasks"

    def launch() -> str:  # no worker here: the run stays queued until revoked
        launched = requests.post(f"{base}/launch", timeout=5, json={
            "task_type": "sii.sync_documents", "params": {"company_id": SANDBOX_COMPANIES[0]}})
        assert launched.status_code == 202
        return launched.json()["task_id"]

    task_id = launch()
    timed_out = requests.get(f"{base}/{task_id}", params={"wait": 1}, timeout=10)
    assert timed_out.status_code == 200 and timed_out.json()["status"] == "PENDING"
    with requests.get(f"{base}/{task_id}/events", stream=True, timeout=10) as stream:
        assert stream.status_code == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        lines = stream.iter_lines(chunk_size=1, decode_unicode=True)
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[len("data: "):])["status"] == "PENDING"
        # The first event came through while the stream is still open: now end it.
        assert requests.delete(f"{base}/{task_id}", timeout=5).status_code == 200
        last = [line for line in lines if line.startswith("data: ")][-1]
    assert json.loads(last[len("data: "):])["status"] == "REVOKED"
    # A waiter answered when the run ends, through nginx.
    task_id = launch()
    answer: dict = {}

    def wait():
        answer["response"] = requests.get(f"{base}/{task_id}", params={"wait": 30}, timeout=40)

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert requests.delete(f"{base}/{task_id}", timeout=5).status_code == 200
    waiter.join(40)
    assert answer["response"].status_code == 200
    assert answer["response"].json()["status"] == "REVOKED"


def test_console_is_served_under_the_prefix(behind_nginx):
    """The console's links, assets, cookie path and forms follow the public prefix."""
    base = f"{behind_nginx}/tasks-api"
    session = requests.Session()
    page = session.get(f"{base}/console/", timeout=5)  # authentication off: opens
    assert page.status_code == 200 and page.url == f"{base}/console/runs"
    assert "Content-Security-Policy" in page.headers
    (cookie,) = session.cookies
    assert cookie.path == "/tasks-api/console/"
    links = re.findall(r'(?:src|href|action)="(/[^"]*)"', page.text)
    assert links and all(link.startswith("/tasks-api/console/") for link in links), links
    for asset in re.findall(r'(?:src|href)="(/[^"]*/static/[^"]+)"', page.text):
        assert session.get(f"{behind_nginx}{asset}", timeout=5).status_code == 200
    form = session.get(f"{base}/console/launch/sii.sync_documents", timeout=5)
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    launched = session.post(
        f"{base}/console/launch/sii.sync_documents", allow_redirects=False, timeout=5,
        data={"csrf_token": token, "p.company_id": SANDBOX_COMPANIES[0]},
        headers={"Origin": behind_nginx})  # as the browser sends it, through nginx
    assert launched.status_code == 302, launched.text
    assert launched.headers["Location"].startswith("/tasks-api/console/runs/")
    run = session.get(f"{behind_nginx}{launched.headers['Location']}", timeout=5)
    assert run.status_code == 200 and "sii.sync_documents" in run.text

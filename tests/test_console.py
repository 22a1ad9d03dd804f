"""The operator console (/console/) in a real headless Chromium (Debian's, driven by
Playwright), against gunicorn with CELERY_API_AUTH=required and a real worker.

One browser for the module; each test opens its own browser context (its own cookies).
The console's own test task (tests/plugins/console_tasks.py) holds its progress until
the test releases it, so a run's page is watched at a known point, not a moment.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from types import SimpleNamespace

import pytest
import redis
import requests
import sqlalchemy as sa
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect

from celery_api.extensions import db
from celery_api.models import (
    ConsoleSession,
    TaskRun,
    WebhookDelivery,
    WebhookSubscription,
    utcnow,
)
from celery_api.services import keys, webhooks
from tests.support import (
    COMPANY,
    LiveServer,
    WebhookReceiver,
    Worker,
    build_app,
    close_app,
    create_key,
    database_url,
    make_config,
    optional_component,
    service_env,
    wait_for,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000
expect.set_options(timeout=TIMEOUT_MS)  # a deadline to wait within, not a measurement


@pytest.fixture(scope="module")
def console(tmp_path_factory, redis_server):
    """gunicorn (authentication required) and a worker on a private Redis database."""
    folder = tmp_path_factory.mktemp("console")
    broker = redis_server.url.replace("/0", "/11")
    config = make_config(folder, broker, AUTH="required",
                         TASK_MODULES=["acme_tasks", "console_tasks"])
    app = build_app(config)
    ops = create_key(app, "ops", "read", "launch", "control", "admin")
    viewer = create_key(app, "viewer", "read")
    receiver = WebhookReceiver()  # the webhooks page's subscriptions are sent here
    env = dict(service_env(config), CELERY_API_AUTH="required",
               CELERY_API_TASK_MODULES="acme_tasks,console_tasks",
               CELERY_API_INSPECT_TIMEOUT="2", CELERY_API_STATS_CACHE_SECONDS="0",
               CELERY_API_WEBHOOK_ALLOWED_HOSTS=receiver.host,
               CELERY_API_WEBHOOK_RETRY_SCHEDULE="0.2")
    server = LiveServer(env, folder / "gunicorn.log", WEB_CONCURRENCY="2").start()
    name = f"console-{uuid.uuid4().hex[:6]}@{os.uname().nodename}"
    worker = Worker(env, name, folder / "worker.log", queues="celery,webhooks").start(
        app.extensions["celery"])
    yield SimpleNamespace(app=app, url=server.url, ops=ops, viewer=viewer, worker=worker,
                          redis=redis.Redis.from_url(broker), receiver=receiver)
    worker.stop()
    server.stop()
    receiver.stop()


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        optional_component("chromium", "no /usr/bin/chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # launch() gives each browser a fresh, temporary --user-data-dir.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    tab.on("dialog", lambda dialog: dialog.accept())  # confirmations: yes
    yield tab
    context.close()


def sign_in(page, console, key: str) -> None:
    page.goto(f"{console.url}/console/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/console/(runs|launch)"))


def api(console, method: str, path: str, key: str | None = None, **kwargs):
    headers = {"Authorization": f"Bearer {key or console.ops}"}
    return requests.request(method, f"{console.url}/api/celery{path}", headers=headers,
                            timeout=10, **kwargs)


def csrf_token(page) -> str:
    return page.locator("input[name=csrf_token]").first.get_attribute("value")


def post_from_page(page, path: str, form: dict) -> int:
    """POST a form from the page's own origin with fetch (as a forged form would)."""
    return page.evaluate("""async ([path, form]) => {
        const body = new URLSearchParams(form);
        const response = await fetch(path, {method: "POST", body, redirect: "manual",
                                            credentials: "same-origin"});
        return response.status;
    }""", [path, form])


# Signing in.

def test_sign_in_with_a_key_and_a_wrong_key_refused(page, console):
    page.goto(f"{console.url}/console/runs")
    assert "/console/sign-in" in page.url  # not signed in: sent to the sign-in page
    page.get_by_label("API key").fill("cak_000000000000_" + "0" * 64)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("The API key is not valid.").wait_for()
    assert "/console/sign-in" in page.url
    page.get_by_label("API key").fill(console.ops)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/console/runs$"))  # back where it was going
    assert page.get_by_text("Signed in as").inner_text().startswith("Signed in as ops")
    (cookie,) = page.context.cookies()
    assert cookie["name"] == "celery_api_console" and cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict" and cookie["path"] == "/console/"
    assert not cookie["secure"]  # plain http here; https requests get Secure
    assert console.ops.split("_")[2] not in cookie["value"]  # an id, not the key
    with console.app.app_context():  # the database keeps a hash of it, never the id
        assert db.session.execute(db.select(ConsoleSession.id_hash)).scalars().all()
        assert not db.session.execute(db.select(ConsoleSession).where(
            ConsoleSession.id_hash == cookie["value"])).first()

    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r"/console/sign-in"))
    old = requests.get(f"{console.url}/console/runs", cookies={cookie["name"]: cookie["value"]},
                       allow_redirects=False, timeout=10)
    assert old.status_code == 302 and "/console/sign-in" in old.headers["Location"]


def test_a_read_only_key_sees_no_actions_and_a_forged_post_is_refused(page, console):
    launched = api(console, "POST", "/tasks/launch", json={
        "task_type": "acme.add", "params": {"a": 1, "b": 2}, "countdown": 600})
    task_id = launched.json()["task_id"]
    sign_in(page, console, console.viewer)
    assert page.get_by_role("link", name="Launch").count() == 0
    page.goto(f"{console.url}/console/runs/{task_id}")
    page.get_by_text("PENDING").first.wait_for()
    assert page.get_by_role("button", name="Revoke").count() == 0
    assert page.get_by_role("button", name="Retry").count() == 0
    # A valid session and CSRF token, but not the scope: refused, nothing revoked.
    status = post_from_page(page, f"/console/runs/{task_id}/revoke",
                            {"csrf_token": csrf_token(page)})
    assert status == 403
    assert api(console, "GET", f"/tasks/{task_id}").json()["status"] == "PENDING"
    page.goto(f"{console.url}/console/launch/acme.add")
    assert page.get_by_role("heading", name="403: Not allowed").is_visible()
    api(console, "DELETE", f"/tasks/{task_id}")


def test_a_post_without_the_csrf_token_or_from_another_origin_is_refused(page, console):
    sign_in(page, console, console.ops)
    page.goto(f"{console.url}/console/launch/acme.add")
    form = {"p.a": "1", "p.b": "2"}
    assert post_from_page(page, "/console/launch/acme.add", form) == 403
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    token = csrf_token(page)
    # Another site's form carries the browser's cookie and its own Origin (the cookie's
    # SameSite=Strict already keeps it home; the Origin check holds on its own).
    forged = requests.post(f"{console.url}/console/launch/acme.add", cookies=cookies,
                           data={**form, "csrf_token": token},
                           headers={"Origin": "https://evil.example"},
                           allow_redirects=False, timeout=10)
    assert forged.status_code == 403
    # The same request from this origin launches.
    sent = requests.post(f"{console.url}/console/launch/acme.add", cookies=cookies,
                         data={**form, "csrf_token": token},
                         headers={"Origin": console.url}, allow_redirects=False, timeout=10)
    assert sent.status_code == 302 and "/console/runs/" in sent.headers["Location"]


def test_revoking_a_key_ends_its_console_sessions(page, console):
    key = create_key(console.app, f"short-{uuid.uuid4().hex[:6]}", "read")
    sign_in(page, console, key)
    with console.app.app_context():
        keys.revoke(page.get_by_text("Signed in as").locator("strong").inner_text())
    page.goto(f"{console.url}/console/runs")
    assert "/console/sign-in" in page.url


# Launching, watching, revoking.

def test_launch_form_shows_a_422_next_to_its_field_then_watches_progress_to_success(
        page, console):
    sign_in(page, console, console.ops)
    page.goto(f"{console.url}/console/launch")
    page.get_by_role("link", name="console.wait").click()  # the test module's own form
    # Generated from the JSON Schema: required, default, enum, boolean.
    key_field = page.get_by_label("Key")
    assert key_field.get_attribute("required") is not None
    assert page.get_by_label("Steps").input_value() == "2"
    assert page.get_by_label("Steps").get_attribute("min") == "2"
    assert page.get_by_label("Mode").locator("option").all_inner_texts() == [
        "—", "fast", "careful"]
    assert page.get_by_label("Loud").get_attribute("type") == "checkbox"

    # The browser would refuse 1 (min 2); a client that skips its checks gets the
    # server's 422, shown next to the field.
    page.eval_on_selector("#launch-form", "form => form.noValidate = true")
    release = uuid.uuid4().hex
    key_field.fill(release)
    page.get_by_label("Steps").fill("1")
    page.get_by_role("button", name="Launch").click()
    error = page.locator("#field-p-steps-error")
    error.wait_for()
    assert "greater than or equal to 2" in error.inner_text()
    assert page.get_by_label("Steps").get_attribute("aria-invalid") == "true"
    assert page.get_by_label("Key").input_value() == release  # what was typed is kept

    page.get_by_label("Steps").fill("4")
    polls, streams = [], []
    page.on("request", lambda request: (
        polls if request.url.endswith("/state.json") else
        streams if request.url.endswith("/events") else []).append(request.url))
    page.get_by_role("button", name="Launch").click()
    page.wait_for_url(re.compile(r"/console/runs/[0-9a-f-]{36}\?notice=launched"))
    page.get_by_text("waiting for release").wait_for()  # the progress meta, live
    expect(page.locator("html")).to_have_attribute("data-live", "stream")
    assert page.locator("#run-progress-bar").get_attribute("value") == "1"
    assert page.locator("#run-progress-bar").get_attribute("max") == "4"
    assert page.locator("#run-status").inner_text() == "PROGRESS"
    console.redis.set(f"console:release:{release}", 1)
    page.locator("#run-status .status-success").wait_for()  # the stream, then a reload
    assert polls == []  # followed by the server's event stream, never polled
    assert len(streams) >= 1 and all("/console/runs/" in url for url in streams)
    result = page.locator("#run-result").inner_text()
    assert f'"released": "{release}"' in result and '"steps": 4' in result
    assert page.locator("#run-worker").inner_text().startswith("console-")


def test_a_run_page_polls_when_its_event_stream_is_refused(page, console):
    launched = api(console, "POST", "/tasks/launch", json={
        "task_type": "acme.add", "params": {"a": 1, "b": 2}, "countdown": 600})
    task_id = launched.json()["task_id"]
    sign_in(page, console, console.viewer)
    # A proxy (or a full waiting hub) that refuses the stream: the page falls back to
    # polling, and still sees its run end.
    page.route(re.compile(r".*/events$"), lambda route: route.fulfill(
        status=503, content_type="application/json", body='{"status": 503}'))
    polls = []
    page.on("request", lambda request: polls.append(request.url)
            if request.url.endswith("/state.json") else None)
    page.goto(f"{console.url}/console/runs/{task_id}")
    expect(page.locator("html")).to_have_attribute("data-live", "polling")
    api(console, "DELETE", f"/tasks/{task_id}")  # revoked while the page polls
    expect(page.locator("#run-status")).to_have_text("REVOKED")
    assert polls and all(f"/console/runs/{task_id}/state.json" in url for url in polls)


def test_revoking_a_queued_run(page, console):
    sign_in(page, console, console.ops)
    page.goto(f"{console.url}/console/launch/acme.add")
    page.locator("#field-p-a").fill("2")
    page.locator("#field-p-b").fill("3")
    page.locator("summary", has_text="Launch options").click()
    page.get_by_label("Countdown (seconds)").fill("600")
    page.get_by_label("Tags").fill("console-revoke")
    page.get_by_role("button", name="Launch").click()
    page.wait_for_url(re.compile(r"/console/runs/[0-9a-f-]{36}"))
    task_id = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)
    assert page.locator("#run-status").inner_text() == "PENDING"

    # The revoke's answer is held while the page could still follow its run: a page
    # that follows on (its event stream, or a poll) sees its run finished (the revoke
    # is done on the server) and reloads itself, replacing the form's navigation, and
    # the revoke's notice is lost (seen under load). The hold lasts until such a poll
    # is seen, or for 2 s (the stream would have told the page the run was revoked in
    # that window; the page must have closed it).
    held, polls = [], []
    page.route(re.compile(r".*/revoke$"), lambda route: held.append(route))
    page.get_by_role("button", name="Revoke").click(no_wait_after=True)  # dialog: yes
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while not held:  # Playwright delivers the route while it waits
        assert time.monotonic() < deadline, "the revoke form was never sent"
        page.wait_for_timeout(20)
    page.on("request", lambda request: polls.append(request.url)
            if request.url.endswith("/state.json") else None)
    answer = held[0].fetch(max_redirects=0)
    window = time.monotonic() + 2.0
    while not polls and time.monotonic() < window:
        page.wait_for_timeout(50)
    with contextlib.suppress(PlaywrightError):  # the page may have gone elsewhere
        held[0].fulfill(response=answer)
    page.get_by_text("Revoked: it will not run.").wait_for()
    assert page.locator("#run-status").inner_text() == "REVOKED"
    body = api(console, "GET", f"/tasks/{task_id}").json()
    assert body["status"] == "REVOKED" and body["revoked_by"] == "ops"
    assert body["tags"] == ["console-revoke"]
    page.get_by_role("button", name="Retry").click()
    page.get_by_text("Retry launched: this is the new run.").wait_for()
    assert page.get_by_text("retried as").count() == 0
    page.get_by_role("link", name=task_id[:8]).first.wait_for()  # its lineage names it
    api(console, "DELETE", f"/tasks/{re.search(r'/runs/([0-9a-f-]{36})', page.url).group(1)}")


# Webhooks.

def test_a_webhook_subscription_is_created_pinged_rotated_and_deleted(page, console):
    where = f"/hook-{uuid.uuid4().hex[:10]}"
    url = console.receiver.plan(where, [500, 500])  # the ping and its one retry fail
    sign_in(page, console, console.ops)
    page.get_by_role("link", name="Webhooks").click()
    page.get_by_label("URL").fill(url)
    page.get_by_label("task.failed").check()
    page.get_by_role("button", name="Create subscription").click()
    page.get_by_text("Copy this secret now: it is shown this once.").wait_for()
    secret = page.locator("#webhook-secret").inner_text()
    assert secret.startswith("whsec_")
    page.get_by_role("link", name="Its deliveries").click()
    with page.expect_navigation():  # the form posts, then is sent back to this page
        page.get_by_role("button", name="Ping").click()
    wait_for(lambda: len(console.receiver.at(where)) == 2, timeout=30,
             message="the ping and its retry at the receiver")
    assert console.receiver.at(where)[0]["payload"]["type"] == "ping"
    rows = page.locator("tbody tr")

    def listed(status: str, count: int):  # the page as the operator reloads it
        def check():
            page.reload()
            return rows.filter(has_text=status).count() == count
        return check
    wait_for(listed("failed", 2), timeout=30, message="both attempts listed as failed")
    first, second = rows.nth(1).inner_text(), rows.nth(0).inner_text()  # newest first
    assert "500" in first and "500" in second
    assert rows.nth(1).locator("time").count() == 2  # a next retry, and its creation
    with page.expect_navigation():  # a reload before its redirect lands races the post
        page.get_by_role("button", name="Re-send").first.click()
    wait_for(listed("succeeded", 1), timeout=30, message="the re-sent ping delivered")
    assert "200" in rows.filter(has_text="succeeded").inner_text()
    assert len(console.receiver.at(where)) == 3

    page.get_by_role("link", name="All webhooks").click()
    page.get_by_role("button", name=f"Disable {url}").click()
    page.get_by_role("button", name=f"Enable {url}").wait_for()
    assert page.locator("tbody tr", has_text=url).get_by_text("disabled").count() == 1
    page.get_by_role("button", name=f"Rotate secret {url}").click()  # dialog: yes
    page.get_by_text("Secret rotated").wait_for()
    rotated = page.locator("#webhook-secret").inner_text()
    assert rotated.startswith("whsec_") and rotated != secret
    page.get_by_role("link", name="All webhooks").click()
    page.get_by_role("button", name=f"Delete {url}").click()  # dialog: yes
    page.get_by_text("No subscriptions yet").wait_for()
    assert api(console, "GET", "/webhooks").json()["total"] == 0


# The history and the workers.

def test_filtering_the_history(page, console):
    tag = f"filter-{uuid.uuid4().hex[:6]}"
    ids = [api(console, "POST", "/tasks/launch", json={
        "task_type": task_type, "params": params, "tags": [tag]}).json()["task_id"]
        for task_type, params in (("acme.add", {"a": 1, "b": 1}),
                                  ("sii.sync_f29", {"company_id": COMPANY}))]
    sign_in(page, console, console.ops)
    page.get_by_label("Tag").fill(tag)
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(rf"tag={tag}"))
    rows = page.locator("#run-rows tr")
    expect(rows).to_have_count(2)
    page.get_by_label("Task type").select_option("acme.add")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"task_type=acme.add"))
    expect(rows).to_have_count(1)
    expect(rows.first.locator("a.mono")).to_have_text(ids[0][:8])
    # The live refresh asks for the same filters.
    assert f"tag={tag}" in page.locator("#run-rows").get_attribute("data-live-url")
    page.locator("#run-rows[data-refreshed]").wait_for()
    expect(rows).to_have_count(1)
    page.get_by_label("Status").select_option("FAILURE")
    page.get_by_role("button", name="Filter").click()
    page.get_by_text("No run matches these filters.").wait_for()
    page.get_by_label("Company").fill("not-a-uuid")
    page.get_by_role("button", name="Filter").click()
    page.get_by_text("company_id: a UUID").wait_for()


def test_the_workers_page_lists_the_worker_and_refreshes_itself(page, console):
    sign_in(page, console, console.ops)
    page.get_by_role("link", name="Workers & queues").click()
    # A snapshot in which the worker did not answer in time says so, and the next
    # refresh shows it again: wait for the page to show it, never count at an instant.
    expect(page.get_by_role("heading", name=re.compile(r"^console-"))).to_have_count(1)
    page.get_by_role("heading", name="Workers online (1)").wait_for()
    expect(page.locator("table.compact td", has_text="celery")).to_have_count(1)
    page.locator("#workers[data-refreshed]").wait_for()  # fetched again, not reloaded
    assert page.get_by_text("Snapshot taken").is_visible()


def test_a_phone_width_keeps_the_pages_usable(browser, console):
    context = browser.new_context(viewport={"width": 375, "height": 740})
    try:
        page = context.new_page()
        sign_in(page, console, console.ops)
        for path in ("runs", "launch/sii.sync_documents", "workers", "batches"):
            page.goto(f"{console.url}/console/{path}")
            # No sideways scrolling of the page (wide tables scroll in their own box).
            assert page.evaluate("document.documentElement.scrollWidth") <= 375, path
    finally:
        context.close()


# Without a browser: authentication off, the edge's policy.

def test_with_authentication_off_the_console_opens_and_says_so(client):
    page = client.get("/console/runs")
    assert page.status_code == 200
    assert "Authentication is off" in page.get_data(as_text=True)
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "form-action 'self'" in policy
    assert "unsafe-inline" not in policy and "<script>" not in page.get_data(as_text=True)
    cookie = page.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console/" in cookie
    # Still a CSRF token on every form, even with nobody to sign in.
    refused = client.post("/console/launch/acme.add", data={"p.a": "1", "p.b": "1"})
    assert refused.status_code == 403
    # Forms are for the console's pages only: the API still takes JSON alone.
    api_form = client.post("/api/celery/tasks/launch", data={"task_type": "acme.add"})
    assert api_form.status_code == 415
    # An https request (as a trusted proxy reports it) gets a Secure cookie.
    other = client.application.test_client()
    secure = other.get("/console/runs", base_url="https://localhost")
    assert "Secure" in secure.headers["Set-Cookie"]


def test_bad_input_to_the_console_is_answered_never_a_500(client):
    """Filters, cursors, dates and form values a browser would never send."""
    for query in ("tag=%00x", "task_type=a%00b", "cursor=bm90LWEtY3Vyc29y",
                  "cursor=%00", "created_after=9999-12-31T23:59:59&tz_offset=99999999",
                  "created_before=0001-01-01T00:00", "created_after=yesterday",
                  "company_id=nope", "status=NOPE", "limit=-5", "batch_id=" + "x" * 500):
        page = client.get(f"/console/runs?{query}")
        assert page.status_code == 200, query
        assert 'class="error"' in page.get_data(as_text=True) or "limit" in query, query
    token = re.search(r'name="csrf_token" value="([^"]+)"',
                      client.get("/console/launch/acme.add").get_data(as_text=True)).group(1)
    for form in ({"p.a": "1\x00", "p.b": "2"}, {"p.a": "1", "p.b": "x"},
                 {"p.a": "1", "p.b": "2", "o.priority": "²"},
                 {"p.a": "1", "p.b": "2", "o.eta": "9999-12-31T23:59:59", "tz_offset": "600"},
                 {"p.a": "1", "p.b": "2", "o.countdown": "5", "o.eta": "2030-01-01T00:00"},
                 {"p.a": "1", "p.b": "2", "o.tags": "ok, " + "t" * 100},
                 {"p.a": "1", "p.b": "2", "o.cache_ttl": "1.5"},
                 {"p.a": "1", "p.b": "2", "o.webhook_url": "not a url\x00"}):
        answer = client.post("/console/launch/acme.add", data={**form, "csrf_token": token})
        assert answer.status_code == 422, (form, answer.status_code)
    for form in ({"url": "http://x/\x00", "event_types": "task.failed"},
                 {"url": "https://example.com/h", "event_types": "no.such"},
                 {"url": "https://example.com/h", "event_types": "task.failed",
                  "task_type": "t" * 300, "description": "d" * 600},
                 {"url": "https://example.com/h", "event_types": "task.failed",
                  "description": "nul\x00"}):
        answer = client.post("/console/webhooks", data={**form, "csrf_token": token})
        assert answer.status_code == 422, (form, answer.status_code)
    for path in ("/console/runs/not-a-uuid", "/console/batches/%00", "/console/launch/nope",
                 "/console/runs/not-a-uuid/events", "/console/webhooks/nope",
                 f"/console/webhooks/{uuid.uuid4()}", f"/console/runs/{uuid.uuid4()}/events"):
        assert client.get(path).status_code in (404, 422), path
    for path in (f"/console/webhooks/{uuid.uuid4()}/ping", "/console/webhooks/nope/delete",
                 f"/console/webhooks/{uuid.uuid4()}/deliveries/x/resend",
                 f"/console/webhooks/{uuid.uuid4()}/deliveries/99999999999999999999/resend",
                 f"/console/runs/{uuid.uuid4()}/webhook-deliveries/1/resend"):
        assert client.post(path, data={"csrf_token": token}).status_code in (404, 422), path


# Without a browser, on SQLite and on PostgreSQL: the session's life and the actions.

@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def keyed_app(request, tmp_path_factory, redis_server):
    folder = tmp_path_factory.mktemp(f"console-{request.param}")
    app = build_app(make_config(folder, redis_server.url.replace("/0", "/13"),
                                database_url(request, request.param), AUTH="required"))
    yield app
    close_app(app)


def _token(response) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"',
                     response.get_data(as_text=True)).group(1)


def test_a_session_signs_in_acts_within_its_scopes_and_ends(keyed_app):
    client = keyed_app.test_client()
    name = f"ops-{uuid.uuid4().hex[:6]}"
    key = create_key(keyed_app, name, "read", "launch", "control")
    assert client.get("/console/runs").status_code == 302  # no session: sign in first
    wrong = key[:-1] + ("0" if key[-1] != "0" else "1")  # well formed, wrong secret
    refused = client.post("/console/sign-in", data={"key": wrong})
    assert refused.status_code == 401 and "not valid" in refused.get_data(as_text=True)
    signed_in = client.post("/console/sign-in", data={"key": key, "next": "/console/batches"})
    assert signed_in.status_code == 302 and signed_in.headers["Location"] == "/console/batches"
    page = client.get("/console/launch/acme.add")
    assert page.status_code == 200 and f"Signed in as <strong>{name}" in page.get_data(
        as_text=True)
    launched = client.post("/console/launch/acme.add", data={
        "csrf_token": _token(page), "p.a": "4", "p.b": "5", "o.countdown": "900",
        "o.tags": "console, held"})
    assert launched.status_code == 302
    task_id = re.search(r"/runs/([0-9a-f-]{36})", launched.headers["Location"]).group(1)
    run = client.get(f"/console/runs/{task_id}")
    text = run.get_data(as_text=True)
    assert run.status_code == 200 and "Revoke" in text and "PENDING" in text
    assert client.get(f"/console/runs/{task_id}/state.json").get_json()["status"] == "PENDING"
    revoked = client.post(f"/console/runs/{task_id}/revoke", data={"csrf_token": _token(run)})
    assert revoked.status_code == 302
    with keyed_app.app_context():
        record = db.session.get(TaskRun, task_id)
        assert (record.status, record.launched_by, record.revoked_by) == (
            "REVOKED", name, name)
        assert sorted(record.tags) == ["console", "held"]
        db.session.remove()
    # Its page's event stream: the final state at once (the run has ended), then, to a
    # browser reconnecting with that event's id, 204 (stop reconnecting).
    events = client.get(f"/console/runs/{task_id}/events")
    assert events.status_code == 200 and events.mimetype == "text/event-stream"
    body = events.get_data(as_text=True)
    assert "event: status" in body and '"status":"REVOKED"' in body
    last = re.search(r"^id: (\S+)$", body, re.M).group(1)
    assert client.get(f"/console/runs/{task_id}/events",
                      headers={"Last-Event-ID": last}).status_code == 204
    assert client.get("/console/schedules").status_code == 403  # no admin scope
    run = client.get(f"/console/runs/{task_id}")
    assert client.post("/console/sign-out", data={"csrf_token": _token(run)}).status_code == 302
    assert client.get("/console/runs").status_code == 302
    assert client.get(f"/console/runs/{task_id}/events").status_code == 401
    with keyed_app.app_context():
        assert not db.session.execute(db.select(ConsoleSession)).scalars().all()
        db.session.remove()


def test_an_expired_session_is_refused(keyed_app):
    client = keyed_app.test_client()
    key = create_key(keyed_app, f"old-{uuid.uuid4().hex[:6]}", "read")
    client.post("/console/sign-in", data={"key": key})
    assert client.get("/console/runs").status_code == 200
    with keyed_app.app_context():
        db.session.execute(db.update(ConsoleSession).values(expires_at=utcnow()))
        db.session.commit()
        db.session.remove()
    assert client.get("/console/runs").status_code == 302


def test_schedules_pause_resume_and_run_now_with_the_admin_scope(keyed_app):
    from celery_api.services import schedules

    with keyed_app.app_context():
        schedule = schedules.create({"name": f"hourly-{uuid.uuid4().hex[:6]}",
                                     "task_type": "acme.add", "params": {"a": 1, "b": 2},
                                     "interval_seconds": 3600})
        schedule_id, name = schedule.id, schedule.name
        db.session.remove()
    client = keyed_app.test_client()
    key = create_key(keyed_app, f"admin-{uuid.uuid4().hex[:6]}", "read", "admin")
    client.post("/console/sign-in", data={"key": key})
    page = client.get("/console/schedules")
    assert page.status_code == 200 and name in page.get_data(as_text=True)
    token = _token(page)

    def enabled() -> bool:
        with keyed_app.app_context():
            try:
                return schedules.get(schedule_id).enabled
            finally:
                db.session.remove()

    assert client.post(f"/console/schedules/{schedule_id}/pause",
                       data={"csrf_token": token}).status_code == 302
    assert not enabled() and "Resume" in client.get("/console/schedules").get_data(as_text=True)
    client.post(f"/console/schedules/{schedule_id}/resume", data={"csrf_token": token})
    assert enabled()
    ran = client.post(f"/console/schedules/{schedule_id}/run", data={"csrf_token": token})
    assert ran.status_code == 302
    task_id = re.search(r"/runs/([0-9a-f-]{36})", ran.headers["Location"]).group(1)
    run = client.get(f"/console/runs/{task_id}").get_data(as_text=True)
    assert name in run  # its lineage names the schedule
    # Pausing is an admin action: a key without the scope is refused.
    other = keyed_app.test_client()
    other.post("/console/sign-in", data={
        "key": create_key(keyed_app, f"reader-{uuid.uuid4().hex[:6]}", "read")})
    token = _token(other.get("/console/runs"))
    assert other.post(f"/console/schedules/{schedule_id}/pause",
                      data={"csrf_token": token}).status_code == 403
    assert enabled()


def test_a_batch_shows_its_progress_and_its_queued_runs_are_revoked(keyed_app):
    from celery_api.services import batches
    from celery_api.services.launch import LaunchOptions

    with keyed_app.app_context():
        batch_id, _runs = batches.launch_batch([
            batches.BatchItem("acme.add", {"a": n, "b": 1}, LaunchOptions(countdown=900))
            for n in range(3)])
        db.session.remove()
    client = keyed_app.test_client()
    client.post("/console/sign-in", data={
        "key": create_key(keyed_app, f"ctl-{uuid.uuid4().hex[:6]}", "read", "control")})
    listing = client.get("/console/batches").get_data(as_text=True)
    assert batch_id in listing
    page = client.get(f"/console/batches/{batch_id}")
    text = page.get_data(as_text=True)
    assert "3 runs" in text and "seg status-pending w100" in text
    revoked = client.post(f"/console/batches/{batch_id}/revoke",
                          data={"csrf_token": _token(page)})
    assert revoked.status_code == 302
    text = client.get(f"/console/batches/{batch_id}").get_data(as_text=True)
    assert "seg status-revoked w100" in text and "finished" in text
    again = client.post(f"/console/batches/{batch_id}/revoke",
                        data={"csrf_token": _token(page)})
    assert again.status_code == 409 and "still queued" in again.get_data(as_text=True)


def _signed_in(app, *scopes):
    client = app.test_client()
    key = create_key(app, f"k-{uuid.uuid4().hex[:6]}", *scopes)
    assert client.post("/console/sign-in", data={"key": key}).status_code == 302
    return client


def test_webhooks_need_the_admin_scope_and_a_bad_url_is_shown_on_the_form(keyed_app):
    admin = _signed_in(keyed_app, "read", "admin")
    form = admin.get("/console/webhooks")
    assert form.status_code == 200 and "No subscriptions yet" in form.get_data(as_text=True)
    # A private address (the SSRF guard) and no event: 422, the form kept, nothing made.
    refused = admin.post("/console/webhooks", data={
        "csrf_token": _token(form), "url": "http://10.1.2.3/hook", "description": "kept"})
    text = refused.get_data(as_text=True)
    assert refused.status_code == 422 and "event_types" in text and 'value="kept"' in text
    refused = admin.post("/console/webhooks", data={
        "csrf_token": _token(form), "url": "http://10.1.2.3/hook",
        "event_types": "task.failed"})
    assert refused.status_code == 422 and "url" in refused.get_data(as_text=True)
    allowed = keyed_app.config["WEBHOOK_ALLOWED_HOSTS"]
    keyed_app.config["WEBHOOK_ALLOWED_HOSTS"] = ["127.0.0.1:9"]
    try:
        created = admin.post("/console/webhooks", data={
            "csrf_token": _token(form), "url": "http://127.0.0.1:9/hook",
            "event_types": ["task.failed", "task.succeeded"], "task_type": "acme.add"})
    finally:
        keyed_app.config["WEBHOOK_ALLOWED_HOSTS"] = allowed
    text = created.get_data(as_text=True)
    assert created.status_code == 200 and "shown this once" in text
    secret = re.search(r'id="webhook-secret">(whsec_[^<]+)<', text).group(1)
    with keyed_app.app_context():
        [hook] = db.session.execute(db.select(WebhookSubscription)).scalars().all()
        assert hook.secret == secret and hook.event_types == ["task.failed", "task.succeeded"]
        hook_id = hook.id
        db.session.remove()
    listing = admin.get("/console/webhooks").get_data(as_text=True)
    assert "http://127.0.0.1:9/hook" in listing and secret not in listing  # never again
    assert admin.post(f"/console/webhooks/{hook_id}/ping",
                      data={"csrf_token": _token(form)}).status_code == 302
    page = admin.get(f"/console/webhooks/{hook_id}").get_data(as_text=True)
    assert "<td>ping" in page and "pending" in page  # sent by the webhook worker
    bad = admin.get(f"/console/webhooks/{hook_id}?cursor=nope")
    assert bad.status_code == 422 and "cursor" in bad.get_data(as_text=True)

    # Without the admin scope: no link, no page, and every action refused.
    operator = _signed_in(keyed_app, "read", "launch", "control")
    runs_page = operator.get("/console/runs")
    assert "/console/webhooks" not in runs_page.get_data(as_text=True)
    assert operator.get("/console/webhooks").status_code == 403
    token = _token(runs_page)  # the session's own token (its sign-out form)
    for path, data in ((f"/console/webhooks/{hook_id}/delete", {}),
                       (f"/console/webhooks/{hook_id}/rotate", {}),
                       ("/console/webhooks", {"url": "http://127.0.0.1:9/x",
                                              "event_types": "task.failed"})):
        assert operator.post(path, data={"csrf_token": token, **data}).status_code == 403
    with keyed_app.app_context():
        assert db.session.get(WebhookSubscription, hook_id).secret == secret  # unchanged
        db.session.execute(sa.delete(WebhookDelivery))
        db.session.execute(sa.delete(WebhookSubscription))
        db.session.commit()
        db.session.remove()


def test_launch_options_cache_ttl_and_webhook_url(keyed_app):
    client = _signed_in(keyed_app, "read", "launch", "control")
    form = client.get("/console/launch/acme.add")
    text = form.get_data(as_text=True)
    assert 'name="o.cache_ttl"' in text and 'name="o.webhook_url"' in text
    a = uuid.uuid4().int % 10**6  # params no other test launches
    fields = {"csrf_token": _token(form), "p.a": str(a), "p.b": "1", "o.cache_ttl": "60"}
    cache_was = keyed_app.config["RESULT_CACHE"]
    keyed_app.config["RESULT_CACHE"] = True  # (off in the tests' default config)
    try:
        first = client.post("/console/launch/acme.add", data=fields)
        # The same launch while the first is in flight: answered by it, and its page
        # says so.
        again = client.post("/console/launch/acme.add", data=fields)
        fresh = client.post("/console/launch/acme.add",
                            data=dict(fields, **{"o.cache_ttl": "0"}))  # 0: a new run
    finally:
        keyed_app.config["RESULT_CACHE"] = cache_was
    assert first.status_code == 302 and "notice=launched" in first.headers["Location"]
    assert again.status_code == 302 and "notice=cached" in again.headers["Location"]
    task_id = re.search(r"/runs/([0-9a-f-]{36})", first.headers["Location"]).group(1)
    assert f"/runs/{task_id}?" in again.headers["Location"]
    shown = client.get(again.headers["Location"]).get_data(as_text=True)
    assert "Answered by an identical run (result cache)" in shown
    assert "notice=launched" in fresh.headers["Location"]
    assert f"/runs/{task_id}?" not in fresh.headers["Location"]
    refused = client.post("/console/launch/acme.add",
                          data=dict(fields, **{"o.cache_ttl": "-1"}))
    assert refused.status_code == 422 and 'id="field-o-cache_ttl-error"' in refused.get_data(
        as_text=True)

    # webhook_url: refused next to its field while the deployment signs none...
    hooked = dict(fields, **{"o.cache_ttl": "", "o.webhook_url": "http://127.0.0.1:9/run"})
    refused = client.post("/console/launch/acme.add", data=hooked)
    text = refused.get_data(as_text=True)
    assert refused.status_code == 422 and 'id="field-o-webhook_url-error"' in text
    assert "CELERY_API_WEBHOOK_SECRET" in text
    # ...accepted when it does; the run's page lists the deliveries to it.
    saved = {k: keyed_app.config[k] for k in ("WEBHOOK_SECRET", "WEBHOOK_ALLOWED_HOSTS")}
    keyed_app.config.update(WEBHOOK_SECRET=webhooks.new_secret(),
                            WEBHOOK_ALLOWED_HOSTS=["127.0.0.1:9"])
    try:
        launched = client.post("/console/launch/acme.add",
                               data=dict(hooked, **{"o.countdown": "900"}))
        assert launched.status_code == 302, launched.get_data(as_text=True)
        run_url = launched.headers["Location"]
        page = client.get(run_url)
        assert "Deliveries to its webhook_url" in page.get_data(as_text=True)
        hooked_id = re.search(r"/runs/([0-9a-f-]{36})", run_url).group(1)
        client.post(f"/console/runs/{hooked_id}/revoke", data={"csrf_token": _token(page)})
        page = client.get(f"/console/runs/{hooked_id}").get_data(as_text=True)
        assert "<td>task.revoked" in page and "pending" in page
    finally:
        keyed_app.config.update(saved)
    for run in (task_id, re.search(r"/runs/([0-9a-f-]{36})", fresh.headers["Location"])[1]):
        client.post(f"/console/runs/{run}/revoke", data={"csrf_token": _token(form)})
    with keyed_app.app_context():
        db.session.execute(sa.delete(WebhookDelivery))
        db.session.commit()
        db.session.remove()

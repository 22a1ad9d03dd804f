#!/usr/bin/env python
"""Screenshots of the operator console for the README (docs/console/*.png).

Starts a private redis-server, gunicorn (authentication required) and a worker on a
fresh SQLite database, launches a few runs of the SII catalog through the API (a
fan-out, a failure, a batch, a held run, a schedule), then signs in with Debian's
Chromium (Playwright) and takes each main page at laptop width, and the runs page at
phone width. Nothing is downloaded.

Usage: .venv/bin/python bench/console_screenshots.py   (or: make screenshots)
"""

from __future__ import annotations

import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from tests.support import (  # noqa: E402
    COMPANY,
    LiveServer,
    RedisServer,
    WebhookReceiver,
    Worker,
    build_app,
    create_key,
    make_config,
    service_env,
    wait_for,
)
from tests.test_console import CHROMIUM, CHROMIUM_FLAGS  # noqa: E402

OUT = ROOT / "docs" / "console"
LAPTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="console-shots-"))
    redis_server = RedisServer(folder / "redis").start()
    config = make_config(folder / "app", redis_server.url, AUTH="required", TASK_MODULES=[],
                         SII_SANDBOX_STEP_SECONDS=0.3)
    app = build_app(config)
    key = create_key(app, "ops", "read", "launch", "control", "admin")
    receiver = WebhookReceiver()  # the demo subscription's endpoint
    env = dict(service_env(config), CELERY_API_AUTH="required", CELERY_API_TASK_MODULES="",
               SII_SANDBOX_STEP_SECONDS="0.3", CELERY_API_STATS_CACHE_SECONDS="0",
               CELERY_API_WEBHOOK_ALLOWED_HOSTS=receiver.host,
               CELERY_API_WEBHOOK_RETRY_SCHEDULE="0.5")
    server = LiveServer(env, folder / "gunicorn.log").start()
    worker = Worker(env, f"worker1@{uuid.uuid4().hex[:6]}", folder / "worker.log",
                    concurrency=2, queues="celery,webhooks").start(app.extensions["celery"])
    try:
        shoot(server.url, key, receiver)
    finally:
        worker.stop()
        server.stop()
        receiver.stop()
        redis_server.stop()
    print(f"screenshots in {OUT.relative_to(ROOT)}")
    return 0


def shoot(url: str, key: str, receiver: WebhookReceiver) -> None:
    headers = {"Authorization": f"Bearer {key}"}

    def call(method, path, **kwargs):
        response = requests.request(method, f"{url}/api/celery{path}", headers=headers,
                                    timeout=10, **kwargs)
        assert response.status_code < 300, response.text
        return response.json()

    def launch(task_type, params, **options):
        return call("POST", "/tasks/launch", json={"task_type": task_type, "params": params,
                                                  **options})["task_id"]

    fanout = launch("sii.sync_documents_all_companies", {"months": 1}, tags=["nightly"])
    launch("sii.sync_f29", {"company_id": str(uuid.uuid4())}, tags=["adhoc"])  # fails
    batch = call("POST", "/tasks/batch", json={"tasks": [
        {"task_type": "sii.sync_f29", "params": {"company_id": COMPANY}}] * 6})["batch_id"]
    held = launch("sii.sync_documents", {"company_id": COMPANY, "months": 3},
                  countdown=3600, tags=["month-end"])
    call("POST", "/schedules", json={"name": "nightly-documents",
                                     "task_type": "sii.sync_documents_all_companies",
                                     "params": {"months": 1}, "cron": "0 3 * * *",
                                     "timezone": "America/Santiago"})
    call("POST", "/schedules", json={"name": "f29-every-hour", "task_type":
                                     "sii.sync_f29_all_companies", "params": {},
                                     "interval_seconds": 3600})

    hook = call("POST", "/webhooks", json={
        "url": receiver.plan("/erp/celery-events", [503]), "event_types": ["task.failed",
                                                                         "task.succeeded"],
        "task_type": "sii.sync_f29", "description": "ERP: F29 outcomes"})["id"]
    call("POST", f"/webhooks/{hook}/ping")  # refused once (503), then delivered
    call("POST", "/webhooks", json={"url": receiver.plan("/chat/alerts"),
                                    "event_types": ["task.failed", "batch.finished"],
                                    "description": "Ops chat"})

    def settled():
        rows = call("GET", "/history?limit=100")["items"]
        return all(r["status"] in ("SUCCESS", "FAILURE", "REVOKED") or r["task_id"] == held
                   for r in rows) and len(rows) > 8

    wait_for(settled, timeout=120, interval=0.5, message="the demo runs to finish")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport=LAPTOP, timezone_id="America/Santiago",
                                      locale="en-US")
        page = context.new_page()
        page.goto(f"{url}/console/")
        page.get_by_label("API key").fill("cak_000000000000_" + "0" * 64)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("The API key is not valid.").wait_for()
        page.screenshot(path=OUT / "sign-in.png")
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url("**/console/runs")
        page.screenshot(path=OUT / "runs.png", full_page=True)

        running = launch("sii.sync_documents", {"company_id": COMPANY, "months": 12})
        page.goto(f"{url}/console/runs/{running}")
        page.locator("#run-progress:not([hidden])").wait_for()
        page.screenshot(path=OUT / "run-progress.png")
        page.goto(f"{url}/console/runs/{fanout}")
        page.screenshot(path=OUT / "run-lineage.png", full_page=True)

        page.goto(f"{url}/console/launch/sii.sync_documents")
        page.eval_on_selector("#launch-form", "form => form.noValidate = true")
        page.locator("#field-p-company_id").fill("not-a-uuid")
        page.locator("#field-p-months").fill("13")
        page.get_by_role("button", name="Launch").click()
        page.locator("#field-p-company_id-error").wait_for()
        page.screenshot(path=OUT / "launch-422.png", full_page=True)

        page.goto(f"{url}/console/workers")
        page.get_by_role("heading", name="Workers online (1)").wait_for()
        page.screenshot(path=OUT / "workers.png", full_page=True)
        page.goto(f"{url}/console/batches/{batch}")
        page.screenshot(path=OUT / "batch.png")
        page.goto(f"{url}/console/schedules")
        page.screenshot(path=OUT / "schedules.png")
        page.goto(f"{url}/console/webhooks")
        page.screenshot(path=OUT / "webhooks.png", full_page=True)
        page.goto(f"{url}/console/webhooks/{hook}")
        page.screenshot(path=OUT / "webhook-deliveries.png", full_page=True)

        phone = browser.new_context(viewport=PHONE, timezone_id="America/Santiago",
                                    locale="en-US")
        phone.add_cookies(context.cookies())
        small = phone.new_page()
        small.goto(f"{url}/console/runs")
        small.screenshot(path=OUT / "runs-phone.png")
        browser.close()


if __name__ == "__main__":
    sys.exit(main())

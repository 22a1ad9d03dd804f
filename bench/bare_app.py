"""The ceiling for a launch: a bare Flask endpoint that only calls ``send_task``.

Served by gunicorn with this project's gunicorn.conf.py (the same workers, threads and
worker class as the API), so ``bench/compare.py`` can tell what the web stack and Celery
allow apart from what this API's validation, record and response cost (issue 16: the
API's launch at >= 0.7x of this endpoint). No validation, no record, no auth, no limits,
no metrics, no log line: ``POST /launch/<name>`` publishes the JSON body's ``kwargs`` and
answers 202 with the task's id.

    gunicorn -c gunicorn.conf.py --chdir bench bare_app:app   (CELERY_BROKER_URL set)
"""

from __future__ import annotations

import os

from celery import Celery
from flask import Flask, jsonify, request

celery = Celery(broker=os.environ["CELERY_BROKER_URL"],
                backend=os.environ.get("CELERY_RESULT_BACKEND"))
app = Flask(__name__)


@app.post("/launch/<name>")
def launch(name: str):
    body = request.get_json(silent=True) or {}
    result = celery.send_task(name, kwargs=body.get("kwargs") or {})
    return jsonify(task_id=result.id), 202


@app.get("/healthz")
def healthz():
    return jsonify(status="ok")

"""Fixtures: a private redis-server, the embedded broker, apps, and real Celery workers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import flask_migrate
import pytest

from tests.support import PLUGINS, RedisServer, Worker, service_env

sys.path.insert(0, str(PLUGINS))

from celery_api import create_app  # noqa: E402
from celery_api.embedded import EmbeddedRedis  # noqa: E402


def make_config(folder: Path, broker_url: str, **extra) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "INSTANCE_PATH": folder,
        "SQLALCHEMY_DATABASE_URI": f"sqlite:///{folder / 'test.db'}",
        "TASK_MODULES": ["acme_tasks"],
        "QUEUES": ["celery", "parked"],
        "INSPECT_TIMEOUT": 0.5,
        "STATS_CACHE_SECONDS": 0,
        "SII_SANDBOX_STEP_SECONDS": 0.1,
        "SII_RETRY_BACKOFF_SECONDS": 0.2,
        "CELERY": {"broker_url": broker_url, "result_backend": broker_url},
    }
    config.update(extra)
    return config


def build_app(config: dict):
    app = create_app(dict(config, CELERY=dict(config["CELERY"])))
    with app.app_context():
        flask_migrate.upgrade()
    return app


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def embedded_broker(tmp_path_factory):
    # A short folder: Unix socket paths are limited to 107 bytes.
    folder = Path(tmp_path_factory.mktemp("emb"))
    server = EmbeddedRedis(folder, persistent=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def app(tmp_path_factory, redis_server):
    """An app on the private Redis with no worker: for the HTTP contract tests."""
    return build_app(make_config(tmp_path_factory.mktemp("app"), redis_server.url))


@pytest.fixture
def client(app):
    return app.test_client()


class Stack:
    """An app (test client) and a real worker sharing one broker and one database."""

    def __init__(self, kind, app, config, worker, folder):
        self.kind = kind
        self.app = app
        self.config = config
        self.worker = worker
        self.folder = folder
        self.client = app.test_client()
        self.celery = app.extensions["celery"]

    def env(self) -> dict:
        return service_env(self.config)


@pytest.fixture(scope="session", params=["redis", "embedded"])
def stack(request, tmp_path_factory):
    kind = request.param
    broker = request.getfixturevalue("redis_server" if kind == "redis" else "embedded_broker")
    folder = tmp_path_factory.mktemp(f"stack-{kind}")
    url = broker.url.replace("/0", "/1") if kind == "redis" else broker.url
    config = make_config(folder, url)
    app = build_app(config)
    worker = Worker(service_env(config), f"w1-{kind}@{os.uname().nodename}",
                    folder / "worker.log", statedb=folder / "worker.state")
    worker.start(app.extensions["celery"])
    yield Stack(kind, app, config, worker, folder)
    worker.stop()

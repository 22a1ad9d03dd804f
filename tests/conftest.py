"""Fixtures: a private redis-server, the embedded broker, apps, and real Celery workers."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from celery_api.embedded import EmbeddedRedis
from tests.support import (
    PLUGINS,
    RedisServer,
    Worker,
    build_app,
    close_app,
    database_url,
    make_config,
    optional_component,
    service_env,
)

# make_config loads acme_tasks, a task module from outside the package, as a deployment would.
sys.path.insert(0, str(PLUGINS))

PG_ADMIN_URL = os.environ.get("CELERY_API_TEST_POSTGRES",
                              "postgresql://postgres@127.0.0.1:5432/postgres")


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
def postgres_admin():
    """A reachable PostgreSQL server, on which the tests create their own databases."""
    import psycopg

    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        optional_component("PostgreSQL", f"{PG_ADMIN_URL}: {exc}")
    return PG_ADMIN_URL


class Databases:
    """Creates throw-away PostgreSQL databases and drops them at the end."""

    def __init__(self, admin_url: str):
        self.admin_url = admin_url
        self.created: list[str] = []

    def create(self) -> str:
        import uuid

        import psycopg

        name = f"celery_api_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        base = self.admin_url.rsplit("/", 1)[0]
        return f"{base}/{name}"

    def drop_all(self) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            for name in self.created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_databases(postgres_admin):
    databases = Databases(postgres_admin)
    yield databases
    databases.drop_all()


RABBITMQ_URL = os.environ.get("CELERY_API_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672")


@pytest.fixture(scope="session")
def rabbitmq_vhost():
    """A private vhost on the local RabbitMQ (rabbitmqctl), deleted at the end."""
    import shutil
    import subprocess
    import uuid

    import kombu

    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    try:
        with kombu.Connection(f"{RABBITMQ_URL}//", connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001
        optional_component("RabbitMQ", f"{RABBITMQ_URL}: {exc}")
    if not os.path.exists(ctl):
        optional_component("RabbitMQ", "rabbitmqctl is needed to create a private vhost")
    vhost = f"celery_api_test_{uuid.uuid4().hex[:8]}"
    for args in (["add_vhost", vhost], ["set_permissions", "-p", vhost, "guest", ".*", ".*",
                                        ".*"]):
        done = subprocess.run([ctl, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    yield f"{RABBITMQ_URL}/{vhost}"
    subprocess.run([ctl, "delete_vhost", vhost], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def app(tmp_path_factory, redis_server):
    """An app on the private Redis with no worker: for the HTTP contract tests."""
    return build_app(make_config(tmp_path_factory.mktemp("app"), redis_server.url))


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def history_app(request, tmp_path_factory, redis_server):
    """An app on SQLite, then on PostgreSQL, for the history and migration tests."""
    folder = tmp_path_factory.mktemp(f"history-{request.param}")
    config = make_config(folder, redis_server.url, database_url(request, request.param))
    app = build_app(config)
    app.config["TEST_DATABASE"] = request.param
    yield app
    close_app(app)


@dataclass
class Stack:
    """An app (test client) and a real worker sharing one broker and one database."""

    kind: str
    app: object
    config: dict
    worker: Worker
    folder: Path
    database: str

    def __post_init__(self):
        self.client = self.app.test_client()
        self.celery = self.app.extensions["celery"]

    def env(self) -> dict:
        return service_env(self.config)


@pytest.fixture(scope="session", params=[("redis", "sqlite"), ("embedded", "sqlite"),
                                        ("redis", "postgres"), ("rabbitmq", "sqlite")],
                ids=["redis-sqlite", "embedded-sqlite", "redis-postgres", "rabbitmq-sqlite"])
def stack(request, tmp_path_factory):
    kind, database = request.param
    folder = tmp_path_factory.mktemp(f"stack-{kind}-{database}")
    if kind == "rabbitmq":
        # RabbitMQ carries the messages; results go to the private Redis.
        url = request.getfixturevalue("rabbitmq_vhost")
        backend = request.getfixturevalue("redis_server").url.replace("/0", "/3")
    elif kind == "redis":
        db_number = {"sqlite": 1, "postgres": 2}[database]
        url = backend = request.getfixturevalue("redis_server").url.replace(
            "/0", f"/{db_number}")
    else:
        url = backend = request.getfixturevalue("embedded_broker").url
    config = make_config(folder, url, database_url(request, database))
    config["CELERY"]["result_backend"] = backend
    app = build_app(config)
    worker = Worker(service_env(config), f"w1-{kind}-{database}@{os.uname().nodename}",
                    folder / "worker.log", statedb=folder / "worker.state")
    worker.start(app.extensions["celery"])
    yield Stack(kind, app, config, worker, folder, database)
    worker.stop()

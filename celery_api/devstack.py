"""``make run``: API + worker + webhook worker + beat in the foreground; Ctrl-C stops
them all.

Holds a lock on the instance folder for its lifetime, so a second ``make run`` in
the same folder refuses to start (naming the first) instead of taking its broker.
Starts the embedded broker first unless ``CELERY_BROKER_URL`` is set, applies the
migrations, then runs gunicorn, one Celery worker, the webhook worker (the
``webhooks`` queue only) and beat as child processes
sharing this environment. If any of them dies, the rest are stopped too.

Each child runs in its own process group: Ctrl-C in the terminal reaches this
process only, which stops each child with the signal meant for it (SIGTERM: a
graceful stop for gunicorn, a warm shutdown for the worker). A SIGINT sent straight
to gunicorn's workers (as the terminal would) makes them shut their thread pool down
from inside a signal handler, which deadlocks when the signal lands while the
worker is handing a request to that pool; gunicorn then SIGKILLs it (docs/RELIABILITY.md).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from celery_api import settings
from celery_api.embedded import BrokerInUse, EmbeddedRedis, redis_server_binary

LOCK_NAME = ".lock"
# The demo's gunicorn: a stop waits this long for requests in flight (the
# production default, 10 s, is for make serve and the deployment).
DEMO_GRACEFUL_TIMEOUT = "5"

PYTHON_BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    candidate = PYTHON_BIN / name
    return str(candidate) if candidate.exists() else name


def hold_instance_lock(instance: Path, url: str):
    """Lock ``instance`` for this process's lifetime (the OS releases it when the
    process ends, however it ends); the open lock file, or None when another live
    process holds it (the message naming it is printed)."""
    fd = os.open(instance / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    lock = os.fdopen(fd, "r+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            owner = json.loads(lock.read() or "{}")
        except ValueError:
            owner = {}
        lock.close()
        print(f"make run is already running in {instance} (pid {owner.get('pid', '?')}, "
              f"{owner.get('url', 'URL unknown')}). Stop it first (Ctrl-C in its terminal), "
              "or run a second one in another folder: INSTANCE_PATH=other-folder "
              "PORT=8001 make run", file=sys.stderr, flush=True)
        return None
    lock.seek(0)
    lock.truncate()
    lock.write(json.dumps({"pid": os.getpid(), "url": url}))
    lock.flush()
    return lock


def main() -> int:
    instance = settings.default_instance_path()
    instance.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("INSTANCE_PATH", str(instance))
    port = os.environ.setdefault("PORT", "8000")
    bind = os.environ.get("GUNICORN_BIND")
    url = f"http://{bind}" if bind and not bind.startswith("unix:") else \
        f"http://127.0.0.1:{port}"
    lock = hold_instance_lock(instance, url)
    if lock is None:
        return 1
    try:
        return _run(instance, url)
    finally:
        lock.close()


def _run(instance: Path, url: str) -> int:
    embedded = None
    if not settings.env_str("CELERY_BROKER_URL"):
        try:
            embedded = EmbeddedRedis(instance).start()
        except BrokerInUse as exc:
            print(f"make run: {exc}", file=sys.stderr, flush=True)
            return 1
        print(f"embedded broker: {redis_server_binary()} on {embedded.socket}", flush=True)
        os.environ["CELERY_BROKER_URL"] = embedded.url
        os.environ.setdefault("CELERY_RESULT_BACKEND", embedded.url)
    os.environ.setdefault("GUNICORN_GRACEFUL_TIMEOUT", DEMO_GRACEFUL_TIMEOUT)
    # The local demo runs without API keys, on 127.0.0.1 only: off unless the user chose,
    # or bound the API elsewhere (GUNICORN_BIND), where the default (required) stays.
    if _loopback(os.environ.get("GUNICORN_BIND")):
        os.environ.setdefault("CELERY_API_AUTH", "off")
    auth = os.environ.get("CELERY_API_AUTH") or "required"
    env = dict(os.environ)
    try:
        subprocess.run([_tool("flask"), "--app", "wsgi", "db", "upgrade"], check=True, env=env)
        if settings.env_str("CELERY_API_SEED_SCHEDULES", "0") not in ("0", "false", "no"):
            # The SII calendar (README, Schedules): created once, kept across runs.
            subprocess.run([_tool("flask"), "--app", "wsgi", "schedules", "seed"], check=True,
                           env=env)
    except subprocess.CalledProcessError:
        if embedded:
            embedded.stop()
        return 1
    commands = {
        "api": [_tool("gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
        "worker": [_tool("celery"), "-A", "wsgi:celery_app", "worker", "--loglevel",
                   env.get("LOG_LEVEL", "INFO"), "--concurrency",
                   env.get("WORKER_CONCURRENCY", "2"), "--hostname", "worker@%h",
                   "--statedb", str(instance / "worker-%p.state")],
        # Webhook deliveries, on their own queue and worker (make webhook-worker).
        "webhooks": [_tool("celery"), "-A", "wsgi:celery_app", "worker", "--loglevel",
                     env.get("LOG_LEVEL", "INFO"), "--queues", "webhooks", "--pool",
                     "threads", "--concurrency", env.get("WEBHOOK_CONCURRENCY", "4"),
                     "--hostname", "webhooks@%h", "--without-gossip", "--without-mingle"],
        "beat": [_tool("celery"), "-A", "wsgi:celery_app", "beat", "--loglevel",
                 env.get("LOG_LEVEL", "INFO"), "--schedule",
                 str(instance / "celerybeat-schedule")],
    }
    stopping = False
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def stop(*_):
        nonlocal stopping
        if stopping:
            print("stopping: waiting for the API, workers and beat to end", flush=True)
        stopping = True

    for signum in signals:  # before the children exist: no Ctrl-C goes unhandled
        signal.signal(signum, stop)
    # Their own process groups: the terminal's Ctrl-C reaches this process only.
    children = {name: subprocess.Popen(cmd, env=env, process_group=0)
                for name, cmd in commands.items()}
    print(f"celery-api on {url} (docs: {url}/api/docs/); Ctrl-C stops all", flush=True)
    print(f"operator console: {url}/console/", flush=True)
    if auth == "off":
        print("authentication: OFF (CELERY_API_AUTH=off, the local demo on 127.0.0.1); "
              "make serve requires API keys", flush=True)
    else:
        print(f"authentication: {auth} (CELERY_API_AUTH): send Authorization: Bearer <key>; "
              "create one with flask --app wsgi keys create NAME --scope SCOPE", flush=True)
    code = 0
    while not stopping:
        for name, child in children.items():
            if child.poll() is not None:
                print(f"{name} exited with {child.returncode}; stopping the rest", flush=True)
                code = child.returncode or 1
                stopping = True
        time.sleep(0.2)
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for child in children.values():
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    if embedded:
        embedded.stop()
    return code


def _loopback(bind: str | None) -> bool:
    """True for gunicorn's default bind (127.0.0.1:$PORT) and other loopback ones."""
    if not bind:
        return True
    host = bind.rsplit(":", 1)[0].strip("[]") if not bind.startswith("unix:") else ""
    return bind.startswith("unix:") or host in ("127.0.0.1", "localhost", "::1")


if __name__ == "__main__":
    sys.exit(main())

"""``make run``: API + worker + beat in the foreground; Ctrl-C stops them all.

Starts the embedded broker first unless ``CELERY_BROKER_URL`` is set, applies the
migrations, then runs gunicorn, one Celery worker and beat as child processes
sharing this environment. If any of them dies, the rest are stopped too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from celery_api import settings
from celery_api.embedded import EmbeddedRedis, redis_server_binary

PYTHON_BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    candidate = PYTHON_BIN / name
    return str(candidate) if candidate.exists() else name


def main() -> int:
    instance = settings.default_instance_path()
    instance.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("INSTANCE_PATH", str(instance))
    embedded = None
    if not settings.env_str("CELERY_BROKER_URL"):
        embedded = EmbeddedRedis(instance).start()
        print(f"embedded broker: {redis_server_binary()} on {embedded.socket}", flush=True)
        os.environ["CELERY_BROKER_URL"] = embedded.url
        os.environ.setdefault("CELERY_RESULT_BACKEND", embedded.url)
    port = os.environ.setdefault("PORT", "8000")
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
        "beat": [_tool("celery"), "-A", "wsgi:celery_app", "beat", "--loglevel",
                 env.get("LOG_LEVEL", "INFO"), "--schedule",
                 str(instance / "celerybeat-schedule")],
    }
    children = {name: subprocess.Popen(cmd, env=env) for name, cmd in commands.items()}
    print(f"celery-api on http://127.0.0.1:{port} (docs: /api/docs); Ctrl-C stops all",
          flush=True)
    if auth == "off":
        print("authentication: OFF (CELERY_API_AUTH=off, the local demo on 127.0.0.1); "
              "make serve requires API keys", flush=True)
    else:
        print(f"authentication: {auth} (CELERY_API_AUTH): send Authorization: Bearer <key>; "
              "create one with flask --app wsgi keys create NAME --scope SCOPE", flush=True)
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
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

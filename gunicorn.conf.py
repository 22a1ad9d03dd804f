"""gunicorn settings for celery-api, read from the environment (see the README table)."""

import os
import shutil
import tempfile

# Metrics of every worker process are summed at /metrics (prometheus_client's
# multiprocess mode): each process writes its samples to files in this folder.
_OWN_METRICS_DIR = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _OWN_METRICS_DIR:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="celery-api-metrics-")

bind = os.environ.get("GUNICORN_BIND") or f"127.0.0.1:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# gthread, with the connection handling of EdgeThreadWorker below: a connection holds a
# thread only once its request head is complete (README "Slow and idle clients").
worker_class = "gthread"  # replaced by EdgeThreadWorker at the end of this file
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
# Open connections per worker process (idle ones cost a file descriptor, not a thread).
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "1000"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "10"))
keepalive = 5
# A request head (request line and headers) must be complete this many seconds after
# its first byte, and a new connection must send that byte within it too: else closed.
HEADER_TIMEOUT = float(os.environ.get("GUNICORN_HEADER_TIMEOUT", "10"))
# The same limits as nginx's large_client_header_buffers (4 x 8k, deploy/nginx.conf):
# a longer request line is a 414, a longer header line or more than 100 headers a 431,
# each answered as problem+json; a head over 64 KB in all is a 431 without being parsed.
limit_request_line = 8190
limit_request_field_size = 8190
limit_request_fields = 100
MAX_HEAD_BYTES = 64 * 1024
accesslog = "-" if os.environ.get("GUNICORN_ACCESS_LOG", "0") in ("1", "true") else None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# gunicorn 27 opens a control socket under ~/.gunicorn by default: not wanted here.
control_socket_disable = True
# Published URLs (Location, OpenAPI servers) follow X-Forwarded-* only from these peers.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")


def on_starting(server):
    """Start from an empty metrics folder: samples of an earlier run must not count."""
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)


def when_ready(server):
    """Refuse to serve when CELERY_API_AUTH is required (the default) and the database
    has no active API key; with CELERY_API_AUTH=off, log a warning (README,
    Authentication). gunicorn exits 1 with the message."""
    from celery_api.auth import check_before_serving

    try:
        check_before_serving(server.log)
    except RuntimeError:
        on_exit(server)
        raise


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics folder this config made (one given by the operator stays)."""
    if _OWN_METRICS_DIR:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


# Slow and idle clients (README "Slow and idle clients"). gunicorn's gthread worker hands
# every new connection to a thread, which waits up to 5 s for a first byte and then reads
# the request head with blocking reads: a few hundred idle connections, or one slowly-sent
# header per thread, leave no thread for anyone else. This worker reads request heads in
# its event loop instead (non-blocking, as nginx does) and gives a connection to a thread
# only once its head is complete, so idle and slow clients cost a file descriptor each.

import errno  # noqa: E402
import json  # noqa: E402
import selectors  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402

from gunicorn.workers.gthread import TConn, ThreadWorker  # noqa: E402

HEAD_END = b"\r\n\r\n"
PROBLEM_DETAILS = {
    400: "The request could not be parsed as HTTP/1.1.",
    414: f"The request line is longer than {limit_request_line} bytes: shorten the URL.",
    431: (f"The request head is too large: at most {limit_request_fields} headers of "
          f"{limit_request_field_size} bytes each, {MAX_HEAD_BYTES} bytes in all."),
}


def problem_bytes(status: int, reason: str, detail: str | None = None) -> bytes:
    """A complete HTTP/1.1 problem+json response that closes the connection."""
    body = json.dumps({"type": "about:blank", "title": reason, "status": status,
                       "detail": detail or PROBLEM_DETAILS.get(status, reason)}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/problem+json\r\nContent-Length: {len(body)}\r\n"
            f"X-Content-Type-Options: nosniff\r\n\r\n")
    return head.encode("latin-1") + body


class _ProblemSocket:
    """The client socket as gunicorn's error writer sees it: its HTML error page is
    replaced by the same status as problem+json (the app's own errors already are)."""

    def __init__(self, sock):
        self._sock = sock

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def sendall(self, data: bytes) -> None:
        try:
            _version, status, reason = data.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            data = problem_bytes(int(status), reason)
        except ValueError:
            pass  # not a status line: send what gunicorn wrote
        self._sock.sendall(data)


class EdgeThreadWorker(ThreadWorker):
    """gthread, with request heads read in the event loop (see above)."""

    def accept(self, listener):
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())
        self._await_head(conn)

    def on_client_socket_readable(self, conn, client):
        """A kept-alive connection has its next request coming: read its head here too."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._await_head(conn)

    def _await_head(self, conn):
        conn.head = bytearray()
        # pending_conns stays sorted by deadline: every entry gets the same delay.
        conn.timeout = time.monotonic() + HEADER_TIMEOUT
        self.pending_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._read_head, conn))

    def _cap_keepalive(self, deadline):
        """At a graceful stop gunicorn closes kept-alive connections by ``deadline`` (2 s);
        those still waiting for a request head close by then too, so an idle client
        (a browser's spare connection) does not hold the worker for the whole graceful
        timeout, at the end of which the arbiter SIGKILLs it."""
        super()._cap_keepalive(deadline)
        for conn in self.pending_conns:  # one deadline for all: the order stays sorted
            conn.timeout = min(conn.timeout, deadline)

    def _drop_pending(self, conn):
        self.poller.unregister(conn.sock)
        self.pending_conns.remove(conn)

    def _read_head(self, conn, _client):
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away before its request was complete
            self._drop_pending(conn)
            self.nr_conns -= 1
            conn.close()
            return
        seen = len(conn.head)
        conn.head += data
        if HEAD_END in conn.head[max(seen - 3, 0):]:
            self._drop_pending(conn)
            conn.data_ready = True
            self.enqueue_req(conn)
        elif len(conn.head) > MAX_HEAD_BYTES:
            if b"\r\n" in conn.head[:limit_request_line + 2]:
                self._refuse(conn, 431, "Request Header Fields Too Large")
            else:
                self._refuse(conn, 414, "URI Too Long")

    def _refuse(self, conn, status, reason):
        """Answer a head too large to read, then discard what the client still sends
        until it closes (at most HEADER_TIMEOUT), so that it reads the answer rather
        than a reset connection. All in the event loop: no thread is held."""
        self._drop_pending(conn)
        conn.head = None
        try:
            conn.sock.send(problem_bytes(status, reason))
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.nr_conns -= 1
            conn.close()
            return
        conn.timeout = time.monotonic() + HEADER_TIMEOUT
        self.pending_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._linger, conn))

    def _linger(self, conn, _client):
        try:
            if conn.sock.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._drop_pending(conn)
        self.nr_conns -= 1
        conn.close()

    def handle(self, conn):
        """In a thread: the head read so far goes back in front of the parser."""
        head = getattr(conn, "head", None)
        if head:
            conn.sock.setblocking(True)
            conn.init()
            conn.parser.unreader.unread(bytes(head))
        conn.head = None
        return super().handle(conn)

    def handle_error(self, req, client, addr, exc):
        super().handle_error(req, _ProblemSocket(client), addr, exc)


worker_class = EdgeThreadWorker

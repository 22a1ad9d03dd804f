"""gunicorn's gthread worker, extended: the fence around the gunicorn internals this
service relies on (tests/test_fences.py checks each).

``EdgeThreadWorker`` (gunicorn.conf.py's ``worker_class``) is gthread with two changes:

- **Slow and idle clients** (README "Slow and idle clients"). gthread hands every new
  connection to a thread, which waits up to 5 s for a first byte and then reads the
  request head with blocking reads: a few hundred idle connections, or one slowly-sent
  header per thread, leave no thread for anyone else. This worker reads request heads in
  its event loop instead (non-blocking, as nginx does) and gives a connection to a
  thread only once its head is complete, so idle and slow clients cost a file
  descriptor each.
- **Parked requests** (README "Waiting for a run"). gthread has no ``ALREADY_HANDLED``
  (gunicorn's async workers do): a view that waits on a run parks its connection
  (``celery_api.waiting``), and the worker then neither writes a response nor closes or
  keeps the connection: the waiting hub owns the socket from there, and the thread is
  free at once. A stopping worker has the hub answer its parked waiters first.

Relied on: ``ThreadWorker`` and its ``accept``, ``on_client_socket_readable``,
``_cap_keepalive``, ``handle``, ``handle_error``, ``finish_request``, ``run``,
``enqueue_req``, ``poller``, ``pending_conns``, ``keepalived_conns``, ``nr_conns``;
``TConn`` (``sock``, ``init``, ``parser.unreader.unread``, ``timeout``, ``data_ready``);
``self.wsgi`` called as ``wsgi(environ, resp.start_response)`` with ``resp`` a
``gunicorn.http.wsgi.Response`` (``headers_sent``, ``must_close``, ``status``); and
``environ["gunicorn.socket"]``, the client socket.
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import threading
import time
from functools import partial

from gunicorn.workers.gthread import TConn, ThreadWorker

HEAD_END = b"\r\n\r\n"
# A request head must be complete this many seconds after its first byte, and a new
# connection must send that byte within it too: else closed. A head over 64 KB in all
# is a 431 without being parsed.
HEADER_TIMEOUT = float(os.environ.get("GUNICORN_HEADER_TIMEOUT", "10"))
MAX_HEAD_BYTES = 64 * 1024
# The request-line and header limits of gunicorn.conf.py (as nginx's, deploy/nginx.conf).
LIMIT_REQUEST_LINE = 8190
LIMIT_REQUEST_FIELDS = 100
LIMIT_REQUEST_FIELD_SIZE = 8190
PROBLEM_DETAILS = {
    400: "The request could not be parsed as HTTP/1.1.",
    414: f"The request line is longer than {LIMIT_REQUEST_LINE} bytes: shorten the URL.",
    431: (f"The request head is too large: at most {LIMIT_REQUEST_FIELDS} headers of "
          f"{LIMIT_REQUEST_FIELD_SIZE} bytes each, {MAX_HEAD_BYTES} bytes in all."),
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


def recv_nowait(sock, size: int) -> bytes | None:
    """What a non-blocking socket has: None when nothing yet, b"" when the peer went
    away (or the socket failed), else the bytes read."""
    try:
        return sock.recv(size)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


PARKED = object()  # what ``handle`` returns for a connection the waiting hub took


class EdgeThreadWorker(ThreadWorker):
    """gthread, with request heads read in the event loop and parked requests (see the
    module's docstring)."""

    def init_process(self):
        self._parked: dict = {}  # client socket -> (waiter, status, headers)
        self._parked_lock = threading.Lock()
        super().init_process()

    def load_wsgi(self):
        super().load_wsgi()
        self.wsgi = partial(self._serve, self.wsgi)

    def _serve(self, app, environ, start_response):
        """In a thread: run the app; a view that parked (``environ[PARKED]``) gets its
        status and headers kept for the hub, and gunicorn writes nothing."""
        from celery_api import waiting

        if environ.get("HTTP_VERSION") != "2":  # an HTTP/2 stream shares its socket
            environ[waiting.PARKING] = True
        captured: list = []

        def start(status, headers, exc_info=None):
            if waiting.PARKED in environ and status.startswith("200"):
                captured[:] = [status, headers]
                return lambda _data: None
            return start_response(status, headers, exc_info)

        result = app(environ, start)
        waiter = environ.get(waiting.PARKED)
        if waiter is None or not captured:
            return result
        if hasattr(result, "close"):
            result.close()
        response = start_response.__self__  # gunicorn.http.wsgi.Response
        response.status = captured[0]  # for the access log
        response.headers_sent = True  # nothing to write: the hub answers
        response.must_close = True  # and the connection is not kept alive here
        with self._parked_lock:
            self._parked[environ["gunicorn.socket"]] = (waiter, *captured)
        return []

    def finish_request(self, conn, fs):
        """In the event loop: a parked connection goes to the hub, neither closed nor
        kept alive; any other is finished as gthread does."""
        if not fs.cancelled() and fs.exception() is None and fs.result() is PARKED:
            with self._parked_lock:
                waiter, status, headers = self._parked.pop(conn.sock)
            self.nr_conns -= 1
            waiter.hub.adopt(waiter, conn.sock, status, headers)
            return
        super().finish_request(conn, fs)

    def run(self):
        """gthread's loop; once it ends (a graceful stop), the hub answers every
        parked waiter with the current state and ends its streams."""
        try:
            super().run()
        finally:
            from celery_api import waiting

            waiting.shutdown_all(self.cfg.graceful_timeout)

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
        data = recv_nowait(conn.sock, 65536)
        if data is None:
            return
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
            if b"\r\n" in conn.head[:LIMIT_REQUEST_LINE + 2]:
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
        result = super().handle(conn)
        with self._parked_lock:
            if conn.sock in self._parked:
                return PARKED
        return result

    def handle_error(self, req, client, addr, exc):
        super().handle_error(req, _ProblemSocket(client), addr, exc)


"""The waiting hub: clients waiting on runs (GET /tasks/{id}?wait=N and the event stream
GET /tasks/{id}/events) held without a thread each (README "Waiting for a run").

Under gunicorn (``celery_api/fences/gunicorn.py``) a view that has to wait *parks* its
connection: it does authentication, validation and the fast path as any view, then
leaves the client socket and the response head Flask built to this hub and returns; the
worker treats the request as handled and its thread is free at once. Each process has
one hub with two threads, whatever the number of waiters:

- the **I/O loop** owns the parked sockets: it writes answers and events without
  blocking (a reader more than ``MAX_BUFFERED`` bytes behind, or one that takes nothing
  for ``SEND_TIMEOUT`` seconds, is dropped), sends
  keep-alive comments on streams, and notices a client that goes away (its socket
  reads end-of-file) and forgets its waiter;
- the **checker** reads the run notifications (``services.runevents``: one Redis
  subscriber, or a poller without Redis), re-reads the state of every waited run at a
  short interval (one query: a lost notification costs at most that delay), answers
  waiters at their deadline, and reads each woken run's state from the record, once
  for all its waiters, to render what they are sent.

Elsewhere (the Flask test client, another WSGI server) there is no socket to park:
the view waits in its own thread on an event the same checker sets (a bounded,
blocking wait). A stopping worker answers its parked waiters with the current state
and ends its streams (clients reconnect, with ``Last-Event-ID``, to another worker).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from email.utils import formatdate

from flask import Flask

from celery_api.extensions import db
from celery_api.fences.gunicorn import recv_nowait
from celery_api.services import runevents, runs, runstate
from celery_api.services.errors import NotFound

log = logging.getLogger("celery_api.waiting")

PARKING = "celery_api.parking"  # environ: set by the gunicorn fence, connections can park
PARKED = "celery_api.parked"  # environ: set by the view, the Waiter to adopt
MAX_BUFFERED = 1024 * 1024  # bytes a client may fall behind before it is dropped
SEND_TIMEOUT = 60.0  # seconds a client may take nothing of what it is sent (as nginx's)
KEEPALIVE_COMMENT = b": keep-alive\n\n"
DEADLINES_SLACK = 64  # entries of waiters done kept in the deadline heap, beyond its live ones

_hubs: list[Hub] = []
_hubs_lock = threading.Lock()


def event_id(fingerprint: tuple) -> str:
    """A stream event's id: names the state it carries, so a reconnect that already
    saw that state (``Last-Event-ID``) is not sent it again."""
    return hashlib.sha1(repr(fingerprint).encode()).hexdigest()[:16]


def view_fingerprint(view: runs.RunView) -> tuple:
    return runevents.fingerprint(view.status, view.progress)


def sse_event(name: str, ident: str, data: str) -> bytes:
    """One Server-Sent Event (``data`` is one line of JSON)."""
    return f"id: {ident}\nevent: {name}\ndata: {data}\n\n".encode()


class Waiter:
    """One waiting client: ``wait`` (one answer, at the end or the deadline), ``stream``
    (events until the end) or ``block`` (the fallback: a thread waits on ``event``)."""

    def __init__(self, task_id: str, kind: str, deadline: float, *,
                 render: Callable | None = None, last: tuple | None = None,
                 prelude: bytes = b""):
        self.task_id = task_id
        self.kind = kind
        self.deadline = deadline
        self.render = render  # wait: view -> body bytes; stream: (view, last) -> event bytes
        self.last = last  # stream: the fingerprint of the state it was last sent
        self.prelude = prelude  # stream: what follows the head (retry hint, first event)
        self.event = threading.Event() if kind == "block" else None
        self.sock: socket.socket | None = None
        self.status = "200 OK"
        self.headers: list[tuple[str, str]] = []
        self.out = bytearray()
        self.closing = False
        self.closed = False
        self.done = False  # answered or gone: the checker no longer acts on it
        self.last_write = time.monotonic()


def response_head(status: str, headers, length: int | None = None) -> bytes:
    """The HTTP/1.1 head of a parked answer; the connection closes after it."""
    lines = [f"HTTP/1.1 {status}"]
    for name, value in headers:
        if name.lower() not in ("content-length", "connection", "transfer-encoding"):
            lines.append(f"{name}: {value}")
    lines.append(f"Date: {formatdate(usegmt=True)}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def problem_answer(status: int, title: str, detail: str,
                   retry_after: int | None = None) -> bytes:
    """A whole problem+json answer for a parked waiter that cannot get its status."""
    body = json.dumps({"type": "about:blank", "title": title, "status": status,
                       "detail": detail}).encode()
    headers = [("Content-Type", "application/problem+json"),
               ("X-Content-Type-Options", "nosniff")]
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    return response_head(f"{status} {title.upper()}", headers, len(body)) + body


GONE = object()  # the waited run was purged
UNAVAILABLE = object()  # the waited run could not be read


class Hub:
    """One per process: see the module's docstring."""

    def __init__(self, app: Flask):
        config = app.config
        self.app = app
        self.pid = os.getpid()
        self.capacity = config["WAIT_MAX_WAITERS"]
        self.keepalive = config["EVENTS_KEEPALIVE_SECONDS"]
        self.send_timeout = SEND_TIMEOUT
        self.source = runevents.source_for(config)
        self.recheck = (config["WAIT_RECHECK_SECONDS"] if self.source.kind == "redis"
                        else config["WAIT_POLL_SECONDS"])
        self.lock = threading.Lock()
        self.by_run: dict[str, set[Waiter]] = {}
        self.count = 0
        self.fresh: list[Waiter] = []  # registered since the checker last looked
        self.deadlines: list = []
        self._seq = itertools.count()
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.selector = selectors.DefaultSelector()
        self.stopping = threading.Event()
        self._stop_deadline: float | None = None
        self.threads = [threading.Thread(target=self._check_loop, daemon=True,
                                         name="celery-api-waiting-check"),
                        threading.Thread(target=self._io_loop, daemon=True,
                                         name="celery-api-waiting-io")]
        for thread in self.threads:
            thread.start()
        log.info("waiting hub started: woken by %s, re-check every %.2f s, %d waiters at most",
                 "Redis pub/sub" if self.source.kind == "redis" else "polling the record",
                 self.recheck, self.capacity)

    # --- registration (any thread) ---

    def full(self) -> bool:
        return self.count >= self.capacity

    def register(self, waiter: Waiter) -> None:
        with self.lock:
            self.by_run.setdefault(waiter.task_id, set()).add(waiter)
            self.count += 1
            self.fresh.append(waiter)
            heapq.heappush(self.deadlines, (waiter.deadline, next(self._seq), waiter))
        if self.source.kind == "poll":
            self.source.event.set()

    def unregister(self, waiter: Waiter) -> None:
        with self.lock:
            if waiter.done:
                return
            waiter.done = True
            waiters = self.by_run.get(waiter.task_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self.by_run[waiter.task_id]
            self.count -= 1

    def adopt(self, waiter: Waiter, sock: socket.socket, status: str, headers) -> None:
        """Take a parked connection (gunicorn's main thread, the request handled)."""
        # Non-blocking before the checker can see it: a run finishing now is answered at
        # once, and that answer can reach the I/O loop before the "add" below; written
        # to a blocking socket whose client does not read, it would stop the loop.
        try:
            sock.setblocking(False)
        except OSError:
            pass  # (a socket already failed: the I/O loop drops it on "add")
        waiter.sock, waiter.status, waiter.headers = sock, status, list(headers)
        if waiter.kind == "stream":
            waiter.out += response_head(status, headers) + waiter.prelude
        self.register(waiter)
        self._command(("add", waiter))

    def _command(self, command) -> None:
        self.commands.put(command)
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # the pipe is full: the loop is awake and drains the queue anyway

    # --- the checker thread ---

    def _check_loop(self) -> None:
        next_recheck = time.monotonic() + self.recheck
        while not self.stopping.is_set():
            now = time.monotonic()
            with self.lock:
                first_deadline = self.deadlines[0][0] if self.deadlines else now + 1.0
                fresh = bool(self.fresh)
            timeout = 0.0 if fresh else max(0.0, min(next_recheck, first_deadline) - now)
            ids = self.source.wait(min(timeout, 0.5))
            failed = False
            with self.app.app_context():
                try:
                    with self.lock:
                        ids |= {w.task_id for w in self.fresh}
                        self.fresh.clear()
                    if time.monotonic() >= next_recheck:
                        ids |= self._rechecked()
                        next_recheck = time.monotonic() + self.recheck
                    self._wake(ids)
                except Exception:  # noqa: BLE001 - the hub must outlive one bad read
                    log.exception("❌ waiting hub: a check failed; retrying")
                    failed = True
                    db.session.remove()  # (a failed read's transaction: discarded)
                # Deadlines are kept whatever failed above: while the database is down
                # every re-check fails, and the waiters due are answered (503) at them.
                try:
                    self._expire()
                except Exception:  # noqa: BLE001 - as above
                    log.exception("❌ waiting hub: answering the waiters due failed")
                    failed = True
                finally:
                    db.session.remove()
            if failed:
                time.sleep(0.2)
        self.source.close()
        self._answer_all()

    def _waiters_of(self, task_id: str) -> list[Waiter]:
        with self.lock:
            return [w for w in self.by_run.get(task_id, ()) if not w.done]

    def _rechecked(self) -> set[str]:
        """The waited runs whose waiters have something to be told, by one read."""
        with self.lock:
            watched = {task_id: list(ws) for task_id, ws in self.by_run.items()}
        if not watched:
            return set()
        found = runevents.current_fingerprints(list(watched))
        due = set()
        for task_id, waiters in watched.items():
            fp = found.get(task_id)
            if fp is None:  # purged while waited on: its waiters are told so
                due.add(task_id)
                continue
            for w in waiters:
                if w.kind == "block" or (w.kind == "wait" and runstate.is_finished(fp[0])) \
                        or (w.kind == "stream" and fp != w.last):
                    due.add(task_id)
        return due

    def _describe(self, task_id: str):
        """The run's view; ``GONE`` when it was purged while waited; ``UNAVAILABLE``
        when the record cannot be read now (the next wake or the deadline retries)."""
        try:
            return runs.describe(task_id)
        except NotFound:
            return GONE
        except Exception:  # noqa: BLE001 - the database (or a bug): logged, not fatal
            log.exception("❌ waiting hub: could not read %s", task_id)
            db.session.rollback()
            return UNAVAILABLE

    def _wake(self, ids) -> None:
        for task_id in ids:
            waiters = self._waiters_of(task_id)
            parked = [w for w in waiters if w.kind != "block"]
            for w in waiters:
                if w.kind == "block":
                    w.event.set()
            if not parked:
                continue
            view = self._describe(task_id)
            if view is UNAVAILABLE:
                continue  # the next wake, or the deadline, tries again
            if view is GONE:  # purged while waited on: 404 now, streams end
                sends = []
                for w in parked:
                    if w.kind == "wait":
                        self._answer(w, GONE, {}, sends)
                    else:
                        self._end_stream(w, sends)
                self._command(("send", sends))
                continue
            finished = runstate.is_finished(view.status)
            rendered: dict = {}  # one rendering per kind (and last state) for all waiters
            sends: list = []  # handed to the I/O loop at once: one wake for all waiters
            for w in parked:
                if w.kind == "wait" and finished:
                    self._answer(w, view, rendered, sends)
                elif w.kind == "stream":
                    fp = view_fingerprint(view)
                    if fp != w.last:
                        key = ("stream", w.last)
                        if key not in rendered:
                            rendered[key] = w.render(view, w.last)
                        data = rendered[key]
                        w.last = fp
                        sends.append((w, data, finished))
                    elif finished:
                        sends.append((w, b"", True))
                    if finished:
                        self.unregister(w)
            if sends:
                self._command(("send", sends))
            db.session.rollback()  # end the read: the next one sees new commits

    def _answer(self, w: Waiter, view, rendered: dict, sends: list) -> None:
        """Answer a ``wait`` waiter and forget it. ``rendered`` shares the body among
        the waiters of one run (the head is each one's own: its ``X-Request-ID``);
        ``sends`` collects the answer for the caller to hand over with the others."""
        if view is GONE:
            data = problem_answer(404, "Not Found", f"Task {w.task_id} was purged from "
                                  "the history while it was waited on.")
        elif view is UNAVAILABLE:
            data = problem_answer(503, "Service Unavailable", "The run's record cannot be "
                                  "read now; send the request again.", retry_after=5)
        else:
            if "wait" not in rendered:
                rendered["wait"] = w.render(view)
            body = rendered["wait"]
            data = response_head(w.status, w.headers, len(body)) + body
        self.unregister(w)
        sends.append((w, data, True))

    def _expire(self) -> None:
        now = time.monotonic()
        due: list[Waiter] = []
        with self.lock:
            while self.deadlines and self.deadlines[0][0] <= now:
                _, _, w = heapq.heappop(self.deadlines)
                if not w.done:
                    due.append(w)
            if len(self.deadlines) > 2 * self.count + DEADLINES_SLACK:
                # Mostly waiters already answered or gone (clients that hang up, a
                # stream's deadline 10 minutes away): forgotten now, not at their
                # deadlines, with their buffers. Linear, once per that many waiters.
                self.deadlines = [entry for entry in self.deadlines if not entry[2].done]
                heapq.heapify(self.deadlines)
        views: dict = {}  # one read and one rendering per run for the waiters due now
        rendered: dict = {}
        sends: list = []
        for w in due:
            if w.kind == "block":
                w.event.set()
            elif w.kind == "wait":
                if w.task_id not in views:
                    views[w.task_id] = self._describe(w.task_id)
                    rendered[w.task_id] = {}
                self._answer(w, views[w.task_id], rendered[w.task_id], sends)
            else:  # a stream at its longest: it ends, the client reconnects
                self._end_stream(w, sends)
        if sends:
            self._command(("send", sends))

    def _answer_all(self) -> None:
        """Stopping: every parked waiter is answered with the current state."""
        with self.lock:
            waiters = [w for ws in self.by_run.values() for w in ws if not w.done]
        sends: list = []
        with self.app.app_context():
            try:
                views: dict = {}
                rendered: dict = {}
                for w in waiters:
                    if w.kind == "block":
                        w.event.set()
                    elif w.kind == "wait":
                        if w.task_id not in views:
                            views[w.task_id] = self._describe(w.task_id)
                            rendered[w.task_id] = {}
                        self._answer(w, views[w.task_id], rendered[w.task_id], sends)
                    else:
                        self._end_stream(w, sends)
            except Exception:  # noqa: BLE001 - the rest are closed by the I/O loop
                log.exception("❌ waiting hub: could not answer every waiter at stop")
            finally:
                db.session.remove()
        if sends:
            self._command(("send", sends))
        self._command(("stop",))

    def _end_stream(self, w: Waiter, sends: list) -> None:
        """Forget a stream and queue its end (the connection closes once its events are
        written): its run finished or was purged, its longest time came, or the hub stops."""
        self.unregister(w)
        sends.append((w, b"", True))

    # --- the I/O thread ---

    def _io_loop(self) -> None:
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        conns: set[Waiter] = set()
        stop = False
        next_keepalive = time.monotonic() + 1.0
        while not (stop and not conns):
            for key, mask in self.selector.select(timeout=1.0 if not stop else 0.1):
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
                    stop = self._run_commands(conns) or stop
                    continue
                w = key.data
                if mask & selectors.EVENT_READ:
                    self._read(w, conns)
                if mask & selectors.EVENT_WRITE and not w.closed:
                    self._flush(w, conns)
            now = time.monotonic()
            if now >= next_keepalive:
                next_keepalive = now + 1.0
                for w in list(conns):
                    if w.out and now - w.last_write >= self.send_timeout:
                        # Answered, but its client reads nothing: its socket and
                        # buffer are not held for as long as it stays connected.
                        log.info("dropped a waiter of %s: its client took nothing for "
                                 "%.0f s", w.task_id, now - w.last_write)
                        self._drop(w, conns)
                    elif w.kind == "stream" and not w.closing \
                            and now - w.last_write >= self.keepalive:
                        self._write(w, KEEPALIVE_COMMENT, False, conns)
            if stop and conns and now > self._stop_deadline:
                for w in list(conns):
                    self._drop(w, conns)
        self.selector.close()

    def _run_commands(self, conns: set[Waiter]) -> bool:
        stop = False
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return stop
            if command[0] == "add":
                w = command[1]
                try:
                    w.sock.setblocking(False)
                    self.selector.register(w.sock, selectors.EVENT_READ, w)
                except (OSError, ValueError):
                    w.closed = True
                    self.unregister(w)
                    continue
                conns.add(w)
                self._flush(w, conns)
            elif command[0] == "send":
                for w, data, close in command[1]:
                    self._write(w, data, close, conns)
            else:
                stop = True
                if self._stop_deadline is None:
                    self._stop_deadline = time.monotonic() + 5.0

    def _read(self, w: Waiter, conns: set[Waiter]) -> None:
        data = recv_nowait(w.sock, 4096)
        if data is None:
            return
        if not data:  # the client went away
            self._drop(w, conns)
        # anything else (a pipelined request) is discarded: the connection closes after

    def _write(self, w: Waiter, data: bytes, close: bool, conns: set[Waiter]) -> None:
        """Queue ``data`` for ``w`` and write what its socket takes. A client still more
        than ``MAX_BUFFERED`` bytes behind on earlier writes is dropped instead: the
        bound is on falling behind, not on the size of one answer or event (a run with
        a large result is sent whole to a client that reads it)."""
        if w.closed:
            return
        if len(w.out) > MAX_BUFFERED:
            log.info("dropped a waiter of %s: its client reads too slowly", w.task_id)
            self._drop(w, conns)
            return
        if not w.out:  # the send timeout counts from now
            w.last_write = time.monotonic()
        w.out += data
        w.closing = w.closing or close
        self._flush(w, conns)

    def _flush(self, w: Waiter, conns: set[Waiter]) -> None:
        while w.out:
            try:
                sent = w.sock.send(w.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(w, conns)
                return
            del w.out[:sent]
            w.last_write = time.monotonic()
        if not w.out and w.closing:
            try:
                w.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._drop(w, conns)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if w.out else 0)
        try:
            self.selector.modify(w.sock, events, w)
        except (KeyError, ValueError, OSError):
            pass

    def _drop(self, w: Waiter, conns: set[Waiter]) -> None:
        if w.closed:
            return
        w.closed = True
        conns.discard(w)
        try:
            self.selector.unregister(w.sock)
        except (KeyError, ValueError, OSError):
            pass
        try:
            w.sock.close()
        except OSError:
            pass
        self.unregister(w)

    # --- stopping ---

    def shutdown(self, timeout: float) -> None:
        """Answer every parked waiter with the current state, end the streams, and wait
        (at most ``timeout`` seconds) until the answers are written."""
        self._stop_deadline = time.monotonic() + timeout
        self.stopping.set()
        if self.source.kind == "poll":
            self.source.event.set()
        for thread in self.threads:
            thread.join(max(0.0, self._stop_deadline - time.monotonic()))


def hub_for(app: Flask) -> Hub:
    """This process's hub, started on first use (after gunicorn forks its workers)."""
    hub = app.extensions.get("celery_api.waiting")
    if hub is not None and hub.pid == os.getpid():
        return hub
    with _hubs_lock:
        hub = app.extensions.get("celery_api.waiting")
        if hub is None or hub.pid != os.getpid():
            hub = app.extensions["celery_api.waiting"] = Hub(app)
            _hubs.append(hub)
    return hub


def shutdown_all(timeout: float) -> None:
    """A worker stops: every hub of this process answers its waiters (see Hub.shutdown)."""
    for hub in [h for h in _hubs if h.pid == os.getpid()]:
        hub.shutdown(timeout)

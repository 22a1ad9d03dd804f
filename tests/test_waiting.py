"""Waiting for a run (README "Waiting for a run"): GET /tasks/{id}?wait=N and the event
stream GET /tasks/{id}/events, under real gunicorn with one worker and ONE thread, on a
stack with Redis notifications and on one without (RabbitMQ broker, no REDIS_URL: the
poller). Runs are held by ``acme.steps``, which reports step n once the test releases it.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import threading
import time
import uuid

import pytest
import redis
import requests

from tests.support import (
    LiveServer,
    LogLines,
    Worker,
    answered,
    build_app,
    create_key,
    make_config,
    stored_run,
    wait_for,
)

# With Redis notifications, and without (RabbitMQ and no REDIS_URL: the poller).
STACKS = pytest.mark.parametrize(
    "stack", [("redis", "sqlite"), ("rabbitmq", "sqlite")], indirect=True,
    ids=["redis-pubsub", "rabbitmq-poller"])

UNKNOWN = "00000000-0000-4000-8000-000000000000"


@pytest.fixture(scope="module")
def api(stack):
    """gunicorn on the stack: one worker process with a single request thread."""
    server = LiveServer(stack.env(), stack.folder / "waiting-gunicorn.log",
                        WEB_CONCURRENCY="1", GUNICORN_THREADS="1",
                        CELERY_API_EVENTS_KEEPALIVE_SECONDS="1").start()
    yield server
    server.stop()


def problem(response, status: int, *fragments: str) -> None:
    """``response`` (requests) is a problem+json of ``status`` naming ``fragments``."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    for fragment in fragments:
        assert fragment in response.text


def results_redis(stack) -> redis.Redis:
    return redis.Redis.from_url(stack.config["CELERY"]["result_backend"])


class Held:
    """A run of acme.steps the test releases step by step."""

    def __init__(self, stack, api, steps: int = 3, **options):
        self.key = uuid.uuid4().hex
        self.redis = results_redis(stack)
        self.api = api
        launched = requests.post(f"{api.url}/api/celery/tasks/launch", timeout=10, json={
            "task_type": "acme.steps", "params": {"key": self.key, "steps": steps},
            **options})
        assert launched.status_code == 202, launched.text
        self.task_id = launched.json()["task_id"]
        self.url = f"{api.url}/api/celery/tasks/{self.task_id}"

    def status(self) -> dict:
        return requests.get(self.url, timeout=10).json()

    def started(self) -> None:
        wait_for(lambda: self.status()["status"] in ("STARTED", "PROGRESS"), timeout=30,
                 message=f"{self.task_id} to start")

    def release(self, steps: int = 1) -> None:
        self.redis.incrby(f"acme:steps:{self.key}", steps)

    def finish(self) -> None:
        self.release(100)


def raw_get(api, path: str, headers: str = "") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=30)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def has_data(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    finally:
        sock.setblocking(True)


def parse_answer(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def iter_events(lines):
    """The events of an SSE body (an iterable of decoded lines, read as they come), as
    dicts; comments (keep-alives) are skipped."""
    current: dict = {}
    for line in lines:
        if not line:
            if "data" in current:  # (a block with only ``retry:`` is no event)
                yield current
            current = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(": ")
        current[name] = value


def events_of(lines) -> list[dict]:
    """The events of a whole SSE body."""
    return list(iter_events(lines))


@STACKS
def test_wait_answers_when_the_run_finishes(stack, api):
    held = Held(stack, api, steps=1)
    held.started()
    waiter = raw_get(api, f"/api/celery/tasks/{held.task_id}?wait=30")
    # A request sent after it is answered by the one thread: the waiter's request was
    # handled (parked) before, and the run, not released yet, has not finished.
    assert held.status()["status"] in ("STARTED", "PROGRESS")
    assert not has_data(waiter)
    held.finish()
    raw = answered(lambda: read_all(waiter), 30)
    waiter.close()
    code, body = parse_answer(raw)
    head = raw.partition(b"\r\n\r\n")[0].decode().lower()
    assert code == 200
    assert "content-type: application/json" in head
    assert "x-content-type-options: nosniff" in head  # the app's headers, as always
    assert body["status"] == "SUCCESS" and body["result"] == {"steps": 1}
    # The same document as without waiting (the end's time may still be the result
    # backend's, which saw the end a moment before the record did).
    now = held.status()
    assert {k: v for k, v in body.items() if k not in ("finished_at", "runtime")} == \
        {k: v for k, v in now.items() if k not in ("finished_at", "runtime")}
    woken_by = "Redis pub/sub" if stack.kind == "redis" else "polling the record"
    assert f"waiting hub started: woken by {woken_by}" in api.log_path.read_text()


@STACKS
def test_wait_times_out_with_the_current_state(stack, api):
    held = Held(stack, api, steps=1)
    held.started()
    try:
        response = answered(lambda: requests.get(held.url, params={"wait": 1}, timeout=30))
        assert response.status_code == 200
        assert response.json()["status"] in ("STARTED", "PROGRESS")
    finally:
        held.finish()


@STACKS
def test_a_finished_run_and_wait_zero_answer_at_once(stack, api):
    held = Held(stack, api, steps=1)
    held.started()
    now = answered(lambda: requests.get(held.url, params={"wait": 0}, timeout=10), 10)
    assert now.json()["status"] in ("STARTED", "PROGRESS")
    held.finish()
    wait_for(lambda: held.status()["status"] == "SUCCESS")
    done = answered(lambda: requests.get(held.url, params={"wait": 30}, timeout=10), 10)
    assert done.json()["status"] == "SUCCESS"


@STACKS
def test_fifty_waiters_hold_no_thread(stack, api):
    """One gunicorn thread, fifty parked waiters, and a request sent after them is
    answered while they still wait: had any waiter held the thread, the request
    (queued behind them) would get no answer before their waits ended."""
    held = Held(stack, api, steps=1)
    held.started()
    path = f"/api/celery/tasks/{held.task_id}?wait=30"
    waiters = [raw_get(api, path) for _ in range(50)]
    other = Held(stack, api, steps=1)  # a launch and status reads, queued behind them
    status = answered(lambda: requests.get(other.url, timeout=30), 20)
    assert status.status_code == 200
    assert not any(has_data(w) for w in waiters)  # all fifty are still waiting
    held.finish()
    other.finish()
    for sock in waiters:
        code, body = parse_answer(read_all(sock))
        sock.close()
        assert code == 200 and body["status"] == "SUCCESS"


@STACKS
def test_event_stream_follows_progress_to_the_end(stack, api):
    held = Held(stack, api, steps=3)
    held.started()
    with requests.get(f"{held.url}/events", stream=True, timeout=30) as stream:
        assert stream.status_code == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert stream.headers["X-Accel-Buffering"] == "no"
        lines = stream.iter_lines(chunk_size=1, decode_unicode=True)
        seen: list[dict] = []
        for event in iter_events(lines):
            seen.append(event)
            data = json.loads(event["data"])
            if data["status"] == "SUCCESS":
                continue
            progress = (data["progress"] or {}).get("current") or 0
            if progress < 3:
                held.release()  # the next step, once this one was heard
    progress = [json.loads(e["data"])["progress"] for e in seen]
    steps = [p["current"] for p in progress if p]
    # Steps 1 and 2 were each heard before the next was released; step 3 may come
    # folded into the final state (each event carries the whole current state).
    assert steps == sorted(steps) and steps[:2] == [1, 2]
    assert {e["event"] for e in seen[1:-1]} <= {"status", "progress"}
    final = json.loads(seen[-1]["data"])
    assert seen[-1]["event"] == "status" and final["status"] == "SUCCESS"
    assert final["result"] == {"steps": 3}
    assert len({e["id"] for e in seen}) == len(seen)  # each event names its own state


@STACKS
def test_an_idle_stream_gets_keep_alive_comments(stack, api):
    held = Held(stack, api, steps=1)
    held.started()
    stream = raw_get(api, f"/api/celery/tasks/{held.task_id}/events")
    seen = b""
    try:
        # Nothing happens to the run: within CELERY_API_EVENTS_KEEPALIVE_SECONDS (1 s
        # here) the stream says it is alive.
        while b"\n: keep-alive\n" not in seen:
            data = answered(lambda: stream.recv(65536), 20)
            assert data, "the stream ended"
            seen += data
    finally:
        held.finish()
        stream.close()


@STACKS
def test_last_event_id_resumes_without_repeats(stack, api):
    held = Held(stack, api, steps=2)
    held.started()
    held.release()
    wait_for(lambda: (held.status()["progress"] or {}).get("current") == 1)
    first = raw_get(api, f"/api/celery/tasks/{held.task_id}/events")
    head = b""
    while not events_of(head.partition(b"\r\n\r\n")[2].decode().split("\n")):
        head += first.recv(65536)
    first.close()  # the client goes away
    (event,) = events_of(head.partition(b"\r\n\r\n")[2].decode().split("\n"))
    assert json.loads(event["data"])["progress"]["current"] == 1
    # Reconnecting with that id: the state it names is not sent again; the next is.
    again = raw_get(api, f"/api/celery/tasks/{held.task_id}/events",
                    f"Last-Event-ID: {event['id']}\r\n")
    held.release()
    body = read_all(again).partition(b"\r\n\r\n")[2].decode()
    again.close()
    events = events_of(body.split("\n"))
    assert event["id"] not in {e["id"] for e in events}
    assert json.loads(events[-1]["data"])["status"] == "SUCCESS"
    # An EventSource reconnecting after the end: 204, nothing more will come.
    end = requests.get(f"{held.url}/events", headers={"Last-Event-ID": events[-1]["id"]},
                       timeout=10)
    assert end.status_code == 204


@STACKS
def test_errors_404_422_and_the_waiter_cap(stack, api, tmp_path):
    base = f"{api.url}/api/celery/tasks"
    problem(requests.get(f"{base}/{UNKNOWN}", params={"wait": 5}, timeout=10), 404)
    problem(requests.get(f"{base}/{UNKNOWN}/events", timeout=10), 404)
    for bad in ("-1", "31", "soon"):
        refused = requests.get(f"{base}/{UNKNOWN}", params={"wait": bad}, timeout=10)
        problem(refused, 422, "wait")
    problem(requests.get(f"{base}/not-a-uuid/events", timeout=10), 422, "task_id")
    if stack.kind != "redis":
        return  # the rest does not depend on how notifications travel
    # A small server: 2 waiters at most. A client that goes away frees its place.
    small = LiveServer(stack.env(), tmp_path / "small.log", WEB_CONCURRENCY="1",
                       GUNICORN_THREADS="1", CELERY_API_MAX_WAITERS="2").start()
    try:
        held = Held(stack, small, steps=1)
        held.started()
        path = f"/api/celery/tasks/{held.task_id}"
        parked = [raw_get(small, f"{path}?wait=30"), raw_get(small, f"{path}/events")]

        def third():
            answer = requests.get(f"{small.url}{path}", params={"wait": 30}, timeout=40)
            return [answer] if answer.status_code == 503 else None

        (refused,) = wait_for(third, timeout=20, message="the third waiter to be refused")
        problem(refused, 503, "CELERY_API_MAX_WAITERS")
        assert refused.headers["Retry-After"] == "1"
        for sock in parked:
            sock.close()
        # Both places are free again once their clients' disconnects are noticed (a
        # moment after the close: two waiters sent at once may still meet a full hub).
        def park_two():
            socks = [raw_get(small, f"{path}?wait=30"), raw_get(small, f"{path}?wait=30")]
            other = answered(lambda: requests.get(f"{small.url}{path}", timeout=10), 20)
            assert other.status_code == 200
            if any(has_data(sock) for sock in socks):  # answered at once: refused
                for sock in socks:
                    sock.close()
                return None
            return socks

        again = wait_for(park_two, timeout=30, interval=0.2,
                         message="both places to be free again")
        # A stopping worker answers its parked waiters with the current state.
        small.process.send_signal(signal.SIGTERM)
        for sock in again:
            code, body = parse_answer(read_all(sock))
            assert code == 200 and body["status"] in ("STARTED", "PROGRESS")
            sock.close()
        held.finish()
    finally:
        small.stop()


@STACKS
def test_outside_gunicorn_the_wait_blocks_boundedly(stack):
    """The Flask test client (no connection to park): the view waits in its thread."""
    client = stack.app.test_client()
    launched = client.post("/api/celery/tasks/launch", json={
        "task_type": "acme.steps", "params": {"key": uuid.uuid4().hex, "steps": 1}})
    task_id = launched.get_json()["task_id"]
    key = client.get(f"/api/celery/tasks/{task_id}").get_json()["params"]["key"]
    timed_out = client.get(f"/api/celery/tasks/{task_id}?wait=1")
    assert timed_out.status_code == 200
    assert timed_out.get_json()["status"] not in ("SUCCESS", "FAILURE", "REVOKED")
    results_redis(stack).incrby(f"acme:steps:{key}", 1)
    done = client.get(f"/api/celery/tasks/{task_id}?wait=30")
    assert done.get_json()["status"] == "SUCCESS"
    stream = client.get(f"/api/celery/tasks/{task_id}/events")
    events = events_of(stream.get_data(as_text=True).split("\n"))
    assert [json.loads(e["data"])["status"] for e in events] == ["SUCCESS"]


@STACKS
def test_authentication_is_required(stack, tmp_path):
    config = make_config(tmp_path, stack.config["CELERY"]["broker_url"], AUTH="required")
    config["CELERY"]["result_backend"] = stack.config["CELERY"]["result_backend"]
    app = build_app(config)
    client = app.test_client()
    for path in (f"/api/celery/tasks/{UNKNOWN}?wait=5", f"/api/celery/tasks/{UNKNOWN}/events"):
        refused = client.get(path)
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    key = create_key(app, "reader", "read")
    found = client.get(f"/api/celery/tasks/{UNKNOWN}/events",
                       headers={"Authorization": f"Bearer {key}"})
    assert found.status_code == 404


@pytest.mark.parametrize("stack", [("redis", "sqlite")], indirect=True, ids=["redis-pubsub"])
def test_a_lost_notification_costs_at_most_the_recheck(stack, api, tmp_path):
    """Every notification of a run is lost: its worker publishes them to a Redis no API
    listens to (REDIS_URL of a server that is not there). Its waiter is answered all the
    same, by the API's periodic re-check (CELERY_API_WAIT_RECHECK_SECONDS, 1 s)."""
    env = dict(stack.env(), REDIS_URL="redis://127.0.0.1:9/0")  # nothing listens there
    deaf = Worker(env, f"deaf-{uuid.uuid4().hex[:6]}@{os.uname().nodename}",
                  tmp_path / "deaf.log", queues="parked", concurrency=1)
    deaf.start(stack.celery)
    try:
        held = Held(stack, api, steps=1, queue="parked")
        held.started()
        waiter = raw_get(api, f"/api/celery/tasks/{held.task_id}?wait=30")
        assert held.status()["status"] in ("STARTED", "PROGRESS")  # it is parked
        held.finish()
        code, body = parse_answer(answered(lambda: read_all(waiter), 20))
        waiter.close()
        assert code == 200 and body["status"] == "SUCCESS"
        assert "run notification for" in deaf.log_text()  # each one was lost
    finally:
        deaf.stop()


def test_notifications_travel_through_the_embedded_redis(embedded_broker, tmp_path):
    """The embedded default's Redis is a Unix socket (redis+socket://): notifications
    go through it too: a publish is heard by a subscriber."""
    from celery_api.services import runevents

    app = build_app(make_config(tmp_path, embedded_broker.url))
    url = runevents.notify_url(app.config)
    assert url.startswith("unix://")
    source = runevents.RedisSource(url)
    try:
        assert source.wait(0.1) == set()  # subscribed
        with app.app_context():
            runevents.publish(UNKNOWN)
        heard = wait_for(lambda: source.wait(0.5), timeout=10, message="the notification")
        assert heard == {UNKNOWN}
    finally:
        source.close()


def test_deadlines_are_kept_while_the_database_is_down(redis_server, tmp_path):
    """The database stops answering while clients wait: the hub's periodic re-check
    fails at each turn, and a waiter whose deadline comes meanwhile is answered at it
    (503 problem+json: its run cannot be read), not held until the database is back."""
    import sqlite3

    import sqlalchemy as sa

    from celery_api import waiting
    from celery_api.extensions import db

    app = build_app(make_config(tmp_path, redis_server.url.replace("/0", "/4"),
                                WAIT_RECHECK_SECONDS=0.1))
    task_id = stored_run(app, "STARTED")
    down = threading.Event()

    def refuse(cursor, statement, parameters, context):
        if down.is_set() and "task_runs" in statement:
            raise sqlite3.OperationalError("unable to open database file")
        return None  # executed as usual

    with app.app_context():
        sa.event.listen(db.engine, "do_execute", refuse)
    messages, logger = LogLines(), logging.getLogger("celery_api.waiting")
    logger.addHandler(messages)
    hub = waiting.Hub(app)
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        headers = [("Content-Type", "application/json")]
        watched = waiting.Waiter(task_id, "wait", time.monotonic() + 3600,
                                 render=lambda view: b"{}")
        hub.adopt(watched, pairs[0][1], "200 OK", headers)  # a run the re-check reads
        down.set()
        wait_for(lambda: any("a check failed" in line for line in messages.lines),
                 timeout=20, message="a re-check to fail")
        due = waiting.Waiter(task_id, "wait", time.monotonic() + 0.2,
                             render=lambda view: b"{}")
        hub.adopt(due, pairs[1][1], "200 OK", headers)
        client = pairs[1][0]
        client.settimeout(15)
        raw = answered(lambda: read_all(client), 15)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), raw
        assert b"content-type: application/problem+json" in head.lower()
        assert json.loads(body)["status"] == 503
        assert not has_data(pairs[0][0])  # the other one waits on (its deadline is far)
    finally:
        down.clear()
        hub.shutdown(5)
        logger.removeHandler(messages)
        with app.app_context():
            sa.event.remove(db.engine, "do_execute", refuse)
        for pair in pairs:
            for sock in pair:
                sock.close()


def test_an_answer_sent_before_its_socket_is_taken_never_blocks_the_hub(
        redis_server, tmp_path):
    """The run finishes as its waiter parks: the checker answers it before the I/O loop
    has taken the socket (still blocking, as gunicorn leaves it). Held at that window,
    with a client that never reads its (large) answer: the I/O loop must not block on
    it, and another waiter is answered."""
    from celery_api import waiting

    app = build_app(make_config(tmp_path, redis_server.url.replace("/0", "/5")))
    task_id = stored_run(app, "SUCCESS")
    hub = waiting.Hub(app)
    headers = [("Content-Type", "application/json")]
    stuck = waiting.Waiter(task_id, "wait", time.monotonic() + 30,
                           render=lambda view: b"x" * (8 * waiting.MAX_BUFFERED))
    answered_first = threading.Event()
    command, register = hub._command, hub.register

    def note_the_answer(item):
        command(item)
        if item[0] == "send" and any(w is stuck for w, _data, _close in item[1]):
            answered_first.set()

    def register_then_hold(waiter):
        register(waiter)
        if waiter is stuck:  # the socket is handed to the I/O loop only after this
            assert answered_first.wait(20), "the checker never answered the waiter"

    hub._command, hub.register = note_the_answer, register_then_hold
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        hub.adopt(stuck, pairs[0][1], "200 OK", headers)  # its client never reads
        other = waiting.Waiter(task_id, "wait", time.monotonic() + 30,
                               render=lambda view: b"{}")
        hub.adopt(other, pairs[1][1], "200 OK", headers)
        pairs[1][0].settimeout(15)
        code, body = parse_answer(answered(lambda: read_all(pairs[1][0]), 15))
        assert code == 200 and body == {}
    finally:
        for pair in pairs:  # (unblocks a stuck I/O loop: its peer is gone)
            for sock in pair:
                sock.close()
        hub.shutdown(5)


def test_an_answer_larger_than_the_backlog_bound_is_sent_whole(redis_server, tmp_path):
    """A waiter's answer bigger than MAX_BUFFERED (a run with a large result, params or
    error) reaches a client that reads it, whole: the bound drops a client that falls
    behind, and one answer written at once is not a client falling behind. Held at the
    window: the client starts reading once the hub's first write has filled its socket."""
    from celery_api import waiting

    app = build_app(make_config(tmp_path, redis_server.url.replace("/0", "/6")))
    task_id = stored_run(app, "SUCCESS")
    hub = waiting.Hub(app)
    body = b"x" * (4 * waiting.MAX_BUFFERED)
    waiter = waiting.Waiter(task_id, "wait", time.monotonic() + 30, render=lambda view: body)
    client, server = socket.socketpair()
    stream_client, stream_server = socket.socketpair()
    try:
        hub.adopt(waiter, server, "200 OK", [("Content-Type", "application/json")])

        def first_write_done(w, sock):
            if w.closed:
                return True
            try:  # the loop waits to write the rest
                return bool(hub.selector.get_key(sock).events & selectors.EVENT_WRITE)
            except (KeyError, ValueError):
                return False

        wait_for(lambda: first_write_done(waiter, server), timeout=20,
                 message="the hub's first write")
        client.settimeout(15)
        raw = answered(lambda: read_all(client), 15)
        head, _, received = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert f"Content-Length: {len(body)}".encode() in head
        assert len(received) == len(body)
        # A stream whose client reads nothing: still that far behind when the next
        # event comes, it is dropped.
        running = stored_run(app, "STARTED")
        stream = waiting.Waiter(running, "stream", time.monotonic() + 30,
                                last=("STARTED", None))
        hub.adopt(stream, stream_server, "200 OK", [("Content-Type", "text/event-stream")])
        hub._command(("send", [(stream, body, False)]))
        wait_for(lambda: first_write_done(stream, stream_server), timeout=20,
                 message="the stream's first write")
        assert not stream.closed  # one event larger than the bound: sent
        hub._command(("send", [(stream, b": more\n\n", False)]))
        wait_for(lambda: stream.closed, timeout=20, message="the slow reader to be dropped")
    finally:
        for sock in (client, server, stream_client, stream_server):
            sock.close()
        hub.shutdown(5)


def test_waiters_gone_long_before_their_deadline_are_not_kept(redis_server, tmp_path):
    """Clients that open a stream (deadline: CELERY_API_EVENTS_MAX_SECONDS away) and
    hang up at once, over and over: each one's waiter is forgotten when its client goes,
    not kept (with its buffers) until its deadline would have come."""
    import gc
    import weakref

    from celery_api import waiting

    app = build_app(make_config(tmp_path, redis_server.url.replace("/0", "/7")))
    task_id = stored_run(app, "STARTED")
    hub = waiting.Hub(app)
    gone = []
    try:
        for _ in range(200):
            client, server = socket.socketpair()
            waiter = waiting.Waiter(task_id, "stream", time.monotonic() + 3600,
                                    last=("STARTED", None), prelude=b"x" * 4096)
            hub.adopt(waiter, server, "200 OK", [("Content-Type", "text/event-stream")])
            client.close()  # the client hangs up
            gone.append(weakref.ref(waiter))
        del waiter, server
        wait_for(lambda: hub.count == 0, timeout=20, message="every hang-up noticed")

        def forgotten():  # (but a few, DEADLINES_SLACK at most: forgotten in bulk)
            gc.collect()
            return sum(ref() is not None for ref in gone) <= waiting.DEADLINES_SLACK

        wait_for(forgotten, timeout=20, message="the waiters gone to be forgotten")
    finally:
        hub.shutdown(5)


def test_a_client_that_takes_nothing_is_dropped_after_the_send_timeout(redis_server,
                                                                         tmp_path):
    """An answered waiter whose client never reads (its socket full, the rest of the
    answer queued) is dropped once it has taken nothing for the send timeout, as nginx's
    send_timeout: its socket and buffer are not held for as long as it stays connected
    (answered waiters no longer count against CELERY_API_MAX_WAITERS)."""
    from celery_api import waiting

    app = build_app(make_config(tmp_path, redis_server.url.replace("/0", "/6")))
    task_id = stored_run(app, "SUCCESS")
    hub = waiting.Hub(app)
    hub.send_timeout = 1.0
    body = b"x" * (4 * waiting.MAX_BUFFERED)
    waiter = waiting.Waiter(task_id, "wait", time.monotonic() + 60, render=lambda view: body)
    client, server = socket.socketpair()
    try:
        hub.adopt(waiter, server, "200 OK", [("Content-Type", "application/json")])
        wait_for(lambda: waiter.done, timeout=20, message="the waiter answered")
        assert not waiter.closed or waiter.out  # answered, not all of it taken
        wait_for(lambda: waiter.closed, timeout=20,
                 message="the client that reads nothing to be dropped")
        client.settimeout(15)
        received = answered(lambda: read_all(client), 15)  # what it took, then the end
        assert received.startswith(b"HTTP/1.1 200 ") and len(received) < len(body)
    finally:
        client.close()
        server.close()
        hub.shutdown(5)


def test_waiters_of_a_run_purged_while_waited_on_are_told_at_the_next_recheck(
        redis_server, tmp_path):
    """A run deleted from the history while clients wait on it: a waiter is answered
    404 and a stream ends at the next re-check, not at their deadlines (a stream's is
    CELERY_API_EVENTS_MAX_SECONDS away)."""
    import sqlalchemy as sa

    from celery_api import waiting
    from celery_api.extensions import db
    from celery_api.models import TaskRun

    app = build_app(make_config(tmp_path, redis_server.url.replace("/0", "/7"),
                                WAIT_RECHECK_SECONDS=0.2))
    task_id = stored_run(app, "STARTED")
    hub = waiting.Hub(app)
    wait_client, wait_server = socket.socketpair()
    stream_client, stream_server = socket.socketpair()
    try:
        waiter = waiting.Waiter(task_id, "wait", time.monotonic() + 600,
                                render=lambda view: b"{}")
        stream = waiting.Waiter(task_id, "stream", time.monotonic() + 600,
                                last=("STARTED", None))
        hub.adopt(waiter, wait_server, "200 OK", [("Content-Type", "application/json")])
        hub.adopt(stream, stream_server, "200 OK", [("Content-Type", "text/event-stream")])
        wait_for(lambda: hub.count == 2 and not hub.fresh, timeout=20,
                 message="both parked and seen by the checker")
        assert not has_data(wait_client)  # still running: no answer yet
        with app.app_context():
            db.session.execute(sa.delete(TaskRun).where(TaskRun.id == task_id))
            db.session.commit()
        wait_client.settimeout(15)
        status, body = parse_answer(answered(lambda: read_all(wait_client), 15))
        assert status == 404 and "purged" in body["detail"]
        stream_client.settimeout(15)
        assert answered(lambda: read_all(stream_client), 15).startswith(b"HTTP/1.1 200 ")
        assert hub.count == 0
    finally:
        for sock in (wait_client, wait_server, stream_client, stream_server):
            sock.close()
        hub.shutdown(5)

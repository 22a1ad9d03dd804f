"""The HTTP edge: slow and idle clients, request size limits, strict JSON bodies, bounded
metric labels, security headers, CORS, Host never reflected, /readyz without addresses.

On gunicorn alone (gunicorn.conf.py, via LiveServer) and behind deploy/nginx.conf where
the behaviour comes from the front. How fast answers come is measured (printed here,
recorded in docs/RELIABILITY.md), never asserted: the deadlines below only tell an
answer from a stall.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
import requests

from celery_api.docs import SWAGGER_DIST
from celery_api.services import health
from tests.support import (
    PROBLEM,
    LiveServer,
    Nginx,
    RedisServer,
    answered,
    assert_problem,
    build_app,
    make_config,
    service_env,
)

IDLE_CONNECTIONS = 200
SLOW_CLIENTS = 5
DEADLINE = 5.0  # an answer, not a stall; the latency itself is printed
LIMIT = 1024 * 1024  # CELERY_API_MAX_BODY_BYTES' default, and nginx's client_max_body_size


@pytest.fixture(scope="module")
def gunicorn_alone(tmp_path_factory, redis_server):
    """gunicorn with gunicorn.conf.py as `make serve` runs it, clients straight to it."""
    folder = tmp_path_factory.mktemp("edge-gunicorn")
    config = make_config(folder / "app", redis_server.url.replace("/0", "/6"))
    build_app(config)
    # A short head deadline, so that the test sees a stalled head closed.
    api = LiveServer(service_env(config), folder / "gunicorn.log",
                     GUNICORN_HEADER_TIMEOUT="2").start()
    yield api.url
    api.stop()


@pytest.fixture(scope="module")
def behind_nginx(tmp_path_factory, redis_server):
    """deploy/nginx.conf in front of gunicorn, as in tests/test_nginx.py, with room for
    a few hundred client connections (events { worker_connections })."""
    folder = tmp_path_factory.mktemp("edge-nginx")
    config = make_config(folder / "app", redis_server.url.replace("/0", "/7"))
    build_app(config)
    api = LiveServer(service_env(config), folder / "gunicorn.log",
                     CELERY_API_TRUSTED_PROXIES="1").start()
    nginx = Nginx(folder, api.port, connections=1024).start()
    yield nginx.url
    nginx.stop()
    api.stop()


@pytest.fixture(params=["gunicorn", "nginx"])
def front(request):
    """The API's base URL: gunicorn alone, then behind nginx."""
    return request.getfixturevalue(
        "gunicorn_alone" if request.param == "gunicorn" else "behind_nginx")


def _address(base: str) -> tuple[str, int]:
    host, port = re.match(r"http://([^:/]+):(\d+)", base).groups()
    return host, int(port)


def _timed_get(url: str) -> float:
    started = time.monotonic()
    response = answered(lambda: requests.get(url, timeout=DEADLINE), deadline=DEADLINE + 1)
    assert response.status_code == 200, response.text
    return time.monotonic() - started


class SlowClients:
    """``idle`` connections that send nothing, and ``slow`` ones that send a request
    head one header line every half second (slowloris), for at most ``seconds``."""

    def __init__(self, address, idle: int, slow: int, seconds: float = 30.0):
        self.address = address
        self.idle = [socket.create_connection(address, timeout=5) for _ in range(idle)]
        self.slow = [socket.create_connection(address, timeout=5) for _ in range(slow)]
        self.stop = threading.Event()
        self.seconds = seconds
        for sock in self.slow:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        self.thread = threading.Thread(target=self._drip, daemon=True)
        self.thread.start()

    def _drip(self):
        deadline = time.monotonic() + self.seconds
        line = 0
        while not self.stop.wait(0.5) and time.monotonic() < deadline:
            line += 1
            for sock in self.slow:
                try:
                    sock.sendall(f"X-Drip-{line}: 1\r\n".encode())
                except OSError:
                    pass  # closed by the server: what a stalled head deserves

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for sock in self.idle + self.slow:
            sock.close()


def test_idle_and_slow_clients_leave_requests_answered(front, request):
    quiet = [_timed_get(f"{front}/api/celery/tasks") for _ in range(3)]
    clients = SlowClients(_address(front), IDLE_CONNECTIONS, SLOW_CLIENTS)
    try:
        time.sleep(0.5)  # every connection accepted, the slow heads started
        loaded = [_timed_get(f"{front}/api/celery/tasks") for _ in range(5)]
        # Later, once gunicorn's 2 s head deadline (set above) has passed for some.
        time.sleep(2.5)
        later = [_timed_get(f"{front}/api/celery/tasks") for _ in range(5)]
    finally:
        clients.close()
    print(f"\n{request.node.name}: quiet {max(quiet) * 1000:.1f} ms max; with "
          f"{IDLE_CONNECTIONS} idle + {SLOW_CLIENTS} slowloris: "
          f"{', '.join(f'{s * 1000:.1f}' for s in loaded + later)} ms")


def test_a_stalled_request_head_is_closed(gunicorn_alone):
    """gunicorn alone closes a connection whose head is not complete within
    GUNICORN_HEADER_TIMEOUT (2 s here): idle from the start, or dribbling."""
    clients = SlowClients(_address(gunicorn_alone), idle=1, slow=1, seconds=30)
    try:
        for sock in clients.idle + clients.slow:
            sock.settimeout(15)

            def closed(sock=sock):
                try:
                    return sock.recv(1024) == b""
                except ConnectionResetError:
                    return True

            assert answered(closed, deadline=20)
    finally:
        clients.close()


def _series(base: str) -> set[str]:
    text = requests.get(f"{base}/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0] for line in text.splitlines()
            if line.startswith(("celery_api_http_requests_total{",
                                "celery_api_http_request_duration_seconds_count{"))}


def _invent(base: str, first: int, count: int) -> None:
    for i in range(first, first + count):
        method = "X" + "".join(chr(65 + (i >> shift) % 26) for shift in (0, 3, 6))
        requests.request(method, f"{base}/api/celery/tasks", timeout=10)
        requests.request(method, f"{base}/nowhere/{i}", timeout=10)
        requests.get(f"{base}/invented/path/{i}?q={i}", timeout=10)
        requests.get(f"{base}/api/celery/tasks/not-a-uuid-{i}", timeout=10)


def test_metric_labels_are_bounded_whatever_clients_send(gunicorn_alone):
    requests.get(f"{gunicorn_alone}/api/celery/tasks", timeout=10)
    before = _series(gunicorn_alone)
    _invent(gunicorn_alone, 0, 5)
    first = _series(gunicorn_alone)
    # What those kinds of request add, once: OTHER x {405, 404} and GET 404 on
    # "unmatched", the task route's 422, and the scrape itself (counter and histogram).
    assert len(first - before) <= 10, sorted(first - before)
    _invent(gunicorn_alone, 5, 50)  # 50 more invented methods, 150 more paths
    after = _series(gunicorn_alone)
    assert after == first, sorted(after - first)
    text = " ".join(after)
    assert 'method="OTHER"' in text and 'endpoint="unmatched"' in text
    assert 'method="X' not in text and "invented" not in text and "nowhere" not in text


def _raw(base: str, head: bytes, body: bytes = b"") -> bytes:
    """Send ``head`` (and ``body``) on a fresh connection; whatever comes back."""
    with socket.create_connection(_address(base), timeout=DEADLINE) as sock:
        sock.sendall(head + body)
        received = b""
        while True:
            try:
                part = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not part:
                break
            received += part
        return received


def _problem_status(response) -> int:
    assert response.headers["Content-Type"] == PROBLEM, response.text[:200]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert len(response.content) < 1000  # an answer, not an echo of what was sent
    body = response.json()
    assert body["detail"] and body["status"] == response.status_code
    return response.status_code


@pytest.mark.parametrize("length", [20_000, 1_000_000])
def test_a_long_request_line_is_414(front, length):
    response = requests.get(f"{front}/api/celery/history?task_type={'a' * length}",
                            timeout=DEADLINE)
    assert _problem_status(response) == 414


@pytest.mark.parametrize("headers", [
    {"X-Big": "a" * 20_000},
    {"X-Big": "a" * 1_000_000},
    {f"X-Many-{i}": "a" * 200 for i in range(200)},
], ids=["20k-header", "1m-header", "200-headers"])
def test_large_headers_are_431(front, headers):
    response = requests.get(f"{front}/healthz", headers=headers, timeout=DEADLINE)
    assert _problem_status(response) == 431


def _chunks(total: int, piece: int = 65536):
    yield b'{"task_type": "'
    for _ in range(total // piece):
        yield b"a" * piece
    yield b'"}'


@pytest.mark.parametrize("size", [2 * LIMIT, 10 * LIMIT])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_over_the_limit_is_a_413_the_client_receives(front, framing, size):
    body = _chunks(size) if framing == "chunked" else b"".join(_chunks(size))
    response = answered(lambda: requests.post(
        f"{front}/api/celery/tasks/launch", data=body, timeout=30,
        headers={"Content-Type": "application/json"}), deadline=40)
    assert _problem_status(response) == 413


def test_a_chunked_body_within_the_limit_is_read_whole(front):
    body = b'{"task_type": "no.such.task", "params": {"pad": "' + b"a" * 900_000 + b'"}}'
    response = requests.post(f"{front}/api/celery/tasks/launch", timeout=DEADLINE,
                             data=iter([body[:400_000], body[400_000:]]),
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "no.such.task" in response.json()["detail"]


@pytest.mark.parametrize("content_type", [
    "application/x-json", "text/json", "application/json; charset=latin-1",
    "application/json; charset=utf-16", "application/merge-patch+json",
    "application/problem+json", "text/plain", "application/x-www-form-urlencoded",
])
def test_only_plain_json_bodies_are_accepted(client, content_type):
    response = client.post("/api/celery/tasks/launch", data=b'{"task_type": "x"}',
                           content_type=content_type)
    assert_problem(response, 415, "application/json")


@pytest.mark.parametrize("content_type", [
    "application/json", "application/json; charset=utf-8", "application/json;charset=UTF-8",
    "Application/JSON",
])
def test_json_in_utf8_is_accepted(client, content_type):
    response = client.post("/api/celery/tasks/launch", data=b'{"task_type": "no.such.task"}',
                           content_type=content_type)
    assert_problem(response, 400, "no.such.task")


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "gzip, identity"])
def test_compressed_bodies_are_415(client, encoding):
    import gzip

    response = client.post("/api/celery/tasks/launch", data=gzip.compress(b'{"x": 1}'),
                           content_type="application/json",
                           headers={"Content-Encoding": encoding})
    assert_problem(response, 415, "Content-Encoding")
    assert response.headers["Accept-Encoding"] == "identity"


@pytest.mark.parametrize("path", [
    "/healthz", "/readyz", "/metrics", "/api/openapi.json", "/api/celery/tasks",
    "/api/celery/tasks/00000000-0000-4000-8000-000000000000", "/nowhere",
])
def test_security_headers_on_every_response(client, path):
    response = client.get(path, headers={"Origin": "https://elsewhere.example"})
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["X-Frame-Options"] == "DENY"
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert not [h for h in response.headers.keys() if h.lower().startswith("access-control")]


def test_the_docs_page_needs_nothing_its_policy_refuses(client):
    """Swagger UI works under its CSP: no inline script or style, every script and
    stylesheet from this origin (checked in Chromium by hand: docs/RELIABILITY.md)."""
    page = client.get("/api/docs/")
    assert page.status_code == 200
    policy = page.headers["Content-Security-Policy"]
    for directive in ("script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"):
        assert directive in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert "'sha256-" in policy  # the logo's <style>, below
    html = page.get_data(as_text=True)
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)  # no inline script
    assert "<style" not in html and " style=" not in html and "javascript:" not in html
    for asset in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert asset.startswith("/api/docs/")
        fetched = client.get(asset)
        assert fetched.status_code == 200, asset
        assert fetched.headers["X-Content-Type-Options"] == "nosniff"
    # The <style> elements Swagger UI's scripts create are allowed by their hashes.
    for script in SWAGGER_DIST.glob("*.js"):
        for style in re.findall(r'createElement\("style",null,"([^"]*)"\)', script.read_text()):
            digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
            assert f"'sha256-{digest}'" in policy, (script.name, style)
    init = client.get("/api/docs/docs.js")
    assert init.mimetype == "text/javascript" and "SwaggerUIBundle" in init.get_data(True)
    assert 'data-spec-url="/api/openapi.json"' in html


CONSOLE = "https://console.example.com"


@pytest.fixture(scope="module")
def cors_client(tmp_path_factory, redis_server):
    os.environ["CELERY_API_CORS_ORIGINS"] = f" {CONSOLE}/ , http://localhost:3000"
    try:
        app = build_app(make_config(tmp_path_factory.mktemp("cors"), redis_server.url))
    finally:
        del os.environ["CELERY_API_CORS_ORIGINS"]
    assert app.config["CORS_ORIGINS"] == [CONSOLE, "http://localhost:3000"]
    return app.test_client()


def _cors_headers(response) -> dict:
    return {k: v for k, v in response.headers.items() if k.lower().startswith("access-control")}


def test_cors_preflight_answered_for_configured_origins_only(cors_client, client):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = cors_client.options("/api/celery/tasks/launch",
                                  headers={"Origin": CONSOLE, **preflight})
    assert allowed.status_code == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == CONSOLE
    assert "POST" in allowed.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in allowed.headers["Access-Control-Allow-Headers"]
    assert "Origin" in allowed.headers["Vary"]
    for origin in ("https://evil.example", "https://console.example.com.evil.example",
                   "null", "http://console.example.com"):
        refused = cors_client.options("/api/celery/tasks/launch",
                                      headers={"Origin": origin, **preflight})
        assert not _cors_headers(refused), origin
    # Not configured (the default): no CORS header for anyone.
    assert not _cors_headers(client.options("/api/celery/tasks/launch",
                                            headers={"Origin": CONSOLE, **preflight}))


def test_cors_responses_name_the_configured_origin(cors_client):
    response = cors_client.get("/api/celery/tasks", headers={"Origin": CONSOLE})
    assert response.headers["Access-Control-Allow-Origin"] == CONSOLE
    assert "Location" in response.headers["Access-Control-Expose-Headers"]
    other = cors_client.get("/api/celery/tasks", headers={"Origin": "https://evil.example"})
    assert other.status_code == 200 and not _cors_headers(other)
    assert "Origin" in other.headers["Vary"]


@pytest.mark.parametrize("path", ["/api/docs", "//api/docs/", "/api/docs/?x=1", "/"])
def test_the_host_header_is_never_reflected_into_a_redirect(front, path):
    """Werkzeug builds trailing-slash redirects from the Host header (behind nginx, from
    X-Forwarded-Host, which nginx takes from Host); nginx's own redirect of /tasks-api
    (path "/" here: the bare prefix) would too: each Location is a path."""
    prefix = urlsplit(front).path  # "" on gunicorn, "/tasks-api" behind nginx
    if path == "/":
        target = prefix or "/"
    elif path.startswith("//"):
        target = "/" + prefix + path
    else:
        target = prefix + path
    head = f"GET {target} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    answer = _raw(front, head.encode()).decode("latin-1")
    status = int(answer.split(" ", 2)[1])
    location = re.search(r"(?im)^location: *(\S+)", answer)
    assert status in (200, 301, 308, 404) and "evil.example" not in answer, answer[:500]
    if location:
        assert location.group(1).startswith("/") and not location.group(1).startswith("//")


def test_launch_location_is_a_path_whatever_the_host(gunicorn_alone):
    response = requests.post(f"{gunicorn_alone}/api/celery/tasks/launch", timeout=10,
                             headers={"Host": "evil.example"},
                             json={"task_type": "acme.add", "params": {"a": 1, "b": 2}})
    assert response.status_code == 202, response.text
    assert response.headers["Location"] == f"/api/celery/tasks/{response.json()['task_id']}"


def test_readyz_names_dependencies_without_their_addresses(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        # Authentication required, no key: the open view (a read key adds the details).
        app = build_app(make_config(tmp_path / "app", server.url, AUTH="required"))
        client = app.test_client()
        up = client.get("/readyz").get_json()
        assert set(up["checks"]) == {"database", "broker", "result_backend"}
        assert all(set(c) == {"status", "latency_ms"} for c in up["checks"].values())
        server.stop()
        down = client.get("/readyz")
        assert down.status_code == 503
        text = down.get_data(as_text=True)
        assert str(server.port) not in text and "127.0.0.1" not in text
        assert str(tmp_path) not in text and "redis://" not in text
        assert down.get_json()["checks"]["broker"]["error"].isidentifier()  # a class name
        with app.app_context():
            ready, details = health.readiness_details()
        assert not ready and str(server.port) in details["checks"]["broker"]["error"]
    finally:
        server.stop()

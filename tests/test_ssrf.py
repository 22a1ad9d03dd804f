"""The SSRF guard of webhook URLs (celery_api.ssrf): the address rules, the allowlist,
one resolution whose address is the one connected to (DNS that changes between the
check and the connection, injected), redirects not followed. A real HTTP receiver on
127.0.0.1 stands in for the endpoint."""

from __future__ import annotations

import pytest
import urllib3

from celery_api import ssrf
from tests.support import WebhookReceiver


class Flipping:
    """A resolver whose answer changes after its first call (DNS rebinding)."""

    def __init__(self, *answers: list[str]):
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        return self.answers[min(self.calls, len(self.answers)) - 1]


@pytest.fixture(scope="module")
def receiver():
    server = WebhookReceiver()
    yield server
    server.stop()


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1/hook", "loopback"),
    ("http://127.9.9.9:8080/hook", "loopback"),
    ("http://[::1]/hook", "loopback"),
    ("http://[::ffff:127.0.0.1]/hook", "loopback"),
    ("http://10.0.0.7/hook", "private"),
    ("http://192.168.1.1/hook", "private"),
    ("http://172.16.0.1/hook", "private"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata"),
    ("http://169.254.10.10/hook", "link-local"),
    ("http://[fe80::1]/hook", "link-local"),
    ("http://224.0.0.1/hook", "multicast"),
    ("http://0.0.0.0/hook", "unspecified"),
    ("http://240.0.0.1/hook", "reserved"),
    ("http://100.64.0.1/hook", "non-public"),
    # IPv6 forms that embed a private IPv4 address (6to4, Teredo, NAT64), and a
    # special-purpose IPv4 network some Python versions call global.
    ("http://[2002:7f00:1::]/hook", "loopback address 127.0.0.1 .embedded"),
    ("http://[2002:a9fe:a9fe::]/hook", "cloud metadata address 169.254.169.254 .embedded"),
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/hook", "loopback address 127.0.0.1"),
    ("http://[64:ff9b::a00:1]/hook", "private address 10.0.0.1 .embedded"),
    ("http://192.0.0.8/hook", "special-purpose network 192.0.0.0/24"),
    ("http://[2002:5db8:d822::1]/hook", "special-purpose network 2002::/16"),
])
def test_addresses_that_are_not_public_are_refused(url, reason):
    with pytest.raises(ssrf.Refused, match=reason):
        ssrf.check(url)


def test_a_name_that_resolves_to_loopback_is_refused():
    # The real system resolver: localhost is 127.0.0.1 (and ::1).
    with pytest.raises(ssrf.Refused, match="'localhost' resolves to a loopback address"):
        ssrf.check("http://localhost:8000/hook")


def test_one_bad_address_among_good_ones_refuses_the_name():
    resolver = Flipping(["93.184.216.34", "10.0.0.1"])
    with pytest.raises(ssrf.Refused, match="private address 10.0.0.1"):
        ssrf.check("https://hooks.example.com/x", resolve=resolver)


@pytest.mark.parametrize("url, message", [
    ("ftp://93.184.216.34/x", "only http and https"),
    ("file:///etc/passwd", "only http and https"),
    ("http:///nohost", "no host"),
    ("http://user:pw@93.184.216.34/x", "credentials"),
    ("http://93.184.216.34:99999/x", "not a valid URL"),
])
def test_malformed_or_other_scheme_urls_are_refused(url, message):
    with pytest.raises(ssrf.Refused, match=message):
        ssrf.check(url)


def test_a_public_address_passes_and_is_pinned():
    target = ssrf.check("https://hooks.example.com/in?x=1",
                        resolve=Flipping(["93.184.216.34", "2606:2800:220:1::1"]))
    assert (target.scheme, target.host, target.port, target.path, target.address) == (
        "https", "hooks.example.com", 443, "/in?x=1", "93.184.216.34")
    assert target.host_header == "hooks.example.com"


def test_dns_that_changes_after_the_check_is_never_asked_again():
    """Rebinding: public at the check, loopback a moment later. The guard resolves once;
    the target keeps the checked address, which is what the connection uses."""
    resolver = Flipping(["93.184.216.34"], ["127.0.0.1"])
    target = ssrf.check("http://rebind.example.com/hook", resolve=resolver)
    assert target.address == "93.184.216.34"
    assert resolver.calls == 1


def test_the_connection_goes_to_the_checked_address_with_the_host_name(receiver):
    """An allowed name whose DNS flips after the check: the request reaches the address
    checked (the receiver on 127.0.0.1), with the URL's name and port in Host."""
    path = receiver.plan("/pinned")
    resolver = Flipping(["127.0.0.1"], ["203.0.113.9"])
    allowed = ssrf.parse_allowed([f"receiver.test:{receiver.port}"])
    target = ssrf.check(f"http://receiver.test:{receiver.port}/pinned", allowed, resolver)
    answer = ssrf.post(target, b"{}", {"Content-Type": "application/json"}, timeout=5)
    assert answer.status == 200 and resolver.calls == 1
    [request] = receiver.at(path.split(str(receiver.port))[1])
    assert request["headers"]["Host"] == f"receiver.test:{receiver.port}"


def test_redirects_are_not_followed(receiver):
    receiver.plan("/moved", statuses=[302], headers={"Location": receiver.url("/elsewhere")})
    target = ssrf.check(receiver.url("/moved"), ssrf.parse_allowed([receiver.host]))
    answer = ssrf.post(target, b"{}", {}, timeout=5)
    assert answer.status == 302
    assert receiver.at("/elsewhere") == []


def test_the_allowlist_opens_a_host_or_a_host_and_port_only():
    allowed = ssrf.parse_allowed(["127.0.0.1:8080", "Internal.Example", "::1"])
    assert allowed == {("127.0.0.1", 8080), ("internal.example", None), ("::1", None)}
    assert ssrf.check("http://127.0.0.1:8080/x", allowed).address == "127.0.0.1"
    with pytest.raises(ssrf.Refused, match="loopback"):
        ssrf.check("http://127.0.0.1:8081/x", allowed)  # another port of the host
    assert ssrf.check("http://[::1]:9/x", allowed).host_header == "[::1]:9"
    internal = ssrf.check("http://internal.example/x", allowed,
                          resolve=Flipping(["10.1.1.1"]))
    assert internal.address == "10.1.1.1"
    with pytest.raises(ValueError, match="host or host:port"):
        ssrf.parse_allowed(["bad:port:entry"])


@pytest.fixture(scope="module")
def tls_receiver(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for receiver.test,
    recording the SNI name each connection asked for."""
    import http.server
    import shutil
    import ssl
    import subprocess
    import threading

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is needed to make the test certificate (apt-get install openssl)")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=receiver.test",
                    "-addext", "subjectAltName=DNS:receiver.test"],
                   check=True, capture_output=True)
    names: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args):
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], cert, names
    server.shutdown()
    server.server_close()


def test_https_connects_to_the_checked_address_with_sni_and_the_certificate_of_the_name(
        tls_receiver, monkeypatch):
    port, cert, names = tls_receiver
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the test certificate only
    allowed = ssrf.parse_allowed(["receiver.test", "impostor.test"])
    target = ssrf.check(f"https://receiver.test:{port}/in", allowed, Flipping(["127.0.0.1"]))
    assert ssrf.post(target, b"{}", {}, timeout=5).status == 204
    assert names[-1] == "receiver.test"  # SNI is the URL's name, not the address
    # The same address under another name: the certificate does not match, refused.
    other = ssrf.check(f"https://impostor.test:{port}/in", allowed, Flipping(["127.0.0.1"]))
    with pytest.raises(urllib3.exceptions.SSLError):
        ssrf.post(other, b"{}", {}, timeout=5)


def test_an_internationalized_host_is_idna_encoded_for_the_check_host_and_sni():
    resolver = Flipping(["93.184.216.34"])
    target = ssrf.check("http://Пример.example:8080/hook", resolve=resolver)
    assert target.host == "xn--e1afmkfd.example"
    assert target.host_header == "xn--e1afmkfd.example:8080"
    # An allowlist entry names the host as written, and matches it encoded.
    allowed = ssrf.parse_allowed(["пример.example"])
    assert ssrf.check("http://пример.example/in", allowed, Flipping(["127.0.0.1"])).host \
        == "xn--e1afmkfd.example"
    with pytest.raises(ssrf.Refused, match="not a valid internationalized name"):
        ssrf.check("http://a\u3002\u3002b/", resolve=resolver)


@pytest.fixture
def dripping():
    """A receiver that answers one byte at a time, each a fraction of the timeout the
    test uses apart, for far longer than that timeout (a slowloris answer); records
    whether it got to send the whole answer."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    state = {"finished": False, "stop": threading.Event()}
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n" + b"x" * 40

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            try:
                for byte in answer:
                    conn.sendall(bytes([byte]))
                    if state["stop"].wait(0.05):  # the drip's pace, not a wait for a state
                        return
                state["finished"] = True
            except OSError:
                return  # the client hung up: what the deadline is for

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], state
    state["stop"].set()
    listener.close()
    thread.join(10)


def test_one_deadline_bounds_the_whole_attempt_not_each_read(dripping):
    """Every byte arrives well within the timeout, the answer as a whole does not:
    the attempt ends at its deadline, before the receiver has sent everything."""
    port, state = dripping
    target = ssrf.check(f"http://127.0.0.1:{port}/drip", ssrf.parse_allowed(["127.0.0.1"]))
    with pytest.raises(ssrf.DeadlineExceeded):
        ssrf.post(target, b"{}", {}, timeout=0.5)
    assert not state["finished"]

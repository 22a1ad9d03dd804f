"""The SSRF guard of webhook URLs: which URLs may be called, and calling the address
that was checked.

A webhook URL is chosen by a client; without a guard it would make this service call
its own network (a database admin port, a cloud metadata endpoint) on the client's
behalf. The rules:

- only ``http`` and ``https``, a host, no user info;
- the host is resolved once, and *every* address it resolves to must be public: a
  loopback, private, link-local, multicast, unspecified, reserved or otherwise
  non-global address (which includes the metadata endpoints 169.254.169.254 and
  fd00:ec2::254) refuses the URL. IPv6 addresses that embed an IPv4 one (IPv4-mapped,
  6to4, Teredo, NAT64) are judged by that IPv4 address too. Besides Python's
  ``ipaddress`` flags (which changed across patch versions), an explicit list of
  special-purpose networks (``DENIED``, from the IANA registries) is refused;
- the request then connects to the first checked address (never resolving again, so
  a DNS answer that changes between the check and the connection cannot point it
  elsewhere), with the URL's host name in ``Host`` and, for https, in the TLS SNI
  and the certificate check;
- redirects are not followed (a 3xx is an answer like any other);
- one deadline bounds the whole attempt (connect, sending, the answer's status line,
  headers and body): a receiver dripping a byte at a time cannot hold it past
  ``timeout`` (the socket is shut down when the deadline passes);
- an internationalized host name is IDNA-encoded (``xn--``) before it is checked,
  resolved, sent in ``Host`` and in the TLS SNI;
- ``CELERY_API_WEBHOOK_ALLOWED_HOSTS`` (``host`` or ``host:port``, comma separated)
  lets chosen hosts through the address check; they are still resolved once and
  called at the address resolved.

The resolver is injected (``resolve``) so the tests can change DNS under the guard.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import urllib3

Resolver = Callable[[str, int], list[str]]
SCHEMES = {"http": 80, "https": 443}
# The cloud metadata endpoints (AWS, GCP, Azure, ...; AWS's IPv6 one): named as such.
METADATA = frozenset({ipaddress.ip_address("169.254.169.254"),
                      ipaddress.ip_address("fd00:ec2::254")})
READ_LIMIT = 1024  # bytes of a receiver's answer kept (the error column)
# Special-purpose networks (IANA IPv4 and IPv6 registries) that are never called,
# whatever this Python's ipaddress.is_global says.
DENIED = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.31.196.0/24", "192.52.193.0/24",
    "192.88.99.0/24", "192.168.0.0/16", "192.175.48.0/24", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64",
    "2001::/23", "2001:db8::/32", "2002::/16", "3fff::/20", "5f00::/16", "fc00::/7",
    "fe80::/10", "fec0::/10", "ff00::/8"))
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class Refused(ValueError):
    """A URL the guard does not call; the message says why."""


def system_resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the system resolver), in its order."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Refused(f"host {host!r} does not resolve: {exc}") from None
    addresses: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        if sockaddr[0] not in addresses:
            addresses.append(sockaddr[0])
    return addresses


def parse_allowed(entries: Iterable[str]) -> frozenset[tuple[str, int | None]]:
    """``CELERY_API_WEBHOOK_ALLOWED_HOSTS`` entries as (host, port or None)."""
    allowed = set()
    for entry in entries:
        entry = entry.strip().lower()
        if not entry:
            continue
        try:  # a bare IPv6 address (a bracketed one, with or without a port, is below)
            allowed.add((str(ipaddress.IPv6Address(entry)), None))
            continue
        except ValueError:
            pass
        parts = urlsplit(f"//{entry}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"CELERY_API_WEBHOOK_ALLOWED_HOSTS: bad entry {entry!r}: use "
                             "host or host:port") from None
        if not parts.hostname:
            raise ValueError(f"CELERY_API_WEBHOOK_ALLOWED_HOSTS: bad entry {entry!r}: use "
                             "host or host:port")
        try:  # as the checked URLs' hosts are: an internationalized name IDNA-encoded
            host = ascii_host(parts.hostname)
        except Refused as exc:
            raise ValueError(f"CELERY_API_WEBHOOK_ALLOWED_HOSTS: bad entry {entry!r}: "
                             f"{exc}") from None
        allowed.add((host, port))
    return frozenset(allowed)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries: IPv4-mapped, 6to4, Teredo (server
    and client), NAT64 (64:ff9b::/96)."""
    found = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def blocked_reason(address: str) -> str | None:
    """Why ``address`` may not be called, or None for a public address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        for inner in embedded_ipv4(ip):
            reason = blocked_reason(str(inner))
            if reason is not None:
                return f"{reason} (embedded in {ip})"
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    if ip in METADATA:
        return f"cloud metadata address {ip}"
    # The most specific name first: Python counts loopback and link-local as private too.
    for label, flag in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                        ("multicast", ip.is_multicast), ("unspecified", ip.is_unspecified),
                        ("reserved", ip.is_reserved), ("private", ip.is_private)):
        if flag:
            return f"{label} address {ip}"
    for network in DENIED:
        if ip.version == network.version and ip in network:
            return f"non-public address {ip} (special-purpose network {network})"
    if not ip.is_global:
        return f"non-public address {ip}"
    return None


@dataclass(frozen=True)
class Target:
    """A URL that passed the guard, and the address it will be called at."""

    scheme: str
    host: str  # the URL's host name (Host header, TLS SNI and certificate check)
    port: int
    path: str  # path and query
    address: str  # the checked address the connection goes to

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == SCHEMES[self.scheme] else f"{host}:{self.port}"


def split(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of an http(s) URL, or Refused."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Refused(f"not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise Refused("only http and https URLs are called")
    if not parts.hostname:
        raise Refused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise Refused("credentials in the URL are not accepted (use the signature)")
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    return scheme, ascii_host(parts.hostname.lower()), port or SCHEMES[scheme], path


def ascii_host(host: str) -> str:
    """``host`` as it goes on the wire: an internationalized name IDNA-encoded."""
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise Refused(f"host {host!r} is not a valid internationalized name: {exc}") from None


def check(url: str, allowed: frozenset[tuple[str, int | None]] = frozenset(),
          resolve: Resolver = system_resolve) -> Target:
    """Resolve ``url``'s host once and check every address; the Target to call, or
    Refused naming the reason."""
    scheme, host, port, path = split(url)
    try:
        addresses = [str(ipaddress.ip_address(host))]  # a literal address
    except ValueError:
        addresses = resolve(host, port)
    if not addresses:
        raise Refused(f"host {host!r} resolves to no address")
    if (host, None) not in allowed and (host, port) not in allowed:
        for address in addresses:
            reason = blocked_reason(address)
            if reason is not None:
                raise Refused(
                    f"{host!r} resolves to a {reason}; webhooks are only sent to public "
                    "addresses (CELERY_API_WEBHOOK_ALLOWED_HOSTS lets chosen hosts through)")
    return Target(scheme, host, port, path, addresses[0])


@dataclass(frozen=True)
class Answer:
    status: int
    body: str  # the first READ_LIMIT bytes, decoded
    seconds: float


class DeadlineExceeded(urllib3.exceptions.TimeoutError):
    """The whole attempt took longer than its timeout (a receiver answering slowly)."""


class Deadline:
    """Shuts the attempt's socket down when ``seconds`` have passed since it started:
    a blocked read then returns, whatever the receiver is dripping."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                _shut(sock)

    def check(self) -> None:
        if self.expired:
            raise DeadlineExceeded(f"no complete answer within {self.seconds:g} s")


def _shut(sock: socket.socket) -> None:
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def post(target: Target, body: bytes, headers: dict[str, str], timeout: float) -> Answer:
    """POST ``body`` to the checked address of ``target``; never follows a redirect.

    ``timeout`` bounds the whole attempt (connect, send, status line, headers, the
    READ_LIMIT bytes of body kept), not each read; urllib3 errors (refused, timed out,
    TLS) propagate as ``urllib3.exceptions.HTTPError``, an attempt past its deadline as
    :class:`DeadlineExceeded` (one of them).
    """
    from celery_api.fences.urllib3 import deadline_connection

    limit = urllib3.Timeout(connect=timeout, read=timeout)
    common = {"port": target.port, "timeout": limit, "retries": False, "maxsize": 1}
    if target.scheme == "https":
        pool = urllib3.HTTPSConnectionPool(
            target.address, server_hostname=target.host, assert_hostname=target.host,
            cert_reqs="CERT_REQUIRED", **common)
    else:
        pool = urllib3.HTTPConnectionPool(target.address, **common)
    started = time.monotonic()
    with Deadline(timeout) as deadline:
        pool.ConnectionCls = deadline_connection(pool.ConnectionCls, deadline.watch)
        try:
            try:
                response = pool.urlopen(
                    "POST", target.path, body=body,
                    headers={**headers, "Host": target.host_header}, redirect=False,
                    retries=False, preload_content=False, assert_same_host=False)
                try:
                    data = response.read(READ_LIMIT)
                finally:
                    response.release_conn()
            except (urllib3.exceptions.HTTPError, OSError):
                deadline.check()  # the socket was shut down by the deadline: say so
                raise
            deadline.check()  # a body cut short by the deadline is not an answer
            return Answer(response.status, data.decode("utf-8", "replace"),
                          time.monotonic() - started)
        finally:
            pool.close()

"""The SSRF guard of webhook URLs: which URLs may be called, and calling the address
that was checked.

A webhook URL is chosen by a client; without a guard it would make this service call
its own network (a database admin port, a cloud metadata endpoint) on the client's
behalf. The rules:

- only ``http`` and ``https``, a host, no user info;
- the host is resolved once, and *every* address it resolves to must be public: a
  loopback, private, link-local, multicast, unspecified, reserved or otherwise
  non-global address (which includes the metadata endpoints 169.254.169.254 and
  fd00:ec2::254) refuses the URL. IPv4-mapped IPv6 addresses are judged as IPv4;
- the request then connects to the first checked address (never resolving again, so
  a DNS answer that changes between the check and the connection cannot point it
  elsewhere), with the URL's host name in ``Host`` and, for https, in the TLS SNI
  and the certificate check;
- redirects are not followed (a 3xx is an answer like any other);
- ``CELERY_API_WEBHOOK_ALLOWED_HOSTS`` (``host`` or ``host:port``, comma separated)
  lets chosen hosts through the address check; they are still resolved once and
  called at the address resolved.

The resolver is injected (``resolve``) so the tests can change DNS under the guard.
"""

from __future__ import annotations

import ipaddress
import socket
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
        allowed.add((parts.hostname, port))
    return frozenset(allowed)


def blocked_reason(address: str) -> str | None:
    """Why ``address`` may not be called, or None for a public address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA:
        return f"cloud metadata address {ip}"
    # The most specific name first: Python counts loopback and link-local as private too.
    for label, flag in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                        ("multicast", ip.is_multicast), ("unspecified", ip.is_unspecified),
                        ("reserved", ip.is_reserved), ("private", ip.is_private)):
        if flag:
            return f"{label} address {ip}"
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
    return scheme, parts.hostname.lower(), port or SCHEMES[scheme], path


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


def post(target: Target, body: bytes, headers: dict[str, str], timeout: float) -> Answer:
    """POST ``body`` to the checked address of ``target``; never follows a redirect.

    ``timeout`` bounds the connect and each read; urllib3 errors (refused, timed out,
    TLS) propagate as ``urllib3.exceptions.HTTPError``.
    """
    limit = urllib3.Timeout(connect=timeout, read=timeout)
    common = {"port": target.port, "timeout": limit, "retries": False, "maxsize": 1}
    if target.scheme == "https":
        pool = urllib3.HTTPSConnectionPool(
            target.address, server_hostname=target.host, assert_hostname=target.host,
            cert_reqs="CERT_REQUIRED", **common)
    else:
        pool = urllib3.HTTPConnectionPool(target.address, **common)
    started = time.monotonic()
    try:
        response = pool.urlopen(
            "POST", target.path, body=body, headers={**headers, "Host": target.host_header},
            redirect=False, retries=False, preload_content=False, assert_same_host=False)
        try:
            data = response.read(READ_LIMIT)
        finally:
            response.release_conn()
        return Answer(response.status, data.decode("utf-8", "replace"),
                      time.monotonic() - started)
    finally:
        pool.close()

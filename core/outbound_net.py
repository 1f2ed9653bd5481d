"""Where event endpoints may point, and a POST that goes only there.

An endpoint URL is `https://` to a public address unless private ones are allowed (dev,
tests). The check runs when the endpoint is registered and again on every connection: the
host is resolved, every address must be public, and the connection goes to the address
that was checked (so a DNS answer that changes between check and connect, DNS rebinding,
cannot point a delivery at the internal network). Redirects are never followed."""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from core.errors import InvalidInput

# host, port -> the addresses it resolves to (tests inject their own).
Resolver = Callable[[str, int], list[str]]
MAX_URL = 2000


class UnsafeAddress(InvalidInput):
    """An endpoint URL that points, or now resolves, somewhere deliveries may not go."""


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str


def parse_url(url: object, *, allow_private: bool) -> Target:
    """The parts of an acceptable endpoint URL; UnsafeAddress says why one is not."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise UnsafeAddress(f"url must be a string of at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeAddress(f"malformed url: {exc}") from None
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in schemes:
        raise UnsafeAddress("url must be https:// (http:// only with OUTBOUND_ALLOW_PRIVATE=1)")
    if not parts.hostname:
        raise UnsafeAddress("url has no host")
    if parts.username or parts.password:
        raise UnsafeAddress("url must not carry credentials")
    if parts.fragment:
        raise UnsafeAddress("url must not have a fragment")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    default = 443 if parts.scheme == "https" else 80
    return Target(parts.scheme, parts.hostname, port or default, path)


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def checked_addresses(target: Target, resolver: Resolver, *, allow_private: bool) -> list[str]:
    """The host's addresses, all of them public unless private ones are allowed."""
    try:
        addresses = resolver(target.host, target.port)
    except OSError as exc:
        raise UnsafeAddress(f"cannot resolve {target.host}: {exc}") from None
    if not addresses:
        raise UnsafeAddress(f"{target.host} resolves to no address")
    if not allow_private:
        bad = [a for a in addresses if not _public(a)]
        if bad:
            raise UnsafeAddress(
                f"{target.host} resolves to a non-public address ({bad[0]}); "
                "set OUTBOUND_ALLOW_PRIVATE=1 only in development"
            )
    return addresses


def check_url(url: str, resolver: Resolver, *, allow_private: bool) -> Target:
    target = parse_url(url, allow_private=allow_private)
    checked_addresses(target, resolver, allow_private=allow_private)
    return target


@dataclass(frozen=True)
class Answer:
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, address: str, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, address: str, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        # The certificate is checked against the URL's host name, not the pinned address.
        # typeshed does not declare HTTPSConnection's `_context` (the `context=` it was given).
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    resolver: Resolver,
    allow_private: bool,
    timeout: float,
) -> Answer:
    """POST once to the checked address; any failure is an Answer, never an exception."""
    started = time.monotonic()

    def answer(code: int | None, error: str | None) -> Answer:
        return Answer(code, error, int((time.monotonic() - started) * 1000))

    try:
        target = parse_url(url, allow_private=allow_private)
        address = checked_addresses(target, resolver, allow_private=allow_private)[0]
    except UnsafeAddress as exc:
        return answer(None, f"refused: {exc}")
    conn: http.client.HTTPConnection
    if target.scheme == "https":
        conn = _PinnedHTTPS(
            address, target.host, target.port, timeout=timeout,
            context=ssl.create_default_context(),
        )  # fmt: skip
    else:
        conn = _PinnedHTTP(address, target.host, target.port, timeout=timeout)
    # The timeout bounds the whole try: socket timeouts alone restart with every byte, so an
    # endpoint answering one byte at a time would hold the delivery for ever.
    watchdog = threading.Timer(timeout, _cut, args=(conn,))
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.request(
            "POST",
            target.path,
            body=body,
            headers={**headers, "Content-Type": "application/json", "User-Agent": "Payguard"},
        )
        response = conn.getresponse()
        response.read(65536)  # a little of the answer, never all of an endless one
        return answer(response.status, None if 200 <= response.status < 300 else "non-2xx")
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if time.monotonic() - started >= timeout:
            return answer(None, f"no answer within {timeout:g} s")
        return answer(None, f"{type(exc).__name__}: {exc}"[:500])
    finally:
        watchdog.cancel()
        conn.close()


def _cut(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

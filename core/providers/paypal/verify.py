"""Decide whether an incoming PayPal webhook really comes from PayPal.

Two ways, chosen by ``PAYPAL_VERIFY``:

* ``offline``: fetch PayPal's signing certificate (only from an allow-listed URL, over
  HTTPS, cached in memory) and check the RSA signature over
  ``transmission_id|transmission_time|webhook_id|crc32(raw body)`` ourselves.
* ``postback``: ask PayPal's ``verify-webhook-signature`` API, with the raw body spliced
  into the request unchanged.

Every refusal is one of two errors, so the receiver can answer without guessing:
``InvalidWebhook`` (HTTP 400: the request is bad and never will be good) and
``VerificationUnavailable`` (HTTP 503: we could not decide now; PayPal retries).

No Flask here, and no network I/O at import. ``paypalrestsdk``'s ``WebhookEvent.verify``
is deliberately not used: it breaks on current pyOpenSSL and fetches any URL it is given.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol
from urllib.parse import SplitResult, urlsplit

import requests
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from core.settings import Settings

PAYPAL_CERT_NAME = "messageverificationcerts.paypal.com"
SUPPORTED_AUTH_ALGO = "SHA256withRSA"

H_TRANSMISSION_ID = "paypal-transmission-id"
H_TRANSMISSION_TIME = "paypal-transmission-time"
H_TRANSMISSION_SIG = "paypal-transmission-sig"
H_CERT_URL = "paypal-cert-url"
H_AUTH_ALGO = "paypal-auth-algo"

_SIGNED_HEADERS = (H_TRANSMISSION_ID, H_TRANSMISSION_TIME, H_TRANSMISSION_SIG, H_AUTH_ALGO)
_ALL_HEADERS = (*_SIGNED_HEADERS, H_CERT_URL)

_MAX_URL_LENGTH = 2048
# Printable ASCII without space, backslash or percent: anything else in a certificate URL
# is either an encoding trick or not a PayPal URL.
_URL_CHARS = re.compile(r"[!-~]+")
# RFC 3986 "unreserved" plus "/": PayPal certificate paths need nothing more.
_PATH_CHARS = re.compile(r"[A-Za-z0-9._~/-]*")
_DEFAULT_PORTS = {"https": 443, "http": 80}


class InvalidWebhook(Exception):
    """The webhook is not authentic or not well-formed: answer 400.

    ``cause`` is one of ``"headers"``, ``"cert_url"``, ``"certificate"``, ``"signature"``,
    ``"time"`` (sent outside the accepted window) or ``"body"`` (postback only: the body is
    not one UTF-8 JSON object).
    """

    def __init__(self, cause: str, detail: str = "") -> None:
        super().__init__(f"{cause}: {detail}" if detail else cause)
        self.cause = cause
        self.detail = detail


class VerificationUnavailable(Exception):
    """Verification could not be completed right now (PayPal down, timeout, OAuth): answer 503."""


# PayPal retries a delivery that was not answered 2xx up to 25 times over 3 days; a day more
# covers its last retry and our own outages. A few minutes ahead covers clock skew.
DEFAULT_MAX_AGE = timedelta(days=4)
DEFAULT_MAX_SKEW = timedelta(minutes=5)

_TIME_FORMAT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})")


@dataclass(frozen=True)
class TransmissionWindow:
    """How old, and how far ahead of our clock, a transmission time may be."""

    max_age: timedelta = DEFAULT_MAX_AGE
    max_skew: timedelta = DEFAULT_MAX_SKEW


@dataclass(frozen=True)
class Transmission:
    """A verified transmission: the id exactly as signed (and to be stored) and when it was sent."""

    transmission_id: str
    sent_at: datetime


def _parse_time(value: str) -> datetime:
    if not _TIME_FORMAT.fullmatch(value):
        raise InvalidWebhook("headers", f"{H_TRANSMISSION_TIME} is not an RFC 3339 time")
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidWebhook("headers", f"{H_TRANSMISSION_TIME} is not a real time") from None


def check_transmission_time(
    sent_at: datetime, now: datetime, window: TransmissionWindow = TransmissionWindow()
) -> None:
    """Refuse (``InvalidWebhook("time")``) a transmission sent before ``now - max_age`` or
    after ``now + max_skew``: a leaked transmission older than PayPal's own retries is of no
    use to PayPal and may predate what the transmission table remembers."""
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    if sent_at < now - window.max_age:
        raise InvalidWebhook("time", "transmission is older than the accepted window")
    if sent_at > now + window.max_skew:
        raise InvalidWebhook("time", "transmission time is ahead of our clock")


# --------------------------------------------------------------------------- headers


# Printable ASCII without space: everything PayPal puts in these headers (UUIDs, RFC 3339
# times, base64, URLs, algorithm names) fits. WSGI hands headers over latin-1-decoded, so a
# raw 0xA0 or 0x85 byte arrives as a character that str.strip() would silently remove;
# nothing is stripped here, anything else is refused, so what is verified is what is stored.
_HEADER_VALUE = re.compile(r"[!-~]+")


def _require_headers(headers: Mapping[str, str], names: Iterable[str]) -> dict[str, str]:
    """Case-insensitive lookup of every name, values exactly as received.

    A missing, empty, repeated or non-printable-ASCII value (whitespace included) is a bad
    request: a second copy of a header or padding around it could otherwise be verified in
    one form and stored in another.
    """
    wanted = set(names)
    found: dict[str, str] = {}
    for key, value in headers.items():
        name = str(key).lower()
        if name not in wanted:
            continue
        if name in found:
            raise InvalidWebhook("headers", f"{name} sent more than once")
        if not isinstance(value, str) or not _HEADER_VALUE.fullmatch(value):
            raise InvalidWebhook("headers", f"{name} is not printable ASCII without spaces")
        found[name] = value
    for name in wanted - found.keys():
        raise InvalidWebhook("headers", f"missing {name}")
    return found


# --------------------------------------------------------------------------- cert URL


@dataclass(frozen=True)
class _Prefix:
    scheme: str
    host: str
    port: int
    path: str


def _parse_prefix(prefix: str) -> _Prefix:
    """A configured prefix; ValueError when it could never be matched safely."""
    parts = urlsplit(prefix.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(
            f"certificate URL prefix must be https:// (or http:// in tests): {prefix!r}"
        )
    if not parts.hostname or "@" in parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"certificate URL prefix must be scheme://host[:port]/path/: {prefix!r}")
    path = parts.path or "/"
    # A prefix is a directory: "/certs" must not allow "/certsevil/...".
    if not path.endswith("/"):
        path += "/"
    return _Prefix(scheme, parts.hostname.lower(), parts.port or _DEFAULT_PORTS[scheme], path)


def parse_prefixes(prefixes: Iterable[str]) -> tuple[_Prefix, ...]:
    """Parse configured prefixes once (raises ValueError on a malformed one)."""
    return tuple(_parse_prefix(p) for p in prefixes)


def _split_cert_url(url: str) -> SplitResult:
    if not isinstance(url, str) or not url or len(url) > _MAX_URL_LENGTH:
        raise InvalidWebhook("cert_url", "empty or too long")
    if not _URL_CHARS.fullmatch(url) or "%" in url or "\\" in url:
        raise InvalidWebhook("cert_url", "forbidden characters")
    if "?" in url or "#" in url:
        raise InvalidWebhook("cert_url", "query or fragment")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise InvalidWebhook("cert_url", "unparseable") from None
    if "@" in parts.netloc:
        raise InvalidWebhook("cert_url", "userinfo")
    if not _PATH_CHARS.fullmatch(parts.path):
        raise InvalidWebhook("cert_url", "forbidden path characters")
    if any(seg in ("", ".", "..") for seg in parts.path.split("/")[1:]):
        raise InvalidWebhook("cert_url", "empty, '.' or '..' path segment")
    return parts


def check_cert_url(url: str, prefixes: Iterable[str | _Prefix]) -> None:
    """Refuse (``InvalidWebhook("cert_url")``) a certificate URL outside every prefix.

    Runs before any fetch. Scheme, lowercase host, effective port and path prefix are
    compared on the parsed URL; userinfo, query, fragment, ``.``/``..``/empty segments,
    percent-encoding, backslashes and non-ASCII are refused outright. The scheme must be the
    prefix's own, so plain http is only possible where a prefix says http explicitly.
    """
    parts = _split_cert_url(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise InvalidWebhook("cert_url", "scheme")
    host = (parts.hostname or "").lower()
    port = parts.port or _DEFAULT_PORTS[scheme]
    for raw in prefixes:
        prefix = raw if isinstance(raw, _Prefix) else _parse_prefix(raw)
        if (
            scheme == prefix.scheme
            and host == prefix.host
            and port == prefix.port
            and parts.path.startswith(prefix.path)
            and len(parts.path) > len(prefix.path)
        ):
            return
    raise InvalidWebhook("cert_url", "outside the allowed prefixes")


# --------------------------------------------------------------------------- signature


def expected_message(
    transmission_id: str, transmission_time: str, webhook_id: str, raw_body: bytes
) -> bytes:
    """The exact bytes PayPal signs: id|time|webhook_id|crc32(raw body) as unsigned decimal."""
    crc = zlib.crc32(raw_body) & 0xFFFFFFFF
    return f"{transmission_id}|{transmission_time}|{webhook_id}|{crc}".encode()


@functools.lru_cache(maxsize=64)
def _load_certificate(cert_pem: bytes) -> x509.Certificate:
    # Cached by content: the same few certificates sign every webhook.
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, TypeError):
        raise InvalidWebhook("certificate", "not a PEM certificate") from None


def _names_paypal(cert: x509.Certificate) -> bool:
    names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names += san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        pass
    return any(n.lower() == PAYPAL_CERT_NAME for n in names)


def verify_signature(
    cert_pem: bytes,
    headers: Mapping[str, str],
    raw_body: bytes,
    webhook_id: str,
    now: datetime,
) -> None:
    """Check one transmission against PayPal's certificate; raise ``InvalidWebhook`` if bad.

    The certificate must name ``messageverificationcerts.paypal.com`` (subject CN or SAN DNS)
    and be valid at ``now`` (an aware datetime). Trust in the certificate itself comes from
    where it was fetched (an allow-listed PayPal URL over verified HTTPS), not from a chain
    check here.
    """
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    found = _require_headers(headers, _SIGNED_HEADERS)
    if found[H_AUTH_ALGO].lower() != SUPPORTED_AUTH_ALGO.lower():
        raise InvalidWebhook("headers", f"unsupported {H_AUTH_ALGO}")

    cert = _load_certificate(cert_pem)
    if not _names_paypal(cert):
        raise InvalidWebhook("certificate", f"does not name {PAYPAL_CERT_NAME}")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise InvalidWebhook("certificate", "not valid at this time")
    public_key = cert.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise InvalidWebhook("certificate", "not an RSA key")

    try:
        signature = base64.b64decode(found[H_TRANSMISSION_SIG], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidWebhook("signature", "not base64") from None
    message = expected_message(
        found[H_TRANSMISSION_ID], found[H_TRANSMISSION_TIME], webhook_id, raw_body
    )
    try:
        public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise InvalidWebhook("signature", "does not match") from None


# --------------------------------------------------------------------------- fetching


class CertificateSource(Protocol):
    def get(self, url: str) -> bytes: ...


@dataclass
class _Flight:
    """One fetch in progress, shared by every request that wants the same URL."""

    result: Future[bytes]
    deadline: float  # time.monotonic()


class CertificateFetcher:
    """Fetches PayPal signing certificates from allow-listed URLs and caches them in memory.

    The allowlist is checked before anything touches the network. Redirects are refused,
    bodies over ``max_bytes`` are refused, and only answers that parse as a certificate are
    cached. TLS failures (including an untrusted CA) are ``VerificationUnavailable``: the URL
    is already one of PayPal's, so a bad handshake is our network or CA bundle, not the sender.

    Any unauthenticated request names a URL, so fetches are capped: one in flight per URL
    (others wait for it), ``total_timeout`` seconds for the whole fetch however slowly the
    bytes come, a failed URL is answered from memory for ``failure_ttl`` seconds, and at most
    ``max_new_urls`` fetches start per ``budget_window`` seconds (beyond: unavailable, which
    PayPal retries; cached certificates are unaffected).
    """

    DEFAULT_MAX_NEW_URLS = 10

    def __init__(
        self,
        prefixes: Iterable[str],
        ca_bundle: str | None = None,
        timeout: float = 5.0,
        max_bytes: int = 64 * 1024,
        *,
        total_timeout: float = 10.0,
        failure_ttl: float = 60.0,
        max_new_urls: int = DEFAULT_MAX_NEW_URLS,
        budget_window: float = 600.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._prefixes = parse_prefixes(prefixes)
        if not self._prefixes:
            raise ValueError("at least one certificate URL prefix is required")
        self._verify: str | bool = ca_bundle or True
        self._timeout = min(timeout, total_timeout)
        self._total_timeout = total_timeout
        self._max_bytes = max_bytes
        self._failure_ttl = failure_ttl
        self._max_new_urls = max_new_urls
        self._budget_window = budget_window
        self._monotonic = monotonic
        self._cache: dict[str, bytes] = {}
        self._failures: dict[str, tuple[float, BaseException]] = {}
        self._fetch_starts: deque[float] = deque()
        self._lock = threading.Lock()
        self._inflight: dict[str, _Flight] = {}

    def preload(self, url: str, cert_pem: bytes) -> None:
        """Seed the cache (tests, or a certificate shipped with the deployment)."""
        check_cert_url(url, self._prefixes)
        _load_certificate(cert_pem)
        with self._lock:
            self._cache[url] = cert_pem

    def get(self, url: str) -> bytes:
        """The PEM certificate at ``url``: from the cache, or fetched once and cached.

        Concurrent first requests for one URL share a single fetch and its outcome, so a
        burst of webhooks while PayPal is slow costs one timeout, not one each.
        """
        check_cert_url(url, self._prefixes)
        with self._lock:
            cached = self._cache.get(url)
            if cached is not None:
                return cached
            flight = self._inflight.get(url) or self._start(url)
        try:
            return flight.result.result(timeout=max(0.0, flight.deadline - time.monotonic()))
        except FutureTimeout:
            error = VerificationUnavailable("certificate fetch took too long")
            self._remember_failure(url, error)
            raise error from None
        # Fresh exceptions per waiter: one exception object raised in many threads would have
        # its traceback rewritten by each of them.
        except InvalidWebhook as exc:
            raise InvalidWebhook(exc.cause, exc.detail) from None
        except VerificationUnavailable as exc:
            raise VerificationUnavailable(str(exc)) from None

    def _start(self, url: str) -> _Flight:
        """Under the lock: answer a recent failure from memory, or start one fetch."""
        now = self._monotonic()
        failed = self._failures.get(url)
        if failed is not None and failed[0] > now:
            future: Future[bytes] = Future()
            future.set_exception(failed[1])
            return _Flight(future, time.monotonic())
        while self._fetch_starts and self._fetch_starts[0] <= now - self._budget_window:
            self._fetch_starts.popleft()
        if len(self._fetch_starts) >= self._max_new_urls:
            raise VerificationUnavailable("too many certificate fetches; try again later")
        self._fetch_starts.append(now)
        flight = _Flight(Future(), time.monotonic() + self._total_timeout)
        self._inflight[url] = flight
        # Its own thread, so the deadline holds however the server paces its bytes; the
        # thread itself ends at the next read after the deadline.
        threading.Thread(
            target=self._run, args=(url, flight), name="paypal-cert-fetch", daemon=True
        ).start()
        return flight

    def _run(self, url: str, flight: _Flight) -> None:
        try:
            pem = self._fetch(url, flight.deadline)
        except BaseException as exc:
            self._remember_failure(url, exc)
            with self._lock:
                if self._inflight.get(url) is flight:
                    del self._inflight[url]
            flight.result.set_exception(exc)
        else:
            with self._lock:
                self._cache[url] = pem
                self._failures.pop(url, None)
                if self._inflight.get(url) is flight:
                    del self._inflight[url]
            flight.result.set_result(pem)

    def _remember_failure(self, url: str, exc: BaseException) -> None:
        with self._lock:
            self._failures[url] = (self._monotonic() + self._failure_ttl, exc)
            if len(self._failures) > 4 * self._max_new_urls:
                now = self._monotonic()
                for key in [k for k, (until, _) in self._failures.items() if until <= now]:
                    del self._failures[key]

    def _fetch(self, url: str, deadline: float) -> bytes:
        try:
            response = requests.get(
                url,
                verify=self._verify,
                allow_redirects=False,
                stream=True,
                timeout=self._timeout,
                headers={"Accept": "application/x-pem-file, */*"},
            )
        except requests.RequestException as exc:
            raise VerificationUnavailable(
                f"certificate fetch failed: {type(exc).__name__}"
            ) from exc
        with response:
            if response.is_redirect or 300 <= response.status_code < 400:
                raise InvalidWebhook("cert_url", "certificate URL redirects")
            if response.status_code != 200:
                raise VerificationUnavailable(f"certificate fetch answered {response.status_code}")
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > self._max_bytes:
                raise InvalidWebhook("certificate", "too large")
            body = bytearray()
            try:
                for chunk in response.iter_content(chunk_size=8192):
                    if time.monotonic() > deadline:
                        raise VerificationUnavailable("certificate fetch took too long")
                    body += chunk
                    if len(body) > self._max_bytes:
                        raise InvalidWebhook("certificate", "too large")
            except requests.RequestException as exc:
                raise VerificationUnavailable("certificate fetch interrupted") from exc
        pem = bytes(body)
        _load_certificate(pem)
        return pem


class OfflineVerifier:
    """Verify with PayPal's certificate and our own signature check; no PayPal API call."""

    def __init__(
        self,
        webhook_id: str,
        fetcher: CertificateSource,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        window: TransmissionWindow = TransmissionWindow(),
    ) -> None:
        self.webhook_id = webhook_id
        self.fetcher = fetcher
        self.clock = clock
        self.window = window

    def verify(self, headers: Mapping[str, str], raw_body: bytes) -> Transmission:
        """The verified transmission, or ``InvalidWebhook`` / ``VerificationUnavailable``."""
        # All headers first, so a request that cannot verify never causes a fetch.
        found = _require_headers(headers, _ALL_HEADERS)
        sent_at = _parse_time(found[H_TRANSMISSION_TIME])
        cert_pem = self.fetcher.get(found[H_CERT_URL])
        now = self.clock()
        verify_signature(cert_pem, found, raw_body, self.webhook_id, now)
        # After the signature, so a tampered time is reported as the forgery it is.
        check_transmission_time(sent_at, now, self.window)
        return Transmission(found[H_TRANSMISSION_ID], sent_at)


# --------------------------------------------------------------------------- postback


class PostbackVerifier:
    """Verify by asking PayPal's ``/v1/notifications/verify-webhook-signature``.

    OAuth is a plain ``client_credentials`` POST with ``requests`` (so ``api_base`` can be a
    local fake); the token is cached until shortly before it expires. The raw body is
    spliced into the request JSON unchanged, because PayPal checks the CRC of exactly the
    text we send. When ``cert_url_prefixes`` is given, a certificate URL outside them is
    refused here too, as in offline mode.
    """

    _EXPIRY_MARGIN_SECONDS = 60.0

    def __init__(
        self,
        api_base: str,
        client_id: str,
        client_secret: str,
        webhook_id: str,
        timeout: float = 10,
        *,
        cert_url_prefixes: Iterable[str] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        window: TransmissionWindow = TransmissionWindow(),
    ) -> None:
        self.clock = clock
        self.window = window
        self.api_base = api_base.rstrip("/")
        self.webhook_id = webhook_id
        self._auth = (client_id, client_secret)
        self._timeout = timeout
        self._prefixes = parse_prefixes(cert_url_prefixes) if cert_url_prefixes else None
        self._token: str | None = None
        self._token_expires = 0.0
        self._lock = threading.Lock()

    def verify(self, headers: Mapping[str, str], raw_body: bytes) -> Transmission:
        """The verified transmission, or ``InvalidWebhook`` / ``VerificationUnavailable``."""
        found = _require_headers(headers, _ALL_HEADERS)
        sent_at = _parse_time(found[H_TRANSMISSION_TIME])
        if self._prefixes is not None:
            check_cert_url(found[H_CERT_URL], self._prefixes)
        payload = self._payload(found, raw_body)

        token = self._access_token()
        response = self._post_verify(payload, token)
        if response.status_code == 401:
            # The token may have been revoked or expired early: one fresh try, no more.
            self._forget_token(token)
            response = self._post_verify(payload, self._access_token())
            if response.status_code == 401:
                raise VerificationUnavailable("verify-webhook-signature refused our token")
        self._judge(response)
        check_transmission_time(sent_at, self.clock(), self.window)
        return Transmission(found[H_TRANSMISSION_ID], sent_at)

    def _payload(self, found: dict[str, str], raw_body: bytes) -> bytes:
        try:
            event_text = raw_body.decode("utf-8")
            event = json.loads(event_text)
        except (UnicodeDecodeError, ValueError):
            raise InvalidWebhook("body", "not UTF-8 JSON") from None
        # Also what keeps the splice safe: one JSON object and nothing after it, so the body
        # cannot smuggle extra members (a second webhook_id) into the request.
        if not isinstance(event, dict):
            raise InvalidWebhook("body", "not a JSON object")
        fields = json.dumps(
            {
                "auth_algo": found[H_AUTH_ALGO],
                "cert_url": found[H_CERT_URL],
                "transmission_id": found[H_TRANSMISSION_ID],
                "transmission_sig": found[H_TRANSMISSION_SIG],
                "transmission_time": found[H_TRANSMISSION_TIME],
                "webhook_id": self.webhook_id,
            }
        )
        return (fields[:-1] + ', "webhook_event": ' + event_text + "}").encode("utf-8")

    def _access_token(self) -> str:
        with self._lock:
            if self._token and time.monotonic() < self._token_expires:
                return self._token
            try:
                response = requests.post(
                    f"{self.api_base}/v1/oauth2/token",
                    auth=self._auth,
                    data={"grant_type": "client_credentials"},
                    headers={"Accept": "application/json"},
                    timeout=self._timeout,
                )
            except requests.RequestException as exc:
                raise VerificationUnavailable(f"PayPal OAuth failed: {type(exc).__name__}") from exc
            if response.status_code != 200:
                raise VerificationUnavailable(f"PayPal OAuth answered {response.status_code}")
            try:
                body = response.json()
                token = body["access_token"]
                expires_in = float(body.get("expires_in", 300))
            except (ValueError, KeyError, TypeError):
                raise VerificationUnavailable("PayPal OAuth answer unreadable") from None
            if not isinstance(token, str) or not token:
                raise VerificationUnavailable("PayPal OAuth answer has no token")
            self._token = token
            self._token_expires = time.monotonic() + max(
                0.0, expires_in - self._EXPIRY_MARGIN_SECONDS
            )
            return token

    def _forget_token(self, token: str) -> None:
        with self._lock:
            if self._token == token:
                self._token = None

    def _post_verify(self, payload: bytes, token: str) -> requests.Response:
        try:
            return requests.post(
                f"{self.api_base}/v1/notifications/verify-webhook-signature",
                data=payload,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                },
                timeout=self._timeout,
            )
        except requests.RequestException as exc:
            raise VerificationUnavailable(
                f"verify-webhook-signature failed: {type(exc).__name__}"
            ) from exc

    @staticmethod
    def _judge(response: requests.Response) -> None:
        status = response.status_code
        # 408 and 429 say "later", not "bad request".
        if status >= 500 or status in (408, 429):
            raise VerificationUnavailable(f"verify-webhook-signature answered {status}")
        if 400 <= status < 500:
            raise InvalidWebhook("signature", f"verify-webhook-signature answered {status}")
        if status != 200:
            raise VerificationUnavailable(f"verify-webhook-signature answered {status}")
        try:
            verdict = response.json().get("verification_status")
        except (ValueError, AttributeError):
            raise VerificationUnavailable("verify-webhook-signature answer unreadable") from None
        if verdict == "SUCCESS":
            return
        if verdict == "FAILURE":
            raise InvalidWebhook("signature", "PayPal says FAILURE")
        raise VerificationUnavailable(f"verify-webhook-signature answered {verdict!r}")


# --------------------------------------------------------------------------- factory


Verifier = OfflineVerifier | PostbackVerifier


def build_verifier(settings: Settings, clock: Callable[[], datetime] | None = None) -> Verifier:
    """The verifier ``settings.PAYPAL_VERIFY`` asks for; ConfigError if a variable is missing."""
    from core.settings import ConfigError

    def required(name: str) -> str:
        value = getattr(settings, name)
        if not value:
            raise ConfigError(f"configuration error: {name} is required but not set")
        return str(value)

    webhook_id = required("PAYPAL_WEBHOOK_ID")
    window = TransmissionWindow(
        max_age=timedelta(seconds=settings.PAYPAL_TRANSMISSION_MAX_AGE_SECONDS),
        max_skew=timedelta(seconds=settings.PAYPAL_TRANSMISSION_MAX_SKEW_SECONDS),
    )
    clock = clock or (lambda: datetime.now(UTC))
    if settings.PAYPAL_VERIFY == "postback":
        return PostbackVerifier(
            settings.PAYPAL_API_BASE,
            required("PAYPAL_CLIENT_ID"),
            required("PAYPAL_CLIENT_SECRET"),
            webhook_id,
            cert_url_prefixes=settings.cert_url_prefixes,
            clock=clock,
            window=window,
        )
    try:
        fetcher = CertificateFetcher(
            settings.cert_url_prefixes,
            ca_bundle=settings.PAYPAL_CA_BUNDLE,
            max_new_urls=settings.PAYPAL_CERT_FETCH_BUDGET,
        )
    except ValueError as exc:
        raise ConfigError(f"configuration error: PAYPAL_CERT_URL_PREFIXES: {exc}") from None
    return OfflineVerifier(webhook_id, fetcher, clock, window)

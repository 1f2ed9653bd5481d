"""Test and dev stand-ins for PayPal: a signing identity and a tiny local REST server.

Nothing here is imported by ``core``; it exists so tests (and the dev-stack signing demo)
can produce transmissions that verify exactly like PayPal's, without the internet.

Typical use::

    signer = make_signing_cert()                     # RSA key + self-signed PayPal-named cert
    with FakePayPal() as paypal:                     # http://127.0.0.1:<random port>
        cert_url = paypal.install_signing_cert(signer)
        headers = signer.sign("WEBHOOK_ID", raw_body, cert_url)
        # configure PAYPAL_CERT_URL_PREFIXES=paypal.cert_prefix and POST raw_body + headers

    with FakePayPal(webhook_id="WH-1") as paypal:     # postback mode
        paypal.register_event(raw_body)              # verify-webhook-signature says SUCCESS
        ...                                          # for exactly these bytes, else FAILURE

The server counts what it sees (``cert_hits`` per path, ``connections``, ``oauth_hits``,
``verify_hits``, ``verify_requests``) so tests can assert that something was *not* fetched.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import ssl
import tempfile
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from time import sleep
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from core.providers.paypal.verify import PAYPAL_CERT_NAME, expected_message

PAYPAL_CERT_CN = PAYPAL_CERT_NAME
CERTS_PATH = "/v1/notifications/certs/"


# --------------------------------------------------------------------------- signing


def generate_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    """A fresh RSA key (PayPal signs with RSA; 2048 bits is what it uses)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _format_time(value: datetime | str | None) -> str:
    if isinstance(value, str):
        return value
    value = value or datetime.now(UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sign_transmission(
    key: rsa.RSAPrivateKey,
    webhook_id: str,
    raw_body: bytes,
    cert_url: str,
    transmission_id: str | None = None,
    time: datetime | str | None = None,
) -> dict[str, str]:
    """The headers PayPal would send with ``raw_body``, signed with ``key``.

    ``time`` defaults to now (formatted like PayPal, ``2024-08-02T19:34:57Z``); a string is
    used verbatim. ``transmission_id`` defaults to a random UUID.
    """
    transmission_id = transmission_id or str(uuid.uuid4())
    when = _format_time(time)
    message = expected_message(transmission_id, when, webhook_id, raw_body)
    signature = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    return {
        "PAYPAL-TRANSMISSION-ID": transmission_id,
        "PAYPAL-TRANSMISSION-TIME": when,
        "PAYPAL-TRANSMISSION-SIG": base64.b64encode(signature).decode("ascii"),
        "PAYPAL-CERT-URL": cert_url,
        "PAYPAL-AUTH-ALGO": "SHA256withRSA",
        "PAYPAL-AUTH-VERSION": "v2",
        "Content-Type": "application/json",
    }


@dataclass(frozen=True)
class SigningCert:
    """An RSA key and the (self-signed) certificate that carries its public half."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return _pem(self.cert)

    def sign(
        self,
        webhook_id: str,
        raw_body: bytes,
        cert_url: str,
        transmission_id: str | None = None,
        time: datetime | str | None = None,
    ) -> dict[str, str]:
        """``sign_transmission`` with this key."""
        return sign_transmission(self.key, webhook_id, raw_body, cert_url, transmission_id, time)


def make_signing_cert(
    common_name: str = PAYPAL_CERT_CN,
    *,
    key: rsa.RSAPrivateKey | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    san_dns: tuple[str, ...] | None = None,
) -> SigningCert:
    """A self-signed certificate like PayPal's message-verification one.

    Defaults: CN and SAN ``messageverificationcerts.paypal.com``, valid from a day ago for a
    year. Pass another ``common_name`` (SAN follows it unless ``san_dns`` is given; ``()``
    for none) or other validity bounds to build the certificates a verifier must refuse.
    """
    key = key or generate_key()
    now = datetime.now(UTC)
    not_before = not_before or now - timedelta(days=1)
    not_after = not_after or not_before + timedelta(days=365)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    dns = (common_name,) if san_dns is None else san_dns
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False
        )
    return SigningCert(key, builder.sign(key, hashes.SHA256()))


# --------------------------------------------------------------------------- TLS


class LocalCA:
    """A throwaway certificate authority for HTTPS on 127.0.0.1.

    ``ca.write_bundle(dir)`` gives the path to pass as ``ca_bundle``/``PAYPAL_CA_BUNDLE``;
    ``ca.server_context()`` gives an ``ssl.SSLContext`` for ``FakePayPal(ssl_context=...)``.
    """

    def __init__(self, name: str = "Payguard Test CA") -> None:
        self.key = generate_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return _pem(self.cert)

    def write_bundle(self, directory: str | os.PathLike[str]) -> str:
        """Write the CA certificate as a PEM bundle in ``directory``; return its path."""
        path = os.path.join(directory, "ca-bundle.pem")
        with open(path, "wb") as f:
            f.write(self.cert_pem)
        return path

    def issue(self, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> tuple[bytes, bytes]:
        """A server certificate for ``hosts`` (IPs or DNS names): ``(cert_pem, key_pem)``."""
        key = generate_key()
        now = datetime.now(UTC)
        alt_names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt_names.append(x509.DNSName(host))
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return _pem(cert), key_pem

    def server_context(self, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> ssl.SSLContext:
        """A server-side ``SSLContext`` presenting a fresh certificate for ``hosts``."""
        cert_pem, key_pem = self.issue(hosts)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as tmp:
            cert_path = os.path.join(tmp, "server.pem")
            key_path = os.path.join(tmp, "server.key")
            with open(cert_path, "wb") as f:
                f.write(cert_pem)
            with open(key_path, "wb") as f:
                f.write(key_pem)
            context.load_cert_chain(cert_path, key_path)
        return context


# --------------------------------------------------------------------------- server


def member_text(document: str, name: str) -> str | None:
    """The exact source text of top-level member ``name`` of a JSON object, or None.

    This is how the fake checks that a client spliced the raw body in unchanged: it compares
    the member's text, not its parsed value.
    """
    decoder = json.JSONDecoder()
    ws = " \t\r\n"

    def skip(i: int) -> int:
        while i < len(document) and document[i] in ws:
            i += 1
        return i

    i = skip(0)
    if document[i : i + 1] != "{":
        return None
    i = skip(i + 1)
    found = None
    while i < len(document) and document[i] != "}":
        key, i = decoder.raw_decode(document, i)
        i = skip(i)
        if document[i : i + 1] != ":":
            return None
        start = i = skip(i + 1)
        _, i = decoder.raw_decode(document, i)
        if key == name:
            found = document[start:i]
        i = skip(i)
        if document[i : i + 1] == ",":
            i = skip(i + 1)
    return found


@dataclass
class _Canned:
    status: int
    body: bytes
    headers: dict[str, str]
    send_length: bool
    delay: float = 0.0


class FakePayPal:
    """A local PayPal REST + certificate server on ``127.0.0.1`` at a random port.

    Routes:

    * ``POST /v1/oauth2/token``: ``client_credentials`` with HTTP basic auth; answers a
      bearer token, or 401 for wrong credentials (``oauth_status`` forces another status).
    * ``POST /v1/notifications/verify-webhook-signature``: needs a live bearer token (401
      otherwise; ``revoke_tokens()`` kills them). Answers ``SUCCESS`` when the posted
      ``webhook_event`` *text* is byte-identical to a ``register_event`` body (ignoring only
      JSON whitespace before and after it) and the posted ``webhook_id`` is ours, else
      ``FAILURE``. ``verify_status`` forces a bare status.
    * ``GET <any path>``: whatever ``serve_cert``/``serve`` put there, else 404. Every GET
      is counted in ``cert_hits[path]``; every TCP connection in ``connections``.

    Use as a context manager (or ``start()``/``stop()``). Pass ``ssl_context`` (e.g.
    ``LocalCA().server_context()``) to serve HTTPS.
    """

    def __init__(
        self,
        *,
        client_id: str = "client-id",
        client_secret: str = "client-secret",
        webhook_id: str = "WEBHOOK_ID",
        token_ttl: int = 32400,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.webhook_id = webhook_id
        self.token_ttl = token_ttl
        self.oauth_status: int | None = None
        self.verify_status: int | None = None
        self.cert_hits: Counter[str] = Counter()
        self.connections = 0
        self.oauth_hits = 0
        self.verify_hits = 0
        self.verify_requests: list[bytes] = []
        self._ssl_context = ssl_context
        self._lock = threading.Lock()
        self._routes: dict[str, _Canned] = {}
        self._events: set[bytes] = set()
        self._tokens: set[str] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # Orders v2 (top-ups): see `orders_create`, `orders_capture`.
        self.orders: dict[str, dict[str, Any]] = {}
        self.create_requests = 0
        self.capture_requests = 0
        self.captures_made = 0
        self.fail_create: tuple[int, dict[str, Any]] | None = None
        self.fail_capture: tuple[int, dict[str, Any]] | None = None
        self.create_delay = 0.0
        self.capture_delays: list[float] = []  # popped per capture request, after capturing
        self.capture_amount: str | None = None  # capture less (or more) than the order asked
        self._answers: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}

    # -- lifecycle

    def start(self) -> FakePayPal:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        if self._ssl_context is not None:
            # Handshake lazily, in the request thread, so a failing client cannot stall accept().
            server.socket = self._ssl_context.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.02,), name="fake-paypal", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakePayPal:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the server first"
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def cert_prefix(self) -> str:
        """The value for ``PAYPAL_CERT_URL_PREFIXES`` that allows this server's certificates."""
        return self.url(CERTS_PATH)

    # -- certificates and other GET answers

    def serve(
        self,
        path: str,
        body: bytes = b"",
        status: int = 200,
        headers: dict[str, str] | None = None,
        send_length: bool = True,
        delay: float = 0.0,
    ) -> str:
        """Answer GET ``path`` with this; return its full URL. ``send_length=False`` streams
        the body without Content-Length (then closes), to test read limits; ``delay`` seconds
        pass before the answer, to make concurrent requests overlap."""
        with self._lock:
            self._routes[path] = _Canned(status, body, dict(headers or {}), send_length, delay)
        return self.url(path)

    def serve_cert(self, path: str, cert_pem: bytes) -> str:
        """Serve a PEM certificate at ``path``; return its URL."""
        return self.serve(path, cert_pem, headers={"Content-Type": "application/x-pem-file"})

    def install_signing_cert(self, signer: SigningCert, name: str = "CERT-fake-paypal") -> str:
        """Serve ``signer``'s certificate under ``/v1/notifications/certs/NAME``; return the URL."""
        return self.serve_cert(CERTS_PATH + name, signer.cert_pem)

    # -- REST state

    def register_event(self, raw_body: bytes) -> None:
        """verify-webhook-signature answers SUCCESS for exactly these bytes."""
        with self._lock:
            self._events.add(bytes(raw_body))

    def revoke_tokens(self) -> None:
        """Make every issued token answer 401, as an expired one would."""
        with self._lock:
            self._tokens.clear()

    # -- Orders v2

    def approve(self, order_id: str) -> None:
        """The buyer approved the order at PayPal."""
        with self._lock:
            self.orders[order_id]["status"] = "APPROVED"

    def _authorized(self, authorization: str) -> bool:
        with self._lock:
            return authorization.removeprefix("Bearer ") in self._tokens

    def _remembered(self, kind: str, request_id: str | None):
        with self._lock:
            return self._answers.get((kind, request_id)) if request_id else None

    def _remember(self, kind: str, request_id: str | None, answer: tuple[int, dict]) -> None:
        if request_id:
            with self._lock:
                self._answers.setdefault((kind, request_id), answer)

    def orders_create(
        self, authorization: str, request_id: str | None, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        """POST /v2/checkout/orders; the same PayPal-Request-Id answers the first answer."""
        with self._lock:
            self.create_requests += 1
        if self.create_delay:
            sleep(self.create_delay)
        if not self._authorized(authorization):
            return 401, {"error": "invalid_token"}
        if self.fail_create is not None:
            return self.fail_create
        remembered = self._remembered("create", request_id)
        if remembered is not None:
            return remembered
        try:
            order = json.loads(body)
            unit = order["purchase_units"][0]
            assert order["intent"] == "CAPTURE"
        except (ValueError, KeyError, IndexError, AssertionError):
            return 400, {"name": "INVALID_REQUEST", "message": "Request is not well-formed"}
        order_id = "ORD" + uuid.uuid4().hex[:14].upper()
        stored = {
            "id": order_id,
            "status": "CREATED",
            "intent": "CAPTURE",
            "custom_id": unit.get("custom_id"),
            "amount": unit["amount"],
            "request": order,
        }
        answer = (201, self._order_view(stored))
        with self._lock:
            self.orders[order_id] = stored
        self._remember("create", request_id, answer)
        return answer

    def _order_view(self, order: dict[str, Any]) -> dict[str, Any]:
        unit: dict[str, Any] = {"custom_id": order["custom_id"], "amount": order["amount"]}
        if order.get("capture"):
            unit["payments"] = {"captures": [order["capture"]]}
        return {
            "id": order["id"],
            "status": order["status"],
            "intent": "CAPTURE",
            "purchase_units": [unit],
            "links": [
                {"href": self.url(f"/v2/checkout/orders/{order['id']}"), "rel": "self"},
                {"href": f"https://www.sandbox.paypal.com/checkoutnow?token={order['id']}",
                 "rel": "approve"},
            ],
        }  # fmt: skip

    def orders_capture(
        self, authorization: str, request_id: str | None, order_id: str
    ) -> tuple[int, dict[str, Any]]:
        """POST /v2/checkout/orders/{id}/capture, once per order; the same PayPal-Request-Id
        answers the first answer. A delay in `capture_delays` comes after the capture."""
        with self._lock:
            self.capture_requests += 1
            delay = self.capture_delays.pop(0) if self.capture_delays else 0.0
        if not self._authorized(authorization):
            return 401, {"error": "invalid_token"}
        answer = self._remembered("capture", request_id) or self._capture(order_id)
        self._remember("capture", request_id, answer)
        if delay:
            sleep(delay)
        return answer

    def _capture(self, order_id: str) -> tuple[int, dict[str, Any]]:
        if self.fail_capture is not None:
            return self.fail_capture
        with self._lock:
            order = self.orders.get(order_id)
            if order is None:
                return 404, {
                    "name": "RESOURCE_NOT_FOUND",
                    "details": [{"issue": "INVALID_RESOURCE_ID"}],
                }
            if order["status"] == "COMPLETED":
                return 422, {"name": "UNPROCESSABLE_ENTITY",
                             "details": [{"issue": "ORDER_ALREADY_CAPTURED"}]}  # fmt: skip
            if order["status"] != "APPROVED":
                return 422, {"name": "UNPROCESSABLE_ENTITY",
                             "details": [{"issue": "ORDER_NOT_APPROVED"}]}  # fmt: skip
            amount = dict(order["amount"])
            if self.capture_amount is not None:
                amount["value"] = self.capture_amount
            order["capture"] = {
                "id": "CAP" + uuid.uuid4().hex[:14].upper(),
                "status": "COMPLETED",
                "amount": amount,
                "custom_id": order["custom_id"],
                "final_capture": True,
            }
            order["status"] = "COMPLETED"
            self.captures_made += 1
            return 201, self._order_view(order)

    def orders_show(self, authorization: str, order_id: str) -> tuple[int, dict[str, Any]]:
        if not self._authorized(authorization):
            return 401, {"error": "invalid_token"}
        with self._lock:
            order = self.orders.get(order_id)
            if order is None:
                return 404, {"name": "RESOURCE_NOT_FOUND"}
            return 200, self._order_view(order)

    # -- called by the handler

    def _count_connection(self) -> None:
        with self._lock:
            self.connections += 1

    def _get(self, path: str) -> _Canned:
        with self._lock:
            self.cert_hits[path] += 1
            return self._routes.get(path) or _Canned(404, b"not found", {}, True)

    def _oauth(self, authorization: str, form: bytes) -> tuple[int, dict[str, Any]]:
        expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        with self._lock:
            self.oauth_hits += 1
            if self.oauth_status is not None:
                return self.oauth_status, {"error": "forced"}
            if authorization != f"Basic {expected}":
                return 401, {"error": "invalid_client"}
            if b"grant_type=client_credentials" not in form:
                return 400, {"error": "unsupported_grant_type"}
            token = "A21AA" + uuid.uuid4().hex
            self._tokens.add(token)
        return 200, {
            "scope": "https://uri.paypal.com/services/applications/webhooks",
            "access_token": token,
            "token_type": "Bearer",
            "app_id": "APP-FAKE",
            "expires_in": self.token_ttl,
            "nonce": uuid.uuid4().hex,
        }

    def _verify(self, authorization: str, body: bytes) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.verify_hits += 1
            self.verify_requests.append(body)
            if self.verify_status is not None:
                return self.verify_status, {"name": "FORCED"}
            if authorization.removeprefix("Bearer ") not in self._tokens:
                return 401, {"error": "invalid_token"}
            events = set(self._events)
        try:
            text = body.decode("utf-8")
            fields = json.loads(text)
            event_text = member_text(text, "webhook_event")
        except ValueError:
            return 400, {"name": "VALIDATION_ERROR"}
        # JSON whitespace around a member is not part of its text; everything inside is.
        ok = (
            event_text is not None
            and event_text.encode("utf-8") in {e.strip(b" \t\r\n") for e in events}
            and fields.get("webhook_id") == self.webhook_id
        )
        return 200, {"verification_status": "SUCCESS" if ok else "FAILURE"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakePayPal

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.fake._count_connection()
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Aborted TLS handshakes and clients that hang up are expected in tests.
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.startswith("/v2/checkout/orders/"):
            order_id = self.path.rsplit("/", 1)[-1]
            self._send_json(
                *self.server.fake.orders_show(self.headers.get("Authorization", ""), order_id)
            )
            return
        canned = self.server.fake._get(self.path)
        if canned.delay:
            sleep(canned.delay)
        self.send_response(canned.status)
        for name, value in canned.headers.items():
            self.send_header(name, value)
        if canned.send_length:
            self.send_header("Content-Length", str(len(canned.body)))
        self.end_headers()
        self.wfile.write(canned.body)

    def do_POST(self) -> None:
        body = self._read_body()
        authorization = self.headers.get("Authorization", "")
        if self.path == "/v1/oauth2/token":
            self._send_json(*self.server.fake._oauth(authorization, body))
        elif self.path == "/v1/notifications/verify-webhook-signature":
            self._send_json(*self.server.fake._verify(authorization, body))
        elif self.path == "/v2/checkout/orders":
            request_id = self.headers.get("PayPal-Request-Id")
            self._send_json(*self.server.fake.orders_create(authorization, request_id, body))
        elif self.path.startswith("/v2/checkout/orders/") and self.path.endswith("/capture"):
            request_id = self.headers.get("PayPal-Request-Id")
            order_id = self.path.split("/")[-2]
            self._send_json(*self.server.fake.orders_capture(authorization, request_id, order_id))
        else:
            self._send_json(404, {"name": "RESOURCE_NOT_FOUND"})

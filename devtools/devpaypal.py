"""The dev stack's own PayPal signer, so a newcomer can send a signed webhook through the real
verification path: a key and a certificate named like PayPal's, generated once under
var/dev/paypal/, served on 127.0.0.1 to the dev `web` (which is told to allow only that URL
prefix), and `payguard sample paypal …` to sign and post sample events with it.

Never used outside `payguard dev`: production verifies against PayPal's own certificates."""

from __future__ import annotations

import base64
import json
import threading
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

WEBHOOK_ID = "WH-PAYGUARD-DEV"
CERT_PATH = "/v1/notifications/certs/CERT-payguard-dev"
PAYPAL_CERT_NAME = "messageverificationcerts.paypal.com"


def ensure_signer(directory: Path) -> tuple[rsa.RSAPrivateKey, bytes]:
    """The dev key and certificate, made on first use and kept."""
    directory.mkdir(parents=True, exist_ok=True)
    key_file, cert_file = directory / "key.pem", directory / "cert.pem"
    if key_file.exists() and cert_file.exists():
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        if cert.not_valid_after_utc > datetime.now(UTC) + timedelta(days=1):
            return key, cert_file.read_bytes()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PAYPAL_CERT_NAME)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(PAYPAL_CERT_NAME)]), False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert_file.read_bytes()


def serve_certificate(directory: Path) -> tuple[str, str]:
    """Serve the dev certificate on 127.0.0.1 in a daemon thread; (cert URL, allowed prefix)."""
    _, cert_pem = ensure_signer(directory)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == CERT_PATH
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/x-pem-file")
            self.send_header("Content-Length", str(len(cert_pem) if ok else 0))
            self.end_headers()
            if ok:
                self.wfile.write(cert_pem)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="dev-paypal-cert").start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    url = base + CERT_PATH
    (directory / "cert-url").write_text(url)
    return url, base + CERT_PATH.rsplit("/", 1)[0] + "/"


def sign(key: rsa.RSAPrivateKey, body: bytes, cert_url: str, webhook_id: str) -> dict[str, str]:
    """The headers PayPal would send with `body`."""
    transmission_id = str(uuid.uuid4())
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    message = f"{transmission_id}|{when}|{webhook_id}|{zlib.crc32(body) & 0xFFFFFFFF}".encode()
    signature = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    return {
        "PAYPAL-TRANSMISSION-ID": transmission_id,
        "PAYPAL-TRANSMISSION-TIME": when,
        "PAYPAL-TRANSMISSION-SIG": base64.b64encode(signature).decode(),
        "PAYPAL-CERT-URL": cert_url,
        "PAYPAL-AUTH-ALGO": "SHA256withRSA",
        "PAYPAL-AUTH-VERSION": "v2",
        "Content-Type": "application/json",
    }


def sample_event(
    kind: str,
    org_id: str,
    amount: str,
    currency: str,
    capture_id: str | None,
    subscription_id: str | None,
) -> dict:
    """A PayPal-shaped event of the given kind, with fresh ids."""
    Decimal(amount)  # refuse garbage before anything is signed
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    event_id = f"WH-DEV-{uuid.uuid4().hex[:20].upper()}"
    capture_id = capture_id or f"DEVCAP{uuid.uuid4().hex[:11].upper()}"
    money = {"currency_code": currency, "value": amount}
    if kind == "capture":
        event_type = "PAYMENT.CAPTURE.COMPLETED"
        resource = {
            "id": capture_id,
            "amount": money,
            "custom_id": org_id,
            "status": "COMPLETED",
            "create_time": now,
            "update_time": now,
            "final_capture": True,
        }
    elif kind == "refund":
        event_type = "PAYMENT.CAPTURE.REFUNDED"
        resource = {
            "id": f"DEVREF{uuid.uuid4().hex[:11].upper()}",
            "amount": money,
            "status": "COMPLETED",
            "create_time": now,
            "update_time": now,
            "links": [
                {
                    "rel": "up",
                    "method": "GET",
                    "href": f"https://api.paypal.com/v2/payments/captures/{capture_id}",
                }
            ],
        }
    elif kind in ("subscription-activated", "subscription-cancelled"):
        active = kind == "subscription-activated"
        event_type = "BILLING.SUBSCRIPTION." + ("ACTIVATED" if active else "CANCELLED")
        resource = {
            "id": subscription_id or f"I-DEV{org_id.upper()[:12]}",
            "status": "ACTIVE" if active else "CANCELLED",
            "custom_id": org_id,
            "plan_id": "P-DEV",
            "status_update_time": now,
            "update_time": now,
        }
    else:
        raise ValueError(f"unknown sample kind {kind!r}")
    return {
        "id": event_id,
        "event_version": "1.0",
        "create_time": now,
        "resource_type": event_type.split(".")[-2].lower(),
        "event_type": event_type,
        "summary": f"Payguard dev sample {kind}",
        "resource_version": "2.0",
        "resource": resource,
    }


def post_sample(directory: Path, url: str, event: dict) -> tuple[int, dict]:
    import requests

    key, _ = ensure_signer(directory)
    cert_url_file = directory / "cert-url"
    if not cert_url_file.exists():
        raise FileNotFoundError("no dev certificate URL: is `payguard dev` running?")
    body = json.dumps(event).encode()
    headers = sign(key, body, cert_url_file.read_text().strip(), WEBHOOK_ID)
    response = requests.post(url, data=body, headers=headers, timeout=10)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {"body": response.text[:500]}

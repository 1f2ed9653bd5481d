"""Hypothesis strategies that turn valid, signed webhook deliveries into requests to refuse.

Used by tests/integration/test_fuzz_webhooks.py. Every request starts from a delivery that
verifies (PayPal: RSA over ``transmission_id|transmission_time|webhook_id|crc32(body)``;
Stripe: HMAC-SHA256 over ``t.body``) and then either changes something the signature covers,
replaces the signature with one that cannot match, or keeps a valid signature over a body
that is oversized or not an event. Each `FuzzRequest` carries the answers it may get.

Two rules keep "anything but 400/413/503 is a bug" honest:

* Header values use only Latin-1 characters without CR or LF: that is all a WSGI server can
  hand the application (PEP 3333 decodes header bytes as Latin-1; CR/LF end the header).
* A mutation that could still verify under a lenient but legitimate reading of the scheme is
  thrown away (`assume`), never sent; `paypal_may_verify` and `stripe_may_verify` decide,
  conservatively and without calling the code under test. Such mutations exist: the PayPal
  verifier compares the auth algorithm case-insensitively (but takes every PayPal header
  exactly as sent: whitespace or non-ASCII anywhere in one is refused, never stripped);
  base64 has non-canonical spellings of the same signature; the certificate URL is not
  signed at all (scheme and host case, a port written "0<port>"); Stripe's header may carry
  extra items and signatures. And PayPal signs only a CRC-32 of the body: for HMAC or RSA
  over the bytes themselves only the identical body verifies, but any PayPal body with the
  same CRC-32 does (random mutations hit one with odds of 2**-32; a forger computes one on
  purpose), so bodies keeping the CRC-32 are excluded too.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import posixpath
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from hypothesis import assume
from hypothesis import strategies as st

from tests.support.fakes.paypal_api import SigningCert
from tests.support.payloads.stripe import stripe_signature_header

MAX_BODY = 1024 * 1024
# Nesting far beyond any JSON parser's recursion limit, yet well under 1 MiB.
DEEP_MIN, DEEP_MAX = 50_000, 150_000

H_ID = "PAYPAL-TRANSMISSION-ID"
H_TIME = "PAYPAL-TRANSMISSION-TIME"
H_SIG = "PAYPAL-TRANSMISSION-SIG"
H_CERT = "PAYPAL-CERT-URL"
H_ALGO = "PAYPAL-AUTH-ALGO"
PAYPAL_HEADERS = (H_ID, H_TIME, H_SIG, H_CERT, H_ALGO)
H_STRIPE = "Stripe-Signature"

Headers = tuple[tuple[str, str], ...]

# What a WSGI server can deliver in a header value (see the module docstring).
HEADER_CHARS = st.characters(codec="latin-1", exclude_characters="\r\n")
HEADER_TEXT = st.text(HEADER_CHARS, max_size=80)

INVALID_UTF8 = (
    b"\xff",
    b"\xfe\xff",
    b"\xc3\x28",
    b"\xa0\xa1",
    b"\xe2\x28\xa1",
    b"\xf0\x28\x8c\x28",
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\xc0\xaf",  # overlong "/"
    b"\xf8\x88\x80\x80\x80",
)

CONTENT_TYPES = (
    None,
    "",
    "text/plain",
    "application/octet-stream",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=fuzz",
    "application/json; charset=utf-16",
    "application/xml",
    "application/json, application/json",
)


class ShortRepr:
    """Hypothesis pretty-prints dataclasses field by field (a megabyte for an oversized body
    or a context); `_repr_pretty_` makes it use our short `__repr__` instead."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


@dataclass(frozen=True, repr=False)
class Delivery(ShortRepr):
    """A delivery exactly as the provider would send it (it verifies)."""

    body: bytes
    headers: Headers

    def __repr__(self) -> str:
        return f"Delivery(body[{len(self.body)}]={self.body[:60]!r}..., headers={self.headers!r})"


@dataclass(frozen=True, repr=False)
class FuzzRequest(ShortRepr):
    """One request to send and the only answers it may get.

    transport: "length" (Content-Length, the test client's default), "chunked" (no
    Content-Length, the server terminates the stream: what gunicorn does for chunked
    requests), or "unterminated" (no Content-Length and a server that does not terminate
    the stream: werkzeug then reads nothing).
    """

    category: str
    body: bytes
    headers: Headers
    expect: frozenset[int] = frozenset({400})
    transport: str = "length"

    def __repr__(self) -> str:  # short enough for a falsifying example of 1 MiB
        body = self.body if len(self.body) <= 300 else self.body[:300] + b"..."
        return (
            f"FuzzRequest({self.category!r}, body[{len(self.body)}]={body!r}, "
            f"headers={self.headers!r}, expect={sorted(self.expect)}, "
            f"transport={self.transport!r})"
        )


@dataclass(frozen=True, repr=False)
class PayPalContext(ShortRepr):
    signer: SigningCert
    other_signer: SigningCert  # a forger: another key, its own PayPal-named certificate
    webhook_id: str
    cert_url: str  # the allowed, served certificate
    deliveries: tuple[Delivery, ...]
    tricky_urls: tuple[str, ...]  # outside the prefix, or forbidden spellings: never fetched
    unusable_urls: tuple[tuple[str, frozenset[int]], ...]  # inside the prefix, all unusable

    def __repr__(self) -> str:
        return f"PayPalContext({len(self.deliveries)} deliveries, cert_url={self.cert_url!r})"


@dataclass(frozen=True, repr=False)
class StripeContext(ShortRepr):
    secret: str
    other_secrets: tuple[str, ...]
    timestamp: int  # when `deliveries` were signed
    deliveries: tuple[Delivery, ...]

    def __repr__(self) -> str:
        return f"StripeContext({len(self.deliveries)} deliveries, timestamp={self.timestamp})"


# --------------------------------------------------------------------------- headers


def header(headers: Headers, name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name.lower():
            return value
    return None


def with_header(headers: Headers, name: str, value: str | None) -> Headers:
    """`headers` with every `name` header removed, then `name: value` added (unless None)."""
    kept = tuple((k, v) for k, v in headers if k.lower() != name.lower())
    return kept if value is None else (*kept, (name, value))


def effective_headers(headers: Headers) -> dict[str, str]:
    """The headers as the application reads them, by lower-case name: what a WSGI environ
    keeps (HTTP_NAME, "-" and "_" alike, repeated headers joined by ", " as werkzeug does)."""
    joined: dict[str, list[str]] = {}
    for name, value in headers:
        joined.setdefault(name.upper().replace("-", "_"), []).append(value)
    return {key.lower().replace("_", "-"): ", ".join(values) for key, values in joined.items()}


# --------------------------------------------------------------------------- oracles


def _b64(value: str) -> bytes | None:
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def cert_url_equivalent(value: str, allowed: str) -> bool:
    """Could `value` name the same certificate as `allowed`? Errs on the side of yes."""
    value = value.strip()
    if value == allowed:
        return True
    try:
        got, want = urlsplit(value), urlsplit(allowed)
        port = got.port
    except ValueError:
        return False
    path = posixpath.normpath(unquote(got.path)) if got.path else ""
    return (
        got.scheme.lower() == want.scheme
        and (got.hostname or "").lower() == want.hostname
        and port == want.port
        and path == want.path
    )


_PAYPAL_HEADER_VALUE = re.compile(r"[!-~]+")


def paypal_may_verify(body: bytes, headers: Headers, original: Delivery) -> bool:
    """Could (body, headers) still verify as `original`'s transmission? Errs on the side of yes.

    The certificate URL is not signed, so it only has to name the same certificate; the
    auth algorithm only has to be SHA256withRSA in any case. Every PayPal header must be
    printable ASCII without whitespace: padding is how a verified value and a stored one
    used to differ, so it is refused, and a padded mutation must be refused too.
    """
    got, want = effective_headers(headers), effective_headers(original.headers)
    if zlib.crc32(body) != zlib.crc32(original.body):
        return False
    for name in PAYPAL_HEADERS:
        if not _PAYPAL_HEADER_VALUE.fullmatch(got.get(name.lower(), "")):
            return False
    for name in (H_ID.lower(), H_TIME.lower()):
        if got.get(name) != want[name]:
            return False
    if _b64(got.get(H_SIG.lower(), "")) != _b64(want[H_SIG.lower()]):
        return False
    if got.get(H_ALGO.lower(), "").lower() != "sha256withrsa":
        return False
    return cert_url_equivalent(got.get(H_CERT.lower(), ""), want[H_CERT.lower()])


def stripe_may_verify(body: bytes, headers: Headers, original: Delivery, timestamp: int) -> bool:
    """Could (body, headers) still verify as `original`? Errs on the side of yes.

    Reads Stripe-Signature as leniently as Stripe's own libraries (any item order, extra
    items and schemes, `split("=")`, `int()` of the timestamp) plus whitespace anywhere.
    """
    if body != original.body:
        return False
    value = effective_headers(headers).get(H_STRIPE.lower())
    digest = header(original.headers, H_STRIPE).rsplit("v1=", 1)[1]  # type: ignore[union-attr]
    if not value:
        return False
    stamps, signatures = set(), set()
    for item in value.split(","):
        key, _, rest = item.partition("=")
        first = rest.split("=")[0].strip()
        if key.strip() == "t":
            with contextlib.suppress(ValueError):
                stamps.add(int(first))
        elif key.strip() == "v1":
            signatures.add(first.lower())
    return timestamp in stamps and digest in signatures


# --------------------------------------------------------------------------- bytes and text


BYTE_OPS = (
    "flip",
    "insert",
    "delete",
    "truncate",
    "replace",
    "duplicate",
    "non_utf8",
    "append",
    "prepend",
)


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes) -> tuple[str, bytes]:
    """(operation, data changed by it); never `data` itself."""
    op = draw(st.sampled_from(BYTE_OPS))
    n = len(data)
    if n == 0 and op in ("flip", "delete", "truncate", "replace", "duplicate"):
        op = "insert"
    if op == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, n - 1))] ^= draw(st.integers(1, 255))
        result = bytes(out)
    elif op == "insert":
        at = draw(st.integers(0, n))
        result = data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at:]
    elif op == "delete":
        at = draw(st.integers(0, n - 1))
        result = data[:at] + data[at + draw(st.integers(1, max(1, min(256, n - at)))) :]
    elif op == "truncate":
        result = data[: draw(st.integers(0, n - 1))]
    elif op == "replace":
        at = draw(st.integers(0, n - 1))
        size = draw(st.integers(1, min(64, n - at)))
        result = data[:at] + draw(st.binary(min_size=size, max_size=size)) + data[at + size :]
    elif op == "duplicate":
        at = draw(st.integers(0, n - 1))
        end = draw(st.integers(at + 1, min(n, at + 256)))
        result = data[:end] + data[at:end] + data[end:]
    elif op == "non_utf8":
        at = draw(st.integers(0, n))
        result = data[:at] + draw(st.sampled_from(INVALID_UTF8)) + data[at:]
    elif op == "append":
        tail = draw(st.sampled_from([b" ", b"\n", b"\x00", b"}", b"x", b"{}", b'{"id":"x"}']))
        result = data + tail
    else:  # prepend
        head = draw(st.sampled_from([b" ", b"\xef\xbb\xbf", b"\x00", b"[", b"x", b"\xff\xfe"]))
        result = head + data
    assume(result != data)
    return op, result


TEXT_OPS = ("flip", "insert", "delete", "truncate", "random", "swapcase", "pad", "repeat")


@st.composite
def mutated_text(draw: st.DrawFn, value: str) -> tuple[str, str]:
    """(operation, a header value derived from `value`); may equal it, callers check."""
    op = draw(st.sampled_from(TEXT_OPS))
    n = len(value)
    if n == 0 and op in ("flip", "delete", "truncate"):
        op = "insert"
    if op == "flip":
        at = draw(st.integers(0, n - 1))
        char = draw(HEADER_CHARS)
        assume(char != value[at])
        result = value[:at] + char + value[at + 1 :]
    elif op == "insert":
        at = draw(st.integers(0, n))
        result = value[:at] + draw(st.text(HEADER_CHARS, min_size=1, max_size=16)) + value[at:]
    elif op == "delete":
        at = draw(st.integers(0, n - 1))
        result = value[:at] + value[at + draw(st.integers(1, n - at)) :]
    elif op == "truncate":
        result = value[: draw(st.integers(0, n - 1))]
    elif op == "random":
        result = draw(HEADER_TEXT)
    elif op == "swapcase":
        result = value.swapcase()
    elif op == "pad":
        pad = st.text(st.sampled_from(" \t\x0b\x0c\x1c\x85\xa0"), min_size=1, max_size=3)
        result = draw(pad) + value + draw(pad)
    else:  # repeat
        result = value + draw(st.sampled_from(["", ",", ", ", " "])) + value
    return op, result


# --------------------------------------------------------------------------- bodies


def deep_json(depth: int, opener: str, wrap: bool) -> bytes:
    """JSON nested `depth` deep (arrays or objects); `wrap` puts it inside an event envelope."""
    inner = "[" * depth + "]" * depth if opener == "[" else '{"a":' * depth + "1" + "}" * depth
    if not wrap:
        return inner.encode()
    return (
        b'{"id":"WH-DEEP-1","event_type":"PAYMENT.CAPTURE.COMPLETED","x":' + inner.encode() + b"}"
    )


def oversized(body: bytes, extra: int, filler: bytes) -> bytes:
    """`body` padded past 1 MiB; with filler b" " it is still the same, valid JSON."""
    missing = MAX_BODY - len(body) + extra
    return body + (filler * (missing // len(filler) + 1))[:missing]


_BAD_VALUES: tuple[Any, ...] = (None, 0, 1.5, True, [], {}, ["x"], "")
# PayPal's envelope check refuses blank strings too; Stripe's only asks for a non-empty type.
_BLANK = (" ", "\t\n")


@st.composite
def malformed_event(  # noqa: C901 (one branch per kind of malformed body: reads best as one list)
    draw: st.DrawFn, valid: dict[str, Any], provider: str
) -> tuple[str, bytes]:
    """(kind, body): something that is not an event this provider sends, however signed.

    Left out for PayPal: NaN or Infinity outside the envelope, which Python's json (and so
    the receiver) accepts in an otherwise valid event.
    """
    id_key, type_key = ("id", "event_type") if provider == "paypal" else ("id", "type")
    kinds = [
        "empty",
        "random",
        "truncated",
        "non_object",
        "missing_id",
        "missing_type",
        "bad_id",
        "bad_type",
        "long_id",
        "long_type",
        "nul_id",
        "nul_type",
        "surrogate_id",
        "deep",
        "deep_top",
        "huge_int",
        "non_utf8",
        "nan_id",
        "duplicate_key",
        "trailing",
        "bom",
        "utf16",
    ]
    if provider == "stripe":
        kinds += ["not_evt", "not_event_object", "nan_elsewhere"]
    kind = draw(st.sampled_from(kinds))
    event = dict(valid)
    if kind == "empty":
        return kind, draw(st.sampled_from([b"", b" ", b"\n", b"{", b"null"]))
    if kind == "random":
        data = draw(st.binary(max_size=512))
        assume(not _looks_like_event(data))
        return kind, data
    if kind == "truncated":
        body = json.dumps(event).encode()
        return kind, body[: draw(st.integers(0, len(body) - 1))]
    if kind == "non_object":
        value = draw(st.sampled_from([[], [event], "event", 1, 1.5, None, True]))
        return kind, json.dumps(value).encode()
    if kind in ("missing_id", "missing_type"):
        event.pop(id_key if kind == "missing_id" else type_key)
    elif kind in ("bad_id", "bad_type"):
        bad = _BAD_VALUES + (_BLANK if provider == "paypal" or kind == "bad_id" else ())
        event[id_key if kind == "bad_id" else type_key] = draw(st.sampled_from(bad))
    elif kind in ("long_id", "long_type"):
        key = id_key if kind == "long_id" else type_key
        event[key] = str(event[key]) + "X" * draw(st.integers(256, 4000))
    elif kind in ("nul_id", "nul_type"):
        key = id_key if kind == "nul_id" else type_key
        at = draw(st.integers(1, len(event[key])))
        event[key] = event[key][:at] + "\x00" + event[key][at:]
    elif kind == "surrogate_id":
        event[id_key] = event[id_key] + draw(st.sampled_from(["\ud800", "\udfff", "\udc80x"]))
    elif kind == "deep":
        event["resource"] = None
        body = json.dumps(event).encode()
        nested = deep_json(
            draw(st.integers(DEEP_MIN, DEEP_MAX)), draw(st.sampled_from("[{")), False
        )
        return kind, body.replace(b'"resource": null', b'"resource": ' + nested)
    elif kind == "deep_top":
        depth = draw(st.integers(DEEP_MIN, DEEP_MAX))
        return kind, deep_json(depth, draw(st.sampled_from("[{")), False)
    elif kind == "huge_int":
        body = json.dumps(event).encode()
        return kind, body[:-1] + b', "huge": ' + b"9" * draw(st.integers(5_000, 50_000)) + b"}"
    elif kind == "non_utf8":
        body = json.dumps(event).encode()
        at = body.index(b'"', body.index(b'"' + id_key.encode() + b'"') + len(id_key) + 2) + 1
        return kind, body[:at] + draw(st.sampled_from(INVALID_UTF8)) + body[at:]
    elif kind == "nan_id":
        body = json.dumps(event).encode()
        return kind, body.replace(json.dumps(event[id_key]).encode(), b"NaN", 1)
    elif kind == "duplicate_key":
        body = json.dumps(event).encode()
        return kind, body[:-1] + b', "' + id_key.encode() + b'": 12345}'
    elif kind == "trailing":
        body = json.dumps(event).encode()
        return kind, body + draw(st.sampled_from([b"x", b"{}", b",", b"\x00", b"]"]))
    elif kind == "not_evt":
        event["id"] = draw(st.sampled_from(["evt_", "evt", "ev_123", "EVT_123", "x", " evt_1"]))
    elif kind == "not_event_object":
        event["object"] = draw(st.sampled_from(["v2.core.event", "", None, "charge", 1]))
    elif kind == "bom":
        return kind, b"\xef\xbb\xbf" + json.dumps(event).encode()
    elif kind == "utf16":
        return kind, json.dumps(event).encode(draw(st.sampled_from(["utf-16", "utf-16-le"])))
    elif kind == "nan_elsewhere":
        event["amount"] = float(draw(st.sampled_from(["nan", "inf", "-inf"])))
    return kind, json.dumps(event).encode()


def _looks_like_event(data: bytes) -> bool:
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):
        return False
    return isinstance(parsed, dict)


# --------------------------------------------------------------------------- PayPal


PayPalBuilder = Callable[[st.DrawFn, PayPalContext, Delivery], FuzzRequest]
_PAYPAL: dict[str, PayPalBuilder] = {}


def _paypal(name: str) -> Callable[[PayPalBuilder], PayPalBuilder]:
    def register(fn: PayPalBuilder) -> PayPalBuilder:
        _PAYPAL[name] = fn
        return fn

    return register


def _checked_paypal(category: str, body: bytes, headers: Headers, base: Delivery, **kw: Any):
    assume(not paypal_may_verify(body, headers, base))
    return FuzzRequest(category, body, headers, **kw)


@_paypal("body_mutation")
def _pp_body(draw, ctx, base):
    op, body = draw(mutated_bytes(base.body))
    return _checked_paypal(f"body_mutation:{op}", body, base.headers, base)


@_paypal("body_random")
def _pp_random_body(draw, ctx, base):
    body = draw(st.binary(max_size=4096))
    return _checked_paypal("body_random", body, base.headers, base)


@_paypal("body_json_edit")
def _pp_json_edit(draw, ctx, base):
    op, body = draw(json_edit(base.body, "paypal"))
    return _checked_paypal(f"body_json_edit:{op}", body, base.headers, base)


@_paypal("body_deep_unsigned")
def _pp_deep(draw, ctx, base):
    body = deep_json(draw(st.integers(DEEP_MIN, DEEP_MAX)), draw(st.sampled_from("[{")), True)
    return _checked_paypal("body_deep_unsigned", body, base.headers, base)


@_paypal("oversized")
def _pp_oversized(draw, ctx, base):
    filler = draw(st.sampled_from([b" ", b"\n", b"x", b"\x00\xff"]))
    body = oversized(base.body, draw(st.integers(1, 300_000)), filler)
    signed = draw(st.booleans())
    headers = _paypal_sign(ctx.signer, ctx, body, draw) if signed else base.headers
    transport = draw(st.sampled_from(["length", "chunked"]))
    return FuzzRequest(
        f"oversized:{transport}:{'signed' if signed else 'unsigned'}",
        body,
        headers,
        expect=frozenset({413}),
        transport=transport,
    )


@_paypal("unterminated")
def _pp_unterminated(draw, ctx, base):
    # No Content-Length and a server that does not end the stream: werkzeug reads nothing,
    # and the empty body does not carry the signed CRC.
    assume(zlib.crc32(b"") != zlib.crc32(base.body))
    return FuzzRequest("unterminated", base.body, base.headers, transport="unterminated")


@_paypal("header_drop")
def _pp_drop(draw, ctx, base):
    names = draw(st.sets(st.sampled_from(PAYPAL_HEADERS), min_size=1))
    headers = base.headers
    rename = draw(st.booleans())
    for name in sorted(names):
        value = header(headers, name)
        headers = with_header(headers, name, None)
        if rename:  # a near miss of the name, carrying the right value
            near = draw(
                st.sampled_from([name + "X", name[:-1], "X-" + name, name.replace("-", "")])
            )
            headers = (*headers, (near, value or ""))
    return _checked_paypal("header_drop", base.body, headers, base)


@_paypal("header_empty")
def _pp_empty(draw, ctx, base):
    name = draw(st.sampled_from(PAYPAL_HEADERS))
    value = draw(st.sampled_from(["", " ", "\t", "  \t "]))
    return _checked_paypal(
        f"header_empty:{name}", base.body, with_header(base.headers, name, value), base
    )


@_paypal("header_garble")
def _pp_garble(draw, ctx, base):
    name = draw(st.sampled_from([H_ID, H_TIME, H_SIG, H_ALGO]))
    op, value = draw(mutated_text(header(base.headers, name) or ""))
    headers = with_header(base.headers, name, value)
    return _checked_paypal(f"header_garble:{name}:{op}", base.body, headers, base)


@_paypal("header_duplicate")
def _pp_duplicate(draw, ctx, base):
    name = draw(st.sampled_from(PAYPAL_HEADERS))
    original = header(base.headers, name) or ""
    extra = draw(mutated_text(original))[1] if draw(st.booleans()) else original
    pair = [(name, original), (name, extra)]
    if draw(st.booleans()):
        pair.reverse()
    headers = (*with_header(base.headers, name, None), *pair)
    return _checked_paypal(f"header_duplicate:{name}", base.body, headers, base)


@_paypal("auth_algo")
def _pp_algo(draw, ctx, base):
    value = draw(
        st.one_of(
            st.sampled_from(
                ["SHA1withRSA", "SHA512withRSA", "SHA256withECDSA", "none", "RSA", "SHA256"]
            ),
            HEADER_TEXT,
        )
    )
    headers = with_header(base.headers, H_ALGO, value)
    return _checked_paypal("auth_algo", base.body, headers, base)


@_paypal("cert_url_trick")
def _pp_trick(draw, ctx, base):
    # Not passed through the oracle: some tricks (userinfo, query, dot segments, percent
    # encoding) would name the served certificate if fetched, and the contract says they are
    # refused outright and never fetched.
    url = draw(st.sampled_from(ctx.tricky_urls))
    return FuzzRequest("cert_url_trick", base.body, with_header(base.headers, H_CERT, url))


@_paypal("cert_url_garble")
def _pp_cert_garble(draw, ctx, base):
    op, url = draw(mutated_text(ctx.cert_url))
    headers = with_header(base.headers, H_CERT, url)
    # A garbled URL may still fall inside the prefix: fetched, not found there, 503.
    return _checked_paypal(
        f"cert_url_garble:{op}", base.body, headers, base, expect=frozenset({400, 503})
    )


@_paypal("cert_url_unusable")
def _pp_unusable(draw, ctx, base):
    url, expect = draw(st.sampled_from(ctx.unusable_urls))
    name = url.rsplit("/", 1)[1]
    return FuzzRequest(
        f"cert_url_unusable:{name}", base.body, with_header(base.headers, H_CERT, url), expect
    )


@_paypal("wrong_webhook_id")
def _pp_webhook_id(draw, ctx, base):
    webhook_id = draw(
        st.one_of(
            st.sampled_from(["", "WH-TEST ", "wh-test", "WH-TES", "WH-TEST-2", "WEBHOOK_ID"]),
            st.text(HEADER_CHARS, max_size=40),
        )
    )
    assume(webhook_id != ctx.webhook_id)
    headers = _paypal_sign(ctx.signer, ctx, base.body, draw, webhook_id=webhook_id)
    return FuzzRequest("wrong_webhook_id", base.body, headers)


@_paypal("forged_key")
def _pp_forged(draw, ctx, base):
    # Signed by a key whose certificate also names PayPal, but the allowed URL serves ours.
    headers = _paypal_sign(ctx.other_signer, ctx, base.body, draw)
    return FuzzRequest("forged_key", base.body, headers)


@_paypal("spliced")
def _pp_spliced(draw, ctx, base):
    other = draw(st.sampled_from(ctx.deliveries))
    if draw(st.booleans()):  # another delivery's headers over this body
        headers = other.headers
    else:  # this transmission's id and time, another one's signature
        headers = with_header(base.headers, H_SIG, header(other.headers, H_SIG))
    return _checked_paypal("spliced", base.body, headers, base)


@_paypal("signed_malformed")
def _pp_signed_malformed(draw, ctx, base):
    kind, body = draw(malformed_event(json.loads(base.body), "paypal"))
    headers = _paypal_sign(ctx.signer, ctx, body, draw)
    return FuzzRequest(f"signed_malformed:{kind}", body, headers)


@_paypal("content_type")
def _pp_content_type(draw, ctx, base):
    # The content type is not signed: change it together with something that is.
    inner = _PAYPAL[draw(st.sampled_from(["body_mutation", "header_garble", "spliced"]))](
        draw, ctx, base
    )
    content_type = draw(st.one_of(st.sampled_from(CONTENT_TYPES), HEADER_TEXT))
    return FuzzRequest(
        f"content_type+{inner.category.split(':')[0]}",
        inner.body,
        with_header(inner.headers, "Content-Type", content_type),
        inner.expect,
    )


@_paypal("stacked")
def _pp_stacked(draw, ctx, base):
    body, headers = base.body, base.headers
    for _ in range(draw(st.integers(2, 4))):
        what = draw(st.sampled_from(["body", "garble", "drop", "duplicate", "content_type"]))
        if what == "body":
            body = draw(mutated_bytes(body))[1]
        elif what == "garble":
            name = draw(st.sampled_from([H_ID, H_TIME, H_SIG, H_ALGO]))
            headers = with_header(headers, name, draw(mutated_text(header(headers, name) or ""))[1])
        elif what == "drop":
            headers = with_header(headers, draw(st.sampled_from(PAYPAL_HEADERS)), None)
        elif what == "duplicate":
            name = draw(st.sampled_from([H_ID, H_TIME, H_SIG, H_ALGO]))
            headers = (*headers, (name, header(base.headers, name) or ""))
        else:
            headers = with_header(headers, "Content-Type", draw(st.sampled_from(CONTENT_TYPES)))
    return _checked_paypal("stacked", body, headers, base)


def _paypal_sign(
    signer: SigningCert,
    ctx: PayPalContext,
    body: bytes,
    draw: st.DrawFn,
    *,
    webhook_id: str | None = None,
) -> Headers:
    transmission_id = str(draw(st.uuids()))
    signed = signer.sign(
        ctx.webhook_id if webhook_id is None else webhook_id,
        body,
        ctx.cert_url,
        transmission_id=transmission_id,
        time="2026-01-01T00:00:00Z",
    )
    return tuple(signed.items())


PAYPAL_CATEGORIES = tuple(sorted(_PAYPAL))


@st.composite
def paypal_requests(draw: st.DrawFn, ctx: PayPalContext) -> FuzzRequest:
    """One request to POST /webhooks/paypal that must be refused."""
    builder = _PAYPAL[draw(st.sampled_from(PAYPAL_CATEGORIES))]
    return builder(draw, ctx, draw(st.sampled_from(ctx.deliveries)))


# --------------------------------------------------------------------------- JSON edits


@st.composite
def json_edit(draw: st.DrawFn, body: bytes, provider: str) -> tuple[str, bytes]:
    """(edit, body): the same event with a field changed, or the same JSON re-serialized."""
    event = json.loads(body)
    op = draw(st.sampled_from(["id", "type", "amount", "drop_key", "add_key", "reformat"]))
    if op == "id":
        event["id"] = draw(st.text(min_size=1, max_size=40))
    elif op == "type":
        key = "event_type" if provider == "paypal" else "type"
        event[key] = draw(st.sampled_from(["PAYMENT.CAPTURE.COMPLETED", "invoice.paid", "x"]))
    elif op == "amount":
        target = event.get("resource") or event.get("data", {}).get("object") or event
        target["amount"] = {"currency_code": "USD", "value": "99999.00"}
    elif op == "drop_key":
        event.pop(draw(st.sampled_from(sorted(event))))
    elif op == "add_key":
        event[draw(st.text(max_size=10))] = draw(st.one_of(st.integers(), st.text(max_size=20)))
    options = draw(
        st.sampled_from(
            [
                {},
                {"indent": 2},
                {"separators": (",", ":")},
                {"sort_keys": True},
                {"ensure_ascii": False, "indent": 1},
            ]
        )
    )
    result = json.dumps(event, **options).encode()
    assume(result != body)
    return op, result


# --------------------------------------------------------------------------- Stripe


StripeBuilder = Callable[[st.DrawFn, StripeContext, Delivery], FuzzRequest]
_STRIPE: dict[str, StripeBuilder] = {}


def _stripe(name: str) -> Callable[[StripeBuilder], StripeBuilder]:
    def register(fn: StripeBuilder) -> StripeBuilder:
        _STRIPE[name] = fn
        return fn

    return register


def _checked_stripe(
    category: str, body: bytes, headers: Headers, base: Delivery, ctx: StripeContext, **kw: Any
) -> FuzzRequest:
    assume(not stripe_may_verify(body, headers, base, ctx.timestamp))
    return FuzzRequest(category, body, headers, **kw)


def _signature(headers: Headers) -> str:
    return header(headers, H_STRIPE) or ""


@_stripe("body_mutation")
def _st_body(draw, ctx, base):
    op, body = draw(mutated_bytes(base.body))
    return _checked_stripe(f"body_mutation:{op}", body, base.headers, base, ctx)


@_stripe("body_random")
def _st_random_body(draw, ctx, base):
    body = draw(st.binary(max_size=4096))
    return _checked_stripe("body_random", body, base.headers, base, ctx)


@_stripe("body_json_edit")
def _st_json_edit(draw, ctx, base):
    op, body = draw(json_edit(base.body, "stripe"))
    return _checked_stripe(f"body_json_edit:{op}", body, base.headers, base, ctx)


@_stripe("body_deep_unsigned")
def _st_deep(draw, ctx, base):
    body = deep_json(draw(st.integers(DEEP_MIN, DEEP_MAX)), draw(st.sampled_from("[{")), True)
    return _checked_stripe("body_deep_unsigned", body, base.headers, base, ctx)


@_stripe("oversized")
def _st_oversized(draw, ctx, base):
    filler = draw(st.sampled_from([b" ", b"\n", b"x", b"\x00\xff"]))
    body = oversized(base.body, draw(st.integers(1, 300_000)), filler)
    signed = draw(st.booleans())
    headers = (
        with_header(
            base.headers, H_STRIPE, stripe_signature_header(body, ctx.secret, ctx.timestamp)
        )
        if signed
        else base.headers
    )
    transport = draw(st.sampled_from(["length", "chunked"]))
    return FuzzRequest(
        f"oversized:{transport}:{'signed' if signed else 'unsigned'}",
        body,
        headers,
        expect=frozenset({413}),
        transport=transport,
    )


@_stripe("unterminated")
def _st_unterminated(draw, ctx, base):
    return FuzzRequest("unterminated", base.body, base.headers, transport="unterminated")


@_stripe("header_drop")
def _st_drop(draw, ctx, base):
    near = draw(
        st.sampled_from([None, "Stripe-Signatures", "Stripe-Signatur", "X-Stripe-Signature"])
    )
    headers = with_header(base.headers, H_STRIPE, None)
    if near:
        headers = (*headers, (near, _signature(base.headers)))
    return _checked_stripe("header_drop", base.body, headers, base, ctx)


@_stripe("header_garble")
def _st_garble(draw, ctx, base):
    op, value = draw(mutated_text(_signature(base.headers)))
    headers = with_header(base.headers, H_STRIPE, value)
    return _checked_stripe(f"header_garble:{op}", base.body, headers, base, ctx)


@_stripe("header_random")
def _st_random_header(draw, ctx, base):
    if draw(st.booleans()):
        value = draw(HEADER_TEXT)
    else:
        keys = st.sampled_from(["t", "v1", "v0", "", "T", " v1"])
        items = draw(st.lists(st.tuples(keys, HEADER_TEXT), max_size=5))
        value = ",".join(f"{k}={v}" for k, v in items)
    headers = with_header(base.headers, H_STRIPE, value)
    return _checked_stripe("header_random", base.body, headers, base, ctx)


@_stripe("timestamp")
def _st_timestamp(draw, ctx, base):
    digest = _signature(base.headers).rsplit("v1=", 1)[1]
    t = ctx.timestamp
    stamp = draw(
        st.one_of(
            st.integers(-(10**15), 10**15).map(str),
            st.sampled_from(
                ["", "abc", f"{t}.0", f"{t}e0", f"-{t}", f"0x{t:x}", f"{t} {t}", f"{t}\u00b2"]
            ),
        )
    )
    layout = draw(st.sampled_from(["t_first", "v1_first", "t_twice", "no_t"]))
    if layout == "t_first":
        value = f"t={stamp},v1={digest}"
    elif layout == "v1_first":
        value = f"v1={digest},t={stamp}"
    elif layout == "t_twice":
        value = f"t={stamp},v1={digest},t={stamp}"
    else:
        value = f"v1={digest}"
    headers = with_header(base.headers, H_STRIPE, value)
    return _checked_stripe(f"timestamp:{layout}", base.body, headers, base, ctx)


@_stripe("signature_value")
def _st_signature_value(draw, ctx, base):
    digest = _signature(base.headers).rsplit("v1=", 1)[1]
    t = ctx.timestamp
    _op, bad = draw(mutated_text(digest))
    scheme = draw(st.sampled_from(["v1", "v0", "v2", "V1", "s1"]))
    layout = draw(st.sampled_from(["replace", "extra_bad", "scheme", "no_v1", "separator"]))
    if layout == "replace":
        value = f"t={t},v1={bad}"
    elif layout == "extra_bad":
        value = f"t={t},v1={bad},v1={draw(HEADER_TEXT)}"
    elif layout == "scheme":
        value = f"t={t},{scheme}={digest}"
    elif layout == "no_v1":
        value = f"t={t}"
    else:
        sep = draw(st.sampled_from([";", " ", "&", "|", "\t", ";v1="]))
        value = f"t={t}{sep}v1={digest}"
    headers = with_header(base.headers, H_STRIPE, value)
    return _checked_stripe(f"signature_value:{layout}", base.body, headers, base, ctx)


@_stripe("header_duplicate")
def _st_duplicate(draw, ctx, base):
    # Two Stripe-Signature headers arrive joined by ", ". With the authentic value as one
    # of them the whole may legitimately verify (Stripe reads any item order and extra
    # signatures), so neither copy is authentic: two garbles, or a garble and another
    # delivery's signature.
    original = _signature(base.headers)
    first = draw(mutated_text(original))[1]
    if draw(st.booleans()):
        second = draw(mutated_text(original))[1]
    else:
        second = _signature(draw(st.sampled_from(ctx.deliveries)).headers)
    headers = (*with_header(base.headers, H_STRIPE, None), (H_STRIPE, first), (H_STRIPE, second))
    return _checked_stripe("header_duplicate", base.body, headers, base, ctx)


@_stripe("wrong_secret")
def _st_wrong_secret(draw, ctx, base):
    secret = draw(st.one_of(st.sampled_from(ctx.other_secrets), st.text(min_size=1, max_size=40)))
    assume(secret != ctx.secret)
    value = stripe_signature_header(base.body, secret, ctx.timestamp)
    return FuzzRequest("wrong_secret", base.body, with_header(base.headers, H_STRIPE, value))


@_stripe("stale_or_future")
def _st_stale(draw, ctx, base):
    # Correctly signed, but outside the 300 s tolerance (with a margin for a slow run).
    offset = draw(st.one_of(st.integers(-(10**9), -400), st.integers(400, 10**9)))
    stamp = max(0, ctx.timestamp + offset)
    value = stripe_signature_header(base.body, ctx.secret, stamp)
    kind = "stale" if offset < 0 else "future"
    return FuzzRequest(
        f"stale_or_future:{kind}", base.body, with_header(base.headers, H_STRIPE, value)
    )


@_stripe("signed_other_time")
def _st_other_time(draw, ctx, base):
    # v1 computed for one timestamp, header naming another.
    other = ctx.timestamp + draw(st.sampled_from([-1, 1])) * draw(st.integers(1, 250))
    digest = stripe_signature_header(base.body, ctx.secret, other).rsplit("v1=", 1)[1]
    headers = with_header(base.headers, H_STRIPE, f"t={ctx.timestamp},v1={digest}")
    return FuzzRequest("signed_other_time", base.body, headers)


@_stripe("spliced")
def _st_spliced(draw, ctx, base):
    other = draw(st.sampled_from(ctx.deliveries))
    return _checked_stripe("spliced", base.body, other.headers, base, ctx)


@_stripe("signed_malformed")
def _st_signed_malformed(draw, ctx, base):
    kind, body = draw(malformed_event(json.loads(base.body), "stripe"))
    value = stripe_signature_header(body, ctx.secret, ctx.timestamp)
    return FuzzRequest(f"signed_malformed:{kind}", body, with_header(base.headers, H_STRIPE, value))


@_stripe("content_type")
def _st_content_type(draw, ctx, base):
    inner = _STRIPE[draw(st.sampled_from(["body_mutation", "header_garble", "spliced"]))](
        draw, ctx, base
    )
    content_type = draw(st.one_of(st.sampled_from(CONTENT_TYPES), HEADER_TEXT))
    return FuzzRequest(
        f"content_type+{inner.category.split(':')[0]}",
        inner.body,
        with_header(inner.headers, "Content-Type", content_type),
        inner.expect,
    )


@_stripe("stacked")
def _st_stacked(draw, ctx, base):
    body, headers = base.body, base.headers
    for _ in range(draw(st.integers(2, 4))):
        what = draw(st.sampled_from(["body", "garble", "drop", "duplicate", "content_type"]))
        if what == "body":
            body = draw(mutated_bytes(body))[1]
        elif what == "garble":
            headers = with_header(headers, H_STRIPE, draw(mutated_text(_signature(headers)))[1])
        elif what == "drop":
            headers = with_header(headers, H_STRIPE, None)
        elif what == "duplicate":
            headers = (*headers, (H_STRIPE, _signature(base.headers)))
        else:
            headers = with_header(headers, "Content-Type", draw(st.sampled_from(CONTENT_TYPES)))
    return _checked_stripe("stacked", body, headers, base, ctx)


STRIPE_CATEGORIES = tuple(sorted(_STRIPE))


@st.composite
def stripe_requests(draw: st.DrawFn, ctx: StripeContext) -> FuzzRequest:
    """One request to POST /webhooks/stripe that must be refused."""
    builder = _STRIPE[draw(st.sampled_from(STRIPE_CATEGORIES))]
    return builder(draw, ctx, draw(st.sampled_from(ctx.deliveries)))


def deliveries_differ(deliveries: Sequence[Delivery]) -> bool:
    """Bases must differ in body CRC, or splicing one's headers onto another could verify."""
    return len({zlib.crc32(d.body) for d in deliveries}) == len(deliveries)

"""Fuzzing both webhook routes: nothing unverified, malformed or oversized changes any state.

More than 10,000 requests, each derived from a valid signed PayPal or Stripe delivery and
then broken (tests/fuzz_strategies.py says how, and which mutations are excluded because they
could legitimately still verify). Every answer must be 400, 413 or 503 (each request carries
the narrower set it may get), and afterwards every table holds what it held before, the broker
is empty, and PayPal's certificate was fetched only from inside the allowed prefix.

Hypothesis runs derandomized, so a failure replays identically; it then shrinks to a small
falsifying request. The in-process Flask test client keeps the 10,400 requests to about
half a minute of CPU.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from core.settings import Settings
from tests.fuzz_strategies import (
    H_ALGO,
    H_ID,
    H_STRIPE,
    PAYPAL_CATEGORIES,
    STRIPE_CATEGORIES,
    Delivery,
    FuzzRequest,
    PayPalContext,
    StripeContext,
    deliveries_differ,
    header,
    paypal_may_verify,
    paypal_requests,
    stripe_may_verify,
    stripe_requests,
    with_header,
)
from tests.support.fakes.paypal_api import CERTS_PATH, FakePayPal, SigningCert, make_signing_cert
from tests.support.payloads import paypal as paypal_payloads
from tests.support.payloads import stripe as stripe_payloads
from webhook_receiver.app import create_app

pytestmark = pytest.mark.slow

WEBHOOK_ID = "WH-TEST"
PAYPAL_PATH = "/webhooks/paypal"
STRIPE_PATH = "/webhooks/stripe"
# Two requests per Hypothesis example halve its per-example overhead (about half the run).
REQUESTS_PER_EXAMPLE = 2
EXAMPLES_PER_ROUTE = 2_600
MIN_REQUESTS = 10_000
REFUSALS = frozenset({400, 413, 503})

# Outside the allowed prefix, the real signing certificate is served here too: a request
# that got it fetched from any of these would verify, answer 200 and fail the test.
BAIT_PATHS = (
    "/v1/notifications/certsX/CERT-fake-paypal",
    "/v1/notifications/CERT-fake-paypal",
    "/v1/notifications/bait/CERT-fake-paypal",
    "/v1/notifications/certs",
    "/bait",
)

FUZZ = settings(
    max_examples=EXAMPLES_PER_ROUTE,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    # The app, fakes and counters are the test's own (function-scoped on purpose: a fresh
    # database per run), and some examples are large or rejected by design.
    suppress_health_check=list(HealthCheck),
)


def cert_url_tricks(base: str, bait_base: str, name: str) -> tuple[str, ...]:
    """Certificate URLs outside the prefix `base + CERTS_PATH`, or spelled in a way the
    contract refuses outright; many would reach the real certificate if fetched."""
    hostport = base.split("://", 1)[1]
    port = hostport.rsplit(":", 1)[1]
    good = CERTS_PATH + name
    return (
        *(base + path for path in BAIT_PATHS),
        f"{base}{CERTS_PATH}",
        f"{base}{CERTS_PATH}../bait/{name}",
        f"{base}{CERTS_PATH}%2e%2e/bait/{name}",
        f"{base}{CERTS_PATH}..%2Fbait%2F{name}",
        f"{base}{CERTS_PATH}%43ERT-fake-paypal",
        f"{base}{CERTS_PATH}./{name}",
        f"{base}{CERTS_PATH}/{name}",
        f"{base}{good}/..",
        f"{base}{good}?x=1",
        f"{base}{good}#fragment",
        f"{base}{good} x",
        f"{base}{good}\t.pem",
        f"{base}{good}\x00",
        f"{base}{good}\xe9",
        f"{base}{CERTS_PATH}" + "a" * 3000,
        f"{base}\\@evil.invalid{good}",
        f"http://user@{hostport}{good}",
        f"http://user:pass@{hostport}{good}",
        f"http://{hostport}@evil.invalid{good}",
        f"http://localhost:{port}{good}",
        f"HTTP://LOCALHOST:{port}{good}",
        f"http://127.1:{port}{good}",
        f"http://2130706433:{port}{good}",
        f"http://0x7f000001:{port}{good}",
        f"http://[::ffff:127.0.0.1]:{port}{good}",
        f"http://127.0.0.1.:{port}{good}",
        f"http://127.0.0.1:{port}:{port}{good}",
        f"http://127.0.0.1:{port}\xa0{good}",
        f"https://{hostport}{good}",
        f"{bait_base}{good}",
        f"//{hostport}{good}",
        f"http:/{hostport}{good}",
        f"http:{hostport}{good}",
        f"ftp://{hostport}{good}",
        f"file://{good}",
        "file:///etc/passwd",
        good,
        "https://api.paypal.com/v1/notifications/certs/CERT-360caa42-fca2a594-a5cafa77",
        "https://api.paypal.com.evil.invalid/v1/notifications/certs/CERT-1",
        "https://evil.invalid/?https://api.paypal.com/v1/notifications/certs/",
    )


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def forger() -> SigningCert:
    """Another key behind a certificate that also names PayPal."""
    return make_signing_cert()


@pytest.fixture
def bait_paypal(paypal_signer: SigningCert):
    """A second certificate server, outside every allowed prefix, serving the real cert."""
    with FakePayPal(webhook_id=WEBHOOK_ID) as bait:
        bait.install_signing_cert(paypal_signer)
        yield bait


@pytest.fixture
def app(database_url: str, redis_clean: str, fake_paypal: FakePayPal):
    app = create_app(
        Settings(
            DATABASE_URL=database_url,
            REDIS_URL=redis_clean,
            PAYPAL_WEBHOOK_ID=WEBHOOK_ID,
            PAYPAL_CERT_URL_PREFIXES=fake_paypal.cert_prefix,
            STRIPE_WEBHOOK_SECRET=stripe_payloads.TEST_SECRET,
            # Every mutated certificate URL under the prefix is a new URL to fetch; this test
            # checks how each one is judged, test_security_paypal.py the fetch budget.
            PAYPAL_CERT_FETCH_BUDGET=1_000_000,
        )
    )
    yield app
    app.extensions["payguard"].close()


@pytest.fixture
def paypal_ctx(paypal_signer, forger, fake_paypal, bait_paypal) -> PayPalContext:
    cert_url = fake_paypal.signing_cert_url
    for path in BAIT_PATHS:
        fake_paypal.serve_cert(path, paypal_signer.cert_pem)
    past = datetime.now(UTC) - timedelta(days=800)
    unusable = (
        (fake_paypal.url(CERTS_PATH + "CERT-missing"), {503}),
        (fake_paypal.serve(CERTS_PATH + "CERT-server-error", b"oops", status=500), {503}),
        (fake_paypal.serve_cert(CERTS_PATH + "CERT-not-pem", b"not a certificate"), {400}),
        (fake_paypal.serve(CERTS_PATH + "CERT-too-large", b"-" * 100_000), {400}),
        (
            fake_paypal.serve(
                CERTS_PATH + "CERT-redirect", status=302, headers={"Location": cert_url}
            ),
            {400},
        ),
        # Our own key, so only the name or validity check can refuse these two.
        (
            fake_paypal.serve_cert(
                CERTS_PATH + "CERT-wrong-name",
                make_signing_cert("evil.example", key=paypal_signer.key).cert_pem,
            ),
            {400},
        ),
        (
            fake_paypal.serve_cert(
                CERTS_PATH + "CERT-expired",
                make_signing_cert(
                    key=paypal_signer.key, not_before=past, not_after=past + timedelta(days=365)
                ).cert_pem,
            ),
            {400},
        ),
        (fake_paypal.serve_cert(CERTS_PATH + "CERT-forger", forger.cert_pem), {400}),
    )
    return PayPalContext(
        signer=paypal_signer,
        other_signer=forger,
        webhook_id=WEBHOOK_ID,
        cert_url=cert_url,
        deliveries=paypal_deliveries(paypal_signer, cert_url),
        tricky_urls=cert_url_tricks(
            fake_paypal.base_url, bait_paypal.base_url, cert_url.rsplit("/", 1)[1]
        ),
        unusable_urls=tuple((url, frozenset(expect)) for url, expect in unusable),
    )


@pytest.fixture
def stripe_ctx() -> StripeContext:
    timestamp = int(time.time())
    return StripeContext(
        secret=stripe_payloads.TEST_SECRET,
        other_secrets=(
            stripe_payloads.ROTATED_SECRET,
            "whsec_",
            " ",
            stripe_payloads.TEST_SECRET[:-1],
        ),
        timestamp=timestamp,
        deliveries=stripe_deliveries(timestamp),
    )


def paypal_deliveries(signer: SigningCert, cert_url: str) -> tuple[Delivery, ...]:
    payloads = [paypal_payloads.capture_completed("org-fuzz", paypal_payloads.new_id())]
    for name in paypal_payloads.fixture_names():
        payload = paypal_payloads.fixture(name)
        payload["id"] = paypal_payloads.new_event_id()
        payloads.append(payload)
    deliveries = []
    for payload in payloads:
        body = json.dumps(payload).encode()
        deliveries.append(Delivery(body, tuple(signer.sign(WEBHOOK_ID, body, cert_url).items())))
    assert deliveries_differ(deliveries)
    return tuple(deliveries)


def stripe_deliveries(timestamp: int) -> tuple[Delivery, ...]:
    events = [
        stripe_payloads.payment_intent_succeeded(org_id="org_fuzz", amount=5000),
        stripe_payloads.charge_refunded(),
        stripe_payloads.invoice_paid(),
        stripe_payloads.customer_subscription_updated(),
        stripe_payloads.charge_dispute_created(),
        stripe_payloads.unhandled_event(),
    ]
    deliveries = []
    for event in events:
        body, signature = stripe_payloads.signed(event, timestamp=timestamp)
        deliveries.append(
            Delivery(body, (("Content-Type", "application/json"), (H_STRIPE, signature)))
        )
    assert deliveries_differ(deliveries)
    return tuple(deliveries)


# --------------------------------------------------------------------------- harness


class Harness:
    """Sends FuzzRequests through the Flask test client and counts what went where."""

    def __init__(self, app) -> None:
        self.client = app.test_client()
        self.sent: Counter[tuple[str, str]] = Counter()
        self.answers: Counter[tuple[str, int]] = Counter()

    def send(self, path: str, request: FuzzRequest) -> int:
        if request.transport == "length":
            response = self.client.post(path, data=request.body, headers=list(request.headers))
        else:
            # The test client always derives Content-Length from the body, so build the
            # environ of a chunked request ourselves: no length, and (for "chunked") the
            # server-terminated stream gunicorn gives the app for Transfer-Encoding: chunked.
            environ = EnvironBuilder(
                path=path,
                method="POST",
                headers=list(request.headers),
                input_stream=io.BytesIO(request.body),
            ).get_environ()
            del environ["CONTENT_LENGTH"]
            environ["HTTP_TRANSFER_ENCODING"] = "chunked"
            if request.transport == "chunked":
                environ["wsgi.input_terminated"] = True
            response = self.client.open(Request(environ))
        self.sent[(path, request.category.split(":")[0])] += 1
        self.answers[(path, response.status_code)] += 1
        return response.status_code

    def total(self) -> int:
        return sum(self.sent.values())

    def summary(self) -> str:
        lines = [f"{n:6d}  {path} {category}" for (path, category), n in sorted(self.sent.items())]
        lines += [
            f"{n:6d}  {path} -> {status}" for (path, status), n in sorted(self.answers.items())
        ]
        return "\n".join(lines)


def row_counts(engine) -> dict[str, int]:
    with engine.connect() as conn:
        tables = conn.execute(
            text(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
                "AND table_type = 'BASE TABLE' AND table_name <> 'alembic_version' ORDER BY 1"
            )
        ).scalars()
        return {t: conn.execute(text(f'SELECT count(*) FROM "{t}"')).scalar_one() for t in tables}


# --------------------------------------------------------------------------- tests


def test_fuzzed_deliveries_are_refused_and_change_nothing(
    app, engine, redis_clean, fake_paypal, bait_paypal, paypal_ctx, stripe_ctx
):
    harness = Harness(app)
    before = row_counts(engine)
    started = time.monotonic()

    def check(path: str, request: FuzzRequest) -> None:
        status = harness.send(path, request)
        assert status in REFUSALS and status in request.expect, (
            f"{path} {request.category}: answered {status}, expected {sorted(request.expect)}"
        )

    def batches(requests: st.SearchStrategy[FuzzRequest]) -> st.SearchStrategy[list[FuzzRequest]]:
        return st.lists(requests, min_size=REQUESTS_PER_EXAMPLE, max_size=REQUESTS_PER_EXAMPLE)

    @FUZZ
    @given(batches(paypal_requests(paypal_ctx)))
    def fuzz_paypal(requests: list[FuzzRequest]) -> None:
        for request in requests:
            check(PAYPAL_PATH, request)

    @FUZZ
    @given(batches(stripe_requests(stripe_ctx)))
    def fuzz_stripe(requests: list[FuzzRequest]) -> None:
        for request in requests:
            check(STRIPE_PATH, request)

    fuzz_paypal()
    fuzz_stripe()
    elapsed = time.monotonic() - started
    print(f"\n{harness.total()} requests in {elapsed:.1f}s\n{harness.summary()}")

    assert harness.total() >= MIN_REQUESTS, harness.summary()
    for path, categories in ((PAYPAL_PATH, PAYPAL_CATEGORIES), (STRIPE_PATH, STRIPE_CATEGORIES)):
        for category in categories:
            sent = sum(
                n for (p, c), n in harness.sent.items() if p == path and c.startswith(category)
            )
            assert sent >= 25, f"{path} {category} barely exercised"

    after = row_counts(engine)
    assert after == before
    assert after["webhook_events"] == after["outbox"] == after["journal"] == 0
    assert redis.Redis.from_url(redis_clean).dbsize() == 0, "something was published"

    fetched = Counter(fake_paypal.cert_hits)
    installed = paypal_ctx.cert_url.removeprefix(fake_paypal.base_url)
    assert {path for path in fetched if not path.startswith(CERTS_PATH)} == set()
    assert fetched[installed] == 1, "the allowed certificate is fetched once, then cached"
    assert bait_paypal.connections == 0


def test_unmutated_deliveries_are_accepted(app, engine, paypal_ctx, stripe_ctx):
    """The control: the same harness and deliveries, unmutated, are accepted, so the refusals
    above come from the mutations. The variants the fuzzer excludes as "may still verify"
    really do verify, so excluding them hides nothing."""
    harness = Harness(app)
    for path, deliveries in (
        (PAYPAL_PATH, paypal_ctx.deliveries),
        (STRIPE_PATH, stripe_ctx.deliveries),
    ):
        for delivery in deliveries:
            request = FuzzRequest("control", delivery.body, delivery.headers)
            assert harness.send(path, request) == 200

    pp = paypal_ctx.deliveries[0]
    lenient = with_header(pp.headers, H_ALGO, "sha256withrsa")
    assert paypal_may_verify(pp.body, lenient, pp)
    assert harness.send(PAYPAL_PATH, FuzzRequest("lenient", pp.body, lenient)) == 200
    # Padding is not lenience: a padded id used to be verified stripped and stored padded.
    padded = with_header(pp.headers, H_ID, f"  {header(pp.headers, H_ID)}\t")
    assert not paypal_may_verify(pp.body, padded, pp)
    assert harness.send(PAYPAL_PATH, FuzzRequest("padded", pp.body, padded)) == 400

    sp = stripe_ctx.deliveries[0]
    t, v1 = header(sp.headers, H_STRIPE).split(",")
    reordered = with_header(sp.headers, H_STRIPE, f"{v1}, v0=00ff, {t}")
    assert stripe_may_verify(sp.body, reordered, sp, stripe_ctx.timestamp)
    assert harness.send(STRIPE_PATH, FuzzRequest("lenient", sp.body, reordered)) == 200

    # A chunked body under the limit passes through whole and verifies.
    fresh = paypal_payloads.unknown_event()
    body = json.dumps(fresh).encode()
    signed = tuple(paypal_ctx.signer.sign(WEBHOOK_ID, body, paypal_ctx.cert_url).items())
    assert (
        harness.send(PAYPAL_PATH, FuzzRequest("chunked", body, signed, transport="chunked")) == 200
    )

    stored = row_counts(engine)
    expected = len(paypal_ctx.deliveries) + len(stripe_ctx.deliveries) + 1
    assert stored["webhook_events"] == stored["outbox"] == expected

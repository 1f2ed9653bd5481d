"""Fixtures for tests that run Payguard's own processes against fakes of PayPal and Twilio."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.fake_twilio import FakeTwilio
from tests.fakes.paypal_api import FakePayPal, SigningCert, make_signing_cert


@pytest.fixture(scope="session")
def paypal_signer() -> SigningCert:
    """A key and certificate like PayPal's message-verification one (generated once)."""
    return make_signing_cert()


@pytest.fixture
def fake_paypal(paypal_signer: SigningCert) -> Iterator[FakePayPal]:
    """A local PayPal (REST + certificates) serving `paypal_signer`'s certificate."""
    with FakePayPal(webhook_id="WH-TEST") as fake:
        fake.signing_cert_url = fake.install_signing_cert(paypal_signer)  # type: ignore[attr-defined]
        yield fake


@pytest.fixture
def fake_twilio() -> Iterator[FakeTwilio]:
    with FakeTwilio() as fake:
        yield fake


@pytest.fixture
def stack_env(app_env: dict[str, str], fake_paypal: FakePayPal) -> dict[str, str]:
    """app_env plus what a whole stack needs in a test: PayPal verification against the fake's
    certificate prefix, and retry and redelivery timings shortened from minutes to seconds."""
    env = dict(app_env)
    env.update(
        PAYPAL_CERT_URL_PREFIXES=fake_paypal.cert_prefix,
        TASK_RETRY_BASE_SECONDS="0.2",
        TASK_RETRY_MAX_SECONDS="1",
        TASK_MAX_RETRIES="3",
        BROKER_VISIBILITY_TIMEOUT="5",
        EVENT_REDELIVER_SECONDS="3",
        OUTBOX_GRACE_SECONDS="0.5",
        RELAY_INTERVAL_SECONDS="0.5",
    )
    return env


@pytest.fixture
def api_app(database_url: str, redis_clean: str):
    """The web app in-process, with `/v1`, on this test's database and the session Redis."""
    from tests.support.api import api_settings
    from webhook_receiver.app import create_app

    app = create_app(api_settings(database_url, redis_clean))
    yield app
    app.extensions["payguard"].engine.dispose()


@pytest.fixture
def api(api_app):
    """A `tests.support.api.Client` on `api_app`."""
    from tests.support.api import Client

    return Client(api_app.test_client())

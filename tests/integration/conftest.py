"""Fixtures for tests that run Payguard's own processes against fakes of PayPal and Twilio."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.stack import free_port
from tests.support.factories import TWILIO_PARENT_SID, TWILIO_PARENT_TOKEN
from tests.support.fakes.fake_twilio import FakeTwilio
from tests.support.fakes.paypal_api import FakePayPal, SigningCert, make_signing_cert


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
def twilio_env(stack_env: dict[str, str], fake_twilio: FakeTwilio) -> dict[str, str]:
    """stack_env plus Twilio: the parent account (tests.support.factories' TWILIO_PARENT_SID
    and TWILIO_PARENT_TOKEN) on `fake_twilio`, and a public base URL for status callbacks."""
    return dict(
        stack_env,
        TWILIO_ACCOUNT_SID=TWILIO_PARENT_SID,
        TWILIO_AUTH_TOKEN=TWILIO_PARENT_TOKEN,
        TWILIO_API_BASE=fake_twilio.base_url,
        PUBLIC_BASE_URL=f"http://127.0.0.1:{free_port()}",
    )


# --------------------------------------------------------------------------- both brokers

BROKERS = ("redis", "rabbitmq")


@pytest.fixture(params=BROKERS)
def broker_env(request: pytest.FixtureRequest, stack_env: dict[str, str]) -> dict[str, str]:
    """stack_env once per broker: Redis (REDIS_URL, the default) and RabbitMQ (BROKER_URL to
    a fresh vhost; Redis stays the shared store). The RabbitMQ variant skips, saying why,
    where no RabbitMQ answers."""
    if request.param == "redis":
        return stack_env
    rabbit = request.getfixturevalue("rabbitmq_clean")
    return dict(stack_env, BROKER_URL=rabbit.url)


class CuttableBroker:
    """A broker a test may take away (`stop()`) and bring back (`start()`): its own
    redis-server, or the session's RabbitMQ behind a TcpProxy that is cut and restored."""

    def __init__(self, kind: str, env: dict[str, str], stop, start) -> None:
        self.kind, self.env, self.stop, self.start = kind, env, stop, start


@pytest.fixture(params=BROKERS)
def cuttable_broker(
    request: pytest.FixtureRequest, stack_env: dict[str, str], tmp_path
) -> Iterator[CuttableBroker]:
    """For outage tests, once per broker. Redis: an own redis-server (it comes back empty:
    only the outbox remembers). RabbitMQ: a TcpProxy in front of the session vhost, cut to
    reset every connection and refuse new ones (the queues survive, as on a real restart of
    a durable broker)."""
    if request.param == "redis":
        from devtools.devstack import start_redis

        with start_redis(tmp_path / "own-redis") as server:
            yield CuttableBroker(
                "redis", dict(stack_env, REDIS_URL=server.url), server.stop, server.start
            )
        return
    from tests.support.fakes.tcp_proxy import TcpProxy

    rabbit = request.getfixturevalue("rabbitmq_clean")
    with TcpProxy(rabbit.host, rabbit.port) as proxy:
        env = dict(stack_env, BROKER_URL=rabbit.url_via("127.0.0.1", proxy.port))
        yield CuttableBroker("rabbitmq", env, proxy.cut, proxy.restore)


@pytest.fixture
def api_app(database_url: str, redis_clean: str):
    """The web app in-process, with `/v1`, on this test's database and the session Redis."""
    from tests.support.api import api_settings
    from webhook_receiver.app import create_app

    app = create_app(api_settings(database_url, redis_clean))
    yield app
    app.extensions["payguard"].close()


@pytest.fixture
def api(api_app):
    """A `tests.support.api.Client` on `api_app`."""
    from tests.support.api import Client

    return Client(api_app.test_client())


# --------------------------------------------------------------------------- top-ups


@pytest.fixture
def topup_paypal() -> Iterator[FakePayPal]:
    """A local PayPal with Orders v2 for top-ups."""
    with FakePayPal() as fake:
        yield fake


@pytest.fixture
def topup_stripe():
    """A local Stripe with Checkout Sessions for top-ups."""
    from tests.support.fakes.fake_stripe import FakeStripe

    with FakeStripe() as fake:
        yield fake


@pytest.fixture
def topup_app(database_url: str, redis_clean: str, topup_paypal: FakePayPal, topup_stripe):
    """The web app in-process with PayPal and Stripe top-ups pointed at the local fakes, and
    a provider timeout of 1 s instead of 5."""
    from tests.support.api import api_settings
    from tests.support.fakes.fake_stripe import STRIPE_KEY
    from webhook_receiver.app import create_app

    app = create_app(
        api_settings(
            database_url, redis_clean,
            PAYPAL_API_BASE=topup_paypal.base_url,
            PAYPAL_CLIENT_ID=topup_paypal.client_id,
            PAYPAL_CLIENT_SECRET=topup_paypal.client_secret,
            STRIPE_API_KEY=STRIPE_KEY,
            STRIPE_API_BASE=topup_stripe.base_url,
            TOP_UP_PROVIDER_TIMEOUT_SECONDS=1.0,
        )
    )  # fmt: skip
    yield app
    app.extensions["payguard"].close()


@pytest.fixture
def topup_api(topup_app):
    from tests.support.api import Client

    return Client(topup_app.test_client())

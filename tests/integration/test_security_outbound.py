"""Security of events sent to the host.

Threat model:
* SSRF through endpoint URLs: whoever may register an endpoint (an admin API key, an
  operator) must not be able to make Payguard POST into its own network (loopback, private
  ranges, link-local cloud metadata at 169.254.169.254, multicast, reserved): only
  `https://` to public addresses, unless OUTBOUND_ALLOW_PRIVATE=1 (dev, tests).
* DNS rebinding: a name that resolved to a public address at registration may resolve to an
  internal one later, so every connection resolves again, checks, and connects to the
  address it checked (never re-resolving); redirects are never followed.
* Forged events: the host trusts only deliveries signed with its endpoint's secret
  (Standard Webhooks HMAC); while a secret is rotated both sign, so neither side breaks.
* Replayed deliveries: the signature covers the webhook id and the try's own timestamp, so
  a receiver that checks freshness and remembers ids cannot be fed an old delivery again
  under a new timestamp.
* Secret leakage at rest: endpoint secrets are stored encrypted with PAYGUARD_SECRET_KEY
  (Fernet); a database dump alone does not let anyone forge events. A missing or malformed
  key is a clear configuration error, never a silent plaintext fallback.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text

from core import outbound
from core.db import run_in_transaction
from core.errors import InvalidInput
from core.outbound_net import UnsafeAddress, check_url, post
from core.settings import ConfigError, load_settings
from core.webhook_signing import verify
from tests.support.fakes.hook_endpoint import HookEndpoint

KEY = Fernet.generate_key().decode()
PUBLIC = "93.184.216.34"


def resolves_to(*addresses: str):
    return lambda host, port: list(addresses)


def policy(resolver, *, allow_private=False, key=KEY) -> outbound.OutboundPolicy:
    return outbound.OutboundPolicy(secret_key=key, allow_private=allow_private, resolver=resolver)


def create(engine, url, p, events=None):
    return run_in_transaction(
        engine, lambda c: outbound.create_endpoint(c, url, events, None, "test", policy=p)
    )


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "::1",
     "fe80::1", "224.0.0.1", "0.0.0.0", "100.64.0.1", "::ffff:127.0.0.1", "240.0.0.1"],
)  # fmt: skip
def test_endpoints_on_internal_addresses_are_refused_without_the_flag(engine, address):
    with pytest.raises(UnsafeAddress, match="non-public"):
        create(engine, "https://hooks.example.test/in", policy(resolves_to(address)))
    assert isinstance(UnsafeAddress("x"), InvalidInput)  # the API maps it to 422


def test_a_name_resolving_to_public_and_private_addresses_is_refused(engine):
    with pytest.raises(UnsafeAddress):
        create(engine, "https://hooks.example.test/", policy(resolves_to(PUBLIC, "10.0.0.1")))


@pytest.mark.parametrize(
    "url",
    ["http://hooks.example.test/", "ftp://hooks.example.test/", "https://user:pw@hooks.example.test/",
     "https:///nohost", "not a url", "https://hooks.example.test/#frag"],
)  # fmt: skip
def test_urls_other_than_https_to_a_host_are_refused(engine, url):
    with pytest.raises(UnsafeAddress):
        create(engine, url, policy(resolves_to(PUBLIC)))


def test_https_to_a_public_address_is_accepted_and_the_flag_allows_loopback(engine):
    endpoint, secret = create(engine, "https://hooks.example.test/in", policy(resolves_to(PUBLIC)))
    assert endpoint.url == "https://hooks.example.test/in" and secret.startswith("whsec_")
    local, _ = create(
        engine, "http://127.0.0.1:9/in", policy(resolves_to("127.0.0.1"), allow_private=True)
    )
    assert local.url.startswith("http://127.0.0.1")


def test_dns_rebinding_to_loopback_is_refused_at_connect_time():
    """Public when registered; the same name answers 127.0.0.1 when the delivery connects,
    where a server is listening: it receives nothing."""
    with HookEndpoint() as hook:
        port = int(hook.url.split(":")[2].split("/")[0])
        url = f"https://hooks.example.test:{port}/hooks"
        check_url(url, resolves_to(PUBLIC), allow_private=False)  # registration passes
        answer = post(
            url, b"{}", {}, resolver=resolves_to("127.0.0.1"), allow_private=False, timeout=5
        )
        assert not answer.ok and "refused" in (answer.error or "")
        assert hook.received() == []


def test_the_connection_goes_to_the_checked_address_not_a_second_lookup():
    calls = []

    def resolver(host, port):
        calls.append(host)
        return ["127.0.0.1"] if len(calls) == 1 else ["10.9.9.9"]

    with HookEndpoint() as hook:
        port = int(hook.url.split(":")[2].split("/")[0])
        answer = post(
            f"http://pinned.example.test:{port}/hooks", b"{}", {}, resolver=resolver,
            allow_private=True, timeout=5,
        )  # fmt: skip
        assert answer.ok and len(calls) == 1
        assert hook.received()[0].headers["host"].startswith("pinned.example.test")


def test_redirects_are_not_followed():
    with HookEndpoint(default=302) as hook:
        answer = post(hook.url, b"{}", {}, resolver=resolves_to("127.0.0.1"),
                      allow_private=True, timeout=5)  # fmt: skip
        assert answer.status_code == 302 and not answer.ok
        assert len(hook.received()) == 1


def test_secrets_are_stored_encrypted_and_need_the_key(engine):
    p = policy(resolves_to(PUBLIC))
    _endpoint, secret = create(engine, "https://hooks.example.test/in", p)
    with engine.connect() as c:
        stored = c.execute(text("SELECT secret_enc FROM outbound_endpoints")).scalar_one()
        dump = " ".join(str(v) for v in c.execute(text("SELECT * FROM outbound_endpoints")).one())
    assert secret not in dump and secret[len("whsec_") :] not in dump
    assert Fernet(KEY).decrypt(stored.encode()).decode() == secret
    with pytest.raises(ConfigError, match="PAYGUARD_SECRET_KEY"):
        create(engine, "https://hooks.example.test/2", policy(resolves_to(PUBLIC), key=None))


def test_a_malformed_secret_key_stops_the_process_naming_the_variable(monkeypatch):
    monkeypatch.setenv("PAYGUARD_SECRET_KEY", "too-short")
    with pytest.raises(ConfigError, match="PAYGUARD_SECRET_KEY"):
        load_settings()


def test_unknown_event_types_in_a_filter_are_refused(engine):
    with pytest.raises(InvalidInput, match=r"unknown event type 'wallet\.stolen'"):
        create(engine, "https://hooks.example.test/", policy(resolves_to(PUBLIC)),
               events=["wallet.credited", "wallet.stolen"])  # fmt: skip


def test_a_rotated_secret_signs_with_both_for_a_day_and_an_old_signature_never_fits_a_new_time(
    engine,
):
    p = policy(resolves_to(PUBLIC))
    endpoint, old = create(engine, "https://hooks.example.test/in", p)
    new = run_in_transaction(engine, lambda c: outbound.rotate_secret(c, endpoint.endpoint_id,
                                                                      "ops", policy=p))  # fmt: skip
    org = f"org-{uuid.uuid4().hex[:6]}"

    def record(c):
        from core import orgs

        orgs.create(c, org)
        outbound.record(c, "wallet.frozen", org, {"org_id": org, "reason": "x"})

    run_in_transaction(engine, record)
    [claim] = run_in_transaction(engine, lambda c: outbound.claim_due(c, 10, p))
    delivery = run_in_transaction(
        engine, lambda c: outbound.start_delivery(c, claim.delivery_id, claim.token, p)
    )
    headers = delivery.headers(1_700_000_000)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (new, old):
        assert verify(secret, headers["webhook-id"], 1_700_000_000, delivery.body,
                      headers["webhook-signature"])  # fmt: skip
        assert not verify(secret, headers["webhook-id"], 1_700_000_060, delivery.body,
                          headers["webhook-signature"])  # fmt: skip
    with engine.begin() as c:
        c.execute(text("UPDATE outbound_endpoints SET previous_until = now() - interval '1s'"))
        c.execute(text("UPDATE outbound_deliveries SET lease_until = now() + interval '1h'"))
    again = run_in_transaction(
        engine, lambda c: outbound.start_delivery(c, claim.delivery_id, claim.token, p)
    )
    assert len(again.headers(1)["webhook-signature"].split(" ")) == 1


def _events_worker(env):
    from tests.stack import BIN

    argv = [str(BIN / "celery"), "-A", "worker.celery_app:app", "worker", "--loglevel=INFO",
            "--concurrency=1", "--without-gossip", "--without-mingle", "-Q", "payguard.outbound"]  # fmt: skip
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def test_the_events_worker_refuses_to_start_without_the_key_once_an_endpoint_exists(
    engine, app_env
):
    create(engine, "https://hooks.example.test/in", policy(resolves_to(PUBLIC)))
    env = {k: v for k, v in app_env.items() if k != "PAYGUARD_SECRET_KEY"}
    run = _events_worker(env)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if "PAYGUARD_SECRET_KEY" in line]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr


def test_an_events_worker_needs_no_twilio_account(app_env, tmp_path):
    from tests.stack import start_worker

    env = {k: v for k, v in app_env.items() if not k.startswith("TWILIO_")}
    with start_worker(env, tmp_path, queues="payguard.outbound") as worker:
        assert worker.alive()

"""A leaked genuine PayPal transmission cannot carry a forged body.

PayPal's signature covers transmission id, time, webhook id and only a CRC32 of the body; a
body forged to the same CRC verifies. Payguard accepts each transmission id once."""

from __future__ import annotations

import json

from sqlalchemy import text

from core import orgs, wallet
from core.db import run_in_transaction
from core.settings import Settings
from tests.support.fakes.crc_forge import forge_same_crc
from tests.support.payloads import paypal as pp


def _client(make_app, database_url, redis_url, fake_paypal):
    settings = Settings(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        PAYPAL_WEBHOOK_ID="WH-TEST",
        PAYPAL_CERT_URL_PREFIXES=fake_paypal.cert_prefix,
    )
    return make_app(settings).test_client()


def test_forged_body_with_the_crc_of_a_used_transmission_is_refused(
    make_app, engine, database_url, redis_clean, fake_paypal, paypal_signer
):
    run_in_transaction(engine, lambda c: orgs.create(c, "victim"))
    run_in_transaction(engine, lambda c: orgs.create(c, "attacker"))
    client = _client(make_app, database_url, redis_clean, fake_paypal)
    genuine_event = pp.capture_completed("victim", pp.new_id(), value="10.00")
    genuine = json.dumps(genuine_event).encode()
    headers = paypal_signer.sign("WH-TEST", genuine, fake_paypal.signing_cert_url)
    assert client.post("/webhooks/paypal", data=genuine, headers=headers).status_code == 200

    forged_event = json.loads(genuine)
    forged_event["id"] = pp.new_event_id()
    forged_event["resource"]["custom_id"] = "attacker"
    forged_event["resource"]["amount"]["value"] = "99999.00"
    forged = forge_same_crc(genuine, forged_event)
    answer = client.post("/webhooks/paypal", data=forged, headers=headers)

    assert answer.status_code == 400, answer.get_json()
    assert answer.get_json()["cause"] == "replay"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM webhook_events")).scalar() == 1
    assert run_in_transaction(engine, lambda c: wallet.show(c, "attacker")).balance_cents == 0


def test_a_genuine_retry_of_the_same_transmission_is_a_duplicate(
    make_app, engine, database_url, redis_clean, fake_paypal, paypal_signer
):
    client = _client(make_app, database_url, redis_clean, fake_paypal)
    body = json.dumps(pp.capture_completed("anyone", pp.new_id())).encode()
    headers = paypal_signer.sign("WH-TEST", body, fake_paypal.signing_cert_url)

    first = client.post("/webhooks/paypal", data=body, headers=headers)
    again = client.post("/webhooks/paypal", data=body, headers=headers)

    assert (first.status_code, first.get_json()["status"]) == (200, "accepted")
    assert (again.status_code, again.get_json()["status"]) == (200, "duplicate")

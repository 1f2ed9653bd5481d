"""The Twilio gateway against a real local HTTP server faking Twilio (tests/support/fakes/fake_twilio).

The point of these tests is the send outcome: only what certainly never reached Twilio may
be retried; anything that may have created a message is UNKNOWN.
"""

import contextlib
import logging
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
from urllib3.exceptions import (
    ConnectTimeoutError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    ReadTimeoutError,
    SSLError,
)

from core.providers.twilio.gateway import (
    AccountOutcome,
    ConsoleGateway,
    SendOutcome,
    TwilioGateway,
    _never_sent,
    build_gateway,
    validate_status_callback,
)
from core.settings import Settings
from tests.support.fakes.fake_twilio import (
    FakeTwilio,
    Reply,
    signed_status_callback,
    status_callback_params,
    unused_port,
)

PARENT = "AC" + "1" * 32
TOKEN = "parent-auth-token"
SUB = "AC" + "2" * 32
OTHER_SUB = "AC" + "3" * 32
SERVICE = "MG" + "4" * 32
FROM = "+15005550001"
TO = "+15005550006"
CALLBACK = "https://payguard.example.com/webhooks/twilio/status"
TIMEOUT = (0.5, 0.3)  # (connect, read): small, so timeout tests stay fast


@pytest.fixture
def fake():
    with FakeTwilio(credentials=(PARENT, TOKEN), hang_seconds=3.0) as server:
        yield server


@pytest.fixture
def gateway(fake):
    gw = TwilioGateway(PARENT, TOKEN, api_base=fake.base_url, timeout=TIMEOUT)
    yield gw
    gw.close()


def send(gw, sender=FROM, sub=SUB, body="Your code is 1234"):
    return gw.send_message(sub, sender, TO, body, status_callback=CALLBACK)


# --- sending --------------------------------------------------------------------------------


def test_accepted_message_goes_to_the_subaccount_with_parent_credentials(gateway, fake):
    result = send(gateway)

    assert result.outcome is SendOutcome.ACCEPTED
    assert re.fullmatch(r"SM[0-9a-f]{32}", result.sid)
    assert result.status == "queued"
    assert result.num_segments == 1
    assert result.price is None
    [request] = fake.requests("messages")
    assert request.method == "POST"
    assert request.path == f"/2010-04-01/Accounts/{SUB}/Messages.json"
    assert request.auth == (PARENT, TOKEN)
    assert request.params == {
        "To": TO,
        "From": FROM,
        "Body": "Your code is 1234",
        "StatusCallback": CALLBACK,
    }
    assert [m["sid"] for m in fake.messages(SUB)] == [result.sid]


def test_price_and_segments_are_read_from_twilios_answer(gateway, fake):
    fake.script("messages", [Reply(201, body={"price": "-0.00790", "num_segments": "3"})])

    result = send(gateway)

    assert result.price == Decimal("-0.00790")
    assert result.price_unit == "USD"
    assert result.num_segments == 3


def test_messaging_service_sender_goes_as_messaging_service_sid(gateway, fake):
    result = send(gateway, sender=SERVICE)

    assert result.outcome is SendOutcome.ACCEPTED
    assert result.status == "accepted"
    [request] = fake.requests("messages")
    assert request.params["MessagingServiceSid"] == SERVICE
    assert "From" not in request.params


def test_400_is_rejected_with_twilios_code_and_nothing_is_sent(gateway, fake):
    fake.script("messages", [400])

    result = send(gateway)

    assert result.outcome is SendOutcome.REJECTED
    assert not result.may_have_been_sent
    assert (result.http_status, result.error_code) == (400, 21211)
    assert "not a valid phone number" in result.error_message
    assert fake.messages() == []


def test_a_suspended_subaccount_is_refused_by_twilio(gateway, fake):
    fake.set_account_status(SUB, "suspended")

    result = send(gateway)

    assert result.outcome is SendOutcome.REJECTED
    assert result.error_code == 10001


def test_429_is_safe_to_retry_and_the_retry_is_accepted(gateway, fake):
    fake.script("messages", [429, 201])

    first = send(gateway)
    second = send(gateway)

    assert first.outcome is SendOutcome.RETRY_SAFE
    assert (first.http_status, first.error_code) == (429, 20429)
    assert second.outcome is SendOutcome.ACCEPTED
    assert len(fake.messages(SUB)) == 1


def test_connection_refused_is_safe_to_retry():
    gw = TwilioGateway(PARENT, TOKEN, api_base=f"http://127.0.0.1:{unused_port()}", timeout=TIMEOUT)

    result = send(gw)

    assert result.outcome is SendOutcome.RETRY_SAFE
    assert not result.may_have_been_sent


@pytest.fixture
def full_backlog_port():
    """A local port whose listen queue is full: new connections hang in SYN, never accepted."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.05)
    yield port
    for s in [*fillers, listener]:
        s.close()


def test_connect_timeout_is_safe_to_retry(full_backlog_port):
    gw = TwilioGateway(
        PARENT, TOKEN, api_base=f"http://127.0.0.1:{full_backlog_port}", timeout=(0.2, 5)
    )

    started = time.monotonic()
    result = send(gw)

    assert result.outcome is SendOutcome.RETRY_SAFE
    assert time.monotonic() - started < 2  # the connect timeout fired, not the read one


def test_read_timeout_is_unknown_and_the_message_did_reach_twilio(gateway, fake):
    fake.script("messages", ["timeout"])

    started = time.monotonic()
    result = send(gateway)

    assert result.outcome is SendOutcome.UNKNOWN
    assert result.may_have_been_sent
    assert time.monotonic() - started < 2
    assert fake.message_count(SUB) == 1
    assert len(fake.messages(SUB)) == 1


def test_connection_lost_after_sending_is_unknown(gateway, fake):
    fake.script("messages", ["drop"])

    assert send(gateway).outcome is SendOutcome.UNKNOWN
    assert len(fake.messages(SUB)) == 1


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_is_unknown(gateway, fake, status):
    fake.script("messages", [status])

    result = send(gateway)

    assert result.outcome is SendOutcome.UNKNOWN
    assert result.http_status == status


def test_an_unreadable_success_answer_is_unknown(gateway, fake, monkeypatch):
    def garbage(self, status, payload):
        data = b"<html>not json</html>"
        self.close_connection = True
        self.send_response(201)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    monkeypatch.setattr("tests.support.fakes.fake_twilio._Handler.send_json", garbage)
    assert send(gateway).outcome is SendOutcome.UNKNOWN


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("AC" + "2" * 32, FROM, "4155550100", "hi"), "E.164"),
        (("AC" + "2" * 32, "not-a-sender", TO, "hi"), "E.164"),
        (("AC" + "2" * 32, FROM, TO, ""), "empty"),
        (("../Calls", FROM, TO, "hi"), "account SID"),
    ],
)
def test_malformed_arguments_raise_before_anything_is_sent(gateway, fake, args, message):
    with pytest.raises(ValueError, match=message):
        gateway.send_message(*args)
    assert fake.requests() == []


def test_every_twilio_domain_is_pointed_at_the_api_base(gateway, fake):
    # The library builds https://messaging.twilio.com/...; it must still land on the fake.
    fake_response = gateway.client.request("GET", "https://messaging.twilio.com/v1/Services")
    assert fake_response.status_code == 404
    [request] = fake.requests()
    assert request.path == "/v1/Services"


def test_two_hundred_concurrent_sends_are_each_received_once(fake):
    # The point is concurrency through one shared client, not latency: generous timeouts and
    # 32 threads, so a busy machine cannot turn a slow answer into a read timeout (UNKNOWN).
    gateway = TwilioGateway(PARENT, TOKEN, api_base=fake.base_url, timeout=(10.0, 60.0))
    subs = [f"AC{i:032x}" for i in range(1, 5)]
    fake.script("messages", [429] * 20)
    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(lambda i: send(gateway, sub=subs[i % 4]), range(200)))
    finally:
        gateway.close()

    outcomes = [r.outcome for r in results]
    assert outcomes.count(SendOutcome.RETRY_SAFE) == 20
    assert outcomes.count(SendOutcome.ACCEPTED) == 180
    assert len({r.sid for r in results if r.sid}) == 180
    assert [fake.message_count(s) for s in subs] == [50, 50, 50, 50]
    assert len(fake.messages()) == 180


# --- subaccount status ----------------------------------------------------------------------


def test_suspend_then_reactivate_a_subaccount(gateway, fake):
    suspended = gateway.set_account_status(SUB, "suspended")
    assert (suspended.outcome, suspended.status) == (AccountOutcome.OK, "suspended")
    assert fake.account_status(SUB) == "suspended"

    active = gateway.set_account_status(SUB, "active")
    assert (active.outcome, active.status) == (AccountOutcome.OK, "active")
    assert fake.account_status(SUB) == "active"

    requests_ = fake.requests("account", SUB)
    assert [r.params for r in requests_] == [{"Status": "suspended"}, {"Status": "active"}]
    assert {(r.method, r.path, r.auth) for r in requests_} == {
        ("POST", f"/2010-04-01/Accounts/{SUB}.json", (PARENT, TOKEN))
    }
    assert fake.account_status(OTHER_SUB) == "active"


@pytest.mark.parametrize(
    "behaviour",
    [429, Reply(400, code=20429, message="Too Many Requests"), 500, 503, "timeout", "drop"],
)
def test_transient_account_update_failures_are_retried(gateway, fake, behaviour):
    fake.script("account", [behaviour])

    assert gateway.set_account_status(SUB, "suspended").outcome is AccountOutcome.RETRY


def test_rate_limited_account_update_reports_code_20429(gateway, fake):
    fake.script("account", [429])

    result = gateway.set_account_status(SUB, "suspended")

    assert (result.outcome, result.http_status, result.error_code) == (
        AccountOutcome.RETRY,
        429,
        20429,
    )


def test_account_update_with_twilio_down_is_retried():
    gw = TwilioGateway(PARENT, TOKEN, api_base=f"http://127.0.0.1:{unused_port()}", timeout=TIMEOUT)
    assert gw.set_account_status(SUB, "active").outcome is AccountOutcome.RETRY


@pytest.mark.parametrize("status", [400, 401, 404])
def test_refused_account_update_fails(gateway, fake, status):
    fake.script("account", [status])

    result = gateway.set_account_status(SUB, "suspended")

    assert (result.outcome, result.http_status) == (AccountOutcome.FAILED, status)


def test_reactivating_a_closed_subaccount_fails(gateway, fake):
    fake.set_account_status(SUB, "closed")

    assert gateway.set_account_status(SUB, "active").outcome is AccountOutcome.FAILED


@pytest.mark.parametrize("status", ["closed", "Suspended", ""])
def test_closing_or_unknown_status_is_refused_locally(gateway, fake, status):
    refused = "never closes" if status == "closed" else "must be 'suspended' or 'active'"
    with pytest.raises(ValueError, match=refused):
        gateway.set_account_status(SUB, status)
    with pytest.raises(ValueError, match=refused):
        ConsoleGateway().set_account_status(SUB, status)
    assert fake.requests() == []


def test_wrong_credentials_are_refused(fake):
    gw = TwilioGateway(PARENT, "wrong-token", api_base=fake.base_url, timeout=TIMEOUT)

    result = send(gw)

    assert (result.outcome, result.error_code) == (SendOutcome.REJECTED, 20003)
    assert gw.set_account_status(SUB, "active").outcome is AccountOutcome.FAILED


# --- transport classification ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "never_sent"),
    [
        (ConnectTimeoutError("connect timed out"), True),
        (NewConnectionError(None, "Connection refused"), True),
        (NameResolutionError("api.twilio.com", None, OSError("no such host")), True),
        (ReadTimeoutError(None, "/", "read timed out"), False),
        (ProtocolError("Connection aborted."), False),
        (SSLError("handshake failed"), False),
        (ProxyError("Unable to connect to proxy", OSError("refused")), False),
    ],
)
def test_only_connection_phase_failures_count_as_never_sent(exc, never_sent):
    assert _never_sent(exc) is never_sent


# --- console backend and wiring -------------------------------------------------------------


def test_console_gateway_only_logs(caplog):
    gw = ConsoleGateway()
    with caplog.at_level(logging.INFO, logger="core.providers.twilio.gateway"):
        result = gw.send_message(SUB, SERVICE, TO, "hello €", status_callback=CALLBACK)

    assert result.outcome is SendOutcome.ACCEPTED
    assert result.sid.startswith("SMconsole") and len(result.sid) == 34
    assert result.num_segments == 1
    assert result.sid in caplog.text and TO in caplog.text
    assert gw.set_account_status(SUB, "suspended").outcome is AccountOutcome.OK
    with pytest.raises(ValueError, match=r"not an E\.164 phone number"):
        gw.send_message(SUB, FROM, "nope", "hi")


def test_build_gateway_uses_the_console_without_twilio_settings():
    settings = Settings(TWILIO_ACCOUNT_SID=None, TWILIO_AUTH_TOKEN=None)
    assert isinstance(build_gateway(settings), ConsoleGateway)


def test_build_gateway_points_the_real_gateway_at_twilio_api_base(fake):
    settings = Settings(
        TWILIO_ACCOUNT_SID=PARENT,
        TWILIO_AUTH_TOKEN=TOKEN,
        TWILIO_API_BASE=fake.base_url,
        PUBLIC_BASE_URL="https://payguard.example.com",
    )
    gw = build_gateway(settings, timeout=TIMEOUT)

    assert isinstance(gw, TwilioGateway)
    assert send(gw).outcome is SendOutcome.ACCEPTED
    assert fake.message_count(SUB) == 1


def test_the_fake_closes_promptly_while_an_answer_hangs():
    fake = FakeTwilio(hang_seconds=30).start()
    fake.script("messages", ["timeout"])
    gw = TwilioGateway(PARENT, TOKEN, api_base=fake.base_url, timeout=(0.5, 10))
    worker = threading.Thread(target=send, args=(gw,))
    worker.start()
    while fake.message_count() == 0:
        time.sleep(0.01)

    started = time.monotonic()
    fake.close()
    worker.join(timeout=5)

    assert time.monotonic() - started < 2
    assert not worker.is_alive()


# --- status callbacks -----------------------------------------------------------------------


def test_status_callback_with_a_good_signature_is_valid():
    params, signature = signed_status_callback(
        TOKEN, CALLBACK, status_callback_params("SM" + "a" * 32, "delivered", SUB)
    )
    assert validate_status_callback(TOKEN, CALLBACK, params, signature)


def test_status_callback_signed_with_a_port_in_the_url_is_valid():
    params, signature = signed_status_callback(
        TOKEN, "https://payguard.example.com:443/webhooks/twilio/status", {"MessageStatus": "sent"}
    )
    assert validate_status_callback(TOKEN, CALLBACK, params, signature)


def test_status_callback_with_a_bad_signature_is_refused():
    params, signature = signed_status_callback(
        TOKEN, CALLBACK, status_callback_params("SM" + "a" * 32, "delivered", SUB)
    )
    tampered = {**params, "MessageStatus": "failed"}

    assert not validate_status_callback(TOKEN, CALLBACK, tampered, signature)
    assert not validate_status_callback("another-token", CALLBACK, params, signature)
    assert not validate_status_callback(TOKEN, CALLBACK + "?x=1", params, signature)
    assert not validate_status_callback(TOKEN, CALLBACK, params, "")
    assert not validate_status_callback(TOKEN, CALLBACK, params, None)
    assert not validate_status_callback(TOKEN, CALLBACK, params, signature[:-2] + "AA")

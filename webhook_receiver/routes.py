"""HTTP routes: each verifies, stores, enqueues and answers in a few lines."""

from __future__ import annotations

from functools import partial

from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from webhook_receiver.receiver import (
    BadRequest,
    Receiver,
    Unavailable,
    accept,
    answer,
    bearer_token_matches,
    parse_json_object,
    raw_body,
    readiness,
)

blueprint = Blueprint("payguard", __name__)


def _receiver() -> Receiver:
    return current_app.extensions["payguard"]


@blueprint.errorhandler(BadRequest)
def _bad_request(exc: BadRequest) -> Response:
    provider = request.path.rsplit("/", 1)[-1]
    _receiver().metrics.VERIFY_FAILURES.labels(provider, exc.cause).inc()
    _receiver().metrics.WEBHOOKS.labels(provider, "400").inc()
    return answer(400, error=str(exc), cause=exc.cause)


@blueprint.errorhandler(Unavailable)
def _unavailable(exc: Unavailable) -> Response:
    _receiver().metrics.WEBHOOKS.labels(request.path.rsplit("/", 1)[-1], "503").inc()
    return answer(503, error=str(exc))


@blueprint.errorhandler(RequestEntityTooLarge)
def _too_large(exc: RequestEntityTooLarge) -> Response:
    _receiver().metrics.WEBHOOKS.labels(request.path.rsplit("/", 1)[-1], "413").inc()
    return answer(413, error="body over 1 MiB")


@blueprint.post("/webhooks/paypal")
def paypal_webhook() -> Response:
    from core.errors import MalformedEvent
    from core.providers.paypal import events as paypal_events
    from core.providers.paypal.verify import InvalidWebhook, VerificationUnavailable

    receiver = _receiver()
    if receiver.paypal_verifier is None:
        return answer(404, error="PayPal is not configured")
    body = raw_body()
    try:
        transmission = receiver.paypal_verifier.verify(request.headers, body)
    except InvalidWebhook as exc:
        raise BadRequest(exc.cause, f"verification failed: {exc}") from None
    except VerificationUnavailable as exc:
        receiver.metrics.VERIFY_FAILURES.labels("paypal", "unavailable").inc()
        raise Unavailable(f"verification unavailable: {exc}") from None
    try:
        event_id, event_type = paypal_events.event_meta(parse_json_object(body))
    except MalformedEvent as exc:
        raise BadRequest("payload", str(exc)) from None
    response = accept(
        receiver, "paypal", event_id, event_type, dict(request.headers), body,
        transmission_id=transmission.transmission_id,
    )  # fmt: skip
    receiver.metrics.WEBHOOKS.labels("paypal", "200").inc()
    return response


@blueprint.post("/webhooks/stripe")
def stripe_webhook() -> Response:
    from core.providers.stripe.verify import InvalidStripeWebhook, verify_stripe

    receiver = _receiver()
    secrets = receiver.settings.stripe_secrets
    if not secrets:
        return answer(404, error="Stripe is not configured")
    body = raw_body()
    try:
        event = verify_stripe(body, request.headers.get("Stripe-Signature"), secrets)
    except InvalidStripeWebhook as exc:
        raise BadRequest(exc.cause, f"verification failed: {exc}") from None
    response = accept(receiver, "stripe", event["id"], event["type"], dict(request.headers), body)
    receiver.metrics.WEBHOOKS.labels("stripe", "200").inc()
    return response


@blueprint.get("/healthz")
def healthz() -> Response:
    return answer(200, status="ok")


@blueprint.get("/readyz")
def readyz() -> Response:
    ok, checks = readiness(_receiver())
    return answer(200 if ok else 503, status="ready" if ok else "unavailable", checks=checks)


@blueprint.get("/metrics")
def metrics() -> Response:
    token = _receiver().settings.METRICS_TOKEN
    if not token:  # not configured: as if there were no such route
        return answer(404, error="not found")
    if not bearer_token_matches(request.headers.get("Authorization", ""), token):
        response = answer(401, error="a bearer token is required")
        response.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    body, content_type = _receiver().metrics.render()
    return Response(body, content_type=content_type)


@blueprint.post("/webhooks/twilio/status")
def twilio_status() -> Response:
    from core import messages
    from core.errors import InvalidInput
    from core.providers.twilio import callbacks
    from core.sending import Policy

    receiver = _receiver()
    signer = callbacks.signer(
        receiver.settings, _status_callback_url(receiver), request.form,
        request.headers.get("X-Twilio-Signature"), partial(_subaccount_token, receiver),
    )  # fmt: skip
    if signer is False:
        receiver.metrics.WEBHOOKS.labels("twilio", "403").inc()
        return answer(403, error="invalid X-Twilio-Signature")
    try:
        new = callbacks.apply(
            receiver.engine, request.form, message_id=request.args.get("m"), signer=signer,
            policy=Policy.from_settings(receiver.settings),
        )  # fmt: skip
    except InvalidInput as exc:
        raise BadRequest("payload", str(exc)) from None
    except messages.WrongSigner:
        receiver.metrics.WEBHOOKS.labels("twilio", "403").inc()
        return answer(403, error="signed by a subaccount that did not send this message")
    except Exception as exc:
        raise Unavailable(f"storage unavailable: {type(exc).__name__}") from None
    receiver.metrics.WEBHOOKS.labels("twilio", "200").inc()
    return answer(200, status=new or "ignored")


def _status_callback_url(receiver: Receiver) -> str:
    """The URL Twilio signed: the public one, query (`?m=`) included, as Twilio called it."""
    base = receiver.settings.PUBLIC_BASE_URL or request.host_url
    url = f"{base.rstrip('/')}/webhooks/twilio/status"
    if request.query_string:
        url += "?" + request.query_string.decode("latin-1")
    return url


def _subaccount_token(receiver: Receiver, account: str) -> str | None:
    try:
        return receiver.subaccount_token(account)
    except Exception as exc:
        raise Unavailable(f"cannot check the signature now: {type(exc).__name__}") from None

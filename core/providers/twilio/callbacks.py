"""Twilio's message status callbacks: who signed one (the parent account, or a subaccount of
ours with its own token), and applying it to its message (core/messages.py) in one
transaction. The receiver's route only reads the request and renders the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from sqlalchemy import Engine

from core import messages, sending, sql
from core.db import run_in_transaction
from core.errors import InvalidInput
from core.providers.twilio.gateway import build_gateway, validate_status_callback
from core.settings import Settings

TOKEN_CACHE_SECONDS = 3600.0
TOKEN_FAILURE_CACHE_SECONDS = 10.0

# subaccount SID → (its token or None, until when that answer holds, by the caller's clock)
TokenCache = dict[str, tuple[str | None, float]]


_SUBACCOUNT_TOKEN = sql.statement(
    "twilio.callbacks.subaccount_token",
    """
    SELECT 1 FROM organizations WHERE twilio_subaccount_sid = :subaccount_sid
    UNION ALL SELECT 1 FROM messages WHERE twilio_subaccount_sid = :subaccount_sid LIMIT 1
    """,
)


def subaccount_token(
    engine: Engine,
    settings: Settings,
    cache: TokenCache,
    subaccount_sid: str,
    clock: Callable[[], float],
) -> str | None:
    """The auth token of a subaccount of ours (an organization's, or one a message was
    sent through), asked of Twilio once an hour at most; None for a subaccount that is
    not ours (never asked) or whose token Twilio would not give. That failure is
    remembered for seconds only: Twilio does not send a refused callback again, so an
    hour of refusals would lose an hour of them, while remembering it at all keeps a
    flood of forged callbacks from becoming a flood of requests to Twilio."""
    cached = cache.get(subaccount_sid)
    if cached is not None and cached[1] > clock():
        return cached[0]
    with engine.connect() as conn:
        ours = conn.execute(
            _SUBACCOUNT_TOKEN,
            {"subaccount_sid": subaccount_sid},
        ).first()
    if ours is None or not settings.twilio_configured:
        return None
    gateway = build_gateway(settings, timeout=(2.0, 5.0))
    try:
        token = gateway.subaccount_auth_token(subaccount_sid)
    finally:
        gateway.close()
    ttl = TOKEN_CACHE_SECONDS if token else TOKEN_FAILURE_CACHE_SECONDS
    cache[subaccount_sid] = (token, clock() + ttl)
    return token


def signer(
    settings: Settings,
    url: str,
    form: Mapping[str, str],
    signature: str | None,
    token_of: Callable[[str], str | None],
) -> str | Literal[False] | None:
    """Who signed this callback: None for the parent account, a subaccount SID for that
    subaccount's own token, False for nobody we know (never True: `is False` tells a
    refusal from the parent's None). `url` is the public one Twilio called, query (`?m=`)
    included; `form` its fields (Flask's request.form); `token_of` is `subaccount_token`,
    bound."""
    if validate_status_callback(settings.TWILIO_AUTH_TOKEN or "", url, form, signature):
        return None
    account = form.get("AccountSid")
    if not signature or not account or account == settings.TWILIO_ACCOUNT_SID:
        return False
    # Twilio may sign a subaccount's callbacks with the subaccount's own token.
    token = token_of(account)
    if token and validate_status_callback(token, url, form, signature):
        return account
    return False


def apply(
    engine: Engine,
    form: Mapping[str, Any],
    *,
    message_id: str | None,
    signer: str | None,
    policy: sending.Policy,
) -> str | None:
    """Apply one verified callback to its message; the message's new status, or None when
    nothing moved. InvalidInput without MessageSid or MessageStatus; messages.WrongSigner
    when a subaccount signed for a message it did not send."""
    sid, status = form.get("MessageSid"), form.get("MessageStatus")
    if not sid or not status:
        raise InvalidInput("MessageSid and MessageStatus are required")
    return run_in_transaction(
        engine,
        lambda c: messages.apply_status_callback(
            c, sid, status, price=form.get("Price"), price_unit=form.get("PriceUnit"),
            num_segments=form.get("NumSegments"), policy=policy, signer=signer,
            message_id=message_id,
        ),
    )  # fmt: skip

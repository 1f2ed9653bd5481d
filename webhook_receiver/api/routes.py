"""The routes of `/v1`: each checks what the key may reach, calls one use case in core,
and renders its answer. Declarations (scope, body, answers) feed the OpenAPI document."""

from __future__ import annotations

import base64
import binascii
import logging
import re
from typing import Any

from flask import Response

from core import (
    audit,
    campaigns,
    idempotency,
    messages,
    outbound,
    outbox,
    overview,
    sending,
    topups,
    wallet,
)
from core.errors import InvalidInput
from core.idempotency import KeysConflict, Stored
from core.providers.ports import ProviderRefused, ProviderUnavailable
from core.send_batch import SEND_BATCH_TASK
from core.settings import ConfigError
from webhook_receiver.api import openapi
from webhook_receiver.api import schemas as s
from webhook_receiver.api.problems import Problem, invalid
from webhook_receiver.api.registry import Call, Reply, endpoint

log = logging.getLogger(__name__)

ORG = {"org_id": s.ORG_ID_PATTERN}
MESSAGES_ROUTE = "POST /v1/messages"
BATCH_ROUTE = "POST /v1/messages/batch"
BATCH_MAX_BODY = 8 * 1024 * 1024
REPLAYED = {"Idempotent-Replayed": "true"}
_ID = re.compile(s.ORG_ID_PATTERN)
_MESSAGE_ID = re.compile(s.MESSAGE_ID_PATTERN)


def _audit(call: Call, conn, action: str, org_id: str | None, details: dict) -> None:
    audit.record(
        conn, actor=call.actor, action=action, org_id=org_id,
        details={**details, "key_id": call.key.key_id},
    )  # fmt: skip


def _claim(call: Call, conn, org_id: str, route: str, key: str) -> Stored | None:
    """The first answer under this Idempotency-Key, or None after claiming it; the same key
    with another body is 422."""
    try:
        return idempotency.claim(conn, org_id, route, key, call.document, call.key.key_id)
    except KeysConflict:
        raise invalid(
            [{"field": "", "message": "this Idempotency-Key was used with another body"}],
            "Idempotency-Key reused with another body",
        ) from None


# ---------------------------------------------------------------- the document


@endpoint(
    "GET", "/openapi.json", summary="this OpenAPI 3.1 document", scope=None, answers={200: None}
)
def openapi_document(call: Call) -> Reply:
    return 200, openapi.document()


# ---------------------------------------------------------------- organizations


@endpoint(
    "POST",
    "/organizations",
    summary="register an organization and its wallet (the same body again: 200)",
    scope="admin",
    body=s.OrganizationCreate,
    answers={201: s.Organization, 200: s.Organization},
)
def create_organization(call: Call) -> Reply:
    call.spanning_organizations()
    b: s.OrganizationCreate = call.body
    settings = b.model_dump(exclude={"org_id"}, exclude_unset=True)

    def work(conn):
        org, created = overview.register(conn, b.org_id, settings, call.policy)
        if created:
            _audit(call, conn, "org.create", b.org_id, settings)
        return org, created

    org, created = call.transaction(work)
    return (201 if created else 200), org


@endpoint(
    "GET", "/organizations/{org_id}", summary="everything about one organization",
    scope="read", answers={200: s.Organization}, path_patterns=ORG,
)  # fmt: skip
def get_organization(call: Call, org_id: str) -> Reply:
    org_id = call.org(org_id)
    return 200, call.read(lambda conn: overview.organization(conn, org_id, call.policy))


@endpoint(
    "PATCH",
    "/organizations/{org_id}",
    summary="change an organization's sender, price, low-balance threshold or subaccount",
    scope="admin",
    body=s.OrganizationPatch,
    answers={200: s.Organization},
    path_patterns=ORG,
)
def patch_organization(call: Call, org_id: str) -> Reply:
    org_id = call.org(org_id)
    changes = call.body.model_dump(exclude_unset=True)

    def work(conn):
        org = overview.change(conn, org_id, changes, call.policy)
        _audit(call, conn, "org.update", org_id, changes)
        return org

    return 200, call.transaction(work)


@endpoint(
    "GET", "/organizations/{org_id}/can-send", summary="may it send, and why not",
    scope="read", answers={200: s.CanSend}, path_patterns=ORG,
)  # fmt: skip
def can_send(call: Call, org_id: str) -> Reply:
    org_id = call.org(org_id)
    return 200, call.read_on_driver(
        lambda conn: sending.decide_on_driver(conn, org_id, call.policy).as_dict()
    )


# ---------------------------------------------------------------- wallet


@endpoint(
    "GET", "/organizations/{org_id}/wallet", summary="the wallet",
    scope="read", answers={200: s.Wallet}, path_patterns=ORG,
)  # fmt: skip
def get_wallet(call: Call, org_id: str) -> Reply:
    org_id = call.org(org_id)
    return 200, call.read_one(lambda conn: wallet.show(conn, org_id).as_dict())


def encode_cursor(entry_id: int) -> str:
    return base64.urlsafe_b64encode(f"e1:{entry_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The journal id a cursor continues before; 422 for anything this API did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        version, _, value = raw.partition(":")
        if version != "e1" or not value.isdigit() or not 0 < int(value) < 2**63:
            raise ValueError(raw)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise invalid([{"field": "cursor", "message": "not a cursor of this API"}]) from None


@endpoint(
    "GET",
    "/organizations/{org_id}/wallet/entries",
    summary="journal entries, newest first, a page at a time",
    scope="read",
    query=s.EntriesQuery,
    answers={200: s.Entries},
    path_patterns=ORG,
)
def wallet_entries(call: Call, org_id: str) -> Reply:
    org_id = call.org(org_id)
    q: s.EntriesQuery = call.query
    before = decode_cursor(q.cursor) if q.cursor is not None else None
    # One entry more than asked tells whether there is a next page without a second query.
    page = call.read(lambda conn: wallet.history(conn, org_id, q.limit + 1, before_id=before))
    more = len(page) > q.limit
    page = page[: q.limit]
    return 200, {
        "org_id": org_id,
        "entries": [e.as_dict() for e in page],
        "next_cursor": encode_cursor(page[-1].id) if more else None,
    }


# ---------------------------------------------------------------- campaigns


def _campaign_reply(call: Call, org_id: str, action: str, change) -> dict[str, Any]:
    def work(conn):
        campaign = change(conn)
        _audit(call, conn, action, org_id, {"campaign_id": campaign.campaign_id,
                                            "status": campaign.status})  # fmt: skip
        return campaign.as_dict()

    return call.transaction(work)


@endpoint(
    "POST",
    "/organizations/{org_id}/campaigns",
    summary="a campaign: running, or paused by the system while sending is blocked",
    scope="admin",
    body=s.CampaignCreate,
    answers={201: s.Campaign},
    path_patterns=ORG,
)
def create_campaign(call: Call, org_id: str) -> Reply:
    org_id = call.org(org_id)
    campaign_id = call.body.campaign_id
    return 201, _campaign_reply(
        call, org_id, "campaign.create",
        lambda conn: campaigns.create_campaign(conn, org_id, campaign_id, call.policy),
    )  # fmt: skip


@endpoint(
    "GET", "/organizations/{org_id}/campaigns", summary="the organization's campaigns",
    scope="read", answers={200: s.Campaigns}, path_patterns=ORG,
)  # fmt: skip
def list_campaigns(call: Call, org_id: str) -> Reply:
    org_id = call.org(org_id)
    found = call.read(lambda conn: campaigns.list_campaigns(conn, org_id))
    return 200, {"org_id": org_id, "campaigns": [c.as_dict() for c in found]}


CAMPAIGN = {**ORG, "campaign_id": s.ORG_ID_PATTERN}


@endpoint(
    "POST", "/organizations/{org_id}/campaigns/{campaign_id}/pause",
    summary="the user's own pause (stays until the user resumes)",
    scope="send", answers={200: s.Campaign}, path_patterns=CAMPAIGN,
)  # fmt: skip
def pause_campaign(call: Call, org_id: str, campaign_id: str) -> Reply:
    org_id = call.org(org_id)
    campaign_id = _campaign_id(campaign_id)
    return 200, _campaign_reply(
        call, org_id, "campaign.pause",
        lambda conn: campaigns.pause_campaign(conn, org_id, campaign_id),
    )  # fmt: skip


@endpoint(
    "POST", "/organizations/{org_id}/campaigns/{campaign_id}/resume",
    summary="the user's resume; 409 with `reasons` while sending is blocked",
    scope="send", answers={200: s.Campaign}, path_patterns=CAMPAIGN,
)  # fmt: skip
def resume_campaign(call: Call, org_id: str, campaign_id: str) -> Reply:
    org_id = call.org(org_id)
    campaign_id = _campaign_id(campaign_id)

    def work(conn):
        campaigns.campaign(conn, org_id, campaign_id)  # an unknown campaign is a 404 first
        decision = sending.decide(conn, org_id, call.policy)
        if not decision.can_send:
            raise Problem(409, f"cannot resume: {', '.join(decision.reasons)}",
                          kind="sending-blocked", reasons=list(decision.reasons))  # fmt: skip
        return campaigns.resume_campaign(conn, org_id, campaign_id, call.policy)

    return 200, _campaign_reply(call, org_id, "campaign.resume", work)


def _campaign_id(campaign_id: str) -> str:
    if not _ID.fullmatch(campaign_id):
        raise Problem(404, f"no campaign {campaign_id!r}", kind="not-found")
    return campaign_id


# ---------------------------------------------------------------- messages


def _publish(call: Call, org_id: str, queued: list[messages.Queued]) -> None:
    """Publish after commit one task that sends the organization's queued messages in
    batches (core/send_batch.py), however many this request queued; what fails here the
    outbox relay publishes, message by message, through the single send task."""
    outbox_ids = [q.outbox_id for q in queued if q.outbox_id is not None]
    if not outbox_ids:
        return
    pending = [outbox.Pending(SEND_BATCH_TASK, [org_id], tuple(outbox_ids))]
    outbox.publish_after_commit(
        call.transaction, call.receiver.publisher, pending, call.receiver.publish_marks
    )


@endpoint(
    "POST",
    "/messages",
    summary="queue one SMS through the safe send path (Idempotency-Key required)",
    scope="send",
    body=s.MessageCreate,
    answers={202: s.QueuedMessage},
    idempotency_header=True,
)
def send_message(call: Call) -> Reply:
    b: s.MessageCreate = call.body
    org_id = call.org(b.org_id)
    key = call.idempotency_key()

    def work(conn) -> tuple[Stored, list[messages.Queued]]:
        stored = _claim(call, conn, org_id, MESSAGES_ROUTE, key)
        if stored is not None:
            return stored, []
        queued = messages.queue_batch(conn, org_id, [(b.to, b.body)], call.policy, b.campaign_id)
        answer = queued[0].as_dict()
        idempotency.complete(conn, org_id, MESSAGES_ROUTE, key, 202, answer)
        _audit(call, conn, "message.send", org_id,
               {"message_id": answer["message_id"], "campaign_id": b.campaign_id,
                "status": answer["status"]})  # fmt: skip
        return Stored(202, answer), queued

    stored, queued = call.transaction(work)
    _publish(call, org_id, queued)
    return stored.status_code, stored.response, ({} if queued else REPLAYED)


@endpoint(
    "POST",
    "/messages/batch",
    summary="queue 1-1,000 SMS at once, all or none (an idempotency_key per message)",
    scope="send",
    body=s.BatchCreate,
    answers={202: s.BatchQueued},
    max_body=BATCH_MAX_BODY,
)
def send_batch(call: Call) -> Reply:
    b: s.BatchCreate = call.body
    org_id = call.org(b.org_id)
    seen: dict[str, int] = {}
    for n, item in enumerate(b.messages):
        if item.idempotency_key in seen:
            raise invalid([{"field": f"/messages/{n}/idempotency_key",
                            "message": f"repeats message {seen[item.idempotency_key]}'s"}])  # fmt: skip
        seen[item.idempotency_key] = n
    # What a key vouches for: its message and the campaign it goes to.
    requests = [
        (item.idempotency_key, {"to": item.to, "body": item.body, "campaign_id": b.campaign_id})
        for item in b.messages
    ]

    def work(conn) -> tuple[list[dict], list[messages.Queued]]:
        try:
            stored = idempotency.claim_many(conn, org_id, BATCH_ROUTE, requests, call.key.key_id)
        except KeysConflict as exc:
            raise invalid(
                [{"field": f"/messages/{seen[k]}/idempotency_key",
                  "message": "this idempotency_key was used with another message"}
                 for k in exc.keys],
                "idempotency keys reused with other messages: nothing was queued",
            ) from None  # fmt: skip
        fresh = [item for item in b.messages if item.idempotency_key not in stored]
        queued = (
            messages.queue_batch(conn, org_id, [(i.to, i.body) for i in fresh], call.policy,
                                 b.campaign_id)
            if fresh else []
        )  # fmt: skip
        answers = {i.idempotency_key: q.as_dict() for i, q in zip(fresh, queued, strict=True)}
        idempotency.complete_many(
            conn, org_id, BATCH_ROUTE, {k: (202, a) for k, a in answers.items()}
        )
        if fresh:
            _audit(call, conn, "message.batch", org_id,
                   {"count": len(fresh), "replayed": len(stored), "campaign_id": b.campaign_id,
                    "status": queued[0].status})  # fmt: skip
        replies = [
            answers.get(i.idempotency_key) or stored[i.idempotency_key].response for i in b.messages
        ]
        return replies, queued

    replies, queued = call.transaction(work)
    _publish(call, org_id, queued)
    return 202, {"messages": replies}, ({} if queued else REPLAYED)


@endpoint(
    "GET", "/messages/{message_id}", summary="one message",
    scope="read", answers={200: s.Message}, path_patterns={"message_id": s.MESSAGE_ID_PATTERN},
)  # fmt: skip
def get_message(call: Call, message_id: str) -> Reply:
    if not _MESSAGE_ID.fullmatch(message_id):
        raise Problem(404, f"no message {message_id!r}", kind="not-found")
    message = call.read(lambda conn: messages.get(conn, message_id))
    call.org(message.org_id)  # another organization's message does not exist for this key
    return 200, message.as_dict()


# ---------------------------------------------------------------- top-ups

TOP_UPS_ROUTE = "POST /v1/organizations/{org_id}/top-ups"
TOP_UP = {**ORG, "top_up_id": s.TOP_UP_ID_PATTERN}
_TOP_UP_ID = re.compile(s.TOP_UP_ID_PATTERN)


@endpoint(
    "POST",
    "/organizations/{org_id}/top-ups",
    summary="a PayPal order or Stripe Checkout Session for the buyer to pay (Idempotency-Key "
    "required); 422 when the provider refuses, 503 with Retry-After when it is down",
    scope="admin",
    body=s.TopUpCreate,
    answers={201: s.TopUp},
    idempotency_header=True,
    path_patterns=ORG,
)
def create_top_up(call: Call, org_id: str) -> Reply:
    org_id = call.org(org_id)
    b: s.TopUpCreate = call.body
    key = call.idempotency_key()
    settings = call.settings
    lo, hi = settings.TOP_UP_MIN_CENTS, settings.TOP_UP_MAX_CENTS
    if isinstance(b.amount_cents, bool) or not lo <= b.amount_cents <= hi:
        raise invalid([{"field": "/amount_cents", "message": f"must be between {lo} and {hi}"}])
    api = call.top_up_api(b.provider)
    if api is None:
        raise invalid([{"field": "/provider",
                        "message": f"{b.provider} is not configured on this Payguard"}])  # fmt: skip

    def work(conn) -> tuple[Stored, bool]:
        stored = _claim(call, conn, org_id, TOP_UPS_ROUTE, key)
        if stored is not None:
            return stored, True
        top_up = topups.create(
            conn, api, org_id=org_id, provider=b.provider, amount_cents=b.amount_cents,
            return_url=b.return_url, cancel_url=b.cancel_url,
            provider_idempotency_key=topups.provider_key(
                org_id, key, idempotency.request_digest(call.document)
            ),
        )  # fmt: skip
        answer = top_up.as_dict()
        idempotency.complete(conn, org_id, TOP_UPS_ROUTE, key, 201, answer)
        _audit(call, conn, "top_up.create", org_id,
               {"top_up_id": top_up.top_up_id, "provider": b.provider,
                "amount_cents": b.amount_cents})  # fmt: skip
        return Stored(201, answer), False

    try:
        stored, replayed = call.transaction(work)
    except ProviderRefused as exc:
        raise Problem(422, str(exc), kind="provider-refused",
                      errors=[{"field": "", "message": str(exc)}]) from None  # fmt: skip
    except ProviderUnavailable as exc:
        log.warning("top-up provider unavailable", extra={"error": str(exc)[:200]})
        raise Problem(503, str(exc), kind="unavailable", headers={"Retry-After": "5"}) from None
    return stored.status_code, stored.response, (REPLAYED if replayed else {})


@endpoint(
    "GET", "/organizations/{org_id}/top-ups/{top_up_id}", summary="one top-up and its status",
    scope="read", answers={200: s.TopUp}, path_patterns=TOP_UP,
)  # fmt: skip
def get_top_up(call: Call, org_id: str, top_up_id: str) -> Reply:
    org_id = call.org(org_id)
    if not _TOP_UP_ID.fullmatch(top_up_id):
        raise Problem(404, f"no top-up {top_up_id!r}", kind="not-found")
    return 200, call.read(lambda conn: topups.get(conn, org_id, top_up_id)).as_dict()


# ---------------------------------------------------------------- events to the host

ENDPOINT = {"endpoint_id": s.ENDPOINT_ID_PATTERN}
_ENDPOINT_ID = re.compile(s.ENDPOINT_ID_PATTERN)


def _outbound_policy(call: Call) -> outbound.OutboundPolicy:
    return outbound.OutboundPolicy.from_settings(call.settings)


def _no_secret_key(exc: ConfigError) -> Problem:
    log.error("webhook endpoint secrets cannot be stored", extra={"error": str(exc)})
    return Problem(503, "this Payguard cannot store endpoint secrets: PAYGUARD_SECRET_KEY is "
                   "not configured", kind="unavailable")  # fmt: skip


def _endpoint_id(endpoint_id: str) -> str:
    if not _ENDPOINT_ID.fullmatch(endpoint_id):
        raise Problem(404, f"no webhook endpoint {endpoint_id!r}", kind="not-found")
    return endpoint_id


@endpoint(
    "POST",
    "/webhook-endpoints",
    summary="register an endpoint for events; its secret is shown in this answer only",
    scope="admin",
    body=s.EndpointCreate,
    answers={201: s.WebhookEndpointCreated},
)
def create_webhook_endpoint(call: Call) -> Reply:
    call.spanning_organizations()
    b: s.EndpointCreate = call.body
    policy = _outbound_policy(call)

    def work(conn):
        try:
            ep, secret = outbound.create_endpoint(
                conn, b.url, list(b.events) if b.events else None, None, call.actor,
                policy=policy,
            )  # fmt: skip
        except InvalidInput as exc:
            raise invalid([{"field": "/url", "message": str(exc)}], str(exc)) from None
        return {**ep.as_dict(), "secret": secret}

    try:
        return 201, call.transaction(work)
    except ConfigError as exc:
        raise _no_secret_key(exc) from None


@endpoint(
    "GET", "/webhook-endpoints", summary="the live endpoints",
    scope="admin", answers={200: s.WebhookEndpoints},
)  # fmt: skip
def list_webhook_endpoints(call: Call) -> Reply:
    call.spanning_organizations()
    found = call.read(lambda conn: outbound.list_endpoints(conn))
    return 200, {"endpoints": [ep.as_dict() for ep in found]}


@endpoint(
    "DELETE", "/webhook-endpoints/{endpoint_id}", summary="nothing more is sent to it",
    scope="admin", answers={204: None}, path_patterns=ENDPOINT,
)  # fmt: skip
def delete_webhook_endpoint(call: Call, endpoint_id: str) -> Reply:
    call.spanning_organizations()
    endpoint_id = _endpoint_id(endpoint_id)
    call.transaction(lambda conn: outbound.delete_endpoint(conn, endpoint_id, call.actor))
    return Response(status=204)


@endpoint(
    "POST", "/webhook-endpoints/{endpoint_id}/rotate-secret",
    summary="a new secret; for 24 hours deliveries carry signatures by the old and the new",
    scope="admin", answers={200: s.RotatedSecret}, path_patterns=ENDPOINT,
)  # fmt: skip
def rotate_webhook_secret(call: Call, endpoint_id: str) -> Reply:
    call.spanning_organizations()
    endpoint_id = _endpoint_id(endpoint_id)
    policy = _outbound_policy(call)

    def work(conn):
        outbound.get_endpoint(conn, endpoint_id)  # 404 before any question of secrets
        return outbound.rotate_secret(conn, endpoint_id, call.actor, policy=policy)

    try:
        secret = call.transaction(work)
    except ConfigError as exc:
        raise _no_secret_key(exc) from None
    return 200, {"endpoint_id": endpoint_id, "secret": secret}


@endpoint(
    "GET", "/events",
    summary="events recorded after a sequence, oldest first (a confined key: its organization's)",
    scope="read", query=s.EventsQuery, answers={200: s.HostEvents},
)  # fmt: skip
def list_events(call: Call) -> Reply:
    q: s.EventsQuery = call.query
    orgs = [call.key.org_id] if call.key.org_id is not None else None
    found = call.read(lambda conn: outbound.events_after(conn, q.after, q.limit, orgs))
    return 200, {"events": found}

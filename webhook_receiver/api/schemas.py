"""The shapes of `/v1`: pydantic models that validate every request body and query, and
describe every answer. The OpenAPI document (`openapi.py`) is generated from these very
models, so what is documented is what is enforced.

Request models are strict (no "5" for 5) and refuse unknown fields. Free text is refused
where PostgreSQL could not store it (NUL, lone surrogates): bad input answers 422, never 5xx.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from core.orgs import MAX_CENTS, MAX_SEGMENT_PRICE_CENTS
from core.outbound import EVENT_TYPES

ORG_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$"
MESSAGE_ID_PATTERN = r"^msg_[0-9a-f]{32}$"
TOP_UP_ID_PATTERN = r"^tu_[0-9a-f]{32}$"
ENDPOINT_ID_PATTERN = r"^ep_[0-9a-f]{32}$"
IDEMPOTENCY_KEY_PATTERN = r"^[\x20-\x7e]{1,200}$"
MAX_BATCH = 1000


def _storable(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


OrgId = Annotated[str, Field(pattern=ORG_ID_PATTERN, examples=["acme"])]
CampaignId = Annotated[str, Field(pattern=ORG_ID_PATTERN, examples=["spring"])]
E164 = Annotated[str, Field(pattern=r"^\+[1-9][0-9]{1,14}$", examples=["+15005550006"])]
SmsBody = Annotated[str, Field(min_length=1, max_length=1600), AfterValidator(_storable)]
Sender = Annotated[str, Field(pattern=r"^(\+[1-9][0-9]{6,14}|MG[0-9a-fA-F]{32})$")]
SubaccountSid = Annotated[str, Field(pattern=r"^AC[0-9a-fA-F]{32}$")]
Currency = Annotated[str, Field(pattern=r"^[A-Za-z]{3}$", examples=["USD"])]
Cents = Annotated[int, Field(ge=0, le=MAX_CENTS)]
SegmentPrice = Annotated[int, Field(ge=0, le=MAX_SEGMENT_PRICE_CENTS)]
IdempotencyKey = Annotated[str, Field(pattern=IDEMPOTENCY_KEY_PATTERN)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ---------------------------------------------------------------- requests


class OrganizationCreate(Request):
    org_id: OrgId
    currency: Currency = "USD"
    billing: Literal["subscription", "prepaid"] = "subscription"
    twilio_subaccount_sid: SubaccountSid | None = None
    sender: Sender | None = None
    segment_price_cents: SegmentPrice | None = None
    low_balance_cents: Cents | None = None


class OrganizationPatch(Request):
    """Only the fields present change; `null` clears one."""

    sender: Sender | None = None
    segment_price_cents: SegmentPrice | None = None
    low_balance_cents: Cents | None = None
    twilio_subaccount_sid: SubaccountSid | None = None


class CampaignCreate(Request):
    campaign_id: CampaignId


class MessageCreate(Request):
    org_id: OrgId
    to: E164
    body: SmsBody
    campaign_id: CampaignId | None = None


class BatchItem(Request):
    to: E164
    body: SmsBody
    idempotency_key: IdempotencyKey


class BatchCreate(Request):
    org_id: OrgId
    campaign_id: CampaignId | None = None
    messages: Annotated[list[BatchItem], Field(min_length=1, max_length=MAX_BATCH)]


Url = Annotated[
    str,
    Field(pattern=r"^https?://[^\s]+$", max_length=2000, examples=["https://host.example/paid"]),
    AfterValidator(_storable),
]


class TopUpCreate(Request):
    """`amount_cents` within TOP_UP_MIN_CENTS..TOP_UP_MAX_CENTS (422 otherwise), in the
    wallet's currency; the buyer comes back to `return_url` (paid) or `cancel_url`."""

    provider: Literal["paypal", "stripe"]
    amount_cents: int
    return_url: Url
    cancel_url: Url


EventType = Literal[EVENT_TYPES]  # type: ignore[valid-type]


class EndpointCreate(Request):
    """`url`: `https://` to a public address (unless OUTBOUND_ALLOW_PRIVATE); `events`: the
    types it receives, all of them when omitted."""

    url: Annotated[str, Field(max_length=2000, examples=["https://host.example/payguard"]),
                   AfterValidator(_storable)]  # fmt: skip
    events: Annotated[list[EventType], Field(min_length=1, max_length=len(EVENT_TYPES))] | None = (
        None
    )


class EventsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    after: Annotated[int, Field(ge=0)] = 0
    limit: Annotated[int, Field(ge=1, le=1000)] = 100


class EntriesQuery(BaseModel):
    # Query strings are text: "10" is 10 here. Unknown parameters are refused all the same.
    model_config = ConfigDict(extra="forbid")

    limit: Annotated[int, Field(ge=1, le=1000)] = 50
    cursor: Annotated[str, Field(min_length=1, max_length=100)] | None = None


# ---------------------------------------------------------------- answers


class Wallet(BaseModel):
    org_id: str
    currency: str
    balance_cents: int
    held_cents: int
    available_cents: int
    debt_cents: int
    frozen: bool
    freeze_reasons: list[str]


class CanSend(BaseModel):
    """The same answer as `payguard status`."""

    org_id: str
    can_send: bool
    reasons: list[str]
    billing: str
    subscription_status: str
    twilio_status: str
    twilio_desired_status: str
    available_cents: int
    segment_price_cents: int
    freeze_reasons: list[str]


class Organization(BaseModel):
    org_id: str
    currency: str
    billing: str
    subscription_status: str
    twilio_status: str
    twilio_desired_status: str
    can_send: bool
    reasons: list[str]
    wallet: Wallet
    low_balance_cents: int | None
    segment_price_cents: int | None
    sender: str | None
    twilio_subaccount_sid: str | None
    created_at: datetime


class Entry(BaseModel):
    id: int
    kind: str
    amount_cents: int
    debt_delta_cents: int
    requested_cents: int
    reference: str
    balance_after_cents: int
    debt_after_cents: int
    created_at: datetime
    actor: str
    reason: str | None


class Entries(BaseModel):
    org_id: str
    entries: list[Entry]
    next_cursor: str | None = Field(
        description="pass as `cursor` for the next page; null at the end"
    )


class Campaign(BaseModel):
    campaign_id: str
    status: Literal["running", "paused"]
    paused_by: str | None
    pause_reason: str | None


class Campaigns(BaseModel):
    org_id: str
    campaigns: list[Campaign]


class QueuedMessage(BaseModel):
    message_id: str
    status: Literal["queued", "blocked"]
    reasons: list[str]


class BatchQueued(BaseModel):
    messages: list[QueuedMessage] = Field(description="in the order of the request")


class Message(BaseModel):
    message_id: str
    org_id: str
    campaign_id: str | None
    to: str
    status: str
    segments: int
    encoding: str
    price_cents: int
    charged_cents: int
    twilio_sid: str | None
    block_reasons: list[str]
    error: str | None
    created_at: datetime


class TopUp(BaseModel):
    top_up_id: str
    org_id: str
    provider: Literal["paypal", "stripe"]
    provider_reference: str = Field(description="the PayPal order id or Stripe Checkout Session id")
    amount_cents: int = Field(description="what was asked")
    currency: str
    approval_url: str = Field(description="where the buyer approves and pays")
    status: Literal["created", "approved", "completed", "failed", "expired"]
    failure_reason: str | None
    credited_cents: int | None = Field(description="what the provider captured and was credited")
    created_at: datetime
    updated_at: datetime


class WebhookEndpoint(BaseModel):
    endpoint_id: str
    url: str
    events: list[EventType]
    org_id: str | None
    created_at: datetime


class WebhookEndpointCreated(WebhookEndpoint):
    secret: str = Field(description="`whsec_` + base64: shown once, never again")


class WebhookEndpoints(BaseModel):
    endpoints: list[WebhookEndpoint]


class RotatedSecret(BaseModel):
    endpoint_id: str
    secret: str = Field(description="the new secret; for 24 hours the old one signs too")


class HostEvent(BaseModel):
    id: str = Field(description="the `webhook-id` its deliveries carry")
    type: EventType
    timestamp: str
    sequence: int
    data: dict


class HostEvents(BaseModel):
    events: list[HostEvent] = Field(description="oldest first")


class FieldError(BaseModel):
    field: str = Field(description="a JSON Pointer into the body (a parameter's name for a query)")
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None
    reasons: list[str] | None = None

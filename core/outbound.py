"""Events to the host: what changed, recorded in the caller's transaction, delivered later.

`record` writes the event and one delivery row per interested endpoint in the same
transaction as the change it reports (an outbox): a rolled-back change leaves no event, a
committed one is never lost. Beat claims due deliveries (`claim_due`, at most one in flight
per endpoint, none while an endpoint's circuit is open) and publishes them to the outbound
queue; the delivery task POSTs the stored body (the same bytes on every try, signed afresh
with that try's timestamp) and `record_answer` keeps the retry schedule in PostgreSQL.

The use cases the host API and the CLI share are here too: create, list, delete endpoints,
rotate a secret, list events after a sequence, list and redeliver deliveries.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import Connection

from core import audit, sql
from core.errors import InvalidInput, NotFound
from core.outbound_net import Answer, Resolver, check_url, system_resolver
from core.settings import ConfigError, Settings
from core.statuses import DeliveryStatus
from core.webhook_signing import new_secret, signature_header

EVENT_TYPES = (
    "organization.sending_blocked",
    "organization.sending_allowed",
    "campaign.paused",
    "campaign.resumed",
    "wallet.credited",
    "wallet.low_balance",
    "wallet.frozen",
    "wallet.unfrozen",
    "message.updated",
    "top_up.completed",
    "top_up.failed",
)
# Seconds after each failed try before the next (the Standard Webhooks / Svix schedule:
# about 27 hours in all); after the last, the delivery is `failed` and an operator may
# redeliver it.
RETRY_SCHEDULE = (5, 300, 1800, 7200, 18000, 36000, 36000)
ROTATION_OVERLAP = timedelta(hours=24)
DELIVERY_STATUSES = tuple(s.value for s in DeliveryStatus)  # plain strings: the CLI offers them


@dataclass(frozen=True)
class OutboundPolicy:
    """Knobs of delivery, taken from settings by the entrypoint."""

    secret_key: str | None = None
    allow_private: bool = False
    timeout_seconds: float = 10.0
    retry_scale: float = 1.0
    lease_seconds: float = 60.0
    circuit_threshold: int = 5
    retention_days: int = 30
    resolver: Resolver = field(default=system_resolver)

    @classmethod
    def from_settings(cls, s: Settings, resolver: Resolver = system_resolver) -> OutboundPolicy:
        return cls(
            secret_key=s.PAYGUARD_SECRET_KEY,
            allow_private=s.OUTBOUND_ALLOW_PRIVATE,
            timeout_seconds=s.OUTBOUND_TIMEOUT_SECONDS,
            retry_scale=s.OUTBOUND_RETRY_SCALE,
            lease_seconds=s.OUTBOUND_LEASE_SECONDS,
            circuit_threshold=s.OUTBOUND_CIRCUIT_THRESHOLD,
            retention_days=s.EVENT_RETENTION_DAYS,
            resolver=resolver,
        )

    def fernet(self) -> Fernet:
        if not self.secret_key:
            raise ConfigError(
                "configuration error: PAYGUARD_SECRET_KEY is required once a webhook endpoint "
                "exists (it encrypts endpoint secrets)"
            )
        try:
            return Fernet(self.secret_key)
        except (ValueError, TypeError):
            raise ConfigError(
                "configuration error: PAYGUARD_SECRET_KEY must be 32 bytes of URL-safe base64"
            ) from None


# ---------------------------------------------------------------- recording


# Sequences are taken in one order and committed in another: a host that read event n+1
# while n's transaction was still open would, asking for events after n+1, never see n.
# So the first event of each transaction takes an advisory lock keyed by its sequence
# (modulo 2^31), held until the transaction ends, and `events_after` lists nothing at or
# beyond the lowest such lock still held. One lock per transaction, however many events.
_INFLIGHT_LOCKS = 0x70677576  # the advisory lock namespace ("pguv")
_SEQ_MOD = 2**31
_NEXT_SEQUENCE = sql.statement(
    "outbound.next_sequence",
    f"""
    SELECT q.s FROM (SELECT nextval('outbound_events_sequence_seq') AS s) q
    LEFT JOIN LATERAL (
        SELECT pg_advisory_xact_lock(:lock_class, CAST(q.s % {_SEQ_MOD} AS integer)),
               set_config('payguard.outbound_first', CAST(q.s AS text), true)
        WHERE coalesce(current_setting('payguard.outbound_first', true), '') = ''
    ) first ON true
    """,
)
_INFLIGHT_FLOOR = sql.statement(
    "outbound.inflight_floor",
    f"""
    SELECT min(last.v - (((last.v - l.objid::bigint) % {_SEQ_MOD}) + {_SEQ_MOD}) % {_SEQ_MOD})
    FROM pg_locks l, (SELECT last_value AS v FROM outbound_events_sequence_seq) last
    WHERE l.locktype = 'advisory' AND l.classid::bigint = :lock_class AND l.objsubid = 2
      -- pg_locks shows every database's locks: another Payguard database on the server has
      -- sequences of its own.
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
    """,
)


_NEXT_SEQUENCES = sql.statement(
    "outbound.next_sequences",
    """
    SELECT nextval('outbound_events_sequence_seq') FROM generate_series(1, :count) ORDER BY 1
    """,
)
_RECORD_MANY = sql.statement(
    "outbound.record_many",
    """
    WITH e AS (
        INSERT INTO outbound_events (sequence, event_id, type, org_id, body)
        SELECT u.seq, u.eid, u.type, u.org, u.body
        FROM jsonb_to_recordset(CAST(:rows AS jsonb))
             AS u(seq bigint, eid text, type text, org text, body text)
        RETURNING sequence, type, org_id
    )
    INSERT INTO outbound_deliveries (sequence, endpoint_id)
    SELECT e.sequence, ep.endpoint_id FROM e, outbound_endpoints ep
    WHERE ep.deleted_at IS NULL
      AND (ep.org_id IS NULL OR ep.org_id = e.org_id)
      AND (ep.events IS NULL OR e.type = ANY(ep.events))
    """,
)


def record_many(
    conn: Connection, events: list[tuple[str, str | None, dict[str, Any]]]
) -> list[int]:
    """Record (type, org_id, data) events and their deliveries in the caller's transaction, in
    the order given, in three statements whatever their number (two for one event): a batch's
    hundred `message.updated` cost its transaction three round trips instead of two hundred.
    Their sequences."""
    if not events:
        return []
    for type_, _, _ in events:
        if type_ not in EVENT_TYPES:
            raise InvalidInput(f"unknown event type {type_!r}")
    # The first sequence takes the transaction's in-flight lock (if it holds none yet); the
    # rest are above it, so events_after holds them back with it.
    sequences = [conn.execute(_NEXT_SEQUENCE, {"lock_class": _INFLIGHT_LOCKS}).scalar_one()]
    if len(events) > 1:
        sequences += conn.execute(_NEXT_SEQUENCES, {"count": len(events) - 1}).scalars()
    timestamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    rows = [
        {
            "seq": seq,
            "eid": f"msg_{uuid.uuid4().hex}",
            "type": type_,
            "org": org_id,
            "body": json.dumps(
                {"type": type_, "timestamp": timestamp, "sequence": seq, "data": data},
                separators=(",", ":"),
                sort_keys=True,
            ),
        }
        for seq, (type_, org_id, data) in zip(sequences, events, strict=True)
    ]
    conn.execute(_RECORD_MANY, {"rows": json.dumps(rows)})
    return [int(seq) for seq in sequences]


def record(conn: Connection, type_: str, org_id: str | None, data: dict[str, Any]) -> int:
    """Record one event and its deliveries in the caller's transaction; its sequence."""
    return record_many(conn, [(type_, org_id, data)])[0]


_NOTE_MAY_SEND = sql.statement(
    "outbound.note_may_send",
    """
    UPDATE organizations o SET last_can_send = :can_send FROM organizations old
    WHERE o.org_id = :org_id AND old.org_id = o.org_id
    AND o.last_can_send IS DISTINCT FROM :can_send RETURNING old.last_can_send
    """,
)


def note_may_send(conn: Connection, org_id: str, can_send: bool, reasons: list[str]) -> None:
    """organization.sending_blocked / _allowed, only when the answer flips (the last one
    reported is kept on the organization; an unknown last answer is recorded quietly)."""
    row = conn.execute(
        _NOTE_MAY_SEND,
        {"org_id": org_id, "can_send": can_send},
    ).first()
    if row is not None and row.last_can_send is not None:
        kind = "organization.sending_allowed" if can_send else "organization.sending_blocked"
        record(conn, kind, org_id, {"org_id": org_id, "reasons": reasons})


def note_campaign(
    conn: Connection, org_id: str, campaign_id: str, paused_by: str | None, reason: str | None
) -> None:
    """campaign.paused (paused_by set) or campaign.resumed."""
    kind = "campaign.paused" if paused_by else "campaign.resumed"
    record(
        conn,
        kind,
        org_id,
        {"org_id": org_id, "campaign_id": campaign_id, "paused_by": paused_by, "reason": reason},
    )


_MESSAGES_UPDATED = sql.statement(
    "outbound.messages_updated",
    """
    SELECT message_id, org_id, status, charged_cents FROM messages
    WHERE message_id = ANY(CAST(:message_ids AS text[]))
    """,
)


def note_messages(conn: Connection, message_ids: list[str]) -> None:
    """message.updated for each message, in the order given, with its status as it now
    stands: one event each, recorded together (`record_many`)."""
    if not message_ids:
        return
    rows = {
        r.message_id: r
        for r in conn.execute(
            _MESSAGES_UPDATED,
            {"message_ids": list(message_ids)},
        )
    }
    record_many(
        conn,
        [
            (
                "message.updated",
                rows[m].org_id,
                {
                    "message_id": m,
                    "org_id": rows[m].org_id,
                    "status": rows[m].status,
                    "charged_cents": rows[m].charged_cents,
                },
            )
            for m in message_ids
        ],
    )


def note_message(conn: Connection, message_id: str) -> None:
    """message.updated with the message's status as it now stands."""
    note_messages(conn, [message_id])


_LOW_BALANCE = sql.statement(
    "outbound.low_balance",
    """
    UPDATE wallets w SET low_balance_reported = (w.balance_cents - w.held_cents < o.low_balance_cents)
    FROM organizations o
    WHERE w.org_id = :org_id AND o.org_id = w.org_id AND o.low_balance_cents IS NOT NULL
      AND w.low_balance_reported IS DISTINCT FROM (w.balance_cents - w.held_cents < o.low_balance_cents)
    RETURNING w.low_balance_reported AS low, w.balance_cents - w.held_cents AS available,
              o.low_balance_cents AS threshold
    """,
)


def note_balance(conn: Connection, org_id: str) -> None:
    """After a money move, in its transaction: wallet.low_balance once per fall below the
    threshold. The wallet's flag is flipped by one guarded statement on the row the money
    move has locked, so concurrent moves cannot report one crossing twice."""
    row = conn.execute(_LOW_BALANCE, {"org_id": org_id}).first()
    if row is not None and row.low:
        record(
            conn,
            "wallet.low_balance",
            org_id,
            {"org_id": org_id, "available_cents": row.available, "threshold_cents": row.threshold},
        )


# ---------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Endpoint:
    endpoint_id: str
    url: str
    events: list[str] | None
    org_id: str | None
    created_at: datetime
    deleted_at: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "endpoint_id": self.endpoint_id,
            "url": self.url,
            "events": list(self.events) if self.events is not None else list(EVENT_TYPES),
            "org_id": self.org_id,
            "created_at": self.created_at.isoformat(),
        }


_EP_COLUMNS = "endpoint_id, url, events, org_id, created_at, deleted_at"


def _events_filter(events: object) -> list[str] | None:
    if events is None:
        return None
    if not isinstance(events, list | tuple) or not events:
        raise InvalidInput("events must be a non-empty list of event types")
    unknown = [e for e in events if e not in EVENT_TYPES]
    if unknown:
        raise InvalidInput(f"unknown event type {unknown[0]!r}; known: {', '.join(EVENT_TYPES)}")
    return sorted(set(events))


_ORG_EXISTS = sql.statement(
    "outbound.org_exists",
    "SELECT 1 FROM organizations WHERE org_id = :org_id",
)

_INSERT_ENDPOINT = sql.statement(
    "outbound.insert_endpoint",
    """
    INSERT INTO outbound_endpoints (endpoint_id, url, events, org_id, secret_enc, created_by)
    VALUES (:endpoint_id, :url, :events, :org_id, :secret_enc, :actor)
    """,
)


def create_endpoint(
    conn: Connection,
    url: str,
    events: list[str] | None,
    org_id: str | None,
    actor: str,
    *,
    policy: OutboundPolicy,
) -> tuple[Endpoint, str]:
    """Register an endpoint; the secret is returned here once and stored only encrypted."""
    check_url(url, policy.resolver, allow_private=policy.allow_private)
    wanted = _events_filter(events)
    if org_id is not None and not conn.execute(_ORG_EXISTS, {"org_id": org_id}).first():
        raise NotFound(f"unknown organization {org_id!r}")
    secret = new_secret()
    endpoint_id = f"ep_{uuid.uuid4().hex}"
    conn.execute(
        _INSERT_ENDPOINT,
        {
            "endpoint_id": endpoint_id,
            "url": url,
            "events": wanted,
            "org_id": org_id,
            "secret_enc": policy.fernet().encrypt(secret.encode()).decode(),
            "actor": actor,
        },
    )
    audit.record(
        conn,
        actor=actor,
        action="endpoint.create",
        org_id=org_id,
        details={"endpoint_id": endpoint_id, "url": url, "events": wanted},
    )
    return get_endpoint(conn, endpoint_id), secret


_GET_ENDPOINT = sql.statement(
    "outbound.get_endpoint",
    f"""
    SELECT {_EP_COLUMNS} FROM outbound_endpoints WHERE endpoint_id = :endpoint_id
    AND deleted_at IS NULL
    """,
)


def get_endpoint(conn: Connection, endpoint_id: str) -> Endpoint:
    row = conn.execute(
        _GET_ENDPOINT,
        {"endpoint_id": endpoint_id},
    ).first()  # fmt: skip
    if row is None:
        raise NotFound(f"no webhook endpoint {endpoint_id!r}")
    return Endpoint(**row._mapping)


_LIST_ENDPOINTS = sql.statement(
    "outbound.list_endpoints",
    f"""
    SELECT {_EP_COLUMNS} FROM outbound_endpoints WHERE deleted_at IS NULL
    AND (CAST(:org_ids AS text[]) IS NULL OR org_id = ANY(CAST(:org_ids AS text[])))
    ORDER BY created_at, endpoint_id
    """,
)


_HAS_ENDPOINTS = sql.statement(
    "outbound.has_endpoints",
    "SELECT 1 FROM outbound_endpoints WHERE deleted_at IS NULL LIMIT 1",
)


def has_endpoints(conn: Connection) -> bool:
    """Whether any live endpoint exists (whose secret needs PAYGUARD_SECRET_KEY to be read)."""
    return conn.execute(_HAS_ENDPOINTS).first() is not None


def list_endpoints(conn: Connection, org_ids: list[str] | None = None) -> list[Endpoint]:
    """Live endpoints, all or those confined to the given organizations."""
    rows = conn.execute(
        _LIST_ENDPOINTS,
        {"org_ids": org_ids},
    )
    return [Endpoint(**r._mapping) for r in rows]


_DELETE_ENDPOINT = sql.statement(
    "outbound.delete_endpoint",
    """
    UPDATE outbound_endpoints SET deleted_at = now()
    WHERE endpoint_id = :endpoint_id AND deleted_at IS NULL RETURNING org_id
    """,
)

_CANCEL_DELIVERIES = sql.statement(
    "outbound.cancel_deliveries",
    """
    UPDATE outbound_deliveries SET status = 'cancelled', lease_token = NULL
    WHERE endpoint_id = :endpoint_id AND status IN ('pending', 'delivering')
    """,
)


def delete_endpoint(conn: Connection, endpoint_id: str, actor: str) -> None:
    """No delivery to it after this commits: what is pending is cancelled with it."""
    row = conn.execute(
        _DELETE_ENDPOINT,
        {"endpoint_id": endpoint_id},
    ).first()
    if row is None:
        raise NotFound(f"no webhook endpoint {endpoint_id!r}")
    conn.execute(
        _CANCEL_DELIVERIES,
        {"endpoint_id": endpoint_id},
    )
    audit.record(
        conn, actor=actor, action="endpoint.delete", org_id=row.org_id,
        details={"endpoint_id": endpoint_id},
    )  # fmt: skip


_ROTATE_SECRET = sql.statement(
    "outbound.rotate_secret",
    """
    UPDATE outbound_endpoints SET previous_secret_enc = secret_enc,
        previous_until = now() + CAST(:overlap AS interval), secret_enc = :secret_enc
    WHERE endpoint_id = :endpoint_id AND deleted_at IS NULL RETURNING org_id
    """,
)


def rotate_secret(conn: Connection, endpoint_id: str, actor: str, *, policy: OutboundPolicy) -> str:
    """A new secret, shown once; the old one keeps signing too for 24 hours."""
    fernet = policy.fernet()
    secret = new_secret()
    row = conn.execute(
        _ROTATE_SECRET,
        {"endpoint_id": endpoint_id, "secret_enc": fernet.encrypt(secret.encode()).decode(),
         "overlap": ROTATION_OVERLAP},
    ).first()  # fmt: skip
    if row is None:
        raise NotFound(f"no webhook endpoint {endpoint_id!r}")
    audit.record(
        conn, actor=actor, action="endpoint.rotate_secret", org_id=row.org_id,
        details={"endpoint_id": endpoint_id},
    )  # fmt: skip
    return secret


# ---------------------------------------------------------------- reading events


_EVENTS_AFTER = sql.statement(
    "outbound.events_after",
    """
    SELECT event_id, body FROM outbound_events WHERE sequence > :after
    AND (CAST(:floor AS bigint) IS NULL OR sequence < CAST(:floor AS bigint))
    AND (CAST(:org_ids AS text[]) IS NULL OR org_id = ANY(CAST(:org_ids AS text[])))
    ORDER BY sequence LIMIT :limit
    """,
)


def events_after(
    conn: Connection, after: int, limit: int = 100, org_ids: list[str] | None = None
) -> list[dict[str, Any]]:
    """Events with a sequence greater than `after`, oldest first: how a host catches up.
    `org_ids` confines them to those organizations (None: every event). Events behind one
    whose transaction is still open wait for it, so a host's `after` never skips one."""
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise InvalidInput("after must be a sequence number, zero or more")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise InvalidInput("limit must be between 1 and 1000")
    floor = conn.execute(_INFLIGHT_FLOOR, {"lock_class": _INFLIGHT_LOCKS}).scalar()
    rows = conn.execute(
        _EVENTS_AFTER,
        {"after": after, "floor": floor, "org_ids": org_ids, "limit": limit},
    )
    return [{"id": r.event_id, **json.loads(r.body)} for r in rows]


# ---------------------------------------------------------------- delivering


@dataclass(frozen=True)
class Claimed:
    delivery_id: int
    token: str


_CLAIM_DUE = sql.statement(
    "outbound.claim_due",
    """
    WITH busy AS (
        SELECT DISTINCT endpoint_id FROM outbound_deliveries
        WHERE status = 'delivering' AND lease_until > now()
    ), cand AS (
        SELECT DISTINCT ON (d.endpoint_id) d.id
        FROM outbound_deliveries d JOIN outbound_endpoints e USING (endpoint_id)
        WHERE d.status IN ('pending', 'delivering')
          AND CASE WHEN d.status = 'pending' THEN d.next_attempt_at <= now()
                   ELSE d.lease_until <= now() END
          AND e.deleted_at IS NULL
          AND (e.circuit_open_until IS NULL OR e.circuit_open_until <= now())
          AND d.endpoint_id NOT IN (SELECT endpoint_id FROM busy)
        ORDER BY d.endpoint_id, d.next_attempt_at, d.id
    )
    UPDATE outbound_deliveries d SET status = 'delivering',
        lease_until = now() + :lease, lease_token = md5(random()::text || d.id::text)
    WHERE d.id IN (SELECT id FROM cand ORDER BY id LIMIT :limit)
    RETURNING d.id, d.lease_token
    """,
)


def claim_due(conn: Connection, limit: int, policy: OutboundPolicy) -> list[Claimed]:
    """Due deliveries to publish: the oldest due one per endpoint that has none in flight and
    whose circuit is closed; a delivery whose lease ran out (its worker died) is due again."""
    rows = conn.execute(
        _CLAIM_DUE,
        {"lease": timedelta(seconds=policy.lease_seconds), "limit": limit},
    )
    return [Claimed(r.id, r.lease_token) for r in rows]


@dataclass(frozen=True)
class Delivery:
    delivery_id: int
    event_id: str
    url: str
    body: bytes
    secrets: list[str]

    def headers(self, timestamp: int) -> dict[str, str]:
        return {
            "webhook-id": self.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(
                self.secrets, self.event_id, timestamp, self.body
            ),
        }


_START_DELIVERY = sql.statement(
    "outbound.start_delivery",
    """
    UPDATE outbound_deliveries d SET lease_until = now() + :lease
    FROM outbound_events ev, outbound_endpoints ep
    WHERE d.id = :delivery_id AND d.lease_token = :token AND d.status = 'delivering'
      AND ev.sequence = d.sequence AND ep.endpoint_id = d.endpoint_id
      AND ep.deleted_at IS NULL
    RETURNING ev.event_id, ev.body, ep.url, ep.secret_enc, ep.previous_secret_enc,
              ep.previous_until > now() AS previous_valid
    """,
)


def start_delivery(
    conn: Connection, delivery_id: int, token: str, policy: OutboundPolicy
) -> Delivery | None:
    """The delivery to try now, its lease renewed; None when it is no longer this task's
    (delivered, cancelled, its endpoint deleted, or claimed again after a lost worker)."""
    row = conn.execute(
        _START_DELIVERY,
        {
            "delivery_id": delivery_id,
            "token": token,
            "lease": timedelta(seconds=policy.lease_seconds),
        },
    ).first()
    if row is None:
        return None
    fernet = policy.fernet()
    try:
        secrets_ = [fernet.decrypt(row.secret_enc.encode()).decode()]
    except InvalidToken:
        raise ConfigError(
            "configuration error: PAYGUARD_SECRET_KEY does not decrypt the endpoint secrets "
            "(was it changed?)"
        ) from None
    if row.previous_secret_enc and row.previous_valid:
        # Rotated after a key change: the new secret alone signs.
        with contextlib.suppress(InvalidToken):
            secrets_.append(fernet.decrypt(row.previous_secret_enc.encode()).decode())
    return Delivery(delivery_id, row.event_id, row.url, row.body.encode(), secrets_)


_RECORD_ATTEMPT = sql.statement(
    "outbound.record_attempt",
    """
    INSERT INTO outbound_attempts (delivery_id, webhook_timestamp, status_code,
        error, duration_ms) VALUES (:delivery_id, :timestamp, :code, :error, :duration_ms)
    """,
)

_LOCK_CLAIMED = sql.statement(
    "outbound.lock_claimed",
    """
    SELECT attempts, endpoint_id FROM outbound_deliveries
    WHERE id = :delivery_id AND lease_token = :token AND status = 'delivering' FOR UPDATE
    """,
)

_DELIVERED = sql.statement(
    "outbound.delivered",
    """
    UPDATE outbound_deliveries SET status = 'delivered', attempts = :attempts,
        delivered_at = now(), lease_token = NULL, last_error = NULL WHERE id = :delivery_id
    """,
)

_CLOSE_CIRCUIT = sql.statement(
    "outbound.close_circuit",
    """
    UPDATE outbound_endpoints SET consecutive_failures = 0,
        circuit_open_until = NULL WHERE endpoint_id = :endpoint_id
    """,
)

_RETRY_OR_FAIL = sql.statement(
    "outbound.retry_or_fail",
    """
    UPDATE outbound_deliveries SET status = :status, attempts = :attempts, lease_token = NULL,
        next_attempt_at = now() + :delay, last_error = :error WHERE id = :delivery_id
    """,
)

_COUNT_FAILURE = sql.statement(
    "outbound.count_failure",
    """
    UPDATE outbound_endpoints SET consecutive_failures = consecutive_failures + 1,
        circuit_open_until = CASE WHEN consecutive_failures + 1 >= :circuit_threshold
            THEN now() + make_interval(secs => least(3600.0,
                5.0 * power(2, least(consecutive_failures + 1 - :circuit_threshold, 20))) * :scale)
            ELSE circuit_open_until END
    WHERE endpoint_id = :endpoint_id
    """,
)


def record_answer(
    conn: Connection,
    delivery_id: int,
    token: str,
    timestamp: int,
    answer: Answer,
    policy: OutboundPolicy,
) -> str:
    """Keep the try; delivered, or pending again at the next time of the schedule, or failed
    after the last. The endpoint's circuit opens after a run of failures (growing)."""
    conn.execute(
        _RECORD_ATTEMPT,
        {"delivery_id": delivery_id, "timestamp": timestamp, "code": answer.status_code,
         "error": answer.error, "duration_ms": answer.duration_ms},
    )  # fmt: skip
    row = conn.execute(
        _LOCK_CLAIMED,
        {"delivery_id": delivery_id, "token": token},
    ).first()
    if row is None:
        return "stale"
    attempts = row.attempts + 1
    if answer.ok:
        conn.execute(
            _DELIVERED,
            {"attempts": attempts, "delivery_id": delivery_id},
        )
        conn.execute(
            _CLOSE_CIRCUIT,
            {"endpoint_id": row.endpoint_id},
        )
        return DeliveryStatus.DELIVERED
    error = answer.error if answer.status_code is None else f"HTTP {answer.status_code}"
    exhausted = attempts > len(RETRY_SCHEDULE)
    delay = 0.0 if exhausted else RETRY_SCHEDULE[attempts - 1] * policy.retry_scale
    conn.execute(
        _RETRY_OR_FAIL,
        {"status": DeliveryStatus.FAILED if exhausted else DeliveryStatus.PENDING,
         "attempts": attempts,
         "delay": timedelta(seconds=delay), "error": error, "delivery_id": delivery_id},
    )  # fmt: skip
    # The circuit: after `circuit_threshold` failures in a row, nothing goes to the endpoint
    # for 5 s, doubling up to an hour, so a dead endpoint costs one try per opening.
    conn.execute(
        _COUNT_FAILURE,
        {
            "circuit_threshold": policy.circuit_threshold,
            "scale": policy.retry_scale,
            "endpoint_id": row.endpoint_id,
        },
    )
    return DeliveryStatus.FAILED if exhausted else "retrying"


_RELEASE_CLAIM = sql.statement(
    "outbound.release_claim",
    """
    UPDATE outbound_deliveries SET status = 'pending', lease_token = NULL
    WHERE id = :delivery_id AND lease_token = :token AND status = 'delivering'
    """,
)


def release_claim(conn: Connection, delivery_id: int, token: str) -> None:
    """Give a claim back without a try (it could not be published): due again at once."""
    conn.execute(
        _RELEASE_CLAIM,
        {"delivery_id": delivery_id, "token": token},
    )


# ---------------------------------------------------------------- operators


_LIST_DELIVERIES = sql.statement(
    "outbound.list_deliveries",
    """
    SELECT d.id, d.endpoint_id, ev.event_id, ev.type, ev.org_id, d.sequence, d.status,
        d.attempts, d.next_attempt_at, d.last_error, d.delivered_at
    FROM outbound_deliveries d JOIN outbound_events ev USING (sequence)
    WHERE CAST(:status AS text) IS NULL OR d.status = CAST(:status AS text)
    ORDER BY d.id DESC LIMIT :limit
    """,
)


def list_deliveries(
    conn: Connection, status: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    if status is not None and status not in DELIVERY_STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(DELIVERY_STATUSES)}")
    rows = conn.execute(
        _LIST_DELIVERIES,
        {"status": status, "limit": limit},
    )
    out = []
    for r in rows:
        item = dict(r._mapping)
        for k in ("next_attempt_at", "delivered_at"):
            item[k] = item[k].isoformat() if item[k] else None
        out.append(item)
    return out


_REDELIVER = sql.statement(
    "outbound.redeliver",
    """
    UPDATE outbound_deliveries d SET status = 'pending', next_attempt_at = now(),
        lease_token = NULL FROM outbound_endpoints e
    WHERE d.id = :delivery_id AND e.endpoint_id = d.endpoint_id AND e.deleted_at IS NULL
    AND d.status IN ('failed', 'delivered', 'pending') RETURNING d.id, e.org_id
    """,
)


def redeliver(conn: Connection, delivery_id: int, actor: str) -> dict[str, Any]:
    """Try a delivery again now (a failed one, or a delivered one the host lost)."""
    row = conn.execute(
        _REDELIVER,
        {"delivery_id": delivery_id},
    ).first()
    if row is None:
        raise NotFound(f"no redeliverable delivery {delivery_id} (in flight, cancelled or gone)")
    audit.record(
        conn, actor=actor, action="events.redeliver", org_id=row.org_id,
        details={"delivery_id": delivery_id},
    )  # fmt: skip
    return {"delivery_id": delivery_id, "status": DeliveryStatus.PENDING}


_PRUNE = sql.statement(
    "outbound.prune",
    """
    DELETE FROM outbound_events WHERE sequence IN (
        SELECT ev.sequence FROM outbound_events ev
        WHERE ev.created_at < now() - make_interval(days => :days)
          AND NOT EXISTS (SELECT 1 FROM outbound_deliveries d
                          WHERE d.sequence = ev.sequence
                            AND d.status IN ('pending', 'delivering', 'failed'))
        ORDER BY ev.sequence LIMIT :limit)
    RETURNING sequence
    """,
)


def prune(conn: Connection, retention_days: int, limit: int = 1000) -> int:
    """Events older than the retention whose deliveries are all settled go, with their
    deliveries and attempts; an event still owed to an endpoint stays."""
    return len(
        conn.execute(
            _PRUNE,
            {"days": retention_days, "limit": limit},
        ).all()
    )

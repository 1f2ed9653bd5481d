"""The whole first schema: organizations, wallet ledger, holds, freezes, provider events,
outbox, subscriptions, campaigns, messages and the operators' audit trail.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TABLE organizations (
    org_id                 text PRIMARY KEY CHECK (org_id ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$'),
    currency               char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    segment_price_cents    integer CHECK (segment_price_cents >= 0),
    twilio_subaccount_sid  text UNIQUE,
    sender                 text,
    twilio_desired_status  text NOT NULL DEFAULT 'active'
                           CHECK (twilio_desired_status IN ('active', 'suspended')),
    twilio_status          text NOT NULL DEFAULT 'active'
                           CHECK (twilio_status IN ('active', 'suspended')),
    twilio_synced_at       timestamptz,
    created_at             timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE wallets (
    org_id          text PRIMARY KEY REFERENCES organizations (org_id),
    currency        char(3) NOT NULL,
    balance_cents   bigint NOT NULL DEFAULT 0,
    held_cents      bigint NOT NULL DEFAULT 0,
    debt_cents      bigint NOT NULL DEFAULT 0,
    active_freezes  integer NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT balance_not_negative CHECK (balance_cents >= 0),
    CONSTRAINT held_within_balance CHECK (held_cents >= 0 AND held_cents <= balance_cents),
    CONSTRAINT debt_not_negative CHECK (debt_cents >= 0),
    CONSTRAINT freezes_not_negative CHECK (active_freezes >= 0)
);

-- The journal is append-only: balance_cents = sum(amount_cents), debt_cents = sum(debt_delta_cents).
CREATE TABLE journal (
    id                  bigserial PRIMARY KEY,
    org_id              text NOT NULL REFERENCES organizations (org_id),
    kind                text NOT NULL,
    amount_cents        bigint NOT NULL,
    debt_delta_cents    bigint NOT NULL DEFAULT 0,
    requested_cents     bigint NOT NULL,
    reference           text NOT NULL CHECK (length(reference) BETWEEN 1 AND 300),
    balance_after_cents bigint NOT NULL,
    debt_after_cents    bigint NOT NULL DEFAULT 0,
    actor               text NOT NULL DEFAULT 'system',
    reason              text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT journal_reference_once UNIQUE (org_id, reference)
);

CREATE FUNCTION journal_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'journal rows are never updated or deleted (% refused)', TG_OP
        USING ERRCODE = 'restrict_violation';
END;
$$;
CREATE TRIGGER journal_append_only
    BEFORE UPDATE OR DELETE ON journal
    FOR EACH ROW EXECUTE FUNCTION journal_is_append_only();
CREATE TRIGGER journal_no_truncate
    BEFORE TRUNCATE ON journal
    FOR EACH STATEMENT EXECUTE FUNCTION journal_is_append_only();

CREATE TABLE holds (
    id              bigserial PRIMARY KEY,
    org_id          text NOT NULL REFERENCES organizations (org_id),
    reference       text NOT NULL CHECK (length(reference) BETWEEN 1 AND 300),
    amount_cents    bigint NOT NULL CHECK (amount_cents > 0),
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'captured', 'released')),
    captured_cents  bigint CHECK (captured_cents >= 0 AND captured_cents <= amount_cents),
    created_at      timestamptz NOT NULL DEFAULT now(),
    settled_at      timestamptz,
    CONSTRAINT hold_reference_once UNIQUE (org_id, reference)
);
CREATE INDEX holds_open_by_age ON holds (created_at) WHERE status = 'open';

CREATE TABLE wallet_freezes (
    id          bigserial PRIMARY KEY,
    org_id      text NOT NULL REFERENCES organizations (org_id),
    reason      text NOT NULL CHECK (length(reason) BETWEEN 1 AND 200),
    actor       text NOT NULL,
    note        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    lifted_at   timestamptz,
    lifted_by   text,
    lift_note   text
);
CREATE UNIQUE INDEX wallet_freezes_one_active ON wallet_freezes (org_id, reason) WHERE lifted_at IS NULL;

-- Provider payments Payguard has credited or recorded: how a refund or dispute finds its org.
CREATE TABLE payments (
    provider         text NOT NULL,
    payment_id       text NOT NULL,
    org_id           text NOT NULL REFERENCES organizations (org_id),
    kind             text NOT NULL,
    amount_cents     bigint,
    currency         char(3),
    subscription_id  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, payment_id)
);

CREATE TABLE subscriptions (
    provider             text NOT NULL,
    subscription_id      text NOT NULL,
    org_id               text REFERENCES organizations (org_id),
    status               text NOT NULL,
    status_at            timestamptz,
    status_since         timestamptz NOT NULL DEFAULT now(),
    last_payment_outcome text,
    last_payment_at      timestamptz,
    last_event_at        timestamptz NOT NULL DEFAULT now(),
    checked_at           timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, subscription_id)
);
CREATE INDEX subscriptions_by_org ON subscriptions (org_id);

CREATE TABLE webhook_events (
    id            bigserial PRIMARY KEY,
    provider      text NOT NULL,
    event_id      text NOT NULL,
    event_type    text NOT NULL,
    status        text NOT NULL DEFAULT 'received'
                  CHECK (status IN ('received', 'processed', 'ignored', 'parked', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    last_error    text,
    headers       jsonb NOT NULL DEFAULT '{}'::jsonb,
    body          bytea NOT NULL,
    org_id        text,
    received_at   timestamptz NOT NULL DEFAULT now(),
    processed_at  timestamptz,
    CONSTRAINT webhook_event_once UNIQUE (provider, event_id)
);
CREATE INDEX webhook_events_by_status ON webhook_events (status, id);

CREATE TABLE outbox (
    id              bigserial PRIMARY KEY,
    task            text NOT NULL,
    args            jsonb NOT NULL DEFAULT '[]'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

CREATE TABLE campaigns (
    org_id        text NOT NULL REFERENCES organizations (org_id),
    campaign_id   text NOT NULL CHECK (campaign_id ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$'),
    status        text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'paused')),
    paused_by     text CHECK (paused_by IN ('user', 'system')),
    pause_reason  text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, campaign_id),
    CONSTRAINT paused_has_pauser CHECK ((status = 'paused') = (paused_by IS NOT NULL))
);

CREATE TABLE messages (
    message_id     text PRIMARY KEY,
    org_id         text NOT NULL REFERENCES organizations (org_id),
    campaign_id    text,
    to_number      text NOT NULL,
    body           text NOT NULL,
    segments       integer NOT NULL CHECK (segments > 0),
    encoding       text NOT NULL,
    price_cents    bigint NOT NULL CHECK (price_cents >= 0),
    status         text NOT NULL DEFAULT 'queued',
    block_reasons  jsonb NOT NULL DEFAULT '[]'::jsonb,
    twilio_sid     text UNIQUE,
    send_attempt   text,
    charged_cents  bigint NOT NULL DEFAULT 0,
    refunded       boolean NOT NULL DEFAULT false,
    twilio_price   text,
    twilio_price_unit text,
    error          text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_by_org ON messages (org_id, created_at);

CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    actor       text NOT NULL,
    action      text NOT NULL,
    org_id      text,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
"""

DOWNGRADE = """
DROP TABLE IF EXISTS audit_log, messages, campaigns, outbox, webhook_events, subscriptions,
    payments, wallet_freezes, holds, journal, wallets, organizations CASCADE;
DROP FUNCTION IF EXISTS journal_is_append_only();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)

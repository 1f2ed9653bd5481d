"""Events to the host: endpoints, the event outbox, deliveries and their attempts; the last
may-send state reported and whether the wallet's fall below its organization's low-balance
threshold (`low_balance_cents`, added by 0009) was reported.

`outbound_events` is written in the same transaction as the change it reports (an outbox);
`outbound_deliveries` holds one row per event and endpoint, with the next attempt's time:
the retry schedule lives here, and beat publishes what is due. Endpoint secrets are stored
encrypted (Fernet, PAYGUARD_SECRET_KEY).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- NULL for organizations that existed before: their first decision is recorded quietly.
        ALTER TABLE organizations ADD COLUMN last_can_send boolean;
        ALTER TABLE organizations ALTER COLUMN last_can_send SET DEFAULT false;
        ALTER TABLE wallets ADD COLUMN low_balance_reported boolean NOT NULL DEFAULT false;

        CREATE TABLE outbound_endpoints (
            endpoint_id          text PRIMARY KEY,
            url                  text NOT NULL,
            events               text[],
            org_id               text REFERENCES organizations (org_id),
            secret_enc           text NOT NULL,
            previous_secret_enc  text,
            previous_until       timestamptz,
            created_at           timestamptz NOT NULL DEFAULT now(),
            created_by           text NOT NULL,
            deleted_at           timestamptz,
            consecutive_failures integer NOT NULL DEFAULT 0,
            circuit_open_until   timestamptz
        );

        CREATE TABLE outbound_events (
            sequence   bigserial PRIMARY KEY,
            event_id   text NOT NULL UNIQUE,
            type       text NOT NULL,
            org_id     text,
            body       text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX outbound_events_org ON outbound_events (org_id, sequence);
        CREATE INDEX outbound_events_created ON outbound_events (created_at);

        CREATE TABLE outbound_deliveries (
            id              bigserial PRIMARY KEY,
            sequence        bigint NOT NULL REFERENCES outbound_events (sequence)
                                ON DELETE CASCADE,
            endpoint_id     text NOT NULL REFERENCES outbound_endpoints (endpoint_id),
            status          text NOT NULL DEFAULT 'pending' CHECK (status IN
                                ('pending', 'delivering', 'delivered', 'failed', 'cancelled')),
            attempts        integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz NOT NULL DEFAULT now(),
            lease_until     timestamptz,
            lease_token     text,
            last_error      text,
            created_at      timestamptz NOT NULL DEFAULT now(),
            delivered_at    timestamptz,
            UNIQUE (sequence, endpoint_id)
        );
        CREATE INDEX outbound_deliveries_due ON outbound_deliveries
            (endpoint_id, next_attempt_at, id) WHERE status IN ('pending', 'delivering');
        CREATE INDEX outbound_deliveries_status ON outbound_deliveries (status, id);

        CREATE TABLE outbound_attempts (
            id           bigserial PRIMARY KEY,
            delivery_id  bigint NOT NULL REFERENCES outbound_deliveries (id) ON DELETE CASCADE,
            attempted_at timestamptz NOT NULL DEFAULT now(),
            webhook_timestamp bigint NOT NULL,
            status_code  integer,
            error        text,
            duration_ms  integer NOT NULL
        );
        CREATE INDEX outbound_attempts_delivery ON outbound_attempts (delivery_id, id);
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE IF EXISTS outbound_attempts;
        DROP TABLE IF EXISTS outbound_deliveries;
        DROP TABLE IF EXISTS outbound_events;
        DROP TABLE IF EXISTS outbound_endpoints;
        ALTER TABLE wallets DROP COLUMN IF EXISTS low_balance_reported;
        ALTER TABLE organizations DROP COLUMN IF EXISTS last_can_send;
        """
    )

"""The host application's API: keys, remembered answers, and the low-balance threshold.

`api_keys` holds one row per key of `/v1`: its scope, the organization it is confined to (if
any) and only the SHA-256 of its secret (the secret is 32 random bytes, so a plain hash is
as good as a slow one). `idempotency_keys` keeps the first answer to each `Idempotency-Key`
per organization and route, with the SHA-256 of the request it answered; beat prunes rows
older than a day. `organizations.low_balance_cents` is the threshold the API reads and sets.

Revision ID: 0009
Revises: 0007
Create Date: 2026-12-01
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE organizations ADD COLUMN IF NOT EXISTS low_balance_cents bigint
            CHECK (low_balance_cents >= 0);

        CREATE TABLE api_keys (
            key_id        text PRIMARY KEY CHECK (key_id ~ '^key_[0-9a-f]{16}$'),
            name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
            scope         text NOT NULL CHECK (scope IN ('read', 'send', 'admin')),
            org_id        text REFERENCES organizations (org_id),
            secret_sha256 bytea NOT NULL CHECK (length(secret_sha256) = 32),
            created_at    timestamptz NOT NULL DEFAULT now(),
            created_by    text NOT NULL,
            revoked_at    timestamptz,
            revoked_by    text
        );

        CREATE TABLE idempotency_keys (
            org_id         text NOT NULL,
            route          text NOT NULL,
            key            text NOT NULL,
            request_sha256 bytea NOT NULL,
            -- NULL only inside the transaction that claimed the key: it answers before commit.
            status_code    integer,
            response       jsonb,
            key_id         text,
            created_at     timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (org_id, route, key)
        );
        CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE IF EXISTS idempotency_keys;
        DROP TABLE IF EXISTS api_keys;
        ALTER TABLE organizations DROP COLUMN IF EXISTS low_balance_cents;
        """
    )

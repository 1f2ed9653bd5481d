"""Top-ups: money a host asked a buyer to pay through PayPal (an order) or Stripe (a Checkout
Session), tracked from creation to the credit.

`top_ups` holds one row per top-up: the organization, the amount asked, the provider and its
reference (PayPal order id or Stripe Checkout Session id, UNIQUE per provider: how a webhook
or a capture answer finds its top-up), the buyer's approval link, the status (`created` →
`approved` → `completed`, or `failed` / `expired`) and, once credited, the payment credited
and what it credited (`credited_cents`: what the provider captured, not what was asked).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE top_ups (
            top_up_id          text PRIMARY KEY CHECK (top_up_id ~ '^tu_[0-9a-f]{32}$'),
            org_id             text NOT NULL REFERENCES organizations (org_id),
            provider           text NOT NULL CHECK (provider IN ('paypal', 'stripe')),
            provider_reference text NOT NULL,
            amount_cents       bigint NOT NULL CHECK (amount_cents > 0),
            currency           text NOT NULL,
            approval_url       text NOT NULL,
            status             text NOT NULL DEFAULT 'created'
                CHECK (status IN ('created', 'approved', 'completed', 'failed', 'expired')),
            failure_reason     text,
            payment_id         text,
            credited_cents     bigint CHECK (credited_cents >= 0),
            created_at         timestamptz NOT NULL DEFAULT now(),
            updated_at         timestamptz NOT NULL DEFAULT now(),
            UNIQUE (provider, provider_reference)
        );
        CREATE INDEX top_ups_open ON top_ups (created_at) WHERE status IN ('created', 'approved');
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS top_ups;")

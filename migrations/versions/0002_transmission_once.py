"""Each PayPal transmission is accepted once.

PayPal's signature covers only a CRC32 of the body, so a leaked genuine transmission could be
replayed with a forged body of the same CRC and a new event id. A transmission id used once
cannot be used again for another event.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE webhook_events ADD COLUMN transmission_id text")
    op.execute(
        "CREATE UNIQUE INDEX webhook_events_transmission_once ON webhook_events "
        "(provider, transmission_id) WHERE transmission_id IS NOT NULL"
    )


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS webhook_events_transmission_once")
    op.execute("ALTER TABLE webhook_events DROP COLUMN IF EXISTS transmission_id")

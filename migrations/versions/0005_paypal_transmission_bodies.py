"""Each PayPal transmission vouches for one body, even when its event was a duplicate.

0002 kept the transmission id of the first delivery of each event only. PayPal retries an
event with fresh transmission ids; those were answered `duplicate` and forgotten, so their
headers could carry a forged body of the same CRC32. Every verified transmission is recorded
here with the SHA-256 of its body, in the transaction that stores (or finds) the event.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE TABLE paypal_transmissions (
    transmission_id  text PRIMARY KEY,
    body_sha256      bytea NOT NULL CHECK (octet_length(body_sha256) = 32),
    event_id         text NOT NULL,
    first_seen_at    timestamptz NOT NULL DEFAULT now()
);
-- Transmissions already used by stored events vouch for those bodies.
INSERT INTO paypal_transmissions (transmission_id, body_sha256, event_id, first_seen_at)
SELECT transmission_id, sha256(body), event_id, received_at
  FROM webhook_events
 WHERE provider = 'paypal' AND transmission_id IS NOT NULL
ON CONFLICT DO NOTHING;
""")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS paypal_transmissions")

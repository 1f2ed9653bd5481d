"""Twilio status callbacks that arrive before the worker has recorded the message's SID.

Twilio does not resend a callback; one that overtakes the worker's commit is kept here and
applied when the SID is recorded, so a fast `failed` is still refunded.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE TABLE early_callbacks (
    id           bigserial PRIMARY KEY,
    twilio_sid   text NOT NULL,
    status       text NOT NULL,
    price        text,
    price_unit   text,
    received_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX early_callbacks_by_sid ON early_callbacks (twilio_sid);
""")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS early_callbacks")

"""Every status column CHECKed: the statuses a message, an early Twilio callback and a
subscription's last payment may hold, as core/statuses.py names them.

Until now `messages.status`, `early_callbacks.status` and `subscriptions.last_payment_outcome`
held whatever the code wrote; these are the values it writes (a Twilio callback status
Payguard does not apply is never stored). tests/integration/test_statuses.py keeps each CHECK
and its enum equal.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE messages ADD CONSTRAINT messages_status_known CHECK (status IN (
            'queued', 'blocked', 'sending', 'retrying', 'accepted', 'rejected', 'unknown',
            'not_sent', 'sent', 'delivered', 'undelivered', 'failed', 'read'));
        ALTER TABLE early_callbacks ADD CONSTRAINT early_callbacks_status_known CHECK (status IN (
            'queued', 'sending', 'sent', 'delivered', 'undelivered', 'failed', 'read'));
        ALTER TABLE subscriptions ADD CONSTRAINT subscriptions_last_payment_outcome_known
            CHECK (last_payment_outcome IN ('paid', 'failed'));
        """
    )


def downgrade() -> None:
    op.execute(
        """
        ALTER TABLE subscriptions DROP CONSTRAINT IF EXISTS subscriptions_last_payment_outcome_known;
        ALTER TABLE early_callbacks DROP CONSTRAINT IF EXISTS early_callbacks_status_known;
        ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_status_known;
        """
    )

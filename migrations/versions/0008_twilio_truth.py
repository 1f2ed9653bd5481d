"""What Twilio did, tied to the message it did it for.

* `messages.twilio_subaccount_sid`: the subaccount a message was sent through, so a callback
  signed with a subaccount's token counts for that subaccount's messages only (backfilled
  from the organization for messages sent before).
* `messages.send_lease_until`: how long the run that marked a message `sending` owns it; a
  second copy of the send task leaves the message alone until then.
* `messages.twilio_num_segments`: the segments Twilio billed, against `segments` held.
* `early_callbacks.signer_account` (NULL: the parent account) and `message_id` (the `?m=` of
  the callback URL): an early callback is checked against its signer when it is applied.
* `ledger_checks.twilio_mismatches`: messages whose billed segments disagreed with what was
  charged, at beat's last verification (what /metrics serves).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE messages
            ADD COLUMN twilio_subaccount_sid text,
            ADD COLUMN send_lease_until timestamptz,
            ADD COLUMN twilio_num_segments integer CHECK (twilio_num_segments > 0);
        UPDATE messages m SET twilio_subaccount_sid = o.twilio_subaccount_sid
          FROM organizations o
         WHERE o.org_id = m.org_id
           AND (m.twilio_sid IS NOT NULL OR m.status IN ('sending', 'unknown'));
        CREATE INDEX messages_by_subaccount ON messages (twilio_subaccount_sid)
            WHERE twilio_subaccount_sid IS NOT NULL;
        CREATE INDEX messages_segments_disagree ON messages (message_id)
            WHERE twilio_num_segments IS NOT NULL AND twilio_num_segments <> segments;

        ALTER TABLE early_callbacks
            ADD COLUMN signer_account text,
            ADD COLUMN message_id text,
            ADD COLUMN num_segments integer;

        ALTER TABLE ledger_checks
            ADD COLUMN twilio_mismatches integer NOT NULL DEFAULT 0
                CHECK (twilio_mismatches >= 0);
        """
    )


def downgrade() -> None:
    op.execute(
        """
        ALTER TABLE ledger_checks DROP COLUMN IF EXISTS twilio_mismatches;
        ALTER TABLE early_callbacks
            DROP COLUMN IF EXISTS num_segments,
            DROP COLUMN IF EXISTS message_id,
            DROP COLUMN IF EXISTS signer_account;
        DROP INDEX IF EXISTS messages_segments_disagree;
        DROP INDEX IF EXISTS messages_by_subaccount;
        ALTER TABLE messages
            DROP COLUMN IF EXISTS twilio_num_segments,
            DROP COLUMN IF EXISTS send_lease_until,
            DROP COLUMN IF EXISTS twilio_subaccount_sid;
        """
    )

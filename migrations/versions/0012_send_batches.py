"""Batched sending: how many times a message was handed to Twilio, and an index of the
messages still to send, per organization, in the order they were queued.

`send_tries` counts the claims that marked a message `sending`: the batch path gives a message
up (`not_sent`, hold released) once the tries that reached nothing at Twilio run out, as the
single send task does with its own retry count. `messages_to_send` is what one batch claims
(`queued` or `retrying`, oldest first, for one organization), `messages_sending` finds the
messages a run (its task id, `send_attempt`) left `sending`; settled messages, the great
majority, stay out of both.
`queue_seq` orders the messages one transaction queued (they share `created_at`).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE messages ADD COLUMN send_tries integer NOT NULL DEFAULT 0;
        -- Set from now on only (no table rewrite): the order of the messages queued in one
        -- transaction, whose created_at is the same.
        CREATE SEQUENCE messages_queue_seq;
        ALTER TABLE messages ADD COLUMN queue_seq bigint;
        ALTER TABLE messages ALTER COLUMN queue_seq SET DEFAULT nextval('messages_queue_seq');
        ALTER SEQUENCE messages_queue_seq OWNED BY messages.queue_seq;
        CREATE INDEX messages_to_send ON messages (org_id, created_at, queue_seq)
            WHERE status IN ('queued', 'retrying');
        CREATE INDEX messages_sending ON messages (send_attempt) WHERE status = 'sending';
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX IF EXISTS messages_sending;
        DROP INDEX IF EXISTS messages_to_send;
        ALTER TABLE messages DROP COLUMN IF EXISTS queue_seq;
        ALTER TABLE messages DROP COLUMN IF EXISTS send_tries;
        """
    )

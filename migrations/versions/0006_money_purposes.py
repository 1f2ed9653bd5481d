"""Money keeps its purpose: what each payment has given back, failed refunds, awaited payments.

* `payments.refunded_cents`: how much of a credited payment refunds, reversals and lost
  disputes have already taken back, so together they never take more than it credited.
* `refund_failures`: a provider refund that failed or was canceled. Its clawback is given back
  once, and a `refund.created` that arrives after the failure takes nothing.
* `webhook_events.awaiting`: the payment a parked event waits for (`<provider>:<payment id>`),
  so crediting that payment puts the event back in the queue.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
ALTER TABLE payments ADD COLUMN refunded_cents bigint NOT NULL DEFAULT 0
    CONSTRAINT payments_refunded_not_negative CHECK (refunded_cents >= 0);

CREATE TABLE refund_failures (
    provider    text NOT NULL,
    refund_id   text NOT NULL,
    payment_id  text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, refund_id)
);

ALTER TABLE webhook_events ADD COLUMN awaiting text;
CREATE INDEX webhook_events_awaiting ON webhook_events (awaiting) WHERE awaiting IS NOT NULL;
""")


def downgrade() -> None:
    op.execute("""
DROP INDEX IF EXISTS webhook_events_awaiting;
ALTER TABLE webhook_events DROP COLUMN IF EXISTS awaiting;
DROP TABLE IF EXISTS refund_failures;
ALTER TABLE payments DROP COLUMN IF EXISTS refunded_cents;
""")

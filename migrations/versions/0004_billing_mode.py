"""A billing mode per organization: `subscription` (the default) or `prepaid`.

Under `subscription` billing an organization sends only while a subscription is active, and
one that never had a subscription has none active. Before this revision an organization with
no subscription was allowed to send on its prepaid money alone; so that no running customer
is paused by a deploy, every existing organization that has never had a subscription becomes
`prepaid`. The migration logs how many.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

import logging

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")


def upgrade() -> None:
    op.execute(
        "ALTER TABLE organizations ADD COLUMN billing text NOT NULL DEFAULT 'subscription' "
        "CONSTRAINT organizations_billing_known CHECK (billing IN ('subscription', 'prepaid'))"
    )
    converted = (
        op.get_bind()
        .exec_driver_sql(
            "UPDATE organizations o SET billing = 'prepaid' "
            "WHERE NOT EXISTS (SELECT 1 FROM subscriptions s WHERE s.org_id = o.org_id)"
        )
        .rowcount
    )
    log.info(
        "billing mode: %d existing organization(s) without a subscription are now 'prepaid'",
        converted,
    )


def downgrade() -> None:
    op.execute("ALTER TABLE organizations DROP COLUMN IF EXISTS billing")

"""The ledger verification's result, kept for /metrics: `ledger_checks`.

Beat's verify_ledger job compares every wallet with its journal and records here when it
did and how many figures disagreed. A scrape of /metrics reads the newest row instead of
aggregating the whole journal itself, so its cost no longer grows with the journal.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE ledger_checks (
            id              bigserial PRIMARY KEY,
            checked_at      timestamptz NOT NULL DEFAULT now(),
            wallets_checked integer NOT NULL CHECK (wallets_checked >= 0),
            mismatches      integer NOT NULL CHECK (mismatches >= 0)
        );
        CREATE INDEX ledger_checks_checked_at ON ledger_checks (checked_at DESC);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS ledger_checks")

"""Which subscription statuses may send: one rule for every provider (core.subscriptions)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.subscriptions import allows_sending

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
GRACE = timedelta(days=3)


@pytest.mark.parametrize("status", ["active", "trialing", "ACTIVE"])
def test_active_and_trialing_allow_sending(status):
    assert allows_sending(status, None, NOW, GRACE)


@pytest.mark.parametrize(
    "status",
    [
        # Stripe
        "unpaid",
        "canceled",
        "incomplete",
        "incomplete_expired",
        "paused",
        # PayPal, lower-cased
        "approval_pending",
        "suspended",
        "cancelled",
        "expired",
        # a status a provider adds later fails closed
        "something_new",
        "",
    ],
)
def test_other_statuses_block_sending(status):
    assert not allows_sending(status, NOW - timedelta(minutes=1), NOW, GRACE)


@pytest.mark.parametrize(
    ("since", "allowed"),
    [
        (NOW, True),
        (NOW - timedelta(days=2, hours=23), True),
        (NOW - GRACE, True),
        (NOW - GRACE - timedelta(seconds=1), False),
        (NOW - timedelta(days=10), False),
    ],
)
def test_past_due_allows_sending_only_within_grace(since, allowed):
    assert allows_sending("past_due", since, NOW, GRACE) is allowed


def test_past_due_without_a_start_blocks_sending():
    assert not allows_sending("past_due", None, NOW, GRACE)


def test_naive_past_due_start_is_never_compared():
    # A naive time has no place in the grace arithmetic; Python's own refusal is what stops it.
    with pytest.raises(TypeError):
        allows_sending("past_due", NOW.replace(tzinfo=None), NOW, GRACE)

"""The outbox relay re-publishes work the broker lost: an event still `received`, a message
still `queued` or `retrying`, long after its task was published; finished work is pruned."""

from __future__ import annotations

from sqlalchemy import text

from core import messages, orgs, outbox, sending, wallet
from core.db import run_in_transaction


def _claim(engine) -> list:
    return run_in_transaction(
        engine,
        lambda c: [
            (r.task, list(r.args))
            for r in outbox.claim_for_relay(c, limit=100, grace_seconds=1, redeliver_seconds=600)
        ],
    )


def _age_outbox(engine, seconds: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE outbox SET published_at = now() - make_interval(secs => :s), "
                "created_at = now() - make_interval(secs => :s)"
            ),
            {"s": seconds},
        )


def _queued_message(engine) -> str:
    def setup(conn):
        # Prepaid: money alone decides, so the message is queued (one that sending already
        # refuses is recorded blocked and never gets a send task).
        orgs.create(
            conn, "acme", twilio_subaccount_sid="AC" + "1" * 32, sender="+15005550006",
            billing="prepaid",
        )  # fmt: skip
        wallet.credit(conn, "acme", 100, "seed")
        return messages.queue(conn, "acme", "+15005550010", "hi", sending.Policy()).message_id

    return run_in_transaction(engine, setup)


def test_a_send_task_the_broker_lost_is_published_again(engine):
    message_id = _queued_message(engine)
    _age_outbox(engine, 3600)  # published an hour ago, and the message is still queued

    assert _claim(engine) == [(messages.SEND_TASK, [message_id])]


def test_a_sent_message_is_not_published_again_and_its_row_is_pruned(engine):
    message_id = _queued_message(engine)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE messages SET status = 'accepted' WHERE message_id = :m"), {"m": message_id}
        )
    _age_outbox(engine, 2 * 86400)

    assert _claim(engine) == []
    pruned = run_in_transaction(
        engine, lambda c: outbox.prune_published(c, older_than_seconds=86400, limit=100)
    )
    assert pruned == 1


def test_pending_work_is_never_pruned(engine):
    _queued_message(engine)
    _age_outbox(engine, 2 * 86400)

    pruned = run_in_transaction(
        engine, lambda c: outbox.prune_published(c, older_than_seconds=86400, limit=100)
    )
    assert pruned == 0
    assert len(_claim(engine)) == 1


def test_a_send_whose_lease_ended_is_published_again_to_be_settled(engine):
    message_id = _queued_message(engine)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE messages SET status = 'sending', "
                "send_lease_until = now() - interval '1 minute' WHERE message_id = :m"
            ),
            {"m": message_id},
        )
    _age_outbox(engine, 3600)

    assert _claim(engine) == [(messages.SEND_TASK, [message_id])]


def test_a_send_under_a_live_lease_is_left_to_its_owner(engine):
    message_id = _queued_message(engine)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE messages SET status = 'sending', "
                "send_lease_until = now() + interval '1 minute' WHERE message_id = :m"
            ),
            {"m": message_id},
        )
    _age_outbox(engine, 3600)

    assert _claim(engine) == []

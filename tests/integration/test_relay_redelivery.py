"""The outbox relay re-publishes work the broker lost: an event still `received`, a message
still `queued` or `retrying` (through one batch drain of its organization), long after its
task was published; finished work is pruned."""

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


SUBACCOUNT_DIGIT = {"acme": "1", "beta": "2"}


def _queued_message(engine, org: str = "acme") -> str:
    def setup(conn):
        # Prepaid: money alone decides, so the message is queued (one that sending already
        # refuses is recorded blocked and never gets a send task).
        if not orgs.exists(conn, org):
            orgs.create(
                conn, org, twilio_subaccount_sid="AC" + SUBACCOUNT_DIGIT[org] * 32, sender="+15005550006",
                billing="prepaid",
            )  # fmt: skip
            wallet.credit(conn, org, 100, "seed")
        return messages.queue(conn, org, "+15005550010", "hi", sending.Policy()).message_id

    return run_in_transaction(engine, setup)


class Recorder:
    def __init__(self) -> None:
        self.published: list[tuple[str, list]] = []

    def publish(self, task: str, args: list, *, task_id: str | None = None) -> None:
        self.published.append((task, args))

    def close(self) -> None:
        pass


def _relay(engine) -> list[tuple[str, list]]:
    recorder = Recorder()
    run_in_transaction(
        engine,
        lambda c: outbox.relay(c, recorder, limit=100, grace_seconds=1, redeliver_seconds=600),
    )
    return recorder.published


def _set_sending(engine, message_id: str, lease: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE messages SET status = 'sending', "
                "send_lease_until = now() + CAST(:lease AS interval) WHERE message_id = :m"
            ),
            {"m": message_id, "lease": lease},
        )


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
    _set_sending(engine, message_id, "-1 minute")
    _age_outbox(engine, 3600)

    assert _claim(engine) == [(messages.SEND_TASK, [message_id])]


def test_a_send_under_a_live_lease_is_left_to_its_owner(engine):
    message_id = _queued_message(engine)
    _set_sending(engine, message_id, "1 minute")
    _age_outbox(engine, 3600)

    assert _claim(engine) == []


def test_a_backlog_the_broker_lost_gets_one_drain_of_its_organization_not_a_task_each(engine):
    for org, n in (("acme", 3), ("beta", 2)):
        for _ in range(n):
            _queued_message(engine, org)
    _age_outbox(engine, 3600)

    assert _relay(engine) == [
        (outbox.SEND_BATCH_TASK, ["acme"]),
        (outbox.SEND_BATCH_TASK, ["beta"]),
    ]
    assert _relay(engine) == []  # every row of the drain is published again with it


def test_no_drain_is_added_while_one_is_at_work(engine):
    working = _queued_message(engine)
    for _ in range(3):
        _queued_message(engine)
    _set_sending(engine, working, "1 minute")  # a drain's message under a live lease
    _age_outbox(engine, 3600)

    assert _relay(engine) == []
    assert _claim(engine) == []  # asked again only after the redeliver window


def test_a_send_past_its_lease_still_gets_its_own_task_to_settle_it(engine):
    message_id = _queued_message(engine)
    _set_sending(engine, message_id, "-1 minute")
    _age_outbox(engine, 3600)

    assert _relay(engine) == [(messages.SEND_TASK, [message_id])]


def _outbox_rows(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM outbox")).scalar_one()


def test_the_relay_forgets_a_row_once_its_work_is_done_and_a_redeliver_window_has_passed(
    engine,
):
    sent = _queued_message(engine)
    _queued_message(engine)  # still waiting
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE messages SET status = 'accepted' WHERE message_id = :m"), {"m": sent}
        )
    _age_outbox(engine, 601)  # the window of _relay is 600 s

    assert _relay(engine) == [(outbox.SEND_BATCH_TASK, ["acme"])]  # for the waiting one
    assert _outbox_rows(engine) == 1  # the sent message's row is gone, the waiting one's kept

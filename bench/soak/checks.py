"""The checks after the drain: every payment, refund and charge applied exactly once."""

from __future__ import annotations

import itertools
import json
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass

import psycopg
from psycopg.rows import dict_row

from bench.soak.common import CHARGED_STATUSES, SENT_STATUSES, UNCHARGED_STATUSES
from bench.soak.plan import Plan
from tests.stack import BIN
from tests.support.fakes.fake_twilio import (
    FakeTwilio,
)


class Checks:
    def __init__(self) -> None:
        self.rows: list[tuple[str, bool, str]] = []

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.rows.append((name, ok, detail))

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.rows)

    def print(self) -> None:
        width = max(len(name) for name, _, _ in self.rows)
        print(f"\n{'check':<{width}}  result  detail")
        for name, ok, detail in self.rows:
            print(f"{name:<{width}}  {'PASS' if ok else 'FAIL':<6}  {detail}")


def sample(items, n: int = 3) -> str:
    items = list(items)
    return "; ".join(str(i) for i in items[:n]) + (
        f" … (+{len(items) - n})" if len(items) > n else ""
    )


@dataclass
class Rows:
    """What the checks read from the database after the drain."""

    events: list[dict]
    journal: list[dict]
    wallets: list[dict]
    msgs: list[dict]
    subs: list[dict]
    freezes: list[dict]
    early: int


def run_checks(
    database_url: str,
    env: dict[str, str],
    plan: Plan,
    twilio: FakeTwilio,
    drained: bool,
    leftover: dict,
    other_parked: list,
) -> Checks:
    checks = Checks()
    checks.add(
        "drained (no event received, no message pending, outbox published)",
        drained,
        "all done" if drained else f"still pending: {leftover}",
    )
    check_ledger_verify(checks, database_url, env)
    expected_journal, expected_subs, acked = plan.expectations()
    rows = read_rows(database_url)
    check_inbox(checks, rows, acked, other_parked)
    captures, msg_refunds = check_journal(checks, rows, expected_journal)
    check_messages(checks, rows, plan, twilio, captures, msg_refunds)
    check_money(checks, rows, expected_journal)
    check_subscriptions(checks, rows, expected_subs)
    check_freezes(checks, rows)
    return checks


def check_ledger_verify(checks: Checks, database_url: str, env: dict[str, str]) -> None:
    # 1. the operator's own verification, as a console script
    verify = subprocess.run(
        [str(BIN / "payguard"), "ledger", "verify", "--json"],
        env={**env, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        verdict = json.loads(verify.stdout)
    except ValueError:
        verdict = {"ok": False, "error": (verify.stdout + verify.stderr)[-300:]}
    checks.add(
        "payguard ledger verify --json",
        verify.returncode == 0 and verdict.get("ok") is True,
        f"exit {verify.returncode}, ok={verdict.get('ok')}, "
        f"wallets {verdict.get('wallets_checked')}, mismatches "
        f"{sample(verdict.get('mismatches') or []) or 'none'}",
    )


def read_rows(database_url: str) -> Rows:
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        events = conn.execute(
            "SELECT provider, event_id, status, last_error FROM webhook_events"
        ).fetchall()
        journal = conn.execute(
            "SELECT org_id, reference, kind, amount_cents, requested_cents, debt_delta_cents "
            "FROM journal"
        ).fetchall()
        wallets = conn.execute(
            "SELECT org_id, balance_cents, held_cents, debt_cents FROM wallets"
        ).fetchall()
        msgs = conn.execute(
            "SELECT message_id, org_id, status, price_cents, charged_cents, refunded, "
            "twilio_sid, body FROM messages"
        ).fetchall()
        subs = conn.execute(
            "SELECT provider, subscription_id, status FROM subscriptions"
        ).fetchall()
        freezes = conn.execute(
            "SELECT org_id, reason FROM wallet_freezes WHERE lifted_at IS NULL"
        ).fetchall()
        early = conn.execute("SELECT count(*) AS n FROM early_callbacks").fetchone()["n"]
    return Rows(events, journal, wallets, msgs, subs, freezes, early)


def check_inbox(checks: Checks, rows: Rows, acked: set, other_parked: list) -> None:
    events = rows.events
    # 2. none lost: every acknowledged webhook is in the inbox, applied or ignored
    stored = {(e["provider"], e["event_id"]): e for e in events}
    missing = [k for k in acked if k not in stored]
    unsettled = [
        (k, stored[k]["status"], stored[k]["last_error"])
        for k in acked
        if k in stored and stored[k]["status"] not in ("processed", "ignored")
    ]
    strangers = [k for k in stored if k not in acked]
    by_status = Counter(e["status"] for e in events)
    checks.add(
        "every webhook answered 200 is in the inbox, processed or ignored",
        not missing and not unsettled and not strangers,
        f"{len(acked)} acknowledged; inbox {dict(by_status)}"
        + (f"; MISSING {sample(missing)}" if missing else "")
        + (f"; NOT APPLIED {sample(unsettled)}" if unsettled else "")
        + (f"; never sent {sample(strangers)}" if strangers else ""),
    )
    checks.add(
        "no event parked or failed for another reason than ordering",
        not other_parked and by_status.get("failed", 0) == 0,
        "none"
        if not other_parked and not by_status.get("failed")
        else f"parked {sample(other_parked)}; failed {by_status.get('failed', 0)}",
    )


def check_journal(
    checks: Checks, rows: Rows, expected_journal: dict
) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """The journal check; the rows of message holds captured and of message refunds, by id."""
    journal = rows.journal
    # 3. the journal: one row per payment and refund reference sent, nothing else
    rows_by_ref: dict[str, list[dict]] = defaultdict(list)
    captures: dict[str, list[dict]] = defaultdict(list)
    msg_refunds: dict[str, list[dict]] = defaultdict(list)
    for row in journal:
        ref = row["reference"]
        if ref.startswith("hold:msg:"):
            captures[ref.removeprefix("hold:msg:")].append(row)
        elif ref.startswith("msg:") and ref.endswith(":refund"):
            msg_refunds[ref.removeprefix("msg:").removesuffix(":refund")].append(row)
        else:
            rows_by_ref[ref].append(row)
    problems = []
    for ref, (org, cents) in expected_journal.items():
        rows = rows_by_ref.get(ref, [])
        if len(rows) != 1:
            problems.append(f"{ref}: {len(rows)} rows")
        elif rows[0]["org_id"] != org or rows[0]["requested_cents"] != cents:
            problems.append(
                f"{ref}: {rows[0]['org_id']} {rows[0]['requested_cents']} != {org} {cents}"
            )
    extra = [ref for ref in rows_by_ref if ref not in expected_journal]
    payments = sum(1 for ref in expected_journal if ":payment:" in ref)
    checks.add(
        "journal: exactly one row per payment / refund / lost dispute sent",
        not problems and not extra,
        f"{payments} payments, {len(expected_journal) - payments} refunds and lost disputes"
        + (f"; WRONG {sample(problems)}" if problems else "")
        + (f"; UNEXPECTED {sample(extra)}" if extra else ""),
    )
    return captures, msg_refunds


def check_messages(
    checks: Checks,
    rows: Rows,
    plan: Plan,
    twilio: FakeTwilio,
    captures: dict[str, list[dict]],
    msg_refunds: dict[str, list[dict]],
) -> None:
    msgs, early = rows.msgs, rows.early
    # 4. messages: charged once, at their price, only when they may have gone out
    by_sid = {m["twilio_sid"]: m for m in msgs if m["twilio_sid"]}
    posts = Counter(r.params.get("Body") for r in twilio.requests("messages") if r.method == "POST")
    created: dict[str, list[str]] = defaultdict(list)
    for m in twilio.messages():
        created[m["body"]].append(m["sid"])
    bodies = {m["body"] for m in msgs}
    charge_problems, twilio_problems, refund_problems = [], [], []
    for m in msgs:
        mid, status, charged, price = (
            m["message_id"],
            m["status"],
            m["charged_cents"],
            m["price_cents"],
        )
        if status in CHARGED_STATUSES and charged != price:
            charge_problems.append(f"{mid} {status} charged {charged} of {price}")
        if status in UNCHARGED_STATUSES and charged != 0:
            charge_problems.append(f"{mid} {status} charged {charged}")
        rows = captures.get(mid, [])
        if (len(rows) != 1 or rows[0]["amount_cents"] != -charged) if charged else rows:
            charge_problems.append(f"{mid} {status}: {len(rows)} capture rows for {charged}")
        n_posts, sids = posts.get(m["body"], 0), created.get(m["body"], [])
        if n_posts > 1:
            twilio_problems.append(f"{mid} {status}: {n_posts} creates")
        if status in SENT_STATUSES and (len(sids) != 1 or sids[0] != m["twilio_sid"]):
            twilio_problems.append(f"{mid} {status}: created {sids}, recorded {m['twilio_sid']}")
        if status in ("blocked", "not_sent") and n_posts:
            twilio_problems.append(f"{mid} {status}: {n_posts} creates")
        refunds = msg_refunds.get(mid, [])
        should_refund = status == "failed" and charged > 0
        if (
            m["refunded"] != should_refund
            or len(refunds) != int(should_refund)
            or (refunds and refunds[0]["requested_cents"] != charged)
        ):
            refund_problems.append(f"{mid} {status} refunded={m['refunded']} rows={len(refunds)}")
    orphans = [str(b)[:24] for b in itertools.chain(posts, created) if b not in bodies]
    statuses = Counter(m["status"] for m in msgs)
    checks.add(
        "messages: accepted/unknown charged their price once, others 0",
        not charge_problems,
        f"{len(msgs)} messages {dict(statuses)}"
        + (f"; WRONG {sample(charge_problems)}" if charge_problems else ""),
    )
    checks.add(
        "Twilio: <= 1 create per message, exactly 1 for each one sent",
        not twilio_problems and not orphans,
        f"{sum(posts.values())} creates for {len(msgs)} messages"
        + (f"; WRONG {sample(twilio_problems)}" if twilio_problems else "")
        + (f"; creates of no message {sample(orphans)}" if orphans else ""),
    )
    callback_problems = []
    for sid, (final, ok) in plan.terminal_callback.items():
        m = by_sid.get(sid)
        if ok and m and m["status"] != final:
            callback_problems.append(f"{m['message_id']}: {m['status']} after {final}")
    checks.add(
        "status callbacks: final status kept, failed refunded once",
        not refund_problems and not callback_problems,
        f"{len(plan.terminal_callback)} messages called back, "
        f"{sum(1 for m in msgs if m['refunded'])} refunded, {early} callbacks kept for SIDs "
        "never recorded (messages settled `unknown`)"
        + (
            f"; WRONG {sample(refund_problems + callback_problems)}"
            if refund_problems or callback_problems
            else ""
        ),
    )


def check_money(checks: Checks, rows: Rows, expected_journal: dict) -> None:
    msgs, wallets = rows.msgs, rows.wallets
    # 5. money per organization: balance - debt is what the script paid in, minus what it
    #    took back, minus the charges Payguard decided (checked above), plus their refunds
    net: Counter[str] = Counter()
    for ref, (org, cents) in expected_journal.items():
        net[org] += cents if ":payment:" in ref else -cents
    for m in msgs:
        net[m["org_id"]] -= m["charged_cents"] - (m["charged_cents"] if m["refunded"] else 0)
    wrong, negative = [], []
    for w in wallets:
        got = w["balance_cents"] - w["debt_cents"]
        if got != net[w["org_id"]]:
            wrong.append(f"{w['org_id']}: {got} != {net[w['org_id']]}")
        if w["balance_cents"] < 0 or w["held_cents"] != 0 or w["debt_cents"] < 0:
            negative.append(
                f"{w['org_id']} {w['balance_cents']}/{w['held_cents']}/{w['debt_cents']}"
            )
    in_debt = sum(1 for w in wallets if w["debt_cents"] > 0)
    checks.add(
        "per org: balance - debt == payments - refunds - charges + refunds of charges",
        not wrong,
        f"{len(wallets)} wallets, {in_debt} in debt"
        + (f"; WRONG {sample(wrong)}" if wrong else ""),
    )
    checks.add(
        "no wallet negative, nothing left held",
        not negative,
        "balance >= 0, held = 0, debt >= 0 everywhere" if not negative else sample(negative),
    )


def check_subscriptions(checks: Checks, rows: Rows, expected_subs: dict) -> None:
    subs = rows.subs
    # 6. subscriptions: the newest status sent wins, whatever the order of arrival
    actual_subs = {(s["provider"], s["subscription_id"]): s["status"] for s in subs}
    sub_problems = [
        f"{k[1]}: {actual_subs.get(k)} != {v}"
        for k, v in expected_subs.items()
        if actual_subs.get(k) != v
    ]
    checks.add(
        "subscriptions: newest status wins over out-of-order deliveries",
        not sub_problems,
        f"{len(expected_subs)} subscriptions {dict(Counter(expected_subs.values()))}"
        + (f"; WRONG {sample(sub_problems)}" if sub_problems else ""),
    )


def check_freezes(checks: Checks, rows: Rows) -> None:
    freezes, wallets = rows.freezes, rows.wallets
    # 7. freezes: every dispute closed, a debt freeze exactly where there is debt
    active = defaultdict(set)
    for f in freezes:
        active[f["org_id"]].add(f["reason"])
    freeze_problems = [
        f"{org}: {sorted(r)}"
        for org, r in active.items()
        if any(x.startswith("dispute:") for x in r)
    ]
    debt = {w["org_id"]: w["debt_cents"] for w in wallets}
    freeze_problems += [
        f"{org}: debt {debt[org]} freeze {'debt' in active.get(org, ())}"
        for org in debt
        if (debt[org] > 0) != ("debt" in active.get(org, ()))
    ]
    checks.add(
        "freezes: no dispute freeze left, debt freeze iff debt",
        not freeze_problems,
        f"{sum(len(r) for r in active.values())} active freezes"
        + (f"; WRONG {sample(freeze_problems)}" if freeze_problems else ""),
    )

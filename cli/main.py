"""The `payguard` console: parse the command line, read settings once, run one unit of work
in `core`, print the result (one JSON object with --json), exit 0, 1 (refused) or 2 (bad usage).

A command is a decorated function in the registry below; the runner gives it a connection
inside one core.db.run_in_transaction unit (committed when it returns, rolled back when it
raises, so a refusal leaves nothing half-written) and prints whatever dict it returns:

    @command("wallet show", "the wallet", arg("org_id", metavar="ORG_ID"))
    def wallet_show(ctx: Context, args: argparse.Namespace) -> dict:
        return wallet.show(ctx.conn, args.org_id).as_dict()

Refusals are core.errors exceptions; they are mapped to exit statuses in one place, `main`.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from cli import output
from core import (
    apikeys,
    audit,
    campaigns,
    inbox,
    messages,
    orgs,
    outbound,
    outbox,
    overview,
    sending,
    wallet,
    wallet_operations,
)
from core.db import make_engine, run_in_transaction
from core.errors import InvalidInput, PayguardError, Refused
from core.settings import ConfigError, Settings, load_settings
from core.statuses import MessageStatus

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2

# ---------------------------------------------------------------- the registry

Arg = tuple[tuple[str, ...], dict[str, Any]]
Result = dict[str, Any]


def arg(*flags: str, **kwargs: Any) -> Arg:
    """One argument, declared exactly as `ArgumentParser.add_argument` takes it."""
    return flags, kwargs


@dataclass(frozen=True)
class Context:
    """What a command gets besides its arguments."""

    settings: Settings | None  # None only for needs="nothing"
    interactive: bool  # stderr is a terminal, so progress lines are welcome
    transaction: Connection | None = None  # the unit of work, for needs="db" only
    after_commit: list[Callable[[], None]] = field(default_factory=list)
    pending_publish: list[tuple[str, list, int | None]] = field(default_factory=list)

    @property
    def conn(self) -> Connection:
        if self.transaction is None:
            raise RuntimeError("only commands registered with needs='db' get a connection")
        return self.transaction

    def progress(self, message: str) -> None:
        if self.interactive:
            print(message, file=sys.stderr, flush=True)

    def progress_bar(self, what: str, done: int, total: int) -> None:
        """One line redrawn in place on a terminal; nothing when stderr is not one."""
        if not self.interactive:
            return
        width = 30
        filled = width * done // total if total else width
        percent = 100 * done // total if total else 100
        end = "\n" if done >= total else ""
        print(
            f"\r{what} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {percent}%",
            end=end,
            file=sys.stderr,
            flush=True,
        )


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    help: str
    args: tuple[Arg, ...]
    run: Callable[[Context, argparse.Namespace], Result]
    # "db": DATABASE_URL and one transaction; "settings": DATABASE_URL, no connection
    # (the command manages its own, e.g. Alembic); "nothing": no settings at all.
    needs: Literal["db", "settings", "nothing"]
    exit_status: Callable[[Result], int]
    render: Callable[[Result], str]


COMMANDS: dict[tuple[str, ...], Command] = {}
GROUPS = {
    "db": "the database schema",
    "org": "organizations",
    "wallet": "prepaid wallets",
    "ledger": "the journal as a whole",
    "campaign": "campaigns and their pauses",
    "message": "the safe send path",
    "events": "the webhook inbox, and events sent to the host (outbound)",
    "endpoint": "the host's webhook endpoints (events out)",
    "sample": "signed sample webhooks for the dev stack",
    "apikey": "API keys of the host API (/v1)",
}


def command(
    name: str,
    help: str,
    *args: Arg,
    needs: Literal["db", "settings", "nothing"] = "db",
    exit_status: Callable[[Result], int] = lambda result: EXIT_OK,
    render: Callable[[Result], str] = output.render,
) -> Callable[[Callable[[Context, argparse.Namespace], Result]], Any]:
    """Register `payguard NAME…`; the words of `name` become nested subcommands."""

    def register(fn: Callable[[Context, argparse.Namespace], Result]) -> Any:
        words = tuple(name.split())
        if words in COMMANDS:
            raise ValueError(f"command {name!r} is registered twice")
        COMMANDS[words] = Command(words, help, args, fn, needs, exit_status, render)
        return fn

    return register


# ---------------------------------------------------------------- helpers


def _policy(ctx: Context) -> sending.Policy:
    assert ctx.settings is not None
    return sending.Policy.from_settings(ctx.settings)


def _audit(conn: Connection, *, actor: str, action: str, org_id: str | None, details: dict) -> None:
    audit.record(conn, actor=actor, action=action, org_id=org_id, details=details)


def os_user() -> str:
    """Who runs this console, as the operating system says (LOGNAME, USER, … then the
    password database); "unknown" where it cannot say (a container with no passwd entry)."""
    try:
        return getpass.getuser() or "unknown"
    except (OSError, KeyError, ImportError):
        return "unknown"


def _publish_after_commit(ctx: Context, task: str, args: list, outbox_id: int | None) -> None:
    """Publish right after the commit when a broker is configured; the relay covers failures.

    Messages of one command go out together over one broker and one database connection."""
    if not ctx.pending_publish:
        ctx.after_commit.append(lambda: _flush_publishes(ctx))
    ctx.pending_publish.append((task, args, outbox_id))


def _flush_publishes(ctx: Context) -> None:
    if not (ctx.settings and ctx.settings.broker_url and ctx.pending_publish):
        return
    from bus.publisher import Publisher

    publisher = Publisher.from_settings(ctx.settings)
    engine = _engine(ctx.settings)
    pending = [
        outbox.Pending.of_row(task, args, outbox_id) if outbox_id else outbox.Pending(task, args)
        for task, args, outbox_id in ctx.pending_publish
    ]
    try:
        published = outbox.publish_after_commit(
            lambda fn: run_in_transaction(engine, fn), publisher, pending
        )
        if published < len(pending):
            ctx.progress("broker unavailable: the outbox relay will publish the rest")
    finally:
        publisher.close()
        engine.dispose()


def _engine(settings: Settings) -> Engine:
    """One connection, as a console command needs."""
    return make_engine(
        settings.DATABASE_URL or "",
        pool_size=1,
        max_overflow=0,
        prepare_threshold=settings.DATABASE_PREPARE_THRESHOLD,
    )


# ---------------------------------------------------------------- commands

ORG_ID = arg("org_id", metavar="ORG_ID")
# Every command that changes state takes --actor and writes one audit row with it, in the
# command's own transaction; unset, the operating-system user (resolved in _execute).
ACTOR = arg(
    "--actor",
    default=None,
    metavar="NAME",
    help="who is doing this, for the audit trail (default: the operating-system user)",
)


@command("db upgrade", "migrate the database to head (safe to run twice)", ACTOR, needs="settings")
def db_upgrade(ctx: Context, args: argparse.Namespace) -> Result:
    import migrations  # Alembic is slow to import and only this command needs it

    assert ctx.settings and ctx.settings.DATABASE_URL
    before = migrations.current(ctx.settings.DATABASE_URL)
    revision = migrations.upgrade(ctx.settings.DATABASE_URL)
    if revision != before:
        # Alembic commits the schema itself; the audit row follows in a transaction of its
        # own (there is no audit table before the first revision). A run that changed
        # nothing, as every release but the one with a migration, records nothing.
        engine = _engine(ctx.settings)
        try:
            run_in_transaction(
                engine,
                lambda conn: _audit(
                    conn, actor=args.actor, action="db.upgrade", org_id=None,
                    details={"from": before, "to": revision},
                ),
            )  # fmt: skip
        finally:
            engine.dispose()
    return {"revision": revision, "previous_revision": before, "changed": revision != before}


@command(
    "org create",
    "register an organization and its wallet",
    ORG_ID,
    arg("--currency", default="USD", help="ISO 4217 code of the wallet (default USD)"),
    arg("--twilio-subaccount", metavar="SID", help="its Twilio subaccount (AC…)"),
    arg("--sender", metavar="E164_OR_MG_SID", help="a number or a Messaging Service SID"),
    arg("--segment-price-cents", type=int, metavar="N", help="its own price per SMS segment"),
    arg(
        "--billing",
        choices=orgs.BILLING_MODES,
        default="subscription",
        help="subscription (default): may send only while a subscription is active; "
        "prepaid: money alone decides",
    ),
    arg(
        "--low-balance-cents",
        type=int,
        metavar="N",
        help="wallet.low_balance fires when the available balance falls below N",
    ),
    ACTOR,
)
def org_create(ctx: Context, args: argparse.Namespace) -> Result:
    org = orgs.create(
        ctx.conn,
        args.org_id,
        currency=args.currency,
        twilio_subaccount_sid=args.twilio_subaccount,
        sender=args.sender,
        segment_price_cents=args.segment_price_cents,
        billing=args.billing,
        low_balance_cents=args.low_balance_cents,
    )
    _audit(
        ctx.conn, actor=args.actor, action="org.create", org_id=org.org_id,
        details={"currency": org.currency, "billing": args.billing,
                 "twilio_subaccount_sid": args.twilio_subaccount, "sender": args.sender,
                 "segment_price_cents": args.segment_price_cents,
                 "low_balance_cents": args.low_balance_cents},
    )  # fmt: skip
    return {**org.as_dict(), "wallet": wallet.show(ctx.conn, org.org_id).as_dict()}


@command("org show", "everything about one organization", ORG_ID)
def org_show(ctx: Context, args: argparse.Namespace) -> Result:
    return overview.organization(ctx.conn, args.org_id, _policy(ctx))


KEY_COLUMNS = ("key_id", "name", "scope", "org_id", "created_at", "revoked_at")


@command(
    "apikey create",
    "a key for /v1; its secret is printed once and stored only as a hash",
    arg("--name", required=True, metavar="NAME", help="what the key is for"),
    arg("--scope", choices=apikeys.SCOPES, default="read", help="read (default), send or admin"),
    arg("--org", dest="org_id", metavar="ORG_ID", help="confine the key to this organization"),
    ACTOR,
)
def apikey_create(ctx: Context, args: argparse.Namespace) -> Result:
    created = apikeys.create(
        ctx.conn, name=args.name, scope=args.scope, org_id=args.org_id, actor=args.actor
    )
    _audit(
        ctx.conn, actor=args.actor, action="apikey.create", org_id=args.org_id,
        details={"key_id": created.key.key_id, "name": args.name, "scope": args.scope},
    )  # fmt: skip
    return {**created.key.as_dict(), "secret": created.secret}


@command(
    "apikey list",
    "every API key (never a secret)",
    render=lambda r: output.render(r, {"keys": KEY_COLUMNS}),
)
def apikey_list(ctx: Context, args: argparse.Namespace) -> Result:
    return {"keys": [k.as_dict() for k in apikeys.list_keys(ctx.conn)]}


@command(
    "apikey revoke",
    "revoke a key: every web process refuses it within a second",
    arg("key_id", metavar="KEY_ID"),
    ACTOR,
)
def apikey_revoke(ctx: Context, args: argparse.Namespace) -> Result:
    key = apikeys.revoke(ctx.conn, args.key_id, actor=args.actor)
    _audit(
        ctx.conn, actor=args.actor, action="apikey.revoke", org_id=key.org_id,
        details={"key_id": key.key_id},
    )  # fmt: skip
    return key.as_dict()


@command("wallet show", "the wallet", ORG_ID)
def wallet_show(ctx: Context, args: argparse.Namespace) -> Result:
    return wallet.show(ctx.conn, args.org_id).as_dict()


HISTORY_COLUMNS = (
    "id", "created_at", "kind", "amount_cents", "balance_after_cents", "debt_after_cents",
    "reference", "actor", "reason",
)  # fmt: skip


@command(
    "wallet history",
    "journal entries, newest first",
    ORG_ID,
    arg("--limit", type=int, default=50, metavar="N", help="at most N entries (default 50)"),
    render=lambda result: output.render(result, {"entries": HISTORY_COLUMNS}),
)
def wallet_history(ctx: Context, args: argparse.Namespace) -> Result:
    entries = wallet.history(ctx.conn, args.org_id, args.limit)
    return {"org_id": args.org_id, "entries": [e.as_dict() for e in entries]}


@command(
    "wallet adjust",
    "a signed manual adjustment, journaled; refused if it would go below zero",
    ORG_ID,
    # A negative positional such as -500 parses as a value because no option of this
    # parser looks like a negative number; a test keeps it that way.
    arg("amount_cents", type=int, metavar="AMOUNT_CENTS", help="500 adds, -500 takes"),
    arg("--reason", required=True, metavar="TEXT", help="why, for the journal"),
    ACTOR,
    arg("--reference", metavar="REF", help="idempotency key: the same REF applies once"),
)
def wallet_adjust(ctx: Context, args: argparse.Namespace) -> Result:
    done = wallet_operations.adjust(
        ctx.conn, args.org_id, args.amount_cents, reason=args.reason, actor=args.actor,
        reference=args.reference, policy=_policy(ctx),
    )  # fmt: skip
    entry, state = done.entry, done.wallet
    return {
        "org_id": args.org_id,
        "entry_id": entry.id,
        "amount_cents": entry.amount_cents,
        "reference": entry.reference,
        "duplicate": entry.duplicate,
        "balance_cents": state.balance_cents,
        "available_cents": state.available_cents,
        "debt_cents": state.debt_cents,
    }


FREEZE_ARGS = (
    ORG_ID,
    arg("--reason", required=True, metavar="TEXT", help="the freeze reason to add or lift"),
    ACTOR,
)


def _freeze_result(args: argparse.Namespace, changed: bool, state: wallet.WalletState) -> Result:
    return {
        "org_id": args.org_id,
        "frozen": state.frozen,
        "freeze_reasons": list(state.freeze_reasons),
        "changed": changed,
    }


@command("wallet freeze", "add one freeze reason", *FREEZE_ARGS)
def wallet_freeze(ctx: Context, args: argparse.Namespace) -> Result:
    changed, state = wallet_operations.freeze(
        ctx.conn, args.org_id, args.reason, actor=args.actor, policy=_policy(ctx)
    )
    return _freeze_result(args, changed, state)


@command("wallet unfreeze", "lift one freeze reason (others stay)", *FREEZE_ARGS)
def wallet_unfreeze(ctx: Context, args: argparse.Namespace) -> Result:
    changed, state = wallet_operations.unfreeze(
        ctx.conn, args.org_id, args.reason, actor=args.actor, policy=_policy(ctx)
    )
    return _freeze_result(args, changed, state)


@command(
    "ledger verify",
    "every balance against its journal; exit 1 when any differs",
    arg("--org", dest="org_id", metavar="ORG_ID", help="only this organization"),
    arg(
        "--twilio",
        action="store_true",
        help="also the segments Twilio billed against those charged (twilio_mismatches)",
    ),
    exit_status=lambda result: EXIT_OK if result["ok"] else EXIT_REFUSED,
)
def ledger_verify(ctx: Context, args: argparse.Namespace) -> Result:
    count = wallet.count(ctx.conn, args.org_id)
    if args.org_id is not None:
        mismatches = wallet.verify(ctx.conn, args.org_id)
    else:
        # One consistent snapshot would hold a transaction open for the whole run; batches
        # of one statement each are consistent per wallet, which is what is compared.
        mismatches, done = [], 0
        ctx.progress_bar("verifying wallets", 0, count)
        for batch in wallet.org_id_batches(ctx.conn, 1000):
            mismatches += wallet.verify(ctx.conn, org_ids=batch)
            done += len(batch)
            ctx.progress_bar("verifying wallets", min(done, count), count)
    result: Result = {
        "ok": not mismatches,
        "wallets_checked": count,
        "mismatches": [m.as_dict() for m in mismatches],
    }
    if args.twilio:
        twilio_count, found = messages.segment_mismatches(ctx.conn)
        result["ok"] = result["ok"] and twilio_count == 0
        result["twilio_mismatches"] = twilio_count
        result["twilio_mismatched_messages"] = [t.as_dict() for t in found]
    return result


@command("status", "may this organization send, and why not", ORG_ID)
def status(ctx: Context, args: argparse.Namespace) -> Result:
    return sending.decide(ctx.conn, args.org_id, _policy(ctx)).as_dict()


CAMPAIGN_ARGS = (ORG_ID, arg("campaign_id", metavar="CAMPAIGN_ID"))
CAMPAIGN_CHANGE_ARGS = (*CAMPAIGN_ARGS, ACTOR)
CAMPAIGN_COLUMNS = ("campaign_id", "status", "paused_by", "pause_reason")


def _audit_campaign(
    ctx: Context, args: argparse.Namespace, action: str, c: campaigns.Campaign
) -> None:
    _audit(
        ctx.conn, actor=args.actor, action=action, org_id=args.org_id,
        details={"campaign_id": c.campaign_id, "status": c.status, "paused_by": c.paused_by},
    )  # fmt: skip


def _campaigns(ctx: Context, org_id: str, campaign: campaigns.Campaign | None = None) -> Result:
    result: Result = {
        "org_id": org_id,
        "campaigns": [c.as_dict() for c in campaigns.list_campaigns(ctx.conn, org_id)],
    }
    if campaign is not None:
        result.update(campaign.as_dict())
    return result


def _render_campaigns(result: Result) -> str:
    return output.render(result, {"campaigns": CAMPAIGN_COLUMNS})


@command(
    "campaign create",
    "a campaign, running unless the organization may not send",
    *CAMPAIGN_CHANGE_ARGS,
    render=_render_campaigns,
)
def campaign_create(ctx: Context, args: argparse.Namespace) -> Result:
    campaign = campaigns.create_campaign(ctx.conn, args.org_id, args.campaign_id, _policy(ctx))
    _audit_campaign(ctx, args, "campaign.create", campaign)
    return _campaigns(ctx, args.org_id, campaign)


@command(
    "campaign pause",
    "the user's own pause (stays until the user resumes)",
    *CAMPAIGN_CHANGE_ARGS,
    render=_render_campaigns,
)
def campaign_pause(ctx: Context, args: argparse.Namespace) -> Result:
    campaign = campaigns.pause_campaign(ctx.conn, args.org_id, args.campaign_id)
    _audit_campaign(ctx, args, "campaign.pause", campaign)
    return _campaigns(ctx, args.org_id, campaign)


@command(
    "campaign resume",
    "the user's resume; refused while the organization may not send",
    *CAMPAIGN_CHANGE_ARGS,
    render=_render_campaigns,
)
def campaign_resume(ctx: Context, args: argparse.Namespace) -> Result:
    campaign = campaigns.resume_campaign(ctx.conn, args.org_id, args.campaign_id, _policy(ctx))
    _audit_campaign(ctx, args, "campaign.resume", campaign)
    return _campaigns(ctx, args.org_id, campaign)


@command("campaign list", "the organization's campaigns", ORG_ID, render=_render_campaigns)
def campaign_list(ctx: Context, args: argparse.Namespace) -> Result:
    return _campaigns(ctx, args.org_id)


@command(
    "message send",
    "queue one SMS through the safe send path",
    ORG_ID,
    arg("--to", required=True, metavar="E164", help="the recipient, +15551234567"),
    arg("--body", required=True, metavar="TEXT"),
    arg("--campaign", dest="campaign_id", metavar="CAMPAIGN_ID"),
    ACTOR,
)
def message_send(ctx: Context, args: argparse.Namespace) -> Result:
    message = messages.queue(
        ctx.conn, args.org_id, args.to, args.body, _policy(ctx), args.campaign_id
    )
    # The body stays in messages; the trail says who queued which message, and its fate.
    _audit(
        ctx.conn, actor=args.actor, action="message.send", org_id=args.org_id,
        details={"message_id": message.message_id, "campaign_id": args.campaign_id,
                 "status": message.status},
    )  # fmt: skip
    if message.status == MessageStatus.QUEUED:  # a message refused at queue time has no send task
        _publish_after_commit(ctx, messages.SEND_TASK, [message.message_id], None)
    return message.as_dict()


@command("message show", "one message", arg("message_id", metavar="MESSAGE_ID"))
def message_show(ctx: Context, args: argparse.Namespace) -> Result:
    return messages.get(ctx.conn, args.message_id).as_dict()


EVENT_COLUMNS = ("id", "provider", "event_id", "event_type", "status", "attempts", "last_error")


@command(
    "events list",
    "the webhook inbox, newest first",
    arg("--status", choices=inbox.STATUSES),
    arg("--provider", choices=("paypal", "stripe")),
    arg("--limit", type=int, default=100, metavar="N"),
    render=lambda r: output.render(r, {"events": EVENT_COLUMNS}),
)
def events_list(ctx: Context, args: argparse.Namespace) -> Result:
    events = inbox.list_events(
        ctx.conn, status=args.status, provider=args.provider, limit=args.limit
    )
    return {"events": [e.as_dict() for e in events]}


EVENT_ID = arg("id", type=int, metavar="ID", help="the inbox id (see events list)")


@command("events show", "one inbox event", EVENT_ID)
def events_show(ctx: Context, args: argparse.Namespace) -> Result:
    return inbox.get(ctx.conn, args.id).as_dict()


@command(
    "events replay",
    "queue a parked or failed event again (or every one with --all STATUS)",
    arg("id", type=int, nargs="?", metavar="ID", help="the inbox id (see events list)"),
    arg(
        "--all",
        dest="all_status",
        choices=inbox.REPLAYABLE,
        metavar="STATUS",
        help="replay every event in this status (parked or failed)",
    ),
    arg("--provider", choices=("paypal", "stripe")),
    ACTOR,
)
def events_replay(ctx: Context, args: argparse.Namespace) -> Result:
    if (args.id is None) == (args.all_status is None):
        raise UsageError("give either an event ID or --all STATUS", "", "payguard events replay")
    if args.id is not None:
        event, outbox_id = inbox.replay(ctx.conn, args.id, actor=args.actor)
        _publish_after_commit(ctx, outbox.PROCESS_EVENT_TASK, [event.id], outbox_id)
        return event.as_dict()
    targets = inbox.list_events(
        ctx.conn, status=args.all_status, provider=args.provider, limit=100_000
    )
    replayed = []
    for n, target in enumerate(targets, 1):
        event, outbox_id = inbox.replay(ctx.conn, target.id, actor=args.actor)
        _publish_after_commit(ctx, outbox.PROCESS_EVENT_TASK, [event.id], outbox_id)
        replayed.append(event.id)
        ctx.progress_bar("replaying events", n, len(targets))
    return {"replayed": replayed, "count": len(replayed)}


DELIVERY_COLUMNS = ("id", "endpoint_id", "type", "sequence", "status", "attempts", "last_error")


@command(
    "events outbound",
    "deliveries of events to the host's endpoints, newest first",
    arg("--status", choices=outbound.DELIVERY_STATUSES),
    arg("--limit", type=int, default=100, metavar="N"),
    render=lambda r: output.render(r, {"deliveries": DELIVERY_COLUMNS}),
)
def events_outbound(ctx: Context, args: argparse.Namespace) -> Result:
    return {"deliveries": outbound.list_deliveries(ctx.conn, args.status, args.limit)}


@command(
    "events redeliver",
    "deliver an outbound event to its endpoint again, now",
    arg("id", type=int, metavar="ID", help="the delivery id (see events outbound)"),
    ACTOR,
)
def events_redeliver(ctx: Context, args: argparse.Namespace) -> Result:
    return outbound.redeliver(ctx.conn, args.id, args.actor)


def _outbound_policy(ctx: Context) -> outbound.OutboundPolicy:
    assert ctx.settings is not None
    return outbound.OutboundPolicy.from_settings(ctx.settings)


ENDPOINT_ID = arg("endpoint_id", metavar="ENDPOINT_ID")


@command(
    "endpoint create",
    "register a webhook endpoint of the host; its secret is printed once",
    arg("url", metavar="URL"),
    arg("--events", metavar="TYPE,TYPE", help="only these event types (default: all)"),
    arg("--org", metavar="ORG_ID", help="only this organization's events (default: all)"),
    ACTOR,
)
def endpoint_create(ctx: Context, args: argparse.Namespace) -> Result:
    events = [e.strip() for e in args.events.split(",") if e.strip()] if args.events else None
    endpoint, secret = outbound.create_endpoint(
        ctx.conn, args.url, events, args.org, args.actor, policy=_outbound_policy(ctx)
    )
    return {**endpoint.as_dict(), "secret": secret}


@command("endpoint list", "the webhook endpoints (never a secret)")
def endpoint_list(ctx: Context, args: argparse.Namespace) -> Result:
    return {"endpoints": [e.as_dict() for e in outbound.list_endpoints(ctx.conn)]}


@command("endpoint delete", "delete an endpoint: nothing more is sent to it", ENDPOINT_ID, ACTOR)
def endpoint_delete(ctx: Context, args: argparse.Namespace) -> Result:
    outbound.delete_endpoint(ctx.conn, args.endpoint_id, args.actor)
    return {"endpoint_id": args.endpoint_id, "deleted": True}


@command(
    "endpoint rotate-secret",
    "a new secret, printed once; the old one also signs for 24 hours",
    ENDPOINT_ID,
    ACTOR,
)
def endpoint_rotate_secret(ctx: Context, args: argparse.Namespace) -> Result:
    secret = outbound.rotate_secret(
        ctx.conn, args.endpoint_id, args.actor, policy=_outbound_policy(ctx)
    )
    return {"endpoint_id": args.endpoint_id, "secret": secret}


@command(
    "sample paypal",
    "sign a sample PayPal webhook with the dev stack's certificate and post it to web",
    ORG_ID,
    arg(
        "--event",
        default="capture",
        choices=("capture", "refund", "subscription-activated", "subscription-cancelled"),
    ),
    arg("--amount", default="10.00", help="decimal amount, e.g. 12.34"),
    arg("--currency", default="USD"),
    arg(
        "--capture-id", metavar="ID", help="the capture a refund refers to (or reuse for a capture)"
    ),
    arg("--subscription-id", metavar="ID"),
    arg(
        "--url",
        default=None,
        metavar="URL",
        help="the receiver (default http://127.0.0.1:$PORT/webhooks/paypal, PORT 5000)",
    ),
    needs="nothing",
    exit_status=lambda result: EXIT_OK if result["http_status"] == 200 else EXIT_REFUSED,
)
def sample_paypal(ctx: Context, args: argparse.Namespace) -> Result:
    import os

    devpaypal = _dev_harness("devpaypal")
    url = args.url or f"http://127.0.0.1:{os.environ.get('PORT', '5000')}/webhooks/paypal"
    try:
        event = devpaypal.sample_event(
            args.event,
            args.org_id,
            args.amount,
            args.currency,
            args.capture_id,
            args.subscription_id,
        )
    except (ValueError, ArithmeticError) as exc:
        raise InvalidInput(f"bad sample: {exc}") from None
    try:
        status, answer = devpaypal.post_sample(Path("var/dev/paypal"), url, event)
    except (OSError, FileNotFoundError) as exc:
        raise Refused(str(exc)) from None
    return {
        "http_status": status,
        "answer": answer,
        "event_id": event["id"],
        "event_type": event["event_type"],
        "resource_id": event["resource"]["id"],
    }


@command(
    "dev",
    "the whole stack on this machine (embedded PostgreSQL and Redis unless the URLs are set)",
    needs="nothing",
    exit_status=lambda result: result["exit_status"],
    render=lambda result: "",
)
def dev(ctx: Context, args: argparse.Namespace) -> Result:
    devstack = _dev_harness("devstack")
    status = devstack.run_dev(Path("Procfile"), Path("var/dev"))
    return {"exit_status": status if isinstance(status, int) else EXIT_OK}


def _checkouts() -> list[Path]:
    """Where a checkout of the repository may be: the one this cli package was installed from
    (an editable install) and the current directory."""
    return [Path(__file__).resolve().parents[1], Path.cwd()]


def _dev_harness(name: str) -> Any:
    """devtools.<name>: the dev harness, which only a checkout has (it is not in the wheel)."""
    import importlib

    for root in _checkouts():
        if (root / "devtools" / "__init__.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return importlib.import_module(f"devtools.{name}")
    raise Refused(
        "the dev harness (devtools/) is not installed with payguard: run this from a checkout "
        "of the Payguard repository (./scripts/run there starts `payguard dev`)"
    )


# ---------------------------------------------------------------- parsing


class UsageError(Exception):
    def __init__(self, message: str, usage: str, prog: str) -> None:
        super().__init__(message)
        self.usage = usage
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    # argparse would print and exit; raising lets main answer in JSON when asked to.
    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.format_usage(), self.prog)


def _add_json_flag(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's default must not overwrite a --json given before it.
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS,
        help="print one JSON object on stdout",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    root = _Parser(
        prog="payguard",
        description="Payguard operations: organizations, wallets, the ledger, the dev stack.",
        allow_abbrev=False,
    )
    _add_json_flag(root)
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {(): root}
    children: dict[tuple[str, ...], Any] = {}
    for words, cmd in COMMANDS.items():
        for depth in range(1, len(words) + 1):
            prefix = words[:depth]
            if prefix in parsers:
                continue
            parent = words[: depth - 1]
            if parent not in children:
                children[parent] = parsers[parent].add_subparsers(
                    title="commands", metavar="COMMAND", required=True
                )
            helptext = cmd.help if prefix == words else GROUPS.get(prefix[-1], "")
            parser = children[parent].add_parser(
                prefix[-1], help=helptext, description=helptext, allow_abbrev=False
            )
            _add_json_flag(parser)
            parsers[prefix] = parser
        for flags, kwargs in cmd.args:
            parsers[words].add_argument(*flags, **kwargs)
        parsers[words].set_defaults(command_=cmd)
    return root


def _wants_json(argv: Sequence[str]) -> bool:
    # Decided before parsing so that usage errors, too, can answer in JSON.
    for word in argv:
        if word == "--":
            return False
        if word == "--json":
            return True
    return False


# ---------------------------------------------------------------- running


def _execute(cmd: Command, args: argparse.Namespace) -> Result:
    interactive = sys.stderr.isatty()
    if cmd.needs == "nothing":
        return cmd.run(Context(None, interactive), args)
    if getattr(args, "actor", "") is None:  # a command that takes --actor, given none
        args.actor = os_user()
    settings = load_settings("DATABASE_URL")
    if cmd.needs == "settings":
        return cmd.run(Context(settings, interactive), args)
    assert settings.DATABASE_URL
    engine = _engine(settings)
    try:
        hooks: list[Callable[[], None]] = []

        def attempt(conn: Connection) -> Result:
            hooks.clear()  # a retried unit of work must not publish what the failed one queued
            return cmd.run(Context(settings, interactive, conn, hooks), args)

        result = run_in_transaction(engine, attempt)
        for hook in hooks:
            hook()
        return result
    finally:
        engine.dispose()


def _one_line(exc: DBAPIError) -> str:
    return " ".join(str(exc.orig).split())


def _fail(message: str, status: int, as_json: bool, prog: str = "payguard") -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    if as_json:
        output.emit_json({"error": message})
    return status


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = _wants_json(argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        sys.stderr.write(exc.usage)
        return _fail(str(exc), EXIT_USAGE, as_json, f"{exc.prog}: error")
    cmd: Command = args.command_
    try:
        result = _execute(cmd, args)
    except UsageError as exc:  # arguments that parse but do not fit together
        return _fail(str(exc), EXIT_USAGE, as_json, f"{exc.prog}: error")
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE, as_json)
    except PayguardError as exc:
        return _fail(str(exc), EXIT_REFUSED, as_json)
    except OperationalError as exc:
        return _fail(f"database unavailable: {_one_line(exc)}", EXIT_REFUSED, as_json)
    except DBAPIError as exc:
        return _fail(f"database error: {_one_line(exc)}", EXIT_REFUSED, as_json)
    except Exception as exc:
        if as_json:  # still one JSON object on stdout; the traceback goes to stderr only,
            # as the message may quote configuration (a URL with its password).
            output.emit_json({"error": f"internal error ({type(exc).__name__}), see stderr"})
        raise
    if as_json:
        output.emit_json(result)
    elif text_form := cmd.render(result):
        print(text_form)
    return cmd.exit_status(result)


if __name__ == "__main__":
    sys.exit(main())

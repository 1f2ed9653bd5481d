"""A Twilio gateway double for in-process tests of converge_one: it records each account
update it is asked for and answers with the outcomes it was given (then OK)."""

from __future__ import annotations

from core.providers.twilio.gateway import AccountOutcome, AccountResult


class RecordingGateway:
    """A gateway double for converge_one: records account updates, answers as told."""

    def __init__(self, *outcomes: AccountOutcome) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[str, str]] = []

    def set_account_status(self, sid: str, status: str) -> AccountResult:
        self.calls.append((sid, status))
        outcome = self.outcomes.pop(0) if self.outcomes else AccountOutcome.OK
        return AccountResult(outcome, status=status if outcome is AccountOutcome.OK else None)

"""The errors that `core` raises, so entrypoints can map them to answers without guessing."""


class PayguardError(Exception):
    """Base of every refusal Payguard makes on purpose."""


class InvalidInput(PayguardError):
    """Bad input: a negative amount, an over-long reference, a malformed id."""


class NotFound(PayguardError):
    """An organization, message, event or campaign that does not exist."""


class Refused(PayguardError):
    """A valid request that the rules of money refuse (short balance, frozen wallet)."""


class Conflict(PayguardError):
    """The same idempotency reference arrived with different content."""


class RetryableConflict(PayguardError):
    """A concurrent transaction won a race; running the unit of work again will settle it."""


class MalformedEvent(PayguardError):
    """A provider payload that does not have the shape its type promises."""


class ParkEvent(PayguardError):
    """An event that cannot be applied yet (unknown organization, currency mismatch)."""


class TransientError(PayguardError):
    """Something outside Payguard failed for now; the same call may succeed later."""


class NotYetApplicable(ParkEvent):
    """The event depends on something not seen yet (a refund before its capture):
    retry for a while, then park.

    `awaiting` names the payment it waits for (`<provider>:<payment id>`, see
    core.inbox.awaited_payment): crediting or recording that payment re-drives it."""

    def __init__(self, message: str, *, awaiting: str | None = None) -> None:
        super().__init__(message)
        self.awaiting = awaiting

"""Money as integers of minor units, parsed from provider strings with Decimal (never floats)."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

from core.errors import MalformedEvent

# ISO 4217 currencies whose minor unit is not 1/100.
_ZERO_DECIMAL = {
    "BIF",
    "CLP",
    "DJF",
    "GNF",
    "HUF",
    "ISK",
    "JPY",
    "KMF",
    "KRW",
    "PYG",
    "RWF",
    "TWD",
    "UGX",
    "VND",
    "VUV",
    "XAF",
    "XOF",
    "XPF",
}
_THREE_DECIMAL = {"BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"}


def normalize_currency(code: object) -> str:
    if not isinstance(code, str) or len(code.strip()) != 3 or not code.strip().isalpha():
        raise MalformedEvent(f"bad currency code: {code!r}")
    return code.strip().upper()


def minor_unit_exponent(currency: str) -> int:
    if currency in _ZERO_DECIMAL:
        return 0
    if currency in _THREE_DECIMAL:
        return 3
    return 2


def to_minor_units(value: object, currency: str) -> int:
    """'57.00' USD -> 5700; refuses floats, fractions of a minor unit and garbage."""
    if isinstance(value, (bool, float)):
        raise MalformedEvent(f"amount must be a decimal string, not {type(value).__name__}")
    try:
        amount = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        raise MalformedEvent(f"bad amount: {value!r}") from None
    if not amount.is_finite():
        raise MalformedEvent(f"bad amount: {value!r}")
    scaled = amount.scaleb(minor_unit_exponent(currency))
    if scaled != scaled.to_integral_value(rounding=ROUND_HALF_EVEN):
        raise MalformedEvent(f"amount {value!r} has more precision than {currency} allows")
    return int(scaled)


def from_minor_units(cents: int, currency: str) -> str:
    """5700 USD -> '57.00': the decimal string PayPal and others expect."""
    exponent = minor_unit_exponent(currency)
    return str(Decimal(cents).scaleb(-exponent).quantize(Decimal(1).scaleb(-exponent)))

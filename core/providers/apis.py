"""The providers' REST API clients a process can use, by provider name: those whose
credentials are set. Built once at process start (worker runtime, the API's registry)."""

from __future__ import annotations

from core.providers.paypal.api import PayPalApi, PayPalOrders
from core.providers.ports import SubscriptionApi, TopUpApi
from core.providers.stripe.api import StripeApi, StripeCheckout
from core.settings import Settings


def build_subscription_apis(settings: Settings) -> dict[str, SubscriptionApi]:
    """The providers that can be asked, by provider name: those with API credentials set."""
    apis: dict[str, SubscriptionApi] = {}
    if settings.PAYPAL_CLIENT_ID and settings.PAYPAL_CLIENT_SECRET:
        apis["paypal"] = PayPalApi(
            settings.PAYPAL_API_BASE, settings.PAYPAL_CLIENT_ID, settings.PAYPAL_CLIENT_SECRET
        )
    if settings.STRIPE_API_KEY:
        apis["stripe"] = StripeApi(settings.STRIPE_API_BASE, settings.STRIPE_API_KEY)
    return apis


def build_top_up_apis(settings: Settings) -> dict[str, TopUpApi]:
    """The providers a top-up can be made with, by name: those with API credentials set."""
    timeout = settings.TOP_UP_PROVIDER_TIMEOUT_SECONDS
    apis: dict[str, TopUpApi] = {}
    if settings.PAYPAL_CLIENT_ID and settings.PAYPAL_CLIENT_SECRET:
        apis["paypal"] = PayPalOrders(
            settings.PAYPAL_API_BASE,
            settings.PAYPAL_CLIENT_ID,
            settings.PAYPAL_CLIENT_SECRET,
            timeout=timeout,
        )
    if settings.STRIPE_API_KEY:
        apis["stripe"] = StripeCheckout(settings.STRIPE_API_BASE, settings.STRIPE_API_KEY, timeout)
    return apis

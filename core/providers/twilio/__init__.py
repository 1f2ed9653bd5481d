"""Twilio: the REST gateway (sending, subaccounts, status-callback signatures) and the
convergence of each subaccount to its desired status (accounts)."""

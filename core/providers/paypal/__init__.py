"""PayPal: webhook verification (verify), webhook payloads → neutral events (events), REST (api)."""

"""The dev harness: embedded PostgreSQL and Redis, the `payguard dev` stack and its PayPal
signing certificate. It lives in the checkout only (pyproject.toml's packages list leaves it
out), so it never ships in the wheel; `payguard dev` and `payguard sample` find it beside the
installed `cli` package, which is the case in a checkout's editable install."""

"""The host application's API, `/v1`: authenticate the key, validate the request, call one
use case in core (the same ones the `payguard` CLI calls), render the answer.

registry.py   how a route is declared, and what runs around each (keys, scopes, limits,
              body caps, validation, problem documents)
routes.py     the routes
schemas.py    the pydantic models that validate requests and describe answers
openapi.py    the OpenAPI 3.1 document, generated from the two above
access.py     the key cache and the per-key rate limit in Redis
problems.py   RFC 9457 problem documents
"""

# Importing the routes declares every endpoint in the registry: whoever imports anything of
# this package (the app, openapi.py, a test) sees them all, and registry.py need not import
# routes.py, which imports it.
from webhook_receiver.api import routes  # noqa: F401
from webhook_receiver.api.registry import install

__all__ = ["install"]

"""Per-process resources for worker and beat: settings, engine, gateway, built on first use.

Nothing is built at import; a forked Celery child drops what it inherited and builds its own.
"""

from __future__ import annotations

import threading
from typing import Any

from core.db import make_engine
from core.sending import Policy
from core.settings import Settings, load_settings_or_exit

_lock = threading.Lock()
_state: dict[str, Any] = {}


def settings() -> Settings:
    with _lock:
        if "settings" not in _state:
            _state["settings"] = load_settings_or_exit("DATABASE_URL", "REDIS_URL")
        return _state["settings"]


def engine():
    s = settings()
    with _lock:
        if "engine" not in _state:
            _state["engine"] = make_engine(
                s.DATABASE_URL or "",
                pool_size=4,
                max_overflow=4,
                prepare_threshold=s.DATABASE_PREPARE_THRESHOLD,
            )
        return _state["engine"]


def policy() -> Policy:
    return Policy.from_settings(settings())


def outbound_policy():
    from core.outbound import OutboundPolicy

    return OutboundPolicy.from_settings(settings())


def gateway():
    s = settings()
    with _lock:
        if "gateway" not in _state:
            from core.providers.twilio.gateway import build_gateway

            _state["gateway"] = build_gateway(s)
        return _state["gateway"]


def top_up_apis() -> dict:
    """The providers' top-up APIs (core/providers/apis.py), by provider name."""
    s = settings()
    with _lock:
        if "top_up_apis" not in _state:
            from core.providers.apis import build_top_up_apis

            _state["top_up_apis"] = build_top_up_apis(s)
        return _state["top_up_apis"]


def reset_after_fork() -> None:
    """A forked child must not share its parent's sockets."""
    with _lock:
        engine = _state.pop("engine", None)
        if engine is not None:
            engine.dispose(close=False)
        _state.pop("gateway", None)
        _state.pop("top_up_apis", None)

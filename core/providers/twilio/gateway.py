"""The Twilio adapter: the one module that imports `twilio`.

It turns every way a Twilio call can end into a small outcome the sending rules can act on
without knowing HTTP:

* sending a message is **not** idempotent, so the outcome says whether a retry could send
  the SMS twice. Only a refusal before anything reached Twilio (connection refused, connect
  timeout, 429) is RETRY_SAFE; a read timeout, a connection lost after the request went
  out, a 5xx or an unreadable answer is UNKNOWN, and the create must never be repeated;
* suspending or reactivating a subaccount is idempotent, so any transient failure is RETRY.

Requests for a subaccount use the parent account's credentials on
/2010-04-01/Accounts/{subaccount_sid}/..., the standard way. Nothing here is built at import.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlencode, urlsplit

import requests
import urllib3
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http import HttpClient
from twilio.http.response import Response
from twilio.request_validator import RequestValidator
from twilio.rest import Client
from urllib3.exceptions import ConnectTimeoutError

from core.providers.ports import SendOutcome, SendResult, decimal_or_none
from core.sms import count_segments, is_messaging_service_sid, validate_e164

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://api.twilio.com"
DEFAULT_TIMEOUT = (3.05, 15.0)  # (connect, read) seconds
RATE_LIMIT_CODE = 20429
ACCOUNT_STATUSES = frozenset({"suspended", "active"})

_ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")


# --- outcomes -------------------------------------------------------------------------------


class AccountOutcome(StrEnum):
    OK = "ok"
    RETRY = "retry"  # 429, 5xx or a transport error: the update is idempotent, try again
    FAILED = "failed"  # Twilio refused it (4xx): retrying will not help


@dataclass(frozen=True)
class AccountResult:
    outcome: AccountOutcome
    status: str | None = None
    http_status: int | None = None
    error_code: int | None = None
    error_message: str | None = None


class SmsGateway(Protocol):
    def send_message(
        self,
        subaccount_sid: str,
        sender: str,
        to: str,
        body: str,
        status_callback: str | None = None,
    ) -> SendResult: ...

    def set_account_status(self, subaccount_sid: str, status: str) -> AccountResult: ...


# --- transport ------------------------------------------------------------------------------


class TransportError(Exception):
    """The HTTP exchange ended without an answer from Twilio."""


class NotSentError(TransportError):
    """The connection was never established, so the request never left this process."""


class MaybeSentError(TransportError):
    """The request may have reached Twilio (read timeout, connection lost mid-exchange)."""


def _never_sent(exc: Exception) -> bool:
    """True only when the failure happened while connecting, before any byte of the request.

    With retries off, urllib3 raises a connection-phase failure as ConnectTimeoutError
    (NewConnectionError and NameResolutionError are subclasses), and everything after the
    connection was made as something else (ReadTimeoutError, ProtocolError, SSLError, ...),
    which is treated as possibly sent; so is a failure to reach a proxy (ProxyError), as
    requests counted it.
    """
    return isinstance(exc, ConnectTimeoutError)


# twilio ships no type information: its HttpClient is Any to mypy.
class PooledHttpClient(HttpClient):  # type: ignore[misc]
    """A twilio HttpClient on one pool of kept-alive urllib3 connections, with a (connect,
    read) timeout and no retries.

    It raises NotSentError / MaybeSentError instead of urllib3's exceptions, and when
    `base_url` is given it sends every Twilio domain (api, messaging, ...) there, keeping the
    path: that is how tests and local stacks point the library at a fake. It is urllib3 and
    not a requests Session because requests' preparation of each request (merging session
    settings, cookies, hooks, protocol checks on every argument) cost as much CPU as the
    exchange itself: about half of a batch send's CPU in the worker.
    """

    def __init__(
        self,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        base_url: str | None = None,
        pool_maxsize: int = 32,
    ):
        super().__init__(logger=logging.getLogger("twilio.http_client"), is_async=False)
        connect, read = timeout
        if connect <= 0 or read <= 0:
            raise ValueError(f"timeouts must be positive: {timeout!r}")
        self.timeouts = (float(connect), float(read))
        self._timeout = urllib3.Timeout(connect=float(connect), read=float(read))
        self.base_url = base_url.rstrip("/") if base_url else None
        # The environment's proxy and CA bundle are read once, here, as requests read them
        # (HTTPS_PROXY, NO_PROXY, ...; REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, else certifi's).
        target = self.base_url or DEFAULT_API_BASE
        proxies = requests.utils.get_environ_proxies(target)
        proxy = requests.utils.select_proxy(target, proxies)
        ca_bundle = (
            os.environ.get("REQUESTS_CA_BUNDLE")
            or os.environ.get("CURL_CA_BUNDLE")
            or requests.certs.where()
        )
        pools: dict[str, Any] = {
            "num_pools": 4,
            "maxsize": pool_maxsize,
            "cert_reqs": "CERT_REQUIRED",
            "ca_certs": ca_bundle,
        }
        self.pool: urllib3.PoolManager = (
            urllib3.ProxyManager(proxy, **pools) if proxy else urllib3.PoolManager(**pools)
        )
        self._authorization: dict[tuple[str, str], str] = {}

    def request(
        self,
        method: str,
        uri: str,
        params: dict[str, Any] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # the library's single number; ours is the tuple
        allow_redirects: bool = False,
    ) -> Response:
        url = self._rebase(uri)
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params, doseq=True)
        headers = dict(headers or {})
        body: bytes | None = None
        if data:
            if headers.get("Content-Type") in ("application/json", "application/scim+json"):
                body = json.dumps(data).encode()
            else:
                body = urlencode(data, doseq=True).encode()
        if auth:
            headers["Authorization"] = self._basic(auth)
        try:
            resp = self.pool.urlopen(
                method.upper(),
                url,
                body=body,
                headers=headers,
                timeout=self._timeout,
                retries=False,  # whether a retry is safe is decided above, per operation
                redirect=allow_redirects,
            )
        except urllib3.exceptions.HTTPError as exc:
            if _never_sent(exc):
                raise NotSentError(f"{method} {url}: {exc}") from exc
            raise MaybeSentError(f"{method} {url}: {exc}") from exc
        self.logger.debug("%s %s -> %s", method, url, resp.status)
        return Response(resp.status, resp.data.decode("utf-8", errors="replace"), resp.headers)

    def _basic(self, auth: tuple[str, str]) -> str:
        value = self._authorization.get(auth)
        if value is None:
            value = urllib3.make_headers(basic_auth=":".join(auth))["authorization"]
            self._authorization[auth] = value
        return value

    def _rebase(self, uri: str) -> str:
        if self.base_url is None:
            return uri
        parts = urlsplit(uri)
        return self.base_url + parts.path + (f"?{parts.query}" if parts.query else "")

    def close(self) -> None:
        self.pool.clear()


# --- the gateways ---------------------------------------------------------------------------


def _check_account_sid(sid: str) -> str:
    # The SID becomes part of the URL path: anything but AC + 32 hex is a caller bug.
    if not isinstance(sid, str) or not _ACCOUNT_SID.fullmatch(sid):
        raise ValueError(f"not a Twilio account SID: {sid!r}")
    return sid


def _check_account_status(status: str) -> str:
    if status == "closed":
        raise ValueError("Payguard never closes a subaccount: closing is irreversible")
    if status not in ACCOUNT_STATUSES:
        raise ValueError(f"account status must be 'suspended' or 'active', not {status!r}")
    return status


def _message_params(sender: str, to: str, body: str, status_callback: str | None) -> dict[str, str]:
    """The create() keyword arguments; ValueError for anything Twilio would refuse anyway."""
    if not body:
        raise ValueError("empty message body")
    params = {"to": validate_e164(to), "body": body}
    if is_messaging_service_sid(sender):
        params["messaging_service_sid"] = sender
    else:
        params["from_"] = validate_e164(sender)
    if status_callback:
        params["status_callback"] = status_callback
    return params


def _error_fields(exc: TwilioRestException | TwilioServiceException) -> dict[str, Any]:
    message = exc.msg if isinstance(exc, TwilioRestException) else (exc.detail or exc.title)
    code = exc.code if isinstance(exc.code, int) else None
    return {"http_status": int(exc.status), "error_code": code, "error_message": str(message)}


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


class TwilioGateway:
    """Sends through Twilio's REST API with the parent account's credentials."""

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        api_base: str = DEFAULT_API_BASE,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        pool_maxsize: int = 32,
    ):
        base = api_base.rstrip("/")
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"TWILIO_API_BASE must be an http(s) URL, not {api_base!r}")
        # Against real Twilio each domain keeps its own host; any other base (a fake, a
        # proxy) receives every domain's requests.
        rebase = None if base == DEFAULT_API_BASE else base
        self.http_client = PooledHttpClient(
            timeout=timeout, base_url=rebase, pool_maxsize=pool_maxsize
        )
        # A non-empty environment keeps the library from reading TWILIO_EDGE / TWILIO_REGION
        # (or anything else) from os.environ: settings are read once, by core.settings.
        self.client = Client(
            account_sid,
            auth_token,
            http_client=self.http_client,
            environment={"TWILIO_EDGE": "", "TWILIO_REGION": ""},
        )
        self.client.api.base_url = base

    def send_message(
        self,
        subaccount_sid: str,
        sender: str,
        to: str,
        body: str,
        status_callback: str | None = None,
    ) -> SendResult:
        """Create one message. ValueError for malformed arguments (nothing is sent)."""
        params = _message_params(sender, to, body, status_callback)
        account = self.client.api.v2010.accounts(_check_account_sid(subaccount_sid))
        try:
            message = account.messages.create(**params)
        except NotSentError as exc:
            log.warning("twilio send not attempted, safe to retry: %s", exc)
            return SendResult(SendOutcome.RETRY_SAFE, error_message=str(exc))
        except MaybeSentError as exc:
            log.error("twilio send outcome unknown: %s", exc)
            return SendResult(SendOutcome.UNKNOWN, error_message=str(exc))
        except (TwilioRestException, TwilioServiceException) as exc:
            return self._send_refused(exc)
        except Exception as exc:  # e.g. an unreadable 201: the message may well exist
            log.exception("twilio send outcome unknown")
            return SendResult(SendOutcome.UNKNOWN, error_message=repr(exc))
        return SendResult(
            SendOutcome.ACCEPTED,
            sid=message.sid,
            status=str(message.status) if message.status is not None else None,
            price=decimal_or_none(message.price),
            price_unit=message.price_unit,
            num_segments=_int(message.num_segments),
        )

    @staticmethod
    def _send_refused(exc: TwilioRestException | TwilioServiceException) -> SendResult:
        fields = _error_fields(exc)
        status = fields["http_status"]
        if status == 429 or (400 <= status < 500 and fields["error_code"] == RATE_LIMIT_CODE):
            outcome = SendOutcome.RETRY_SAFE
        elif 400 <= status < 500:
            outcome = SendOutcome.REJECTED
        else:  # 5xx (or an unexpected 3xx): Twilio may have created the message
            outcome = SendOutcome.UNKNOWN
        log.warning("twilio send %s: HTTP %s code %s", outcome, status, fields["error_code"])
        return SendResult(outcome, **fields)

    def set_account_status(self, subaccount_sid: str, status: str) -> AccountResult:
        """Suspend or reactivate a subaccount; ValueError for "closed" or anything else."""
        account = self.client.api.v2010.accounts(_check_account_sid(subaccount_sid))
        _check_account_status(status)
        try:
            updated = account.update(status=status)
        except TransportError as exc:
            return AccountResult(AccountOutcome.RETRY, error_message=str(exc))
        except (TwilioRestException, TwilioServiceException) as exc:
            fields = _error_fields(exc)
            code, http = fields["error_code"], fields["http_status"]
            retry = http == 429 or code == RATE_LIMIT_CODE or http >= 500
            outcome = AccountOutcome.RETRY if retry else AccountOutcome.FAILED
            log.warning("twilio account update %s: HTTP %s code %s", outcome, http, code)
            return AccountResult(outcome, **fields)
        except Exception as exc:  # an unreadable answer; the update is idempotent
            log.exception("twilio account update failed")
            return AccountResult(AccountOutcome.RETRY, error_message=repr(exc))
        got = str(updated.status) if updated.status is not None else None
        if got != status:
            return AccountResult(
                AccountOutcome.FAILED, status=got, error_message=f"Twilio answered status {got!r}"
            )
        return AccountResult(AccountOutcome.OK, status=got)

    def subaccount_auth_token(self, subaccount_sid: str) -> str | None:
        """The subaccount's own auth token (the parent may read it); None if Twilio will not
        say. Twilio may sign a subaccount's callbacks with it rather than the parent's."""
        try:
            account = self.client.api.v2010.accounts(_check_account_sid(subaccount_sid)).fetch()
        except Exception as exc:
            log.warning("twilio subaccount token unavailable: %s", exc)
            return None
        return str(account.auth_token) if account.auth_token else None

    def close(self) -> None:
        self.http_client.close()


class ConsoleGateway:
    """The dev-stack backend when TWILIO_ACCOUNT_SID is unset: it logs and pretends."""

    def send_message(
        self,
        subaccount_sid: str,
        sender: str,
        to: str,
        body: str,
        status_callback: str | None = None,
    ) -> SendResult:
        _check_account_sid(subaccount_sid)
        params = _message_params(sender, to, body, status_callback)
        segments, encoding = count_segments(body)
        sid = "SMconsole" + secrets.token_hex(13)[:25]  # 34 characters, like a real SID
        log.info(
            "console sms %s: account=%s sender=%s to=%s segments=%d (%s) body=%r",
            sid,
            subaccount_sid,
            sender,
            params["to"],
            segments,
            encoding,
            body,
        )
        return SendResult(SendOutcome.ACCEPTED, sid=sid, status="queued", num_segments=segments)

    def set_account_status(self, subaccount_sid: str, status: str) -> AccountResult:
        _check_account_sid(subaccount_sid)
        _check_account_status(status)
        log.info("console twilio: account %s -> %s", subaccount_sid, status)
        return AccountResult(AccountOutcome.OK, status=status)

    def subaccount_auth_token(self, subaccount_sid: str) -> str | None:
        return None

    def close(self) -> None:
        pass


def build_gateway(
    settings: Settings, timeout: tuple[float, float] = DEFAULT_TIMEOUT, pool_maxsize: int = 32
) -> TwilioGateway | ConsoleGateway:
    """The real gateway when Twilio is configured, else the console one."""
    if not settings.twilio_configured:
        return ConsoleGateway()
    if not settings.TWILIO_AUTH_TOKEN or not settings.TWILIO_ACCOUNT_SID:
        raise ValueError("TWILIO_AUTH_TOKEN is required when TWILIO_ACCOUNT_SID is set")
    return TwilioGateway(
        settings.TWILIO_ACCOUNT_SID,
        settings.TWILIO_AUTH_TOKEN,
        api_base=settings.TWILIO_API_BASE,
        timeout=timeout,
        pool_maxsize=pool_maxsize,
    )


def validate_status_callback(
    auth_token: str, url: str, params: Mapping[str, Any], signature: str | None
) -> bool:
    """Check X-Twilio-Signature for a status callback posted to `url` with form `params`.

    `url` must be the public URL Twilio called (PUBLIC_BASE_URL + path), not what a proxy
    forwarded. `params` may be a plain dict or Flask's request.form.
    """
    if not auth_token or not signature:
        return False
    return bool(RequestValidator(auth_token).validate(url, params, signature))

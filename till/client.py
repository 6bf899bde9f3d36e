"""The SDK clients: ``TillClient`` and ``AsyncTillClient`` over Till's admin API.

Every decision lives in ``_BaseClient``, which does no I/O: reading the configuration, building
requests, deciding whether to retry and how long to wait, turning responses into models or
errors. The two clients only send requests and sleep, and mirror each other name for name.

Errors are data. Every failure is a ``TillError`` with a stable machine ``code``, the HTTP
``status_code``, a human message (``str(e)``), the server's ``request_id`` when it sent one, and
any extra fields of the error body (``limit``, ``used``, ``remaining``, all in ``details``).
One subclass per kind of failure; ``status_code`` is ``0`` when no HTTP response was received
(connection failure, timeout, or a client that could not be configured), so it is always an int.
Codes made by the SDK itself: ``connection_error``, ``timeout``, ``invalid_response``,
``missing_admin_key``, ``invalid_base_url``; ``unknown`` when an error response had no code.

Retries (``max_retries``, default 2, so at most 3 attempts). Reads and revocations (GET,
DELETE: idempotent) are retried on connection failures, timeouts, 429 and 5xx, with exponential
backoff (0.5 s, 1 s, 2 s, ... capped at 8 s, minus up to 25 % jitter) or exactly the delay a
``Retry-After`` header asks for; a ``Retry-After`` over 60 s ends the retries. ``create_key``
(POST) is retried only when the request provably never left the machine: the connection could
not be opened (``ConnectError``, ``ConnectTimeout``) or no pooled connection came free
(``PoolTimeout``). Any later failure may have created the key, and a second key would count
against the plan, so it is reported rather than repeated.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata as _metadata
from types import TracebackType
from typing import Any, Final, Generic, TypeVar
from urllib.parse import quote

import httpx

from till.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    LimitError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TillError,
    ValidationError,
    error_class,
)
from till.models import AccountSummary, ScopedKey, ScopedKeyCreate

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AsyncTillClient",
    "AuthenticationError",
    "LimitError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "TillClient",
    "TillError",
    "ValidationError",
]

DEFAULT_BASE_URL: Final = "https://api.till.ac"
DEFAULT_TIMEOUT: Final = 30.0
DEFAULT_MAX_RETRIES: Final = 2
INITIAL_RETRY_DELAY: Final = 0.5
MAX_RETRY_DELAY: Final = 8.0
MAX_RETRY_AFTER: Final = 60.0
REQUEST_ID_HEADER: Final = "x-till-request-id"
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# Raised before a single byte of the request was written: safe to repeat any request.
NOT_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

try:
    _VERSION = _metadata.version("till-ac")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    _VERSION = "0+unknown"


def _api_error(response: httpx.Response, payload: Any) -> TillError:
    """The error an HTTP error response stands for."""
    status = response.status_code
    body = payload.get("error") if isinstance(payload, dict) else None
    code, message, details = "unknown", f"HTTP {status} from {response.request.url}", {}
    if isinstance(body, dict):
        code = body["code"] if isinstance(body.get("code"), str) else code
        message = body["message"] if isinstance(body.get("message"), str) else message
        details = {k: v for k, v in body.items() if k not in ("code", "message")}
    return error_class(status, code)(
        status,
        code,
        message,
        request_id=response.headers.get(REQUEST_ID_HEADER),
        details=details,
    )


def _transport_error(exc: httpx.HTTPError, url: httpx.URL) -> APIConnectionError:
    """The one place httpx's exceptions become Till's (callers raise it ``from None``)."""
    origin = f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(0, "timeout", f"Till at {origin} did not answer in time: {reason}")
    return APIConnectionError(0, "connection_error", f"Could not reach Till at {origin}: {reason}")


# --- calls: what to send and how to read the answer, without I/O ---

T = TypeVar("T")


class _Malformed(Exception):
    """A 2xx answer without the expected envelope: not a Till server, or a broken one."""


@dataclass(frozen=True, slots=True)
class _Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[Mapping[str, Any]], T]
    body: Mapping[str, Any] | None = None

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT_METHODS


def _envelope(payload: Mapping[str, Any], name: str) -> Any:
    value = payload.get(name)
    if value is None:
        raise _Malformed(name)
    return value


def _parse_key(payload: Mapping[str, Any]) -> ScopedKey:
    key = _envelope(payload, "key")
    if not isinstance(key, Mapping):
        raise _Malformed("key")
    return ScopedKey.from_dict(key)


def _parse_keys(payload: Mapping[str, Any]) -> list[ScopedKey]:
    keys = _envelope(payload, "keys")
    if not isinstance(keys, list):
        raise _Malformed("keys")
    return [ScopedKey.from_dict(k) for k in keys if isinstance(k, Mapping)]


def _parse_account(payload: Mapping[str, Any]) -> AccountSummary:
    account = _envelope(payload, "account")
    if not isinstance(account, Mapping):
        raise _Malformed("account")
    return AccountSummary.from_dict(account)


def _key_path(key_id: str) -> str:
    # Quoted whole: an id such as "../account" must stay one path segment.
    return f"/admin/keys/{quote(key_id, safe='')}"


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _backoff(attempt: int) -> float:
    delay = min(MAX_RETRY_DELAY, INITIAL_RETRY_DELAY * 2.0**attempt)
    return delay * (1 - 0.25 * random.random())


class _BaseClient:
    """Configuration, requests, retry decisions and responses: all of it, none of the I/O."""

    def __init__(
        self,
        admin_key: str | None,
        base_url: str | None,
        timeout: float | None,
        max_retries: int,
    ) -> None:
        key = (admin_key or os.environ.get("TILL_ADMIN_KEY") or "").strip()
        if not key:
            raise TillError(
                0,
                "missing_admin_key",
                "No admin key: pass admin_key=... or set the TILL_ADMIN_KEY environment variable.",
            )
        url = (base_url or os.environ.get("TILL_URL") or DEFAULT_BASE_URL).strip().rstrip("/")
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            parsed = httpx.URL()
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise TillError(
                0, "invalid_base_url", f"base_url must be an http(s) URL such as {DEFAULT_BASE_URL}"
            )
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        self._admin_key = key
        self.base_url = url
        self.timeout = timeout
        self.max_retries = max_retries

    # What each method sends.

    def _account(self) -> _Call[AccountSummary]:
        return _Call("GET", "/admin/account", _parse_account)

    def _create_key(self, params: ScopedKeyCreate) -> _Call[ScopedKey]:
        return _Call("POST", "/admin/keys", _parse_key, params.to_dict())

    def _list_keys(self) -> _Call[list[ScopedKey]]:
        return _Call("GET", "/admin/keys", _parse_keys)

    def _get_key(self, key_id: str) -> _Call[ScopedKey]:
        return _Call("GET", _key_path(key_id), _parse_key)

    def _revoke_key(self, key_id: str) -> _Call[ScopedKey]:
        return _Call("DELETE", _key_path(key_id), _parse_key)

    # How it travels and what comes back.

    def _build_request(self, call: _Call[Any]) -> httpx.Request:
        # The timeout rides on the request, so an injected http_client gets ours too.
        return httpx.Request(
            call.method,
            self.base_url + call.path,
            headers={
                "authorization": f"Bearer {self._admin_key}",
                "accept": "application/json",
                "user-agent": f"till-python/{_VERSION}",
            },
            json=call.body,
            extensions={"timeout": httpx.Timeout(self.timeout).as_dict()},
        )

    def _retry_delay(
        self,
        call: _Call[Any],
        attempt: int,
        *,
        response: httpx.Response | None = None,
        error: httpx.HTTPError | None = None,
    ) -> float | None:
        """Seconds to wait before trying ``call`` again after ``attempt`` (0-based), or None."""
        if attempt >= self.max_retries:
            return None
        if error is not None:
            if isinstance(error, NOT_SENT):
                return _backoff(attempt)
            retriable = isinstance(error, httpx.TransportError)
            return _backoff(attempt) if retriable and call.idempotent else None
        if response is None or not call.idempotent:
            return None
        if response.status_code != 429 and response.status_code < 500:
            return None
        asked = _retry_after(response.headers)
        if asked is None:
            return _backoff(attempt)
        return asked if asked <= MAX_RETRY_AFTER else None

    def _process(self, call: _Call[T], response: httpx.Response) -> T:
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if not response.is_success:
            raise _api_error(response, payload)
        try:
            if not isinstance(payload, Mapping):
                raise _Malformed("body")
            return call.parse(payload)
        except _Malformed as exc:
            raise TillError(
                response.status_code,
                "invalid_response",
                f"{response.request.url} did not answer like Till (no {exc}); check base_url.",
                request_id=response.headers.get(REQUEST_ID_HEADER),
            ) from None


def _create_params(
    provider: str, upstream_key: str, max_activations: int, **options: Any
) -> ScopedKeyCreate:
    return ScopedKeyCreate(
        provider=provider, upstream_key=upstream_key, max_activations=max_activations, **options
    )


# --- the clients: I/O only ---


class TillClient(_BaseClient):
    """Manage scoped keys. ``admin_key`` defaults to ``TILL_ADMIN_KEY``, ``base_url`` to
    ``TILL_URL`` and then https://api.till.ac. An ``http_client`` you pass stays yours to close.
    """

    def __init__(
        self,
        admin_key: str | None = None,
        base_url: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(admin_key, base_url, timeout, max_retries)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client()

    def account(self) -> AccountSummary:
        """The account: live keys, activations this month, the tenant and its plan."""
        return self._request(self._account())

    def create_key(
        self,
        provider: str,
        upstream_key: str,
        max_activations: int,
        *,
        name: str | None = None,
        ip_whitelist: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        max_spend_cents: int | None = None,
        expires_at: datetime | str | None = None,
        ttl_seconds: int | None = None,
        allowed_models: list[str] | None = None,
        rpm: int | None = None,
        max_concurrent: int | None = None,
    ) -> ScopedKey:
        """Create a scoped key; its token is ``.scoped_key``, shown this once. Not retried.

        ``expires_at`` (a timezone-aware datetime or RFC 3339 string) or ``ttl_seconds`` ends
        the key at a time; ``allowed_models`` takes exact names and ``prefix*`` patterns;
        ``rpm`` (requests per minute) and ``max_concurrent`` (requests in flight) are answered
        with 429 and ``Retry-After`` past them.
        """
        params = _create_params(
            provider, upstream_key, max_activations, name=name, ip_whitelist=ip_whitelist,
            metadata=metadata, max_tokens=max_tokens, max_spend_cents=max_spend_cents,
            expires_at=expires_at, ttl_seconds=ttl_seconds, allowed_models=allowed_models,
            rpm=rpm, max_concurrent=max_concurrent,
        )  # fmt: skip
        return self._request(self._create_key(params))

    def list_keys(self) -> list[ScopedKey]:
        """Every key of the account, live and revoked."""
        return self._request(self._list_keys())

    def get_key(self, key_id: str) -> ScopedKey:
        """One key by id; ``NotFoundError`` if the account has no such key."""
        return self._request(self._get_key(key_id))

    def revoke_key(self, key_id: str) -> ScopedKey:
        """Revoke a key at once; it answers 401 from then on. Returns the revoked key."""
        return self._request(self._revoke_key(key_id))

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> TillClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _request(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            request = self._build_request(call)
            try:
                response = self._http.send(request)
            except httpx.HTTPError as exc:
                delay = self._retry_delay(call, attempt, error=exc)
                if delay is None:
                    raise _transport_error(exc, request.url) from None
            else:
                delay = self._retry_delay(call, attempt, response=response)
                if delay is None:
                    return self._process(call, response)
                response.close()
            time.sleep(delay)
            attempt += 1


class AsyncTillClient(_BaseClient):
    """``TillClient`` for asyncio: the same methods, awaited. Use ``async with`` or ``close()``."""

    def __init__(
        self,
        admin_key: str | None = None,
        base_url: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(admin_key, base_url, timeout, max_retries)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient()

    async def account(self) -> AccountSummary:
        """The account: live keys, activations this month, the tenant and its plan."""
        return await self._request(self._account())

    async def create_key(
        self,
        provider: str,
        upstream_key: str,
        max_activations: int,
        *,
        name: str | None = None,
        ip_whitelist: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        max_spend_cents: int | None = None,
        expires_at: datetime | str | None = None,
        ttl_seconds: int | None = None,
        allowed_models: list[str] | None = None,
        rpm: int | None = None,
        max_concurrent: int | None = None,
    ) -> ScopedKey:
        """Create a scoped key; its token is ``.scoped_key``, shown this once. Not retried.

        ``expires_at`` (a timezone-aware datetime or RFC 3339 string) or ``ttl_seconds`` ends
        the key at a time; ``allowed_models`` takes exact names and ``prefix*`` patterns;
        ``rpm`` (requests per minute) and ``max_concurrent`` (requests in flight) are answered
        with 429 and ``Retry-After`` past them.
        """
        params = _create_params(
            provider, upstream_key, max_activations, name=name, ip_whitelist=ip_whitelist,
            metadata=metadata, max_tokens=max_tokens, max_spend_cents=max_spend_cents,
            expires_at=expires_at, ttl_seconds=ttl_seconds, allowed_models=allowed_models,
            rpm=rpm, max_concurrent=max_concurrent,
        )  # fmt: skip
        return await self._request(self._create_key(params))

    async def list_keys(self) -> list[ScopedKey]:
        """Every key of the account, live and revoked."""
        return await self._request(self._list_keys())

    async def get_key(self, key_id: str) -> ScopedKey:
        """One key by id; ``NotFoundError`` if the account has no such key."""
        return await self._request(self._get_key(key_id))

    async def revoke_key(self, key_id: str) -> ScopedKey:
        """Revoke a key at once; it answers 401 from then on. Returns the revoked key."""
        return await self._request(self._revoke_key(key_id))

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncTillClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _request(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            request = self._build_request(call)
            try:
                response = await self._http.send(request)
            except httpx.HTTPError as exc:
                delay = self._retry_delay(call, attempt, error=exc)
                if delay is None:
                    raise _transport_error(exc, request.url) from None
            else:
                delay = self._retry_delay(call, attempt, response=response)
                if delay is None:
                    return self._process(call, response)
                await response.aclose()
            await asyncio.sleep(delay)
            attempt += 1

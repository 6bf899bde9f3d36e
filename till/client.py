"""The SDK clients: ``TillClient`` and ``AsyncTillClient`` over Till's admin API (with an
admin key), ``KeyClient`` and ``AsyncKeyClient`` over a scoped key's own endpoints (with the
scoped key itself: its view, its revocation, its child keys).

Every decision lives in ``_BaseClient``, which does no I/O: reading the configuration, building
requests, deciding whether to retry and how long to wait, turning responses into models or
errors. ``_AdminCalls`` and ``_KeyCalls`` say what each method sends, still without I/O; the
sync and async clients only send requests and sleep, and mirror each other name for name.

Errors are data. Every failure is a ``TillError`` with a stable machine ``code``, the HTTP
``status_code``, a human message (``str(e)``), the server's ``request_id`` when it sent one, and
any extra fields of the error body (``limit``, ``used``, ``remaining``, all in ``details``).
One subclass per kind of failure; ``status_code`` is ``0`` when no HTTP response was received
(connection failure, timeout, or a client that could not be configured), so it is always an int.
Codes made by the SDK itself: ``connection_error``, ``timeout``, ``invalid_response``,
``missing_admin_key``, ``missing_scoped_key``, ``invalid_base_url``; ``unknown`` when an error
response had no code.

Retries (``max_retries``, default 2, so at most 3 attempts). Reads and revocations (GET,
DELETE: idempotent) are retried on connection failures, timeouts, 429 and 5xx, with exponential
backoff (0.5 s, 1 s, 2 s, ... capped at 8 s, minus up to 25 % jitter) or exactly the delay a
``Retry-After`` header asks for; a ``Retry-After`` over 60 s ends the retries. ``create_key``,
``create_child`` (POST), ``update_key`` and ``top_up`` (PATCH) are retried only when the
request provably never left the machine: the connection could not be opened (``ConnectError``,
``ConnectTimeout``) or no pooled connection came free (``PoolTimeout``). Any later failure may
have created the key (a second one would count against the plan) or applied the top-up (a
second one would add twice), so it is reported rather than repeated.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata as _metadata
from types import TracebackType
from typing import Any, ClassVar, Final, Generic, Self, TypeVar
from urllib.parse import quote

import httpx

from till.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    ConflictError,
    LimitError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TillError,
    ValidationError,
    error_class,
)
from till.models import (
    AccountSummary,
    ChildKeyCreate,
    ScopedKey,
    ScopedKeyCreate,
    ScopedKeyUpdate,
)

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AsyncKeyClient",
    "AsyncTillClient",
    "AuthenticationError",
    "ConflictError",
    "KeyClient",
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


@dataclass(frozen=True, slots=True)
class _Credential:
    """The secret a client authenticates with: its argument, its variable, its missing code."""

    argument: str
    env: str
    missing_code: str
    label: str


_ADMIN_KEY: Final = _Credential("admin_key", "TILL_ADMIN_KEY", "missing_admin_key", "admin key")
_SCOPED_KEY: Final = _Credential(
    "scoped_key", "TILL_SCOPED_KEY", "missing_scoped_key", "scoped key"
)


class _BaseClient:
    """Configuration, requests, retry decisions and responses: all of it, none of the I/O."""

    _credential: ClassVar[_Credential]

    def __init__(
        self,
        secret: str | None,
        base_url: str | None,
        timeout: float | None,
        max_retries: int,
    ) -> None:
        source = self._credential
        token = (secret or os.environ.get(source.env) or "").strip()
        if not token:
            raise TillError(
                0,
                source.missing_code,
                f"No {source.label}: pass {source.argument}=... or set the {source.env} "
                "environment variable.",
            )
        url = (base_url or os.environ.get("TILL_URL") or DEFAULT_BASE_URL).strip().rstrip("/")
        # The provider SDKs' base URL (Till's root and /v1) is taken for Till's root: one
        # TILL_URL serves both. No admin or holder path of Till starts with /v1/v1.
        url = url.removesuffix("/v1")
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
        # The token goes in the authorization header and nowhere else: not in a repr, a URL or
        # an error message.
        self._token = token
        self.base_url = url
        self.timeout = timeout
        self.max_retries = max_retries

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def _build_request(self, call: _Call[Any]) -> httpx.Request:
        # The timeout rides on the request, so an injected http_client gets ours too.
        return httpx.Request(
            call.method,
            self.base_url + call.path,
            headers={
                "authorization": f"Bearer {self._token}",
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


# --- what each method sends, still without I/O ---


class _AdminCalls(_BaseClient):
    """The admin API, with an admin key."""

    _credential = _ADMIN_KEY

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

    def _update_key(self, key_id: str, params: ScopedKeyUpdate) -> _Call[ScopedKey]:
        body = params.to_dict()
        if not body:
            raise ValueError("update_key needs at least one change")
        # PATCH is not in IDEMPOTENT_METHODS: a top-up repeated would add twice.
        return _Call("PATCH", _key_path(key_id), _parse_key, body)

    def _top_up(
        self, key_id: str, activations: int | None, tokens: int | None, spend_cents: int | None
    ) -> _Call[ScopedKey]:
        if activations is None and tokens is None and spend_cents is None:
            raise ValueError("top_up needs activations, tokens or spend_cents")
        params = ScopedKeyUpdate(
            add_activations=activations, add_tokens=tokens, add_spend_cents=spend_cents
        )
        return self._update_key(key_id, params)


class _KeyCalls(_BaseClient):
    """A scoped key's own endpoints, with the scoped key."""

    _credential = _SCOPED_KEY

    def _info(self) -> _Call[ScopedKey]:
        return _Call("GET", "/v1/till/key", _parse_key)

    def _revoke(self) -> _Call[ScopedKey]:
        return _Call("DELETE", "/v1/till/key", _parse_key)

    def _create_child(self, params: ChildKeyCreate) -> _Call[ScopedKey]:
        return _Call("POST", "/v1/till/keys", _parse_key, params.to_dict())


def _create_params(
    provider: str, upstream_key: str, max_activations: int, **options: Any
) -> ScopedKeyCreate:
    return ScopedKeyCreate(
        provider=provider, upstream_key=upstream_key, max_activations=max_activations, **options
    )


def _update_params(remove_limits: Sequence[str], **changes: Any) -> ScopedKeyUpdate:
    if isinstance(remove_limits, str):
        # tuple("rpm") would be three unknown limits.
        raise ValueError(f"remove_limits takes a list of names, such as [{remove_limits!r}]")
    return ScopedKeyUpdate(remove_limits=tuple(remove_limits), **changes)


# --- I/O only: sending, sleeping, closing ---


class _SyncIO(_BaseClient):
    _http: httpx.Client
    _owns_http: bool

    def _use(self, http_client: httpx.Client | None) -> None:
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client()

    def close(self) -> None:
        """Close the connections, unless the ``http_client`` was passed in (it stays yours)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
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


class _AsyncIO(_BaseClient):
    _http: httpx.AsyncClient
    _owns_http: bool

    def _use(self, http_client: httpx.AsyncClient | None) -> None:
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient()

    async def close(self) -> None:
        """Close the connections, unless the ``http_client`` was passed in (it stays yours)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
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


# --- the clients ---


class TillClient(_SyncIO, _AdminCalls):
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
        self._use(http_client)

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

    def update_key(
        self,
        key_id: str,
        *,
        name: str | None = None,
        metadata: dict[str, Any] | None = None,
        max_activations: int | None = None,
        max_tokens: int | None = None,
        max_spend_cents: int | None = None,
        rpm: int | None = None,
        max_concurrent: int | None = None,
        add_activations: int | None = None,
        add_tokens: int | None = None,
        add_spend_cents: int | None = None,
        remove_limits: Sequence[str] = (),
    ) -> ScopedKey:
        """Change a key's name, metadata or limits at once, for every worker. Not retried.

        ``max_*``, ``rpm``, ``max_concurrent`` set a limit; ``add_*`` raise one atomically;
        ``remove_limits`` lifts limits by name (``max_tokens``, ``max_spend_cents``, ``rpm``,
        ``max_concurrent``). ``metadata`` replaces the metadata, then ``name`` is set in it. An
        exhausted key with room again is active; a limit lowered to its use exhausts it.
        ``ConflictError`` (``already_revoked``) for a revoked key, ``ValueError`` for no change.
        """
        params = _update_params(
            remove_limits, name=name, metadata=metadata, max_activations=max_activations,
            max_tokens=max_tokens, max_spend_cents=max_spend_cents, rpm=rpm,
            max_concurrent=max_concurrent, add_activations=add_activations,
            add_tokens=add_tokens, add_spend_cents=add_spend_cents,
        )  # fmt: skip
        return self._request(self._update_key(key_id, params))

    def top_up(
        self,
        key_id: str,
        *,
        activations: int | None = None,
        tokens: int | None = None,
        spend_cents: int | None = None,
    ) -> ScopedKey:
        """Add to a key's limits atomically (``update_key(add_...)``). Not retried."""
        return self._request(self._top_up(key_id, activations, tokens, spend_cents))

    def revoke_key(self, key_id: str) -> ScopedKey:
        """Revoke a key at once; it answers 401 from then on. Returns the revoked key."""
        return self._request(self._revoke_key(key_id))


class AsyncTillClient(_AsyncIO, _AdminCalls):
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
        self._use(http_client)

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

    async def update_key(
        self,
        key_id: str,
        *,
        name: str | None = None,
        metadata: dict[str, Any] | None = None,
        max_activations: int | None = None,
        max_tokens: int | None = None,
        max_spend_cents: int | None = None,
        rpm: int | None = None,
        max_concurrent: int | None = None,
        add_activations: int | None = None,
        add_tokens: int | None = None,
        add_spend_cents: int | None = None,
        remove_limits: Sequence[str] = (),
    ) -> ScopedKey:
        """Change a key's name, metadata or limits at once, for every worker. Not retried.

        ``max_*``, ``rpm``, ``max_concurrent`` set a limit; ``add_*`` raise one atomically;
        ``remove_limits`` lifts limits by name (``max_tokens``, ``max_spend_cents``, ``rpm``,
        ``max_concurrent``). ``metadata`` replaces the metadata, then ``name`` is set in it. An
        exhausted key with room again is active; a limit lowered to its use exhausts it.
        ``ConflictError`` (``already_revoked``) for a revoked key, ``ValueError`` for no change.
        """
        params = _update_params(
            remove_limits, name=name, metadata=metadata, max_activations=max_activations,
            max_tokens=max_tokens, max_spend_cents=max_spend_cents, rpm=rpm,
            max_concurrent=max_concurrent, add_activations=add_activations,
            add_tokens=add_tokens, add_spend_cents=add_spend_cents,
        )  # fmt: skip
        return await self._request(self._update_key(key_id, params))

    async def top_up(
        self,
        key_id: str,
        *,
        activations: int | None = None,
        tokens: int | None = None,
        spend_cents: int | None = None,
    ) -> ScopedKey:
        """Add to a key's limits atomically (``update_key(add_...)``). Not retried."""
        return await self._request(self._top_up(key_id, activations, tokens, spend_cents))

    async def revoke_key(self, key_id: str) -> ScopedKey:
        """Revoke a key at once; it answers 401 from then on. Returns the revoked key."""
        return await self._request(self._revoke_key(key_id))


class KeyClient(_SyncIO, _KeyCalls):
    """What the holder of a scoped key can do with the key alone: read its own view, revoke
    it, make child keys within its limits. ``scoped_key`` defaults to ``TILL_SCOPED_KEY``,
    ``base_url`` to ``TILL_URL`` and then https://api.till.ac (Till's root; the ``/v1`` the
    provider SDKs are given is dropped).
    """

    def __init__(
        self,
        scoped_key: str | None = None,
        base_url: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(scoped_key, base_url, timeout, max_retries)
        self._use(http_client)

    def info(self) -> ScopedKey:
        """The key's own view: ``remaining_*`` is what it can really still use (for a child,
        within its ancestors' budgets too); ``metadata`` holds only its name."""
        return self._request(self._info())

    def revoke(self) -> ScopedKey:
        """Revoke this key and its children at once; returns the revoked key. Retried like a
        read: revoking a revoked key answers the same again."""
        return self._request(self._revoke())

    def create_child(
        self,
        max_activations: int,
        *,
        name: str | None = None,
        metadata: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        max_spend_cents: int | None = None,
        expires_at: datetime | str | None = None,
        ttl_seconds: int | None = None,
        allowed_models: list[str] | None = None,
        ip_whitelist: list[str] | None = None,
        rpm: int | None = None,
        max_concurrent: int | None = None,
    ) -> ScopedKey:
        """Make a child key, its token in ``.scoped_key`` (shown this once). Not retried.

        Same provider and upstream key; each limit must fit in what this key has left
        (``LimitError``, ``parent_limit_exceeded``), models and IPs within this key's, and it
        expires no later. Every request of the child also counts against this key; revoking
        this key revokes the child.
        """
        params = ChildKeyCreate(
            max_activations, name=name, metadata=metadata, max_tokens=max_tokens,
            max_spend_cents=max_spend_cents, expires_at=expires_at, ttl_seconds=ttl_seconds,
            allowed_models=allowed_models, ip_whitelist=ip_whitelist, rpm=rpm,
            max_concurrent=max_concurrent,
        )  # fmt: skip
        return self._request(self._create_child(params))


class AsyncKeyClient(_AsyncIO, _KeyCalls):
    """``KeyClient`` for asyncio: the same methods, awaited. Use ``async with`` or ``close()``."""

    def __init__(
        self,
        scoped_key: str | None = None,
        base_url: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(scoped_key, base_url, timeout, max_retries)
        self._use(http_client)

    async def info(self) -> ScopedKey:
        """The key's own view: ``remaining_*`` is what it can really still use (for a child,
        within its ancestors' budgets too); ``metadata`` holds only its name."""
        return await self._request(self._info())

    async def revoke(self) -> ScopedKey:
        """Revoke this key and its children at once; returns the revoked key. Retried like a
        read: revoking a revoked key answers the same again."""
        return await self._request(self._revoke())

    async def create_child(
        self,
        max_activations: int,
        *,
        name: str | None = None,
        metadata: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        max_spend_cents: int | None = None,
        expires_at: datetime | str | None = None,
        ttl_seconds: int | None = None,
        allowed_models: list[str] | None = None,
        ip_whitelist: list[str] | None = None,
        rpm: int | None = None,
        max_concurrent: int | None = None,
    ) -> ScopedKey:
        """Make a child key, its token in ``.scoped_key`` (shown this once). Not retried.

        Same provider and upstream key; each limit must fit in what this key has left
        (``LimitError``, ``parent_limit_exceeded``), models and IPs within this key's, and it
        expires no later. Every request of the child also counts against this key; revoking
        this key revokes the child.
        """
        params = ChildKeyCreate(
            max_activations, name=name, metadata=metadata, max_tokens=max_tokens,
            max_spend_cents=max_spend_cents, expires_at=expires_at, ttl_seconds=ttl_seconds,
            allowed_models=allowed_models, ip_whitelist=ip_whitelist, rpm=rpm,
            max_concurrent=max_concurrent,
        )  # fmt: skip
        return await self._request(self._create_child(params))

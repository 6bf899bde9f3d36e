"""Error codes shared by the server and the SDK, and the SDK's error classes.

Errors are data: a stable machine ``code``, the HTTP status it travels with, and a human
message. One table maps codes to statuses so the server, the SDK and the docs agree. No I/O
and no HTTP library here: the clients map transport failures onto these classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

# code -> HTTP status. Codes are part of the wire contract: add, never rename.
STATUS: Final[dict[str, int]] = {
    # request shape
    "invalid_json": 400,
    "validation_error": 422,
    "payload_too_large": 413,
    "headers_too_large": 431,
    "invalid_header": 400,
    "request_timeout": 408,
    "not_found": 404,
    "method_not_allowed": 405,
    # admin authentication and plan
    "unauthorized": 401,
    "max_keys_reached": 403,
    "tenant_suspended": 403,
    # scoped token
    "invalid_api_key": 401,
    "key_revoked": 401,
    "key_expired": 401,
    "ip_not_allowed": 403,
    "model_not_allowed": 403,
    "unknown_model_price": 400,
    # key lifecycle: PATCH of a revoked key, a child asking more than its parent has left
    "already_revoked": 409,
    "parent_limit_exceeded": 402,
    # Idempotency-Key: a retry while the first call runs (retryable), after it completed
    # (final: the answer went to the first call), or with another body under the same key
    "idempotency_in_progress": 409,
    "idempotent_request_completed": 409,
    "idempotency_key_reused": 422,
    # budgets: the SDKs of every provider treat 402 as final (no retry loop)
    "activation_limit_reached": 402,
    "token_limit_reached": 402,
    "spend_limit_reached": 402,
    "monthly_quota_reached": 402,
    # rate and concurrency: the only limits worth retrying, so 429 with Retry-After
    "rate_limited": 429,
    "concurrency_limit_reached": 429,
    # infrastructure
    "store_unavailable": 503,
    "too_many_streams": 503,
    "upstream_unavailable": 502,
    "upstream_timeout": 504,
    "internal_error": 500,
}

LIMIT_CODES: Final[frozenset[str]] = frozenset(
    {
        "activation_limit_reached",
        "token_limit_reached",
        "spend_limit_reached",
        "monthly_quota_reached",
    }
)


# Refusals that pass with time: answered 429 with Retry-After, which every provider SDK retries.
RATE_CODES: Final[frozenset[str]] = frozenset({"rate_limited", "concurrency_limit_reached"})


def status_for(code: str) -> int:
    return STATUS.get(code, 500)


class TillError(Exception):
    """Any failure of a Till call. ``str(e)`` is the message; ``e.code`` is stable."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        request_id: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.request_id = request_id
        self.details: dict[str, Any] = dict(details or {})

    @property
    def limit(self) -> int | None:
        """The plan or key limit that was hit, when the server said."""
        return _detail_int(self.details, "limit")

    @property
    def used(self) -> int | None:
        return _detail_int(self.details, "used")

    @property
    def remaining(self) -> int | None:
        return _detail_int(self.details, "remaining")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields ride in the state, so errors survive pickling (multiprocessing).
        return type(self), (self.status_code, self.code, self.message), self.__dict__

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status_code={self.status_code!r}, code={self.code!r}, "
            f"message={self.message!r}, request_id={self.request_id!r})"
        )


class AuthenticationError(TillError):
    """401: the admin key is missing, unknown or revoked."""


class PermissionDeniedError(TillError):
    """403 other than a plan limit, for example a suspended tenant."""


class NotFoundError(TillError):
    """404: no such key in this account (another tenant's keys are not visible)."""


class ValidationError(TillError):
    """400, 413, 422: the request was refused as malformed; ``str(e)`` names the field."""


class LimitError(TillError):
    """402, or 403 ``max_keys_reached``: a plan or key limit; ``limit``/``used``/``remaining``."""


class RateLimitError(TillError):
    """429 (``rate_limited``, ``concurrency_limit_reached``): too many requests; retried for
    reads before it reaches you."""


class ConflictError(TillError):
    """409: the key is revoked already, or an idempotent call is running or done."""


class ServerError(TillError):
    """5xx: Till or its store failed; retried for reads before it reaches you."""


class APIConnectionError(TillError):
    """No response: Till could not be reached. ``status_code`` is 0."""


class APITimeoutError(APIConnectionError):
    """No response in time. ``status_code`` is 0."""


def _detail_int(details: Mapping[str, Any], name: str) -> int | None:
    value = details.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def error_class(status: int, code: str) -> type[TillError]:
    """The TillError subclass for an HTTP status and error code."""
    if status == 402 or code == "max_keys_reached" or code in LIMIT_CODES:
        return LimitError
    by_status: dict[int, type[TillError]] = {
        400: ValidationError,
        401: AuthenticationError,
        403: PermissionDeniedError,
        404: NotFoundError,
        409: ConflictError,
        413: ValidationError,
        431: ValidationError,
        422: ValidationError,
        429: RateLimitError,
    }
    if code in RATE_CODES:
        return RateLimitError
    if status >= 500:
        return ServerError
    return by_status.get(status, TillError)

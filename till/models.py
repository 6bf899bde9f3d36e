"""The SDK's data: what the admin API returns, as frozen dataclasses with snake_case names.

Decoding is lenient on purpose: unknown fields are ignored and missing (or null, or mistyped)
fields take a default, so a newer server never breaks an older client. Fields the server added
after the published 0.1 contract (held and remaining amounts) are derived from the others when an
older server leaves them out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

__all__ = [
    "AccountSummary",
    "ChildKeyCreate",
    "ScopedKey",
    "ScopedKeyCreate",
    "ScopedKeyUpdate",
    "Tenant",
]

# The limits an update can remove (sent as JSON null); max_activations always has a value.
REMOVABLE_LIMITS: Final = ("max_tokens", "max_spend_cents", "rpm", "max_concurrent")


def _str(data: Mapping[str, Any], name: str, default: str = "") -> str:
    value = data.get(name)
    return value if isinstance(value, str) else default


def _opt_str(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    return value if isinstance(value, str) else None


def _opt_int(data: Mapping[str, Any], name: str) -> int | None:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _int(data: Mapping[str, Any], name: str, default: int = 0) -> int:
    value = _opt_int(data, name)
    return default if value is None else value


def _opt_num(data: Mapping[str, Any], name: str) -> float | None:
    # Cents travel as an integer when whole and as a decimal otherwise; keep what was sent.
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _num(data: Mapping[str, Any], name: str, default: float = 0) -> float:
    value = _opt_num(data, name)
    return default if value is None else value


def _opt_strs(data: Mapping[str, Any], name: str) -> list[str] | None:
    value = data.get(name)
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


@dataclass(frozen=True)
class ScopedKey:
    """A scoped key and its limits. ``scoped_key`` (the token) is set only by ``create_key``."""

    id: str
    tenant_id: str
    provider: str
    max_activations: int
    used_activations: int
    status: str
    ip_whitelist: list[str] = field(default_factory=list)
    created_at: str = ""
    last_used_at: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    used_tokens: int = 0
    max_spend_cents: float | None = None
    used_spend_cents: float = 0
    # The token is a secret: shown once, never in a repr or a log line.
    scoped_key: str | None = field(default=None, repr=False)
    # Amounts held by requests in flight, and what is left once they settle at worst case.
    held_tokens: int = 0
    held_spend_cents: float = 0
    used_spend_microcents: int = 0
    remaining_activations: int = 0
    remaining_tokens: int | None = None
    remaining_spend_cents: float | None = None
    # When the key stops working (RFC 3339), the models it may use (None: any), its rate and
    # concurrency limits (None: none), and its requests in flight. None from an older server.
    expires_at: str | None = None
    allowed_models: list[str] | None = None
    rpm: int | None = None
    max_concurrent: int | None = None
    in_flight: int = 0
    # The key this one was made from (``KeyClient.create_child``); None for a key an admin made.
    parent_id: str | None = None

    @property
    def name(self) -> str | None:
        """``metadata["name"]``, where ``create_key(name=...)`` puts it."""
        value = self.metadata.get("name")
        return value if isinstance(value, str) else None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScopedKey:
        data = _mapping(data)
        max_activations = _int(data, "maxActivations")
        used_activations = _int(data, "usedActivations")
        max_tokens = _opt_int(data, "maxTokens")
        used_tokens = _int(data, "usedTokens")
        held_tokens = _int(data, "heldTokens")
        max_spend = _opt_num(data, "maxSpendCents")
        used_spend = _num(data, "usedSpendCents")
        held_spend = _num(data, "heldSpendCents")
        remaining_tokens = _opt_int(data, "remainingTokens")
        if remaining_tokens is None and max_tokens is not None:
            remaining_tokens = max(0, max_tokens - used_tokens - held_tokens)
        remaining_spend = _opt_num(data, "remainingSpendCents")
        if remaining_spend is None and max_spend is not None:
            remaining_spend = max(0, max_spend - used_spend - held_spend)
        ips = data.get("ipWhitelist")
        return cls(
            id=_str(data, "id"),
            tenant_id=_str(data, "tenantId"),
            provider=_str(data, "provider"),
            max_activations=max_activations,
            used_activations=used_activations,
            status=_str(data, "status"),
            ip_whitelist=[ip for ip in ips if isinstance(ip, str)] if isinstance(ips, list) else [],
            created_at=_str(data, "createdAt"),
            last_used_at=_opt_str(data, "lastUsedAt"),
            metadata=dict(_mapping(data.get("metadata"))),
            max_tokens=max_tokens,
            used_tokens=used_tokens,
            max_spend_cents=max_spend,
            used_spend_cents=used_spend,
            scoped_key=_opt_str(data, "scopedKey"),
            held_tokens=held_tokens,
            held_spend_cents=held_spend,
            used_spend_microcents=_int(data, "usedSpendMicrocents", round(used_spend * 1_000_000)),
            remaining_activations=_int(
                data, "remainingActivations", max(0, max_activations - used_activations)
            ),
            remaining_tokens=remaining_tokens,
            remaining_spend_cents=remaining_spend,
            expires_at=_opt_str(data, "expiresAt"),
            allowed_models=_opt_strs(data, "allowedModels"),
            rpm=_opt_int(data, "rpm"),
            max_concurrent=_opt_int(data, "maxConcurrent"),
            in_flight=_int(data, "inFlight"),
            parent_id=_opt_str(data, "parentId"),
        )


def _options(
    *,
    name: str | None,
    metadata: Mapping[str, Any] | None,
    ip_whitelist: list[str] | None,
    max_tokens: int | None,
    max_spend_cents: int | None,
    expires_at: datetime | str | None,
    ttl_seconds: int | None,
    allowed_models: list[str] | None,
    rpm: int | None,
    max_concurrent: int | None,
) -> dict[str, Any]:
    """The optional part of a new key's body, shared by admin keys and child keys. An unset
    field is not sent at all: an older server refuses fields it does not know."""
    body: dict[str, Any] = {}
    merged = dict(metadata or {})
    if name is not None:
        merged["name"] = name
    if merged:
        body["metadata"] = merged
    if ip_whitelist:
        body["ip_whitelist"] = list(ip_whitelist)
    if expires_at is not None:
        # A naive datetime goes without an offset, which the server refuses by name.
        body["expires_at"] = (
            expires_at.isoformat() if isinstance(expires_at, datetime) else expires_at
        )
    optional = {
        "max_tokens": max_tokens,
        "max_spend_cents": max_spend_cents,
        "ttl_seconds": ttl_seconds,
        "rpm": rpm,
        "max_concurrent": max_concurrent,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    if allowed_models is not None:
        body["allowed_models"] = list(allowed_models)
    return body


@dataclass(frozen=True)
class ScopedKeyCreate:
    """The body of ``POST /admin/keys``; ``name`` travels as ``metadata["name"]``."""

    provider: str
    upstream_key: str = field(repr=False)
    max_activations: int
    name: str | None = None
    ip_whitelist: list[str] | None = None
    metadata: dict[str, Any] | None = None
    max_tokens: int | None = None
    max_spend_cents: int | None = None
    # A timezone-aware datetime or an RFC 3339 string; or ttl_seconds (not both).
    expires_at: datetime | str | None = None
    ttl_seconds: int | None = None
    allowed_models: list[str] | None = None
    rpm: int | None = None
    max_concurrent: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "upstream_key": self.upstream_key,
            "max_activations": self.max_activations,
            **_options(
                name=self.name, metadata=self.metadata, ip_whitelist=self.ip_whitelist,
                max_tokens=self.max_tokens, max_spend_cents=self.max_spend_cents,
                expires_at=self.expires_at, ttl_seconds=self.ttl_seconds,
                allowed_models=self.allowed_models, rpm=self.rpm,
                max_concurrent=self.max_concurrent,
            ),
        }  # fmt: skip


@dataclass(frozen=True)
class ChildKeyCreate:
    """The body of ``POST /v1/till/keys``: a child of the scoped key that sends it, with the
    parent's provider and upstream key. Each limit must fit in what the parent has left;
    ``allowed_models`` and ``ip_whitelist`` must lie within the parent's."""

    max_activations: int
    name: str | None = None
    metadata: dict[str, Any] | None = None
    max_tokens: int | None = None
    max_spend_cents: int | None = None
    expires_at: datetime | str | None = None
    ttl_seconds: int | None = None
    allowed_models: list[str] | None = None
    ip_whitelist: list[str] | None = None
    rpm: int | None = None
    max_concurrent: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_activations": self.max_activations,
            **_options(
                name=self.name, metadata=self.metadata, ip_whitelist=self.ip_whitelist,
                max_tokens=self.max_tokens, max_spend_cents=self.max_spend_cents,
                expires_at=self.expires_at, ttl_seconds=self.ttl_seconds,
                allowed_models=self.allowed_models, rpm=self.rpm,
                max_concurrent=self.max_concurrent,
            ),
        }  # fmt: skip


@dataclass(frozen=True)
class ScopedKeyUpdate:
    """The body of ``PATCH /admin/keys/{id}``: only the fields set travel.

    ``max_*``, ``rpm`` and ``max_concurrent`` set a limit; ``add_*`` raise one atomically (a
    top-up: not idempotent); ``remove_limits`` names limits among ``REMOVABLE_LIMITS`` to lift
    (sent as JSON null). ``metadata`` replaces the key's metadata, then ``name`` is set in it.
    """

    name: str | None = None
    metadata: dict[str, Any] | None = None
    max_activations: int | None = None
    max_tokens: int | None = None
    max_spend_cents: int | None = None
    rpm: int | None = None
    max_concurrent: int | None = None
    add_activations: int | None = None
    add_tokens: int | None = None
    add_spend_cents: int | None = None
    remove_limits: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.remove_limits, str):
            raise ValueError(
                f"remove_limits takes a list of names, such as ({self.remove_limits!r},)"
            )
        removed = tuple(self.remove_limits)
        unknown = [n for n in removed if n not in REMOVABLE_LIMITS]
        if unknown:
            raise ValueError(
                f"remove_limits: unknown limit {unknown[0]!r}; choose among "
                f"{', '.join(REMOVABLE_LIMITS)}"
            )
        both = [n for n in removed if getattr(self, n) is not None]
        if both:
            raise ValueError(f"{both[0]} is both set and removed")
        object.__setattr__(self, "remove_limits", removed)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.name is not None:
            body["name"] = self.name
        if self.metadata is not None:
            body["metadata"] = dict(self.metadata)  # {} clears it
        values = {
            "max_activations": self.max_activations,
            "max_tokens": self.max_tokens,
            "max_spend_cents": self.max_spend_cents,
            "rpm": self.rpm,
            "max_concurrent": self.max_concurrent,
            "add_activations": self.add_activations,
            "add_tokens": self.add_tokens,
            "add_spend_cents": self.add_spend_cents,
        }
        body.update({key: value for key, value in values.items() if value is not None})
        body.update(dict.fromkeys(self.remove_limits))
        return body


@dataclass(frozen=True)
class Tenant:
    """The account's tenant and its plan limits."""

    id: str
    email: str
    plan: str
    max_keys: int
    max_activations_per_month: int
    activations_this_month: int
    status: str
    name: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tenant:
        data = _mapping(data)
        return cls(
            id=_str(data, "id"),
            email=_str(data, "email"),
            plan=_str(data, "plan"),
            max_keys=_int(data, "maxKeys"),
            max_activations_per_month=_int(data, "maxActivationsPerMonth"),
            activations_this_month=_int(data, "activationsThisMonth"),
            status=_str(data, "status"),
            name=_str(data, "name"),
        )


@dataclass(frozen=True)
class AccountSummary:
    """``GET /admin/account``: live keys, this month's activations, and the tenant."""

    scope: str
    tenant: Tenant | None = None
    keys_used: int = 0
    tenants: int = 0
    activations_used_this_month: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccountSummary:
        data = _mapping(data)
        tenant = data.get("tenant")
        return cls(
            scope=_str(data, "scope"),
            tenant=Tenant.from_dict(tenant) if isinstance(tenant, Mapping) else None,
            keys_used=_int(data, "keysUsed"),
            tenants=_int(data, "tenants"),
            activations_used_this_month=_int(data, "activationsUsedThisMonth"),
        )

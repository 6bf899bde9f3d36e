"""The admin API: a tenant's account and its scoped keys (see docs: WIRE_API.md).

Snake case in, camel case out, and every error ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from till.errors import status_for
from till.server.ledger import (
    MICROCENTS_PER_CENT,
    KeyRecord,
    Ledger,
    Refused,
    StoreUnavailable,
    TenantRecord,
)
from till.tokens import KEY_ID_LENGTH, Keyring, TokenClaims, new_key_id, seal

MAX_ADMIN_BODY: Final = 64 * 1024
MAX_METADATA_BYTES: Final = 8 * 1024
_KEY_ID = re.compile(rf"[a-z2-7]{{{KEY_ID_LENGTH}}}")
# Provider keys are printable ASCII with no spaces; anything else is a paste accident.
_UPSTREAM_KEY = re.compile(r"[\x21-\x7e]+")


class CreateKey(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    provider: Literal["openai", "anthropic", "google"]
    upstream_key: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    max_activations: Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)]
    name: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    metadata: dict[str, Any] | None = None
    ip_whitelist: Annotated[list[str], msgspec.Meta(max_length=16)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=10**12)] | None = None
    max_spend_cents: Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)] | None = None


_create_decoder = msgspec.json.Decoder(CreateKey)
_encode = msgspec.json.encode


class AdminError(Exception):
    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


def error_response(code: str, message: str, **extra: Any) -> Response:
    status = status_for(code)
    headers = {"retry-after": "2"} if status == 503 else None
    if status == 401:
        headers = {"www-authenticate": "Bearer"}
    body = _encode({"error": {"code": code, "message": message, **extra}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def json_response(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(_encode(payload), status_code=status, media_type="application/json")


def _rfc3339(ms: int | None) -> str | None:
    if ms is None:
        return None
    return (
        datetime.fromtimestamp(ms / 1000, tz=UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def cents(microcents: int | None) -> int | float | None:
    """Micro-cents as cents on the wire: an integer when whole, else a decimal."""
    if microcents is None:
        return None
    whole, part = divmod(microcents, MICROCENTS_PER_CENT)
    return whole if part == 0 else round(microcents / MICROCENTS_PER_CENT, 6)


def key_json(k: KeyRecord, scoped_key: str | None = None) -> dict[str, Any]:
    remaining_tokens = None
    if k.max_tokens is not None:
        remaining_tokens = max(0, k.max_tokens - k.used_tokens - k.held_tokens)
    remaining_mc = None
    if k.max_microcents is not None:
        remaining_mc = max(0, k.max_microcents - k.used_microcents - k.held_microcents)
    return {
        "id": k.id,
        "tenantId": k.tenant_id,
        "provider": k.provider,
        "maxActivations": k.max_activations,
        "usedActivations": k.used_activations,
        "status": k.status,
        "ipWhitelist": k.ip_whitelist,
        "createdAt": _rfc3339(k.created_ms),
        "lastUsedAt": _rfc3339(k.last_used_ms),
        "metadata": k.metadata,
        "maxTokens": k.max_tokens,
        "usedTokens": k.used_tokens,
        "maxSpendCents": cents(k.max_microcents),
        "usedSpendCents": cents(k.used_microcents),
        "scopedKey": scoped_key,
        # Additions beyond the published contract.
        "heldTokens": k.held_tokens,
        "heldSpendCents": cents(k.held_microcents),
        "usedSpendMicrocents": k.used_microcents,
        "remainingActivations": max(0, k.max_activations - k.used_activations),
        "remainingTokens": remaining_tokens,
        "remainingSpendCents": cents(remaining_mc),
    }


def tenant_json(t: TenantRecord, month_activations: int) -> dict[str, Any]:
    return {
        "id": t.id,
        "email": t.email,
        "plan": t.plan,
        "maxKeys": t.max_keys,
        "maxActivationsPerMonth": t.max_activations_per_month,
        "activationsThisMonth": month_activations,
        "status": t.status,
        "name": t.name,
    }


def parse_create(body: bytes) -> CreateKey:
    """Decode and validate a CreateKey body; AdminError names the first bad field."""
    try:
        req = _create_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise AdminError("validation_error", _safe(str(exc), body)) from None
    except (msgspec.DecodeError, RecursionError):
        raise AdminError("invalid_json", "The request body is not valid JSON.") from None
    if not _UPSTREAM_KEY.fullmatch(req.upstream_key):
        raise AdminError("validation_error", "upstream_key must be printable ASCII without spaces.")
    if req.upstream_key.startswith("till_"):
        raise AdminError(
            "validation_error", "upstream_key must be the provider's key, not a Till key."
        )
    if req.metadata is not None and len(_encode(req.metadata)) > MAX_METADATA_BYTES:
        raise AdminError("validation_error", f"metadata is limited to {MAX_METADATA_BYTES} bytes.")
    for entry in req.ip_whitelist or ():
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise AdminError(
                "validation_error", f"ip_whitelist: {entry[:64]!r} is not an IP address or CIDR."
            ) from None
    return req


def _safe(message: str, body: bytes) -> str:
    # Validation messages can quote input; never let them quote a secret.
    return (
        message
        if b"upstream_key" not in body or "upstream_key" not in message
        else ("upstream_key must be a string of 1 to 512 characters.")
    )


Handler = Callable[[Request], Awaitable[Response]]


class Admin:
    """Route handlers over a ledger. The ledger and keyring arrive once the app has started."""

    def __init__(self, ledger: Callable[[], Ledger], keyring: Keyring) -> None:
        self._ledger = ledger
        self.keyring = keyring

    def routes(self) -> list[Route]:
        return [
            Route("/admin/account", self._guard(self.account), methods=["GET"]),
            Route("/admin/keys", self._guard(self.create_key), methods=["POST"]),
            Route("/admin/keys", self._guard(self.list_keys), methods=["GET"]),
            Route("/admin/keys/{key_id}", self._guard(self.get_key), methods=["GET"]),
            Route("/admin/keys/{key_id}", self._guard(self.revoke_key), methods=["DELETE"]),
        ]

    def _guard(self, handler: Callable[[Request, str], Awaitable[Response]]) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                tenant_id = await self._authenticate(request)
                return await handler(request, tenant_id)
            except AdminError as exc:
                return error_response(exc.code, exc.message, **exc.extra)
            except StoreUnavailable:
                return error_response(
                    "store_unavailable", "Till's store is unavailable; retry shortly."
                )

        endpoint.__name__ = handler.__name__
        return endpoint

    async def _authenticate(self, request: Request) -> str:
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise AdminError("unauthorized", "Send your admin key as 'Authorization: Bearer'.")
        tenant_id = await self._ledger().authenticate_admin(credential.strip())
        if tenant_id is None:
            raise AdminError("unauthorized", "The admin key is not valid.")
        return tenant_id

    async def account(self, request: Request, tenant_id: str) -> Response:
        ledger = self._ledger()
        tenant = await ledger.tenant(tenant_id)
        if tenant is None:
            raise AdminError("unauthorized", "The admin key is not valid.")
        month = await ledger.month_activations(tenant_id)
        return json_response(
            {
                "account": {
                    "scope": "tenant",
                    "keysUsed": tenant.live_keys,
                    "tenants": 1,
                    "activationsUsedThisMonth": month,
                    "tenant": tenant_json(tenant, month),
                }
            }
        )

    async def create_key(self, request: Request, tenant_id: str) -> Response:
        body = await _read_capped(request)
        req = parse_create(body)
        metadata = dict(req.metadata or {})
        if req.name is not None:
            metadata["name"] = req.name
        ips = [str(ipaddress.ip_network(e, strict=False)) for e in req.ip_whitelist or ()]
        key_id = new_key_id()
        claims = TokenClaims(
            key_id=key_id,
            tenant_id=tenant_id,
            provider=req.provider,
            upstream_key=req.upstream_key,
            ip_whitelist=tuple(ips),
        )
        try:
            token = seal(self.keyring, claims)
        except ValueError:
            raise AdminError(
                "validation_error",
                "The key would not fit in a token: use a shorter ip_whitelist.",
            ) from None
        try:
            record = await self._ledger().create_key(
                tenant_id=tenant_id,
                key_id=key_id,
                provider=req.provider,
                max_activations=req.max_activations,
                max_tokens=req.max_tokens,
                max_microcents=None
                if req.max_spend_cents is None
                else req.max_spend_cents * MICROCENTS_PER_CENT,
                metadata=metadata,
                ip_whitelist=ips,
            )
        except Refused as exc:
            if exc.code == "max_keys_reached":
                raise AdminError(
                    exc.code,
                    f"Your plan allows {exc.limit} live keys and all are in use; "
                    "revoke one or change plan.",
                    limit=exc.limit,
                    used=exc.used,
                    remaining=0,
                ) from None
            raise AdminError(exc.code, "This account cannot create keys.") from None
        return json_response({"key": key_json(record, token)}, status=201)

    async def list_keys(self, request: Request, tenant_id: str) -> Response:
        records = await self._ledger().list_keys(tenant_id)
        return json_response({"keys": [key_json(k) for k in records]})

    async def get_key(self, request: Request, tenant_id: str) -> Response:
        record = await self._find(request, tenant_id)
        return json_response({"key": key_json(record)})

    async def revoke_key(self, request: Request, tenant_id: str) -> Response:
        key_id = self._key_id(request)
        record = await self._ledger().revoke_key(tenant_id, key_id)
        if record is None:
            raise AdminError("not_found", f"No key {key_id!r} in this account.")
        return json_response({"key": key_json(record)})

    def _key_id(self, request: Request) -> str:
        key_id = str(request.path_params["key_id"])
        if not _KEY_ID.fullmatch(key_id):
            raise AdminError("not_found", f"No key {key_id[:40]!r} in this account.")
        return key_id

    async def _find(self, request: Request, tenant_id: str) -> KeyRecord:
        key_id = self._key_id(request)
        # Keys live under their tenant's prefix: another tenant's id is simply not there.
        record = await self._ledger().get_key(tenant_id, key_id)
        if record is None:
            raise AdminError("not_found", f"No key {key_id!r} in this account.")
        return record


async def _read_capped(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_ADMIN_BODY:
        raise AdminError(
            "payload_too_large", f"Admin requests are limited to {MAX_ADMIN_BODY} bytes."
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_ADMIN_BODY:
            raise AdminError(
                "payload_too_large", f"Admin requests are limited to {MAX_ADMIN_BODY} bytes."
            )
        chunks.append(chunk)
    return b"".join(chunks)

"""The admin API: a tenant's account and its scoped keys (see docs: WIRE_API.md).

Snake case in, camel case out, and every error ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, TypeVar, cast, overload

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from till.errors import status_for
from till.server import openapi
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
MAX_ADMIN_DRAIN: Final = 1024 * 1024
MAX_METADATA_BYTES: Final = 8 * 1024
_KEY_ID = re.compile(rf"[a-z2-7]{{{KEY_ID_LENGTH}}}")
# Provider keys are printable ASCII with no spaces; anything else is a paste accident.
_UPSTREAM_KEY = re.compile(r"[\x21-\x7e]+")
_TILL_PREFIX: Final = "till_"
MAX_TTL_SECONDS: Final = 10 * 366 * 86400  # ten years
# An allowed_models entry: a model name, or a prefix ending in `*` (no other `*`, no space).
# With 64 entries of 64 characters, the longest token stays under MAX_TOKEN_LENGTH.
MAX_ALLOWED_MODELS: Final = 64
MAX_MODEL_PATTERN: Final = 64
_MODEL_PATTERN: Final = r"^[\x21-\x29\x2b-\x7e]*\*?$"
# msgspec searches with Python's `$`, which also matches before a final newline; JSON Schema's
# does not. Entries are matched whole again with this.
_MODEL_ENTRY: Final = re.compile(_MODEL_PATTERN[1:-1])


Provider = Literal["openai", "anthropic", "google"]
# The wire's times: RFC 3339 in UTC, to the millisecond.
Timestamp = Annotated[str, msgspec.Meta(extra_json_schema={"format": "date-time"})]
Cents = Annotated[
    float, msgspec.Meta(ge=0, description="Cents: an integer when whole, else a decimal.")
]


class KeyOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A key's limits and labels: the body of POST /v1/till/keys (a child key, minted with its
    parent's token), and with the provider and its key that of POST /admin/keys. Snake case.
    The checks msgspec cannot make are in check_options; those it can state are in the JSON
    schema it generates for the document."""

    max_activations: Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)]
    name: (
        Annotated[str, msgspec.Meta(max_length=200, description="Stored as metadata.name.")] | None
    ) = None
    metadata: (
        Annotated[
            dict[str, Any], msgspec.Meta(description=f"At most {MAX_METADATA_BYTES} bytes as JSON.")
        ]
        | None
    ) = None
    ip_whitelist: (
        Annotated[
            list[Annotated[str, msgspec.Meta(extra_json_schema=openapi.IP_NETWORK)]],
            msgspec.Meta(max_length=16, description="IP addresses or CIDR networks, v4 or v6."),
        ]
        | None
    ) = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=10**12)] | None = None
    max_spend_cents: Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)] | None = None
    # Additions beyond the published contract.
    expires_at: (
        Annotated[
            datetime,
            msgspec.Meta(
                tz=True,
                description="When the key stops working: RFC 3339 with a timezone, in the "
                "future (to the second, rounded down). Not with ttl_seconds.",
            ),
        ]
        | None
    ) = None
    ttl_seconds: (
        Annotated[
            int,
            msgspec.Meta(
                ge=1,
                le=MAX_TTL_SECONDS,
                description="The key stops working this many seconds after its creation. "
                "Not with expires_at.",
            ),
        ]
        | None
    ) = None
    allowed_models: (
        Annotated[
            list[
                Annotated[
                    str,
                    msgspec.Meta(
                        min_length=1, max_length=MAX_MODEL_PATTERN, pattern=_MODEL_PATTERN
                    ),
                ]
            ],
            msgspec.Meta(
                min_length=1,
                max_length=MAX_ALLOWED_MODELS,
                description="The models the key may use: exact names, or prefixes ending in "
                "`*` (`gpt-4o*`). Absent: any model.",
            ),
        ]
        | None
    ) = None
    rpm: (
        Annotated[
            int,
            msgspec.Meta(
                ge=1,
                le=1_000_000,
                description="Requests per minute, over a sliding window; past it, 429.",
            ),
        ]
        | None
    ) = None
    max_concurrent: (
        Annotated[
            int,
            msgspec.Meta(ge=1, le=100_000, description="Requests in flight at once; past it, 429."),
        ]
        | None
    ) = None


class CreateKey(KeyOptions):
    """The body of POST /admin/keys."""

    provider: Provider
    upstream_key: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=512,
            description="The provider's real key: sealed into the token, never stored.",
            extra_json_schema={
                "pattern": f"^{_UPSTREAM_KEY.pattern}$",
                "not": {"pattern": f"^{_TILL_PREFIX}"},
            },
        ),
    ]


# The body as the document states it, with what msgspec cannot check: not both expires_at and
# ttl_seconds (null counts as absent).
CreateKeySchema = Annotated[
    CreateKey,
    msgspec.Meta(
        extra_json_schema={
            "not": {
                "required": ["expires_at", "ttl_seconds"],
                "properties": {"expires_at": {"type": "string"}, "ttl_seconds": {"type": "number"}},
            }
        }
    ),
]


class ScopedKey(msgspec.Struct, kw_only=True, rename="camel"):
    """A scoped key on the wire (WIRE_API.md), camel case; `scopedKey` is set on creation only."""

    id: str
    tenant_id: str
    provider: Provider
    max_activations: int
    used_activations: int
    status: Annotated[str, msgspec.Meta(description="active, exhausted or revoked.")]
    ip_whitelist: list[str]
    created_at: Timestamp
    last_used_at: Timestamp | None
    metadata: dict[str, Any]
    max_tokens: int | None
    used_tokens: int
    max_spend_cents: Cents | None
    used_spend_cents: Cents
    scoped_key: (
        Annotated[str, msgspec.Meta(description="The token: set by POST /admin/keys only.")] | None
    )
    # Additions beyond the published contract.
    held_tokens: int
    held_spend_cents: Cents
    used_spend_microcents: int
    remaining_activations: int
    remaining_tokens: int | None
    remaining_spend_cents: Cents | None
    expires_at: Timestamp | None
    allowed_models: Annotated[
        list[str] | None, msgspec.Meta(description="Exact names or `prefix*`; null: any model.")
    ]
    rpm: int | None
    max_concurrent: int | None
    in_flight: Annotated[int, msgspec.Meta(description="Requests reserved and not yet settled.")]
    parent_id: Annotated[
        str | None,
        msgspec.Meta(description="The key that minted this one (POST /v1/till/keys), else null."),
    ]


class Tenant(msgspec.Struct, kw_only=True, rename="camel"):
    """The account's tenant and its plan limits."""

    id: str
    email: str
    plan: str
    max_keys: int
    max_activations_per_month: int
    activations_this_month: int
    status: str
    name: str


class Account(msgspec.Struct, kw_only=True, rename="camel"):
    """GET /admin/account: a tenant's live keys and this month's activations."""

    scope: Literal["tenant"]
    keys_used: int
    tenants: int
    activations_used_this_month: int
    tenant: Tenant


class UpdateKey(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of PATCH /admin/keys/{key_id}: what to change, and budgets to top up. What the
    token seals (provider, upstream key, IP list, models, expiry) cannot change."""

    name: Annotated[str, msgspec.Meta(max_length=200)] | msgspec.UnsetType = msgspec.UNSET
    metadata: (
        Annotated[
            dict[str, Any],
            msgspec.Meta(description="Replaces the metadata; `name`, if given, is set in it."),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    max_activations: Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)] | msgspec.UnsetType = (
        msgspec.UNSET
    )
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=10**12)] | msgspec.UnsetType | None = (
        msgspec.UNSET
    )
    max_spend_cents: (
        Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)] | msgspec.UnsetType | None
    ) = msgspec.UNSET
    rpm: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | msgspec.UnsetType | None = msgspec.UNSET
    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | msgspec.UnsetType | None = (
        msgspec.UNSET
    )
    add_activations: (
        Annotated[
            int,
            msgspec.Meta(ge=1, le=1_000_000_000, description="Raise max_activations by this."),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    add_tokens: (
        Annotated[
            int,
            msgspec.Meta(ge=1, le=10**12, description="Raise max_tokens (the key must have one)."),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    add_spend_cents: (
        Annotated[
            int,
            msgspec.Meta(
                ge=1,
                le=1_000_000_000,
                description="Raise max_spend_cents (the key must have one).",
            ),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET


# The body as the document states it, with what msgspec cannot check: some field, and not both
# a limit and an addition to it.
UpdateKeySchema = Annotated[
    UpdateKey,
    msgspec.Meta(
        extra_json_schema={
            "minProperties": 1,
            "allOf": [
                {"not": {"required": [f"max_{n}", f"add_{n}"]}}
                for n in ("activations", "tokens", "spend_cents")
            ],
        }
    ),
]


# UpdateKey's limits: the body's name, the key hash's field, the unit's scale in the store.
_LIMITS: Final = (
    ("max_activations", "add_activations", "max_act", 1),
    ("max_tokens", "add_tokens", "max_tok", 1),
    ("max_spend_cents", "add_spend_cents", "max_mc", MICROCENTS_PER_CENT),
    ("rpm", None, "rpm", 1),
    ("max_concurrent", None, "max_conc", 1),
)


# CreateKey's integer fields. JSON has one number type: `5.0` is the integer 5 to JSON Schema
# (the document's dialect) and to any client that computes a limit as a float, and msgspec,
# strict, refuses it. Its lax mode would also take "5", so whole floats are mended beforehand.
_WHOLE_NUMBERS: Final = (
    "max_activations", "max_tokens", "max_spend_cents", "ttl_seconds", "rpm", "max_concurrent",
    "add_activations", "add_tokens", "add_spend_cents",
)  # fmt: skip
_decode_json = msgspec.json.Decoder()
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


def _rfc3339(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, tz=UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


@overload
def cents(microcents: int) -> int | float: ...
@overload
def cents(microcents: int | None) -> int | float | None: ...
def cents(microcents: int | None) -> int | float | None:
    """Micro-cents as cents on the wire: an integer when whole, else a decimal."""
    if microcents is None:
        return None
    whole, part = divmod(microcents, MICROCENTS_PER_CENT)
    return whole if part == 0 else round(microcents / MICROCENTS_PER_CENT, 6)


def key_view(k: KeyRecord, scoped_key: str | None = None) -> ScopedKey:
    remaining_tokens = None
    if k.max_tokens is not None:
        remaining_tokens = max(0, k.max_tokens - k.used_tokens - k.held_tokens)
    remaining_mc = None
    if k.max_microcents is not None:
        remaining_mc = max(0, k.max_microcents - k.used_microcents - k.held_microcents)
    status = k.status
    if status != "revoked" and k.expires_at is not None and time.time() >= k.expires_at:
        status = "expired"  # for good, unlike "exhausted", which a top-up can end
    return ScopedKey(
        id=k.id,
        tenant_id=k.tenant_id,
        provider=cast(Provider, k.provider),  # written from a CreateKey
        max_activations=k.max_activations,
        used_activations=k.used_activations,
        status=status,
        ip_whitelist=k.ip_whitelist,
        created_at=_rfc3339(k.created_ms),
        last_used_at=None if k.last_used_ms is None else _rfc3339(k.last_used_ms),
        metadata=k.metadata,
        max_tokens=k.max_tokens,
        used_tokens=k.used_tokens,
        max_spend_cents=cents(k.max_microcents),
        used_spend_cents=cents(k.used_microcents),
        scoped_key=scoped_key,
        held_tokens=k.held_tokens,
        held_spend_cents=cents(k.held_microcents),
        used_spend_microcents=k.used_microcents,
        remaining_activations=0
        if k.status == "revoked"
        else max(0, k.max_activations - k.used_activations),
        remaining_tokens=remaining_tokens,
        remaining_spend_cents=cents(remaining_mc),
        expires_at=None if k.expires_at is None else _rfc3339(k.expires_at * 1000),
        allowed_models=k.allowed_models or None,
        rpm=k.rpm,
        max_concurrent=k.max_concurrent,
        in_flight=k.in_flight,
        parent_id=k.parent_id,
    )


def tenant_view(t: TenantRecord, month_activations: int) -> Tenant:
    return Tenant(
        id=t.id,
        email=t.email,
        plan=t.plan,
        max_keys=t.max_keys,
        max_activations_per_month=t.max_activations_per_month,
        activations_this_month=month_activations,
        status=t.status,
        name=t.name,
    )


def parse_create(body: bytes) -> CreateKey:
    """Decode and validate a CreateKey body; AdminError names the first bad field."""
    req = decode(body, CreateKey)
    if not _UPSTREAM_KEY.fullmatch(req.upstream_key):
        raise AdminError("validation_error", "upstream_key must be printable ASCII without spaces.")
    if req.upstream_key.startswith(_TILL_PREFIX):
        raise AdminError(
            "validation_error", "upstream_key must be the provider's key, not a Till key."
        )
    check_options(req)
    return req


def check_options(req: KeyOptions) -> None:
    """What the struct's types cannot say of a key's options; AdminError names the field."""
    if req.metadata is not None and len(_encode(req.metadata)) > MAX_METADATA_BYTES:
        raise AdminError("validation_error", f"metadata is limited to {MAX_METADATA_BYTES} bytes.")
    for i, entry in enumerate(req.ip_whitelist or ()):
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            # The entry is not quoted back: a pasted key in the wrong field is still a key.
            raise AdminError(
                "validation_error", f"ip_whitelist[{i}] is not an IP address or CIDR."
            ) from None
    for i, entry in enumerate(req.allowed_models or ()):
        if not _MODEL_ENTRY.fullmatch(entry):
            raise AdminError(
                "validation_error",
                f"allowed_models[{i}] must be a model name, or a prefix ending in `*`.",
            )
    if req.expires_at is not None and req.ttl_seconds is not None:
        raise AdminError("validation_error", "Give expires_at or ttl_seconds, not both.")


async def mint(
    ledger: Ledger, keyring: Keyring, claims: TokenClaims, req: KeyOptions, metadata: dict[str, Any]
) -> tuple[KeyRecord, str]:
    """Seal a new key's token and store the key: the one path for keys made by an admin and by
    a holder (a child, ``claims.parents`` set). The stored copies of what the token seals come
    from the claims. Refused (plan, parent's budget) goes up to the caller to word."""
    try:
        token = seal(keyring, claims)
    except ValueError:
        # A backstop: the bounds on each field keep every token within the limit.
        raise AdminError(
            "validation_error",
            "The key would not fit in a token: use fewer ip_whitelist or allowed_models.",
        ) from None
    record = await ledger.create_key(
        tenant_id=claims.tenant_id,
        key_id=claims.key_id,
        provider=claims.provider,
        max_activations=req.max_activations,
        max_tokens=req.max_tokens,
        max_microcents=None
        if req.max_spend_cents is None
        else req.max_spend_cents * MICROCENTS_PER_CENT,
        metadata=metadata,
        ip_whitelist=claims.ip_whitelist,
        expires_at=claims.expires_at,
        allowed_models=claims.allowed_models,
        rpm=req.rpm,
        max_concurrent=req.max_concurrent,
        ancestors=claims.parents,
    )
    return record, token


def parse_update(body: bytes) -> UpdateKey:
    """Decode and validate an UpdateKey body; AdminError names the first bad field."""
    req = decode(body, UpdateKey)
    if all(getattr(req, f) is msgspec.UNSET for f in req.__struct_fields__):
        raise AdminError("validation_error", "Name at least one field to change.")
    for name, add, _, _ in _LIMITS:
        given = getattr(req, name) is not msgspec.UNSET
        if add is not None and given and getattr(req, add) is not msgspec.UNSET:
            raise AdminError("validation_error", f"Give {name} or {add}, not both.")
    if req.metadata is not msgspec.UNSET and len(_encode(req.metadata)) > MAX_METADATA_BYTES:
        raise AdminError("validation_error", f"metadata is limited to {MAX_METADATA_BYTES} bytes.")
    return req


def update_changes(req: UpdateKey) -> list[tuple[str, str, int]]:
    """The ledger's changes for an UpdateKey: ("set" | "add" | "del", field, value)."""
    changes: list[tuple[str, str, int]] = []
    for name, add, field, scale in _LIMITS:
        value = getattr(req, name)
        if value is None:
            changes.append(("del", field, 0))
        elif value is not msgspec.UNSET:
            changes.append(("set", field, value * scale))
        if add is not None and (more := getattr(req, add)) is not msgspec.UNSET:
            changes.append(("add", field, more * scale))
    return changes


def decode(body: bytes, kind: type[Body]) -> Body:
    try:
        return msgspec.convert(_whole_numbers(_decode_json.decode(body)), kind)
    except msgspec.ValidationError as exc:
        raise AdminError("validation_error", _validation_message(str(exc))) from None
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        # msgspec raises UnicodeDecodeError (not a DecodeError) for invalid UTF-8 in a string.
        raise AdminError("invalid_json", "The request body is not valid JSON.") from None


def expiry(req: KeyOptions, now: float) -> int | None:
    """When the key expires, in whole seconds since the epoch (never later than asked)."""
    if req.ttl_seconds is not None:
        return math.floor(now) + req.ttl_seconds
    if req.expires_at is None:
        return None
    try:
        at = math.floor(req.expires_at.timestamp())
    except (OverflowError, ValueError):  # past year 9999 once in UTC
        at = None
    if at is None or at <= now:
        raise AdminError("validation_error", "expires_at must be in the future - at `$.expires_at`")
    return at


def _whole_numbers(data: Any) -> Any:
    """The body with a whole float in an integer field made an int, so that 5.0 reads as 5."""
    if isinstance(data, dict):
        for name in _WHOLE_NUMBERS:
            value = data.get(name)
            if isinstance(value, float) and value.is_integer():
                data[name] = int(value)
    return data


_ENUM_ERROR = re.compile(r"Invalid enum value .* - at `(?P<path>[^`]*)`", re.DOTALL)
_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(?P<name>.*)`(?P<rest>.*)", re.DOTALL)
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _validation_message(message: str) -> str:
    """msgspec's message, minus any input it quotes back: never let an error quote a secret.

    A swapped provider and upstream_key (the SDK takes them positionally) would otherwise put
    the provider key in an enum error, and a key pasted as a field name in an unknown-field one.
    """
    if "`$.upstream_key`" in message:
        return "upstream_key must be a string of 1 to 512 characters - at `$.upstream_key`"
    if m := _ENUM_ERROR.fullmatch(message):
        if m["path"] == "$.provider":
            return "provider must be 'openai', 'anthropic' or 'google' - at `$.provider`"
        return f"Invalid enum value - at `{m['path']}`"
    if (m := _UNKNOWN_FIELD.fullmatch(message)) and not _FIELD_NAME.fullmatch(m["name"]):
        return f"Object contains an unknown field{m['rest']}"
    return message


Handler = Callable[[Request], Awaitable[Response]]
Body = TypeVar("Body", bound=msgspec.Struct)


class Admin:
    """Route handlers over a ledger. The ledger and keyring arrive once the app has started."""

    def __init__(self, ledger: Callable[[], Ledger], keyring: Keyring) -> None:
        self._ledger = ledger
        self.keyring = keyring
        document = openapi.document(
            create=CreateKeySchema,
            update=UpdateKeySchema,
            key=ScopedKey,
            account=Account,
            key_id_pattern=_KEY_ID.pattern,
        )
        self._openapi = _encode(document)

    def routes(self) -> list[Route]:
        return [
            # Without authentication, like the published docs it restates: the document is the
            # same for every tenant and every server, and holds no tenant data and no secret.
            Route("/admin/openapi.json", self.openapi_json, methods=["GET"]),
            Route("/admin/account", self._guard(self.account), methods=["GET"]),
            Route("/admin/keys", self._guard(self.create_key), methods=["POST"]),
            Route("/admin/keys", self._guard(self.list_keys), methods=["GET"]),
            Route("/admin/keys/{key_id}", self._guard(self.get_key), methods=["GET"]),
            Route("/admin/keys/{key_id}", self._guard(self.revoke_key), methods=["DELETE"]),
            Route("/admin/keys/{key_id}", self._guard(self.update_key), methods=["PATCH"]),
        ]

    def _guard(self, handler: Callable[[Request, str], Awaitable[Response]]) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                tenant_id = await self._authenticate(request)
                response = await handler(request, tenant_id)
            except AdminError as exc:
                response = error_response(exc.code, exc.message, **exc.extra)
            except StoreUnavailable:
                response = error_response(
                    "store_unavailable", "Till's store is unavailable; retry shortly."
                )
            # A 401 comes before the body is read, and an oversized body is left half-read.
            await drain(request)
            return response

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

    async def openapi_json(self, request: Request) -> Response:
        return Response(self._openapi, media_type="application/json")

    async def account(self, request: Request, tenant_id: str) -> Response:
        ledger = self._ledger()
        tenant = await ledger.tenant(tenant_id)
        if tenant is None:
            raise AdminError("unauthorized", "The admin key is not valid.")
        month = await ledger.month_activations(tenant_id)
        view = Account(
            scope="tenant",
            keys_used=tenant.live_keys,
            tenants=1,
            activations_used_this_month=month,
            tenant=tenant_view(tenant, month),
        )
        return json_response({"account": view})

    async def create_key(self, request: Request, tenant_id: str) -> Response:
        body = await read_capped(request)
        req = parse_create(body)
        metadata = dict(req.metadata or {})
        if req.name is not None:
            metadata["name"] = req.name
        ips = [str(ipaddress.ip_network(e, strict=False)) for e in req.ip_whitelist or ()]
        expires_at = expiry(req, time.time())
        models = list(dict.fromkeys(req.allowed_models or ()))
        key_id = new_key_id()
        claims = TokenClaims(
            key_id=key_id,
            tenant_id=tenant_id,
            provider=req.provider,
            upstream_key=req.upstream_key,
            ip_whitelist=tuple(ips),
            expires_at=expires_at,
            allowed_models=tuple(models),
        )
        try:
            record, token = await mint(self._ledger(), self.keyring, claims, req, metadata)
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
        return json_response({"key": key_view(record, token)}, status=201)

    async def list_keys(self, request: Request, tenant_id: str) -> Response:
        records = await self._ledger().list_keys(tenant_id)
        return json_response({"keys": [key_view(k) for k in records]})

    async def get_key(self, request: Request, tenant_id: str) -> Response:
        record = await self._find(request, tenant_id)
        return json_response({"key": key_view(record)})

    async def revoke_key(self, request: Request, tenant_id: str) -> Response:
        key_id = self._key_id(request)
        record = await self._ledger().revoke_key(tenant_id, key_id)
        if record is None:
            raise AdminError("not_found", f"No key {key_id!r} in this account.")
        return json_response({"key": key_view(record)})

    def _key_id(self, request: Request) -> str:
        key_id = str(request.path_params["key_id"])
        if not _KEY_ID.fullmatch(key_id):
            # Not quoted back: a scoped token passed by mistake would be echoed.
            raise AdminError("not_found", "No key with this id in this account.")
        return key_id

    async def update_key(self, request: Request, tenant_id: str) -> Response:
        key_id = self._key_id(request)
        req = parse_update(await read_capped(request))
        ledger = self._ledger()
        metadata = None
        if req.metadata is not msgspec.UNSET or req.name is not msgspec.UNSET:
            if req.metadata is msgspec.UNSET:
                current = await ledger.get_key(tenant_id, key_id)
                metadata = dict(current.metadata) if current is not None else {}
            else:
                metadata = dict(req.metadata)
            if req.name is not msgspec.UNSET:
                metadata["name"] = req.name
        try:
            record = await ledger.update_key(
                tenant_id, key_id, metadata=metadata, changes=update_changes(req)
            )
        except Refused as exc:
            if exc.code == "already_revoked":
                raise AdminError(exc.code, "This key is revoked: it can change no more.") from None
            name = {"max_tok": "add_tokens", "max_mc": "add_spend_cents"}.get(exc.detail, "add")
            limit = {"max_tok": "max_tokens", "max_mc": "max_spend_cents"}.get(exc.detail, "it")
            raise AdminError(
                "validation_error",
                f"This key has no {limit} to add to: set {limit} instead - at `$.{name}`",
            ) from None
        if record is None:
            raise AdminError("not_found", f"No key {key_id!r} in this account.")
        return json_response({"key": key_view(record)})

    async def _find(self, request: Request, tenant_id: str) -> KeyRecord:
        key_id = self._key_id(request)
        # Keys live under their tenant's prefix: another tenant's id is simply not there.
        record = await self._ledger().get_key(tenant_id, key_id)
        if record is None:
            raise AdminError("not_found", f"No key {key_id!r} in this account.")
        return record


async def read_capped(request: Request) -> bytes:
    """The body, or payload_too_large past MAX_ADMIN_BODY."""
    too_large = AdminError(
        "payload_too_large", f"Admin requests are limited to {MAX_ADMIN_BODY} bytes."
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_ADMIN_BODY:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_ADMIN_BODY:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def drain(request: Request) -> None:
    """Read and drop what is left of the request body, up to MAX_ADMIN_DRAIN.

    Answering while the client still sends its body makes the server close the connection with
    bytes unread: the client sees a reset instead of the answer, or its pooled keep-alive
    connection dies under its next request. Past MAX_ADMIN_DRAIN, closing is the lesser evil.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_ADMIN_DRAIN:
        return
    size = 0
    # RuntimeError: the body was read to the end already.
    with contextlib.suppress(ClientDisconnect, RuntimeError):
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_ADMIN_DRAIN:
                break

"""The holder's own endpoints, with nothing but the scoped key: what is left of it, burning it,
and minting child keys carved out of its budget.

    GET    /v1/till/key    what remains of every limit, and when the key expires
    DELETE /v1/till/key    revoke the key (and its children): the agent's task is done
    POST   /v1/till/keys   a child key; the parent's counters cover the child's requests

They sit under the OpenAI base URL (``/v1``), where no provider has a ``till`` path, and take
the token where each provider's SDK puts it. Errors are Till's own
(``{"error": {"code", "message"}}``), as on the admin API.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from till.server.access import Gate, OpenKey, ProxyError
from till.server.admin import (
    AdminError,
    KeyOptions,
    ScopedKey,
    cents,
    check_options,
    decode,
    drain,
    error_response,
    expiry,
    json_response,
    key_view,
    mint,
    read_capped,
)
from till.server.allowlist import model_allowed
from till.server.ledger import (
    MAX_ANCESTORS,
    MICROCENTS_PER_CENT,
    KeyRecord,
    Ledger,
    Refused,
    StoreUnavailable,
)
from till.tokens import TokenClaims, new_key_id

# The wire's names for the key hash's limits, and their scale there.
_LIMIT_NAMES: Final = {
    "max_act": ("max_activations", 1),
    "max_tok": ("max_tokens", 1),
    "max_mc": ("max_spend_cents", MICROCENTS_PER_CENT),
}


class Holder:
    """Route handlers for a token's holder. The ledger arrives once the app has started."""

    def __init__(self, gate: Gate, ledger: Callable[[], Ledger]) -> None:
        self.gate = gate
        self._ledger = ledger

    def routes(self) -> list[Route]:
        return [
            Route("/v1/till/key", self._guard(self.get_key), methods=["GET"]),
            # Revoking answers the same again: a retry after a lost answer is no error.
            Route("/v1/till/key", self._guard(self.revoke_key, ended_ok=True), methods=["DELETE"]),
            Route("/v1/till/keys", self._guard(self.create_child), methods=["POST"]),
        ]

    def _guard(
        self,
        handler: Callable[[Request, OpenKey, list[KeyRecord]], Awaitable[Response]],
        *,
        ended_ok: bool = False,
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                key, chain = await self._authenticate(request, ended_ok=ended_ok)
                response = await handler(request, key, chain)
            except (AdminError, ProxyError) as exc:
                response = error_response(exc.code, exc.message, **exc.extra)
            except StoreUnavailable:
                response = error_response(
                    "store_unavailable", "Till's store is unavailable; retry shortly."
                )
            await drain(request)
            return response

        endpoint.__name__ = handler.__name__
        return endpoint

    async def _authenticate(
        self, request: Request, *, ended_ok: bool = False
    ) -> tuple[OpenKey, list[KeyRecord]]:
        """The token's key and its records (the key's, then its ancestors'), refused as the
        proxy would refuse it: unknown, revoked or expired, itself or any key above it; with
        ``ended_ok``, a revoked or expired key (one sealed by this server) is let through."""
        scope = request.scope
        headers = dict(scope["headers"])
        key = self.gate.admit(scope, headers)
        try:
            self.gate.check(scope, headers, key)
        except ProxyError as exc:
            if not (ended_ok and exc.code == "key_expired"):
                raise
        claims = key.claims
        ids = [claims.key_id, *claims.parents]
        records = await self._ledger().get_chain(claims.tenant_id, ids)
        chain = [r for r in records if r is not None]
        if not records or records[0] is None:
            raise ProxyError("invalid_api_key", "Incorrect API key provided.")
        now = time.time()
        if ended_ok:
            return key, chain
        for i, record in enumerate(records):
            whose = "This key" if i == 0 else "This key's parent key"
            if record is None or record.status == "revoked":
                raise ProxyError("key_revoked", f"{whose} has been revoked.")
            if record.expires_at is not None and now >= record.expires_at:
                raise ProxyError("key_expired", f"{whose} has expired.")
        return key, chain

    async def get_key(self, request: Request, key: OpenKey, chain: list[KeyRecord]) -> Response:
        return json_response({"key": holder_view(chain)})

    async def revoke_key(self, request: Request, key: OpenKey, chain: list[KeyRecord]) -> Response:
        claims = key.claims
        record = await self._ledger().revoke_key(claims.tenant_id, claims.key_id)
        if record is None:
            raise ProxyError("invalid_api_key", "Incorrect API key provided.")
        return json_response({"key": holder_view([record, *chain[1:]])})

    async def create_child(
        self, request: Request, key: OpenKey, chain: list[KeyRecord]
    ) -> Response:
        parent = key.claims
        if len(parent.parents) + 1 > MAX_ANCESTORS:
            raise AdminError(
                "validation_error", f"Keys nest at most {MAX_ANCESTORS} deep: this one cannot mint."
            )
        req = decode(await read_capped(request), KeyOptions)
        check_options(req)
        now = time.time()
        expires_at = expiry(req, now)
        if parent.expires_at is not None:
            # A child never outlives its parent.
            expires_at = min(expires_at or parent.expires_at, parent.expires_at)
        models = _child_models(req.allowed_models, parent.allowed_models)
        networks = _child_networks(req.ip_whitelist, parent.ip_whitelist)
        metadata = dict(req.metadata or {})
        if req.name is not None:
            metadata["name"] = req.name
        key_id = new_key_id()
        ancestors = (parent.key_id, *parent.parents)
        claims = TokenClaims(
            key_id=key_id,
            tenant_id=parent.tenant_id,
            provider=parent.provider,
            upstream_key=parent.upstream_key,
            ip_whitelist=tuple(networks),
            expires_at=expires_at,
            allowed_models=tuple(models),
            parents=ancestors,
        )
        try:
            record, token = await mint(self._ledger(), self.gate.keyring, claims, req, metadata)
        except Refused as exc:
            raise _child_refusal(exc) from None
        # The minter set the child's metadata: it sees it whole.
        view = msgspec.structs.replace(holder_view([record, *chain], token), metadata=metadata)
        return json_response({"key": view}, status=201)


def holder_view(chain: list[KeyRecord], scoped_key: str | None = None) -> ScopedKey:
    """A key as its holder sees it: the admin's view, with metadata cut to the name, and what
    remains of each limit lowered to what its ancestors have left (their counters cover it)."""
    view = key_view(chain[0], scoped_key)
    name = chain[0].metadata.get("name")
    remaining_act = view.remaining_activations
    remaining_tok = view.remaining_tokens
    remaining_mc = None if view.remaining_spend_cents is None else _remaining_mc(chain[0])
    for above in chain[1:]:
        remaining_act = min(remaining_act, max(0, above.max_activations - above.used_activations))
        if above.max_tokens is not None:
            left = max(0, above.max_tokens - above.used_tokens - above.held_tokens)
            remaining_tok = left if remaining_tok is None else min(remaining_tok, left)
        if above.max_microcents is not None:
            left = _remaining_mc(above)
            remaining_mc = left if remaining_mc is None else min(remaining_mc, left)
    return msgspec.structs.replace(
        view,
        metadata={"name": name} if isinstance(name, str) else {},
        remaining_activations=remaining_act,
        remaining_tokens=remaining_tok,
        remaining_spend_cents=cents(remaining_mc),
    )


def _remaining_mc(k: KeyRecord) -> int:
    assert k.max_microcents is not None
    return max(0, k.max_microcents - k.used_microcents - k.held_microcents)


def _child_models(asked: list[str] | None, parent: tuple[str, ...]) -> list[str]:
    """The child's allow-list: the parent's when none is asked, else the asked one, each entry
    of which the parent's must cover (a name it allows, or a prefix of one of its prefixes)."""
    if asked is None:
        return list(parent)
    models = list(dict.fromkeys(asked))
    if not parent:
        return models
    prefixes = [p[:-1] for p in parent if p.endswith("*")]
    for i, entry in enumerate(models):
        if entry.endswith("*"):
            covered = any(entry[:-1].startswith(p) for p in prefixes)
        else:
            covered = model_allowed(entry, parent)
        if not covered:
            raise AdminError(
                "model_not_allowed",
                f"allowed_models[{i}] is not within the models this key may use.",
            )
    return models


def _child_networks(asked: list[str] | None, parent: tuple[str, ...]) -> list[str]:
    """The child's networks: the parent's when none are asked, else the asked ones, each within
    one of the parent's."""
    if asked is None:
        return list(parent)
    networks = [ipaddress.ip_network(e, strict=False) for e in asked]
    outer = [ipaddress.ip_network(p, strict=False) for p in parent]
    for i, net in enumerate(networks):
        if outer and not any(
            net.version == o.version and net.subnet_of(o)  # type: ignore[arg-type]
            for o in outer
        ):
            raise AdminError(
                "validation_error", f"ip_whitelist[{i}] is not within this key's networks."
            )
    return [str(n) for n in networks]


def _child_refusal(exc: Refused) -> AdminError:
    if exc.code == "parent_limit_exceeded":
        name, scale = _LIMIT_NAMES.get(exc.detail, ("a limit", 1))
        asked, left = exc.limit, exc.remaining
        if scale != 1:
            asked_c, left_c = cents(asked), cents(left)
            return AdminError(
                exc.code,
                f"{name} asks for {asked_c} and this key has {left_c} left.",
                limit=asked_c,
                remaining=left_c,
                field=name,
            )
        return AdminError(
            exc.code,
            f"{name} asks for {asked} and this key has {left} left.",
            limit=asked,
            remaining=left,
            field=name,
        )
    if exc.code == "max_keys_reached":
        return AdminError(
            exc.code,
            f"The account's plan allows {exc.limit} live keys and all are in use.",
            limit=exc.limit,
            used=exc.used,
            remaining=0,
        )
    if exc.code in ("key_revoked", "key_expired"):
        state = "revoked" if exc.code == "key_revoked" else "expired"
        return AdminError(exc.code, f"This key has been {state}.")
    return AdminError(exc.code, "This key cannot mint keys.")

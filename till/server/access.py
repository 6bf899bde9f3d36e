"""Who is asking: a scoped token found in a request, opened, and checked against what it says
by itself (expiry, client address). Used by the proxy and by the holder's own endpoints.

No store calls here: what the token says is checked before anything is reserved or read.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl

from till.errors import status_for
from till.tokens import InvalidToken, Keyring, TokenClaims, unseal

Scope = MutableMapping[str, Any]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
TOKEN_CACHE_SIZE: Final = 10_000


class ProxyError(Exception):
    """A refusal, answered in the dialect of the path asked (the proxy) or Till's own (the
    holder's endpoints). ``extra`` joins the error body."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retry_after_ms: int | None = None,
        final: bool = False,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra
        self.status = status_for(code)
        # When a retry may pass (a rate or concurrency limit): sent as Retry-After.
        self.retry_after_ms = retry_after_ms
        # A refusal no retry can change though its status says otherwise (a 409): sent as
        # `x-should-retry: false`, which the openai and anthropic SDKs obey.
        self.final = final


@dataclass(frozen=True, slots=True)
class OpenKey:
    """An unsealed token and what is derived from it once, cached by the token string."""

    claims: TokenClaims
    networks: tuple[Network, ...]


class Gate:
    """Opens tokens (with a bounded cache: unsealing costs more than the rest of the checks)
    and checks their own claims against a request."""

    def __init__(self, keyring: Keyring, trusted_proxies: Sequence[str]) -> None:
        self.keyring = keyring
        self._tokens: dict[str, OpenKey] = {}
        self._trusted = tuple(ipaddress.ip_network(p, strict=False) for p in trusted_proxies)

    def admit(self, scope: Scope, headers: dict[bytes, bytes]) -> OpenKey:
        """The request's key, or ProxyError (401 or 403) before any store call."""
        token = find_token(headers, scope.get("query_string", b""))
        if token is None:
            raise ProxyError("invalid_api_key", "No API key provided. Use your Till scoped key.")
        try:
            key = self.open(token)
        except InvalidToken:
            raise ProxyError("invalid_api_key", "Incorrect API key provided.") from None
        return key

    def open(self, token: str) -> OpenKey:
        hit = self._tokens.get(token)
        if hit is not None:
            return hit
        claims = unseal(self.keyring, token)
        networks = tuple(ipaddress.ip_network(n, strict=False) for n in claims.ip_whitelist)
        key = OpenKey(claims, networks)
        if len(self._tokens) >= TOKEN_CACHE_SIZE:
            del self._tokens[next(iter(self._tokens))]
        self._tokens[token] = key
        return key

    def check(self, scope: Scope, headers: dict[bytes, bytes], key: OpenKey) -> None:
        """Refuse an expired key, or one used from outside its networks."""
        claims = key.claims
        if claims.expires_at is not None and time.time() >= claims.expires_at:
            raise ProxyError("key_expired", "This key has expired.")
        if key.networks:
            try:
                addr = ipaddress.ip_address(self.client_ip(scope, headers))
            except ValueError:
                addr = None
            if addr is None or not any(addr in net for net in key.networks):
                raise ProxyError("ip_not_allowed", "This key may not be used from your address.")

    def client_ip(self, scope: Scope, headers: dict[bytes, bytes]) -> str:
        peer = str((scope.get("client") or ("", 0))[0])
        forwarded = headers.get(b"x-forwarded-for")
        if not forwarded or not self._is_trusted(peer):
            return peer
        # The right-most address not added by one of our own proxies is the client.
        hops = [h.strip() for h in forwarded.decode("latin-1").split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else peer

    def _is_trusted(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)


def find_token(headers: dict[bytes, bytes], query_string: bytes) -> str | None:
    """The token where each provider's SDK puts it: a bearer token (OpenAI), x-api-key
    (Anthropic), x-goog-api-key or ?key= (Google)."""
    auth = headers.get(b"authorization")
    if auth is not None:
        scheme, _, value = auth.partition(b" ")
        if scheme.lower() == b"bearer" and value:
            return value.strip().decode("latin-1")
    for name in (b"x-api-key", b"x-goog-api-key"):
        header = headers.get(name)
        if header:
            return header.strip().decode("latin-1")
    if query_string and b"key=" in query_string:
        for k, v in parse_qsl(query_string.decode("latin-1")):
            if k == "key" and v:
                return v
    return None

"""Scoped tokens: a provider key and its limits, sealed so only the proxy can read them.

A token is ``till_sk_<key_id>.<sealed>``. The key id stays visible so the proxy can find
per-token state (usage, revocation) without decrypting anything; everything that must not
leak or be forged lives inside ``sealed``, an XChaCha20-Poly1305 box whose associated data
binds the visible key id and the keyring kid, so parts cannot be cut and pasted between
tokens. This module does no I/O: callers pass in the keyring and decide what to do with
the claims (expiry, IP and model checks depend on the request and the clock).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence
from typing import Any, Final

import msgspec
import nacl.bindings
import nacl.exceptions

__all__ = [
    "KEY_ID_LENGTH",
    "MAX_TOKEN_LENGTH",
    "PROVIDERS",
    "TOKEN_PREFIX",
    "TOKEN_VERSION",
    "InvalidToken",
    "Keyring",
    "KeyringError",
    "TokenClaims",
    "new_key_id",
    "new_tenant_id",
    "parse_token_key_id",
    "seal",
    "unseal",
]

TOKEN_PREFIX: Final = "till_sk_"  # noqa: S105 (a format marker, not a secret)
TOKEN_VERSION: Final = 1
# Above any token the admin API mints (~410 chars with a 164-char OpenAI project key; under
# 7,500 with every field at its bound: a 512-char key, 16 IPv6 networks, 64 model patterns of
# 64 chars), and within a single 8 KiB header line (nginx's default buffer), yet small enough
# that hostile input is rejected before we spend anything on it.
MAX_TOKEN_LENGTH: Final = 8192
KEY_ID_LENGTH: Final = 16
PROVIDERS: Final = frozenset({"openai", "anthropic", "google"})

_AAD_LABEL: Final = b"till_sk"
_KEY_BYTES: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES
_NONCE_BYTES: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
_TAG_BYTES: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
_KID_MAX: Final = 16
# version | kid_len | kid (>= 1 byte) | nonce | tag (empty plaintext is impossible anyway)
_MIN_SEALED_BYTES: Final = 1 + 1 + 1 + _NONCE_BYTES + _TAG_BYTES

# One regex does prefix, single dot, key id alphabet and sealed alphabet in a single C pass;
# fullmatch (not `$`) so a trailing newline cannot slip through.
_TOKEN_RE: Final = re.compile(r"till_sk_([a-z2-7]{16})\.([A-Za-z0-9_-]+)")
_KEY_ID_RE: Final = re.compile(r"[a-z2-7]{16}")
_KID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,16}")
_B64_STD_RE: Final = re.compile(r"[A-Za-z0-9+/]*")
_INVALID: Final = "invalid token"


class InvalidToken(Exception):
    """The only error `unseal` raises, with one fixed message, so callers cannot leak
    (and attackers cannot learn) which check failed."""

    def __init__(self, *_ignored: object) -> None:
        # Extra args are accepted (and dropped) only so pickling, which re-passes args, works.
        super().__init__(_INVALID)


class KeyringError(ValueError):
    """A malformed keyring spec; messages name the entry, never its key material."""


class TokenClaims(
    msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, omit_defaults=True
):
    """What a token grants. Array-like keeps the sealed blob (and so the token) short, and
    trailing fields left at their defaults are not written at all.

    Unknown trailing fields are refused rather than ignored: a field added later is likely a
    restriction, and an older proxy silently dropping it would fail open. So a token that uses
    a newer field is refused by an older proxy, and one that does not opens everywhere.
    """

    key_id: str
    tenant_id: str
    provider: str
    upstream_key: str
    ip_whitelist: tuple[str, ...] = ()
    expires_at: int | None = None
    allowed_models: tuple[str, ...] = ()
    # A child key's ancestors' key ids, parent first: each is checked and charged with it.
    parents: tuple[str, ...] = ()

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        # Claims end up in logs, tracebacks and assertion diffs; the upstream key must not.
        return [
            (name, _REDACTED if name == "upstream_key" else getattr(self, name))
            for name in self.__struct_fields__
        ]

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in self.__rich_repr__())
        return f"{type(self).__name__}({fields})"


class _Redacted:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<redacted>"


_REDACTED: Final = _Redacted()


_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(TokenClaims)


def _random_id() -> str:
    # 10 bytes = 80 bits = exactly 16 base32 chars, so no padding to strip.
    return base64.b32encode(os.urandom(10)).decode("ascii").lower()


def new_key_id() -> str:
    """A fresh token key id: unguessable, and safe to show in logs and dashboards."""
    return _random_id()


def new_tenant_id() -> str:
    """A fresh tenant id, same shape as key ids so one validator serves both."""
    return _random_id()


def _decode_b64_key(text: str) -> bytes | None:
    # Keys arrive from humans and shell tools: accept both alphabets, padded or not.
    s = text.strip().rstrip("=").replace("-", "+").replace("_", "/")
    if not _B64_STD_RE.fullmatch(s) or len(s) % 4 == 1:
        return None
    try:
        return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


class Keyring:
    """Sealing keys, newest first: seal with the newest, open with whichever kid the token
    names, so keys can rotate without invalidating tokens already handed out."""

    __slots__ = ("_by_kid", "_keys")

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise KeyringError("keyring is empty")
        by_kid: dict[bytes, bytes] = {}
        for i, (kid, key) in enumerate(keys, 1):
            if not isinstance(kid, str) or not _KID_RE.fullmatch(kid):
                raise KeyringError(f"keyring entry {i}: kid must be 1-16 chars of A-Za-z0-9_-")
            if not isinstance(key, bytes) or len(key) != _KEY_BYTES:
                raise KeyringError(f"keyring entry {i} ({kid}): key must be {_KEY_BYTES} bytes")
            kid_b = kid.encode("ascii")
            if kid_b in by_kid:
                raise KeyringError(f"keyring entry {i}: duplicate kid {kid!r}")
            by_kid[kid_b] = key
        self._keys: tuple[tuple[str, bytes], ...] = tuple((k, v) for k, v in keys)
        self._by_kid = by_kid

    @classmethod
    def parse(cls, spec: str) -> Keyring:
        """Read the env var format ``kid:base64key[,kid:base64key...]``."""
        if not isinstance(spec, str) or not spec.strip():
            raise KeyringError("keyring spec is empty")
        keys: list[tuple[str, bytes]] = []
        for i, entry in enumerate(spec.strip().split(","), 1):
            kid, sep, b64 = entry.strip().partition(":")
            if not sep:
                raise KeyringError(f"keyring entry {i} is not of the form kid:base64key")
            if not _KID_RE.fullmatch(kid):
                raise KeyringError(f"keyring entry {i}: kid must be 1-16 chars of A-Za-z0-9_-")
            key = _decode_b64_key(b64)
            if key is None:
                raise KeyringError(f"keyring entry {i} ({kid}): key is not valid base64")
            if len(key) != _KEY_BYTES:
                raise KeyringError(
                    f"keyring entry {i} ({kid}): key decodes to {len(key)} bytes,"
                    f" expected {_KEY_BYTES}"
                )
            keys.append((kid, key))
        return cls(keys)

    @classmethod
    def generate(cls, kid: str = "k1") -> Keyring:
        """A one-key keyring for first start, when no key was configured."""
        return cls([(kid, os.urandom(_KEY_BYTES))])

    def format(self) -> str:
        """The env var form, so a generated keyring can be written out and read back."""
        return ",".join(
            f"{kid}:{base64.urlsafe_b64encode(key).decode('ascii').rstrip('=')}"
            for kid, key in self._keys
        )

    def added(self, kid: str | None = None) -> Keyring:
        """This keyring with a new key at the end: tokens sealed with it open, but it seals
        nothing yet (the first step of a rolling rotation). ``kid`` defaults to the next free
        ``k<N>``."""
        if kid is None:
            n = len(self._keys) + 1
            while f"k{n}" in self.kids:
                n += 1
            kid = f"k{n}"
        return Keyring([*self._keys, (kid, os.urandom(_KEY_BYTES))])

    def promoted(self, kid: str) -> Keyring:
        """This keyring with ``kid`` in front: new tokens are sealed with it; tokens sealed
        with the others still open."""
        self._check_has(kid)
        return Keyring(sorted(self._keys, key=lambda entry: entry[0] != kid))

    def _check_has(self, kid: str) -> None:
        if kid not in self.kids:
            raise KeyringError(f"no key {kid!r} in the keyring (it has {', '.join(self.kids)})")

    def without(self, kid: str) -> Keyring:
        """This keyring with ``kid`` retired: tokens sealed with it no longer open."""
        self._check_has(kid)
        if kid == self.primary_kid:
            raise KeyringError(
                f"{kid!r} seals new tokens: promote another key first, then retire this one"
            )
        return Keyring([(k, v) for k, v in self._keys if k != kid])

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(kid for kid, _ in self._keys)

    @property
    def primary_kid(self) -> str:
        return self._keys[0][0]

    def __repr__(self) -> str:
        return f"Keyring(kids={self.kids!r})"

    def _primary(self) -> tuple[bytes, bytes]:
        kid, key = self._keys[0]
        return kid.encode("ascii"), key

    def _get(self, kid: bytes) -> bytes | None:
        return self._by_kid.get(kid)


def _aad(kid: bytes, key_id: str) -> bytes:
    # key_id has a fixed length and comes last, so this concatenation is unambiguous.
    return _AAD_LABEL + bytes((TOKEN_VERSION,)) + kid + key_id.encode("ascii")


def seal(keyring: Keyring, claims: TokenClaims) -> str:
    """Mint a token. Refuses claims that would yield a token `unseal` could never open."""
    if not _KEY_ID_RE.fullmatch(claims.key_id):
        raise ValueError("claims.key_id must be 16 chars of a-z2-7")
    if claims.provider not in PROVIDERS:
        raise ValueError(f"unknown provider {claims.provider!r}")
    if not all(_KEY_ID_RE.fullmatch(p) for p in claims.parents):
        raise ValueError("claims.parents must be key ids")
    kid, key = keyring._primary()
    nonce = os.urandom(_NONCE_BYTES)
    ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        _ENCODER.encode(claims), _aad(kid, claims.key_id), nonce, key
    )
    blob = bytes((TOKEN_VERSION, len(kid))) + kid + nonce + ciphertext
    sealed = base64.urlsafe_b64encode(blob).decode("ascii").rstrip("=")
    token = f"{TOKEN_PREFIX}{claims.key_id}.{sealed}"
    if len(token) > MAX_TOKEN_LENGTH:
        raise ValueError("claims too large for a token")
    return token


def _split(token: object) -> tuple[str, str] | None:
    # Cheapest checks first: hostile input (huge, binary, wrong type) never reaches the regex.
    if (
        not isinstance(token, str)
        or len(token) > MAX_TOKEN_LENGTH
        or not token.isascii()
        or not token.startswith(TOKEN_PREFIX)
    ):
        return None
    m = _TOKEN_RE.fullmatch(token)
    if m is None:
        return None
    return m.group(1), m.group(2)


def parse_token_key_id(token: str) -> str | None:
    """The visible key id, for logging and per-token lookups before (or without) crypto.

    Only syntax is checked: a returned id proves nothing about authenticity.
    """
    parts = _split(token)
    return None if parts is None else parts[0]


def _open(keyring: Keyring, token: object) -> TokenClaims | None:
    parts = _split(token)
    if parts is None:
        return None
    key_id, sealed = parts
    if len(sealed) % 4 == 1:
        return None
    blob = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
    # Non-zero trailing bits decode fine but re-encode differently; reject them so every
    # token has exactly one spelling.
    if base64.urlsafe_b64encode(blob).decode("ascii").rstrip("=") != sealed:
        return None
    if len(blob) < _MIN_SEALED_BYTES or blob[0] != TOKEN_VERSION:
        return None
    kid_len = blob[1]
    if not 1 <= kid_len <= _KID_MAX or len(blob) < 2 + kid_len + _NONCE_BYTES + _TAG_BYTES:
        return None
    kid = blob[2 : 2 + kid_len]
    key = keyring._get(kid)
    if key is None:
        return None
    nonce_end = 2 + kid_len + _NONCE_BYTES
    try:
        plaintext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            blob[nonce_end:], _aad(kid, key_id), blob[2 + kid_len : nonce_end], key
        )
        claims = _DECODER.decode(plaintext)
    except (nacl.exceptions.CryptoError, msgspec.DecodeError):
        return None
    if claims.key_id != key_id or claims.provider not in PROVIDERS:
        return None
    return claims


def unseal(keyring: Keyring, token: str) -> TokenClaims:
    """Open a token, or raise `InvalidToken` whatever the reason.

    Does not check expiry, IP or model: those depend on the request, not the token.
    """
    claims = _open(keyring, token)
    if claims is None:
        raise InvalidToken
    return claims

from __future__ import annotations

import base64
import os
import pickle
import re
import string
import time
from collections.abc import Callable
from typing import Any

import msgspec
import nacl.bindings
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from till.server.admin import MAX_ALLOWED_MODELS, MAX_MODEL_PATTERN
from till.tokens import (
    MAX_TOKEN_LENGTH,
    TOKEN_PREFIX,
    InvalidToken,
    Keyring,
    KeyringError,
    TokenClaims,
    new_key_id,
    new_tenant_id,
    parse_token_key_id,
    seal,
    unseal,
)

KEY1 = bytes(range(32))
KEY2 = bytes(range(100, 132))
# Standard base64 of this contains both '+' and '/', urlsafe both '-' and '_'.
KEY_PLUS_SLASH = bytes([0xFB, 0xFF, 0xBF] * 10 + [0xFB, 0xFF])
KR1 = Keyring([("k1", KEY1)])
KR2 = Keyring([("k2", KEY2)])
KR21 = Keyring([("k2", KEY2), ("k1", KEY1)])

UPSTREAM = "sk-proj-test.upstream.secret.01234567890"
B64URL = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"  # RFC 4648 order
B32 = "abcdefghijklmnopqrstuvwxyz234567"


def make_claims(**overrides: Any) -> TokenClaims:
    fields: dict[str, Any] = {
        "key_id": new_key_id(),
        "tenant_id": new_tenant_id(),
        "provider": "openai",
        "upstream_key": UPSTREAM,
        "ip_whitelist": ("10.0.0.1", "192.168.0.0/16"),
        "expires_at": 1_900_000_000,
        "allowed_models": ("gpt-4o", "gpt-4o-mini"),
    }
    fields.update(overrides)
    return TokenClaims(**fields)


CLAIMS = make_claims()
TOKEN = seal(KR1, CLAIMS)


def b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def unb64u(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def craft(
    plaintext: bytes,
    key_id: str,
    *,
    key: bytes = KEY1,
    kid: bytes = b"k1",
    version: int = 1,
    aad_key_id: str | None = None,
) -> str:
    """Build a token by hand, independently of `seal`, to reach checks after decryption."""
    nonce = os.urandom(24)
    aad = b"till_sk" + bytes([version]) + kid + (aad_key_id or key_id).encode()
    ct = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)
    return f"till_sk_{key_id}.{b64u(bytes([version, len(kid)]) + kid + nonce + ct)}"


def assert_invalid(keyring: Keyring, token: Any) -> None:
    with pytest.raises(InvalidToken) as info:
        unseal(keyring, token)
    exc = info.value
    assert str(exc) == "invalid token"
    assert exc.args == ("invalid token",)
    assert exc.__cause__ is None
    assert exc.__context__ is None


@pytest.fixture
def decrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real: Callable[..., bytes] = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt

    def spy(*args: Any) -> bytes:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(nacl.bindings, "crypto_aead_xchacha20poly1305_ietf_decrypt", spy)
    return calls


# --- ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [new_key_id, new_tenant_id])
def test_ids_format_and_unique(fn: Callable[[], str]) -> None:
    ids = {fn() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[a-z2-7]{16}", i) for i in ids)


# --- round trip --------------------------------------------------------------------------


def test_round_trip() -> None:
    assert TOKEN.startswith(TOKEN_PREFIX + CLAIMS.key_id + ".")
    assert unseal(KR1, TOKEN) == CLAIMS


@pytest.mark.parametrize("provider", ["openai", "anthropic", "google"])
def test_round_trip_defaults(provider: str) -> None:
    claims = TokenClaims(
        key_id=new_key_id(), tenant_id=new_tenant_id(), provider=provider, upstream_key="x"
    )
    opened = unseal(KR1, seal(KR1, claims))
    assert opened == claims
    assert opened.ip_whitelist == () and opened.expires_at is None
    assert opened.allowed_models == ()


def test_seal_is_randomized_and_hides_upstream_key() -> None:
    a, b = seal(KR1, CLAIMS), seal(KR1, CLAIMS)
    assert a != b
    assert UPSTREAM not in a
    assert unseal(KR1, a) == unseal(KR1, b) == CLAIMS


def test_invalid_token_message_is_fixed_and_picklable() -> None:
    assert str(InvalidToken("leak " + TOKEN)) == "invalid token"
    revived = pickle.loads(pickle.dumps(InvalidToken()))  # noqa: S301 (our own bytes)
    assert str(revived) == "invalid token"


def test_claims_frozen() -> None:
    with pytest.raises(AttributeError):
        CLAIMS.upstream_key = "other"  # type: ignore[misc]


def test_seal_rejects_unopenable_claims() -> None:
    with pytest.raises(ValueError, match="key_id"):
        seal(KR1, make_claims(key_id="UPPERCASEKEYID01"))
    with pytest.raises(ValueError, match="key_id"):
        seal(KR1, make_claims(key_id="short"))
    with pytest.raises(ValueError, match="provider"):
        seal(KR1, make_claims(provider="azure"))
    with pytest.raises(ValueError, match="too large"):
        seal(KR1, make_claims(allowed_models=("m" * 100,) * 80))


def test_the_largest_key_the_admin_api_takes_fits_in_a_token() -> None:
    # Every field at the bound CreateKey puts on it, with the longest kid a keyring takes.
    keyring = Keyring([("k" * 16, bytes(32))])
    claims = make_claims(
        upstream_key="x" * 512,
        ip_whitelist=("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",) * 16,
        expires_at=253402300799,  # 9999-12-31T23:59:59Z
        allowed_models=("m" * MAX_MODEL_PATTERN,) * MAX_ALLOWED_MODELS,
    )
    token = seal(keyring, claims)
    assert len(token) <= MAX_TOKEN_LENGTH
    # With the header's name, one line within nginx's default 8 KiB buffer.
    assert len(f"Authorization: Bearer {token}\r\n") <= 8192
    assert unseal(keyring, token) == claims


# --- malformed input ---------------------------------------------------------------------


def _alternatives(ch: str) -> set[str]:
    alts = set(B64URL + B32 + ".=+/ \n\x00é") | {chr(ord(ch) ^ 0x01)}
    alts.discard(ch)
    return alts


def test_every_single_char_change_is_rejected() -> None:
    tried = 0
    for i, ch in enumerate(TOKEN):
        for alt in _alternatives(ch):
            assert_invalid(KR1, TOKEN[:i] + alt + TOKEN[i + 1 :])
            tried += 1
    assert tried > 60 * len(TOKEN)


def test_every_truncation_is_rejected() -> None:
    for n in range(len(TOKEN)):
        assert_invalid(KR1, TOKEN[:n])
        assert_invalid(KR1, TOKEN[n + 1 :])


@pytest.mark.parametrize("suffix", ["A", "AA", "AAA", "AAAA", "=", "==", ".", "\n", " ", "\x00"])
def test_appended_chars_are_rejected(suffix: str) -> None:
    assert_invalid(KR1, TOKEN + suffix)


@pytest.mark.parametrize("prefix", [" ", "\n", "Bearer ", "x"])
def test_prepended_chars_are_rejected(prefix: str) -> None:
    assert_invalid(KR1, prefix + TOKEN)


def test_padding_is_rejected() -> None:
    sealed = TOKEN.split(".", 1)[1]
    padded = base64.urlsafe_b64encode(unb64u(sealed)).decode()
    assert padded != sealed  # the fixture token really needs padding
    assert_invalid(KR1, TOKEN.split(".", 1)[0] + "." + padded)


def test_standard_alphabet_is_rejected() -> None:
    claims = None
    for _ in range(200):  # find a token whose sealed part uses both '-' and '_'
        claims = make_claims()
        token = seal(KR1, claims)
        sealed = token.split(".", 1)[1]
        if "-" in sealed and "_" in sealed:
            break
    else:  # pragma: no cover
        pytest.fail("no token with - and _ found")
    assert_invalid(KR1, token.replace("-", "+"))
    assert_invalid(KR1, token.replace("_", "/"))
    assert_invalid(KR1, token.replace("-", "+").replace("_", "/"))
    assert unseal(KR1, token) == claims


def test_non_canonical_trailing_bits_are_rejected() -> None:
    head, sealed = TOKEN.split(".", 1)
    assert len(sealed) % 4 in (2, 3)
    last = B64URL.index(sealed[-1])
    unused_bits = 4 if len(sealed) % 4 == 2 else 2
    assert last % (1 << unused_bits) == 0
    for extra in range(1, 1 << unused_bits):
        forged = f"{head}.{sealed[:-1]}{B64URL[last + extra]}"
        assert unb64u(forged.split(".", 1)[1]) == unb64u(sealed)  # same bytes...
        assert_invalid(KR1, forged)  # ...still rejected


@pytest.mark.parametrize(
    "token",
    [
        "",
        "till_sk_",
        "till_sk_.",
        TOKEN.replace("till_sk_", "TILL_SK_"),
        TOKEN.replace("till_sk_", "till_pk_"),
        TOKEN.replace(".", ".."),
        TOKEN + "." + TOKEN.split(".", 1)[1],
        TOKEN.split(".", 1)[0],
        TOKEN.split(".", 1)[0] + ".",
        TOKEN.replace(".", ""),
        TOKEN.upper(),
        TOKEN[:10] + "é" + TOKEN[11:],
        TOKEN + "é",
        TOKEN[:-1] + "\uff21",  # fullwidth A
        TOKEN[:-1] + "\udcff",  # lone surrogate
        "till_sk_" + "a" * 15 + "." + TOKEN.split(".", 1)[1],
        "till_sk_" + "a" * 17 + "." + TOKEN.split(".", 1)[1],
        "till_sk_" + "a" * 15 + "1." + TOKEN.split(".", 1)[1],
        "till_sk_" + "a" * 16 + ".A",
        "till_sk_" + "a" * 16 + ".AAAAA",  # len % 4 == 1
        "till_sk_" + "a" * 16 + "." + "A" * 56,  # too short once decoded
    ],
)
def test_malformed_strings_are_rejected(token: str) -> None:
    assert_invalid(KR1, token)


@pytest.mark.parametrize(
    "value", [None, 0, 1.5, TOKEN.encode(), bytearray(TOKEN.encode()), [TOKEN], object()]
)
def test_non_str_input_is_rejected(value: Any) -> None:
    assert_invalid(KR1, value)
    assert parse_token_key_id(value) is None


def test_oversized_input_fails_fast(decrypt_calls: list[int]) -> None:
    huge = [
        "A" * 10_000_000,
        TOKEN_PREFIX + "a" * 16 + "." + "A" * 10_000_000,
        TOKEN + "é" * 5_000_000,
    ]
    for s in huge:
        start = time.perf_counter()
        with pytest.raises(InvalidToken):
            unseal(KR1, s)
        assert parse_token_key_id(s) is None
        assert time.perf_counter() - start < 0.05
    assert decrypt_calls == []


def test_max_length_boundary() -> None:
    head = TOKEN_PREFIX + "a" * 16 + "."
    just_over = head + "A" * (MAX_TOKEN_LENGTH + 1 - len(head))
    at_limit = head + "A" * (MAX_TOKEN_LENGTH - len(head))
    assert len(just_over) == MAX_TOKEN_LENGTH + 1
    assert parse_token_key_id(at_limit) == "a" * 16
    assert parse_token_key_id(just_over) is None


# --- binding and cut-and-paste -----------------------------------------------------------


def test_transplanted_sealed_part_is_rejected() -> None:
    other_id = new_key_id()
    sealed = TOKEN.split(".", 1)[1]
    assert_invalid(KR1, f"{TOKEN_PREFIX}{other_id}.{sealed}")


def test_tenant_tokens_with_swapped_parts_are_rejected() -> None:
    a = seal(KR1, make_claims(tenant_id=new_tenant_id(), upstream_key="sk-a"))
    b = seal(KR1, make_claims(tenant_id=new_tenant_id(), upstream_key="sk-b"))
    a_head, a_sealed = a.split(".")
    b_head, b_sealed = b.split(".")
    assert_invalid(KR1, f"{a_head}.{b_sealed}")
    assert_invalid(KR1, f"{b_head}.{a_sealed}")
    assert unseal(KR1, a).upstream_key == "sk-a"
    assert unseal(KR1, b).upstream_key == "sk-b"


def test_claims_key_id_must_match_visible_key_id() -> None:
    inner = new_key_id()
    outer = new_key_id()
    plaintext = msgspec.msgpack.encode(make_claims(key_id=inner))
    # AAD is computed over the visible id, so decryption succeeds; the claims check must catch it.
    assert_invalid(KR1, craft(plaintext, outer))
    assert unseal(KR1, craft(plaintext, inner)).key_id == inner


def test_crafted_token_with_unknown_provider_is_rejected() -> None:
    key_id = new_key_id()
    plaintext = msgspec.msgpack.encode(make_claims(key_id=key_id, provider="azure"))
    assert_invalid(KR1, craft(plaintext, key_id))


@pytest.mark.parametrize(
    "plaintext",
    [
        b"",
        b"\xc1",
        b"not msgpack at all",
        msgspec.msgpack.encode({"key_id": "x"}),
        msgspec.msgpack.encode(["a", "b"]),
        msgspec.msgpack.encode([1, 2, 3, 4]),
        msgspec.msgpack.encode(["aaaaaaaaaaaaaaaa", "t", "openai", "k", "not-a-list"]),
        msgspec.msgpack.encode(["aaaaaaaaaaaaaaaa", "t", "openai", "k", [], "soon"]),
        msgspec.msgpack.encode(["aaaaaaaaaaaaaaaa", "t", "openai", "k", [], None, [], "extra"]),
    ],
)
def test_authentic_but_undecodable_plaintext_is_rejected(plaintext: bytes) -> None:
    assert_invalid(KR1, craft(plaintext, "aaaaaaaaaaaaaaaa"))


def test_crafted_token_matches_seal_format() -> None:
    key_id = new_key_id()
    claims = make_claims(key_id=key_id)
    assert unseal(KR1, craft(msgspec.msgpack.encode(claims), key_id)) == claims


def test_wrong_key_same_kid_is_rejected() -> None:
    impostor = Keyring([("k1", KEY2)])
    assert_invalid(impostor, TOKEN)


# --- keyring rotation and pre-crypto rejection -------------------------------------------


def test_rotation() -> None:
    assert unseal(KR21, TOKEN) == CLAIMS
    assert_invalid(KR2, TOKEN)
    new = seal(KR21, CLAIMS)
    assert unb64u(new.split(".", 1)[1])[2:4] == b"k2"
    assert unseal(KR2, new) == CLAIMS
    assert_invalid(KR1, new)


def test_valid_token_calls_decrypt_once(decrypt_calls: list[int]) -> None:
    unseal(KR1, TOKEN)
    assert decrypt_calls == [1]


def test_unknown_kid_rejected_before_crypto(decrypt_calls: list[int]) -> None:
    assert_invalid(KR2, TOKEN)
    assert_invalid(KR1, craft(b"x", "aaaaaaaaaaaaaaaa", kid=b"k9"))
    assert decrypt_calls == []


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_version_rejected_before_crypto(decrypt_calls: list[int], version: int) -> None:
    head, sealed = TOKEN.split(".", 1)
    blob = bytearray(unb64u(sealed))
    blob[0] = version
    assert_invalid(KR1, f"{head}.{b64u(bytes(blob))}")
    assert_invalid(KR1, craft(msgspec.msgpack.encode(CLAIMS), CLAIMS.key_id, version=version))
    assert decrypt_calls == []


@pytest.mark.parametrize("kid_len", [0, 17, 200, 255])
def test_bad_kid_length_rejected_before_crypto(decrypt_calls: list[int], kid_len: int) -> None:
    head, sealed = TOKEN.split(".", 1)
    blob = bytearray(unb64u(sealed))
    blob[1] = kid_len
    assert_invalid(KR1, f"{head}.{b64u(bytes(blob))}")
    assert decrypt_calls == []


def test_short_blob_rejected_before_crypto(decrypt_calls: list[int]) -> None:
    head = TOKEN.split(".", 1)[0]
    for n in range(1 + 1 + 1 + 24 + 16):
        assert_invalid(KR1, f"{head}.{b64u(bytes([1, 2]) + b'k1' + bytes(max(0, n - 4)))}")
    assert decrypt_calls == []


# --- parse_token_key_id ------------------------------------------------------------------


def test_parse_token_key_id() -> None:
    assert parse_token_key_id(TOKEN) == CLAIMS.key_id
    # Syntax only: a forged token with a good shape still yields its id.
    assert parse_token_key_id(TOKEN_PREFIX + "a" * 16 + ".AAAA") == "a" * 16
    for bad in ["", TOKEN[:-1] + "=", TOKEN.replace(".", ""), TOKEN.upper(), TOKEN + ".x"]:
        assert parse_token_key_id(bad) is None


# --- keyring -----------------------------------------------------------------------------


def test_keyring_accessors_and_repr() -> None:
    assert KR21.kids == ("k2", "k1")
    assert KR21.primary_kid == "k2"
    text = repr(KR21) + str(KR21)
    for key in (KEY1, KEY2):
        assert base64.b64encode(key).decode() not in text
        assert b64u(key) not in text
        assert key.hex() not in text


def test_keyring_generate_and_format_round_trip() -> None:
    a, b = Keyring.generate(), Keyring.generate("rot-2")
    assert a.kids == ("k1",) and b.kids == ("rot-2",)
    assert a.format() != Keyring.generate().format()
    again = Keyring.parse(a.format())
    token = seal(a, CLAIMS)
    assert unseal(again, token) == CLAIMS
    both = Keyring.parse(f"{b.format()},{a.format()}")
    assert both.kids == ("rot-2", "k1")
    assert unseal(both, token) == CLAIMS
    assert Keyring.parse(both.format()).format() == both.format()
    with pytest.raises(KeyringError):
        Keyring.generate("bad kid")


@pytest.mark.parametrize(
    "encode",
    [
        lambda k: base64.b64encode(k).decode(),
        lambda k: base64.b64encode(k).decode().rstrip("="),
        lambda k: base64.urlsafe_b64encode(k).decode(),
        lambda k: base64.urlsafe_b64encode(k).decode().rstrip("="),
    ],
)
def test_keyring_parse_accepts_both_alphabets_and_padding(encode: Callable[[bytes], str]) -> None:
    text = encode(KEY_PLUS_SLASH)
    kr = Keyring.parse(f" A_b-9:{text} ,k1:{encode(KEY1)}\n")
    assert kr.kids == ("A_b-9", "k1")
    reference = Keyring([("A_b-9", KEY_PLUS_SLASH), ("k1", KEY1)])
    assert kr.format() == reference.format()
    assert unseal(kr, seal(reference, CLAIMS)) == CLAIMS


def test_key_plus_slash_fixture_exercises_both_alphabets() -> None:
    assert {"+", "/"} <= set(base64.b64encode(KEY_PLUS_SLASH).decode())


K1_STD = base64.b64encode(KEY1).decode()
SHORT = base64.b64encode(KEY1[:16]).decode()
LONG = base64.b64encode(KEY1 + b"\x00").decode()


@pytest.mark.parametrize(
    ("spec", "secret", "match"),
    [
        ("", None, "empty"),
        ("   ", None, "empty"),
        (",", None, "kid:base64key"),
        (f"k1:{K1_STD},", K1_STD, "entry 2"),
        (K1_STD, K1_STD, "kid:base64key"),
        (f"k1:{K1_STD[:-4]}!!!!", K1_STD[:-4], "base64"),
        (f"k1:{K1_STD[:-2]}*", K1_STD[:-2], "base64"),
        (f"k1:{K1_STD}A", K1_STD, "base64"),  # len % 4 == 1 once padding is stripped
        (f"k1:{K1_STD[:20]} {K1_STD[20:]}", K1_STD[:20], "base64"),
        (f"k1:{SHORT}", SHORT, "16 bytes"),
        (f"k1:{LONG}", LONG, "33 bytes"),
        ("k1:", None, "0 bytes"),
        (f"k1:{K1_STD},k1:{K1_STD}", K1_STD, "duplicate"),
        (f"k 1:{K1_STD}", K1_STD, "kid"),
        (f"k.1:{K1_STD}", K1_STD, "kid"),
        (f":{K1_STD}", K1_STD, "kid"),
        (f"{'k' * 17}:{K1_STD}", K1_STD, "kid"),
        (f"ké:{K1_STD}", K1_STD, "kid"),
        (f"{K1_STD}:k1", K1_STD, "kid"),  # swapped order must not echo the key
    ],
)
def test_keyring_parse_errors_never_leak_keys(spec: str, secret: str | None, match: str) -> None:
    with pytest.raises(KeyringError, match=match) as info:
        Keyring.parse(spec)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    if secret:
        assert secret not in message
        assert secret[:8] not in message
    assert K1_STD[:8] not in message


def test_keyring_parse_rejects_non_str() -> None:
    with pytest.raises(KeyringError):
        Keyring.parse(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "keys",
    [
        [],
        [("k1", KEY1[:31])],
        [("k1", KEY1 + b"\x00")],
        [("k1", KEY1.hex())],
        [("", KEY1)],
        [("k/1", KEY1)],
        [("k1", KEY1), ("k1", KEY2)],
    ],
)
def test_keyring_constructor_validates(keys: Any) -> None:
    with pytest.raises(KeyringError) as info:
        Keyring(keys)
    assert KEY1.hex()[:8] not in str(info.value)


# --- repr --------------------------------------------------------------------------------


def test_claims_repr_hides_upstream_key() -> None:
    for text in (repr(CLAIMS), str(CLAIMS), f"{CLAIMS}", f"{CLAIMS!r}", repr([CLAIMS])):
        assert UPSTREAM not in text
        assert "upstream_key=<redacted>" in text
        assert CLAIMS.key_id in text and CLAIMS.tenant_id in text
    rich = dict(CLAIMS.__rich_repr__())
    assert UPSTREAM not in repr(rich)
    assert rich["key_id"] == CLAIMS.key_id
    assert CLAIMS.upstream_key == UPSTREAM  # the value itself is intact


def test_failed_assertion_does_not_show_upstream_key() -> None:
    with pytest.raises(AssertionError) as info:
        assert unseal(KR1, TOKEN) == make_claims()
    assert UPSTREAM not in str(info.value)


# --- properties --------------------------------------------------------------------------

NEAR_MISS = st.builds(
    lambda key_id, sealed: f"{TOKEN_PREFIX}{key_id}.{sealed}",
    st.text(alphabet=B32, min_size=16, max_size=16),
    st.text(alphabet=B64URL, min_size=0, max_size=300),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(max_size=400),
        st.binary(max_size=400).map(lambda b: b.decode("latin-1")),
        st.binary(max_size=400).map(lambda b: b.decode("utf-8", "surrogateescape")),
        st.binary(max_size=300).map(lambda b: TOKEN_PREFIX + "a" * 16 + "." + b64u(b)),
        NEAR_MISS,
    )
)
def test_arbitrary_input_only_raises_invalid_token(value: str) -> None:
    assert_invalid(KR21, value)
    key_id = parse_token_key_id(value)
    assert key_id is None or re.fullmatch(r"[a-z2-7]{16}", key_id)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_single_char_mutation_never_opens(data: st.DataObject) -> None:
    i = data.draw(st.integers(min_value=0, max_value=len(TOKEN) - 1), label="position")
    ch = data.draw(
        st.one_of(st.sampled_from(B64URL + B32 + ".=+/"), st.characters()).filter(
            lambda c: c != TOKEN[i]
        ),
        label="replacement",
    )
    assert_invalid(KR21, TOKEN[:i] + ch + TOKEN[i + 1 :])


@settings(max_examples=100, deadline=None)
@given(
    st.text(alphabet=B32, min_size=16, max_size=16),
    st.text(max_size=50),
    st.sampled_from(["openai", "anthropic", "google"]),
    st.text(max_size=200),
    st.lists(st.text(max_size=40), max_size=5).map(tuple),
    st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**64 - 1)),
    st.lists(st.text(max_size=40), max_size=5).map(tuple),
)
def test_round_trip_property(
    key_id: str,
    tenant_id: str,
    provider: str,
    upstream_key: str,
    ips: tuple[str, ...],
    expires_at: int | None,
    models: tuple[str, ...],
) -> None:
    claims = TokenClaims(key_id, tenant_id, provider, upstream_key, ips, expires_at, models)
    try:
        token = seal(KR21, claims)
    except ValueError as exc:
        assert "too large" in str(exc)
        return
    assert len(token) <= MAX_TOKEN_LENGTH
    assert parse_token_key_id(token) == key_id
    assert unseal(KR21, token) == claims
    assert_invalid(KR2, seal(KR1, claims))

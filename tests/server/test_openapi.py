"""The admin API's OpenAPI document, and schemathesis fuzzing a live Till with it.

The document (GET /admin/openapi.json) must be valid OpenAPI and name every admin route Till
mounts. Fuzzed from it, no input may get a 500 or an answer the document does not describe
(P18), and none may change a counter: not the fuzzing tenant's, and nothing at all of another
tenant's, whose key ids the fuzzer is handed (P15).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.formats import unregister_string_format

from tests.conftest import UPSTREAM_KEY, Mock, Till, create_key, get_key
from till.server.admin import Admin
from till.server.openapi import IP_NETWORK
from till.tokens import Keyring

HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
# use_after_free is left out: a revoked key stays readable, its status saying so (WIRE_API.md).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    ignored_auth,
]
# Per operation and generation mode: about 180 cases a store, the file under 40 s on both.
MAX_EXAMPLES = 30
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
MESSAGES = [{"role": "user", "content": "Hello there"}]


def served(till: Till) -> httpx.Response:
    return httpx.get(f"{till.url}/admin/openapi.json", timeout=30)


@pytest.fixture
def document(till: Till) -> dict[str, Any]:
    resp = served(till)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    data: dict[str, Any] = resp.json()
    return data


def documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


# --- the document ---


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1.")
    schema = schemathesis.openapi.from_dict(document)
    schema.validate()  # raises on a document that breaks the OpenAPI 3.1 meta-schema
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} == documented(document)


def test_document_names_every_mounted_admin_route(document: dict[str, Any]) -> None:
    # The routes admin.py mounts: a new one without a schema fails here.
    routes = Admin(lambda: pytest.fail("no store needed"), Keyring.generate("t1")).routes()
    # Starlette answers HEAD on every GET route; OpenAPI leaves it implicit.
    mounted = {(m, r.path) for r in routes for m in r.methods or () if m != "HEAD"}
    assert mounted == documented(document)
    assert ("POST", "/admin/keys") in mounted


def test_document_needs_no_admin_key_and_holds_nothing_of_a_tenant(
    till: Till, admin_key: str
) -> None:
    with till.admin(admin_key) as client:
        key = create_key(client)
        authenticated = client.get("/admin/openapi.json")
    anonymous = served(till)
    garbage = httpx.get(
        f"{till.url}/admin/openapi.json", headers={"authorization": "Bearer nope"}, timeout=30
    )
    assert anonymous.status_code == authenticated.status_code == garbage.status_code == 200
    assert anonymous.content == authenticated.content == garbage.content
    for secret in (admin_key, key["id"], key["scopedKey"], key["tenantId"], UPSTREAM_KEY):
        assert secret not in anonymous.text
    # The security scheme is the admin key, as a bearer token, on every other route.
    doc = anonymous.json()
    assert doc["components"]["securitySchemes"]["adminKey"]["scheme"] == "bearer"
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                public = path == "/admin/openapi.json"
                assert operation.get("security") == ([] if public else None), (method, path)
    assert doc["security"] == [{"adminKey": []}]

    head = httpx.head(f"{till.url}/admin/openapi.json", timeout=30)
    assert head.status_code == 200 and head.content == b""
    post = httpx.post(f"{till.url}/admin/openapi.json", json={}, timeout=30)
    assert post.status_code == 405
    assert post.json()["error"]["code"] == "method_not_allowed"
    assert post.headers["allow"] == "GET, HEAD"


def test_create_key_schema_is_generated_from_the_decoder(document: dict[str, Any]) -> None:
    create = document["components"]["schemas"]["CreateKey"]
    assert create["additionalProperties"] is False
    assert create["required"] == ["provider", "upstream_key", "max_activations"]
    props = create["properties"]
    assert props["provider"]["enum"] == ["anthropic", "google", "openai"]
    assert (props["upstream_key"]["minLength"], props["upstream_key"]["maxLength"]) == (1, 512)
    assert props["max_activations"] == {"type": "integer", "minimum": 1, "maximum": 1_000_000_000}
    ip_list = props["ip_whitelist"]["anyOf"][0]
    assert ip_list["maxItems"] == 16 and ip_list["items"]["anyOf"] == IP_NETWORK["anyOf"]
    # Additions: expiry one way or the other, a model list, rate and concurrency limits.
    assert create["not"]["required"] == ["expires_at", "ttl_seconds"]
    assert props["expires_at"]["anyOf"][0]["format"] == "date-time"
    models = props["allowed_models"]["anyOf"][0]
    assert (models["minItems"], models["maxItems"], models["items"]["maxLength"]) == (1, 64, 64)
    entry = _python_pattern(models["items"]["pattern"])
    assert entry.fullmatch("gpt-4o*") and entry.fullmatch("models/gemini-2.5-flash")
    assert not any(entry.fullmatch(bad) for bad in ("gpt*4o", "a b", "gpt**", "gpt\n"))
    assert {"rpm", "max_concurrent", "ttl_seconds"} <= set(props)
    key = document["components"]["schemas"]["ScopedKey"]
    assert {"expiresAt", "allowedModels", "rpm", "maxConcurrent", "inFlight", "parentId"} <= set(
        key["properties"]
    )
    update = document["components"]["schemas"]["UpdateKey"]
    assert update["additionalProperties"] is False and update["minProperties"] == 1
    assert {"add_activations", "add_tokens", "add_spend_cents"} <= set(update["properties"])
    assert {"type": "null"} in update["properties"]["max_tokens"]["anyOf"]
    assert "upstream_key" not in update["properties"]
    assert "upstreamKey" not in key["properties"] and "upstream_key" not in key["properties"]
    assert set(key["required"]) == set(key["properties"])


def _python_pattern(pattern: str) -> re.Pattern[str]:
    # JSON Schema's `$` is the end of the string; Python's also matches before a final newline.
    assert pattern.endswith("$")
    return re.compile(pattern[:-1] + r"\Z")


CIDR_PATTERNS = [_python_pattern(s["pattern"]) for s in IP_NETWORK["anyOf"] if "pattern" in s]


@settings(max_examples=100, deadline=None, database=None)
@given(st.sampled_from(CIDR_PATTERNS).flatmap(st.from_regex))
def test_every_documented_network_is_one_the_server_reads(entry: str) -> None:
    ipaddress.ip_network(entry, strict=False)


@settings(max_examples=100, deadline=None, database=None)
@given(st.ip_addresses(), st.integers(min_value=0, max_value=128))
def test_every_network_in_python_notation_is_documented(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, prefix: int
) -> None:
    prefix %= address.max_prefixlen + 1
    for text in {str(address), address.exploded}:
        if "." in text and address.version == 6:
            continue  # embedded IPv4 (::ffff:1.2.3.4): read, but left out of the document
        entry = f"{text}/{prefix}"
        assert any(p.fullmatch(entry) for p in CIDR_PATTERNS), entry


# --- regressions: what schemathesis found ---


def test_whole_floats_are_integers(till: Till, admin_key: str) -> None:
    # JSON Schema's `integer` takes 5.0; msgspec, strict, used to answer it with a 422.
    with till.admin(admin_key) as client:
        key = create_key(client, max_activations=5.0, max_tokens=1e3, max_spend_cents=250.0)
        limits = [key[f] for f in ("maxActivations", "maxTokens", "maxSpendCents")]
        assert limits == [5, 1000, 250] and all(type(v) is int for v in limits)
        for value in (b"5.5", b'"5"', b"true", b"1e400", b"-1.0", b"1e10"):
            raw = b'{"provider":"openai","upstream_key":"sk-x","max_activations":%s}' % value
            resp = client.post(
                "/admin/keys", content=raw, headers={"content-type": "application/json"}
            )
            assert resp.status_code == 422, (value, resp.text)
            assert resp.json()["error"]["code"] == "validation_error"
        assert len(client.get("/admin/keys").json()["keys"]) == 1


# --- fuzzing ---


def chat(till: Till, scoped_key: str) -> None:
    resp = httpx.post(
        f"{till.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {scoped_key}"},
        json={"model": "gpt-4o", "messages": MESSAGES},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text


def tenant_state(client: httpx.Client) -> tuple[dict[str, Any], dict[str, Any]]:
    """The account and every key, each as GET /admin/keys/{id} shows it."""
    account: dict[str, Any] = client.get("/admin/account").json()["account"]
    keys = {k["id"]: get_key(client, k["id"]) for k in client.get("/admin/keys").json()["keys"]}
    return account, keys


USAGE = ("usedActivations", "usedTokens", "usedSpendCents", "heldTokens", "heldSpendCents")


def modes(operation: APIOperation) -> list[GenerationMode]:
    """Negative data too, where the operation takes any (a path parameter, a body)."""
    takes_input = bool(operation.body) or any(True for _ in operation.iter_parameters())
    return list(GenerationMode) if takes_input else [GenerationMode.POSITIVE]


@pytest.fixture
def fuzz_session() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def future_times() -> st.SearchStrategy[str]:
    """RFC 3339 times from a day ahead to year 9998, in any UTC offset, as the wire has them."""
    offsets = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
    soon = datetime.now(UTC).replace(tzinfo=None) + timedelta(days=1)
    return st.builds(
        lambda when, tz: when.replace(tzinfo=tz).isoformat().replace("+00:00", "Z"),
        st.datetimes(min_value=soon, max_value=datetime(9998, 12, 31)),
        offsets,
    )


@pytest.fixture
def future_date_times() -> Iterator[None]:
    """The one date-time the body takes (expires_at) must lie ahead, which JSON Schema cannot
    say: positive cases draw only such times, and negative ones still break the format."""
    schemathesis.openapi.format("date-time", future_times())
    yield
    unregister_string_format("date-time")


@pytest.mark.usefixtures("future_date_times")
def test_fuzzing_finds_no_error_and_changes_no_counter(
    till: Till, mock_upstream: Mock, document: dict[str, Any], fuzz_session: requests.Session
) -> None:
    victim_key = till.new_tenant("fuzz-victim")
    fuzzer_key = till.new_tenant("fuzzer")
    with till.admin(victim_key) as victim, till.admin(fuzzer_key) as fuzzer:
        victim_keys = [create_key(victim, name="a1"), create_key(victim, max_tokens=10_000)]
        own = create_key(fuzzer, name="own", max_spend_cents=100)
        for k in (*victim_keys, own):
            chat(till, k["scopedKey"])
        victim_before = tenant_state(victim)
        fuzzer_account, fuzzer_keys = tenant_state(fuzzer)
        assert all(k["usedActivations"] == 1 for k in victim_before[1].values())
        mock_upstream.reset()

        schema = schemathesis.openapi.from_dict(document)
        # The admin key goes on every request, as the CLI's -H would put it: schemathesis then
        # knows it for the credentials, and probes each 2xx without them and with bad ones.
        schema.config.update(base_url=till.url, headers={"Authorization": f"Bearer {fuzzer_key}"})
        schema.config.generation.update(with_security_parameters=False)
        foreign = {k["id"] for k in victim_keys}
        ids = [*foreign, own["id"]]
        examples: Counter[str] = Counter()
        statuses: Counter[tuple[str, int]] = Counter()

        def run(case: Case) -> None:
            response = case.call_and_validate(session=fuzz_session, checks=CHECKS)
            examples[case.operation.label] += 1
            statuses[(case.operation.label, response.status_code)] += 1
            if case.path_parameters.get("key_id") in foreign:
                # P15: another tenant's key is not there, whatever is asked of it.
                assert response.status_code == 404, response.text

        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in modes(operation):
                strategies = [operation.as_strategy(generation_mode=mode)]
                if mode is GenerationMode.POSITIVE and "{key_id}" in operation.path:
                    strategies += [
                        operation.as_strategy(generation_mode=mode, path_parameters={"key_id": i})
                        for i in ids
                    ]
                FUZZ_SETTINGS(given(st.one_of(strategies))(run))()

        # The fuzz reached every operation, and both sides of those that take input.
        assert set(examples) == {f"{m} {p}" for m, p in documented(document)}
        for label in (
            "POST /admin/keys",
            "GET /admin/keys/{key_id}",
            "DELETE /admin/keys/{key_id}",
        ):
            assert examples[label] >= 2 * MAX_EXAMPLES, examples
        assert statuses[("POST /admin/keys", 201)] and statuses[("POST /admin/keys", 422)]
        assert statuses[("GET /admin/keys/{key_id}", 200)]
        assert statuses[("DELETE /admin/keys/{key_id}", 404)]

        # Nothing was forwarded, and the other tenant is exactly as it was.
        assert mock_upstream.requests() == []
        assert tenant_state(victim) == victim_before
        # The fuzzer's own pre-existing key may be revoked, but nothing it used has changed.
        account, keys = tenant_state(fuzzer)
        assert account["activationsUsedThisMonth"] == fuzzer_account["activationsUsedThisMonth"]
        assert account["tenant"] == fuzzer_account["tenant"]
        for key_id, before in fuzzer_keys.items():
            assert {f: keys[key_id][f] for f in USAGE} == {f: before[f] for f in USAGE}
        created = set(keys) - set(fuzzer_keys)
        assert created, "the fuzzer created no key"
        for key_id in created:
            assert all(keys[key_id][f] == 0 for f in USAGE), keys[key_id]
        # An expired key gives its place back within a reaper round: keysUsed lies between the
        # keys neither revoked nor expired and those not revoked.
        live = sum(k["status"] != "revoked" for k in keys.values())
        unexpired = sum(k["status"] not in ("revoked", "expired") for k in keys.values())
        assert unexpired <= account["keysUsed"] <= live

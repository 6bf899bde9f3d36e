"""Every code snippet of the published SDK's description (the seed), run against a live Till.

The snippets below are copied verbatim. Only the placeholder keys are replaced by real ones, and
the base URL comes from TILL_URL, which the SDK and the OpenAI helper both read. The OpenAI
snippet names its base URL in the code, so that URL is replaced too. The seed leaves out the
arguments of the call in "Error handling" (`create_key(...)`), so the test fills them in.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY, Mock, Till
from tests.seed import (
    ACCOUNT,
    ASYNC,
    ERRORS,
    LIMITS,
    MULTI_PROVIDER,
    OPENAI_DIRECT,
    OPENAI_HELPER,
    QUICK_START,
    SEED,
    SNIPPETS,
)
from till import TillClient


def run(snippet: str, namespace: dict[str, Any], admin_key: str = "", scoped_key: str = "") -> None:
    """Execute a snippet with its placeholder keys (and written-out URL) replaced by real ones."""
    for placeholder, real in {
        '"https://api.till.ac/v1"': os.environ["TILL_URL"] + "/v1",
        '"till_admin_..."': admin_key,
        '"till_sk_abc123.xyz..."': scoped_key,
        '"sk-proj-..."': UPSTREAM_KEY,
        '"sk-..."': UPSTREAM_KEY,
        '"sk-ant-..."': "sk-ant-test-0123456789",
        '"AIza..."': "AIzaTest0123456789",
    }.items():
        snippet = snippet.replace(placeholder, repr(real))
    exec(compile(snippet, "<seed snippet>", "exec"), namespace)  # noqa: S102


def close(namespace: dict[str, Any]) -> None:
    client = namespace.get("client")
    if client is not None:
        client.close()


@pytest.fixture
def till_url(till: Till, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TILL_URL", till.url)
    monkeypatch.delenv("TILL_ADMIN_KEY", raising=False)
    return till.url


def test_the_snippets_here_are_the_seed_s() -> None:
    if not SEED.exists():
        pytest.skip(f"{SEED} is not in this checkout")

    def squash(text: str) -> str:
        return re.sub(r"\s+", " ", text).strip()

    seed = squash(SEED.read_text())
    for snippet in SNIPPETS:
        assert squash(snippet) in seed, snippet[:60]


def test_admin_snippets(
    till: Till, till_url: str, mock_upstream: Mock, capsys: pytest.CaptureFixture[str]
) -> None:
    admin_key = till.new_tenant("seed")
    ns: dict[str, Any] = {}
    try:
        run(QUICK_START, ns, admin_key)
        scoped_key, listing = capsys.readouterr().out.splitlines()
        assert scoped_key == ns["key"].scoped_key and scoped_key.startswith("till_sk_")
        assert listing == "research-agent: 0/50"
        assert ns["client"].get_key(ns["key"].id).status == "revoked"

        run(LIMITS, ns, admin_key)
        key = ns["key"]
        assert (key.max_activations, key.max_tokens, key.max_spend_cents) == (1000, 100_000, 500)
        assert key.metadata.get("name") == "budget-agent" and key.remaining_spend_cents == 500

        run(MULTI_PROVIDER, ns, admin_key)
        providers = [ns[n].provider for n in ("openai_key", "anthropic_key", "google_key")]
        assert providers == ["openai", "anthropic", "google"]
        assert all(ns[n].scoped_key for n in ("openai_key", "anthropic_key", "google_key"))

        # The budget key, used once through the OpenAI snippets, shows in the account.
        for snippet in (OPENAI_DIRECT, OPENAI_HELPER):
            oa: dict[str, Any] = {}
            run(snippet, oa, scoped_key=key.scoped_key)
            assert oa["response"].choices[0].message.content
            close(oa)
        assert ns["client"].get_key(key.id).used_activations == 2

        run(ACCOUNT, ns, admin_key)
        assert capsys.readouterr().out.splitlines() == [
            "Plan: pro",
            "Keys: 4/1000",
            "Activations this month: 2",
        ]

        # The seed elides the arguments; a refused one shows what the handler prints.
        run(ERRORS.replace("(...)", '("openai", "sk-proj-...", max_activations=0)'), ns)
        out = capsys.readouterr().out
        assert out.startswith("Error 422: [validation_error] ") and "max_activations" in out
        close(ns)
        with TillClient(admin_key="till_admin_wrong") as ns["client"]:
            run(ERRORS.replace("(...)", '("openai", "sk-proj-...", 5)'), ns)
        assert capsys.readouterr().out == "Error 401: [unauthorized] The admin key is not valid.\n"
    finally:
        close(ns)


def test_async_snippet(till: Till, till_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    admin_key = till.new_tenant("seed-async")
    failures: list[BaseException] = []

    def target() -> None:
        # asyncio.run, as the snippet calls it, wants a thread with no loop of its own.
        try:
            run(ASYNC, {}, admin_key)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(30)
    assert not failures, failures
    (scoped_key,) = capsys.readouterr().out.splitlines()
    assert scoped_key.startswith("till_sk_")
    keys = httpx.get(
        f"{till_url}/admin/keys", headers={"authorization": f"Bearer {admin_key}"}
    ).json()["keys"]
    assert [(k["maxActivations"], k["status"]) for k in keys] == [(50, "active")]

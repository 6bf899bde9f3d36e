"""The published SDK (till-ac 0.1.1 on PyPI) runs the product description's snippets against us.

It shares our import name ``till``, so it lives in its own virtual environment (``make compat``
makes ``.venv-compat`` and ``make test`` passes its interpreter in ``TILL_COMPAT_PYTHON``; run
alone, pytest makes it here). Each snippet below is the seed text verbatim; ``adapt`` only points
it at the server under test and swaps the placeholder keys, and fails if a swap finds nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ROOT, UPSTREAM_KEY, Mock, Till
from tests.seed import (
    ACCOUNT,
    ASYNC,
    ERRORS,
    LIMITS,
    MULTI_PROVIDER,
    OPENAI_DIRECT,
    OPENAI_HELPER,
    QUICK_START,
)

PUBLISHED = "till-ac==0.1.1"
COMPAT_VENV = ROOT / ".venv-compat"
ANTHROPIC_KEY = "sk-ant-test-upstream-0123456789abcdef"
GOOGLE_KEY = "AIzaTestUpstream0123456789abcdef"

# The seed's snippets (tests/seed.py), verbatim; CLIENT is the quick start's first lines.
CLIENT = QUICK_START.split("\n\n# Create")[0] + "\n"
OPENAI_PLAIN = OPENAI_DIRECT

# --- running them ---

# Defined ahead of every snippet: where the server is and which keys to use.
PRELUDE = """\
import dataclasses as _dc
import json as _json
import os as _os

import till as _published

# The published SDK from the compat venv, not our package (which also says 0.1.1 there).
assert _published.__version__ == "0.1.1", _published.__file__
assert "site-packages" in _published.__file__, _published.__file__
TILL_URL = _os.environ["TILL_URL"]
ADMIN_KEY = _os.environ.get("TILL_ADMIN_KEY", "")
SCOPED_KEY = _os.environ.get("TILL_SCOPED_KEY", "")
OPENAI_UPSTREAM = _os.environ["OPENAI_UPSTREAM"]
ANTHROPIC_UPSTREAM = _os.environ["ANTHROPIC_UPSTREAM"]
GOOGLE_UPSTREAM = _os.environ["GOOGLE_UPSTREAM"]
MAX_ACTIVATIONS = int(_os.environ.get("MAX_ACTIVATIONS", "5"))


def _result(**values):
    print("RESULT " + _json.dumps({k: _dc.asdict(v) for k, v in values.items()}))

"""

# The only changes made to a snippet: the server's URL and the keys.
SWAPS = [
    ('admin_key="till_admin_..."', "admin_key=ADMIN_KEY, base_url=TILL_URL"),
    ('patched_openai("till_sk_abc123.xyz...")',
     'patched_openai(SCOPED_KEY, base_url=f"{TILL_URL}/v1")'),
    ('"till_sk_abc123.xyz..."', "SCOPED_KEY"),
    ('"https://api.till.ac/v1"', 'f"{TILL_URL}/v1"'),
    ('"sk-proj-..."', "OPENAI_UPSTREAM"),
    ('"sk-ant-..."', "ANTHROPIC_UPSTREAM"),
    ('"AIza..."', "GOOGLE_UPSTREAM"),
    ('"sk-..."', "OPENAI_UPSTREAM"),
    # The seed elides the arguments; these fail with MAX_ACTIVATIONS=0 or a bad admin key.
    (
        "client.create_key(...)",
        "client.create_key(provider='openai', upstream_key=OPENAI_UPSTREAM, "
        "max_activations=MAX_ACTIVATIONS)",
    ),
]  # fmt: skip


def adapt(snippet: str) -> str:
    for placeholder, replacement in SWAPS:
        snippet = snippet.replace(placeholder, replacement)
    for placeholder in ("till_admin_...", '"till_sk_abc', "api.till.ac", '..."', "(...)"):
        assert placeholder not in snippet, f"{placeholder} left in:\n{snippet}"
    return snippet


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def clean_env() -> dict[str, str]:
    # No PYTHONPATH (it could bring our `till` in), no TILL_* or OPENAI_* settings.
    return {k: v for k, v in os.environ.items() if not k.startswith(("TILL_", "OPENAI_", "PYTHON"))}


def _pip_failure(result: subprocess.CompletedProcess[str]) -> str:
    return f"making {COMPAT_VENV} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


@pytest.fixture(scope="session")
def compat_python() -> str:
    """An interpreter with the published till-ac and the openai SDK, and not our package."""
    python = os.environ.get("TILL_COMPAT_PYTHON")
    if not python:
        python = str(COMPAT_VENV / "bin" / "python")
        stamp = COMPAT_VENV / ".installed"  # the Makefile's stamp: `make compat` agrees
        if not stamp.exists():
            for command in (
                [sys.executable, "-m", "venv", str(COMPAT_VENV)],
                [python, "-m", "pip", "install", "--quiet", PUBLISHED, "openai>=1.40"],
            ):
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=600, env=clean_env()
                )
                if done.returncode != 0:
                    pytest.fail(_pip_failure(done))
            stamp.touch()
    probe = subprocess.run(
        [python, "-c", "import openai, till; print(till.__version__, till.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env=clean_env(),
    )
    assert probe.returncode == 0, probe.stderr
    version, path = probe.stdout.split()
    assert version == "0.1.1" and "site-packages" in path, probe.stdout
    return python


class Snippets:
    """Runs adapted snippets with the published SDK against one server and tenant."""

    def __init__(self, python: str, till: Till, admin_key: str, workdir: Path) -> None:
        self.python = python
        self.till = till
        self.admin_key = admin_key
        self.workdir = workdir

    def run(self, *parts: str, epilogue: str = "", **env: str) -> tuple[list[str], dict[str, Any]]:
        """Lines printed by the snippets, and the RESULT the epilogue printed (if any)."""
        script = self.workdir / "snippet.py"
        script.write_text(PRELUDE + "".join(adapt(p) + "\n" for p in parts) + epilogue)
        full_env = clean_env()
        full_env.update(
            TILL_URL=self.till.url,
            TILL_ADMIN_KEY=self.admin_key,
            OPENAI_UPSTREAM=UPSTREAM_KEY,
            ANTHROPIC_UPSTREAM=ANTHROPIC_KEY,
            GOOGLE_UPSTREAM=GOOGLE_KEY,
        )
        full_env.update(env)
        done = subprocess.run(
            [self.python, str(script)],
            cwd=self.workdir,  # not the repo: `import till` must find the published SDK
            env=full_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
        for secret in (UPSTREAM_KEY, ANTHROPIC_KEY, GOOGLE_KEY):
            assert secret not in done.stdout + done.stderr
        lines = done.stdout.splitlines()
        results = [
            json.loads(line[len("RESULT ") :]) for line in lines if line.startswith("RESULT ")
        ]
        assert len(results) <= 1
        return [line for line in lines if not line.startswith("RESULT ")], (results or [{}])[0]


@pytest.fixture
def sdk(compat_python: str, till: Till, tmp_path: Path) -> Snippets:
    """A new pro tenant's snippets."""
    return Snippets(compat_python, till, till.new_tenant("sdk-pro", "pro"), tmp_path)


@pytest.fixture
def admin(till: Till, sdk: Snippets) -> Iterator[httpx.Client]:
    with till.admin(sdk.admin_key) as client:
        yield client


def server_key(admin: httpx.Client, key_id: str) -> dict[str, Any]:
    resp = admin.get(f"/admin/keys/{key_id}")
    assert resp.status_code == 200, resp.text
    key: dict[str, Any] = resp.json()["key"]
    return key


def assert_reads_the_same(sdk_key: dict[str, Any], ours: dict[str, Any], **changed: Any) -> None:
    """The SDK's parsed ScopedKey holds what GET /admin/keys/{id} says (scoped_key aside)."""
    expected = {camel(name): value for name, value in sdk_key.items() if name != "scoped_key"}
    expected.update(changed)
    assert {name: ours[name] for name in expected} == expected


def key_id_of(scoped_key: str) -> str:
    assert scoped_key.startswith("till_sk_") and "." in scoped_key, scoped_key
    return scoped_key.removeprefix("till_sk_").partition(".")[0]


# --- the snippets ---


def test_quick_start_creates_lists_and_revokes(sdk: Snippets, admin: httpx.Client) -> None:
    printed, result = sdk.run(QUICK_START, epilogue="_result(key=key)\n")
    created = result["key"]
    assert printed == [created["scoped_key"], "research-agent: 0/50"]
    assert key_id_of(created["scoped_key"]) == created["id"]
    assert created["metadata"] == {"name": "research-agent"}
    assert (created["provider"], created["max_activations"], created["status"]) == (
        "openai",
        50,
        "active",
    )
    # What the SDK read on creation is what the server holds; the revoke took.
    assert_reads_the_same(created, server_key(admin, created["id"]), status="revoked")
    assert admin.get("/admin/account").json()["account"]["keysUsed"] == 0


def test_openai_snippets_through_a_key_from_the_async_snippet(
    sdk: Snippets, admin: httpx.Client, mock_upstream: Mock
) -> None:
    printed, _ = sdk.run(ASYNC)
    (scoped_key,) = printed
    key = server_key(admin, key_id_of(scoped_key))
    assert (key["provider"], key["maxActivations"], key["metadata"]) == ("openai", 50, {})

    mock_upstream.reset()
    # Plain chat with the openai SDK, then with the helper, then a stream (not in the seed).
    stream = (
        'chunks = list(client.chat.completions.create(model="gpt-4o", '
        'messages=[{"role": "user", "content": "Hello"}], stream=True))\n'
        'print("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))\n'
    )
    show = "print(response.choices[0].message.content)\n"
    printed, _ = sdk.run(
        OPENAI_PLAIN, show, OPENAI_HELPER, show, stream, TILL_SCOPED_KEY=scoped_key
    )
    assert len(printed) == 3 and all(line.strip() for line in printed), printed
    seen = mock_upstream.requests()
    assert len(seen) == 3
    for request in seen:
        # The mock got the real key, never the scoped one.
        assert request["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"  # type: ignore[index]
    after = server_key(admin, key["id"])
    assert after["usedActivations"] == 3
    assert after["usedTokens"] == mock_upstream.totals()["total_tokens"] > 0

    printed, _ = sdk.run(CLIENT, ACCOUNT)
    assert printed == ["Plan: pro", "Keys: 1/1000", "Activations this month: 3"]


def test_token_and_dollar_limits(sdk: Snippets, admin: httpx.Client) -> None:
    _, result = sdk.run(CLIENT, LIMITS, epilogue="_result(key=key)\n")
    created = result["key"]
    assert (created["max_tokens"], created["max_spend_cents"]) == (100_000, 500)
    assert (created["max_activations"], created["metadata"]) == (1000, {"name": "budget-agent"})
    ours = server_key(admin, created["id"])
    assert_reads_the_same(created, ours)
    assert (ours["maxTokens"], ours["maxSpendCents"]) == (100_000, 500)


def test_multi_provider(sdk: Snippets, admin: httpx.Client) -> None:
    _, result = sdk.run(
        CLIENT,
        MULTI_PROVIDER,
        epilogue="_result(openai=openai_key, anthropic=anthropic_key, google=google_key)\n",
    )
    assert set(result) == {"openai", "anthropic", "google"}
    for provider, created in result.items():
        assert created["provider"] == provider
        assert created["max_activations"] == 100
        assert key_id_of(created["scoped_key"]) == created["id"]
        assert_reads_the_same(created, server_key(admin, created["id"]))
    listed = admin.get("/admin/keys").json()["keys"]
    assert sorted(k["provider"] for k in listed) == ["anthropic", "google", "openai"]
    assert admin.get("/admin/account").json()["account"]["keysUsed"] == 3


def test_account_info(sdk: Snippets) -> None:
    printed, _ = sdk.run(CLIENT, ACCOUNT)
    assert printed == ["Plan: pro", "Keys: 0/1000", "Activations this month: 0"]


def test_error_handling_invalid_request(sdk: Snippets, admin: httpx.Client) -> None:
    printed, _ = sdk.run(CLIENT, ERRORS, MAX_ACTIVATIONS="0")
    (line,) = printed
    assert line.startswith("Error 422: [validation_error] ")
    assert "max_activations" in line
    assert admin.get("/admin/keys").json()["keys"] == []


def test_error_handling_bad_admin_key(sdk: Snippets, admin: httpx.Client) -> None:
    wrong = sdk.admin_key[:-1] + ("A" if sdk.admin_key[-1] != "A" else "B")
    printed, _ = sdk.run(CLIENT, ERRORS, TILL_ADMIN_KEY=wrong)
    assert printed == ["Error 401: [unauthorized] The admin key is not valid."]
    assert admin.get("/admin/keys").json()["keys"] == []


def test_error_handling_free_plan_key_limit(compat_python: str, till: Till, tmp_path: Path) -> None:
    free = Snippets(compat_python, till, till.new_tenant("sdk-free", "free"), tmp_path)
    with till.admin(free.admin_key) as admin:
        for _ in range(10):
            body = {"provider": "openai", "upstream_key": UPSTREAM_KEY, "max_activations": 1}
            assert admin.post("/admin/keys", json=body).status_code == 201
    printed, _ = free.run(CLIENT, ERRORS)
    (line,) = printed
    assert line.startswith("Error 403: [max_keys_reached] "), line
    printed, _ = free.run(CLIENT, ACCOUNT)
    assert printed == ["Plan: free", "Keys: 10/10", "Activations this month: 0"]


def test_published_sdk_and_ours_read_keys_and_account_identically(
    sdk: Snippets, mock_upstream: Mock
) -> None:
    """Both SDKs against one server: every field the published models have reads the same."""
    from till import TillClient as OurClient

    with OurClient(admin_key=sdk.admin_key, base_url=sdk.till.url) as ours:
        # With every field added since 0.1: the published models must still read the key.
        limited = ours.create_key(
            "openai", UPSTREAM_KEY, 7, name="both", max_tokens=5000, max_spend_cents=300,
            ip_whitelist=["127.0.0.1"], metadata={"team": "x"}, ttl_seconds=3600,
            allowed_models=["gpt-4o*"], rpm=60, max_concurrent=4,
        )  # fmt: skip
        plain = ours.create_key("anthropic", ANTHROPIC_KEY, 3)
        client = openai.OpenAI(
            api_key=limited.scoped_key, base_url=f"{sdk.till.url}/v1", max_retries=0
        )
        with client:
            client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "Hi"}]
            )
        _, published = sdk.run(
            CLIENT,
            "A, B = _os.environ['A'], _os.environ['B']\n",
            "keys = {k.id: k for k in client.list_keys()}\n",
            "account = client.account()\n",
            epilogue="_result(a=keys[A], b=keys[B], account=account)\n",
            A=limited.id,
            B=plain.id,
        )
        for key_id, name in ((limited.id, "a"), (plain.id, "b")):
            mine = dataclasses.asdict(ours.get_key(key_id))
            theirs = published[name]
            assert {field: mine[field] for field in theirs} == theirs
        account = dataclasses.asdict(ours.account())
        theirs_account = published["account"]
        assert {f: account[f] for f in theirs_account if f != "tenant"} == {
            f: v for f, v in theirs_account.items() if f != "tenant"
        }
        assert {f: account["tenant"][f] for f in theirs_account["tenant"]} == theirs_account[
            "tenant"
        ]
    assert published["a"]["used_activations"] == 1 and published["a"]["used_tokens"] > 0

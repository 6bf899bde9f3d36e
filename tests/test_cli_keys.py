"""`till keys ...` and `till account` against a live Till: output, exit codes, help.

Most runs call `till.cli.main` in this process (fast); one runs the installed `till` command.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import BIN, UPSTREAM_KEY, Till, free_port
from till.cli import build_parser, main


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def last_line(self) -> str:
        return self.out.rstrip("\n").splitlines()[-1]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Iterator[object]:
    def run(*args: str) -> Run:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: --help and usage errors
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return Run(code, out, err)

    yield run


@pytest.fixture(scope="module")
def admin_key(till: Till) -> str:
    return till.new_tenant("cli")


def test_keys_and_account(
    till: Till, admin_key: str, cli: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = cli  # type: ignore[assignment]
    auth = ("--url", till.url, "--admin-key", admin_key)
    monkeypatch.setenv("REAL_KEY", UPSTREAM_KEY)
    created = run(
        "keys", "create", *auth, "--provider", "openai", "--upstream-key-env", "REAL_KEY",
        "--max-activations", "5", "--name", "cli-agent", "--max-tokens", "1000",
        "--max-spend-cents", "300", "--ip", "127.0.0.1", "10.0.0.0/8", "--metadata", "team=blue",
    )  # fmt: skip
    assert created.code == 0, created.err
    token = created.last_line
    assert token.startswith("till_sk_") and created.out.count(token) == 1
    assert "shown once" in created.err and token not in created.err
    assert UPSTREAM_KEY not in created.out + created.err
    assert "activations:   0 / 5 (5 left)" in created.out
    assert "spend (cents): 0 / 300 (300 left)" in created.out
    key_id = created.out.split()[1]

    listed = run("keys", "list", *auth)
    assert listed.code == 0 and listed.out.startswith("ID ")
    (row,) = [line for line in listed.out.splitlines() if line.startswith(key_id)]
    assert row.split()[1:5] == ["cli-agent", "openai", "active", "0/5"]
    keys = json.loads(run("keys", "list", *auth, "--json").out)
    (key,) = [k for k in keys if k["id"] == key_id]
    assert key["metadata"] == {"team": "blue", "name": "cli-agent"}
    assert key["ipWhitelist"] == ["127.0.0.1/32", "10.0.0.0/8"] and key["scopedKey"] is None
    assert (key["maxTokens"], key["remainingTokens"], key["maxSpendCents"]) == (1000, 1000, 300)

    got = run("keys", "get", *auth, key_id)
    assert got.code == 0 and "name:          cli-agent" in got.out and token not in got.out
    assert json.loads(run("keys", "get", *auth, key_id, "--json").out)["status"] == "active"

    # The environment stands in for --url and --admin-key.
    monkeypatch.setenv("TILL_URL", till.url)
    monkeypatch.setenv("TILL_ADMIN_KEY", admin_key)
    account = run("account")
    assert account.code == 0 and "plan:        pro (active)" in account.out
    assert json.loads(run("account", "--json").out)["tenant"]["maxKeys"] == 1000

    revoked = run("keys", "revoke", key_id, "--json")
    assert revoked.code == 0 and json.loads(revoked.out)["status"] == "revoked"
    assert run("keys", "get", key_id).out.splitlines()[3] == "status:        revoked"


def test_create_with_json_prints_only_json(till: Till, admin_key: str, cli: object) -> None:
    run = cli  # type: ignore[assignment]
    created = run(
        "keys", "create", "--url", till.url, "--admin-key", admin_key, "--json",
        "--provider", "google", "--upstream-key", "AIzaTest0123", "--max-activations", "2",
    )  # fmt: skip
    assert created.code == 0, created.err
    key = json.loads(created.out)
    assert key["scopedKey"].startswith("till_sk_") and key["provider"] == "google"
    assert "shown once" in created.err


def test_create_with_expiry_models_and_rate_limits(till: Till, admin_key: str, cli: object) -> None:
    run = cli  # type: ignore[assignment]
    auth = ("--url", till.url, "--admin-key", admin_key)
    created = run(
        "keys", "create", *auth, "--provider", "openai", "--upstream-key", UPSTREAM_KEY,
        "--max-activations", "9", "--ttl", "3600", "--model", "gpt-4o*", "o3-mini",
        "--rpm", "60", "--max-concurrent", "4",
    )  # fmt: skip
    assert created.code == 0, created.err
    assert "models:        gpt-4o*, o3-mini" in created.out
    assert "rate:          60 per minute" in created.out
    assert "concurrency:   0 / 4 in flight" in created.out
    (expires,) = [line for line in created.out.splitlines() if line.startswith("expires:")]
    assert expires.split()[1].endswith(".000Z")
    key_id = created.out.split()[1]
    shown = json.loads(run("keys", "get", *auth, key_id, "--json").out)
    assert shown["allowedModels"] == ["gpt-4o*", "o3-mini"]
    assert (shown["rpm"], shown["maxConcurrent"], shown["inFlight"]) == (60, 4, 0)
    assert shown["expiresAt"] == expires.split()[1]

    at = run(
        "keys", "create", *auth, "--json", "--provider", "openai", "--upstream-key", "sk-x",
        "--max-activations", "1", "--expires-at", "2031-01-02T03:04:05+01:00",
    )  # fmt: skip
    assert json.loads(at.out)["expiresAt"] == "2031-01-02T02:04:05.000Z"
    plain = run("keys", "get", *auth, json.loads(at.out)["id"])
    assert "rate:          no limit" in plain.out and "models:        any" in plain.out
    # The server's refusal names the field.
    past = run(
        "keys", "create", *auth, "--provider", "openai", "--upstream-key", "sk-x",
        "--max-activations", "1", "--expires-at", "2001-01-01T00:00:00Z",
    )  # fmt: skip
    assert past.code == 1 and past.err.startswith("till: [validation_error] expires_at")


def test_the_installed_command_reads_the_key_from_stdin(till: Till, admin_key: str) -> None:
    env = {**till.env, "TILL_URL": till.url, "TILL_ADMIN_KEY": admin_key}
    result = subprocess.run(
        [str(BIN / "till"), "keys", "create", "--provider", "openai", "--upstream-key-stdin",
         "--max-activations", "3"],
        input=UPSTREAM_KEY + "\n", env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("till_sk_")
    assert "shown once" in result.stderr and UPSTREAM_KEY not in result.stdout + result.stderr


def test_errors_from_till_exit_1(till: Till, admin_key: str, cli: object) -> None:
    run = cli  # type: ignore[assignment]
    bad = run("keys", "list", "--url", till.url, "--admin-key", "till_admin_wrong")
    assert (bad.code, bad.out) == (1, "")
    assert bad.err == "till: [unauthorized] The admin key is not valid.\n"
    missing = run("keys", "revoke", "--url", till.url, "--admin-key", admin_key, "a" * 16)
    assert missing.code == 1 and missing.err.startswith("till: [not_found] ")


def test_unreachable_till_exits_3(cli: object) -> None:
    run = cli  # type: ignore[assignment]
    down = run("account", "--url", f"http://127.0.0.1:{free_port()}", "--admin-key", "till_admin_x")
    assert down.code == 3 and down.err.startswith("till: [connection_error] Could not reach Till")


@pytest.mark.parametrize(
    "args",
    [
        ["keys"],
        ["keys", "create", "--provider", "openai", "--upstream-key", "sk-x"],
        ["keys", "create", "--provider", "openai", "--max-activations", "1"],
        ["keys", "create", "--provider", "mistral", "--upstream-key", "k",
         "--max-activations", "1"],
        ["keys", "create", "--provider", "openai", "--upstream-key", "k", "--max-activations", "0"],
        ["keys", "create", "--provider", "openai", "--upstream-key", "k", "--max-activations", "1",
         "--metadata", "novalue"],
        ["keys", "create", "--provider", "openai", "--upstream-key", "k", "--upstream-key-stdin",
         "--max-activations", "1"],
        ["keys", "create", "--provider", "openai", "--upstream-key-env", "TILL_TEST_UNSET",
         "--max-activations", "1"],
        ["keys", "create", "--provider", "openai", "--upstream-key", "k", "--max-activations", "1",
         "--ttl", "60", "--expires-at", "2031-01-01T00:00:00Z"],
        ["keys", "create", "--provider", "openai", "--upstream-key", "k", "--max-activations", "1",
         "--rpm", "0"],
        ["keys", "create", "--provider", "openai", "--upstream-key", "k", "--max-activations", "1",
         "--max-concurrent", "x"],
        ["keys", "get"],
        ["account", "--admin-key", ""],
        ["account", "--admin-key", "till_admin_x", "--url", "ftp://example.com"],
    ],
)  # fmt: skip
def test_usage_errors_exit_2(args: list[str], cli: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TILL_ADMIN_KEY", raising=False)
    monkeypatch.delenv("TILL_TEST_UNSET", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    result = cli(*args)  # type: ignore[operator]
    assert result.code == 2 and result.out == ""
    assert result.err.startswith(("usage: till", "till: "))


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def test_help_for_every_command(cli: object) -> None:
    run = cli  # type: ignore[assignment]
    paths = list(commands(build_parser()))
    for expected in [("keys", "create"), ("keys", "list"), ("keys", "get"), ("keys", "revoke"),
                     ("account",)]:  # fmt: skip
        assert expected in paths
    for path in paths:
        result = run(*path, "--help")
        assert result.code == 0, path
        assert result.out.startswith(f"usage: {' '.join(('till', *path))}"), path

"""`till keys update|top-up` (admin) and `till key info|revoke|child` (the scoped key's holder)
against a live Till: output, exit codes, and no token in stderr.

Most runs call `till.cli.main` in this process (fast); one runs the installed `till` command.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import openai
import pytest

from tests.conftest import BIN, UPSTREAM_KEY, Till, free_port
from till import TillClient
from till.cli import main

MESSAGES = [{"role": "user", "content": "Hello there"}]


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def last_line(self) -> str:
        return self.out.rstrip("\n").splitlines()[-1]

    def row(self, label: str) -> str:
        """The value printed after ``label:`` in a key's view."""
        (line,) = [x for x in self.out.splitlines() if x.startswith(f"{label}:")]
        return line.split(":", 1)[1].strip()


Cli = Callable[..., Run]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Iterator[Cli]:
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
    return till.new_tenant("cli-lifecycle")


@pytest.fixture
def admin(till: Till, admin_key: str) -> Iterator[TillClient]:
    with TillClient(admin_key=admin_key, base_url=till.url) as client:
        yield client


def new_key(admin: TillClient, max_activations: int = 5, **options: object) -> tuple[str, str]:
    key = admin.create_key("openai", UPSTREAM_KEY, max_activations, **options)  # type: ignore[arg-type]
    assert key.scoped_key is not None
    return key.id, key.scoped_key


def chat(till: Till, token: str) -> None:
    with openai.OpenAI(api_key=token, base_url=f"{till.url}/v1", max_retries=0) as oa:
        oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]


# --- till keys update / top-up ---


def test_keys_update(till: Till, admin_key: str, admin: TillClient, cli: Cli) -> None:
    auth = ("--url", till.url, "--admin-key", admin_key)
    key_id, _ = new_key(admin, name="old", metadata={"team": "blue"}, max_tokens=1000, rpm=9)
    renamed = cli(
        "keys", "update", *auth, key_id, "--name", "new", "--max-activations", "8",
        "--max-spend-cents", "300", "--max-concurrent", "2",
    )  # fmt: skip
    assert renamed.code == 0, renamed.err
    assert renamed.row("name") == "new" and renamed.row("activations") == "0 / 8 (8 left)"
    assert renamed.row("spend (cents)") == "0 / 300 (300 left)"
    assert renamed.row("concurrency") == "0 / 2 in flight"
    assert json.loads(renamed.row("metadata")) == {"team": "blue", "name": "new"}

    lifted = cli(
        "keys", "update", *auth, key_id, "--remove-limit", "max-tokens", "rpm",
        "--add-activations", "2", "--json",
    )  # fmt: skip
    assert lifted.code == 0, lifted.err
    shown = json.loads(lifted.out)
    assert (shown["maxTokens"], shown["rpm"], shown["maxActivations"]) == (None, None, 10)
    assert shown["maxSpendCents"] == 300 and shown["scopedKey"] is None
    # The SDK's spelling of a limit works too.
    spend = cli("keys", "update", *auth, key_id, "--remove-limit", "max_spend_cents", "--json")
    assert spend.code == 0 and json.loads(spend.out)["maxSpendCents"] is None

    meta = cli("keys", "update", *auth, key_id, "--metadata", "team=red", "--json")
    assert json.loads(meta.out)["metadata"] == {"team": "red"}
    assert admin.get_key(key_id).metadata == {"team": "red"}


def test_keys_top_up_revives_an_exhausted_key(
    till: Till, admin_key: str, admin: TillClient, cli: Cli
) -> None:
    auth = ("--url", till.url, "--admin-key", admin_key)
    key_id, token = new_key(admin, 1, max_tokens=50_000)
    chat(till, token)
    assert cli("keys", "get", *auth, key_id).row("status") == "exhausted"
    with pytest.raises(openai.APIStatusError) as spent:
        chat(till, token)
    assert spent.value.status_code == 402

    topped = cli("keys", "top-up", *auth, key_id, "--activations", "3", "--tokens", "1000")
    assert topped.code == 0, topped.err
    assert topped.row("status") == "active" and topped.row("activations") == "1 / 4 (3 left)"
    used = admin.get_key(key_id).used_tokens
    assert topped.row("tokens") == f"{used} / 51000 ({51_000 - used} left)"
    chat(till, token)
    as_json = cli("keys", "top-up", *auth, key_id, "--activations", "1", "--json")
    assert json.loads(as_json.out)["remainingActivations"] == 3
    assert token not in topped.out + topped.err + as_json.out


def test_keys_update_errors_exit_1(till: Till, admin_key: str, admin: TillClient, cli: Cli) -> None:
    auth = ("--url", till.url, "--admin-key", admin_key)
    key_id, _ = new_key(admin)
    no_limit = cli("keys", "top-up", *auth, key_id, "--spend-cents", "10")
    assert no_limit.code == 1 and no_limit.err.startswith("till: [validation_error] ")
    both = cli("keys", "update", *auth, key_id, "--max-activations", "9", "--add-activations", "1")
    assert both.code == 1 and both.err.startswith("till: [validation_error] ")
    missing = cli("keys", "update", *auth, "a" * 16, "--name", "x")
    assert (missing.code, missing.out) == (1, "")
    assert missing.err.startswith("till: [not_found] ")
    admin.revoke_key(key_id)
    revoked = cli("keys", "top-up", *auth, key_id, "--activations", "1")
    assert (revoked.code, revoked.out) == (1, "")
    assert revoked.err.startswith("till: [already_revoked] ")
    assert admin.get_key(key_id).max_activations == 5
    closed = f"http://127.0.0.1:{free_port()}"
    down = cli(
        "keys", "top-up", "--url", closed, "--admin-key", admin_key, key_id, "--activations", "1"
    )
    assert down.code == 3 and down.err.startswith("till: [connection_error] ")
    assert admin_key not in down.err + revoked.err + missing.err


# --- till key (the holder) ---


def test_key_info_and_revoke(
    till: Till, admin: TillClient, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_id, token = new_key(admin, 4, name="agent", metadata={"team": "blue"})
    monkeypatch.setenv("TILL_SCOPED_KEY", token)
    monkeypatch.delenv("TILL_ADMIN_KEY", raising=False)
    info = cli("key", "info", "--url", till.url)
    assert info.code == 0, info.err
    assert (info.row("id"), info.row("name"), info.row("status")) == (key_id, "agent", "active")
    assert info.row("metadata") == '{"name": "agent"}'  # the holder sees only the name
    chat(till, token)
    shown = json.loads(cli("key", "info", "--url", till.url, "--json").out)
    assert (shown["usedActivations"], shown["remainingActivations"]) == (1, 3)
    assert shown["scopedKey"] is None and shown["parentId"] is None

    # Another variable, named by --scoped-key-env; TILL_URL stands in for --url.
    monkeypatch.delenv("TILL_SCOPED_KEY")
    monkeypatch.setenv("AGENT_KEY", token)
    monkeypatch.setenv("TILL_URL", till.url)
    revoked = cli("key", "revoke", "--scoped-key-env", "AGENT_KEY")
    assert revoked.code == 0, revoked.err
    assert revoked.row("status") == "revoked" and admin.get_key(key_id).status == "revoked"
    again = cli("key", "revoke", "--scoped-key-env", "AGENT_KEY")
    assert again.code == 0 and again.row("status") == "revoked"
    gone = cli("key", "info", "--scoped-key-env", "AGENT_KEY")
    assert (gone.code, gone.out) == (1, "")
    assert gone.err.startswith("till: [key_revoked] ")
    for run in (info, revoked, again, gone):
        assert token not in run.out + run.err


def test_key_child(
    till: Till, admin: TillClient, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent_id, token = new_key(admin, 5, max_tokens=10_000, allowed_models=["gpt-4o*"])
    monkeypatch.setenv("TILL_SCOPED_KEY", token)
    holder = ("--url", till.url)
    made = cli(
        "key", "child", *holder, "--max-activations", "2", "--name", "sub", "--max-tokens",
        "3000", "--ttl-seconds", "600", "--allowed-model", "gpt-4o",
    )  # fmt: skip
    assert made.code == 0, made.err
    child = made.last_line
    assert child.startswith("till_sk_") and child != token and made.out.count(child) == 1
    assert "shown once" in made.err and child not in made.err and token not in made.out + made.err
    assert made.row("parent") == parent_id and made.row("models") == "gpt-4o"
    assert made.row("activations") == "0 / 2 (2 left)" and made.row("expires") != "never"
    child_id = made.out.split()[1]

    # The child's token works, and counts against the parent.
    chat(till, child)
    assert admin.get_key(parent_id).used_activations == 1
    monkeypatch.setenv("CHILD_KEY", child)
    seen = json.loads(cli("key", "info", *holder, "--scoped-key-env", "CHILD_KEY", "--json").out)
    assert (seen["id"], seen["parentId"], seen["usedActivations"]) == (child_id, parent_id, 1)

    as_json = cli("key", "child", *holder, "--max-activations", "1", "--json")
    assert as_json.code == 0 and json.loads(as_json.out)["scopedKey"].startswith("till_sk_")
    assert json.loads(as_json.out)["parentId"] == parent_id and "shown once" in as_json.err

    over = cli("key", "child", *holder, "--max-activations", "50")
    assert (over.code, over.out) == (1, "")
    assert over.err.startswith("till: [parent_limit_exceeded] ") and token not in over.err
    model = cli("key", "child", *holder, "--max-activations", "1", "--model", "o3")
    assert model.code == 1 and model.err.startswith("till: [model_not_allowed] ")

    # Revoking the parent revokes the child.
    assert cli("key", "revoke", *holder).code == 0
    gone = cli("key", "info", *holder, "--scoped-key-env", "CHILD_KEY")
    assert gone.code == 1 and gone.err.startswith("till: [key_revoked] ")
    assert child not in gone.err and admin.get_key(child_id).status == "revoked"


def test_the_installed_command_makes_a_child(till: Till, admin: TillClient) -> None:
    _, token = new_key(admin, 3)
    env = {**till.env, "TILL_URL": till.url, "HOLDER_KEY": token}
    result = subprocess.run(
        [str(BIN / "till"), "key", "child", "--scoped-key-env", "HOLDER_KEY",
         "--max-activations", "1"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    child = result.stdout.splitlines()[-1]
    assert child.startswith("till_sk_") and "shown once" in result.stderr
    assert token not in result.stdout + result.stderr and child not in result.stderr


def test_holder_errors(till: Till, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TILL_SCOPED_KEY", raising=False)
    fake = "till_sk_aaaaaaaaaaaaaaaa.bm90LWEtcmVhbC10b2tlbg"
    monkeypatch.setenv("FAKE_KEY", fake)
    wrong = cli("key", "info", "--url", till.url, "--scoped-key-env", "FAKE_KEY")
    assert (wrong.code, wrong.out) == (1, "")
    assert wrong.err.startswith("till: [invalid_api_key] ") and fake not in wrong.err
    closed = f"http://127.0.0.1:{free_port()}"
    down = cli("key", "info", "--url", closed, "--scoped-key-env", "FAKE_KEY")
    assert down.code == 3 and down.err.startswith("till: [connection_error] Could not reach")
    assert fake not in down.err


@pytest.mark.parametrize(
    "args",
    [
        ["keys", "update", "abcdefghijklmnop"],
        ["keys", "update", "abcdefghijklmnop", "--remove-limit", "max-activations"],
        ["keys", "update", "abcdefghijklmnop", "--max-tokens", "0"],
        ["keys", "update", "abcdefghijklmnop", "--add-tokens", "x"],
        ["keys", "update", "abcdefghijklmnop", "--rpm", "5", "--remove-limit", "rpm"],
        ["keys", "update", "--name", "x"],
        ["keys", "top-up", "abcdefghijklmnop"],
        ["keys", "top-up", "abcdefghijklmnop", "--activations", "-1"],
        ["key"],
        ["key", "info"],
        ["key", "info", "--scoped-key-env", "TILL_TEST_UNSET"],
        ["key", "info", "till_sk_abc.def"],  # never as an argument: ps would show it
        ["key", "child", "--max-activations", "1"],
        ["key", "child"],
        ["key", "child", "--max-activations", "1", "--ttl-seconds", "60", "--expires-at",
         "2031-01-01T00:00:00Z"],
    ],
)  # fmt: skip
def test_usage_errors_exit_2(args: list[str], cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    # A configured admin key and URL, so that only the arguments are at fault.
    monkeypatch.setenv("TILL_ADMIN_KEY", "till_admin_x")
    monkeypatch.setenv("TILL_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("TILL_SCOPED_KEY", raising=False)
    monkeypatch.delenv("TILL_TEST_UNSET", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    result = cli(*args)
    assert result.code == 2 and result.out == "", result.err
    assert result.err.startswith(("usage: till", "till: "))


def test_help(cli: Cli) -> None:
    paths = [("keys", "update"), ("keys", "top-up"), ("key",), ("key", "info"), ("key", "revoke"),
             ("key", "child")]  # fmt: skip
    for path in paths:
        result = cli(*path, "--help")
        assert result.code == 0 and result.out.startswith(f"usage: till {' '.join(path)}"), path
    assert "TILL_SCOPED_KEY" in cli("key", "--help").out
    assert "max-concurrent" in cli("keys", "update", "--help").out
    assert "--scoped-key-env VAR" in cli("key", "child", "--help").out

"""Master-key rotation as an operator does it: `till secrets rotate`, restart, `retire`, restart.

Tokens handed out before a rotation keep working until their key is retired; tokens made after
it are sealed with the new key and survive the retirement.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import (
    BIN,
    UPSTREAM_KEY,
    Mock,
    Till,
    assert_no_secrets,
    create_key,
    short_tmpdir,
    start_till,
    till_env,
)
from till.server.keyfile import KEYFILE_NAME
from till.tokens import Keyring

MESSAGES = [{"role": "user", "content": "Hello there"}]


def till_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "till"), *args], env=env, capture_output=True, text=True, timeout=60
    )


def chat_status(till: Till, token: str) -> int:
    with openai.OpenAI(api_key=token, base_url=f"{till.url}/v1", max_retries=0) as oa:
        try:
            oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        except openai.APIStatusError as exc:
            return exc.status_code
    return 200


@pytest.fixture
def data_dir() -> Iterator[Path]:
    directory = short_tmpdir("till-rotate-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_rotate_then_retire_on_the_embedded_store(
    data_dir: Path, mock_upstream: Mock, log_dir: Path
) -> None:
    env = till_env(data_dir, mock_upstream.url, None)
    log = log_dir / "till-rotate.log"

    def serve() -> Till:
        return start_till(env, log)

    till = serve()
    try:
        admin_key = till.new_tenant()
        with till.admin(admin_key) as admin:
            old = create_key(admin, upstream_key=UPSTREAM_KEY)["scopedKey"]
        assert chat_status(till, old) == 200
        keyfile = data_dir / KEYFILE_NAME
        first = Keyring.parse(keyfile.read_text())

        # 1. A new key in front, written into the key file; the running server is unchanged.
        done = till_cli(env, "secrets", "rotate", "--write")
        assert done.returncode == 0, done.stderr
        assert "restart Till" in done.stderr and done.stdout == ""
        rotated = Keyring.parse(keyfile.read_text())
        assert rotated.kids == ("k2", *first.kids)
        assert keyfile.stat().st_mode & 0o777 == 0o600
        till.stop()
        till = serve()
        # Tokens from before still open; new ones are sealed with the new key.
        assert chat_status(till, old) == 200
        with till.admin(admin_key) as admin:
            new = create_key(admin, upstream_key=UPSTREAM_KEY)["scopedKey"]
        assert chat_status(till, new) == 200

        # 2. The new key seals: it cannot be retired; an unknown kid is named in the error.
        refused = till_cli(env, "secrets", "retire", "k2", "--write")
        assert refused.returncode == 1 and "promote another key first" in refused.stderr
        unknown = till_cli(env, "secrets", "retire", "k9")
        assert unknown.returncode == 1 and "no key 'k9'" in unknown.stderr
        assert Keyring.parse(keyfile.read_text()).kids == rotated.kids

        # 3. The old key retired: its tokens are refused, the new ones work.
        done = till_cli(env, "secrets", "retire", "k1", "--write")
        assert done.returncode == 0, done.stderr
        assert Keyring.parse(keyfile.read_text()).kids == ("k2",)
        till.stop()
        till = serve()
        assert chat_status(till, old) == 401
        assert chat_status(till, new) == 200
    finally:
        till.stop()
        assert_no_secrets(log)


def test_rotate_prints_the_keyring_for_the_environment(mock_upstream: Mock) -> None:
    current = Keyring.generate("live").format()
    env = till_env(Path("/nonexistent"), mock_upstream.url, "redis://127.0.0.1:1/0")
    env["TILL_SECRET_KEYS"] = current
    done = till_cli(env, "secrets", "rotate", "--kid", "next")
    assert done.returncode == 0, done.stderr
    printed = Keyring.parse(done.stdout)
    assert printed.kids == ("next", "live")
    # The old key is carried over as it was: its tokens keep opening.
    assert done.stdout.strip().endswith(current)
    # Retiring prints the keyring without it.
    env["TILL_SECRET_KEYS"] = done.stdout.strip()
    retired = till_cli(env, "secrets", "retire", "live")
    assert retired.returncode == 0 and Keyring.parse(retired.stdout).kids == ("next",)
    # The rolling way: add (opens, seals nothing), then promote (seals), each rolled out.
    env["TILL_SECRET_KEYS"] = current
    added = till_cli(env, "secrets", "add")
    assert added.returncode == 0 and Keyring.parse(added.stdout).kids == ("live", "k2")
    assert added.stdout.startswith(current + ",")
    env["TILL_SECRET_KEYS"] = added.stdout.strip()
    promoted = till_cli(env, "secrets", "promote", "k2")
    assert promoted.returncode == 0 and Keyring.parse(promoted.stdout).kids == ("k2", "live")
    assert sorted(promoted.stdout.strip().split(",")) == sorted(added.stdout.strip().split(","))
    # The file flag makes no sense for a keyring given in the environment.
    refused = till_cli(env, "secrets", "rotate", "--write")
    assert refused.returncode == 1 and "TILL_SECRET_KEYS" in refused.stderr
    # A kid already in use is refused, and no key material is echoed in errors.
    clash = till_cli(env, "secrets", "rotate", "--kid", "live")
    assert clash.returncode == 1 and "duplicate kid" in clash.stderr
    assert current.split(":")[1] not in clash.stderr


def test_a_keyring_file_that_was_never_made_is_a_clear_error(
    data_dir: Path, mock_upstream: Mock
) -> None:
    env = till_env(data_dir / "empty", mock_upstream.url, None)
    done = till_cli(env, "secrets", "rotate", "--write")
    assert done.returncode == 1 and "start Till once" in done.stderr
    assert not (data_dir / "empty" / KEYFILE_NAME).exists()


def test_readiness_is_unchanged_by_rotation_until_restart(
    data_dir: Path, mock_upstream: Mock, log_dir: Path
) -> None:
    """A rotation touches only the file: the running server keeps its keyring."""
    env = till_env(data_dir, mock_upstream.url, None)
    log = log_dir / "till-rotate-live.log"
    till = start_till(env, log)
    try:
        admin_key = till.new_tenant()
        assert till_cli(env, "secrets", "rotate", "--write").returncode == 0
        assert till_cli(env, "secrets", "retire", "k1", "--write").returncode == 0
        with till.admin(admin_key) as admin:
            token = create_key(admin, upstream_key=UPSTREAM_KEY)["scopedKey"]
        # Sealed with k1, which the running server still has.
        assert chat_status(till, token) == 200
        assert httpx.get(f"{till.url}/readyz").status_code == 200
    finally:
        till.stop()
        assert_no_secrets(log)

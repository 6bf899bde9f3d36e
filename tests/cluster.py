"""A real three-primary Redis Cluster on loopback, made of Debian's redis-server and redis-cli.

``start_cluster(base_dir)`` starts three ``redis-server`` processes (cluster mode, AOF, each in
its own directory), joins them with ``redis-cli --cluster create``, and waits until every node
says ``cluster_state:ok``. Nodes keep serving their own slots when another one dies
(``cluster-require-full-coverage no``, as a deployment wants it too), and mark a dead node as
failed after ``NODE_TIMEOUT_MS``. Each node's cluster bus gets a port of its own
(``cluster-port``): the default, port + 10000, may be taken or past 65535.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from tests.conftest import free_port, short_tmpdir

NODES = 3
# Short, so that the survivors mark a killed node as failed within a second or two.
NODE_TIMEOUT_MS = 1000


class ClusterError(RuntimeError):
    """The cluster could not be started."""


def _client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=1)


def _up(node: Node) -> bool:
    if not node.alive():
        raise ClusterError(f"redis-server on {node.port} exited: see {node.dir}/redis.log")
    with _client(node.port) as r:
        return bool(r.ping())


def _state(port: int) -> str:
    with _client(port) as r:
        return str(r.cluster("INFO")["cluster_state"])


@dataclass
class Node:
    port: int
    bus_port: int
    dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Cluster:
    base_dir: Path
    nodes: list[Node]
    # slot ranges: (first, last, port of the primary), as CLUSTER SLOTS said after the start.
    ranges: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def port_of_slot(self, slot: int) -> int:
        for first, last, port in self.ranges:
            if first <= slot <= last:
                return port
        raise LookupError(f"slot {slot} is not covered")

    def port_of_key(self, key: str) -> int:
        """The port of the primary that holds ``key`` (its hash tag decides)."""
        return self.port_of_slot(key_slot(key.encode()))

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def kill(self, port: int) -> None:
        """SIGKILL one node: no shutdown, no AOF rewrite, the way a crash looks."""
        proc = self.node(port).proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)

    def stop(self) -> None:
        """Kill every node and wait for it; safe to call again."""
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.kill()
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(5)


def _start_node(directory: Path) -> Node:
    exe = shutil.which("redis-server")
    if exe is None:
        raise ClusterError("redis-server is not installed (apt-get install redis-server)")
    directory.mkdir(parents=True, exist_ok=True)
    port, bus_port = free_port(), free_port()
    while bus_port == port:
        bus_port = free_port()
    log = (directory / "redis.log").open("ab")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
         "--cluster-port", str(bus_port), "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
         "--cluster-require-full-coverage", "no",
         "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    return Node(port, bus_port, directory, proc)


def _wait(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.ConnectionError, redis.TimeoutError):
            pass
        time.sleep(0.05)
    raise ClusterError(f"{what} not within {timeout}s")


def _slot_ranges(port: int) -> list[tuple[int, int, int]]:
    with _client(port) as r:
        # [[first, last, [host, port, id], replicas...], ...]
        slots: list[list[Any]] = r.execute_command("CLUSTER SLOTS")
    return sorted((int(first), int(last), int(primary[1])) for first, last, primary, *_ in slots)


def start_cluster(base_dir: Path, timeout: float = 20.0) -> Cluster:
    """Three primaries, no replicas, all 16384 slots assigned, every node ``cluster_state:ok``."""
    exe = shutil.which("redis-cli")
    if exe is None:
        raise ClusterError("redis-cli is not installed (apt-get install redis-tools)")
    cluster = Cluster(base_dir, [])
    try:
        for i in range(NODES):
            cluster.nodes.append(_start_node(base_dir / f"node{i}"))
        for node in cluster.nodes:
            _wait(f"redis-server on {node.port}", lambda n=node: _up(n), 10)
        created = subprocess.run(
            [exe, "--cluster", "create", *(n.name for n in cluster.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if created.returncode != 0:
            raise ClusterError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}")
        for node in cluster.nodes:
            _wait(
                f"cluster_state:ok on {node.port}",
                lambda n=node: _state(n.port) == "ok",
                timeout,
            )
        cluster.ranges = _slot_ranges(cluster.nodes[0].port)
        if {port for _, _, port in cluster.ranges} != set(cluster.ports):
            raise ClusterError(f"not every node holds slots: {cluster.ranges}")
        return cluster
    except BaseException:
        cluster.stop()
        raise


class _Shared:
    """The session's cluster, started by the first module that asks, stopped after the last."""

    cluster: Cluster | None = None
    users = 0


@pytest.fixture(scope="session", name="redis_cluster")
def redis_cluster_fixture() -> Iterator[Cluster]:
    """``redis_cluster``: a three-primary cluster for the session. A test module that imports
    this function gets the fixture; every such module shares the one cluster (a test that kills
    a node must start a cluster of its own).
    """
    if _Shared.cluster is None:
        _Shared.cluster = start_cluster(short_tmpdir("till-cluster-"))
    _Shared.users += 1
    try:
        yield _Shared.cluster
    finally:
        _Shared.users -= 1
        if _Shared.users == 0:
            _Shared.cluster.stop()
            shutil.rmtree(_Shared.cluster.base_dir, ignore_errors=True)
            _Shared.cluster = None

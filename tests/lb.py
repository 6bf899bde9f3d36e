"""The compose topology with local processes, for tests: nginx, three Tills, one Redis.

`start_nginx` runs Debian's nginx with the shipped `deploy/nginx.conf`, rewritten only where it
runs (see the comment at the top of that file): the upstream servers, the listen address, and
the pid, log and temp paths, all in one temp directory. nginx stays in the foreground
(`daemon off`) as a child of the test, its workers running as the current user.

`run_cluster` puts it in front of `till serve` instances sharing one Debian redis-server, set up
as `deploy/docker-compose.yml` sets up its own: as many workers as the file has `till-N`
services, their environment (less the two addresses that only mean something on the compose
network), and the Redis command's flags (AOF on, fsync every second, no eviction).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import (
    ROOT,
    Mock,
    RedisServer,
    Till,
    assert_no_secrets,
    free_port,
    short_tmpdir,
    start_redis,
    start_till,
    stop_process,
    till_env,
)
from till.tokens import Keyring

CONFIG = ROOT / "deploy" / "nginx.conf"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


@dataclass
class Nginx:
    url: str
    dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def access_log(self) -> Path:
        return self.dir / "till-access.log"

    @property
    def error_log(self) -> Path:
        return self.dir / "till-error.log"

    @property
    def output_log(self) -> Path:
        """What nginx itself wrote to stdout/stderr (start-up problems)."""
        return self.dir / "nginx.out"

    def stop(self) -> None:
        stop_process(self.proc)  # SIGTERM: nginx's fast shutdown, workers included


SERVER_LINE = re.compile(r"^([ \t]*)server[ \t]+[^\s;]+([^;\n]*);[^\n]*\n", re.MULTILINE)


def _sub(pattern: str, repl: str | Callable[[re.Match[str]], str], text: str) -> str:
    """re.sub over one line that must be there exactly once."""
    new, found = re.subn(pattern, repl, text, flags=re.MULTILINE)
    if found != 1:
        raise AssertionError(f"{CONFIG}: expected one match of /{pattern}/, found {found}")
    return new


def _user_line() -> str:
    if os.geteuid() != 0:
        return ""  # an unprivileged master runs its workers as itself; `user` would be ignored
    user = pwd.getpwuid(os.geteuid()).pw_name
    return f"user {user} {grp.getgrgid(os.getegid()).gr_name};"


def render(template: str, upstreams: Sequence[str], listen: str, directory: Path) -> str:
    """`template` (deploy/nginx.conf) for these upstream addresses, listen address and dir."""
    text = _sub(r"^([ \t]*)user[ \t]+[^;\n]+;", lambda m: m[1] + _user_line(), template)
    for directive in ("pid", "error_log", "access_log"):
        text = _sub(
            rf"^([ \t]*{directive}[ \t]+)/[^\s;]*/([^/\s;]+)",
            lambda m: f"{m[1]}{directory}/{m[2]}",
            text,
        )
    # The upstream servers: one line per address, each with the first line's parameters.
    block = re.search(r"^[ \t]*upstream till \{\n(?P<body>.*?)^[ \t]*\}", text, re.M | re.S)
    assert block is not None, f"{CONFIG}: no `upstream till` block"
    body = block["body"]
    first = SERVER_LINE.search(body)
    assert first is not None, f"{CONFIG}: no server line in `upstream till`"
    indent, params = first.group(1, 2)
    servers = "".join(f"{indent}server {addr}{params};\n" for addr in upstreams)
    body = body[: first.start()] + servers + SERVER_LINE.sub("", body[first.start() :])
    text = text[: block.start("body")] + body + text[block.end("body") :]
    text = _sub(r"^([ \t]*listen[ \t]+)[^\s;]+([^;\n]*);", lambda m: f"{m[1]}{listen}{m[2]};", text)
    # Debian's compiled-in temp paths (/var/lib/nginx) need root: every one moves here too.
    temp = "".join(f"    {name}_temp_path {directory}/{name}_temp;\n" for name in TEMP_PATHS)
    return _sub(r"^http \{\n", lambda m: m[0] + temp, text)


def start_nginx(upstreams: Sequence[str], directory: Path, port: int | None = None) -> Nginx:
    exe = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )
    if exe is None:
        pytest.fail("nginx is not installed (apt-get install nginx)")
    port = port or free_port()
    conf = directory / "nginx.conf"
    conf.write_text(render(CONFIG.read_text(), upstreams, f"127.0.0.1:{port}", directory))
    out = directory / "nginx.out"
    with out.open("ab") as fh:
        proc = subprocess.Popen(
            [exe, "-p", f"{directory}/", "-c", str(conf), "-e", str(out), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}: {out.read_text()}")
        try:
            # /healthz goes through to an instance: this also proves the upstreams answer.
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return Nginx(url, directory, proc)
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    stop_process(proc)
    raise TimeoutError(f"nginx did not answer on {url}: {out.read_text()}")


# --- the compose topology, with local processes ---

CHAT = "/v1/chat/completions"
# Till's access log (TILL_ACCESS_LOG=1): `... till.access[pid]: ADDR "POST /path" STATUS ...`,
# written once the response is sent in full: a request its worker died with is not there.
ACCESS_LINE = re.compile(r'till\.access\[\d+\]: \S+ "POST /v1/chat/completions" (\d{3}) ')
# nginx's (deploy/nginx.conf, log_format till): `... "POST /path HTTP/1.1" STATUS BYTES TIME
# upstream=ADDR STATUS TIME`, with comma-separated lists when nginx tried more than one instance.
NGINX_LINE = re.compile(
    r'"(?P<method>\S+) (?P<path>\S+) HTTP/1\.1" (?P<status>\d{3}) \d+ \S+ '
    r"upstream=(?P<addrs>[^\s,]+(?:, [^\s,]+)*) (?P<statuses>[^\s,]+(?:, [^\s,]+)*) "
)
# Compose-network addresses: here Redis is a local redis-server and nginx is 127.0.0.1, which
# Till trusts by default (as deploy/nginx.conf's header says).
COMPOSE_ONLY = ("TILL_REDIS_URL", "TILL_TRUSTED_PROXIES")


@dataclass(frozen=True)
class NginxEntry:
    """One request in nginx's access log: the instances it tried, in order, and their answers."""

    method: str
    path: str
    status: int
    upstreams: tuple[str, ...]
    upstream_statuses: tuple[str, ...]

    @property
    def upstream(self) -> str:
        """The instance that had the request last (the one that answered, or failed it)."""
        return self.upstreams[-1]


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def compose_redis_flags() -> list[str]:
    """The compose file's redis-server flags (appendonly, appendfsync, maxmemory-policy)."""
    command = [str(arg) for arg in compose_services()["redis"]["command"]]
    assert command[0] == "redis-server", f"{COMPOSE}: redis command {command}"
    return command[1:]


def compose_workers() -> tuple[int, dict[str, str]]:
    """How many Till workers the compose file runs, and their (one) environment, less the
    compose-network addresses."""
    workers = [s for name, s in compose_services().items() if name.startswith("till-")]
    envs = [{k: str(v) for k, v in s["environment"].items()} for s in workers]
    assert workers and all(env == envs[0] for env in envs), f"{COMPOSE}: workers differ"
    return len(workers), {k: v for k, v in envs[0].items() if k not in COMPOSE_ONLY}


@dataclass
class Cluster:
    nginx: Nginx
    instances: list[Till]
    redis: RedisServer
    admin_key: str

    def admin(self) -> httpx.Client:
        """The admin API, through nginx like every client."""
        return httpx.Client(
            base_url=self.nginx.url,
            headers={"authorization": f"Bearer {self.admin_key}"},
            timeout=30,
        )

    def new_key(self, name: str, **fields: object) -> tuple[dict[str, Any], str]:
        """A key on its own upstream key, so the mock's records for it can be told apart."""
        upstream_key = f"sk-test-lb-{name}-0123456789abcdef"
        body = {"provider": "openai", "upstream_key": upstream_key, **fields}
        with self.admin() as admin:
            resp = admin.post("/admin/keys", json=body)
        assert resp.status_code == 201, resp.text
        key: dict[str, Any] = resp.json()["key"]
        return key, upstream_key

    def read_key(self, key_id: object) -> dict[str, Any]:
        with self.admin() as admin:
            resp = admin.get(f"/admin/keys/{key_id}")
        assert resp.status_code == 200, resp.text
        key: dict[str, Any] = resp.json()["key"]
        return key

    def address(self, till: Till) -> str:
        """An instance as nginx names it in `upstream till` (and logs it: $upstream_addr)."""
        return till.url.removeprefix("http://")

    def log_sizes(self) -> list[int]:
        return [till.log.stat().st_size for till in self.instances]

    def access_statuses(self, since: list[int], until: list[int] | None = None) -> list[list[int]]:
        """Each instance's chat statuses logged between offsets (from log_sizes)."""
        found = []
        for i, till in enumerate(self.instances):
            with till.log.open("rb") as fh:
                fh.seek(since[i])
                data = fh.read() if until is None else fh.read(until[i] - since[i])
            found.append([int(m[1]) for m in ACCESS_LINE.finditer(data.decode(errors="replace"))])
        return found

    def nginx_log_size(self) -> int:
        return self.nginx.access_log.stat().st_size

    def nginx_entries(self, since: int, until: int | None = None) -> list[NginxEntry]:
        """Chat requests in nginx's access log between two offsets (from nginx_log_size)."""
        with self.nginx.access_log.open("rb") as fh:
            fh.seek(since)
            data = fh.read() if until is None else fh.read(until - since)
        entries = []
        for line in data.decode(errors="replace").splitlines():
            m = NGINX_LINE.search(line)
            assert m is not None, f"nginx access log line not understood: {line!r}"
            if m["path"] == CHAT:
                entries.append(
                    NginxEntry(
                        m["method"],
                        m["path"],
                        int(m["status"]),
                        tuple(m["addrs"].split(", ")),
                        tuple(m["statuses"].split(", ")),
                    )
                )
        return entries


@contextlib.contextmanager
def run_cluster(name: str, mock: Mock, log_dir: Path, **env: str) -> Iterator[Cluster]:
    """The compose topology: redis-server with the compose file's flags, its number of Till
    workers with its environment (plus `env`: test settings), nginx with deploy/nginx.conf.

    On the way out everything stops, and every log (each Till's, nginx's access and error
    logs) is scanned for keys. The logs stay in `log_dir`, for a failed run.
    """
    base = short_tmpdir(f"till-{name}-")
    stamp = time.monotonic_ns()
    nginx_dir = log_dir / f"nginx-{name}-{stamp}"
    nginx_dir.mkdir()
    count, worker_env = compose_workers()
    instances: list[Till] = []
    nginx: Nginx | None = None
    redis: RedisServer | None = None
    try:
        redis = start_redis(base, None, *compose_redis_flags())
        settings = till_env(
            base, mock.url, redis.url, TILL_SECRET_KEYS=Keyring.generate(name[:16]).format()
        )
        settings |= worker_env | env
        for i in range(count):
            instances.append(start_till(settings, log_dir / f"till-{name}-{i}-{stamp}.log"))
        nginx = start_nginx([t.url.removeprefix("http://") for t in instances], nginx_dir)
        admin_key = instances[0].new_tenant(name[:16], plan="enterprise")
        yield Cluster(nginx, instances, redis, admin_key)
    finally:
        try:
            if nginx is not None:
                nginx.stop()
            for till in instances:
                till.stop()
            if redis is not None:
                stop_process(redis.proc)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        for till in instances:
            assert_no_secrets(till.log)
        for log in (nginx_dir / "till-access.log", nginx_dir / "till-error.log"):
            if log.exists():
                assert_no_secrets(log)


def records_for(mock: Mock, upstream_key: str) -> list[dict[str, Any]]:
    return [r for r in mock.requests() if r.get("api_key") == upstream_key]


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}

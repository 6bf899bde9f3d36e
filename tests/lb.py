"""Debian's nginx as a load balancer in front of several Till instances, for tests.

It runs the shipped `deploy/nginx.conf`, rewritten only where it runs (see the comment at the
top of that file): the upstream servers, the listen address, and the pid, log and temp paths,
all in one temp directory. nginx stays in the foreground (`daemon off`) as a child of the test,
its workers running as the current user.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port, stop_process

CONFIG = ROOT / "deploy" / "nginx.conf"
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

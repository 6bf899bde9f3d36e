"""Running the app: uvicorn (the default) or hypercorn, as TILL_SERVER says.

uvicorn with httptools serves the same app with a quarter less CPU per request than hypercorn,
and a quarter more requests a second (benchmarks/RESULTS.md), but it bounds neither how long
a request's headers may take nor how large they may grow: a client trickling headers would
hold its connection, and its memory, for ever. ``GuardedHttpTools`` adds both bounds, as
hypercorn has them: the headers of each request must be in within TILL_IDLE_TIMEOUT of the
connection opening or of the previous response ending, and within MAX_HEADER_BYTES.
hypercorn stays available for HTTP/2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from typing import Final

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from till.server.settings import Settings, from_env

APP: Final = "till.server.asgi:app"
# Request line and headers together; past this, 431 and the connection is closed. Provider SDKs
# send about 1 KiB; nginx's default is 8 KiB a line, hypercorn's (h11's) 16 KiB in all.
MAX_HEADER_BYTES: Final = 64 * 1024
# Agent fleets open connections in bursts; a backlog of 100 drops them.
BACKLOG: Final = 2048


def run(settings: Settings) -> int:
    """Serve until stopped (SIGTERM, SIGINT); the exit status."""
    if settings.server == "hypercorn":
        return _run_hypercorn(settings)
    return _run_uvicorn(settings)


def _run_uvicorn(settings: Settings) -> int:
    # uvicorn stops gracefully on SIGTERM or SIGINT, then raises the signal again with the
    # handlers it found: with these, a stop that went well exits 0 (as under hypercorn) rather
    # than "killed by SIGTERM", or a KeyboardInterrupt traceback.
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _uvicorn(settings)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _stopped(signum: int, frame: object) -> None:
    """The signal uvicorn raises again once it has stopped: nothing left to do."""


def _uvicorn(settings: Settings) -> None:
    uvicorn.run(
        APP,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop" if _has_uvloop() else "asyncio",
        http=GuardedHttpTools,
        ws="none",
        lifespan="on",
        # Logging is Till's own (logs.configure): no config of uvicorn's, and its access log
        # off, as it would write the query string, where a token may travel (?key=...). Till's
        # own (TILL_ACCESS_LOG) writes paths only.
        log_config=None,
        access_log=False,
        # X-Forwarded-For is read by Till itself, from TILL_TRUSTED_PROXIES only.
        proxy_headers=False,
        server_header=False,
        # Floats work where ints are annotated: both end up in call_later and wait_for.
        timeout_keep_alive=settings.idle_timeout,  # type: ignore[arg-type]
        timeout_graceful_shutdown=settings.graceful_timeout,  # type: ignore[arg-type]
        backlog=BACKLOG,
    )


def _run_hypercorn(settings: Settings) -> int:
    from hypercorn.config import Config
    from hypercorn.run import run as hypercorn_run

    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.application_path = APP
    config.workers = settings.workers if settings.workers > 1 else 0
    config.accesslog = None  # Till's own (TILL_ACCESS_LOG), paths only
    config.errorlog = logging.getLogger("hypercorn.error")
    config.loglevel = settings.log_level.upper()
    config.graceful_timeout = settings.graceful_timeout
    # Keep it above the load balancer's idle timeout (nginx.conf: 60 s). The timer runs from a
    # connection's start, or the end of its last response, until a request's headers are in:
    # it is also the bound on headers sent slowly. (hypercorn's read_timeout is not set: it
    # bounds the client's silence, and a client waiting for a long answer is silent.)
    config.keep_alive_timeout = settings.idle_timeout
    config.include_server_header = False
    config.backlog = BACKLOG
    if _has_uvloop():
        config.worker_class = "uvloop"
    return hypercorn_run(config) or 0


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover - uvloop is part of the server extra
        return False
    return True


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline and a size bound on each request's
    headers. uvicorn's own keep-alive timer stops at a connection's first byte."""

    # TCP_USER_TIMEOUT, ms (0: not set): read once per process from TILL_WRITE_TIMEOUT.
    _user_timeout_ms: int | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._drop_stalled_readers(transport)
        self._header_bytes = 0
        self._in_headers = True
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    @classmethod
    def _drop_stalled_readers(cls, transport: asyncio.Transport) -> None:
        """Have the kernel drop the connection when what is sent to it stays unacknowledged
        for TILL_WRITE_TIMEOUT (Linux; zero-window probes count). Till stops writing to a
        client that stopped reading after that long, but the socket's own buffered bytes
        would otherwise keep it open for as long as the client holds its end."""
        if cls._user_timeout_ms is None:
            option = getattr(socket, "TCP_USER_TIMEOUT", None)
            cls._user_timeout_ms = int(from_env().write_timeout * 1000) if option else 0
        sock = transport.get_extra_info("socket")
        if cls._user_timeout_ms and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, cls._user_timeout_ms)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.timeout_keep_alive, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        # Closed, not answered: no request was read (as hypercorn does).
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_headers and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._disarm()
                self._refuse_headers()

    def _refuse_headers(self) -> None:
        body = (
            b'{"error":{"code":"headers_too_large","message":"Request headers are limited'
            b" to " + str(MAX_HEADER_BYTES).encode() + b' bytes."}}'
        )
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A request httptools cannot parse (control characters in a header, Content-Length
        and Transfer-Encoding both, a bad request line): 400 and the connection closed, with no
        body, as hypercorn answers it. uvicorn's own says so in plain text and logs a warning
        per request, which a client could use to flood the log."""
        self.transport.write(
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
        self.transport.close()

    def _unsupported_upgrade_warning(self) -> None:
        # An Upgrade header (WebSocket, h2c) is ignored, the request served as HTTP/1.1: no
        # warning per request for a client to flood the log with.
        pass

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_bytes = 0
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Waiting for the next request: its headers are due within the same bound. (A request
        # already in, pipelined, has its headers complete.)
        if self.timeout_keep_alive_task is not None:
            self._in_headers = True
            self._header_bytes = 0
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

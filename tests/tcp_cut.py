"""A TCP proxy that can lose a reply: the command reaches the server, its answer never returns.

It sits between a client (``till serve``, with ``TILL_REDIS_URL`` at the proxy, or a Ledger) and
a real server, and passes bytes both ways untouched until armed: ``arm(marker, times=2)``
picks the next ``times`` client writes that contain any of the markers, and does to each what
``fault`` says:

- ``"reply"`` (the default): the write is forwarded, the server's reply is read and dropped,
  and both connections are closed. The server ran the command; the client saw its connection
  close with no answer. The reply is awaited before the cut (at most ``reply_timeout``), so
  "the command ran" is a fact, not a race.
- ``"command"``: the write is dropped and both connections are closed: the command never ran
  (a request lost on its way, or a store that is down).
- ``"stall"``: the write is forwarded, the reply is read and dropped, and the connection stays
  open and silent until the client closes it: the command ran, the client waits in vain.
- ``"hang"``: the write is dropped and the connection stays open and silent until the client
  closes it: the command never ran, and the client learns it only from its own timeout.

One client write is one redis-py command (it writes each command with one ``write``), and
redis-py never has two commands in flight on one connection outside a pipeline: the first
bytes from the server after a marked write are its reply. A marker split across two reads is
still found (the previous read's tail is kept).

The proxy runs its own event loop in a daemon thread, listens on 127.0.0.1 only, and counts
what it did (``faults[kind]``, ``connections``). Usage::

    with CutProxy("127.0.0.1", redis_port) as cut:
        url = f"redis://127.0.0.1:{cut.port}/0"
        cut.arm(marker, times=1)
        ...
        cut.wait_faults("reply", 1)
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")
Fault = Literal["reply", "command", "stall", "hang"]
READ_SIZE = 65536
STALL_LIMIT = 60.0  # seconds a stalled connection is kept open at most


class _Conn:
    """One proxied connection: which fault hit it, once one did."""

    __slots__ = ("fault",)

    def __init__(self) -> None:
        self.fault: Fault | None = None  # set before a marked command goes to the server


class CutProxy:
    def __init__(self, host: str, port: int, *, reply_timeout: float = 5.0) -> None:
        self.target = (host, port)
        self.reply_timeout = reply_timeout
        self.port = 0
        self.connections = 0  # client connections accepted
        self.faults: Counter[str] = Counter()  # faults done, by kind
        self._markers: tuple[bytes, ...] = ()
        self._armed = 0
        self._fault: Fault = "reply"
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # --- control, from the test's thread ---

    def start(self) -> int:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="tcp-cut", daemon=True)
        self._thread.start()
        self._server = self._run(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        loop.close()

    def arm(self, *markers: bytes, times: int = 1, fault: Fault = "reply") -> None:
        """Do ``fault`` to the next ``times`` commands that contain any of ``markers``."""
        if not markers or any(not m for m in markers) or times < 0:
            raise ValueError("arm() needs non-empty markers and times >= 0")
        if fault not in ("reply", "command", "stall", "hang"):
            raise ValueError(f"unknown fault {fault!r}")
        with self._lock:
            self._markers = markers
            self._armed = times
            self._fault = fault

    def disarm(self) -> int:
        """Stop; returns how many armed faults were left unused."""
        with self._lock:
            left, self._armed = self._armed, 0
        return left

    def wait_faults(self, kind: Fault, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.faults[kind] < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.faults[kind]} of {count} {kind} faults in {timeout}s")
            time.sleep(0.01)

    def __enter__(self) -> CutProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # --- the proxy, on its own loop ---

    def _take(self, window: bytes) -> Fault | None:
        """The fault to do to this write, if it is marked (and counted off)."""
        with self._lock:
            if self._armed > 0 and any(m in window for m in self._markers):
                self._armed -= 1
                return self._fault
        return None

    def _longest_marker(self) -> int:
        with self._lock:
            return max((len(m) for m in self._markers), default=0)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(client_w)
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            self._writers.discard(client_w)
            return
        self._writers.add(server_w)
        conn = _Conn()
        up = asyncio.ensure_future(self._upstream(client_r, server_w, conn))
        down = asyncio.ensure_future(self._downstream(server_r, client_w, conn))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if conn.fault == "reply":
                # The downstream side drops the marked command's reply, then ends.
                await asyncio.wait({down}, timeout=self.reply_timeout)
            elif conn.fault in ("stall", "hang"):
                # Silent until the client gives up and closes (the upstream side then ends).
                await asyncio.wait({up}, timeout=STALL_LIMIT)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            for writer in (client_w, server_w):
                writer.close()
                self._writers.discard(writer)

    async def _upstream(
        self, client_r: asyncio.StreamReader, server_w: asyncio.StreamWriter, conn: _Conn
    ) -> None:
        tail = b""
        while data := await client_r.read(READ_SIZE):
            if conn.fault is not None:
                continue  # after a stall: nothing more goes through; wait for the client's end
            window = tail + data
            fault = self._take(window)
            if fault == "command":
                self.faults["command"] += 1
                return  # never sent: the connection closes with the command unrun
            if fault == "hang":
                self.faults["hang"] += 1
                conn.fault = fault  # never sent, and nothing more goes through
                continue
            conn.fault = fault  # before the write: whatever comes back now is this reply
            server_w.write(data)
            await server_w.drain()
            if fault == "reply":
                return  # nothing more from this client goes through
            keep = max(0, self._longest_marker() - 1)
            tail = window[-keep:] if keep else b""

    async def _downstream(
        self, server_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, conn: _Conn
    ) -> None:
        # Redis speaks only when spoken to (no pub/sub here), and the client waits for each
        # reply before it sends the next command: bytes read once ``conn.fault`` is set (it is
        # set before the marked command is written) are that command's reply.
        while data := await server_r.read(READ_SIZE):
            if conn.fault is not None:
                # Read, so the command ran; dropped, so the client never knows.
                self.faults[conn.fault] += 1
                return
            client_w.write(data)
            await client_w.drain()

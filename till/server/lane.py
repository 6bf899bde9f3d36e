"""The budget scripts' own path to a single Redis server, cheaper than redis-py's command path.

Under load, redis-py's path for one command cost more CPU than the round trip it makes: the
blocking pool's lock, condition and timeout, a task per write (``wait_for``) and a timeout per
read for the socket timeouts, the retry wrapper, command packing in Python. The scripts are
most of Till's Redis traffic (two per request), so they take their own route:

- connections are redis-py's own (its connect, AUTH, SELECT, TLS, reply parsing), taken from
  the client's pool once and kept: idle ones wait in a stack, at most ``size`` in use;
- commands are packed by hiredis and written as they are;
- each attempt has one deadline, the store timeout, over connect, write and read (one timer
  watches every attempt under way); a connection error or a timeout closes the connection and
  the command is sent once more on a new one, as redis-py's retry does (the scripts are
  idempotent by request id).

A connection goes back to the stack only after a whole reply, or closed: never with a reply
still on its way (a cancelled caller, a timeout), which the next command would take for its own.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Final

import hiredis
import redis.asyncio as aioredis
import redis.exceptions as rexc

# Before the one resend, as redis-py's ExponentialBackoff(base=0.005) waits after one failure.
RESEND_AFTER: Final = 0.01
_pack: Any = hiredis.pack_command


def pack(*args: str | int | bytes) -> bytes:
    """One command in the Redis protocol."""
    packed: bytes = _pack(args)
    return packed


class Lane:
    def __init__(self, store: aioredis.Redis, timeout: float) -> None:
        self._pool: Any = store.connection_pool  # its annotations are partial
        total = int(getattr(self._pool, "max_connections", 0) or 1)
        # An eighth of the pool stays free for the other commands (admin reads, the reaper's
        # lock); the scripts' connections are counted in it as in use.
        self.size = max(1, total - max(1, total // 8))
        self._timeout = timeout
        self._gate = asyncio.Semaphore(self.size)
        self._idle: deque[Any] = deque()
        self._taken: list[Any] = []
        # Attempts under way: their task -> (deadline, the task's cancel requests before it).
        # One timer for all of them, re-armed only when it fires (as relay.WriteDeadline does):
        # an asyncio.timeout per attempt cost a fifth of the lane's own time.
        self._due: dict[asyncio.Task[Any], tuple[float, int]] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def execute(self, command: bytes) -> Any:
        """Send a packed command and return its reply (redis-py's parsing: a ResponseError
        reply is raised). Raises redis-py's ConnectionError or TimeoutError when two attempts
        failed, or no connection came free within the timeout."""
        gate = self._gate
        if gate.locked():
            try:
                async with asyncio.timeout(self._timeout):
                    await gate.acquire()
            except TimeoutError:
                raise rexc.ConnectionError("no free connection") from None
        else:
            await gate.acquire()
        task = asyncio.current_task()
        assert task is not None
        conn: Any = None
        clean = False
        try:
            attempt = 1
            while True:
                self._watch(task)
                try:
                    if conn is None:
                        conn = self._idle.pop() if self._idle else await self._take()
                    await conn.send_packed_command(command, check_health=False)
                    try:
                        reply = await conn.read_response()
                    except rexc.ResponseError:
                        clean = True  # an error reply, read whole
                        raise
                    clean = True
                    return reply
                except asyncio.CancelledError:
                    if not self._overdue(task):
                        raise  # a cancellation from elsewhere (the client left) goes on
                    error: rexc.RedisError = rexc.TimeoutError("the store did not answer in time")
                except (rexc.ConnectionError, rexc.TimeoutError) as exc:
                    error = exc
                finally:
                    self._unwatch(task)
                if conn is not None:
                    await conn.disconnect(nowait=True)  # reconnected by the next send
                if attempt == 2:
                    raise error
                attempt += 1
                await asyncio.sleep(RESEND_AFTER)
        finally:
            if conn is not None:
                if not clean:
                    await conn.disconnect(nowait=True)
                self._idle.append(conn)
            gate.release()

    # --- one deadline per attempt ---

    def _watch(self, task: asyncio.Task[Any]) -> None:
        loop = task.get_loop()
        due = loop.time() + self._timeout
        self._due[task] = (due, task.cancelling())
        if self._timer is None:
            self._timer = loop.call_at(due, self._expire, loop)

    def _unwatch(self, task: asyncio.Task[Any]) -> None:
        self._due.pop(task, None)
        if task in self._expired:
            # Cancelled, but the attempt ended before the cancellation arrived: undone, as
            # asyncio.timeout undoes its own.
            self._expired.discard(task)
            task.uncancel()

    def _overdue(self, task: asyncio.Task[Any]) -> bool:
        """Whether the cancellation under way is this lane's deadline alone (then undone)."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        _, before = self._due[task]
        return task.uncancel() <= before

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        nearest: float | None = None
        for task, (due, _) in self._due.items():
            if due <= now:
                if task not in self._expired:
                    self._expired.add(task)
                    task.cancel()
            elif nearest is None or due < nearest:
                nearest = due
        if nearest is not None:
            self._timer = loop.call_at(nearest, self._expire, loop)

    async def _take(self) -> Any:
        conn = await self._pool.get_connection()
        # The attempt's deadline bounds the write and the read: the connection's own socket
        # timeout would only add a task per write and a timer per read.
        conn.socket_timeout = None
        self._taken.append(conn)
        return conn

    async def close(self) -> None:
        """Close the connections; the client's pool, which counts them as in use, is closed
        after this by its owner."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._idle.clear()
        for conn in self._taken:
            await conn.disconnect(nowait=True)
        self._taken.clear()

"""Streaming relay: upstream SSE bytes to the client, usage read on the side.

Lifecycle of one stream: OPEN (headers sent) -> RELAYING (events pass through as the bytes
the provider sent, cut only at event boundaries) -> DONE (upstream ended) or CUT (upstream
failed mid-stream: the client gets a terminating error event) or GONE (the client left: the
caller cancels the relay, and the upstream response is released in ``finally``) or STALLED (the
client stopped reading: a send waited past the write timeout; handled as GONE).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp

from till.server.providers.base import StreamMeter

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# SSE ends an event with a blank line; providers use \n, the spec also allows \r\n and \r.
_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class EventSplitter:
    """Cuts a byte stream into complete SSE events; holds back a partial last event."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._tail + chunk if self._tail else chunk
        events: list[bytes] = []
        start = 0
        if b"\r" in data:
            for m in _BOUNDARY.finditer(data):
                events.append(data[start : m.end()])
                start = m.end()
        else:
            # What providers send: \n only. The same cuts as the pattern's, by bytes.find
            # (the regex was most of the relay's own time).
            end = data.find(b"\n\n")
            while end >= 0:
                events.append(data[start : end + 2])
                start = end + 2
                end = data.find(b"\n\n", start)
        self._tail = data[start:]
        return events

    @property
    def pending(self) -> bool:
        return bool(self._tail)

    def flush(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail


class UpstreamCut(Exception):
    """The upstream stream broke before it ended."""


class ClientStalled(Exception):
    """The client took none of the response for the write timeout: it stopped reading."""


class WriteDeadline:
    """A response's ``send``, bounded: a send that waits ``seconds`` raises ClientStalled.

    The server's send waits (transport drain) while the client's socket buffers are full, and
    aiohttp stops its read timeout while an upstream response is not being read: without this,
    a client that stops reading would hold its stream's upstream connection for good.

    One timer per response, re-armed only when it fires, instead of one per send: a send just
    notes when it began (asyncio.timeout per send would cost about what relaying an event
    does). The timer cancels the task whose send is overdue; that send turns the cancellation
    into ClientStalled (never a TimeoutError: relay_events reads those as the upstream's).
    """

    __slots__ = ("_cancelling", "_expired", "_loop", "_seconds", "_send", "_since", "_task",
                 "_timer", "started")  # fmt: skip

    def __init__(self, send: Send, seconds: float) -> None:
        self._send = send
        self._seconds = seconds
        self._loop = asyncio.get_running_loop()
        self._since: float | None = None  # when the send under way began
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False
        self.started = False  # a message was sent: the response has begun

    async def __call__(self, message: MutableMapping[str, Any]) -> None:
        if self._expired:
            raise ClientStalled(f"took nothing for {self._seconds:g} s")
        task = self._task = asyncio.current_task()
        assert task is not None
        self._cancelling = task.cancelling()
        self._since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._since + self._seconds, self._check)
        self.started = True
        try:
            await self._send(message)
        except asyncio.CancelledError:
            # Ours is undone; a cancellation from elsewhere (the client left) goes on.
            if not self._expired or task.uncancel() > self._cancelling:
                raise
            raise ClientStalled(f"took nothing for {self._seconds:g} s") from None
        finally:
            self._since = None

    def _check(self) -> None:
        self._timer = None
        if self._since is None:
            return  # no send under way: the next one arms the timer again
        due = self._since + self._seconds
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check)
        elif self._task is not None:
            self._expired = True
            self._task.cancel()

    def close(self) -> None:
        """The response is over: drop the timer (it holds this object until it fires)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def relay_events(upstream: aiohttp.ClientResponse, send: Send, meter: StreamMeter) -> None:
    """Pass every event the meter keeps to the client; raise UpstreamCut if upstream breaks."""
    splitter = EventSplitter()
    try:
        if not meter.sse:
            # Not cut into events (Gemini's JSON-array stream): bytes pass as they come.
            async for chunk in upstream.content.iter_any():
                meter.observe(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            return
        async for chunk in upstream.content.iter_any():
            aligned = not splitter.pending
            events = splitter.feed(chunk)
            if not events:
                continue
            kept = [ev for ev in events if meter.keep(ev)]
            if aligned and not splitter.pending and len(kept) == len(events):
                body = chunk  # the common case: whole events in, the same bytes out
            else:
                body = b"".join(kept)
            if body:
                await send({"type": "http.response.body", "body": body, "more_body": True})
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise UpstreamCut(type(exc).__name__) from exc
    rest = splitter.flush()
    if rest and meter.keep(rest):
        await send({"type": "http.response.body", "body": rest, "more_body": True})

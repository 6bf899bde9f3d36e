"""Streaming relay: upstream SSE bytes to the client, usage read on the side.

Lifecycle of one stream: OPEN (headers sent) -> RELAYING (events pass through as the bytes
the provider sent, cut only at event boundaries) -> DONE (upstream ended) or CUT (upstream
failed mid-stream: the client gets a terminating error event) or GONE (the client left: the
caller cancels the relay, and the upstream response is released in ``finally``).
"""

from __future__ import annotations

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
        for m in _BOUNDARY.finditer(data):
            events.append(data[start : m.end()])
            start = m.end()
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

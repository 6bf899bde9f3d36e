"""P17, bounded resources: what a slow, flooding or stalled client can hold of a live Till.

Every bound is set short in the server's environment (TILL_IDLE_TIMEOUT, TILL_BODY_TIMEOUT,
TILL_WRITE_TIMEOUT: 1 s; TILL_MAX_STREAMS: 2; TILL_MAX_BODY_BYTES: 1 KiB), and raw sockets play
the misbehaving client. Without its bound each test waits out its own deadline and fails.
Each runs under both servers `till serve` offers (TILL_SERVER): the bounds on headers are the
server's own (hypercorn) or Till's protocol guard around it (uvicorn, serve.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from tests.conftest import (
    ROOT,
    Mock,
    RedisServer,
    Till,
    create_key,
    get_key,
    own_till,
    stop_process,
)
from till.server.settings import SettingsError, from_env

BOUND = 1.0  # seconds: each timeout in the server's environment
SLACK = 2.0  # seconds past a bound before a test calls it unbounded
MAX_BODY = 1024
# A stream longer than every buffer between the mock and a client that stopped reading (the
# kernel's, up to 4 MiB a socket on loopback, hold 10,000 events): 1,000,000 events of about
# 230 bytes each would take the mock many seconds to write.
LONG_STREAM = 1_000_000
MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def mock_upstream() -> Iterator[Mock]:
    """The mock provider, allowed answers of LONG_STREAM tokens (the shared one stops at
    10,000)."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "mock_upstream.py"), "--port", "0",
         "--max-output-tokens", str(LONG_STREAM)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert line.startswith("LISTENING"), line
    yield Mock(f"http://127.0.0.1:{int(line.split()[1])}", proc)
    stop_process(proc)
    proc.stdout.close()


@pytest.fixture(scope="module", params=["uvicorn", "hypercorn"])
def bounded(
    request: pytest.FixtureRequest, redis_server: RedisServer, mock_upstream: Mock, log_dir: Path
) -> Iterator[Till]:
    with own_till(
        f"bounds-{request.param}", mock_upstream.url, redis_server.url, log_dir,
        TILL_SERVER=request.param,
        TILL_IDLE_TIMEOUT=str(BOUND),
        TILL_BODY_TIMEOUT=str(BOUND),
        TILL_WRITE_TIMEOUT=str(BOUND),
        TILL_MAX_STREAMS="2",
        TILL_MAX_BODY_BYTES=str(MAX_BODY),
    ) as server:  # fmt: skip
        yield server


@pytest.fixture(scope="module")
def admin(bounded: Till) -> Iterator[httpx.Client]:
    with bounded.admin(bounded.new_tenant()) as client:
        yield client


def address(till: Till) -> tuple[str, int]:
    host, port = till.url.removeprefix("http://").split(":")
    return host, int(port)


def request_head(token: str, *headers: str) -> bytes:
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        "host: till",
        f"authorization: Bearer {token}",
        "content-type: application/json",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def assert_untouched(admin: httpx.Client, key: dict[str, Any], mock: Mock) -> None:
    """Nothing reached the provider, and nothing was taken from the key or held for it."""
    assert mock.requests() == []
    after = get_key(admin, key["id"])
    assert after["usedActivations"] == 0
    assert after["heldTokens"] == 0


async def trickle(writer: asyncio.StreamWriter, data: bytes, pause: float) -> None:
    """Write ``data`` one byte at a time; stops quietly when the server hangs up."""
    with contextlib.suppress(ConnectionError):
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(pause)


async def read_to_close(reader: asyncio.StreamReader, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    received = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(limit):
            while chunk := await reader.read(65536):
                received += chunk
    return received, time.monotonic() - started


def test_chunked_flood_is_refused_at_the_cap_and_the_connection_closed(
    bounded: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    """No Content-Length, and a body that never ends: 413 once the cap is passed, then the
    server closes the connection instead of reading on."""
    key = create_key(admin, max_tokens=100_000)
    mock_upstream.reset()
    chunk = b"%x\r\n%s\r\n" % (1024, b"x" * 1024)
    reply, sent, refused, closed = b"", 0, False, False
    with socket.create_connection(address(bounded)) as sock:
        sock.sendall(request_head(key["scopedKey"], "transfer-encoding: chunked"))
        sock.setblocking(False)
        deadline = time.monotonic() + SLACK
        while time.monotonic() < deadline:
            if not refused:
                try:
                    sent += sock.send(chunk)
                except BlockingIOError:
                    pass
                except OSError:
                    refused = True  # the server hung up; what it answered is still readable
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            except ConnectionError:
                closed = True  # reset: the server closed with our flood still unread
                break
            if not data:
                closed = True
                break
            reply += data
    assert closed, f"still open after {SLACK} s and {sent} bytes sent"
    assert sent > MAX_BODY
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"code":"payload_too_large"' in reply
    assert_untouched(admin, key, mock_upstream)


def test_headers_sent_slowly_are_cut_off(
    bounded: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    """Headers at five bytes a second (they would take a minute): the connection is closed
    after TILL_IDLE_TIMEOUT, with no request made of them."""
    key = create_key(admin)
    mock_upstream.reset()
    head = request_head(key["scopedKey"], "x-padding: " + "p" * 250, "content-length: 2")

    async def slow_headers() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection(*address(bounded))
        sending = asyncio.ensure_future(trickle(writer, head + b"{}", 0.2))
        try:
            return await read_to_close(reader, BOUND + SLACK)
        finally:
            sending.cancel()
            writer.close()

    received, took = asyncio.run(slow_headers())
    assert took < BOUND + SLACK, "the connection was still open"
    assert took >= BOUND * 0.9
    assert received == b""  # closed, not answered: no request was ever read
    assert_untouched(admin, key, mock_upstream)


def test_headers_sent_slowly_on_a_kept_alive_connection_are_cut_off(
    bounded: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    """The bound holds for every request of a connection, not just its first: after an answer,
    the next request's headers at five bytes a second are cut off the same way."""
    key = create_key(admin)
    head = request_head(key["scopedKey"], "content-length: 2")

    async def second_request_slowly() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection(*address(bounded))
        writer.write(head.replace(b"POST /v1/chat/completions", b"GET /healthz") + b"{}")
        await writer.drain()
        first = await reader.readuntil(b'{"status":"ok"}')
        assert first.startswith(b"HTTP/1.1 200")
        sending = asyncio.ensure_future(trickle(writer, head + b"{}", 0.2))
        try:
            return await read_to_close(reader, BOUND + SLACK)
        finally:
            sending.cancel()
            writer.close()

    mock_upstream.reset()
    received, took = asyncio.run(second_request_slowly())
    assert took < BOUND + SLACK, "the connection was still open"
    assert received == b""
    assert_untouched(admin, key, mock_upstream)


def test_headers_past_64_kib_are_refused(
    bounded: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    """Headers that never end (a megabyte, at once): refused with 431 or closed once past
    64 KiB (hypercorn's own bound is 16 KiB), never read to their end."""
    key = create_key(admin)
    mock_upstream.reset()
    head = request_head(key["scopedKey"]).removesuffix(b"\r\n")
    flood = b"".join(b"x-flood-%d: %s\r\n" % (i, b"f" * 1000) for i in range(1024))
    reply, closed = b"", False
    with socket.create_connection(address(bounded)) as sock:
        sock.settimeout(BOUND + SLACK)
        sock.sendall(head)
        with contextlib.suppress(ConnectionError, TimeoutError):
            for start in range(0, len(flood), 16384):
                sock.sendall(flood[start : start + 16384])
        try:
            while data := sock.recv(65536):
                reply += data
            closed = True
        except ConnectionError:
            closed = True  # reset: the server closed with our flood still unread
        except TimeoutError:
            pass
    assert closed, "still open"
    if reply:
        assert reply.split(b" ", 2)[:2] == [b"HTTP/1.1", b"431"], reply[:200]
    assert_untouched(admin, key, mock_upstream)


def test_body_sent_slowly_gets_408_before_anything_is_reserved(
    bounded: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    """A body trickling in (never silent for long, so a per-read timeout would not fire)
    gets 408 after TILL_BODY_TIMEOUT in the provider's dialect, and nothing is forwarded,
    reserved or charged."""
    key = create_key(admin, max_tokens=100_000)
    mock_upstream.reset()
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "' + b"x" * 200
    body += b'"}]}'
    head = request_head(key["scopedKey"], f"content-length: {len(body)}")

    async def slow_body() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection(*address(bounded))
        writer.write(head)
        sending = asyncio.ensure_future(trickle(writer, body, 0.2))
        try:
            return await read_to_close(reader, BOUND + SLACK)
        finally:
            sending.cancel()
            writer.close()

    received, took = asyncio.run(slow_body())
    assert took < BOUND + SLACK, "the connection was still open"
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    error = httpx.Response(200, content=received.partition(b"\r\n\r\n")[2]).json()["error"]
    assert error["code"] == "request_timeout"
    assert error["type"] == "invalid_request_error"
    assert_untouched(admin, key, mock_upstream)


def test_a_client_that_stops_reading_loses_its_stream_and_is_charged(
    bounded: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    """A stream whose client reads the headers and then nothing more: once a write to it
    waits TILL_WRITE_TIMEOUT, the upstream connection is closed and the hold is charged."""
    output = LONG_STREAM
    key = create_key(admin, max_tokens=10 * LONG_STREAM)
    mock_upstream.reset()
    body = httpx.Request(
        "POST",
        "http://till",
        json={"model": "gpt-4o", "messages": MESSAGES, "stream": True, "max_tokens": output},
    ).content
    with socket.socket() as sock:
        # A small receive window: the server's writes back up after a few kilobytes.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(address(bounded))
        sock.sendall(request_head(key["scopedKey"], f"content-length: {len(body)}") + body)
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(1024)
            assert data, "closed before the response started"
            head += data
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        stopped = time.monotonic()  # from here on, nothing is read
        record: dict[str, Any] = {}
        while time.monotonic() - stopped < BOUND + 2 * SLACK + 1:
            (record,) = mock_upstream.requests()
            if record.get("ended_at"):
                break
            time.sleep(0.05)
        closed_after = time.monotonic() - stopped
        assert record.get("disconnected"), f"upstream still open: {record}"
        assert not record["completed"]
        assert int(record["output_tokens_sent"]) < output
        # The stall takes a moment to build (megabytes of buffers fill), then the write
        # timeout runs (about 2 s here in all).
        assert closed_after < BOUND + 2 * SLACK
        if bounded.env["TILL_SERVER"] == "uvicorn":
            # Nor does the connection stay, its buffered bytes unsent, while the client holds
            # its end: the kernel drops it (TCP_USER_TIMEOUT, serve.py).
            port = sock.getsockname()[1]
            deadline = time.monotonic() + BOUND + 2 * SLACK
            while client_connected(bounded, port) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not client_connected(bounded, port), "the server still holds the connection"
    # No usage arrived: the key is charged its hold, the upper bound, as for any cut stream.
    after = get_key(admin, key["id"])
    deadline = time.monotonic() + 5
    while after["heldTokens"] and time.monotonic() < deadline:
        time.sleep(0.05)
        after = get_key(admin, key["id"])
    assert after["heldTokens"] == 0
    assert int(after["usedTokens"]) >= output
    assert after["usedActivations"] == 1
    assert "client stopped reading" in bounded.log.read_text()


def client_connected(till: Till, port: int) -> bool:
    """Whether the server process holds a TCP connection to the client's ``port``."""
    conns = psutil.Process(till.proc.pid).net_connections(kind="tcp")
    return any(c.raddr and c.raddr.port == port for c in conns)


def test_streams_over_the_cap_get_503_before_reserving(
    bounded: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    """TILL_MAX_STREAMS=2: with two streams open a third is refused (503, Retry-After, the
    SDK's own error) before it costs the key anything or reaches the provider; once they
    end, streams are served again."""
    key = create_key(admin, max_tokens=100_000)
    token = key["scopedKey"]
    mock_upstream.reset()

    async def run() -> None:
        async with openai.AsyncOpenAI(
            api_key=token, base_url=f"{bounded.url}/v1", max_retries=0
        ) as oa:

            async def open_stream() -> Any:
                return await oa.chat.completions.create(
                    model="gpt-4o",
                    messages=MESSAGES,
                    stream=True,
                    max_tokens=10,
                    extra_headers={"x-mock-delay-ms": "50"},
                )

            first, second = [aiter(s) for s in await asyncio.gather(open_stream(), open_stream())]
            # Both streams are under way (their first events are in) and hold their slots.
            await anext(first)
            await anext(second)
            with pytest.raises(openai.InternalServerError) as refused:
                await open_stream()
            assert refused.value.status_code == 503
            assert refused.value.code == "too_many_streams"
            assert refused.value.response.headers["retry-after"].isdigit()
            assert len(mock_upstream.requests()) == 2
            assert get_key(admin, key["id"])["usedActivations"] == 2
            # A plain request is not a stream: still served.
            await oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            assert [c async for c in first] and [c async for c in second]
            again = await open_stream()
            assert [c async for c in again]

    asyncio.run(run())
    assert len(mock_upstream.requests()) == 4
    after = get_key(admin, key["id"])
    assert after["usedActivations"] == 4
    assert after["heldTokens"] == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TILL_IDLE_TIMEOUT", "0"),
        ("TILL_BODY_TIMEOUT", "-1"),
        ("TILL_WRITE_TIMEOUT", "0"),
        ("TILL_MAX_STREAMS", "0"),
    ],
)
def test_bounds_must_be_positive(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        from_env({name: value})


def test_defaults_are_bounded() -> None:
    settings = from_env({})
    assert settings.idle_timeout == 75
    assert settings.body_timeout == 60
    assert settings.write_timeout == 60
    assert settings.max_streams == 2000

"""The floor: the least a Python proxy can do, forward the request and stream the reply back.

One process, uvloop, an aiohttp server and one pooled aiohttp ClientSession; no parsing, no
auth, no metering. Whatever Till costs on top of this is Till's own::

    python benchmarks/passthrough.py --upstream http://127.0.0.1:PORT [--port 0]

It prints ``LISTENING <port>`` once it listens, then serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

# Hop-by-hop headers (RFC 9110, 7.6.1) and the ones aiohttp sets itself from the body it sends.
REQUEST_DROP = frozenset(
    {"host", "connection", "keep-alive", "transfer-encoding", "content-length"}
)
RESPONSE_DROP = frozenset({"connection", "keep-alive", "transfer-encoding"})

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in REQUEST_DROP}
    body = await request.read()
    url = request.app[UPSTREAM] + request.path_qs
    session = request.app[SESSION]
    async with session.request(request.method, url, headers=headers, data=body) as upstream:
        reply = {k: v for k, v in upstream.headers.items() if k.lower() not in RESPONSE_DROP}
        response = web.StreamResponse(status=upstream.status, headers=reply)
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client left; leaving the block closes the upstream response too
        return response


async def client_session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=False,  # bytes pass through as the upstream sent them
        skip_auto_headers=("User-Agent",),
    )
    yield
    await app[SESSION].close()


async def serve(upstream: str, host: str, port: int) -> None:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(client_session)
    app.router.add_route("*", "/{path:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=2048).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"LISTENING {runner.addresses[0][1]}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.upstream, args.host, args.port))


if __name__ == "__main__":
    main()

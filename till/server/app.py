"""create_app(settings) -> the ASGI app: the proxy, and a Starlette app for admin and health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

import aiohttp
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from till.server.admin import Admin, error_response, json_response
from till.server.embedded import EmbeddedRedis
from till.server.holder import Holder
from till.server.keyfile import load_keyring
from till.server.ledger import Ledger, StoreUnavailable, connect
from till.server.pricing import default_pricer
from till.server.providers.anthropic import ANTHROPIC_FORMAT, AnthropicProvider
from till.server.providers.base import Format, Provider
from till.server.providers.google import GEMINI_FORMAT, GoogleProvider
from till.server.providers.openai import OPENAI_FORMAT, OpenAIProvider
from till.server.proxy import Message, Proxy, Receive, Scope, Send
from till.server.settings import Settings

log = logging.getLogger("till")
access = logging.getLogger("till.access")

REAPER_LOCK: Final = "till:reaper"
ALL_METHODS: Final = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# What Starlette's routes below take in full (a GET route takes HEAD too); any other request
# is the provider's API.
_HEALTH: Final = frozenset({"/healthz", "/readyz"})
_HEALTH_METHODS: Final = frozenset({"GET", "HEAD"})
# The holder's own endpoints (holder.py), by path and method.
_HOLDER: Final = {"/v1/till/key": frozenset({"GET", "HEAD", "DELETE"}), "/v1/till/keys": {"POST"}}
_ADMIN_METHODS: Final = frozenset(ALL_METHODS)


class Runtime:
    """What the app holds while it runs; opened in the lifespan, closed after it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # This worker, in its requests' ids and in the store's heartbeats (ledger.WORKERS).
        self.worker_id = os.urandom(4).hex()
        self._ledger: Ledger | None = None
        self._http: aiohttp.ClientSession | None = None
        self._embedded: EmbeddedRedis | None = None
        # Since when every heartbeat of this worker got through (None: the last one failed).
        self._beating_since: float | None = None

    def ledger(self) -> Ledger:
        if self._ledger is None:
            raise StoreUnavailable("not started")
        return self._ledger

    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None, "the app has not started"
        return self._http

    async def open(self) -> None:
        s = self.settings
        url = s.redis_url
        if url is None:
            self._embedded = EmbeddedRedis(s.data_dir)
            url = await asyncio.to_thread(self._embedded.start)
        self._ledger = Ledger(
            connect(url, timeout=s.redis_timeout, max_connections=s.redis_max_connections)
        )
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=s.upstream_connect_timeout,
                sock_read=s.upstream_read_timeout,
            ),
            auto_decompress=True,
            trust_env=False,  # never route the real key through a proxy from the environment
            # A provider's cookies are never kept: one key's would go out with every other
            # key's requests to that host (and a jar costs a lookup per request).
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._ledger is not None:
            # Stopped cleanly, every request settled: nothing of this worker's to reap.
            with contextlib.suppress(StoreUnavailable):
                await self._ledger.forget_worker(self.worker_id)
            await self._ledger.close()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)

    async def beat_forever(self) -> None:
        """Tell the store this worker lives, six times per TILL_WORKER_TIMEOUT."""
        while True:
            try:
                await self.ledger().heartbeat(self.worker_id)
                if self._beating_since is None:
                    self._beating_since = time.monotonic()
            except StoreUnavailable:
                self._beating_since = None
            except Exception:
                self._beating_since = None
                log.exception("heartbeat failed; retrying")
            await asyncio.sleep(self.settings.worker_timeout / 6)

    def _judges_workers(self) -> bool:
        """Whether this worker may call others dead: only once its own heartbeats have got
        through for a whole TILL_WORKER_TIMEOUT, so that after the store was away, every live
        worker has had the time to beat again."""
        since = self._beating_since
        return since is not None and time.monotonic() - since >= self.settings.worker_timeout

    async def reap_forever(self) -> None:
        """Charge the holds of requests whose worker died (past their deadline, or at once when
        the worker stopped beating); one worker at a time does it."""
        token = os.urandom(8).hex()
        s = self.settings
        while True:
            interval = s.reap_interval
            await asyncio.sleep(interval)
            try:
                ledger = self.ledger()
                got = await ledger.store.set(
                    REAPER_LOCK, token, nx=True, px=max(1, int(interval * 1000))
                )
                if not got:
                    continue
                dead: frozenset[str] = frozenset()
                if self._judges_workers():
                    dead = await ledger.dead_workers(
                        int(s.worker_timeout * 1000), (s.hold_seconds + 86400) * 1000
                    )
                reaped = await ledger.reap(dead=dead - {self.worker_id})
                if reaped:
                    log.info("reaper charged %d holds of workers gone", reaped)
            except StoreUnavailable:
                continue
            except Exception:
                log.exception("reaper failed; retrying")


def providers() -> dict[str, Provider]:
    return {
        "openai": OpenAIProvider(),
        "anthropic": AnthropicProvider(),
        "google": GoogleProvider(),
    }


def formats() -> list[Format]:
    """Error dialects by path, most specific first: OpenAI's /v1/ is the fallback."""
    return [ANTHROPIC_FORMAT, GEMINI_FORMAT, OPENAI_FORMAT]


class Dispatch:
    """The app the server runs: proxy requests go straight to the proxy, the rest (lifespan,
    health, admin) to Starlette.

    Starlette's routing and exception middleware cost the proxy, on every request, about what
    its own checks do, and bring it nothing: it answers its own errors, in the provider's
    dialect (an unexpected exception too, see Proxy.__call__). Requests are split as
    Starlette's routes would split them: ``/healthz`` and ``/readyz`` by GET or HEAD, the
    holder's ``/v1/till/key`` and ``/v1/till/keys`` by their methods, and ``/admin`` and
    everything under it by one of ALL_METHODS; anything else is the provider's API, which
    Starlette too would have routed to the proxy.
    """

    __slots__ = ("_proxy", "app", "log_access")

    def __init__(self, app: Starlette, proxy: Proxy, *, log_access: bool = False) -> None:
        self.app = app
        self._proxy = proxy
        self.log_access = log_access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif self.log_access:
            await _logged(self._route, scope, receive, send)
        else:
            await self._route(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _for_starlette(scope["path"], scope["method"]):
            await self.app(scope, receive, send)
        else:
            await self._proxy(scope, receive, send)


async def _logged(
    app: Callable[[Scope, Receive, Send], Awaitable[None]],
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    """TILL_ACCESS_LOG: a line per request once its response is sent (or abandoned):
    ``CLIENT "METHOD /path" STATUS BYTES SECONDSs``. The path only: a query string may carry a
    token (?key=...), which no log line may."""
    started = time.perf_counter()
    status, size = 0, 0

    async def counted(message: Message) -> None:
        nonlocal status, size
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            size += len(message.get("body", b""))
        await send(message)

    try:
        await app(scope, receive, counted)
    finally:
        client = (scope.get("client") or ("-", 0))[0]
        access.info(
            '%s "%s %s" %d %d %.6fs', client, scope["method"], scope["path"], status, size,
            time.perf_counter() - started,
        )  # fmt: skip


def _for_starlette(path: str, method: str) -> bool:
    if path.startswith("/admin") and (len(path) == 6 or path[6] == "/"):
        return method in _ADMIN_METHODS
    if path in _HEALTH:
        return method in _HEALTH_METHODS
    methods = _HOLDER.get(path)
    return methods is not None and method in methods


def create_app(settings: Settings) -> Dispatch:
    keyring = load_keyring(settings)
    runtime = Runtime(settings)
    proxy = Proxy(
        settings, keyring, runtime.ledger, runtime.http, providers(), formats(), default_pricer,
        worker_id=runtime.worker_id,
    )  # fmt: skip
    admin = Admin(runtime.ledger, keyring)
    holder = Holder(proxy.gate, runtime.ledger)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.open()
        beat = asyncio.create_task(runtime.beat_forever())
        reaper = asyncio.create_task(runtime.reap_forever())
        try:
            yield
        finally:
            reaper.cancel()
            await proxy.drain()
            # Beating until every request is settled: others must not reap what it drains.
            beat.cancel()
            await runtime.close()

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            await runtime.ledger().check()
        except StoreUnavailable:
            return error_response("store_unavailable", "The store does not answer.")
        return json_response({"status": "ready"})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_json")
        return error_response(code, str(exc.detail))

    async def server_error(request: Request, exc: Exception) -> Response:
        # Starlette re-raises after this handler, and the server logs the traceback.
        return error_response("internal_error", "Till failed to handle this request.")

    async def admin_fallback(request: Request) -> Response:
        # Without this, an unknown admin path or method would fall through to the proxy.
        path = request.url.path
        allowed = sorted(
            {m for r in admin_routes if r.path_regex.fullmatch(path) for m in r.methods or ()}
        )
        if not allowed:
            return error_response("not_found", f"No admin route {path}.")
        response = error_response("method_not_allowed", f"{request.method} is not allowed here.")
        response.headers["allow"] = ", ".join(allowed)
        return response

    admin_routes = admin.routes()
    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *admin_routes,
        *holder.routes(),
        Route("/admin", admin_fallback, methods=ALL_METHODS),
        Route("/admin/{rest:path}", admin_fallback, methods=ALL_METHODS),
        # Everything else is the provider's API, behind the scoped token: Dispatch sends it to
        # the proxy, and this route is never reached (kept so Starlette alone answers alike).
        Route("/{path:path}", proxy),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    app.state.runtime = runtime
    return Dispatch(app, proxy, log_access=settings.access_log)

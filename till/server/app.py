"""create_app(settings) -> the Starlette app: admin routes, health, and the proxy behind them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from till.server.admin import Admin, error_response, json_response
from till.server.embedded import EmbeddedRedis
from till.server.keyfile import load_keyring
from till.server.ledger import Ledger, StoreUnavailable, connect
from till.server.pricing import default_pricer
from till.server.providers.anthropic import ANTHROPIC_FORMAT, AnthropicProvider
from till.server.providers.base import Format, Provider
from till.server.providers.google import GEMINI_FORMAT, GoogleProvider
from till.server.providers.openai import OPENAI_FORMAT, OpenAIProvider
from till.server.proxy import Proxy
from till.server.settings import Settings

log = logging.getLogger("till")

REAPER_LOCK: Final = "till:reaper"
ALL_METHODS: Final = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class Runtime:
    """What the app holds while it runs; opened in the lifespan, closed after it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ledger: Ledger | None = None
        self._http: aiohttp.ClientSession | None = None
        self._embedded: EmbeddedRedis | None = None

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
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._ledger is not None:
            await self._ledger.close()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)

    async def reap_forever(self) -> None:
        """Charge the holds of requests whose worker died; one worker at a time does it."""
        token = os.urandom(8).hex()
        while True:
            interval = self.settings.reap_interval
            await asyncio.sleep(interval)
            try:
                ledger = self.ledger()
                got = await ledger.store.set(
                    REAPER_LOCK, token, nx=True, px=max(1, int(interval * 1000))
                )
                if got:
                    reaped = await ledger.reap()
                    if reaped:
                        log.info("reaper charged %d expired holds", reaped)
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


def create_app(settings: Settings) -> Starlette:
    keyring = load_keyring(settings)
    runtime = Runtime(settings)
    proxy = Proxy(
        settings, keyring, runtime.ledger, runtime.http, providers(), formats(), default_pricer
    )
    admin = Admin(runtime.ledger, keyring)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.open()
        reaper = asyncio.create_task(runtime.reap_forever())
        try:
            yield
        finally:
            reaper.cancel()
            await proxy.drain()
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
        # Starlette re-raises after this handler, and hypercorn logs the traceback.
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
        Route("/admin", admin_fallback, methods=ALL_METHODS),
        Route("/admin/{rest:path}", admin_fallback, methods=ALL_METHODS),
        # Everything else is the provider's API, behind the scoped token.
        Route("/{path:path}", proxy),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    app.state.runtime = runtime
    return app

"""Dispatch: proxy requests go around Starlette, and nothing else does.

The split must be the one Starlette's own routes made (test_admin, test_health and
test_openapi check what each side answers); here, which side gets what, and the 500 that an
unexpected exception in the proxy still gets, in the provider's dialect.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from till.server.app import Dispatch, formats, providers
from till.server.ledger import Ledger
from till.server.pricing import default_pricer
from till.server.proxy import Proxy
from till.server.settings import Settings
from till.tokens import Keyring, TokenClaims, seal

Message = dict[str, Any]


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.seen.append((scope.get("method", ""), scope.get("path", scope["type"])))


def http(method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    return {"type": "http", "method": method, "path": path, "query_string": b"",
            "headers": headers or [], "client": ("127.0.0.1", 1)}  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "starlette"),
    [
        ("GET", "/healthz", True),
        ("HEAD", "/readyz", True),
        ("POST", "/healthz", False),  # Starlette's GET route only half-matched: the proxy's
        ("GET", "/healthz/", False),
        ("GET", "/admin", True),
        ("POST", "/admin/keys", True),
        ("DELETE", "/admin/keys/abc", True),
        ("OPTIONS", "/admin/nowhere", True),
        ("TRACE", "/admin/keys", False),  # not one of the admin fallback's methods
        ("GET", "/administrator", False),
        ("GET", "//admin", False),
        ("POST", "/v1/chat/completions", False),
        ("GET", "/", False),
    ],
)
async def test_each_request_goes_where_starlette_routed_it(
    method: str, path: str, starlette: bool
) -> None:
    app, proxy = Recorder(), Recorder()
    dispatch = Dispatch(app, proxy)  # type: ignore[arg-type]
    await dispatch(http(method, path), None, None)  # type: ignore[arg-type]
    assert (app.seen, proxy.seen) == (
        ([(method, path)], []) if starlette else ([], [(method, path)])
    )


async def test_lifespan_goes_to_starlette() -> None:
    app, proxy = Recorder(), Recorder()
    await Dispatch(app, proxy)({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert app.seen == [("", "lifespan")] and proxy.seen == []


async def test_an_unexpected_exception_is_a_500_in_the_dialect_then_raised() -> None:
    keyring = Keyring.generate("d1")
    claims = TokenClaims(
        key_id="abcdefghijklmnop", tenant_id="t" * 16, provider="openai", upstream_key="sk-x"
    )
    token = seal(keyring, claims)

    def broken_ledger() -> Ledger:
        raise RuntimeError("a bug")

    proxy = Proxy(
        Settings(), keyring, broken_ledger, lambda: None,  # type: ignore[arg-type,return-value]
        providers(), formats(), default_pricer,
    )  # fmt: skip
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b'{"model":"gpt-4o"}', "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = http("POST", "/v1/chat/completions", [(b"authorization", f"Bearer {token}".encode())])
    with pytest.raises(RuntimeError, match="a bug"):
        await proxy(scope, receive, send)
    assert sent[0]["status"] == 500
    error = msgspec.json.decode(sent[1]["body"])["error"]
    assert (error["code"], error["type"]) == ("internal_error", "server_error")

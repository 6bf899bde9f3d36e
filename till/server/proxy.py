"""The proxy route: authenticate -> reserve -> forward -> relay -> settle.

A raw ASGI app: the hot path owns its request lifecycle (body cap, client disconnects,
settlement that survives cancellation) instead of going through a buffering response class.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl

import aiohttp

from till.errors import LIMIT_CODES, RATE_CODES
from till.server.access import Gate, ProxyError
from till.server.allowlist import check_model, filter_model_list
from till.server.ledger import (
    MICROCENTS_PER_CENT,
    Admission,
    Idempotency,
    Ledger,
    Refused,
    Settlement,
    StoreUnavailable,
    month_of,
)
from till.server.pricing import Pricer, Rates, Usage
from till.server.providers.base import (
    BadRequest,
    Body,
    Format,
    Provider,
    RequestInfo,
    Route,
    StreamMeter,
    decode_body,
    encode,
)
from till.server.relay import ClientStalled, UpstreamCut, WriteDeadline, relay_events
from till.server.settings import Settings
from till.tokens import Keyring, TokenClaims

log = logging.getLogger("till.proxy")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Request headers never passed to the provider: the client's credentials (the Till token),
# hop-by-hop and recomputed headers, and headers that would pick another organization, project
# or billing account of the upstream key than the one its owner sealed.
DROP_REQUEST_HEADERS: Final = frozenset(
    {b"authorization", b"x-api-key", b"x-goog-api-key", b"cookie", b"host", b"content-length",
     b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
     b"proxy-authorization", b"proxy-connection", b"expect", b"accept-encoding",
     b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-real-ip",
     b"openai-organization", b"openai-project", b"x-goog-user-project",
     # Google system parameters: a response field mask (could drop usageMetadata), a method
     # override, another API version than the path names.
     b"x-goog-fieldmask", b"x-http-method-override", b"x-goog-api-version",
     # Till answers retries itself (and the value says nothing to the provider).
     b"idempotency-key"}
)  # fmt: skip
# Response headers never passed back: hop-by-hop, recomputed, or naming the key's owner.
DROP_RESPONSE_HEADERS: Final = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
     b"proxy-authenticate", b"content-length", b"content-encoding", b"set-cookie",
     b"openai-organization", b"openai-project", b"anthropic-organization-id", b"alt-svc",
     b"date", b"server"}
)  # fmt: skip
# What aiohttp refuses to send in a header value (it would raise after the reservation) and
# no provider wants: control characters. h11 and h2 let some through.
UNSENDABLE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Headers passed on to the provider, all together: an SDK sends about 1 KiB.
MAX_FORWARDED_HEADER_BYTES: Final = 16 * 1024
# Endpoints whose answer has no output tokens: nothing to cap, nothing to reserve for it.
NO_OUTPUT_KINDS: Final = frozenset({"embeddings", "embed", "count_tokens"})
RETRY_AFTER_SECONDS: Final = "2"
MAX_IDEMPOTENCY_KEY: Final = 255


class ClientGone(Exception):
    """The client went away before its request body arrived."""


def estimate_input_tokens(body: bytes) -> int:
    # No tokenizer on the hot path: one token per three bytes of JSON over-counts text in
    # every script we know of (English runs near four characters a token, and JSON adds
    # quotes and keys), so the hold errs on the safe side; settlement uses the real figure.
    return len(body) // 3 + 1


@dataclass(slots=True)
class Exchange:
    """One request's state, filled in as it goes; settlement reads it exactly once."""

    claims: TokenClaims
    provider: Provider
    route: Route
    info: RequestInfo
    request_id: str
    month: str
    usage: Usage | None = None
    model: str = ""
    # Unknown usage charges the hold; "zero" when nothing was served (an upstream error).
    charge_zero: bool = False
    refund: bool = False
    meter: StreamMeter | None = None
    # What the body alone is estimated to hold (tokens), for answers that report no usage.
    input_estimate: int = 0
    # The key has a token or spend limit, so the reservation holds the worst case.
    limited: bool = False
    settled: bool = False
    settlement: Settlement | None = None
    # The request carried an Idempotency-Key; completed: a whole 2xx answer, so its retries
    # are refused rather than forwarded.
    idempotency: Idempotency | None = None
    completed: bool = False


class Proxy:
    def __init__(
        self,
        settings: Settings,
        keyring: Keyring,
        ledger: Callable[[], Ledger],
        http: Callable[[], aiohttp.ClientSession],
        providers: dict[str, Provider],
        formats: Sequence[Format],
        pricer: Pricer,
        *,
        worker_id: str = "",
    ) -> None:
        self.settings = settings
        # Request ids start with it ("<worker>-<random>"): the reaper knows whose hold it is.
        self._id_prefix = f"{worker_id}-" if worker_id else ""
        self.gate = Gate(keyring, settings.trusted_proxies)
        self._ledger = ledger
        self._http = http
        self.providers = providers
        self.formats = tuple(formats)
        self.pricer = pricer
        self._settling: set[asyncio.Task[Any]] = set()
        # Streams open in this worker, against settings.max_streams.
        self._streams = 0

    async def drain(self) -> None:
        """Wait for settlements still running (shutdown)."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        deadline = WriteDeadline(send, self.settings.write_timeout)
        try:
            try:
                await self._handle(scope, receive, deadline)
            except ProxyError as exc:
                await self._refuse(scope, deadline, exc)
        except ClientStalled:
            # Whatever it had reserved is settled already, its upstream closed.
            log.warning(
                "client stopped reading: response dropped after %gs (TILL_WRITE_TIMEOUT)",
                self.settings.write_timeout,
            )
        except (ClientGone, OSError):
            # The client went away; whatever it had reserved is settled already.
            return
        except Exception:
            # A bug: answered as a 500 if the response has not begun, then up to the server,
            # which logs it (what Starlette's error middleware did in front of the proxy).
            if not deadline.started:
                error = ProxyError("internal_error", "Till failed to handle this request.")
                await self._refuse(scope, deadline, error)
            raise
        finally:
            deadline.close()

    async def _refuse(self, scope: Scope, send: Send, exc: ProxyError) -> None:
        # The client's SDK is known by the path it called: answer in its dialect.
        dialect = self._dialect(scope["path"])
        headers = [(b"content-type", b"application/json")]
        if exc.status == 503:
            headers.append((b"retry-after", RETRY_AFTER_SECONDS.encode()))
        if exc.final:
            headers.append((b"x-should-retry", b"false"))
        if exc.retry_after_ms is not None:
            # Whole seconds (rounded up) for every client; the openai and anthropic SDKs read
            # the milliseconds first.
            seconds = max(1, math.ceil(exc.retry_after_ms / 1000))
            headers.append((b"retry-after", str(seconds).encode()))
            headers.append((b"retry-after-ms", str(exc.retry_after_ms).encode()))
        body = dialect.error_body(exc.status, exc.code, exc.message, exc.extra)
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _dialect(self, path: str) -> Format:
        for fmt in self.formats:
            if fmt.speaks(path):
                return fmt
        return self.formats[-1]

    # --- the request ---

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        key = self.gate.admit(scope, headers)
        method, path = scope["method"], scope["path"]
        provider = self.providers.get(key.claims.provider)
        query = scope.get("query_string", b"")
        route = None if provider is None else provider.route(method, path, query)
        if provider is None or route is None:
            # The path is not echoed: it is the client's input and may hold anything.
            raise ProxyError("not_found", f"Till does not forward {method} requests to this path.")
        self.gate.check(scope, headers, key)
        forward = _forwarded_headers(headers)

        # Step 3: body, estimate, reserve.
        raw = await self._read_body(receive, headers) if method == "POST" else b""
        body: Body = {}
        info = RequestInfo(asked_output=0)
        if route.metered:
            try:
                body = decode_body(raw)
            except BadRequest as exc:
                raise ProxyError("invalid_json", str(exc)) from None
            info = route.format.inspect(route, body)
        if key.claims.allowed_models:
            raw = check_model(key.claims.allowed_models, route, method, raw, info)
        ex = Exchange(
            key.claims,
            provider,
            route,
            info,
            self._id_prefix + os.urandom(8).hex(),
            month_of(time.time()),
        )
        idempotency_key = headers.get(b"idempotency-key")
        if idempotency_key is not None:
            ex.idempotency = self._idempotency(key.claims.key_id, idempotency_key, scope, raw)
        input_tokens = ex.input_estimate = estimate_input_tokens(raw) if route.metered else 0
        if info.hidden_input:
            input_tokens += self.settings.hidden_input_tokens
        stream = info.stream or route.stream
        if stream:
            # Refused before the reservation: an overloaded worker costs the key nothing.
            if self._streams >= self.settings.max_streams:
                raise ProxyError(
                    "too_many_streams", "Till has too many open streams; retry shortly."
                )
            self._streams += 1
        try:
            admission = await self._reserve(ex, input_tokens)
            ex.limited = admission.grant >= 0
            try:
                if route.metered and route.format.rewrite(route, body, info, admission.grant):
                    raw = encode(body)
                await self._exchange(scope, receive, send, forward, ex, raw, admission)
            finally:
                if not ex.settled:
                    # Shielded: a cancelled request (client gone, shutdown) still settles.
                    task = asyncio.ensure_future(self._settle(ex))
                    self._settling.add(task)
                    task.add_done_callback(self._settling.discard)
                    await asyncio.shield(task)
        finally:
            if stream:
                self._streams -= 1

    def _idempotency(self, key_id: str, value: bytes, scope: Scope, raw: bytes) -> Idempotency:
        """The ledger's view of an Idempotency-Key: its record is named by the key id and the
        value (hashed: the value is the client's, and may hold anything), and a retry must send
        the same method, path, query and body."""
        if not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY or not value.isascii():
            raise ProxyError(
                "invalid_header",
                f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} ASCII characters.",
            )
        digest = hashlib.blake2b(value, digest_size=16, key=key_id.encode()).hexdigest()
        request = hashlib.blake2b(digest_size=16)
        for part in (scope["method"].encode(), scope["path"].encode(), scope["query_string"]):
            request.update(part)
            request.update(b"\0")
        request.update(raw)
        return Idempotency(digest, request.hexdigest(), self.settings.idempotency_seconds)

    async def _read_body(self, receive: Receive, headers: dict[bytes, bytes]) -> bytes:
        limit = self.settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ProxyError("invalid_json", "Content-Length is not a number.")
            if int(declared) > limit:
                raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        # One deadline for the whole body: a client trickling bytes never falls silent long
        # enough for a per-read timeout. Nothing is reserved yet, so a 408 costs nothing.
        timeout = self.settings.body_timeout
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientGone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(limit)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise ProxyError(
                "request_timeout", f"The request body did not arrive within {timeout:g} seconds."
            ) from None

    async def _reserve(self, ex: Exchange, input_tokens: int) -> Admission:
        info = ex.info
        rates: Rates | None = None
        if not ex.route.metered:
            rates = Rates(0, 0)  # no body and no usage (countTokens, model lists): nothing priced
        elif info.model:
            rates = self.pricer.rates(ex.provider.name, info.model)
        produces_output = ex.route.metered and ex.route.kind not in NO_OUTPUT_KINDS
        try:
            return await self._ledger().reserve(
                tenant_id=ex.claims.tenant_id,
                key_id=ex.claims.key_id,
                request_id=ex.request_id,
                month=ex.month,
                input_tokens=input_tokens,
                asked_output=info.asked_output,
                default_output=self.settings.default_max_output_tokens * info.generations,
                input_microcents=-1
                if rates is None
                else math.ceil(input_tokens * rates.input_nanocents_per_token / 1000),
                output_nanocents=-1 if rates is None else rates.output_nanocents_per_token,
                hold_seconds=self.settings.hold_seconds,
                min_output=info.generations if produces_output else 0,
                rate_window_ms=self.settings.rate_window_seconds * 1000,
                ancestors=ex.claims.parents,
                idempotency=ex.idempotency,
            )
        except StoreUnavailable:
            raise ProxyError(
                "store_unavailable", "Till's budget store is unavailable; retry shortly."
            ) from None
        except Refused as exc:
            raise _refusal(exc, info.model, self.settings.rate_window_seconds) from None

    # --- steps 4 and 5: forward and relay ---

    async def _exchange(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        forward: list[tuple[str, str]],
        ex: Exchange,
        raw: bytes,
        admission: Admission,
    ) -> None:
        provider = ex.provider
        forward = forward + provider.auth_headers(ex.claims.upstream_key, ex.route)
        try:
            upstream = await self._http().request(
                scope["method"],
                self.settings.upstream(provider.name) + ex.route.upstream_path,
                params=_upstream_query(scope.get("query_string", b"")) or None,
                data=raw if scope["method"] == "POST" else None,
                headers=forward,
                allow_redirects=False,
            )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
            # Never connected: the provider never saw the request, which costs nothing.
            ex.refund, ex.charge_zero = True, True
            raise ProxyError("upstream_unavailable", "The provider could not be reached.") from None
        except ValueError:
            # aiohttp refused to build the request (nothing was sent): a backstop, since the
            # headers were checked before the reservation.
            ex.refund, ex.charge_zero = True, True
            raise ProxyError("invalid_header", "The request could not be forwarded.") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The request was sent: the provider may have served (and billed) it anyway.
            raise _broke_off(ex, exc, "The provider did not answer.") from None
        try:
            status = upstream.status
            if 300 <= status < 400:
                # Never followed, and the Location never passed on: it could lead a client,
                # and its token, to another host.
                ex.charge_zero = True
                raise ProxyError("upstream_unavailable", "The provider answered with a redirect.")
            out_headers = _response_headers(upstream, ex.request_id)
            ctype = upstream.headers.get("content-type", "")
            if status < 400 and (ctype.startswith("text/event-stream") or ex.route.stream):
                out_headers += _remaining_headers(admission)
                await self._stream(receive, send, upstream, out_headers, ex, status)
                return
            try:
                data = await upstream.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise _broke_off(ex, exc, "The provider's answer broke off.") from None
            if status >= 400 or not ex.route.metered:
                # An upstream error bills nothing: the activation counts, the hold is released.
                ex.charge_zero = True
                if status < 400 and ex.route.kind == "models" and ex.claims.allowed_models:
                    data = filter_model_list(data, ex.claims.allowed_models)
            else:
                ex.usage, ex.model = ex.route.format.usage(ex.route, data)
                ex.completed = True
                if ex.usage is None and ex.route.kind in NO_OUTPUT_KINDS:
                    # No usage in the answer (Gemini's embeddings): charge the input estimate,
                    # which a key without limits never held.
                    ex.usage = Usage(input_tokens=ex.input_estimate)
            settlement = await self._settle(ex)
            out_headers += _remaining_headers(settlement or admission)
            out_headers.append((b"content-length", str(len(data)).encode()))
            await send({"type": "http.response.start", "status": status, "headers": out_headers})
            await send({"type": "http.response.body", "body": data, "more_body": False})
        finally:
            upstream.release()

    async def _stream(
        self,
        receive: Receive,
        send: Send,
        upstream: aiohttp.ClientResponse,
        out_headers: list[tuple[bytes, bytes]],
        ex: Exchange,
        status: int,
    ) -> None:
        meter = ex.meter = ex.route.format.meter(ex.route, ex.info)
        out_headers.append((b"x-accel-buffering", b"no"))
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        relay = asyncio.ensure_future(relay_events(upstream, send, meter))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({relay, watch}, return_when=asyncio.FIRST_COMPLETED)
            cut = relay.exception() if relay in done else None
            if relay not in done or isinstance(cut, ClientStalled):
                # The client left or stopped reading: stop reading and drop the upstream
                # connection now. A stall goes on up, to be logged.
                relay.cancel()
                await asyncio.gather(relay, return_exceptions=True)
                upstream.close()
                self._take_usage(ex, meter, complete=False)
                if cut is not None:
                    raise cut
                return
            if isinstance(cut, UpstreamCut):
                log.warning("upstream stream broke off (%s)", cut)
                error = ex.route.format.error_body(
                    502, "upstream_unavailable", "The provider's stream broke off.", {}
                )
                await send(
                    {"type": "http.response.body",
                     "body": ex.route.format.stream_error(ex.route, error), "more_body": True}
                )  # fmt: skip
            elif cut is not None:
                raise cut
        finally:
            watch.cancel()
            relay.cancel()
        self._take_usage(ex, meter, complete=not isinstance(cut, UpstreamCut))
        # Settle before the stream's end reaches the client: a read after it sees the usage.
        await self._settle(ex)
        await send({"type": "http.response.body", "body": meter.trailer, "more_body": False})

    @staticmethod
    def _take_usage(ex: Exchange, meter: StreamMeter, *, complete: bool) -> None:
        """A stream that ended early may have cost the provider more than the usage seen so
        far: a limited key is charged its hold, the upper bound, instead (usage left None). A
        key without limits holds nothing, so it is charged what was seen."""
        if complete:
            ex.usage, ex.model = meter.usage, meter.model
            ex.completed = True
        elif not ex.limited:
            ex.usage, ex.model = meter.usage or meter.partial, meter.model

    # --- step 6: settle ---

    async def _settle(self, ex: Exchange) -> Settlement | None:
        if ex.settled:
            return ex.settlement
        ex.settled = True
        tokens: int | None = None
        cost: int | None = None
        if ex.usage is not None:
            tokens = ex.usage.total_tokens
            cost = self._cost(ex.provider.name, (ex.model, ex.info.model), ex.usage)
        elif ex.charge_zero:
            tokens, cost = 0, 0
        try:
            ex.settlement = await self._ledger().settle(
                tenant_id=ex.claims.tenant_id,
                key_id=ex.claims.key_id,
                request_id=ex.request_id,
                month=ex.month,
                tokens=tokens,
                microcents=cost,
                refund_activation=ex.refund,
                ancestors=ex.claims.parents,
                idempotency=ex.idempotency,
                completed=ex.completed,
            )
        except StoreUnavailable:
            # The ledger keeps retrying in the background; if the store stays away, the hold
            # stays and the reaper charges it once its deadline passes.
            log.warning("settlement deferred: store unavailable")
        return ex.settlement

    def _cost(self, provider: str, models: tuple[str, ...], usage: Usage) -> int:
        for model in models:
            if model:
                cost = self.pricer.cost_microcents(provider, model, usage)
                if cost is not None:
                    return cost
        return 0


def _too_large(limit: int) -> ProxyError:
    return ProxyError("payload_too_large", f"Request bodies are limited to {limit} bytes.")


def _broke_off(ex: Exchange, exc: BaseException, message: str) -> ProxyError:
    """A request sent upstream whose answer never came whole. Its usage is unknown, so a
    limited key is charged its hold, the upper bound (as for a stream that ends early); a key
    without limits held nothing and is charged nothing. A silence past the read timeout is a
    504, anything else a 502."""
    ex.charge_zero = not ex.limited
    if isinstance(exc, TimeoutError):
        return ProxyError("upstream_timeout", message)
    return ProxyError("upstream_unavailable", message)


_IDEMPOTENCY_MESSAGES: Final = {
    "idempotency_in_progress": "A request with this Idempotency-Key is still running; "
    "retry shortly.",
    "idempotent_request_completed": "The request with this Idempotency-Key completed (request "
    "{request_id}) and was paid once; Till keeps no copy of answers. Send a new "
    "Idempotency-Key to ask again.",
    "idempotency_key_reused": "This Idempotency-Key was used with another request; a retry "
    "must send the same request.",
}


def _refusal(exc: Refused, model: str, window_seconds: int = 60) -> ProxyError:
    code = exc.code
    if code in _IDEMPOTENCY_MESSAGES:
        if code == "idempotency_in_progress":
            return ProxyError(code, _IDEMPOTENCY_MESSAGES[code], retry_after_ms=exc.retry_after_ms)
        message = _IDEMPOTENCY_MESSAGES[code].format(request_id=exc.detail)
        if code == "idempotent_request_completed":
            return ProxyError(code, message, final=True, request_id=exc.detail)
        return ProxyError(code, message)
    # A child key is refused by its own limits, or by those of a key above it.
    whose = "This key's parent key's" if exc.detail == "parent" else "This key's"
    if code in RATE_CODES:
        limit, used = exc.limit, exc.used
        if code == "rate_limited":
            per = "minute" if window_seconds == 60 else f"{window_seconds} seconds"
            message = f"{whose} rate limit is reached: {limit} requests per {per}."
        else:
            message = f"{whose} concurrency limit is reached: {used} of {limit} in flight."
        return ProxyError(
            code, message, retry_after_ms=exc.retry_after_ms,
            limit=limit, used=used, remaining=0,
        )  # fmt: skip
    if code == "unknown_model_price":
        return ProxyError(
            code,
            f"This key has a spend limit and Till knows no price for model {model!r}.",
            model=model,
        )
    if code not in LIMIT_CODES:
        if exc.detail == "parent" and code in ("key_revoked", "key_expired"):
            state = "revoked" if code == "key_revoked" else "expired"
            return ProxyError(code, f"This key's parent key has been {state}.")
        messages = {
            "key_revoked": "This key has been revoked.",
            "key_expired": "This key has expired.",
            "invalid_api_key": "Incorrect API key provided.",
            "tenant_suspended": "This key's account is suspended.",
        }
        return ProxyError(code, messages.get(code, "This key cannot be used."))
    limit, used, remaining = exc.limit, exc.used, exc.remaining
    what = {
        "activation_limit_reached": "activations",
        "token_limit_reached": "tokens",
        "spend_limit_reached": "spend",
        "monthly_quota_reached": "monthly activations",
    }[code]
    if code == "spend_limit_reached":
        # Cents on the wire, as the key's limit was given.
        limit_c, used_c, rem_c = (
            round(v / MICROCENTS_PER_CENT, 6) for v in (limit, used, remaining)
        )
        return ProxyError(
            code,
            f"{whose} spend limit is reached: {used_c} of {limit_c} cents used.",
            limit=limit_c, used=used_c, remaining=rem_c, unit="cents",
        )  # fmt: skip
    return ProxyError(
        code,
        f"{whose} {what} limit is reached: {used} of {limit} used, {remaining} remaining.",
        limit=limit, used=used, remaining=remaining, unit=what,
    )  # fmt: skip


def _forwarded_headers(headers: dict[bytes, bytes]) -> list[tuple[str, str]]:
    """The client's headers that go on to the provider, checked before anything is reserved."""
    forward = []
    size = 0
    for name, value in headers.items():
        if name in DROP_REQUEST_HEADERS:
            continue
        if UNSENDABLE.search(value):
            # The header is not named: it is the client's input and may hold anything.
            raise ProxyError("invalid_header", "A request header holds a control character.")
        size += len(name) + len(value)
        forward.append((name.decode("latin-1"), value.decode("latin-1")))
    if size > MAX_FORWARDED_HEADER_BYTES:
        raise ProxyError(
            "headers_too_large",
            f"Request headers are limited to {MAX_FORWARDED_HEADER_BYTES} bytes.",
        )
    return forward


def _upstream_query(query_string: bytes) -> list[tuple[str, str]]:
    # The client's ?key= is its Till token: never forwarded.
    if not query_string:
        return []
    return [(k, v) for k, v in parse_qsl(query_string.decode("latin-1")) if k != "key"]


def _response_headers(
    upstream: aiohttp.ClientResponse, request_id: str
) -> list[tuple[bytes, bytes]]:
    # The bytes as received: nothing decoded to be encoded again.
    out = [
        (name, value)
        for name, value in ((k.lower(), v) for k, v in upstream.raw_headers)
        if name not in DROP_RESPONSE_HEADERS
    ]
    out.append((b"x-till-request-id", request_id.encode()))
    return out


def _remaining_headers(state: Admission | Settlement) -> list[tuple[bytes, bytes]]:
    out = [(b"x-till-remaining-activations", str(max(0, state.remaining_activations)).encode())]
    if state.remaining_tokens is not None:
        out.append((b"x-till-remaining-tokens", str(state.remaining_tokens).encode()))
    if state.remaining_microcents is not None:
        cents = state.remaining_microcents / MICROCENTS_PER_CENT
        out.append(
            (b"x-till-remaining-spend-cents", f"{cents:.6f}".rstrip("0").rstrip(".").encode())
        )
    return out


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return

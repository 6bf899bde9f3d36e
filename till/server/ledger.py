"""Budgets and admin records in Redis.

Every Redis key of a tenant carries the hash tag ``{t:<tenant>}`` so each script touches one
slot (Redis Cluster runs them without CROSSSLOT). Amounts are integers: tokens, and money in
micro-cents (1 cent = 1,000,000). Redis errors stop here and leave as ``StoreUnavailable``.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from importlib import resources
from typing import Any, Final, TypeVar

import msgspec
import redis
import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from till.server.lane import Lane, pack
from till.server.plans import PLANS, Plan
from till.tokens import new_tenant_id

log = logging.getLogger("till.ledger")

MICROCENTS_PER_CENT: Final = 1_000_000
ADMIN_PREFIX: Final = "till_admin_"
MONTH_TTL_SECONDS: Final = 40 * 86400
# A key's `rpm` counts requests in a sliding window of this length (TILL_RATE_WINDOW_SECONDS).
RATE_WINDOW_MS: Final = 60_000
SETTLED_TTL_SECONDS: Final = 86400
# A retry under the same Idempotency-Key within this long is answered, not forwarded again
# (TILL_IDEMPOTENCY_SECONDS).
IDEMPOTENCY_TTL_SECONDS: Final = 86400
# Child keys nest at most this deep: a key's ancestors ride in its token and in every script
# call of its requests.
MAX_ANCESTORS: Final = 4
# Revoking a key revokes its descendants, at most this many per call.
MAX_CASCADE: Final = 10_000
TENANTS_SET: Final = "till:tenants"
# Worker liveness: field worker id -> its last heartbeat (ms since the epoch). A request id
# starts with its worker's id and a dash ("<worker>-<random>"), so the reaper can tell the
# holds of a worker that stopped beating (killed, its host gone) and charge them at once,
# freeing their concurrency slots, instead of waiting for their deadline.
WORKERS: Final = "till:workers"
# Holds looked at per tenant and reaper round for a dead worker's (beyond the expired ones).
MAX_HOLDS_SCANNED: Final = 10_000
# A reserve or settle that failed past redis-py's one resend may still have run (its reply was
# lost). The ledger finishes the job in the background: a failed reserve is cancelled (the
# caller refused the request, nothing was forwarded), a failed settle is sent again; both are
# idempotent by request id. Attempts after these delays (seconds), a few at a time; what is
# still held after the last one is the reaper's.
REPAIR_DELAYS: Final = (0.05, 0.25, 1.0, 3.0, 10.0)
REPAIR_CONCURRENCY: Final = 8
MAX_REPAIRS: Final = 10_000  # pending per client; beyond, the reaper's
# What bounds a script's attempt on a client made without a socket timeout (not by connect()).
DEFAULT_TIMEOUT: Final = 2.0

# Cancels a reservation whose reserve failed for its caller. KEYS[1]: the reservation record;
# ARGV[1]: how long to keep the marker, seconds. Returns 1 when the record did not exist: the
# reserve never ran, and now never will (reserve answers a record that exists, writing
# nothing); 0 when it exists: the reserve ran, and the caller settles it as never forwarded.
_CANCEL: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'grant', -1, 'rem_act', 0, 'rem_tok', -1,
  'rem_mc', -1)
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

Store = aioredis.Redis | RedisCluster
T = TypeVar("T")


class StoreUnavailable(Exception):
    """Redis did not answer in time, or refused: the request fails closed."""


class Refused(Exception):
    """A budget check said no. ``limit``, ``used`` and ``remaining`` are in the limit's units;
    ``retry_after_ms`` says when a retry may pass (rate and concurrency limits), else 0;
    ``detail``: "parent" when an ancestor's limit refused, the first call's request id for an
    idempotency refusal, the field for a child key's limit, else ""."""

    def __init__(
        self,
        code: str,
        limit: int = 0,
        used: int = 0,
        remaining: int = 0,
        retry_after_ms: int = 0,
        detail: str = "",
    ) -> None:
        super().__init__(code)
        self.code = code
        self.limit = limit
        self.used = used
        self.remaining = remaining
        self.retry_after_ms = retry_after_ms
        self.detail = detail


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    tenant_id: str
    provider: str
    status: str
    created_ms: int
    last_used_ms: int | None
    metadata: dict[str, Any]
    ip_whitelist: list[str]
    max_activations: int
    used_activations: int
    max_tokens: int | None
    used_tokens: int
    held_tokens: int
    max_microcents: int | None
    used_microcents: int
    held_microcents: int
    # Seconds since the epoch, as sealed into the token; None: the key does not expire.
    expires_at: int | None = None
    # Exact names or `prefix*` patterns, as sealed into the token; empty: any model.
    allowed_models: list[str] = []
    rpm: int | None = None
    max_concurrent: int | None = None
    # Requests reserved and not yet settled.
    in_flight: int = 0
    # A child key's ancestors, parent first (empty: a key made with an admin key).
    ancestors: list[str] = []

    @property
    def parent_id(self) -> str | None:
        return self.ancestors[0] if self.ancestors else None


class TenantRecord(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    email: str
    plan: str
    status: str
    max_keys: int
    max_activations_per_month: int
    live_keys: int
    created_ms: int


class Idempotency(msgspec.Struct, frozen=True):
    """A request's Idempotency-Key, as the ledger keeps it: ``digest`` names its record (the
    key id and the client's value, hashed), ``fingerprint`` the request a retry must repeat."""

    digest: str
    fingerprint: str
    ttl_seconds: int = IDEMPOTENCY_TTL_SECONDS


class Admission(msgspec.Struct, frozen=True):
    """A reservation was granted. ``grant`` is the output cap to forward (-1: leave as is)."""

    grant: int
    remaining_activations: int
    remaining_tokens: int | None
    remaining_microcents: int | None


class Settlement(msgspec.Struct, frozen=True):
    remaining_activations: int
    remaining_tokens: int | None
    remaining_microcents: int | None


def tkey(tenant_id: str, suffix: str) -> str:
    return f"till:{{t:{tenant_id}}}:{suffix}"


def month_of(epoch_s: float) -> str:
    """The UTC month of an instant, ``YYYYMM``; the last month asked for is kept."""
    global _month
    start, end, name = _month
    if start <= epoch_s < end:
        return name
    t = time.gmtime(epoch_s)
    name = time.strftime("%Y%m", t)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
    _month = (start, calendar.timegm((year, month, 1, 0, 0, 0)), name)
    return name


_month: tuple[float, float, str] = (0.0, 0.0, "")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def hash_admin_key(admin_key: str) -> str:
    # Admin keys carry 256 random bits: a fast hash is enough, no password stretching needed.
    return hashlib.sha256(admin_key.encode()).hexdigest()


def admin_key_tenant(admin_key: str) -> str | None:
    """The tenant id an admin key names, or None when it is not shaped like one."""
    if not admin_key.startswith(ADMIN_PREFIX) or len(admin_key) > 200:
        return None
    tenant, dot, secret = admin_key[len(ADMIN_PREFIX) :].partition(".")
    if not dot or len(tenant) != 16 or not secret or not tenant.isalnum() or not tenant.islower():
        return None
    return tenant


def connect(url: str, *, timeout: float, max_connections: int) -> Store:
    """A client for a Redis server (redis://, rediss://, unix://) or cluster (redis+cluster://)."""
    retry = Retry(ExponentialBackoff(cap=0.05, base=0.005), retries=1)
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": retry,
        "retry_on_error": [rexc.ConnectionError, rexc.TimeoutError],
        "health_check_interval": 0,
    }
    if "+cluster://" in url:
        return RedisCluster.from_url(
            url.replace("+cluster://", "://", 1),
            max_connections=max_connections,
            # By default every 5th MOVED reply makes the client close all its connections and
            # re-read the topology, failing the commands other tasks have in flight on them.
            # Until the topology is known (start, or after a node failed) commands go to a
            # random node, so a burst brings a storm of MOVED. A MOVED reply names the slot's
            # owner: following it is enough, and a connection error re-reads the topology.
            reinitialize_steps=0,
            **common,
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout, **common
    )
    return aioredis.Redis(connection_pool=pool)


def _script(name: str) -> str:
    return resources.files("till.server").joinpath("lua", f"{name}.lua").read_text()


def _int(value: bytes | str | None, default: int = 0) -> int:
    return default if value is None else int(value)


def _opt(value: bytes | str | None) -> int | None:
    return None if value is None or value in (b"", "") else int(value)


def _str(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


# Errors that say "not now" rather than "wrong": the request fails closed with a 503. The
# client strips the code from a reply's text ("CLUSTERDOWN The cluster is down" arrives as
# ClusterDownError("The cluster is down")), so they are told apart by class first.
_TRANSIENT: Final = (
    rexc.ConnectionError,  # refused, reset, no free connection (BusyLoadingError: LOADING)
    rexc.TimeoutError,
    rexc.ClusterError,  # CLUSTERDOWN, MASTERDOWN, and redirects past the client's TTL
    rexc.TryAgainError,  # a slot being migrated
    rexc.AskError,  # MOVED and ASK that escaped the client's own handling
    rexc.ReadOnlyError,  # a failed-over primary now a replica
    rexc.OutOfMemoryError,
    rexc.RedisClusterException,  # no reachable node, slots not covered
)
_TRANSIENT_CODES: Final = (
    "CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN", "READONLY", "OOM", "LOADING", "MOVED", "ASK",
)  # fmt: skip


_CLIENT_DIR: Final = os.path.dirname(redis.__file__) + os.sep


def _client_fault(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside redis-py (or below it), not by our own code.

    A cluster client that drops a failed node's idle connections can close one another task
    has just taken: that task's write then fails with AttributeError (the writer is gone) or,
    under uvloop, RuntimeError (the transport is closed). They mean "the node is gone".
    """
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(_CLIENT_DIR):
            return True
        tb = tb.tb_next
    return False


class _Script:
    """A Lua script run by its SHA1, sent whole (EVAL) to the node that answers NOSCRIPT.

    redis-py's own Script reloads with SCRIPT LOAD, which a cluster client sends to every
    primary: with one primary down, tenants on the healthy ones would fail too. EVAL goes to
    the slot of the script's keys only, and caches the script there for the next EVALSHA.
    """

    def __init__(self, store: Store, source: str, lane: Lane | None = None) -> None:
        self._r: Any = store
        self._lane = lane
        self.script = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, *, keys: Sequence[str], args: Sequence[str | int | bytes]) -> Any:
        lane = self._lane
        if lane is not None:
            try:
                return await lane.execute(pack("EVALSHA", self.sha, len(keys), *keys, *args))
            except rexc.NoScriptError:
                return await lane.execute(pack("EVAL", self.script, len(keys), *keys, *args))
        try:
            return await self._r.evalsha(self.sha, len(keys), *keys, *args)
        except rexc.NoScriptError:
            return await self._r.eval(self.script, len(keys), *keys, *args)


_meta_decoder = msgspec.json.Decoder(dict[str, Any])
_list_decoder = msgspec.json.Decoder(list[str])
_encode = msgspec.json.encode


class Ledger:
    def __init__(self, store: Store) -> None:
        self.store = store
        # redis-py's command annotations cover sync and async clients at once; calls go
        # through an Any-typed alias rather than a cast at every call site.
        self._r: Any = store
        # One server: the scripts take their own, cheaper route to it (lane.py).
        self._lane: Lane | None = None
        if isinstance(store, aioredis.Redis):
            timeout = store.connection_pool.connection_kwargs.get("socket_timeout")
            self._lane = Lane(store, float(timeout or DEFAULT_TIMEOUT))
        lane = self._lane
        self._reserve = _Script(store, _script("reserve"), lane)
        self._settle = _Script(store, _script("settle"), lane)
        self._create_key = _Script(store, _script("create_key"), lane)
        self._revoke_key = _Script(store, _script("revoke_key"), lane)
        self._update_key = _Script(store, _script("update_key"), lane)
        self._expire_keys = _Script(store, _script("expire_keys"), lane)
        self._cancel = _Script(store, _CANCEL, lane)
        self._repairs: set[asyncio.Task[None]] = set()
        self._repair_gate = asyncio.Semaphore(REPAIR_CONCURRENCY)
        # A cluster client's per-node pool refuses at once (MaxConnectionsError) when it is
        # full, where a single server's blocking pool waits up to the timeout for a free
        # connection: calls queue here instead, so a burst is served rather than refused. An
        # eighth of each pool stays free for commands sent to the store directly (the app's
        # reaper lock, operators' tools).
        self._gate: asyncio.Semaphore | None = None
        self._gate_timeout: float | None = None
        if isinstance(store, RedisCluster):
            pool = int(store.connection_kwargs["max_connections"])
            self._gate = asyncio.Semaphore(max(1, pool - pool // 8))
            self._gate_timeout = store.connection_kwargs.get("socket_timeout")

    async def close(self) -> None:
        # Repairs still waiting are dropped: what they would have settled is the reaper's.
        repairs = list(self._repairs)
        for task in repairs:
            task.cancel()
        await asyncio.gather(*repairs, return_exceptions=True)
        if self._lane is not None:
            await self._lane.close()
        if isinstance(self.store, aioredis.Redis):
            # connect() hands the client an explicit pool, which redis-py then never closes
            # by itself: without this, every pooled socket stays open.
            await self.store.aclose(close_connection_pool=True)
        else:
            await self.store.aclose()
            # aclose() does nothing while the client waits to re-read the topology (after any
            # connection error): close every node's sockets regardless.
            await self.store.nodes_manager.aclose()
            await self.store.nodes_manager.aclose("startup_nodes")

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        gate = self._gate
        try:
            if gate is None:
                return await fn()
            if gate.locked():
                try:
                    async with asyncio.timeout(self._gate_timeout):
                        await gate.acquire()
                except TimeoutError:
                    raise StoreUnavailable("no free connection") from None
            else:
                await gate.acquire()
            try:
                # A command that starts while the client holds no topology (before the first
                # call, after CLUSTERDOWN made it drop everything) goes to a random node; to a
                # dead one, it fails though its own node is up. Read the topology first (a
                # no-op while it is known).
                await self.store.initialize()
                return await fn()
            finally:
                gate.release()
        except _TRANSIENT as exc:
            raise StoreUnavailable(type(exc).__name__) from exc
        except rexc.ResponseError as exc:
            msg = str(exc)
            if msg.startswith(_TRANSIENT_CODES):
                raise StoreUnavailable(msg.split(" ", 1)[0]) from exc
            raise
        except (AttributeError, RuntimeError) as exc:
            if _client_fault(exc):
                raise StoreUnavailable(type(exc).__name__) from exc
            raise

    async def ping(self) -> None:
        await self._call(self._r.ping)

    async def check(self) -> None:
        """Run the reserve script for a key that cannot exist: readiness is the budget path
        answering (the script loaded, its node up), not just a PING. It refuses without writing
        anything. On a cluster this asks the node that owns the probe's slot, so one dead node
        does not make every worker unready; requests for its own tenants get 503s meanwhile."""
        probe = "ready"
        keys = [tkey(probe, part) for part in ("k:probe", "tenant", "m:000000", "r:probe", "holds")]
        args: list[str | int] = ["probe:probe", 0, 0, 1, 0, -1, 1, -1, -1, 0, RATE_WINDOW_MS]
        reply = await self._call(lambda: self._reserve(keys=keys, args=args))
        if reply[:2] != [b"refused", b"invalid_api_key"]:
            raise StoreUnavailable("the reserve script answered a probe unexpectedly")

    # --- tenants and admin keys ---

    async def create_tenant(self, name: str, email: str, plan: Plan) -> tuple[TenantRecord, str]:
        tenant_id = new_tenant_id()
        record = TenantRecord(
            id=tenant_id,
            name=name,
            email=email,
            plan=plan.name,
            status="active",
            max_keys=plan.max_keys,
            max_activations_per_month=plan.max_activations_per_month,
            live_keys=0,
            created_ms=now_ms(),
        )
        fields = {
            "id": record.id,
            "name": record.name,
            "email": record.email,
            "plan": record.plan,
            "status": record.status,
            "max_keys": record.max_keys,
            "max_apm": record.max_activations_per_month,
            "live_keys": 0,
            "created": record.created_ms,
        }

        async def write() -> None:
            await self._r.hset(tkey(tenant_id, "tenant"), mapping=fields)
            await self._r.sadd(TENANTS_SET, tenant_id)

        await self._call(write)
        return record, await self.add_admin_key(tenant_id)

    async def add_admin_key(self, tenant_id: str) -> str:
        """A new admin key for the tenant. Only its hash is stored; the key is shown once."""
        admin_key = f"{ADMIN_PREFIX}{tenant_id}.{secrets.token_urlsafe(32)}"

        async def write() -> None:
            await self._r.hset(tkey(tenant_id, "admins"), hash_admin_key(admin_key), str(now_ms()))

        await self._call(write)
        return admin_key

    async def authenticate_admin(self, admin_key: str) -> str | None:
        """The tenant id the admin key belongs to, or None."""
        tenant_id = admin_key_tenant(admin_key)
        if tenant_id is None:
            return None
        hashes: dict[bytes, bytes] = await self._call(
            lambda: self._r.hgetall(tkey(tenant_id, "admins"))
        )
        digest = hash_admin_key(admin_key).encode()
        found = False
        for stored in hashes:
            # Every stored hash is compared, in constant time each.
            found |= hmac.compare_digest(stored, digest)
        return tenant_id if found else None

    async def tenant(self, tenant_id: str) -> TenantRecord | None:
        raw: dict[bytes, bytes] = await self._call(
            lambda: self._r.hgetall(tkey(tenant_id, "tenant"))
        )
        if not raw:
            return None
        return TenantRecord(
            id=_str(raw[b"id"]),
            name=_str(raw.get(b"name")),
            email=_str(raw.get(b"email")),
            plan=_str(raw.get(b"plan")),
            status=_str(raw.get(b"status")),
            max_keys=_int(raw.get(b"max_keys")),
            max_activations_per_month=_int(raw.get(b"max_apm")),
            live_keys=_int(raw.get(b"live_keys")),
            created_ms=_int(raw.get(b"created")),
        )

    async def tenant_ids(self) -> list[str]:
        members: set[bytes] = await self._call(lambda: self._r.smembers(TENANTS_SET))
        return sorted(m.decode() for m in members)

    async def month_activations(self, tenant_id: str, epoch_s: float | None = None) -> int:
        month = month_of(time.time() if epoch_s is None else epoch_s)
        value = await self._call(lambda: self._r.get(tkey(tenant_id, f"m:{month}")))
        return _int(value)

    # --- scoped keys ---

    async def create_key(
        self,
        *,
        tenant_id: str,
        key_id: str,
        provider: str,
        max_activations: int,
        max_tokens: int | None,
        max_microcents: int | None,
        metadata: dict[str, Any],
        ip_whitelist: Sequence[str],
        expires_at: int | None = None,
        allowed_models: Sequence[str] = (),
        rpm: int | None = None,
        max_concurrent: int | None = None,
        ancestors: Sequence[str] = (),
    ) -> KeyRecord:
        """Add a key; with ``ancestors`` (parent first) a child key, whose limits must fit in
        what its parent has left (Refused ``parent_limit_exceeded``, ``detail`` the field)."""
        created = now_ms()
        fields: list[str | int | bytes] = [
            "id", key_id,
            "tenant", tenant_id,
            "provider", provider,
            "status", "active",
            "created", created,
            "meta", _encode(metadata),
            "ips", _encode(list(ip_whitelist)),
            "max_act", max_activations,
            "used_act", 0,
            "used_tok", 0,
            "held_tok", 0,
            "used_mc", 0,
            "held_mc", 0,
            "inflight", 0,
        ]  # fmt: skip
        optional = {
            "max_tok": max_tokens,
            "max_mc": max_microcents,
            "expires": expires_at,
            "rpm": rpm,
            "max_conc": max_concurrent,
        }
        for name, value in optional.items():
            if value is not None:
                fields += [name, value]
        if allowed_models:
            fields += ["models", _encode(list(allowed_models))]
        keys = [
            tkey(tenant_id, "tenant"),
            tkey(tenant_id, f"k:{key_id}"),
            tkey(tenant_id, "keys"),
            tkey(tenant_id, "exp"),
        ]
        if ancestors:
            fields += ["anc", " ".join(ancestors)]
            keys += [tkey(tenant_id, f"k:{ancestors[0]}"), tkey(tenant_id, f"kids:{ancestors[0]}")]
        reply = await self._call(
            lambda: self._create_key(keys=keys, args=[key_id, created, *fields])
        )
        if reply[0] != b"ok":
            code, limit, used = reply[1].decode(), int(reply[2]), int(reply[3])
            if code == "parent_limit_exceeded":
                raise Refused(code, limit, 0, used, detail=_str(reply[4]))
            raise Refused(code, limit, used)
        record = await self.get_key(tenant_id, key_id)
        assert record is not None
        return record

    async def get_key(self, tenant_id: str, key_id: str) -> KeyRecord | None:
        raw: dict[bytes, bytes] = await self._call(
            lambda: self._r.hgetall(tkey(tenant_id, f"k:{key_id}"))
        )
        return _key_record(raw) if raw else None

    async def list_keys(self, tenant_id: str) -> list[KeyRecord]:
        async def fetch() -> list[dict[bytes, bytes]]:
            ids: list[bytes] = await self._r.zrange(tkey(tenant_id, "keys"), 0, -1)
            if not ids:
                return []
            # Same hash tag, same slot: one pipeline round trip, on a cluster too.
            pipe = self._r.pipeline(transaction=False)
            for key_id in ids:
                pipe.hgetall(tkey(tenant_id, f"k:{key_id.decode()}"))
            rows: list[dict[bytes, bytes]] = await pipe.execute()
            return rows

        return [_key_record(raw) for raw in await self._call(fetch) if raw]

    async def revoke_key(self, tenant_id: str, key_id: str) -> KeyRecord | None:
        """Revoke a key and its descendants. Their requests are refused from the key's own
        revocation on (reserve checks every ancestor); the descendants' records follow here."""
        now = now_ms()

        async def revoke(kid: str) -> int:
            keys = [tkey(tenant_id, "tenant"), tkey(tenant_id, f"k:{kid}")]
            return int(await self._call(lambda: self._revoke_key(keys=keys, args=[now])))

        if await revoke(key_id) < 0:
            return None
        queue, seen = [key_id], 0
        while queue and seen < MAX_CASCADE:
            parent = queue.pop()
            kids: list[bytes] = await self._call(
                partial(self._r.zrange, tkey(tenant_id, f"kids:{parent}"), 0, MAX_CASCADE)
            )
            for kid in kids:
                seen += 1
                await revoke(kid.decode())
                queue.append(kid.decode())
        return await self.get_key(tenant_id, key_id)

    async def update_key(
        self,
        tenant_id: str,
        key_id: str,
        *,
        metadata: dict[str, Any] | None = None,
        changes: Sequence[tuple[str, str, int]] = (),
    ) -> KeyRecord | None:
        """Apply ``changes`` (op "set", "add" or "del"; a key hash field; a value) and the new
        metadata at once, or raise Refused (``already_revoked``, or ``no_limit`` with the field
        in ``detail``) having changed nothing. None when there is no such key."""
        args: list[str | int] = ["" if metadata is None else _encode(metadata).decode()]
        for op, field, value in changes:
            args += [op, field, value]
        keys = [tkey(tenant_id, f"k:{key_id}")]
        reply = await self._call(lambda: self._update_key(keys=keys, args=args))
        if reply == -1:
            return None
        if reply[0] != b"ok":
            raise Refused(reply[1].decode(), detail=_str(reply[2]))
        return await self.get_key(tenant_id, key_id)

    async def get_chain(self, tenant_id: str, key_ids: Sequence[str]) -> list[KeyRecord | None]:
        """Several keys of a tenant (a key and its ancestors) in one round trip."""

        async def fetch() -> list[dict[bytes, bytes]]:
            pipe = self._r.pipeline(transaction=False)
            for key_id in key_ids:
                pipe.hgetall(tkey(tenant_id, f"k:{key_id}"))
            rows: list[dict[bytes, bytes]] = await pipe.execute()
            return rows

        return [_key_record(raw) if raw else None for raw in await self._call(fetch)]

    async def expire_keys(self, tenant_id: str, *, limit: int = 500) -> int:
        """Give the plan places of the tenant's keys past their expiry back. Returns how many."""
        now = int(time.time())
        exp = tkey(tenant_id, "exp")
        due: list[bytes] = await self._call(
            partial(self._r.zrangebyscore, exp, "-inf", now, start=0, num=limit)
        )
        if not due:
            return 0
        ids = [d.decode() for d in due]
        keys = [tkey(tenant_id, "tenant"), exp, *(tkey(tenant_id, f"k:{i}") for i in ids)]
        return int(await self._call(lambda: self._expire_keys(keys=keys, args=[now, *ids])))

    async def key_count(self, tenant_id: str) -> int:
        return int(await self._call(lambda: self._r.zcard(tkey(tenant_id, "keys"))))

    # --- the hot path: one round trip each ---

    async def reserve(
        self,
        *,
        tenant_id: str,
        key_id: str,
        request_id: str,
        month: str,
        input_tokens: int,
        asked_output: int,
        default_output: int,
        input_microcents: int,
        output_nanocents: int,
        hold_seconds: int,
        min_output: int = 1,
        rate_window_ms: int = RATE_WINDOW_MS,
        now: int | None = None,
        ancestors: Sequence[str] = (),
        idempotency: Idempotency | None = None,
    ) -> Admission:
        """Take one activation and a place in flight, and hold the worst-case tokens and cost,
        from the key and each of its ``ancestors``, or raise Refused. ``now`` (ms since the
        epoch) is the clock's unless a test moves it."""
        if now is None:
            now = now_ms()
        keys = [
            tkey(tenant_id, f"k:{key_id}"),
            tkey(tenant_id, "tenant"),
            tkey(tenant_id, f"m:{month}"),
            tkey(tenant_id, f"r:{request_id}"),
            tkey(tenant_id, "holds"),
        ]
        keys += [tkey(tenant_id, f"k:{a}") for a in ancestors]
        if idempotency is not None:
            keys.append(tkey(tenant_id, f"i:{idempotency.digest}"))
        args: list[str | int] = [
            f"{key_id}:{request_id}",
            now,
            now + hold_seconds * 1000,
            MONTH_TTL_SECONDS,
            input_tokens,
            asked_output,
            default_output,
            input_microcents,
            output_nanocents,
            min_output,
            rate_window_ms,
        ]
        if ancestors or idempotency is not None:
            args.append(len(ancestors))
        if idempotency is not None:
            args += [idempotency.ttl_seconds, idempotency.fingerprint]
        try:
            reply = await self._call(lambda: self._reserve(keys=keys, args=args))
        except (StoreUnavailable, asyncio.CancelledError):
            # The caller fails the request closed (or is gone): nothing is forwarded. If the
            # script ran (its reply lost), what it took is given back; if it never ran, a late
            # run of it will take nothing.
            cancel = partial(
                self._cancel_reservation, tenant_id, key_id, request_id, month, ancestors
            )
            self._repair_later(partial(cancel, idempotency))
            raise
        if reply[0] != b"ok":
            detail = _str(reply[6]).rpartition(":")[2]  # a holds member: its request id
            limit, used, remaining, retry_after_ms = (int(v) for v in reply[2:6])
            raise Refused(reply[1].decode(), limit, used, remaining, retry_after_ms, detail)
        return Admission(int(reply[1]), int(reply[2]), _unlimited(reply[3]), _unlimited(reply[4]))

    async def settle(
        self,
        *,
        tenant_id: str,
        key_id: str,
        request_id: str,
        month: str,
        tokens: int | None,
        microcents: int | None,
        refund_activation: bool = False,
        retry_later: bool = True,
        ancestors: Sequence[str] = (),
        idempotency: Idempotency | None = None,
        completed: bool = False,
    ) -> Settlement | None:
        """Charge what the request used (None: unknown, charge the hold). None if already done.

        StoreUnavailable means the outcome is unknown: the settlement may have been applied
        (its reply lost). With ``retry_later`` it is sent again in the background, which is a
        no-op if it was applied; the reaper charges the hold if no attempt gets through.
        """
        send = partial(
            self._settle_once,
            tenant_id=tenant_id,
            key_id=key_id,
            request_id=request_id,
            month=month,
            tokens=tokens,
            microcents=microcents,
            refund_activation=refund_activation,
            ancestors=[tkey(tenant_id, f"k:{a}") for a in ancestors],
            idem=None if idempotency is None else tkey(tenant_id, f"i:{idempotency.digest}"),
            completed=completed,
        )
        try:
            return await send()
        except StoreUnavailable:
            if retry_later:
                self._repair_later(send)
            raise

    async def _settle_once(
        self,
        *,
        tenant_id: str,
        key_id: str,
        request_id: str,
        month: str,
        tokens: int | None,
        microcents: int | None,
        refund_activation: bool,
        ancestors: Sequence[str] = (),
        idem: str | None = None,
        completed: bool = False,
    ) -> Settlement | None:
        """One settle call. ``ancestors`` and ``idem`` are whole Redis key names."""
        keys = [
            tkey(tenant_id, f"k:{key_id}"),
            tkey(tenant_id, f"r:{request_id}"),
            tkey(tenant_id, "holds"),
            tkey(tenant_id, f"m:{month}"),
            *ancestors,
        ]
        args: list[str | int] = [
            f"{key_id}:{request_id}",
            -1 if tokens is None else max(0, tokens),
            -1 if microcents is None else max(0, microcents),
            1 if refund_activation else 0,
            SETTLED_TTL_SECONDS,
        ]
        if ancestors or idem is not None:
            args += [len(ancestors), 0 if idem is None else 1, 1 if completed else 0]
        if idem is not None:
            keys.append(idem)
        reply = await self._call(lambda: self._settle(keys=keys, args=args))
        if reply[0] != b"ok":
            return None
        return Settlement(int(reply[1]), _unlimited(reply[2]), _unlimited(reply[3]))

    async def _cancel_reservation(
        self,
        tenant_id: str,
        key_id: str,
        request_id: str,
        month: str,
        ancestors: Sequence[str] = (),
        idempotency: Idempotency | None = None,
    ) -> None:
        record = tkey(tenant_id, f"r:{request_id}")
        blocked = await self._call(lambda: self._cancel(keys=[record], args=[SETTLED_TTL_SECONDS]))
        if not int(blocked):
            # It ran: never forwarded, so nothing billed and the activation given back (a
            # no-op if it was settled meanwhile).
            await self._settle_once(
                tenant_id=tenant_id,
                key_id=key_id,
                request_id=request_id,
                month=month,
                tokens=0,
                microcents=0,
                refund_activation=True,
                ancestors=[tkey(tenant_id, f"k:{a}") for a in ancestors],
                idem=None if idempotency is None else tkey(tenant_id, f"i:{idempotency.digest}"),
            )

    def _repair_later(self, job: Callable[[], Awaitable[object]]) -> None:
        if len(self._repairs) >= MAX_REPAIRS:
            return  # a store down for long: the reaper settles what is left held
        task = asyncio.ensure_future(self._repair(job))
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)

    async def _repair(self, job: Callable[[], Awaitable[object]]) -> None:
        for delay in REPAIR_DELAYS:
            await asyncio.sleep(delay)
            async with self._repair_gate:
                try:
                    await job()
                except StoreUnavailable:
                    continue
                except Exception as exc:  # a reply the job did not expect: nothing to retry
                    log.warning("store repair failed (%s); left to the reaper", type(exc).__name__)
                return
        log.warning(
            "store unavailable after %d retries: a hold is left to the reaper", len(REPAIR_DELAYS)
        )

    # --- workers ---

    async def heartbeat(self, worker_id: str) -> None:
        """Say this worker is alive (its requests' holds are not the reaper's yet)."""
        await self._call(lambda: self._r.hset(WORKERS, worker_id, now_ms()))

    async def forget_worker(self, worker_id: str) -> None:
        await self._call(lambda: self._r.hdel(WORKERS, worker_id))

    async def dead_workers(self, timeout_ms: int, forget_after_ms: int) -> frozenset[str]:
        """Workers whose last heartbeat is older than ``timeout_ms``; those older than
        ``forget_after_ms`` (their holds are past any deadline) are forgotten. A worker that
        never beat is not known, so not dead: its holds wait for their deadline."""
        beats: dict[bytes, bytes] = await self._call(lambda: self._r.hgetall(WORKERS))
        now = now_ms()
        dead = {w.decode() for w, t in beats.items() if int(t) < now - timeout_ms}
        gone = [w for w, t in beats.items() if int(t) < now - forget_after_ms]
        if gone:
            await self._call(lambda: self._r.hdel(WORKERS, *gone))
        return frozenset(dead)

    async def reap(self, *, limit: int = 500, dead: frozenset[str] = frozenset()) -> int:
        """Charge the holds whose deadline passed, and those of ``dead`` workers (whose
        requests will never settle). Returns how many.

        On a cluster, a tenant whose node does not answer is left for the next round, and so
        are the others on that node; the tenants on the healthy nodes are reaped meanwhile.
        """
        reaped = 0
        now = now_ms()
        down: set[str] = set()
        for tenant_id in await self.tenant_ids():
            holds = tkey(tenant_id, "holds")
            node = self._node_of(holds)
            if node is not None and node in down:
                continue
            try:
                members: list[bytes] = await self._call(
                    partial(self._r.zrangebyscore, holds, "-inf", now, start=0, num=limit)
                )
                if dead:
                    held: list[bytes] = await self._call(
                        partial(self._r.zrange, holds, 0, MAX_HOLDS_SCANNED - 1)
                    )
                    expired = set(members)
                    members += [m for m in held if m not in expired and _worker_of(m) in dead]
                for member in members:
                    key_id, _, request_id = member.decode().partition(":")
                    # What else the settlement must update: the record says.
                    anc, idem = await self._call(
                        partial(self._r.hmget, tkey(tenant_id, f"r:{request_id}"), "anc", "idem")
                    )
                    # The reservation's month is unknown here; no refund is given, so it is
                    # unused.
                    done = await self._settle_once(
                        tenant_id=tenant_id,
                        key_id=key_id,
                        request_id=request_id,
                        month=month_of(now / 1000),
                        tokens=None,
                        microcents=None,
                        refund_activation=False,
                        ancestors=_str(anc).split(),
                        idem=None if idem is None else _str(idem),
                    )
                    if done is None:
                        # Settled meanwhile, or its record expired: drop the stale entry.
                        await self._call(partial(self._r.zrem, holds, member))
                    else:
                        reaped += 1
                await self.expire_keys(tenant_id)
            except StoreUnavailable:
                if node is None:
                    raise  # one server: nothing else would answer either
                down.add(node)
        return reaped

    def _node_of(self, key: str) -> str | None:
        """The name of the cluster node that holds ``key`` (None: not a cluster)."""
        if not isinstance(self.store, RedisCluster):
            return None
        try:
            node = self.store.get_node_from_key(key)
        except rexc.RedisClusterException:  # the slot map is being re-read
            node = None
        return f"slot:{self.store.keyslot(key)}" if node is None else str(node.name)


def _worker_of(member: bytes) -> str | None:
    """The worker a holds member's request ran on (``<key>:<worker>-<random>``), if it says."""
    request_id = member.partition(b":")[2]
    worker, dash, _ = request_id.partition(b"-")
    return worker.decode() if dash else None


def _unlimited(value: int | bytes) -> int | None:
    n = int(value)
    return None if n < 0 else n


def _key_record(raw: dict[bytes, bytes]) -> KeyRecord:
    return KeyRecord(
        id=_str(raw[b"id"]),
        tenant_id=_str(raw[b"tenant"]),
        provider=_str(raw[b"provider"]),
        status=_str(raw[b"status"]),
        created_ms=_int(raw.get(b"created")),
        last_used_ms=_opt(raw.get(b"last_used")),
        metadata=_meta_decoder.decode(raw.get(b"meta", b"{}")),
        ip_whitelist=_list_decoder.decode(raw.get(b"ips", b"[]")),
        max_activations=_int(raw.get(b"max_act")),
        used_activations=_int(raw.get(b"used_act")),
        max_tokens=_opt(raw.get(b"max_tok")),
        used_tokens=_int(raw.get(b"used_tok")),
        held_tokens=_int(raw.get(b"held_tok")),
        max_microcents=_opt(raw.get(b"max_mc")),
        used_microcents=_int(raw.get(b"used_mc")),
        held_microcents=_int(raw.get(b"held_mc")),
        expires_at=_opt(raw.get(b"expires")),
        allowed_models=_list_decoder.decode(raw.get(b"models", b"[]")),
        rpm=_opt(raw.get(b"rpm")),
        max_concurrent=_opt(raw.get(b"max_conc")),
        in_flight=_int(raw.get(b"inflight")),
        ancestors=_str(raw.get(b"anc")).split(),
    )


__all__ = [
    "MICROCENTS_PER_CENT",
    "PLANS",
    "RATE_WINDOW_MS",
    "Admission",
    "Idempotency",
    "KeyRecord",
    "Ledger",
    "Refused",
    "Settlement",
    "StoreUnavailable",
    "TenantRecord",
    "connect",
]

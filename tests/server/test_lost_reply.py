"""P8 through a live proxy: a Redis reply lost after its command ran is resent, and charged once.

`till serve` talks to a real redis-server through tests/tcp_cut.py, which forwards a marked
command (the EVALSHA of the reserve or the settle script) and then drops Redis's reply: it closes
the connection, or keeps it silent past TILL_REDIS_TIMEOUT. redis-py's retry (``connect()``: one
retry on ConnectionError and TimeoutError) resends the command on a new connection; the script
is idempotent by request id, so the resend answers without writing. The real openai SDK is the
client; the charge is read back from the store, and Redis's own command counts show the resend.

When the resend fails too, the client of a reserve gets a 503 and the ledger gives back in the
background whatever the reserve took; a settle is sent again in the background. Nothing is left
for the reaper (which would charge a whole hold) unless the store stays away.

The store-level promise (a replayed reserve or settle writes nothing) is
tests/server/test_ledger.py::test_same_request_id_reserves_and_settles_once; here the replay
comes from a real lost reply, through the real client, in the real server.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.conftest import (
    Mock,
    RedisServer,
    Till,
    assert_no_secrets,
    create_key,
    get_key,
    short_tmpdir,
    start_redis,
    start_till,
    stop_process,
    till_env,
)
from tests.tcp_cut import CutProxy, Fault
from till.server.ledger import Ledger, connect, month_of, tkey
from till.tokens import Keyring

MESSAGES: list[Any] = [{"role": "user", "content": "Hello there, lost replies"}]
MAX_TOKENS = 100_000
REDIS_TIMEOUT = 0.5  # TILL_REDIS_TIMEOUT: how long a stalled reply is waited for


def markers(script: str) -> tuple[bytes, bytes]:
    """What identifies a script's call on the wire: its SHA1 (EVALSHA) or its text (EVAL)."""
    source = resources.files("till.server").joinpath("lua", f"{script}.lua").read_text()
    sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
    return sha.encode(), source.splitlines()[0].encode()


RESERVE = markers("reserve")
SETTLE = markers("settle")


@dataclass
class Rig:
    till: Till
    cut: CutProxy
    server: RedisServer
    direct: redis.Redis  # straight to redis-server, around the cutting proxy
    admin: httpx.Client

    def evalsha_calls(self) -> int:
        stats = self.direct.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    def wait_evalsha(self, count: int, timeout: float = 5.0) -> int:
        """EVALSHA calls once there are ``count`` (or as many as came within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self.evalsha_calls() < count and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # one more, late, would show
        return self.evalsha_calls()

    def client(self, key: dict[str, Any]) -> openai.OpenAI:
        # No SDK retries: any resend seen here is redis-py's, inside Till.
        return openai.OpenAI(
            api_key=key["scopedKey"], base_url=f"{self.till.url}/v1", max_retries=0
        )


@pytest.fixture(scope="module")
def rig(mock_upstream: Mock, log_dir: Path) -> Iterator[Rig]:
    directory = short_tmpdir("till-lost-redis-")
    data_dir = short_tmpdir("till-lost-")
    server = start_redis(directory)
    direct = redis.Redis(port=server.port, decode_responses=True)
    till: Till | None = None
    try:
        with CutProxy("127.0.0.1", server.port) as cut:
            env = till_env(
                data_dir,
                mock_upstream.url,
                f"redis://127.0.0.1:{cut.port}/0",
                TILL_SECRET_KEYS=Keyring.generate("l1").format(),
                TILL_REDIS_TIMEOUT=str(REDIS_TIMEOUT),
            )
            till = start_till(env, log_dir / "till-lost-reply.log")
            with till.admin(till.new_tenant()) as admin:
                rig = Rig(till, cut, server, direct, admin)
                # One request loads both scripts (NOSCRIPT, then EVAL): from here on, EVALSHA.
                with rig.client(create_key(admin)) as oa:
                    oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)
                yield rig
            till.stop()
    finally:
        if till is not None:
            till.stop()
            assert_no_secrets(till.log)
        direct.close()
        stop_process(server.proc)
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(directory, ignore_errors=True)


def settled(rig: Rig, key_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """The key once nothing is held (or as it is when ``timeout`` passes)."""
    deadline = time.monotonic() + timeout
    key = get_key(rig.admin, key_id)
    while key["heldTokens"] and time.monotonic() < deadline:
        time.sleep(0.05)
        key = get_key(rig.admin, key_id)
    return key


def mock_total(mock: Mock) -> int:
    (record,) = mock.requests()
    usage = record["usage_normalized"]
    assert isinstance(usage, dict)
    return int(usage["input_tokens"]) + int(usage["output_tokens"])


@pytest.mark.parametrize(
    ("lost", "fault", "stream"),
    [
        (RESERVE, "reply", False),
        (RESERVE, "stall", False),
        (SETTLE, "reply", False),
        (SETTLE, "stall", False),
        (SETTLE, "reply", True),
        (SETTLE, "stall", True),
    ],
    ids=["reserve-closed", "reserve-timed-out", "settle-closed", "settle-timed-out",
         "settle-closed-streamed", "settle-timed-out-streamed"],
)  # fmt: skip
def test_lost_reply_is_resent_and_charged_once(
    rig: Rig, mock_upstream: Mock, lost: tuple[bytes, bytes], fault: Fault, stream: bool
) -> None:
    key = create_key(rig.admin, max_tokens=MAX_TOKENS)
    mock_upstream.reset()
    faults = rig.cut.faults[fault]
    rig.direct.config_resetstat()
    rig.cut.arm(*lost, times=1, fault=fault)
    started = time.monotonic()
    with rig.client(key) as oa:
        if stream:
            chunks = list(
                oa.chat.completions.create(
                    model="gpt-4o",
                    messages=MESSAGES,
                    max_tokens=50,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            usage = chunks[-1].usage
        else:
            usage = oa.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, max_tokens=50
            ).usage
    # The openai SDK ends a stream at its [DONE] event, which Till sends only once it has
    # settled: a read right after the call sees its cost, however slow the settlement was.
    streamed = get_key(rig.admin, key["id"]) if stream else None
    assert usage is not None and usage.total_tokens > 0
    # A closed connection is noticed at once; a silent one after TILL_REDIS_TIMEOUT.
    assert time.monotonic() - started < (REDIS_TIMEOUT if fault == "stall" else 0) + 1.5
    # The reply was lost once, after Redis ran the command: three script calls reached Redis
    # (reserve, settle, and the resend of the lost one).
    assert rig.wait_evalsha(3) == 3
    assert rig.cut.faults[fault] == faults + 1
    after = streamed or settled(rig, key["id"])
    assert after["usedActivations"] == 1
    assert after["usedTokens"] == usage.total_tokens == mock_total(mock_upstream)
    assert after["heldTokens"] == 0
    assert len(mock_upstream.requests()) == 1


def test_done_event_comes_after_a_slow_settlement(rig: Rig, mock_upstream: Mock) -> None:
    """A client that stops reading at ``data: [DONE]`` (and reads its key at once) sees the
    call's cost: Till withholds the event until the settlement, here slowed by a lost reply
    (TILL_REDIS_TIMEOUT: the first settle is never delivered) has landed."""
    key = create_key(rig.admin, max_tokens=MAX_TOKENS)
    mock_upstream.reset()
    rig.cut.arm(*SETTLE, times=1, fault="hang")
    with (
        httpx.Client(timeout=30) as http,
        http.stream(
            "POST",
            f"{rig.till.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {key['scopedKey']}"},
            json={"model": "gpt-4o", "messages": MESSAGES, "stream": True, "max_tokens": 50},
        ) as resp,
    ):
        lines = resp.iter_lines()
        assert any(line == "data: [DONE]" for line in lines)
        seen = get_key(rig.admin, key["id"])  # the response is still open
    assert (seen["heldTokens"], seen["usedTokens"]) == (0, mock_total(mock_upstream))


def month_count(rig: Rig, key: dict[str, Any]) -> int:
    """The key's tenant's activations this month, read from the store directly."""
    value = rig.direct.get(tkey(key["tenantId"], f"m:{month_of(time.time())}"))
    return int(value or 0)


@pytest.mark.parametrize("ran", [True, False], ids=["reply-lost", "command-lost"])
def test_reserve_failing_twice_is_a_503_and_takes_nothing(
    rig: Rig, mock_upstream: Mock, ran: bool
) -> None:
    """The resend fails too: the client gets a clean 503 with Retry-After, nothing is
    forwarded, and whatever the reserve took (when it ran) is given back by the ledger in the
    background: the request is charged nothing, not its hold by the reaper an hour later."""
    key = create_key(rig.admin, max_tokens=MAX_TOKENS)
    mock_upstream.reset()
    month_before = month_count(rig, key)
    before = rig.cut.faults.copy()
    rig.direct.config_resetstat()
    rig.cut.arm(*RESERVE, times=2, fault="reply" if ran else "command")
    started = time.monotonic()
    with rig.client(key) as oa, pytest.raises(openai.InternalServerError) as caught:
        oa.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    assert time.monotonic() - started < 2
    assert caught.value.status_code == 503
    assert caught.value.code == "store_unavailable"
    assert caught.value.response.headers["retry-after"].isdigit()
    assert rig.cut.faults - before == Counter({"reply" if ran else "command": 2})
    assert mock_upstream.requests() == []
    # Reserve ran twice (the second a no-op) or never; then the ledger's cancel (one EVAL of
    # its own script: EVALSHA answers NOSCRIPT the first time), and the settle that gives back
    # what the reserve took when it ran.
    deadline = time.monotonic() + 5
    after = get_key(rig.admin, key["id"])
    while (after["usedActivations"] or after["heldTokens"]) and time.monotonic() < deadline:
        time.sleep(0.05)
        after = get_key(rig.admin, key["id"])
    assert (after["usedActivations"], after["usedTokens"], after["heldTokens"]) == (0, 0, 0)
    assert after["status"] == "active"
    assert month_count(rig, key) == month_before
    # The key works as before: the next request is charged what it used, once.
    with rig.client(key) as oa:
        usage = oa.chat.completions.create(model="gpt-4o", messages=MESSAGES).usage
    assert usage is not None
    after = get_key(rig.admin, key["id"])
    assert (after["usedActivations"], after["usedTokens"], after["heldTokens"]) == (
        1,
        usage.total_tokens,
        0,
    )
    assert month_count(rig, key) == month_before + 1


@pytest.mark.parametrize("ran", [True, False], ids=["reply-lost", "command-lost"])
def test_settle_failing_twice_is_settled_once_in_the_background(
    rig: Rig, mock_upstream: Mock, ran: bool
) -> None:
    """The client already has its answer (200). The settlement either ran (its replies lost)
    or never did; the ledger sends it again in the background, a no-op in the first case: the
    usage is charged once, and the hold is not left for the reaper."""
    key = create_key(rig.admin, max_tokens=MAX_TOKENS)
    mock_upstream.reset()
    before = rig.cut.faults.copy()
    rig.direct.config_resetstat()
    rig.cut.arm(*SETTLE, times=2, fault="reply" if ran else "command")
    with rig.client(key) as oa:
        raw = oa.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=50
        )
    usage = raw.parse().usage
    assert raw.status_code == 200 and usage is not None
    assert rig.cut.faults - before == Counter({"reply" if ran else "command": 2})
    # reserve + (two settles that ran, or none) + the background resend.
    assert rig.wait_evalsha(4 if ran else 2) == (4 if ran else 2)
    after = settled(rig, key["id"])
    assert after["usedActivations"] == 1
    assert after["usedTokens"] == usage.total_tokens == mock_total(mock_upstream)
    assert after["heldTokens"] == 0
    # The answer went out before the settlement was known: its remaining budget is the one
    # admitted (the hold still counted), never more than what is really left.
    assert int(raw.headers["x-till-remaining-tokens"]) <= MAX_TOKENS - usage.total_tokens


async def test_reserve_abandoned_in_flight_is_given_back(rig: Rig) -> None:
    """A caller cancelled while its reserve is in flight (a worker shutting down, a request
    task cancelled) forwards nothing: the reserve ran, its reply never came, and the ledger
    gives back what it took. The ledger runs here in the test, through the same proxy."""
    key = create_key(rig.admin, max_tokens=MAX_TOKENS)
    ledger = Ledger(connect(f"redis://127.0.0.1:{rig.cut.port}/0", timeout=30, max_connections=4))
    try:
        stalls = rig.cut.faults["stall"]
        rig.cut.arm(*RESERVE, times=1, fault="stall")
        reserve = asyncio.ensure_future(
            ledger.reserve(
                tenant_id=key["tenantId"],
                key_id=key["id"],
                request_id="abandoned",
                month=month_of(time.time()),
                input_tokens=100,
                asked_output=50,
                default_output=50,
                input_microcents=0,
                output_nanocents=0,
                hold_seconds=3600,
            )
        )
        # Redis ran it; the reply is withheld.
        await asyncio.to_thread(rig.cut.wait_faults, "stall", stalls + 1)
        held = await ledger.get_key(key["tenantId"], key["id"])
        assert held is not None and (held.used_activations, held.held_tokens) == (1, 150)
        reserve.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reserve
        deadline = time.monotonic() + 5
        record = held
        while record.used_activations and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            got = await ledger.get_key(key["tenantId"], key["id"])
            assert got is not None
            record = got
        assert (record.used_activations, record.used_tokens, record.held_tokens) == (0, 0, 0)
        assert rig.direct.hget(tkey(key["tenantId"], "r:abandoned"), "state") == "settled"
    finally:
        rig.cut.disarm()
        await ledger.close()

"""Health and shutdown: /healthz, /readyz through the real budget script, and SIGTERM.

A load balancer or Kubernetes keeps a worker in rotation while /readyz answers 200, and takes
it out of rotation the moment it does not; SIGTERM must then let open streams finish (up to
TILL_GRACEFUL_TIMEOUT), settle them, and exit, refusing new connections from the start.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import (
    UPSTREAM_KEY,
    Mock,
    RedisServer,
    Till,
    create_key,
    get_key,
    own_till,
)
from till.tokens import Keyring

MESSAGES = [{"role": "user", "content": "Hello there"}]


def test_healthz_and_readyz_answer(till: Till) -> None:
    health = httpx.get(f"{till.url}/healthz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    ready = httpx.get(f"{till.url}/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


def test_readyz_runs_the_budget_script_and_writes_nothing(
    redis_server: RedisServer, mock_upstream: Mock, log_dir: Path
) -> None:
    with (
        own_till("ready", mock_upstream.url, redis_server.url, log_dir) as server,
        redis.Redis.from_url(redis_server.url) as store,
    ):
        # The scripts are gone (a restart without persistence, a failover, SCRIPT FLUSH): the
        # probe loads the reserve script again rather than reporting a PING.
        store.script_flush()
        calls_before = _reserve_calls(store)
        for _ in range(3):
            resp = httpx.get(f"{server.url}/readyz")
            assert resp.status_code == 200, resp.text
        assert _reserve_calls(store) >= calls_before + 3
        # The probe's key does not exist, and the script refused it without writing.
        assert store.keys("{t:ready}*") == []


def _reserve_calls(store: redis.Redis) -> int:
    stats = store.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
    )


# --- SIGTERM ---


@pytest.fixture(params=["uvicorn", "hypercorn"])
def pair(
    request: pytest.FixtureRequest, redis_server: RedisServer, mock_upstream: Mock, log_dir: Path
) -> Iterator[list[Till]]:
    """Two Tills on one store: the first is stopped by the test, the second reads the result.
    The first runs under each server `till serve` offers."""
    keyring = Keyring.generate().format()
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(
                own_till(
                    f"drain-{i}",
                    mock_upstream.url,
                    redis_server.url,
                    log_dir,
                    TILL_SECRET_KEYS=keyring,
                    TILL_GRACEFUL_TIMEOUT="1.5",
                    TILL_SERVER=request.param if i == 0 else "uvicorn",
                )
            )
            for i in range(2)
        ]


def _stream(
    http: httpx.Client, till: Till, token: str, delay_ms: int, tokens: int
) -> Iterator[bytes]:
    with http.stream(
        "POST",
        f"{till.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {token}", "x-mock-delay-ms": str(delay_ms)},
        json={"model": "gpt-4o", "messages": MESSAGES, "stream": True, "max_tokens": tokens},
    ) as resp:
        assert resp.status_code == 200
        yield from resp.iter_raw()


def _terminate_after_first_chunk(draining: Till, chunks: Iterator[bytes]) -> tuple[bytes, float]:
    first = next(chunks)
    draining.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    # New connections are refused at once: the load balancer's next probe fails.
    deadline = sent + 2
    while True:
        try:
            httpx.get(f"{draining.url}/readyz", timeout=0.5)
        except httpx.TransportError:
            break
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.05)
    return first, sent


def test_sigterm_lets_an_open_stream_finish_and_settles_it(
    pair: list[Till], mock_upstream: Mock
) -> None:
    draining, other = pair
    admin_key = draining.new_tenant()
    with draining.admin(admin_key) as admin:
        key = create_key(admin, upstream_key=UPSTREAM_KEY, max_tokens=100_000)
    mock_upstream.reset()
    with httpx.Client(timeout=30) as http:
        # 10 output tokens, 50 ms apart: the stream outlives the signal, not the grace period.
        chunks = _stream(http, draining, key["scopedKey"], delay_ms=50, tokens=10)
        first, sent = _terminate_after_first_chunk(draining, chunks)
        body = first + b"".join(chunks)
    assert body.rstrip().endswith(b"data: [DONE]")
    assert draining.proc.wait(10) == 0
    assert time.monotonic() - sent < 1.5 + 3
    (record,) = mock_upstream.requests()
    assert record["completed"]
    with other.admin(admin_key) as admin:
        after = get_key(admin, key["id"])
    # Settled before exit, at the provider's figure: nothing left for a reaper.
    assert after["heldTokens"] == 0
    assert after["usedTokens"] == mock_upstream.totals()["total_tokens"]
    assert after["usedActivations"] == 1


def test_sigterm_cuts_a_stream_past_the_grace_period_and_charges_its_hold(
    pair: list[Till], mock_upstream: Mock
) -> None:
    draining, other = pair
    admin_key = draining.new_tenant()
    with draining.admin(admin_key) as admin:
        key = create_key(admin, upstream_key=UPSTREAM_KEY, max_tokens=300)
    mock_upstream.reset()
    with httpx.Client(timeout=30) as http:
        # Asks for more than the key holds: Till lowers the cap, and holds all 300 tokens. The
        # answer (about 265 tokens, 50 ms apart) lasts far past the 1.5 s grace period.
        chunks = _stream(http, draining, key["scopedKey"], delay_ms=50, tokens=1000)
        _, sent = _terminate_after_first_chunk(draining, chunks)
        with pytest.raises(httpx.TransportError):
            for _ in chunks:
                pass
    assert draining.proc.wait(10) == 0
    assert time.monotonic() - sent < 1.5 + 3
    with other.admin(admin_key) as admin:
        after = get_key(admin, key["id"])
    # Cut before its usage arrived: the limited key is charged its whole hold, at once.
    assert after["heldTokens"] == 0
    assert after["usedTokens"] == 300
    assert after["usedActivations"] == 1

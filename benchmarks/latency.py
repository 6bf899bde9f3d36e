"""How much latency does Till add? Sequential chat calls, direct to the mock vs through Till.

Starts the mock upstream and a `till serve` (embedded store) on loopback, warms both up, then
interleaves rounds of direct and proxied calls (so machine noise hits both alike) and prints
p50/p99 for each and the added p50. Run: `make bench` (or `python benchmarks/latency.py -n 2000`).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port, stop_process, wait_http  # noqa: E402

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello there"}]}
STREAM_BODY = {**BODY, "stream": True}


def start_mock() -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "mock_upstream.py"), "--port", "0"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline().split()[1])
    return proc, f"http://127.0.0.1:{port}"


def start_till(upstream: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILL_")}
    env.update(TILL_DATA_DIR=str(data_dir), TILL_UPSTREAM_OPENAI=upstream)
    port = free_port()
    till = str(Path(sys.executable).parent / "till")
    proc = subprocess.Popen(
        [till, "serve", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", proc=proc)
    out = subprocess.run(
        [till, "tenant", "create", "bench"], env=env, capture_output=True, text=True, check=True
    )
    admin_key = out.stdout.strip().splitlines()[-1]
    resp = httpx.post(
        f"{url}/admin/keys",
        headers={"authorization": f"Bearer {admin_key}"},
        json={"provider": "openai", "upstream_key": "sk-bench", "max_activations": 10**9},
    )
    resp.raise_for_status()
    return proc, url, resp.json()["key"]["scopedKey"]


def timed(
    client: httpx.Client, url: str, token: str, body: dict[str, object]
) -> tuple[float, float]:
    """(time to first byte, total) in milliseconds."""
    start = time.perf_counter()
    with client.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {token}"},
    ) as resp:
        first = None
        for _ in resp.iter_raw():
            if first is None:
                first = time.perf_counter()
        assert resp.status_code == 200, resp.status_code
    end = time.perf_counter()
    return ((first or end) - start) * 1000, (end - start) * 1000


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=1000, help="calls per target and kind")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="till-bench-", dir="/tmp"))
    mock, upstream = start_mock()
    till, till_url, token = start_till(upstream, data_dir)
    rows: list[tuple[str, float, float, float]] = []
    try:
        with httpx.Client(timeout=30) as client:
            for kind, body in (("plain", BODY), ("stream", STREAM_BODY)):
                samples: dict[str, list[tuple[float, float]]] = {"direct": [], "till": []}
                for _ in range(50):  # warm-up: connections, caches, the first prices
                    timed(client, upstream, "sk-bench", body)
                    timed(client, till_url, token, body)
                for i in range(args.n):
                    # Interleaved, alternating order: drift and noise hit both targets alike.
                    pair = [("direct", upstream, "sk-bench"), ("till", till_url, token)]
                    for name, url, key in pair if i % 2 else reversed(pair):
                        samples[name].append(timed(client, url, key, body))
                for name, values in samples.items():
                    totals = [t for _, t in values]
                    firsts = [f for f, _ in values]
                    rows.append(
                        (f"{kind} {name}", pct(totals, 50), pct(totals, 99), pct(firsts, 50))
                    )
    finally:
        stop_process(till)
        stop_process(mock)
        if mock.stdout is not None:
            mock.stdout.close()
        shutil.rmtree(data_dir, ignore_errors=True)

    lines = [f"| {name} | {p50:.2f} | {p99:.2f} | {ttfb:.2f} |" for name, p50, p99, ttfb in rows]
    by = {name: (p50, ttfb) for name, p50, _, ttfb in rows}
    added = by["plain till"][0] - by["plain direct"][0]
    added_ttfb = by["stream till"][1] - by["stream direct"][1]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = "\n".join(
        [
            f"## Latency, concurrency 1 ({stamp})",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}; {args.n} calls per row, interleaved; embedded store.",
            "",
            "| target | p50 ms | p99 ms | p50 first byte ms |",
            "|---|---|---|---|",
            *lines,
            "",
            f"Added p50 (plain chat): **{added:.2f} ms**; "
            f"added time to first byte (streamed chat): **{added_ttfb:.2f} ms**.",
            "",
        ]
    )
    print(report)
    if args.results:
        args.results.write_text("# Benchmark results\n\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where does Till's time go? py-spy samples Till's worker under non-streamed load at c=32.

py-spy records raw (collapsed) stacks, one line per distinct stack: `frame;frame;... count`,
root first; idle time (a thread waiting in epoll) is not sampled. The summary counts, like
`py-spy top`, each function's own samples (it was the innermost Python frame: time in C code it
called, uvloop's included, is its own) and its total samples (it was anywhere on the stack).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from benchmarks.load import Scenario, drive, run_async, wrk, wrk_path
from benchmarks.targets import reset_mock, start_mock, start_till

SAMPLE_RATE = 200  # per second
TOP = 15
# Innermost frames of a thread that is only waiting: py-spy does not always see it as idle.
IDLE_LEAVES = frozenset({"_worker (concurrent/futures/thread.py)"})


def py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        raise SystemExit("py-spy is not installed: pip install py-spy (it is in the dev extra)")
    return found


def summarize(raw: str, top: int = TOP) -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not stack or not count.isdigit() or frames[-1] in IDLE_LEAVES:
            continue
        n = int(count)
        samples += n
        own[frames[-1]] += n
        packages[_package(frames[-1])] += n
        for frame in set(frames):
            total[frame] += n
    if not samples:
        return "py-spy recorded no samples."
    lines = [
        f"{samples:,} samples of Till's process while busy (idle threads left out).",
        "",
        "| own % | total % | function (file) |",
        "|---|---|---|",
    ]
    for frame, n in own.most_common(top):
        lines.append(f"| {100 * n / samples:.1f} | {100 * total[frame] / samples:.1f} | {frame} |")
    shares = [(name, 100 * n / samples) for name, n in packages.most_common()]
    by_package = ", ".join(f"{name} {share:.0f}%" for name, share in shares if share >= 1)
    lines += ["", f"Own samples by package (1% or more): {by_package}."]
    return "\n".join(lines)


def _package(frame: str) -> str:
    """`StreamWriter.write (asyncio/streams.py)` -> `asyncio`; `(contextlib.py)` -> `contextlib`."""
    path = frame.rpartition(" (")[2].rstrip(")")
    return path.split("/", 1)[0].removesuffix(".py")


def profile(seconds: int, keep: Path | None = None, server: str = "uvicorn") -> str:
    scenario = Scenario(stream=False, concurrency=32)
    # The directory goes last: Till stops its embedded Redis through the files in it.
    with tempfile.TemporaryDirectory(prefix="till-profile-") as tmp, ExitStack() as stack:
        mock = start_mock(stack)
        till = start_till(stack, mock.url, Path(tmp), with_redis=False, server=server)
        run_async(drive(till.url, till.token, scenario, 2))  # warm-up
        reset_mock(mock)
        raw = keep or Path(tmp) / "till.raw"
        cmd = [py_spy(), "record", "--pid", str(till.roots[0]), "--duration", str(seconds)]
        cmd += ["--rate", str(SAMPLE_RATE), "--format", "raw", "--nolineno", "--output", str(raw)]
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # py-spy attaches; the load then outlasts the recording
        if wrk_path():
            run = wrk(till.url, till.token, scenario, seconds + 1)
        else:
            run = run_async(drive(till.url, till.token, scenario, seconds + 1))
        _, err = spy.communicate(timeout=60)
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')}")
        header = (
            f"Till (embedded store, {server}) under non-streamed chat at c=32:"
            f" {run.rps:,.0f} req/s, p50 {run.p50_ms:.2f} ms;"
            f" py-spy at {SAMPLE_RATE} Hz for {seconds} s."
        )
        return header + "\n\n" + summarize(raw.read_text())

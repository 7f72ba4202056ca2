"""Pickup benchmark: from `enqueue_email()` to DATA at the relay, beside a bare aiosmtplib send.

Run from the repository root, in the project's venv with the test extra installed:

    python benchmarks/pickup.py [--singles 100] [--burst 2000] [--bursts 3]

1. `--singles` requests, one at a time, each after the previous one arrived (and 20 ms more):
   p50/p99 from the call to the relay having the whole message (its DATA handler), beside a
   bare aiosmtplib `sendmail()` of the same bytes over an open connection to the same relay.
2. `--bursts` times, `--burst` requests enqueued back to back: when the first of them reaches
   the relay, counted from the first call, and when the last does.

The relay is an aiosmtpd server in its own process that writes `time.monotonic()` and the
Message-ID of each message as it has it (CLOCK_MONOTONIC is one clock for every process). The
daemon is `dispatcher run` in its own process, with the shipped defaults (8 connections, one
render process).
"""

import argparse
import asyncio
import gc
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiosmtplib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dispatcher  # noqa: E402
from benchmarks.common import CONTEXT, wait_for_port  # noqa: E402
from benchmarks.delivery import prebuilt_message  # noqa: E402
from dispatcher import client  # noqa: E402
from tests.daemon import DaemonProcess, write_settings  # noqa: E402
from tests.smtp_server import free_port  # noqa: E402

TARGET_SINGLE_P50_MS = 10.0
TARGET_SINGLE_P99_MS = 30.0
TARGET_BURST_FIRST_MS = 30.0
SPACING = 0.02  # seconds between one arrival and the next single request
WAIT_LIMIT = 120.0  # seconds any one arrival may take before the benchmark gives up
MESSAGE_ID = re.compile(rb"^Message-ID: <([^@>]+)@", re.MULTILINE | re.IGNORECASE)


class Stamping:
    """aiosmtpd handler: one line `<monotonic> <Message-ID left part>` per message received."""

    def __init__(self, log: Any) -> None:
        self.log = log

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        at = time.monotonic()
        found = MESSAGE_ID.search(envelope.original_content or envelope.content)
        self.log.write(f"{at} {found.group(1).decode() if found else '?'}\n")
        self.log.flush()
        return "250 2.0.0 Ok"


def relay(port: int, log_path: str) -> None:
    """The relay process: stamps each message until it is terminated."""
    from aiosmtpd.controller import Controller

    with open(log_path, "a") as log:
        controller = Controller(Stamping(log), hostname="127.0.0.1", port=port)
        controller.start()
        freeze()
        try:
            asyncio.run(asyncio.Event().wait())
        finally:
            controller.stop()


def freeze() -> None:
    """Keep this harness's own full collections (tens of ms on a slow machine, in the relay
    before it stamps, or in the client between its clock and its call) out of the figures."""
    gc.collect()
    gc.freeze()


class Arrivals:
    """The relay's stamps, read as they come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.at: dict[str, float] = {}

    def wait(self, ids: set[str], pause: float = 0.0005) -> dict[str, float]:
        """Bounded poll until every id in `ids` has arrived; their arrival times."""
        deadline = time.monotonic() + WAIT_LIMIT
        while not ids <= self.at.keys():
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(ids - self.at.keys())} messages never reached the relay")
            with self.path.open() as log:
                log.seek(self.offset)
                text = log.read()
            complete = text.rpartition("\n")[0]
            self.offset += len(complete) + 1 if complete else 0
            for line in complete.splitlines():
                at, message_id = line.split(" ")
                self.at[message_id] = float(at)
            time.sleep(pause)
        return {i: self.at[i] for i in ids}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def bare_sends(port: int, arrivals: Arrivals, count: int) -> list[float]:
    """Seconds from `sendmail()` to the relay having the message, prebuilt bytes, open link."""
    template = prebuilt_message()
    left = MESSAGE_ID.search(template)
    assert left is not None
    latencies = []

    async def run() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60)
        await smtp.connect()
        for n in range(count):
            message_id = f"bare{n}"
            message = template.replace(left.group(1), message_id.encode(), 1)
            started = time.monotonic()
            await smtp.sendmail("noreply@example.com", ["user@example.com"], message)
            latencies.append(arrivals.wait({message_id})[message_id] - started)
            await asyncio.sleep(SPACING)
        await smtp.quit()

    asyncio.run(run())
    return latencies


def singles(arrivals: Arrivals, count: int) -> list[float]:
    latencies = []
    for n in range(count):
        started = time.monotonic()
        request_id = dispatcher.enqueue_email(
            "welcome", to=f"single{n}@example.com", context=CONTEXT
        )
        latencies.append(arrivals.wait({request_id})[request_id] - started)
        time.sleep(SPACING)
    return latencies


def burst(arrivals: Arrivals, size: int) -> tuple[float, float]:
    """Seconds from the first call to the first and to the last arrival."""
    started = time.monotonic()
    ids = {
        dispatcher.enqueue_email("welcome", to=f"burst{n}@example.com", context=CONTEXT)
        for n in range(size)
    }
    at = arrivals.wait(ids, pause=0.005).values()
    return min(at) - started, max(at) - started


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--singles", type=int, default=100)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--relay", nargs=2, metavar=("PORT", "LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        relay(int(args.relay[0]), args.relay[1])
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder, port = Path(tmp), free_port()
        log_path = folder / "arrivals.log"
        log_path.touch()
        server = subprocess.Popen(
            [sys.executable, __file__, "--relay", str(port), str(log_path)],
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port)
            arrivals = Arrivals(log_path)
            freeze()
            bare = bare_sends(port, arrivals, args.singles)
            daemon = DaemonProcess(write_settings(folder, port, smtp={"connections": 8}))
            try:
                dispatcher.configure(daemon.settings_path)
                singles(arrivals, 3)  # warm-up: the client's connection, the render process
                single = singles(arrivals, args.singles)
                bursts = [burst(arrivals, args.burst) for _ in range(args.bursts)]
            finally:
                client.close()
                daemon.stop()
        finally:
            server.terminate()
            server.wait(10)
    floor_p50, floor_p99 = statistics.median(bare), percentile(bare, 0.99)
    p50, p99 = statistics.median(single), percentile(single, 0.99)
    print(f"single requests, {args.singles} spaced apart: enqueue_email() -> DATA at the relay")
    print(f"  dispatcher     p50 {ms(p50)}  p99 {ms(p99)}  max {ms(max(single))}")
    print(f"  bare aiosmtplib p50 {ms(floor_p50)}  p99 {ms(floor_p99)}  max {ms(max(bare))}")
    print(
        f"  ratio p50 {p50 / floor_p50:.1f}x, p99 {p99 / floor_p99:.1f}x"
        f" (targets: p50 <= {TARGET_SINGLE_P50_MS:.0f} ms, p99 <= {TARGET_SINGLE_P99_MS:.0f} ms)"
    )
    print(f"bursts of {args.burst}: first call -> first / last arrival")
    for first, last in bursts:
        print(f"  first {ms(first)} ({first / floor_p50:.1f}x bare p50)   last {ms(last)}")
    print(f"  (target: first <= {TARGET_BURST_FIRST_MS:.0f} ms)")


if __name__ == "__main__":
    main()

"""Enqueue benchmark: `enqueue_email()` call time against a live daemon, beside the floor.

Run from the repository root, in the project's venv (with the test extra installed):

    python benchmarks/enqueue.py [--calls 100000]

The floor is a raw PUSH `send(orjson.dumps(request), NOBLOCK)` of the same request dict, on a
socket with the client's options, to the same daemon, in the same run. `enqueue_email()` runs
with receipts on: its keeper thread takes the daemon's receipts while the caller is timed. The
timed calls go to a `dispatcher.Client` of the same settings (the module function adds one
lookup), whose public `resent` count is reported.

The daemon only stores: its SMTP server accepts connections and never greets, so its workers
wait on their first message and delivery takes no CPU from the caller. It logs at WARNING to a
file, so no thread in this process reads a line per request. Between runs the script waits
(bounded) until the spool holds every request, and after the `enqueue_email()` run it checks
that nothing was spilled: a daemon that keeps up must get every request over the socket.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dispatcher  # noqa: E402
from benchmarks.common import CONTEXT, wait_stored  # noqa: E402
from dispatcher import client, handoff, overflow  # noqa: E402
from dispatcher.settings import load_settings  # noqa: E402
from tests.daemon import write_settings  # noqa: E402

TARGET_RATIO = 3.0  # enqueue p50 within this factor of the floor's p50
TARGET_P99_US = 30.0
TARGET_TAIL_RATIO = 3.0  # enqueue p99.9 within this factor of the floor's p99.9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # accepts (in the kernel), never greets: delivery waits, idle
        settings_path = write_settings(
            Path(tmp), silent.getsockname()[1], smtp={"timeout": 600, "connections": 1}
        )
        log_path = Path(tmp, "daemon.log")
        with log_path.open("w") as log_file:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "dispatcher", "run", "--settings", str(settings_path),
                 "--log-level", "WARNING"],
                stdout=subprocess.DEVNULL, stderr=log_file,
            )  # fmt: skip
        try:
            run(settings_path, args.calls, log_path)
        finally:
            daemon.terminate()
            daemon.wait(30)
    print(
        f"\n(single run: run several times and compare the ratios; "
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs)"
    )


def run(settings_path: Path, calls: int, log_path: Path) -> None:
    settings = load_settings(settings_path, environ={})
    dispatcher.configure(settings_path)
    dispatcher.enqueue_email("welcome", to="warm-up@example.com", context=CONTEXT)
    if not dispatcher.flush(30.0):  # the daemon is up, and its receipts reach us
        raise SystemExit(f"the daemon did not acknowledge a first request:\n{log_path.read_text()}")
    stored = 1
    started = time.perf_counter()
    floor, refused = time_floor(settings.client.connect[0], calls)
    stored += calls - refused
    wait_stored(settings.spool.path, stored)
    intake = (calls - refused) / (time.perf_counter() - started)
    with dispatcher.Client(settings) as app:  # the module function's client, made public
        app.enqueue_email("welcome", to="warm-up@example.com", context=CONTEXT)
        if not app.flush(30.0):
            raise SystemExit("the daemon did not acknowledge the timed client's first request")
        samples = time_enqueue(app.enqueue_email, calls)
        acknowledged = app.flush(60.0)
        resent = app.resent
    spilled = len(overflow_ids(settings.client.overflow_dir))
    stored += calls + 1
    wait_stored(settings.spool.path, stored)
    client.close()
    report(calls, floor, refused, samples, acknowledged, resent, spilled)
    print(f"  the daemon stored the floor's flood at {intake:,.0f} requests/s")


def overflow_ids(folder: Path) -> list[bytes]:
    return [frame for path in overflow.waiting(folder) for frame in overflow.read(path) or []]


def time_floor(endpoint: str, calls: int) -> tuple[list[int], int]:
    """A raw PUSH of the same request, on a socket with the client's options."""
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.setsockopt(zmq.IMMEDIATE, 1)
        push.setsockopt(zmq.SNDHWM, handoff.SEND_HWM)
        push.setsockopt(zmq.LINGER, 5000)
        push.connect(endpoint)
        if not push.poll(10_000, zmq.POLLOUT):
            raise SystemExit(f"the floor's socket found no daemon at {endpoint}")
        request: dict[str, Any] = {"v": 1, "id": "", "template": "welcome", "to": "",
                                   "context": CONTEXT}  # fmt: skip
        dumps, send, nowait, clock = orjson.dumps, push.send, zmq.NOBLOCK, time.perf_counter_ns
        samples, full = [], 0
        for i in range(calls):
            request["id"], request["to"] = f"floor-{i}", f"user{i}@example.com"
            start = clock()
            try:
                send(dumps(request), nowait)
            except zmq.Again:  # the send queue (SNDHWM) and the daemon's are full
                full += 1
            samples.append(clock() - start)
        return samples, full


def time_enqueue(enqueue: Callable[..., str], calls: int) -> list[int]:
    clock = time.perf_counter_ns
    samples = []
    for i in range(calls):
        to = f"user{i}@example.com"
        start = clock()
        enqueue("welcome", to=to, context=CONTEXT)
        samples.append(clock() - start)
    return samples


def stats(samples_ns: list[int]) -> list[float]:
    """p50, p99, p99.9 and max in µs."""
    ordered = sorted(samples_ns)
    n = len(ordered)
    return [ordered[min(n - 1, int(n * q))] / 1000 for q in (0.5, 0.99, 0.999, 1.0)]


def report(
    calls: int,
    floor: list[int],
    refused: int,
    samples: list[int],
    acknowledged: bool,
    resent: int,
    spilled: int,
) -> None:
    (f50, f99, f999, fmax), (e50, e99, e999, emax) = stats(floor), stats(samples)
    print(f"\n{calls:,} calls, time in the caller          p50       p99     p99.9        max")
    print(
        f"  floor: raw PUSH of orjson.dumps(request) {f50:5.1f} µs {f99:6.1f} µs {f999:6.1f} µs"
        f" {fmax:7.0f} µs"
    )
    print(
        f"  enqueue_email(), receipts on            {e50:5.1f} µs {e99:6.1f} µs {e999:6.1f} µs"
        f" {emax:7.0f} µs"
    )
    ratio, tail = e50 / f50, e999 / f999
    met = ratio <= TARGET_RATIO and e99 < TARGET_P99_US and tail <= TARGET_TAIL_RATIO
    print(
        f"  p50 / floor p50 = {ratio:.1f}x (target <= {TARGET_RATIO:g}x), "
        f"p99 {e99:.1f} µs (target < {TARGET_P99_US:g} µs), p99.9 / floor p99.9 = {tail:.1f}x"
        f" (target <= {TARGET_TAIL_RATIO:g}x): {'met' if met else 'MISSED'}"
    )
    print(f"  floor sends refused with the queues full (zmq.Again): {refused}")
    print(
        f"  all acknowledged without a spill: {'yes' if acknowledged else 'NO'}; re-sent for "
        f"want of a receipt: {resent}; in the overflow folder after the flush: {spilled}"
    )


if __name__ == "__main__":
    main()

"""Intake benchmark: requests per second committed to the spool, and memory with a deep queue.

Run from the repository root, in the project's venv with the test extra installed:

    python benchmarks/intake.py [--requests 100000]

1. Intake: `--requests` frames (each naming its client, so receipts are published too) pushed
   by a separate process as fast as ZeroMQ takes them, timed until the daemon's spool holds
   them all, beside the ceiling of the storage itself measured in the same run: the same rows
   inserted into a fresh spool file by `Spool.add` in batches of 1,000, `synchronous=FULL`,
   with no sockets and no validation.
2. The daemon's peak RSS (VmHWM) once all `--requests` are queued, beside its RSS right after
   start. Its SMTP server answers each DATA after 50 ms over 8 connections, so the queue stays
   deep while it is measured.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import CONTEXT  # noqa: E402
from benchmarks.delivery import free_port, server, slow_server  # noqa: E402
from dispatcher import wire  # noqa: E402
from dispatcher.spool import Incoming, now  # noqa: E402
from dispatcher.spool.sqlite import SqliteReader, SqliteSpool  # noqa: E402
from tests.daemon import DaemonProcess, write_settings  # noqa: E402

WAIT_LIMIT = 600.0
# The flooding process: prebuilt frames, sent as fast as the socket takes them (blocking when
# the daemon's queue is full, so nothing is dropped and nothing goes to the overflow folder).
PUSHER = """
import sys, orjson, zmq
endpoint, total = sys.argv[1], int(sys.argv[2])
base = {"v": 1, "client": "bench", "template": "welcome", "to": "user@example.com",
        "context": orjson.loads(sys.argv[3])}
frames = [orjson.dumps({**base, "id": f"r{i}", "to": f"user{i}@example.com"})
          for i in range(total)]
context = zmq.Context()
push = context.socket(zmq.PUSH)
push.setsockopt(zmq.SNDHWM, 100_000)
push.connect(endpoint)
for frame in frames:
    push.send(frame)
push.close(linger=-1)
context.term()  # returns once every queued frame is on its way
"""


def frame(i: int) -> bytes:
    to = f"user{i}@example.com"
    return wire.encode(
        wire.request_fields("welcome", {"to": to, "context": CONTEXT}, id=f"r{i}", client="bench")
    )


def storage_ceiling(folder: Path, total: int) -> float:
    """Rows per second `Spool.add` commits with nothing else to do."""
    rows = [Incoming.of(wire.decode(frame(i))) for i in range(total)]
    with SqliteSpool(folder / "ceiling.sqlite3", "bench") as spool:
        start = time.perf_counter()
        for first in range(0, total, 1000):
            spool.add(rows[first : first + 1000], [], now())
        return total / (time.perf_counter() - start)


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"no {field} for process {pid}")


def wait_stored(daemon: DaemonProcess, total: int) -> float:
    """Bounded poll (5 per second: the count itself reads the spool) until the spool holds
    `total` requests; returns the rate at which they were committed, from their own
    `created_at` (each batch's commit time), so the polling does not blur it."""
    deadline = time.monotonic() + WAIT_LIMIT
    with SqliteReader(daemon.settings.spool.path) as spool:
        while True:
            (stored,) = spool.db.execute("select count(*) from requests").fetchone()
            if stored >= total:
                break
            (rejected,) = spool.db.execute("select count(*) from rejected").fetchone()
            if rejected or time.monotonic() > deadline:
                raise SystemExit(f"{stored} stored, {rejected} rejected: too slow or rejected")
            time.sleep(0.2)
        first, last, batch = spool.db.execute(
            "select min(created_at), max(created_at),"
            " (select count(*) from requests where created_at ="
            " (select min(created_at) from requests)) from requests"
        ).fetchone()
    # The first batch's commit starts the clock, so its rows are not counted.
    return float((total - batch) / (last - first))


def flood(folder: Path, total: int) -> tuple[float, int, int]:
    """Push `total` frames at a daemon; its committed rate, start RSS and peak RSS (KiB)."""
    port = free_port()
    with server(slow_server(port, 0.05), port):
        settings = write_settings(folder, port, smtp={"connections": 8, "timeout": 60})
        daemon = DaemonProcess(settings)
        try:
            pid = daemon.process.pid
            idle = memory_kib(pid, "VmRSS")
            pusher = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    PUSHER,
                    daemon.settings.intake.bind,
                    str(total),
                    orjson.dumps(CONTEXT).decode(),
                ],
                stdout=subprocess.PIPE,
            )
            rate = wait_stored(daemon, total)
            pusher.wait(60)
            peak = memory_kib(pid, "VmHWM")
        finally:
            daemon.stop()
    return rate, idle, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ceiling = storage_ceiling(Path(tmp), args.requests)
        daemon_folder = Path(tmp, "daemon")
        daemon_folder.mkdir()
        rate, idle, peak = flood(daemon_folder, args.requests)
    print(f"\n{args.requests:,} requests flooded into one daemon")
    print(f"  {'ceiling: Spool.add alone, batches of 1,000':<48}{ceiling:10,.0f} requests/s")
    print(
        f"  {'daemon: socket -> committed to the spool':<48}{rate:10,.0f} requests/s"
        f"  ({rate / ceiling:.0%} of the ceiling)"
    )
    print(f"  {'daemon RSS right after start':<48}{idle / 1024:10.1f} MiB")
    print(f"  {f'daemon peak RSS with {args.requests:,} queued':<48}{peak / 1024:10.1f} MiB")
    print(f"\n(python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()

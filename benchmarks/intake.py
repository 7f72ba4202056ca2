"""Intake benchmark: requests per second committed to the spool, and memory with a deep queue,
on SQLite and on PostgreSQL in the same run.

Run from the repository root, in the project's venv with the test extra installed:

    python benchmarks/intake.py [--requests 100000] [--spool-url postgresql://...]

`--spool-url`: a PostgreSQL server on which the benchmark creates (and drops) scratch databases,
so its role needs CREATEDB; without it, a throw-away server is started from Debian's binaries
(`apt-get install postgresql`), with fsync on as in production.

1. Intake, per store: `--requests` frames (each naming its client, so receipts are published
   too) pushed by a separate process as fast as ZeroMQ takes them, timed until the daemon's
   spool holds them all, beside the ceiling of the store itself measured in the same run: the
   same rows committed by `Spool.add` in batches of 1,000, with no sockets and no validation.
2. Three daemons on one PostgreSQL database, each flooded by its own process with a third of
   the requests.
3. The daemon's peak RSS (VmHWM) once all `--requests` are queued, beside its RSS right after
   start. Its SMTP server answers each DATA after 50 ms over 8 connections, so the queue stays
   deep while it is measured.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import CONTEXT, ask, postgres_databases, spool_section  # noqa: E402
from benchmarks.delivery import free_port, server, slow_server  # noqa: E402
from dispatcher import wire  # noqa: E402
from dispatcher.settings import SpoolSettings  # noqa: E402
from dispatcher.spool import Incoming, now, open_spool  # noqa: E402
from tests.daemon import DaemonProcess, write_settings  # noqa: E402

WAIT_LIMIT = 600.0
# The flooding process: prebuilt frames, sent as fast as the socket takes them (blocking when
# the daemon's queue is full, so nothing is dropped and nothing goes to the overflow folder).
PUSHER = """
import sys, orjson, zmq
endpoint, first, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = {"v": 1, "client": "bench", "template": "welcome", "to": "user@example.com",
        "context": orjson.loads(sys.argv[4])}
frames = [orjson.dumps({**base, "id": f"r{i}", "to": f"user{i}@example.com"})
          for i in range(first, first + total)]
context = zmq.Context()
push = context.socket(zmq.PUSH)
push.setsockopt(zmq.SNDHWM, 100_000)
push.connect(endpoint)
for frame in frames:
    push.send(frame)
push.close(linger=-1)
context.term()  # returns once every queued frame is on its way
"""


@dataclass(frozen=True)
class Flood:
    rate: float  # requests per second committed
    idle_kib: int  # the first daemon's RSS after start
    peak_kib: int  # and its peak with every request queued


def frame(i: int) -> bytes:
    to = f"user{i}@example.com"
    return wire.encode(
        wire.request_fields("welcome", {"to": to, "context": CONTEXT}, id=f"r{i}", client="bench")
    )


def storage_ceiling(spool: SpoolSettings, total: int) -> float:
    """Rows per second `Spool.add` commits with nothing else to do."""
    rows = [Incoming.of(wire.decode(frame(i))) for i in range(total)]
    with open_spool(spool, "bench") as store:
        start = time.perf_counter()
        for first in range(0, total, 1000):
            store.add(rows[first : first + 1000], [], now())
        return total / (time.perf_counter() - start)


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"no {field} for process {pid}")


def wait_stored(spool: SpoolSettings, total: int) -> float:
    """Bounded poll (5 per second: the count itself reads the spool) until the spool holds
    `total` requests; returns the rate at which they were committed, from their own
    `created_at` (each batch's commit time), so the polling does not blur it."""
    deadline = time.monotonic() + WAIT_LIMIT
    while True:
        stored, rejected = ask(
            spool, "select (select count(*) from requests), (select count(*) from rejected)"
        )
        if stored >= total:
            break
        if rejected or time.monotonic() > deadline:
            raise SystemExit(f"{stored} stored, {rejected} rejected: too slow or rejected")
        time.sleep(0.2)
    first, last, batch = ask(
        spool,
        "select min(created_at), max(created_at),"
        " (select count(*) from requests where created_at ="
        " (select min(created_at) from requests)) from requests",
    )
    # The first batch's commit starts the clock, so its rows are not counted.
    return float((total - batch) / (last - first))


def flood(folder: Path, total: int, url: str | None, daemons: int = 1) -> Flood:
    """Push `total` frames at `daemons` daemons on one spool (a third each, for three); the
    rate they were committed at, and the first daemon's start and peak RSS (KiB)."""
    port = free_port()
    with server(slow_server(port, 0.05), port):
        running: list[DaemonProcess] = []
        try:
            for n in range(daemons):
                (folder / f"d{n}").mkdir()
                settings = write_settings(
                    folder / f"d{n}",
                    port,
                    smtp={"connections": 8, "timeout": 60},
                    spool=spool_section(url) if url else {"path": str(folder / "spool.sqlite3")},
                )
                running.append(DaemonProcess(settings))
            pid = running[0].process.pid
            idle = memory_kib(pid, "VmRSS")
            share = total // daemons
            pushers = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        PUSHER,
                        daemon.settings.intake.bind,
                        str(n * share),
                        str(share),
                        orjson.dumps(CONTEXT).decode(),
                    ],
                    stdout=subprocess.PIPE,
                )
                for n, daemon in enumerate(running)
            ]
            rate = wait_stored(running[0].settings.spool, share * daemons)
            for pusher in pushers:
                pusher.wait(60)
            peak = memory_kib(pid, "VmHWM")
        finally:
            for daemon in running:
                daemon.stop()
    return Flood(rate, idle, peak)


def report(label: str, ceiling: float, one: Flood, requests: int) -> None:
    print(f"\n{label}: {requests:,} requests flooded into one daemon")
    print(f"  {'ceiling: Spool.add alone, batches of 1,000':<48}{ceiling:10,.0f} requests/s")
    print(
        f"  {'daemon: socket -> committed to the spool':<48}{one.rate:10,.0f} requests/s"
        f"  ({one.rate / ceiling:.0%} of the ceiling)"
    )
    print(f"  {'daemon RSS right after start':<48}{one.idle_kib / 1024:10.1f} MiB")
    print(f"  {f'daemon peak RSS with {requests:,} queued':<48}{one.peak_kib / 1024:10.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--spool-url", help="a PostgreSQL server to make scratch databases on")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, postgres_databases(args.spool_url) as database:
        stores = {"SQLite": None, "PostgreSQL": database}
        floods = {}
        for name, fresh in stores.items():
            folder = Path(tmp, name)
            folder.mkdir()
            spool = SpoolSettings(path=folder / "ceiling.sqlite3", url=fresh and fresh())
            ceiling = storage_ceiling(spool, args.requests)
            floods[name] = flood(folder, args.requests, fresh and fresh())
            report(name, ceiling, floods[name], args.requests)
        folder = Path(tmp, "three")
        folder.mkdir()
        three = flood(folder, args.requests, database(), daemons=3)
    sqlite_rate = floods["SQLite"].rate
    print(f"\nPostgreSQL beside SQLite (the same {args.requests:,} requests)")
    for label, rate in [
        ("one daemon on SQLite", sqlite_rate),
        ("one daemon on PostgreSQL", floods["PostgreSQL"].rate),
        ("three daemons on one PostgreSQL", three.rate),
    ]:
        print(f"  {label:<48}{rate:10,.0f} requests/s  ({rate / sqlite_rate:.0%} of SQLite)")
    print(f"\n(python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()

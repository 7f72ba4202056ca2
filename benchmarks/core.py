"""Core benchmark: enqueue call time and end-to-end delivery rate, each beside its baseline.

Run from the repository root, in the project's venv (with the test extra installed):

    python benchmarks/core.py [--calls 10000] [--mails 2000] [--connections 8]

1. `enqueue_email()` call time against a running daemon, beside the floor: a raw PUSH
   `send(orjson.dumps(request), NOBLOCK)` of the same request on the same kind of socket.
2. End-to-end mails per second: `--mails` templated requests enqueued, then timed until the
   spool has them all sent to an aiosmtpd sink (its own process), beside the ceiling of that
   server with a plain aiosmtplib client blasting one prebuilt message over the same number of
   connections.
Numbers are only meaningful as ratios against the baseline measured in the same run.
"""

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib
import orjson
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dispatcher  # noqa: E402
from dispatcher import client  # noqa: E402
from dispatcher.render import Renderer  # noqa: E402
from dispatcher.spool import Spool  # noqa: E402
from dispatcher.wire import validate  # noqa: E402
from tests.daemon import DaemonProcess, write_settings  # noqa: E402
from tests.smtp_server import free_port  # noqa: E402

CONTEXT = {"name": "Zoë <O'Brien> & Co", "activate_url": "https://example.com/activate/42"}


def percentiles(samples_ns: list[int]) -> str:
    ordered = sorted(samples_ns)
    p50 = ordered[len(ordered) // 2] / 1000
    p99 = ordered[int(len(ordered) * 0.99)] / 1000
    return f"{p50:8.1f} µs {p99:8.1f} µs {ordered[-1] / 1000:9.1f} µs"


def time_calls(call: object, n: int) -> list[int]:
    samples = []
    for i in range(n):
        start = time.perf_counter_ns()
        call(i)  # type: ignore[operator]
        samples.append(time.perf_counter_ns() - start)
    return samples


def bench_enqueue(daemon: DaemonProcess, calls: int) -> None:
    dispatcher.configure(daemon.settings_path)

    def enqueue(i: int) -> None:
        dispatcher.enqueue_email("welcome", to=f"user{i}@example.com", context=CONTEXT)

    enqueue(0)  # create the socket outside the measurement
    frame_fields = {
        "v": 1,
        "id": "x" * 32,
        "template": "welcome",
        "to": "user0@example.com",
        "context": CONTEXT,
    }
    push = client._state.get().push

    def raw(i: int) -> None:
        frame_fields["id"] = f"raw{i}"
        push.send(orjson.dumps(frame_fields), zmq.NOBLOCK)

    rows = []
    stored = 1
    for name, call in (("raw PUSH of orjson.dumps(request)", raw), ("enqueue_email()", enqueue)):
        rows.append((name, percentiles(time_calls(call, calls))))
        stored += calls
        wait_stored(daemon.settings.spool.path, stored)  # drained before the next run
    print(f"\n{calls:,} calls, time in the caller       p50         p99         max")
    for name, figures in rows:
        print(f"  {name:<36}{figures}")
    client._state.close()


async def blast(port: int, message: bytes, total: int, connections: int) -> float:
    """The server's ceiling: prebuilt bytes over `connections` reused connections."""

    async def one(n: int) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
        await smtp.connect()
        for _ in range(n):
            await smtp.sendmail("noreply@example.com", ["user@example.com"], message)
        await smtp.quit()

    start = time.perf_counter()
    await asyncio.gather(*(one(total // connections) for _ in range(connections)))
    return (total // connections * connections) / (time.perf_counter() - start)


def wait_stored(spool_path: Path, total: int, timeout: float = 120) -> None:
    wait_spool(spool_path, total, ("queued", "retry", "sending", "sent", "dead"), timeout)


def wait_spool(spool_path: Path, total: int, states: tuple[str, ...], timeout: float) -> None:
    """Bounded poll until `total` requests are in `states`."""
    deadline = time.monotonic() + timeout
    with Spool(spool_path) as spool:
        while sum(spool.counts()[s] for s in states) < total:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {spool.counts()} after {timeout} s")
            time.sleep(0.02)


def bench_delivery(folder: Path, mails: int, connections: int) -> None:
    port = free_port()
    sink = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            f"127.0.0.1:{port}",
            "-c",
            "aiosmtpd.handlers.Sink",
        ]
    )
    try:
        time.sleep(1.0)  # the sink has no readiness signal; it starts in well under a second
        renderer = Renderer(ROOT / "templates", "Example <noreply@example.com>")
        request = validate(
            {"v": 1, "template": "welcome", "to": "user@example.com", "context": CONTEXT}
        )
        message = renderer.render(request).data
        ceiling = asyncio.run(blast(port, message, mails, connections))
        settings = write_settings(folder, port, smtp={"connections": connections, "timeout": 30})
        daemon = DaemonProcess(settings)
        try:
            dispatcher.configure(settings)
            start = time.perf_counter()
            for i in range(mails):
                dispatcher.enqueue_email("welcome", to=f"user{i}@example.com", context=CONTEXT)
            wait_spool(daemon.settings.spool.path, mails, ("sent",), timeout=600)
            rate = mails / (time.perf_counter() - start)
            cpu = daemon_cpu_seconds(daemon.process.pid)
        finally:
            daemon.stop()
            client._state.close()
    finally:
        sink.terminate()
        sink.wait()
    print(f"\n{mails:,} templated mails, {connections} SMTP connections, aiosmtpd sink")
    print(f"  {'ceiling: aiosmtplib blasting prebuilt bytes':<48}{ceiling:8.0f} mails/s")
    print(
        f"  {'dispatcher end to end (enqueue -> sent in spool)':<48}{rate:8.0f} mails/s"
        f"  ({rate / ceiling:.0%} of the ceiling)"
    )
    print(f"  daemon CPU: {cpu / mails * 1000:.2f} s per 1,000 mails (incl. start-up)")


def daemon_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--mails", type=int, default=2_000)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        first, second = Path(tmp, "enqueue"), Path(tmp, "delivery")
        first.mkdir(), second.mkdir()
        daemon = DaemonProcess(write_settings(first, free_port()))
        try:
            bench_enqueue(daemon, args.calls)
        finally:
            daemon.stop()
        bench_delivery(second, args.mails, args.connections)
    print(
        f"\n(single runs: run several times and compare the ratios; "
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    main()

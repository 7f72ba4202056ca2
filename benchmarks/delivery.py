"""Delivery benchmark: end-to-end mails per second and daemon CPU, beside the SMTP ceiling.

Run from the repository root, in the project's venv with the test extra installed, on a machine
with Postfix's smtp-sink (`apt-get install postfix`; only /usr/sbin/smtp-sink is used):

    python benchmarks/delivery.py [--mails 5000] [--connections 8]
        [--slow-mails 3000] [--slow-connections 8,32,128] [--delay 0.05]
        [--spool-url postgresql://...]

1. smtp-sink answering at once: `--mails` templated requests enqueued with `enqueue_email()`
   and timed until the daemon's spool has them all `sent`, beside the ceiling of that server and
   client pair in the same run: a plain aiosmtplib client blasting one prebuilt message (the
   same template, rendered once) over the same number of connections.
2. The same against an aiosmtpd server that delays each DATA reply by `--delay` seconds, for
   each of `--slow-connections`, beside that server's own ceiling (the blast over as many
   connections) and the theoretical `connections / delay`.
3. Daemon CPU seconds per 1,000 mails (its whole process tree, from the first enqueue to the
   last `sent`), beside the blasting client's own CPU per 1,000 mails.

Each run is made on a SQLite spool, then on a PostgreSQL one; the smtp-sink run also with three
daemons on one PostgreSQL database (each with `--connections`, the client connected to all
three). `--spool-url`: a PostgreSQL server to make (and drop) scratch databases on (its role
needs CREATEDB); without it a throw-away server is started from Debian's binaries, fsync on.

Every server is a real process on 127.0.0.1; nothing leaves the machine.
"""

import argparse
import asyncio
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dispatcher  # noqa: E402
from benchmarks.common import (  # noqa: E402
    CONTEXT,
    ask,
    postgres_databases,
    spool_section,
    wait_for_port,
)
from dispatcher import client  # noqa: E402
from dispatcher.render import Renderer  # noqa: E402
from dispatcher.settings import SpoolSettings  # noqa: E402
from dispatcher.wire import validate  # noqa: E402
from tests.daemon import DaemonProcess, write_settings  # noqa: E402
from tests.smtp_server import free_port  # noqa: E402

SMTP_SINK = "/usr/sbin/smtp-sink"
WAIT_LIMIT = 900.0  # seconds any one run may take before the benchmark gives up


@dataclass(frozen=True)
class Figures:
    rate: float  # mails per second
    cpu_per_1000: float  # CPU seconds per 1,000 mails


@contextmanager
def server(command: list[str], port: int) -> Iterator[None]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield
    finally:
        process.terminate()
        process.wait(10)


def smtp_sink(port: int) -> list[str]:
    # -u: the user to run as when started as root; 1000: the listen backlog.
    return [SMTP_SINK, "-u", "nobody", f"127.0.0.1:{port}", "1000"]


def slow_server(port: int, delay: float) -> list[str]:
    return [sys.executable, str(ROOT / "benchmarks" / "slow_smtp.py"), str(port), str(delay)]


def prebuilt_message() -> bytes:
    renderer = Renderer(ROOT / "templates", "Example <noreply@example.com>")
    request = validate(
        {"v": 1, "template": "welcome", "to": "user@example.com", "context": CONTEXT}
    )
    return renderer.render(request).data


def blast(port: int, message: bytes, total: int, connections: int) -> Figures:
    """The pair's ceiling: prebuilt bytes over `connections` reused aiosmtplib connections."""

    async def one(n: int) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60)
        await smtp.connect()
        for _ in range(n):
            await smtp.sendmail("noreply@example.com", ["user@example.com"], message)
        await smtp.quit()

    async def run() -> None:
        await asyncio.gather(*(one(total // connections) for _ in range(connections)))

    sent = total // connections * connections
    cpu, start = time.process_time(), time.perf_counter()
    asyncio.run(run())
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return Figures(sent / elapsed, cpu / sent * 1000)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live children (a render pool, say)."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        pending.extend(int(child) for child in children)
    return total


def wait_sent(spool: SpoolSettings, total: int) -> float:
    """Bounded poll until `total` requests are sent; returns when the last one was recorded
    (its `updated_at`), so the poll can be slow and cheap and take no CPU from the daemon."""
    deadline = time.monotonic() + WAIT_LIMIT
    while True:
        sent, failed = ask(
            spool,
            "select (select count(*) from requests where state = 'sent'),"
            " (select count(*) from requests where state = 'dead')"
            " + (select count(*) from rejected)",
        )
        if sent >= total:
            (last,) = ask(spool, "select max(updated_at) from requests where state = 'sent'")
            return float(last)
        if failed or time.monotonic() > deadline:
            raise SystemExit(f"{spool.where()}: {sent} sent, {failed} dead or rejected")
        time.sleep(0.1)


def end_to_end(
    folder: Path, port: int, mails: int, connections: int, url: str | None = None, daemons: int = 1
) -> Figures:
    """Enqueue `mails` templated requests and time them until all are sent: by one daemon, or
    by `daemons` on one PostgreSQL `url`, the client connected to all of them."""
    running: list[DaemonProcess] = []
    try:
        for n in range(daemons):
            (folder / f"d{n}").mkdir()
            settings = write_settings(
                folder / f"d{n}",
                port,
                smtp={"connections": connections, "timeout": 60},
                spool=spool_section(url),
            )
            running.append(DaemonProcess(settings))
        client_settings = write_settings(
            folder,
            port,
            client={
                "connect": [d.settings.intake.bind for d in running],
                "acks": [d.settings.intake.acks for d in running],
                "overflow_dir": "overflow",
            },
        )
        dispatcher.configure(client_settings)
        pids = [d.process.pid for d in running]
        cpu, start = sum(map(tree_cpu_seconds, pids)), time.time()  # the spool's clock
        for i in range(mails):
            dispatcher.enqueue_email("welcome", to=f"user{i}@example.com", context=CONTEXT)
        elapsed = wait_sent(running[0].settings.spool, mails) - start
        cpu = sum(map(tree_cpu_seconds, pids)) - cpu
    finally:
        client.close()
        for daemon in running:
            daemon.stop()
    return Figures(mails / elapsed, cpu / mails * 1000)


def row(label: str, figures: Figures, ceiling: Figures | None = None) -> str:
    share = f"{figures.rate / ceiling.rate:6.0%}" if ceiling else "     -"
    return f"  {label:<46}{figures.rate:8.0f}/s {share}   {figures.cpu_per_1000:6.3f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--slow-mails", type=int, default=3000)
    parser.add_argument("--slow-connections", default="8,32,128")
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--skip-slow", action="store_true", help="only the smtp-sink run")
    parser.add_argument("--spool-url", help="a PostgreSQL server to make scratch databases on")
    args = parser.parse_args()
    if not shutil.which(SMTP_SINK):
        raise SystemExit(f"{SMTP_SINK} not found: apt-get install postfix (only smtp-sink is used)")
    message = prebuilt_message()
    header = f"  {'':<46}{'mails/s':>10} {'share':>6}   CPU/1,000 mails"
    with tempfile.TemporaryDirectory() as tmp, postgres_databases(args.spool_url) as database:
        runs = itertools.count()

        def stores(connections: int, mails: int, port: int, ceiling: Figures) -> Figures:
            """The run on SQLite, then on PostgreSQL; prints both, returns SQLite's."""
            figures = {}
            for name, url in [("SQLite", None), ("PostgreSQL", database())]:
                folder = Path(tmp, f"run{next(runs)}")
                folder.mkdir()
                figures[name] = end_to_end(folder, port, mails, connections, url)
                print(row(f"dispatcher on {name}: enqueue -> sent", figures[name], ceiling))
            share = figures["PostgreSQL"].rate / figures["SQLite"].rate
            print(f"  {'PostgreSQL / SQLite':<46}{share:18.0%}", flush=True)
            return figures["SQLite"]

        port = free_port()
        print(
            f"\n{args.mails:,} mails, {args.connections} connections, smtp-sink answering at once"
        )
        print(header)
        with server(smtp_sink(port), port):
            ceiling = blast(port, message, args.mails, args.connections)
            print(row("ceiling: aiosmtplib blasting prebuilt bytes", ceiling), flush=True)
            sqlite = stores(args.connections, args.mails, port, ceiling)
            folder = Path(tmp, "three")
            folder.mkdir()
            three = end_to_end(folder, port, args.mails, args.connections, database(), daemons=3)
            print(row("three daemons on one PostgreSQL", three, ceiling))
            print(f"  {'three on PostgreSQL / one on SQLite':<46}{three.rate / sqlite.rate:18.0%}")
        if args.skip_slow:
            return
        for connections in (int(n) for n in args.slow_connections.split(",")):
            port = free_port()
            ideal = connections / args.delay
            print(
                f"\n{args.slow_mails:,} mails, {connections} connections, aiosmtpd answering"
                f" DATA after {args.delay * 1000:g} ms (connections / delay = {ideal:.0f}/s)"
            )
            print(header)
            with server(slow_server(port, args.delay), port):
                ceiling = blast(port, message, args.slow_mails, connections)
                print(row("ceiling: aiosmtplib blasting prebuilt bytes", ceiling), flush=True)
                figures = stores(connections, args.slow_mails, port, ceiling)
                print(f"  {'SQLite: share of connections / delay':<46}{figures.rate / ideal:18.0%}")
    print(
        f"\n(share: of the ceiling measured just before in the same run; "
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    main()

"""Scale-out run: three `dispatcher run` daemons on one PostgreSQL, one killed with SIGKILL.

Run from the repository root, in the project's venv with the test extra installed:

    python benchmarks/scale_out.py [--requests 3000] [--lease 60] [--spool-url postgresql://...]

Three daemons (separate processes, TCP intake on loopback) share one PostgreSQL database; a
client connected to all three enqueues `--requests` requests at a steady pace, and once a
third of them are delivered one daemon gets `kill -9` and is not restarted. The run reports
how long after the kill the last request arrived (the promise: within `spool.lease` + 30 s),
and checks that every request arrived and that only requests the killed daemon held (read
from the spool at the moment of the kill) arrived twice. Its SMTP server (aiosmtpd, on
127.0.0.1) answers each DATA after 20 ms, so sends are in flight when the daemon dies.
"""

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import CONTEXT, ask, postgres_databases  # noqa: E402
from dispatcher.client import Client  # noqa: E402
from dispatcher.service import instance_name  # noqa: E402
from dispatcher.settings import load_settings  # noqa: E402
from dispatcher.spool import open_reader  # noqa: E402
from tests.daemon import DaemonProcess, write_settings  # noqa: E402
from tests.postgres import query  # noqa: E402
from tests.smtp_server import SmtpServer, free_port  # noqa: E402

PACE = 500.0  # requests per second the client enqueues
WAIT_MARGIN = 30.0  # seconds past the lease the promise allows


def daemon_settings(folder: Path, smtp_port: int, url: str, lease: float) -> Path:
    """A daemon as an operator would run it on a host of its own: TCP intake on loopback."""
    folder.mkdir()
    intake, acks = free_port(), free_port()
    return write_settings(
        folder,
        smtp_port,
        intake={"bind": f"tcp://127.0.0.1:{intake}", "acks": f"tcp://127.0.0.1:{acks}"},
        client={"connect": [f"tcp://127.0.0.1:{intake}"], "acks": [f"tcp://127.0.0.1:{acks}"]},
        spool={"url": url, "lease": lease},
        smtp={"connections": 4},
    )


def kill(victim: DaemonProcess) -> tuple[float, set[str]]:
    """`kill -9` the daemon; when, and the requests it held then (its claims in the spool)."""
    victim.process.kill()  # its claims stay in the spool, as after a host dies
    victim.process.wait(10)
    killed_at = time.monotonic()
    with open_reader(victim.settings.spool) as spool:
        held = query(
            spool,
            f"select id from requests where claimed_by = '{instance_name(victim.settings)}'",
        )
    return killed_at, {request_id for (request_id,) in held}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--lease", type=float, default=60.0)
    parser.add_argument("--spool-url", help="a PostgreSQL server to make a scratch database on")
    args = parser.parse_args()
    smtp = SmtpServer()
    smtp.start()
    smtp.slow_reply(seconds=0.02, times=10 * args.requests)
    with tempfile.TemporaryDirectory() as tmp, postgres_databases(args.spool_url) as database:
        url = database()
        paths = [
            daemon_settings(Path(tmp, f"host{n}"), smtp.port, url, args.lease) for n in range(3)
        ]
        daemons = [DaemonProcess(path) for path in paths]
        try:
            everyone = [d.settings for d in daemons]
            client_settings = write_settings(
                Path(tmp),
                smtp.port,
                client={
                    "connect": [s.intake.bind for s in everyone],
                    "acks": [s.intake.acks for s in everyone],
                    "overflow_dir": "overflow",
                },
            )
            victim = daemons[1]
            held: set[str] = set()
            third = args.requests // 3
            killed_at: float | None = None
            ids = []
            start = time.monotonic()
            with Client(load_settings(client_settings, environ={})) as client:
                for i in range(args.requests):
                    ids.append(
                        client.enqueue_email("welcome", to=f"user{i}@example.com", context=CONTEXT)
                    )
                    if killed_at is None and i % 50 == 0 and len(smtp.messages) >= third:
                        killed_at, held = kill(victim)
                    time.sleep(max(0.0, start + (i + 1) / PACE - time.monotonic()))
                if killed_at is None:  # all enqueued first: kill while they are delivered
                    smtp.wait_for(third, timeout=120)
                    killed_at, held = kill(victim)
                acknowledged = client.flush(60)
            deadline = killed_at + args.lease + WAIT_MARGIN
            wanted = set(ids)
            while time.monotonic() < deadline + 30:  # bounded: past the promise, report it
                arrived = Counter(
                    m.message_id.strip("<>").split("@")[0] for m in smtp.messages if m.message_id
                )
                if wanted <= set(arrived):
                    break
                time.sleep(0.2)
            last = time.monotonic()
            (sent,) = ask(
                victim.settings.spool, "select count(*) from requests where state = 'sent'"
            )
        finally:
            for daemon in daemons:
                daemon.kill()
            smtp.stop()
    twice = {i for i, n in arrived.items() if n > 1}
    missing = wanted - set(arrived)
    print(f"\n{args.requests:,} requests into three daemons on one PostgreSQL")
    print(f"  every request acknowledged or spilled by the client   {acknowledged}")
    print(f"  requests the killed daemon held at the kill            {len(held)}")
    print(
        f"  delivered (distinct)                                   {len(set(arrived) & wanted):,}"
    )
    print(f"  missing                                                {len(missing)}")
    print(f"  delivered twice                                        {len(twice)}")
    print(f"  ... of them not held by the killed daemon              {len(twice - held)}")
    print(f"  spool: sent                                            {sent:,}")
    print(
        f"  last delivery after the kill                           {last - killed_at:.1f} s"
        f"  (promise: lease + {WAIT_MARGIN:g} s = {args.lease + WAIT_MARGIN:g} s)"
    )
    ok = not missing and twice <= held and last - killed_at <= args.lease + WAIT_MARGIN
    print(f"  acceptance                                             {'PASS' if ok else 'FAIL'}")
    print(f"\n(python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()

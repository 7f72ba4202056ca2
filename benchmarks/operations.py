"""Operations benchmark: what queue administration and monitoring cost a running daemon.

Run from the repository root, in the project's venv (with the test extra installed):

    python benchmarks/operations.py [--rows 100000] [--retries 5]

1. Spool queries on a spool of `--rows` sent requests: the feeder's idle wake-up (`claim` +
   `next_due_at`, once a second), the watchdog's STATUS figure (`waiting`), and the counts a
   metrics scrape or `dispatcher status` reads (`counts`).
2. `dispatcher retry ID` of a dead request against a running daemon, timed until the message
   reaches an aiosmtpd server: the command's own start-up plus the daemon noticing the row.
"""

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dispatcher  # noqa: E402
from dispatcher import client, wire  # noqa: E402
from dispatcher.spool import Incoming  # noqa: E402
from dispatcher.spool.sqlite import SqliteSpool  # noqa: E402
from tests.daemon import DaemonProcess, run_cli, write_settings  # noqa: E402
from tests.smtp_server import SmtpServer  # noqa: E402

CONTEXT = {"name": "Ada", "activate_url": "https://example.com/a"}


def spool_queries(rows: int) -> None:
    with (
        tempfile.TemporaryDirectory() as folder,
        SqliteSpool(Path(folder) / "spool.sqlite3", "bench") as spool,
    ):
        batch = []
        for i in range(rows):
            request = wire.validate({"v": 1, "id": f"r{i}", "template": "welcome", "to": "a@x.org"})
            batch.append(Incoming.of(request))
        spool.add(batch, [], 0.0)
        spool.db.execute("update requests set state = 'sent'")

        def wake_up() -> None:
            spool.claim(time.time(), 8)
            spool.next_due_at()

        calls: list[tuple[str, Callable[[], Any], int]] = [
            ("feeder wake-up (claim + next_due_at)", wake_up, 200),
            ("waiting (STATUS=)", spool.waiting, 200),
            ("counts (scrape, status)", spool.counts, 20),
        ]
        for name, call, times in calls:
            start = time.perf_counter()
            for _ in range(times):
                call()
            per_call = (time.perf_counter() - start) / times
            print(f"{name}: {per_call * 1e6:,.0f} us per call on {rows:,} sent rows")


def retry_to_delivery(retries: int) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:  # short: ipc:// path limit
        retry_in(Path(folder), retries)


def retry_in(folder: Path, retries: int) -> None:
    server = SmtpServer()
    server.start()
    daemon = DaemonProcess(write_settings(folder, server.port))
    dispatcher.configure(daemon.settings_path)
    seconds = []
    try:
        for i in range(retries):
            address = f"r{i}@example.com"
            server.refuse_recipient(address, "550 5.1.1 No such user")
            request_id = dispatcher.enqueue_email("welcome", to=address, context=CONTEXT)
            assert dispatcher.flush(5)
            daemon.wait_for_counts(dead=1)
            server.reset_faults()
            start = time.monotonic()
            result = run_cli("retry", request_id, settings=daemon.settings_path)
            assert result.returncode == 0, result.stderr
            server.wait_for(i + 1, timeout=30)
            seconds.append(time.monotonic() - start)
            daemon.wait_for_counts(dead=0, sent=i + 1)
    finally:
        client.close()
        daemon.stop()
        server.stop()
    print(f"dispatcher retry -> delivered: {', '.join(f'{s:.2f}' for s in seconds)} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--retries", type=int, default=5)
    args = parser.parse_args()
    spool_queries(args.rows)
    retry_to_delivery(args.retries)


if __name__ == "__main__":
    main()

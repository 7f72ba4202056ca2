"""What the benchmarks share: the request they send and a bounded wait on a daemon's spool."""

import time
from pathlib import Path

from dispatcher.spool.sqlite import SqliteReader

# The welcome template's context, with characters that need escaping and encoding.
CONTEXT = {"name": "Zoë <O'Brien> & Co", "activate_url": "https://example.com/activate/42"}


def wait_stored(spool_path: Path, total: int, timeout: float = 120) -> None:
    """Bounded poll until the spool holds `total` requests, whatever their state."""
    deadline = time.monotonic() + timeout
    with SqliteReader(spool_path) as spool:
        while True:
            (stored,) = spool.db.execute("select count(*) from requests").fetchone()
            if stored >= total:
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"only {stored} of {total} requests stored after {timeout} s")
            time.sleep(0.02)

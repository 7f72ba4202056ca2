"""The spool: the source of truth for every request a daemon has accepted.

`open_spool` gives the daemon its read-write `Spool`, `open_reader` gives reports a `Reader`
that never takes the write lock; both choose the store from the settings (SQLite, a file).
"""

import time

from dispatcher.settings import SpoolSettings
from dispatcher.spool.base import Reader, Spool
from dispatcher.spool.records import STATES, Finish, Incoming, RelayState, Row, Start

__all__ = [
    "STATES",
    "Finish",
    "Incoming",
    "Reader",
    "RelayState",
    "Row",
    "Spool",
    "Start",
    "now",
    "open_reader",
    "open_spool",
]


def open_spool(settings: SpoolSettings, owner: str) -> Spool:
    """The daemon's spool, created or migrated to the current schema; claims made as `owner`."""
    from dispatcher.spool.sqlite import SqliteSpool

    return SqliteSpool(settings.path, owner, lease=settings.lease)


def open_reader(settings: SpoolSettings) -> Reader:
    """A read-only view for status, inspect, metrics and the preview; `SpoolError` if absent."""
    from dispatcher.spool.sqlite import SqliteReader

    return SqliteReader(settings.path)


def now() -> float:
    """Wall-clock seconds; one place, so tests and the spool agree on the clock."""
    return time.time()

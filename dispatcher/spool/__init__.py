"""The spool: the source of truth for every request a daemon has accepted.

`open_spool` gives the daemon its read-write `Spool`, `open_reader` gives reports a `Reader`
that never takes the write lock; both choose the store from the settings: a SQLite file
(`spool.path`), or a PostgreSQL database shared by several daemons (`spool.url`).
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
    if settings.url is not None:
        from dispatcher.spool.postgres import PostgresSpool  # psycopg only when asked for

        return PostgresSpool(settings, owner)
    from dispatcher.spool.sqlite import SqliteSpool

    return SqliteSpool(settings.path, owner, lease=settings.lease)


def open_reader(settings: SpoolSettings) -> Reader:
    """A read-only view for status, inspect, metrics and the preview; `SpoolError` if absent."""
    if settings.url is not None:
        from dispatcher.spool.postgres import PostgresReader

        return PostgresReader(settings)
    from dispatcher.spool.sqlite import SqliteReader

    return SqliteReader(settings.path)


def now() -> float:
    """Wall-clock seconds; one place, so tests and the spool agree on the clock."""
    return time.time()

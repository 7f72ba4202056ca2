"""What the benchmarks share: the request they send, bounded waits on a daemon's spool, and the
stores they compare (a SQLite file; scratch databases on a PostgreSQL server)."""

import contextlib
import itertools
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dispatcher.settings import SpoolSettings
from dispatcher.spool import open_reader
from dispatcher.spool.sqlite import SqliteReader
from tests.postgres import PostgresServer, query


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """Bounded poll until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


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


def ask(spool: SpoolSettings, statement: str) -> tuple[Any, ...]:
    """The one row of a query both stores understand, on a reader opened for it."""
    with open_reader(spool) as reader:
        (row,) = query(reader, statement)
    return row


@contextlib.contextmanager
def postgres_databases(url: str | None) -> Iterator[Callable[[], str]]:
    """A factory of fresh database URLs: scratch databases on the server of `url` (its role
    needs CREATEDB; they are dropped afterwards), else on a throw-away server started from
    Debian's binaries, with fsync on as in production."""
    import psycopg

    names = (f"dispatcher_bench_{os.getpid()}_{n}" for n in itertools.count())
    made: list[str] = []
    with contextlib.ExitStack() as stack:
        if url is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pg")))
            server = PostgresServer(folder, fsync=True)
            stack.callback(server.stop)
            url = server.url("postgres")
        parts = urlsplit(url)

        def admin(statement: str) -> None:
            with psycopg.connect(url, autocommit=True) as db:
                db.execute(statement)

        def fresh() -> str:
            name = next(names)
            admin(f'create database "{name}"')
            made.append(name)
            return urlunsplit(parts._replace(path=f"/{name}"))

        try:
            yield fresh
        finally:
            for name in made:
                with contextlib.suppress(psycopg.Error):
                    admin(f'drop database if exists "{name}" with (force)')


def spool_section(url: str | None) -> dict[str, str]:
    """The `spool` settings of a daemon: on a PostgreSQL URL, else a SQLite file in its folder."""
    return {"url": url} if url else {"path": "spool.sqlite3"}

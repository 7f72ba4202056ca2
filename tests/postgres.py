"""A real PostgreSQL for tests and benchmarks: Debian's `initdb` and `postgres` on a throw-away
folder, listening on a socket in that folder and on 127.0.0.1, a fresh database per test.

`initdb` and `postgres` refuse to run as root: as root they run as the `postgres` user, on a
folder it owns. Local connections are trusted; TCP ones need the password `PASSWORD`.
"""

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from dispatcher.settings import SpoolSettings
from dispatcher.spool import Reader
from dispatcher.spool.sqlite import SqliteReader
from tests.smtp_server import free_port

START_TIMEOUT = 60.0
PASSWORD = "dispatcher-test-secret"
SUPERUSER = "postgres"


def binaries() -> Path | None:
    """The folder of the newest PostgreSQL's server programs, or None where none is installed."""
    found = sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def require_binaries() -> None:
    """Skip a test that needs PostgreSQL where it is not installed; fail it on CI, where
    `.ci/run` installs it and a skip would hide a broken step."""
    if binaries() is None:
        reason = "PostgreSQL's initdb and postgres are not installed (apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


class PostgresServer:
    """One cluster in `folder`, started at once; `fsync=False` for tests, True for benchmarks."""

    def __init__(self, folder: Path, *, fsync: bool = False) -> None:
        bin_dir = binaries()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
        self.bin = bin_dir
        self.folder = folder
        self.data = folder / "data"
        self.port = free_port()
        self.fsync = fsync
        self.process: subprocess.Popen[bytes] | None = None
        self.as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            self.as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
            os.chown(folder, account.pw_uid, account.pw_gid)
        password_file = folder / "superuser-password"
        password_file.write_text(PASSWORD)
        if self.as_user:
            os.chown(password_file, self.as_user["user"], self.as_user["group"])
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                f"--pwfile={password_file}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            timeout=120,
            **self.as_user,
        )
        self.start()

    def start(self) -> None:
        """Start the server (again, after `stop`) and wait until it accepts connections."""
        log = (self.folder / "server.log").open("ab")
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.folder),
            "fsync": "on" if self.fsync else "off",
            "full_page_writes": "on" if self.fsync else "off",
            "max_connections": "200",
        }
        command = [str(self.bin / "postgres"), "-D", str(self.data)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        self.process = subprocess.Popen(
            command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, **self.as_user
        )
        log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                assert self.process is not None
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.folder / "server.log").read_text(errors="replace")
                    raise RuntimeError(f"PostgreSQL did not start: {exc}\n{log}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """A fast shutdown: open connections are cut, committed work stays."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(60)
        self.process = None

    def url(self, database: str) -> str:
        """A libpq URL for `database` over the unix socket, as the superuser (trusted)."""
        socket_folder = quote(str(self.folder), safe="")
        return f"postgresql://{SUPERUSER}@/{database}?host={socket_folder}&port={self.port}"

    def tcp_url(self, database: str) -> str:
        """The same database over 127.0.0.1, where the password is asked for."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as db:
            db.execute(statement)

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        self.admin(f'create database "{name}" template template0')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.admin(f'drop database if exists "{name}" with (force)')


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL for the whole test session; skipped where it is not installed."""
    require_binaries()
    folder = Path(tempfile.mkdtemp(prefix="pg"))  # short: a socket path has ~100 bytes
    server = PostgresServer(folder)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


_databases = itertools.count()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for one test; dropped afterwards."""
    name = f"test_{os.getpid()}_{next(_databases)}"
    url = postgres_server.create_database(name)
    yield url
    with contextlib.suppress(Exception):  # a test that stopped the server drops nothing
        postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> SpoolSettings:
    """The spool settings of each store in turn: a SQLite file, then a fresh PostgreSQL
    database (skipped where PostgreSQL is not installed)."""
    if request.param == "sqlite":
        return SpoolSettings(path=tmp_path / "spool.sqlite3")
    return SpoolSettings(url=request.getfixturevalue("postgres_url"))


def spool_section(store: SpoolSettings) -> dict[str, str]:
    """The `spool` section of a settings file (`write_settings`) for a daemon on `store`."""
    return {"url": store.url} if store.url else {"path": str(store.path)}


def query(spool: Reader, statement: str) -> list[tuple[Any, ...]]:
    """Rows of a plain SQL query both stores understand, for tests that look underneath."""
    if isinstance(spool, SqliteReader):
        return spool.db.execute(statement).fetchall()
    from dispatcher.spool.postgres import PostgresReader

    assert isinstance(spool, PostgresReader)
    return [tuple(row) for row in spool._query(statement)]

"""The spool's schema is versioned: a spool of an earlier release is migrated and delivered."""

import sqlite3
from pathlib import Path

import pytest

from dispatcher.errors import SpoolError, StartupError
from dispatcher.spool.records import RelayState
from dispatcher.spool.sqlite import SqliteReader, SqliteSpool
from dispatcher.spool.sqlite_schema import VERSION
from tests.daemon import DaemonProcess, write_settings
from tests.smtp_server import SmtpServer

FIXTURES = Path(__file__).parent / "fixtures"
WAITING = {"queued-1", "queued-2", "high-1", "retry-1", "sending-1"}


def spool_of_release_0_1_0(path: Path) -> Path:
    """A spool file as dispatcher 0.1.0 left it: no schema version, a row in every state."""
    with sqlite3.connect(path) as db:
        db.executescript((FIXTURES / "spool-0.1.0.sql").read_text())
    db.close()
    return path


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        (version,) = db.execute("pragma user_version").fetchone()
    db.close()
    return int(version)


def columns(path: Path) -> dict[str, set[str]]:
    """Each table's columns: what a migrated spool must share with a new one."""
    with sqlite3.connect(path) as db:
        tables = [
            name for (name,) in db.execute("select name from sqlite_master where type = 'table'")
        ]
        found = {t: {c[1] for c in db.execute(f"pragma table_info({t})")} for t in tables}
    db.close()
    return found


def test_a_spool_of_release_0_1_0_is_migrated_in_place(tmp_path: Path) -> None:
    path = spool_of_release_0_1_0(tmp_path / "spool.sqlite3")
    with SqliteReader(path) as reader:  # reports work before the daemon upgrades it
        before = reader.counts()
    assert before == {"queued": 3, "retry": 1, "sending": 1, "sent": 1, "dead": 1, "rejected": 1}
    with SqliteSpool(path, "upgraded") as spool:
        assert spool.counts() == before
        assert spool.recover(2_000_000.0) == 1  # the send cut short by the old daemon
        assert {row.id for row in spool.claim(2_000_000.0, 100)} == WAITING
        assert spool.inspect("sending-1")["maybe_duplicate"] is True  # type: ignore[index]
        spool.heartbeat(2_000_000.0, starting=True)  # every step's tables are there
        spool.set_relays([RelayState("relay:25", True, 2_000_000.0, "")], 2_000_000.0)
        assert spool.due("prune", 600.0, 2_000_000.0)
    with SqliteReader(path) as reader:
        assert [d["owner"] for d in reader.daemons()] == ["upgraded"]
        assert [r["relay"] for r in reader.relays()] == ["relay:25"]
    assert user_version(path) == VERSION
    SqliteSpool(tmp_path / "new.sqlite3", "new").close()
    assert columns(path) == columns(tmp_path / "new.sqlite3")
    SqliteSpool(path, "again").close()  # a migrated spool opens as it is
    assert user_version(path) == VERSION


def test_a_spool_of_a_newer_release_is_refused_not_damaged(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    SqliteSpool(path, "a").close()
    with sqlite3.connect(path) as db:
        db.execute(f"pragma user_version = {VERSION + 1}")
    db.close()
    with pytest.raises(StartupError, match="newer dispatcher"):
        SqliteSpool(path, "a")
    with pytest.raises(SpoolError, match="newer dispatcher"):
        SqliteReader(path)
    assert user_version(path) == VERSION + 1


def test_the_daemon_delivers_what_a_0_1_0_daemon_left_waiting(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    spool_of_release_0_1_0(tmp_path / "spool.sqlite3")
    # Its rows are from 1970: past the default `retry.max_age`, they would be dead, not sent.
    daemon = DaemonProcess(write_settings(tmp_path, smtp_server.port, retry={"max_age": 1e10}))
    try:
        messages = smtp_server.wait_for(len(WAITING), timeout=30)
        # The sent row of 1970 is past `spool.keep_sent` and pruned at start.
        daemon.wait_for_counts(sent=len(WAITING), dead=1, queued=0, retry=0, sending=0)
        assert "1 sends were interrupted by a crash" in daemon.log
        assert {m.rcpt_tos[0].split("@")[0] for m in messages} == WAITING
        assert daemon.stop() == 0
    finally:
        daemon.kill()

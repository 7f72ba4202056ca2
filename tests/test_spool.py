"""The SQLite spool: idempotent intake, claims and leases, crash recovery, counts, schema."""

import stat
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dispatcher import wire
from dispatcher.errors import SpoolError, StartupError
from dispatcher.spool import Finish, Incoming, Row, Start
from dispatcher.spool.sqlite import SqliteReader, SqliteSpool


def request(request_id: str, **fields: object) -> Incoming:
    parsed = wire.validate(
        {"v": 1, "id": request_id, "template": "welcome", "to": "a@example.com", **fields}
    )
    return Incoming.of(parsed)


def test_an_id_or_idempotency_key_already_held_is_ignored(tmp_path: Path) -> None:
    with SqliteSpool(tmp_path / "s.db", "a") as spool:
        assert spool.add([request("a"), request("b", idempotency_key="k")], [], 1.0) == ["a", "b"]
        assert spool.add(
            [request("a"), request("c", idempotency_key="k"), request("d")], [], 2.0
        ) == ["d"]
        assert spool.counts()["queued"] == 3


def test_rejections_are_stored_with_reason_and_excerpt(tmp_path: Path) -> None:
    with SqliteSpool(tmp_path / "s.db", "a") as spool:
        spool.add([], [("not a JSON object", b"x" * 1000)], 5.0)
        assert spool.counts()["rejected"] == 1
        (failure,) = spool.recent_failures()
        assert failure["state"] == "rejected" and failure["reason"] == "not a JSON object"
        (excerpt,) = spool.db.execute("select excerpt from rejected").fetchone()
        assert len(excerpt) == 200


def test_claims_go_by_priority_then_time_honour_send_at_and_never_twice(tmp_path: Path) -> None:
    later = datetime(2030, 1, 1, tzinfo=UTC)
    with SqliteSpool(tmp_path / "s.db", "a") as spool:
        spool.add(
            [
                request("low", priority="low"),
                request("normal"),
                request("high", priority="high"),
                request("future", send_at=later.isoformat()),
            ],
            [],
            100.0,
        )
        assert [r.id for r in spool.claim(200.0, 2)] == ["high", "normal"]
        assert [r.id for r in spool.claim(200.0, 10)] == ["low"]  # the others are claimed
        assert spool.next_due_at() == 100.0
        assert spool.claim(250.0, 10) == []  # claimed, or not due yet
        # In 2030 "future" is due, and the claims of time 200 lapsed long ago.
        assert len(spool.claim(later.timestamp(), 10)) == 4


def rendered(row: Row) -> Row:
    return replace(
        row,
        envelope_from="n@example.com",
        recipients=["a@example.com"],
        message=b"bytes",
        message_id="<a@example.com>",
    )


def test_a_send_in_flight_at_a_crash_goes_again_flagged_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SqliteSpool(path, "host-1") as spool:
        spool.add([request("a"), request("b")], [], 1.0)
        first, _second = spool.claim(2.0, 2)
        spool.record([Start(rendered(first), 1, 3.0)], [])
    with SqliteSpool(path, "host-1") as spool:  # the same daemon, restarted
        assert spool.recover(4.0) == 1  # "b" was claimed, never started: freed, not flagged
        again = {row.id: row for row in spool.claim(4.0, 2)}
        assert again.keys() == {"a", "b"}
        assert (again["a"].message, again["a"].attempts) == (b"bytes", 1)
        assert spool.inspect("a")["maybe_duplicate"] is True  # type: ignore[index]
        assert spool.inspect("b")["maybe_duplicate"] is False  # type: ignore[index]


def test_another_daemon_never_takes_a_live_claim_only_a_lapsed_one(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SqliteSpool(path, "one", lease=60) as one, SqliteSpool(path, "two", lease=60) as two:
        one.add([request("a"), request("b")], [], 1.0)
        a, _b = one.claim(2.0, 2)
        one.record([Start(rendered(a), 1, 3.0)], [])
        assert two.claim(30.0, 10) == []
        assert two.recover(30.0) == 0  # its own earlier life held nothing
        assert one.renew(50.0) == 0  # renewed until 110
        assert two.claim(100.0, 10) == [] and two.renew(100.0) == 0
        # "one" stops renewing: after its lease, "two" frees its send and takes both.
        assert two.renew(111.0) == 1
        assert {row.id for row in two.claim(111.0, 10)} == {"a", "b"}
        assert two.inspect("a")["maybe_duplicate"] is True  # type: ignore[index]
        # "one" comes back late: its outcome does not overwrite "two"'s claim.
        one.record([], [Finish("a", "sent", 112.0, "250 ok")])
        assert one.inspect("a")["state"] == "retry"  # type: ignore[index]


def test_release_gives_a_claim_back_as_it_was_or_for_later(tmp_path: Path) -> None:
    with SqliteSpool(tmp_path / "s.db", "a") as spool:
        spool.add([request("a"), request("b")], [], 1.0)
        a, _b = spool.claim(2.0, 2)
        spool.record([Start(rendered(a), 1, 3.0)], [])
        assert spool.claim(4.0, 2) == []  # both in this daemon's hands
        spool.release(["a"])  # started, never sent (a shutdown)
        spool.release(["b"], not_before=50.0)  # held back by a policy
        (again,) = spool.claim(4.0, 2)
        assert (again.id, again.attempts, again.message) == ("a", 0, b"bytes")  # bytes kept
        assert spool.inspect("a")["attempt_log"] == []  # type: ignore[index]
        assert [row.id for row in spool.claim(50.0, 2)] == ["b"]
        assert spool.counts()["queued"] == 2


def test_a_reader_answers_while_a_writer_holds_the_lock(tmp_path: Path) -> None:
    with SqliteSpool(tmp_path / "s.db", "a") as spool:
        spool.add([request("a")], [], 1.0)
        # The write lock, held; the reader's busy timeout is short enough to show any wait.
        with spool.transaction(), SqliteReader(tmp_path / "s.db", timeout=0.1) as reader:
            assert reader.counts()["queued"] == 1
            assert reader.inspect("a") is not None


def test_a_reader_of_a_missing_spool_says_so(tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="no spool at"):
        SqliteReader(tmp_path / "nothing.db")


def test_an_unopenable_spool_is_a_startup_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StartupError, match=r"spool\.path: cannot open"):
        SqliteSpool(tmp_path / "file" / "s.db", "a")


def test_purge_deletes_old_rows_of_one_state_with_their_attempts(tmp_path: Path) -> None:
    with SqliteSpool(tmp_path / "s.db", "a") as spool:
        spool.add([request(i) for i in ("old", "new", "dead")], [], 1.0)
        spool.record([], [Finish("old", "sent", 100.0, "250 ok")])
        spool.record([], [Finish("new", "sent", 900.0, "250 ok")])
        spool.record([], [Finish("dead", "dead", 100.0, "550 no")])
        spool.db.execute("insert into attempts values ('old', 1, 99.0, 100.0, 'sent', 250, 'ok')")
        assert spool.purge("sent", 500.0, now=1000.0) == 1
        assert spool.counts()["sent"] == 1 and spool.counts()["dead"] == 1
        assert spool.db.execute("select count(*) from attempts").fetchone() == (0,)
        assert spool.purge("dead", None, now=1000.0) == 1
        assert spool.purge("sent", 0.0, now=1000.0, limit=5) == 1
        assert spool.counts()["sent"] == 0


def test_spool_and_its_wal_files_are_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "var" / "spool.sqlite3"
    with SqliteSpool(path, "a") as spool, spool.transaction():
        pass
    files = [path, path.with_name("spool.sqlite3-wal"), path.with_name("spool.sqlite3-shm")]
    with SqliteSpool(path, "a"):  # WAL and shared-memory files exist while a connection is open
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert modes == dict.fromkeys(modes, 0o600) and len(modes) == 3
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700

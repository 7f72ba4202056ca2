"""The spool, on each store (SQLite, PostgreSQL): idempotent intake, claims and leases, crash
recovery, counts, purges, heartbeats and shared chores; then what only the SQLite file has."""

import stat
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dispatcher import wire
from dispatcher.errors import SpoolError, StartupError, UsageError
from dispatcher.settings import SpoolSettings
from dispatcher.spool import Finish, Incoming, Row, Spool, Start, open_reader, open_spool
from dispatcher.spool.sqlite import SqliteReader, SqliteSpool
from tests.postgres import query


def request(request_id: str, **fields: object) -> Incoming:
    parsed = wire.validate(
        {"v": 1, "id": request_id, "template": "welcome", "to": "a@example.com", **fields}
    )
    return Incoming.of(parsed)


def opened(store: SpoolSettings, owner: str = "a", lease: float = 60.0) -> Spool:
    return open_spool(replace(store, lease=lease), owner)


def test_an_id_or_idempotency_key_already_held_is_ignored(store: SpoolSettings) -> None:
    with opened(store) as spool:
        assert spool.add([request("a"), request("b", idempotency_key="k")], [], 1.0) == ["a", "b"]
        assert spool.add(
            [request("a"), request("c", idempotency_key="k"), request("d")], [], 2.0
        ) == ["d"]
        assert spool.counts()["queued"] == 3
        # Twice in one batch is stored once, too.
        assert spool.add([request("e"), request("e")], [], 3.0) == ["e"]


def test_rejections_are_stored_with_reason_and_excerpt(store: SpoolSettings) -> None:
    with opened(store) as spool:
        spool.add([], [("not a JSON object", b"x" * 1000)], 5.0)
        assert spool.counts()["rejected"] == 1
        (failure,) = spool.recent_failures()
        assert failure["state"] == "rejected" and failure["reason"] == "not a JSON object"
        ((excerpt,),) = query(spool, "select excerpt from rejected")
        assert len(excerpt) == 200


def test_claims_go_by_priority_then_time_honour_send_at_and_never_twice(
    store: SpoolSettings,
) -> None:
    later = datetime(2030, 1, 1, tzinfo=UTC)
    with opened(store) as spool:
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


def test_a_send_in_flight_at_a_crash_goes_again_flagged_duplicate(store: SpoolSettings) -> None:
    with opened(store, "host-1") as spool:
        spool.add([request("a"), request("b")], [], 1.0)
        first, _second = spool.claim(2.0, 2)
        spool.record([Start(rendered(first), 1, 3.0)], [])
    with opened(store, "host-1") as spool:  # the same daemon, restarted
        assert spool.recover(4.0) == 1  # "b" was claimed, never started: freed, not flagged
        again = {row.id: row for row in spool.claim(4.0, 2)}
        assert again.keys() == {"a", "b"}
        assert (again["a"].message, again["a"].attempts) == (b"bytes", 1)
        assert spool.inspect("a")["maybe_duplicate"] is True  # type: ignore[index]
        assert spool.inspect("b")["maybe_duplicate"] is False  # type: ignore[index]


def test_another_daemon_never_takes_a_live_claim_only_a_lapsed_one(store: SpoolSettings) -> None:
    with opened(store, "one") as one, opened(store, "two") as two:
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


def test_release_gives_a_claim_back_as_it_was_or_for_later(store: SpoolSettings) -> None:
    with opened(store) as spool:
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


def test_every_answer_of_a_reader_matches_the_daemons_view(store: SpoolSettings) -> None:
    with opened(store) as spool:
        spool.add([request("a"), request("b")], [("bad frame", b"{")], 10.0)
        (a, _b) = spool.claim(11.0, 2)
        spool.record([Start(rendered(a), 1, 12.0)], [Finish("a", "dead", 13.0, "550 no", number=1)])
        with open_reader(store) as reader:
            for question in ("counts", "waiting", "waiting_ids", "oldest_waiting", "daemons"):
                assert getattr(reader, question)() == getattr(spool, question)(), question
            assert reader.recent_failures() == spool.recent_failures()
            assert reader.failures_mark() == spool.failures_mark()
            report = reader.inspect("a")
        assert report == spool.inspect("a") and report is not None
        assert (report["state"], report["message"], report["last_reply"]) == (
            "dead",
            b"bytes",
            "550 no",
        )
        assert [(t["number"], t["outcome"], t["finished_at"]) for t in report["attempt_log"]] == [
            (1, "dead", 13.0)
        ]
        assert [f["state"] for f in spool.recent_failures()] == ["dead", "rejected"]
        assert spool.waiting_ids() == ["b"] and spool.oldest_waiting() == 10.0


def test_heartbeats_name_each_daemon_and_when_it_was_last_seen(store: SpoolSettings) -> None:
    with opened(store, "one") as one, opened(store, "two") as two:
        one.heartbeat(10.0, starting=True)
        two.heartbeat(12.0, starting=True)
        one.heartbeat(20.0)
        assert one.daemons() == [
            {"owner": "one", "started_at": 10.0, "last_heartbeat": 20.0},
            {"owner": "two", "started_at": 12.0, "last_heartbeat": 12.0},
        ]
        two.heartbeat(30.0, starting=True)  # restarted: a new life
        assert two.daemons()[0] == {"owner": "two", "started_at": 30.0, "last_heartbeat": 30.0}


def test_a_shared_chore_falls_to_one_daemon_per_interval(store: SpoolSettings) -> None:
    with opened(store, "one") as one, opened(store, "two") as two:
        assert one.due("prune", 600.0, 1000.0)
        assert not two.due("prune", 600.0, 1001.0) and not one.due("prune", 600.0, 1599.0)
        assert two.due("prune", 600.0, 1600.0)
        assert one.due("other", 600.0, 1600.0)  # chores are counted apart


def test_purge_refuses_a_state_that_still_waits(store: SpoolSettings) -> None:
    with opened(store) as spool, pytest.raises(UsageError, match="only sent or dead"):
        spool.purge("queued", None, 1.0)


def test_retry_requeues_dead_requests_with_their_refused_recipients(store: SpoolSettings) -> None:
    with opened(store) as spool:
        spool.add([request("a"), request("b")], [], 1.0)
        a, _b = spool.claim(2.0, 2)
        spool.record(
            [Start(rendered(a), 1, 3.0)],
            [
                Finish(
                    "a",
                    "dead",
                    4.0,
                    "550",
                    number=1,
                    recipients=[],
                    refused={"a@example.com": "550"},
                )
            ],
        )
        assert spool.retry(None, 5.0) == ["a"]
        assert spool.retry(["b", "nothing"], 5.0) == ["b"]  # waiting: made due now
        (again,) = [row for row in spool.claim(5.0, 2) if row.id == "a"]
        assert (again.recipients, again.attempts, again.refused) == (["a@example.com"], 1, {})


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


def test_purge_deletes_old_rows_of_one_state_with_their_attempts(store: SpoolSettings) -> None:
    with opened(store) as spool:
        spool.add([request(i) for i in ("old", "new", "dead")], [], 1.0)
        (old,) = [row for row in spool.claim(2.0, 3) if row.id == "old"]
        spool.record(
            [Start(rendered(old), 1, 99.0)], [Finish("old", "sent", 100.0, "250", number=1)]
        )
        spool.record([], [Finish("new", "sent", 900.0, "250 ok")])
        spool.record([], [Finish("dead", "dead", 100.0, "550 no")])
        assert query(spool, "select count(*) from messages") == [(1,)]
        assert spool.purge("sent", 500.0, now=1000.0) == 1
        assert spool.counts()["sent"] == 1 and spool.counts()["dead"] == 1
        assert query(spool, "select count(*) from attempts") == [(0,)]
        assert query(spool, "select count(*) from messages") == [(0,)]
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

"""The spool file: idempotent intake, due order, crash recovery and counts."""

import stat
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dispatcher import wire
from dispatcher.errors import StartupError
from dispatcher.spool import Finish, Incoming, Spool, Start


def request(request_id: str, **fields: object) -> Incoming:
    parsed = wire.validate(
        {"v": 1, "id": request_id, "template": "welcome", "to": "a@example.com", **fields}
    )
    return Incoming.of(parsed)


def test_an_id_or_idempotency_key_already_held_is_ignored(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        assert spool.add([request("a"), request("b", idempotency_key="k")], [], 1.0) == ["a", "b"]
        assert spool.add(
            [request("a"), request("c", idempotency_key="k"), request("d")], [], 2.0
        ) == ["d"]
        assert spool.counts()["queued"] == 3


def test_rejections_are_stored_with_reason_and_excerpt(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        spool.add([], [("not a JSON object", b"x" * 1000)], 5.0)
        assert spool.counts()["rejected"] == 1
        (failure,) = spool.recent_failures()
        assert failure["state"] == "rejected" and failure["reason"] == "not a JSON object"
        (excerpt,) = spool.db.execute("select excerpt from rejected").fetchone()
        assert len(excerpt) == 200


def test_due_orders_by_priority_then_time_and_honours_send_at(tmp_path: Path) -> None:
    later = datetime(2030, 1, 1, tzinfo=UTC)
    with Spool(tmp_path / "s.db") as spool:
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
        assert [r.id for r in spool.due(200.0, 10, set())] == ["high", "normal", "low"]
        assert [r.id for r in spool.due(200.0, 10, {"high"})] == ["normal", "low"]
        assert spool.next_due_at() == 100.0
        assert "future" in [r.id for r in spool.due(later.timestamp(), 10, set())]


def test_a_send_in_flight_at_a_crash_goes_again_flagged_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Spool(path) as spool:
        spool.add([request("a")], [], 1.0)
        (row,) = spool.due(2.0, 1, set())
        row = replace(
            row,
            envelope_from="n@example.com",
            recipients=["a@example.com"],
            message=b"bytes",
            message_id="<a@example.com>",
        )
        spool.record([Start(row, 1, 3.0)], [])
    with Spool(path) as spool:  # the "restarted daemon"
        assert spool.requeue_interrupted(4.0) == 1
        (again,) = spool.due(4.0, 1, set())
        assert (again.message, again.message_id, again.attempts) == (b"bytes", "<a@example.com>", 1)
        (flag,) = spool.db.execute("select maybe_duplicate from requests").fetchone()
        assert flag == 1


def test_a_start_released_at_shutdown_leaves_the_request_waiting_as_before(
    tmp_path: Path,
) -> None:
    with Spool(tmp_path / "s.db") as spool:
        spool.add([request("a")], [], 1.0)
        (row,) = spool.due(2.0, 1, set())
        row = replace(row, envelope_from="n@example.com", recipients=["a@example.com"])
        row = replace(row, message=b"bytes", message_id="<a@example.com>")
        spool.record([Start(row, 1, 3.0)], [])
        assert spool.due(4.0, 1, set()) == []  # sending: in a worker's hands
        spool.release([Start(row, 1, 3.0)])
        (again,) = spool.due(4.0, 1, set())
        assert (again.attempts, again.message) == (0, b"bytes")  # rendered bytes are kept
        assert spool.inspect("a")["attempt_log"] == []  # type: ignore[index]
        assert spool.counts()["queued"] == 1


def test_an_unopenable_spool_is_a_startup_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StartupError, match=r"spool\.path: cannot open"):
        Spool(tmp_path / "file" / "s.db")


def test_purge_deletes_old_rows_of_one_state_with_their_attempts(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
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
    with Spool(path) as spool, spool.transaction():
        pass
    files = [path, path.with_name("spool.sqlite3-wal"), path.with_name("spool.sqlite3-shm")]
    with Spool(path):  # WAL and shared-memory files exist while a connection is open
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert modes == dict.fromkeys(modes, 0o600) and len(modes) == 3
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700

"""Queue administration (`status`, `inspect`, `retry`, `purge`): the commands, run as a user
runs them, on the spool of a daemon running in this process."""

from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

import dispatcher
from dispatcher import wire
from dispatcher.admin import duration, parse_age
from dispatcher.spool import Finish, Incoming
from dispatcher.spool.sqlite import SqliteReader, SqliteSpool
from tests.daemon import InProcessDaemon, run_cli, write_settings
from tests.smtp_server import SmtpServer

RunDaemon = Callable[..., InProcessDaemon]
ADA = {"name": "Ada", "activate_url": "https://example.com/a"}


pytestmark = pytest.mark.usefixtures("fresh_client")


def enqueue(daemon: InProcessDaemon, *recipients: str) -> list[str]:
    dispatcher.configure(daemon.settings_path)
    ids = [dispatcher.enqueue_email("welcome", to=to, context=ADA) for to in recipients]
    assert dispatcher.flush(10)
    return ids


def cli(daemon: InProcessDaemon, *args: str) -> tuple[int, str, str]:
    result = run_cli(*args, settings=daemon.settings_path)
    assert "Traceback" not in result.stderr
    return result.returncode, result.stdout, result.stderr


def test_status_is_a_table_for_people_and_json_for_scripts(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    smtp_server.refuse_recipient("gone@example.com", "550 5.1.1 No such user")
    daemon = run_daemon(write_settings(tmp_path, smtp_server.port))
    (_, dead_id) = enqueue(daemon, "ok@example.com", "gone@example.com")
    daemon.wait_for_counts(sent=1, dead=1)
    code, out, _ = cli(daemon, "status")
    assert code == 0
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:9] if line.strip()}
    assert rows["sent"] == "1" and rows["dead"] == "1" and rows["queued"] == "0"
    assert "oldest waiting request: nothing waits" in out
    (failure,) = [line for line in out.splitlines() if dead_id in line]
    assert "welcome" in failure and "550 5.1.1 No such user" in failure
    code, out, _ = cli(daemon, "status", "--json")
    report = orjson.loads(out)
    assert report["counts"] == {
        "queued": 0,
        "retry": 0,
        "sending": 0,
        "sent": 1,
        "dead": 1,
        "rejected": 0,
    }
    assert report["oldest_waiting_seconds"] is None
    assert daemon.stop() == 0


def test_inspect_shows_every_attempt_with_its_reply_and_the_message(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    smtp_server.fail_data(times=1, reply="451 4.3.0 Try again later")
    daemon = run_daemon(write_settings(tmp_path, smtp_server.port))
    (request_id,) = enqueue(daemon, "ada@example.com")
    daemon.wait_for_counts(sent=1)
    code, out, _ = cli(daemon, "inspect", request_id)
    assert code == 0
    assert f"request      {request_id}" in out and "state        sent" in out
    attempts = [line for line in out.splitlines() if line.startswith("  #")]
    assert len(attempts) == 2
    assert "retry  code 451  451 4.3.0 Try again later" in attempts[0]
    assert "sent  code 250  250 2.0.0 Ok queued" in attempts[1]
    assert '"template": "welcome"' in out  # the request as received
    assert "Subject: Welcome to Example, Ada!" in out  # the rendered message
    assert f"Message-ID: <{request_id}@example.com>" in out
    code, out, _ = cli(daemon, "inspect", request_id, "--json")
    report = orjson.loads(out)
    assert [(a["number"], a["code"]) for a in report["attempt_log"]] == [(1, 451), (2, 250)]
    assert report["message"].startswith(smtp_server.messages[0].data.decode()[:20])
    assert daemon.stop() == 0


def test_inspect_of_an_unknown_id_is_a_one_line_error(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    daemon = run_daemon(write_settings(tmp_path, smtp_server.port))
    code, out, err = cli(daemon, "inspect", "nosuchid")
    assert code == 2 and out == ""
    assert err.strip() == f"dispatcher: no request 'nosuchid' in {daemon.settings.spool.path}"
    assert daemon.stop() == 0


def test_retry_sends_a_dead_request_again_to_the_recipient_that_refused(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    smtp_server.refuse_recipient("fixed@example.com", "550 5.1.1 No such user")
    daemon = run_daemon(write_settings(tmp_path, smtp_server.port))
    (request_id,) = enqueue(daemon, "fixed@example.com")
    daemon.wait_for_counts(dead=1)
    smtp_server.reset_faults()  # the mailbox now exists
    code, out, _ = cli(daemon, "retry", request_id)
    assert (code, out.strip()) == (0, "re-queued 1 request")
    # Picked up by the running daemon without any wake-up call from the command.
    (message,) = smtp_server.wait_for(1, timeout=15)
    assert message.rcpt_tos == ("fixed@example.com",)
    assert message.message_id == f"<{request_id}@example.com>"
    daemon.wait_for_counts(sent=1, dead=0)
    code, _, err = cli(daemon, "retry", request_id)
    assert code == 1 and f"{request_id} not re-queued: it is sent" in err
    assert daemon.stop() == 0


def test_retry_dead_requeues_every_dead_request(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    for name in ("a", "b", "c"):
        smtp_server.refuse_recipient(f"{name}@example.com", "550 5.7.1 Relaying denied")
    daemon = run_daemon(write_settings(tmp_path, smtp_server.port))
    enqueue(daemon, "a@example.com", "b@example.com", "c@example.com", "ok@example.com")
    daemon.wait_for_counts(dead=3, sent=1)
    smtp_server.reset_faults()
    code, out, _ = cli(daemon, "retry", "--dead")
    assert (code, out.strip()) == (0, "re-queued 3 requests")
    smtp_server.wait_for(4, timeout=15)
    daemon.wait_for_counts(sent=4, dead=0)
    assert daemon.stop() == 0


def test_purge_deletes_sent_or_dead_requests_while_the_daemon_runs(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    smtp_server.refuse_recipient("gone@example.com", "550 5.1.1 No such user")
    daemon = run_daemon(write_settings(tmp_path, smtp_server.port))
    ids = enqueue(daemon, "a@example.com", "b@example.com", "gone@example.com")
    daemon.wait_for_counts(sent=2, dead=1)
    assert (
        cli(daemon, "purge", "--sent", "--older-than", "1h")[1].strip() == "purged 0 sent requests"
    )
    assert cli(daemon, "purge", "--sent")[1].strip() == "purged 2 sent requests"
    assert daemon.counts()["sent"] == 0 and daemon.counts()["dead"] == 1
    assert cli(daemon, "inspect", ids[0])[0] == 2
    with SqliteReader(daemon.settings.spool.path) as spool:
        held = {
            table: spool.db.execute(f"select count(*) from {table}").fetchone()[0]
            for table in ("messages", "attempts")
        }
    assert held == {"messages": 1, "attempts": 1}  # only the dead request's are left
    assert cli(daemon, "purge", "--dead", "--older-than", "0s")[1].strip() == (
        "purged 1 dead request"
    )
    # The daemon still takes and sends mail on the purged spool.
    enqueue(daemon, "later@example.com")
    daemon.wait_for_counts(sent=1, dead=0)
    assert daemon.stop() == 0


@pytest.mark.parametrize("age", ["7", "d", "-1d", "1w", "1.5.2h", ""])
def test_a_bad_age_is_a_one_line_error(tmp_path: Path, age: str) -> None:
    settings = write_settings(tmp_path, 1025)
    SqliteSpool(tmp_path / "spool.sqlite3", "test").close()
    result = run_cli("purge", "--dead", f"--older-than={age}", settings=settings)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "dispatcher: --older-than: expected a number and a unit (s, m, h or d) such as 7d"
        f" or 12h, got {age!r}"
    )


def test_purge_measures_age_from_when_the_request_reached_its_state(tmp_path: Path) -> None:
    with SqliteSpool(tmp_path / "s.db", "test") as spool:
        for request_id in ("old", "new", "waiting"):
            parsed = wire.validate(wire.request_fields("welcome", {"to": "a@x.org"}, id=request_id))
            spool.add([Incoming.of(parsed)], [], 0.0)
        spool.record([], [Finish("old", "sent", 1000.0, "250 ok")])
        spool.record([], [Finish("new", "sent", 5000.0, "250 ok")])
        assert spool.purge("sent", older_than=3600, now=5000.0) == 1  # only "old": 4000 s
        assert spool.inspect("old") is None and spool.inspect("new") is not None
        assert spool.purge("sent", older_than=None, now=5000.0) == 1
        assert spool.purge("dead", older_than=None, now=5000.0) == 0
        assert spool.counts()["queued"] == 1
        with pytest.raises(ValueError, match="only sent or dead"):
            spool.purge("queued", None, 5000.0)


def test_ages_and_durations_read_as_people_write_them() -> None:
    assert [parse_age(a) for a in ("7d", "12h", "30m", "90s", "1.5h")] == [
        604800,
        43200,
        1800,
        90,
        5400,
    ]
    assert [duration(s) for s in (4, 725, 12000, 190000)] == ["4s", "12m 05s", "3h 20m", "2d 4h"]


def test_purge_with_a_limit_deletes_at_most_that_many_per_call(tmp_path: Path) -> None:
    with SqliteSpool(tmp_path / "s.db", "test") as spool:
        for i in range(5):
            parsed = wire.validate(wire.request_fields("welcome", {"to": "a@x.org"}, id=f"r{i}"))
            spool.add([Incoming.of(parsed)], [], 0.0)
            spool.record([], [Finish(f"r{i}", "sent", 10.0, "250 ok")])
        assert [spool.purge("sent", 5, 100.0, limit=2) for _ in range(4)] == [2, 2, 1, 0]

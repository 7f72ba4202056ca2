"""End to end: enqueue_email() -> real daemon -> SQLite spool -> real SMTP server.

The daemon runs in this process unless the process is what a test is about (SIGTERM, kill -9)."""

import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq

import dispatcher
from dispatcher import intake, wire
from dispatcher.spool.sqlite import SqliteReader
from tests.daemon import DaemonProcess, InProcessDaemon, RunningDaemon, write_settings
from tests.smtp_server import SmtpServer, free_port

StartDaemon = Callable[[Path], DaemonProcess]
RunDaemon = Callable[..., InProcessDaemon]
NAME = "Zoë <b>O'Brien</b> & Søn"
ADA = {"name": "Ada", "activate_url": "https://example.com/a"}


pytestmark = pytest.mark.usefixtures("fresh_client")


def enqueue(daemon: RunningDaemon, n: int, **kwargs: object) -> list[str]:
    dispatcher.configure(daemon.settings_path)
    ids = []
    for i in range(n):
        options = {
            "to": f"user{i}@example.com",
            "context": {"name": f"{NAME} {i}", "activate_url": f"https://example.com/a/{i}"},
            **kwargs,
        }
        ids.append(dispatcher.enqueue_email("welcome", **options))  # type: ignore[arg-type]
    assert dispatcher.flush(5.0)
    return ids


def recent_failures(daemon: RunningDaemon) -> list[dict[str, Any]]:
    """What `dispatcher status` lists as failed, read from the spool."""
    with SqliteReader(daemon.settings.spool.path) as spool:
        return spool.recent_failures()


def test_300_requests_arrive_once_each_correctly_rendered(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    # Render workers (the default), as a busy daemon renders.
    daemon = run_daemon(write_settings(tmp_path, smtp_server.port), render_processes=1)
    ids = enqueue(daemon, 300)
    messages = smtp_server.wait_for(300, timeout=60)
    daemon.wait_for_counts(sent=300, queued=0, retry=0)
    assert daemon.stop() == 0
    assert len(messages) == 300
    ids_seen = Counter(m.message_id.strip("<>").split("@")[0] for m in messages if m.message_id)
    assert set(ids_seen) == set(ids) and max(ids_seen.values()) == 1
    for message in messages:
        i = int(message.rcpt_tos[0].removeprefix("user").split("@")[0])
        parsed = message.message
        assert parsed["Subject"] == f"Welcome to Example, {NAME} {i}!"
        assert parsed.get_content_type() == "multipart/alternative"
        html = parsed.get_body(("html",)).get_content()  # type: ignore[union-attr]
        text = parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "Zoë &lt;b&gt;O'Brien&lt;/b&gt; &amp; Søn" in html and "<b>O'Brien" not in html
        assert f"{NAME} {i}" in text
        assert f"https://example.com/a/{i}" in text
        assert "<table" in html  # the shared layout wraps the body
        assert parsed["From"] == "Example <noreply@example.com>"
    assert "stopped:" in daemon.log


GARBAGE = [
    b"sending 0",  # the original PUSH/PULL example's payload
    b"",
    b"\xff\xfe\xfa not utf-8",
    b'{"v": 1, "template": "welcome", "to": ',
    b"[1, 2, 3]",
    b'{"template": "welcome", "to": "a@example.com"}',
    b'{"v": 9, "template": "welcome", "to": "a@example.com"}',
    b'{"v": 1, "to": "a@example.com"}',
    b'{"v": 1, "template": "welcome"}',
    b'{"v": 1, "template": "no_such_template", "to": "a@example.com"}',
    b'{"v": 1, "template": "../../etc/passwd", "to": "a@example.com"}',
    b'{"v": 1, "template": "welcome", "to": "not an address"}',
    b'{"v": 1, "template": "welcome", "to": "a@example.com",'
    b' "headers": {"X-A": "1\\r\\nBcc: e@x.com"}}',
    b'{"v": 1, "template": "welcome", "to": "a@example.com", "priority": "urgent"}',
    b'{"v": 1, "template": "welcome", "to": "a@example.com", "context": "'
    + b"x" * 5_000_000
    + b'"}',
]


def test_garbage_frames_are_rejected_counted_and_the_daemon_keeps_running(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    port = free_port()
    daemon = run_daemon(
        write_settings(tmp_path, smtp_server.port, intake={"bind": f"tcp://127.0.0.1:{port}"})
    )
    # A seed-style sender: a plain PUSH socket, no client library, one JSON frame per request.
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.linger = 5000
        push.connect(f"tcp://127.0.0.1:{port}")
        for frame in GARBAGE:
            push.send(frame)
        valid = {
            "v": 1,
            "template": "welcome",
            "to": "seed@example.com",
            "context": {"name": "Seed", "activate_url": "https://example.com/s"},
        }
        push.send(orjson.dumps(valid))
        (message,) = smtp_server.wait_for(1, timeout=30)
    assert message.rcpt_tos == ("seed@example.com",)
    counts = daemon.wait_for_counts(rejected=len(GARBAGE), sent=1)
    assert daemon.alive
    assert counts["queued"] == 0
    assert "rejected: template: unknown template 'no_such_template'" in daemon.log
    assert "over the limit" in daemon.log
    assert daemon.stop() == 0


def test_smtp_down_then_451_twice_per_message_every_mail_arrives_once(
    tmp_path: Path, run_daemon: RunDaemon
) -> None:
    server = SmtpServer(port=free_port())  # not started: the mail server is down at first
    daemon = run_daemon(write_settings(tmp_path, server.port))
    ids = enqueue(daemon, 10)
    daemon.wait_for_log(f"relay 127.0.0.1:{server.port} down: SMTPConnectError")
    server.fail_data_per_message(times=2, reply="451 4.3.0 Try again later")
    with server:
        messages = server.wait_for(10, timeout=60)
        daemon.wait_for_counts(sent=10, retry=0, queued=0, dead=0)
        attempts = server.data_attempts
    received = Counter(m.message_id for m in messages)
    assert len(received) == 10 and set(received.values()) == {1}
    assert {mid.strip("<>").split("@")[0] for mid in received if mid} == set(ids)
    # The same Message-ID (so the same rendered bytes) was offered three times each.
    per_message = Counter(key for key, _ in attempts)
    assert all(per_message[mid] == 3 for mid in received)
    assert daemon.stop() == 0


def test_550_recipient_is_dead_with_the_reply_and_the_others_are_sent(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    smtp_server.refuse_recipient("gone@example.com", "550 5.1.1 No such user")
    daemon = run_daemon(write_settings(tmp_path, smtp_server.port))
    dispatcher.configure(daemon.settings_path)
    dead_id = dispatcher.enqueue_email("welcome", to="gone@example.com", context=ADA)
    dispatcher.enqueue_email("welcome", to=["gone@example.com", "ok@example.com"], context=ADA)
    daemon.wait_for_counts(dead=1, sent=1)
    (message,) = smtp_server.messages
    assert message.rcpt_tos == ("ok@example.com",)
    (failure,) = [f for f in recent_failures(daemon) if f["state"] == "dead"]
    assert failure["id"] == dead_id and "550 5.1.1 No such user" in failure["reason"]
    assert daemon.counts()["dead"] == 1
    assert daemon.stop() == 0


def test_template_error_makes_the_request_dead_with_file_and_line(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    templates = tmp_path / "templates" / "broken"
    templates.mkdir(parents=True)
    (templates / "subject.txt").write_text("Hello")
    (templates / "body.txt").write_text("line one\n{{ missing.attribute }}\n")
    settings = write_settings(tmp_path, smtp_server.port, templates={"dir": "templates"})
    daemon = run_daemon(settings)
    dispatcher.configure(settings)
    dispatcher.enqueue_email("broken", to="a@example.com")
    daemon.wait_for_counts(dead=1)
    reason = recent_failures(daemon)[0]["reason"]
    assert "broken/body.txt:2" in reason and "'missing' is undefined" in reason
    assert daemon.stop() == 0


def test_queued_requests_survive_a_restart(tmp_path: Path, run_daemon: RunDaemon) -> None:
    server = SmtpServer(port=free_port())
    settings = write_settings(tmp_path, server.port, retry={"backoff": [0.05, 0.2]})
    first = run_daemon(settings)
    # Not due yet when the first daemon stops, so they are still queued in its spool.
    future = enqueue(first, 5, send_at=datetime.now(UTC) + timedelta(seconds=3))
    first.wait_for_counts(queued=5)
    assert first.stop() == 0
    with server:
        second = run_daemon(settings)
        messages = server.wait_for(5, timeout=30)
        assert {m.message_id.strip("<>").split("@")[0] for m in messages if m.message_id} == set(
            future
        )
        second.wait_for_counts(sent=5)
        assert second.stop() == 0


def test_sigterm_lets_a_send_in_flight_finish_and_exits_0(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: StartDaemon
) -> None:
    smtp_server.slow_reply(seconds=1.5, times=1)
    daemon = start_daemon(write_settings(tmp_path, smtp_server.port))
    enqueue(daemon, 1)
    daemon.wait_for_counts(sending=1)
    assert daemon.stop(timeout=30) == 0
    assert daemon.counts()["sent"] == 1
    assert len(smtp_server.messages) == 1


def test_a_send_cut_short_by_kill_9_is_sent_again_flagged_duplicate(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: StartDaemon
) -> None:
    smtp_server.slow_reply(seconds=3, times=1)
    settings = write_settings(tmp_path, smtp_server.port)
    first = start_daemon(settings)
    (request_id,) = enqueue(first, 1)
    first.wait_for_counts(sending=1)
    first.kill()
    second = start_daemon(settings)
    second.wait_for_counts(sent=1)
    assert "sends were interrupted by a crash" in second.log
    with SqliteReader(second.settings.spool.path) as spool:
        (flag,) = spool.db.execute("select maybe_duplicate from requests").fetchone()
    assert flag == 1
    # The server may hold it twice (the slow first copy was accepted), never as two messages.
    assert {m.message_id for m in smtp_server.messages} == {f"<{request_id}@example.com>"}
    assert second.stop() == 0


def test_a_greylisted_recipient_is_retried_alone_with_the_same_message(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    smtp_server.refuse_recipient("grey@example.com", "450 4.2.0 Greylisted, try later")
    daemon = run_daemon(write_settings(tmp_path, smtp_server.port))
    dispatcher.configure(daemon.settings_path)
    dispatcher.enqueue_email("welcome", to=["ok@example.com", "grey@example.com"], context=ADA)
    daemon.wait_for_log("450 4.2.0 Greylisted")
    smtp_server.reset_faults()
    first, second = smtp_server.wait_for(2)
    daemon.wait_for_counts(sent=1, retry=0)
    assert (first.rcpt_tos, second.rcpt_tos) == (("ok@example.com",), ("grey@example.com",))
    assert first.data == second.data
    assert daemon.stop() == 0


def test_a_burst_is_stored_in_batches_that_start_small_and_grow(
    tmp_path: Path, run_daemon: RunDaemon
) -> None:
    """The first requests of a burst are committed (and go on to delivery) while the rest is
    still being stored; a flood still gets large batches, one fsync for many requests."""
    settings_path = write_settings(tmp_path, free_port())  # no relay: nothing is sent
    endpoint = f"ipc://{tmp_path.resolve()}/intake"
    options: wire.EmailOptions = {"to": "a@example.com", "context": ADA}
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.linger, push.sndhwm = 5000, 10_000
        push.connect(endpoint)  # queued here until the daemon binds: one burst, all waiting
        for i in range(3000):
            push.send(wire.encode(wire.request_fields("welcome", options, id=f"b{i}")))
        daemon = run_daemon(settings_path)
        deadline = time.monotonic() + 60
        while sum(daemon.counts().values()) < 3000:
            assert time.monotonic() < deadline, daemon.counts()
            time.sleep(0.05)
    received = [line.split(" received ")[1] for line in daemon.lines if " received " in line]
    batches = [int(text.split()[0]) for text in received if text.endswith(" requests")]
    assert sum(batches) == 3000
    assert batches[0] <= intake.FIRST_BATCH < max(batches), batches

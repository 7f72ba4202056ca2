"""Receipts from a real daemon: only after commit, for duplicates and rejections too.

A foreign sender speaking the wire protocol with plain pyzmq sockets, as docs/protocol.md
describes it, against a real daemon (running in this process).
"""

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import zmq

from dispatcher import overflow, wire
from dispatcher.client import Client
from dispatcher.settings import load_settings
from dispatcher.spool import Finish
from dispatcher.spool.sqlite import SqliteReader, SqliteSpool
from tests.daemon import InProcessDaemon, write_settings
from tests.smtp_server import SmtpServer
from tests.test_spool import request

RunDaemon = Callable[..., InProcessDaemon]


CONTEXT = {"name": "A", "activate_url": "https://example.com/a"}
STARTS = 20  # one start in ~5 lost its first receipts before the daemon held them


class Sender:
    """A PUSH socket to the daemon's intake and a SUB socket on its receipts for one client."""

    def __init__(self, daemon: InProcessDaemon, client: str, *, listen: bool = True) -> None:
        self.context = zmq.Context()
        self.push = self.context.socket(zmq.PUSH)
        self.sub = self.context.socket(zmq.SUB)
        self.push.linger = self.sub.linger = 0
        self.sub.setsockopt(zmq.SUBSCRIBE, f"{client} ".encode())
        self.push.connect(daemon.settings.intake.bind)
        self.acks = daemon.settings.intake.acks
        if listen:
            self.listen()
        self.client = client

    def listen(self) -> None:
        self.sub.connect(self.acks)

    def send(self, request_id: str, template: str = "welcome") -> None:
        options: wire.EmailOptions = {"to": "a@example.com", "context": CONTEXT}
        fields = wire.request_fields(template, options, id=request_id, client=self.client)
        self.push.send(orjson.dumps(fields))

    def receipts(self, expected: set[str], resend: Callable[[], None]) -> set[str]:
        """Ids acknowledged until `expected` are all in; re-sends while the subscription
        propagates (a receipt published before it arrives is lost, by design)."""
        got: set[str] = set()
        deadline = time.monotonic() + 20
        while not expected <= got:
            assert time.monotonic() < deadline, f"receipts {got}, expected {expected}"
            if self.sub.poll(200):
                client, *ids = self.sub.recv().decode().split(" ")
                assert client == self.client
                got.update(ids)
            else:
                resend()
        return got

    def close(self) -> None:
        self.push.close()
        self.sub.close()
        self.context.term()


@pytest.fixture
def daemon(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> Iterator[InProcessDaemon]:
    yield run_daemon(write_settings(tmp_path, smtp_server.port))


def test_a_receipt_follows_the_commit_and_comes_again_for_a_duplicate(
    daemon: InProcessDaemon,
) -> None:
    sender = Sender(daemon, "app1")
    try:
        sender.receipts({"r1"}, lambda: sender.send("r1"))
        with SqliteReader(daemon.settings.spool.path) as spool:  # acknowledged means committed
            assert "r1" in {r for (r,) in spool.db.execute("select id from requests")}
        sender.send("r1")  # a re-send after a lost receipt: stored once, acknowledged again
        assert sender.receipts({"r1"}, lambda: None) == {"r1"}
        daemon.wait_for_log("duplicate r1 ignored")
        daemon.wait_for_counts(sent=1, queued=0, retry=0)
    finally:
        sender.close()


def test_a_receipt_waits_for_a_client_that_subscribes_late(daemon: InProcessDaemon) -> None:
    """The slow joiner: a request committed before its client's subscription reached the
    daemon is acknowledged once it does, not lost and sent again."""
    sender = Sender(daemon, "late", listen=False)
    try:
        sender.send("early1")
        deadline = time.monotonic() + 20
        with SqliteReader(daemon.settings.spool.path) as spool:
            while not spool.db.execute("select 1 from requests where id = 'early1'").fetchone():
                assert time.monotonic() < deadline, "early1 was never stored"
                time.sleep(0.01)
        sender.listen()
        assert sender.receipts({"early1"}, lambda: None) == {"early1"}  # with no re-send
    finally:
        sender.close()


def test_the_first_requests_after_every_daemon_start_are_acknowledged(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    """An app that outlives daemon restarts, and one that boots beside each daemon: the first
    receipts of every start reach them (lost ones were re-sent after ack_timeout)."""
    settings_path = write_settings(tmp_path, smtp_server.port)
    settings = load_settings(settings_path, environ={})
    with Client(settings) as long_lived:
        for start in range(STARTS):
            booting = Client(settings)
            first = booting.enqueue_email("welcome", to="a@example.com", context=CONTEXT)
            daemon = run_daemon(settings_path)
            for app in (booting, long_lived):
                app.enqueue_email("welcome", to="b@example.com", context=CONTEXT)
            assert first
            for app in (booting, long_lived):
                assert app.flush(10.0), f"start {start}: a request was spilled"
                assert app.resent == 0, f"start {start}: a receipt was lost\n{daemon.log}"
            booting.close()
            assert daemon.stop() == 0


def test_a_rejected_request_is_acknowledged_so_the_client_stops_sending_it(
    daemon: InProcessDaemon,
) -> None:
    sender = Sender(daemon, "app2")
    try:
        sender.receipts({"bad1"}, lambda: sender.send("bad1", template="no_such_template"))
        assert daemon.counts()["rejected"] >= 1
        assert "unknown template 'no_such_template'" in daemon.log
    finally:
        sender.close()


def test_spill_files_are_ingested_and_deleted_after_commit(
    tmp_path: Path, daemon: InProcessDaemon, smtp_server: SmtpServer
) -> None:
    options: wire.EmailOptions = {"to": "a@example.com", "context": CONTEXT}
    frames = [wire.encode(wire.request_fields("welcome", options, id=f"s{i}")) for i in range(5)]
    frames.append(b"not json")
    path = overflow.spill(tmp_path / "overflow", frames, "app3")
    assert path is not None
    received = smtp_server.wait_for(5, timeout=30)
    assert {m.message_id.strip("<>").split("@")[0] for m in received if m.message_id} == {
        f"s{i}" for i in range(5)
    }
    daemon.wait_for_log(f"ingested 6 requests from overflow file {path.name}")
    assert not path.exists()
    assert daemon.counts()["rejected"] == 1  # the garbage line is recorded, not lost


def test_sent_requests_older_than_keep_sent_are_pruned_at_start(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    settings = write_settings(tmp_path, smtp_server.port, spool={"keep_sent": 3600})
    with SqliteSpool(tmp_path / "spool.sqlite3", "test") as spool:
        spool.add([request("ancient"), request("recent"), request("gone")], [], 1.0)
        spool.record([], [Finish("ancient", "sent", time.time() - 7200, "250 ok")])
        spool.record([], [Finish("recent", "sent", time.time(), "250 ok")])
        spool.record([], [Finish("gone", "dead", time.time() - 7200, "550 no")])
    daemon = run_daemon(settings)
    daemon.wait_for_log("pruned 1 sent requests older than 3600 s")
    with SqliteReader(tmp_path / "spool.sqlite3") as spool:
        ids = {r for (r,) in spool.db.execute("select id from requests")}
    assert ids == {"recent", "gone"}  # dead requests stay until `dispatcher purge`

"""The client: validates at once, hands over without blocking, stays light and fork-safe."""

import dataclasses
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq

import dispatcher
from dispatcher import client, overflow, wire
from dispatcher.errors import InvalidRequest, RequestTooLarge
from dispatcher.settings import Settings, load_settings
from tests.daemon import DaemonProcess, write_settings
from tests.smtp_server import SmtpServer

StartDaemon = Callable[[Path], DaemonProcess]


class FakeDaemon:
    """A PULL socket and a receipts PUB socket standing in for the daemon, served by a thread.

    It records every frame and, while `acknowledging`, publishes a receipt for it at once.
    """

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.pull = self.context.socket(zmq.PULL)
        self.pub = self.context.socket(zmq.PUB)
        self.pull.linger = self.pub.linger = 0
        self.endpoint = f"tcp://127.0.0.1:{self.pull.bind_to_random_port('tcp://127.0.0.1')}"
        self.acks = f"tcp://127.0.0.1:{self.pub.bind_to_random_port('tcp://127.0.0.1')}"
        self.settings: Settings | None = None  # a client's settings for this daemon
        self.acknowledging = True
        self.trickle = 0.0  # > 0: one receipt per this many seconds, a daemon that is behind
        self.backlog: list[dict[str, Any]] = []
        self.frames: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        next_receipt = 0.0
        while not self.stopping.is_set():
            if self.backlog and time.monotonic() >= next_receipt:
                self._acknowledge(self.backlog.pop(0))
                next_receipt = time.monotonic() + self.trickle
            if not self.pull.poll(10):
                continue
            fields = orjson.loads(self.pull.recv())
            if self.acknowledging and self.trickle:
                self.backlog.append(fields)
            elif self.acknowledging:
                self._acknowledge(fields)
            with self.changed:
                self.frames.append(fields)
                self.changed.notify_all()

    def _acknowledge(self, fields: dict[str, Any]) -> None:
        self.pub.send(f"{fields['client']} {fields['id']}".encode())

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.frames) >= count, timeout), self.frames
            return list(self.frames)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.pull.close()
        self.pub.close()
        self.context.term()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    """A fake daemon the client is configured for, with its overflow folder in `tmp_path`."""
    fake = FakeDaemon()
    overrides = {
        "client": {
            "connect": [fake.endpoint],
            "acks": [fake.acks],
            "overflow_dir": str(tmp_path / "overflow"),
            "ack_timeout": 0.3,
        }
    }
    fake.settings = load_settings(None, overrides)
    dispatcher.configure(None, **overrides)
    yield fake
    client.close()
    fake.close()


def test_a_daemon_that_is_only_behind_gets_no_re_sends(daemon: FakeDaemon, tmp_path: Path) -> None:
    daemon.trickle = 0.08  # 8 receipts take ~0.6 s: twice ack_timeout (0.3 s)
    ids = [dispatcher.enqueue_email("welcome", to=f"u{i}@example.com") for i in range(8)]
    assert dispatcher.flush(10.0) is True
    assert sorted(f["id"] for f in daemon.frames) == sorted(ids)  # each received once: no re-send
    assert spilled_ids(tmp_path / "overflow") == []


def spilled_ids(folder: Path) -> list[str]:
    return [orjson.loads(f)["id"] for p in overflow.waiting(folder) for f in overflow.read(p) or []]


def test_enqueue_sends_one_frame_with_the_request(daemon: FakeDaemon, tmp_path: Path) -> None:
    request_id = dispatcher.enqueue_email(
        "welcome",
        to=["Ada <ada@example.com>"],
        context={"price": Decimal("9.90"), "n": 3},
        send_at=datetime(2030, 1, 1, tzinfo=UTC),
        priority="high",
        attachments=[("a.txt", b"hi")],
    )
    (data,) = daemon.wait_for(1)
    assert data["id"] == request_id
    assert request_id.startswith(f"{data['client']}-")  # receipts come to this process
    assert data["context"] == {"price": "9.90", "n": 3}
    request = wire.validate(data)
    assert request.attachments[0].content_type == "text/plain"
    assert request.send_at == datetime(2030, 1, 1, tzinfo=UTC)
    assert dispatcher.flush(5.0) is True
    assert spilled_ids(tmp_path / "overflow") == []


@pytest.mark.parametrize(
    ("kwargs", "error", "reason"),
    [
        ({"to": "bob"}, InvalidRequest, "not a valid address"),
        ({"to": []}, InvalidRequest, "at least one recipient"),
        (
            {"to": "a@example.com", "headers": {"X-A": "1\r\nBcc: e@evil.com"}},
            InvalidRequest,
            "control",
        ),
        ({"to": "a@example.com", "priority": "asap"}, InvalidRequest, "priority"),
        ({"to": "a@example.com", "context": {"f": open}}, InvalidRequest, "cannot be encoded"),
        (
            {"to": "a@example.com", "context": {"x": "y" * 5_000_000}},
            RequestTooLarge,
            "context: 5000008 bytes as JSON, at most 65536 bytes",
        ),
        (
            {"to": "a@example.com", "send_at": datetime(2030, 1, 1)},
            InvalidRequest,
            "timezone-aware",
        ),
    ],
)
def test_input_that_can_never_be_sent_raises_value_error(
    daemon: FakeDaemon, kwargs: dict[str, object], error: type, reason: str
) -> None:
    with pytest.raises(error, match=reason) as caught:
        dispatcher.enqueue_email("welcome", **kwargs)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)


def test_no_receipt_means_one_resend_then_a_spill(daemon: FakeDaemon, tmp_path: Path) -> None:
    daemon.acknowledging = False
    assert daemon.settings is not None
    with dispatcher.Client(daemon.settings) as app:
        request_id = app.enqueue_email("welcome", to="a@example.com")
        assert [f["id"] for f in daemon.wait_for(2)] == [request_id, request_id]
        assert app.flush(5.0) is False
        assert app.resent == 1
    assert spilled_ids(tmp_path / "overflow") == [request_id]
    assert len(daemon.frames) == 2  # spilled, not sent a third time


def test_daemon_down_neither_raises_nor_loses(tmp_path: Path) -> None:
    with zmq.Context() as context, context.socket(zmq.PULL) as probe:
        port = probe.bind_to_random_port("tcp://127.0.0.1")  # a port nobody listens on after this
    folder = tmp_path / "overflow"
    dispatcher.configure(
        None, client={"connect": [f"tcp://127.0.0.1:{port}"], "overflow_dir": str(folder)}
    )
    try:
        ids = [dispatcher.enqueue_email("welcome", to="a@example.com") for _ in range(20)]
        assert dispatcher.flush(5.0) is False
        assert sorted(spilled_ids(folder)) == sorted(ids)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in overflow.waiting(folder))
    finally:
        client.close()


def test_spilled_requests_are_handed_over_once_a_daemon_answers(
    daemon: FakeDaemon, tmp_path: Path
) -> None:
    folder = tmp_path / "overflow"
    frames = [orjson.dumps({"v": 1, "id": f"old{i}", "client": "gone", "template": "welcome",
                            "to": "a@example.com"}) for i in range(3)]  # fmt: skip
    path = overflow.spill(folder, frames, "gone")
    assert path is not None
    os.utime(path, (0, 0))  # older than any lease
    new = dispatcher.enqueue_email("welcome", to="b@example.com")  # starts the client
    received = daemon.wait_for(4)
    assert {f["id"] for f in received} == {"old0", "old1", "old2", new}
    mine = {f["client"] for f in received if f["id"] == new}
    assert {f["client"] for f in received} == mine  # receipts come to this process
    deadline = time.monotonic() + 10
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not path.exists()


def test_import_and_first_call_stay_light(tmp_path: Path) -> None:
    """An app imports at boot and enqueues in a request: neither loads what only the daemon
    needs (email-validator checks `mail.from`, which the client never reads)."""
    (tmp_path / "settings.yaml").write_text(
        f"client:\n  connect: [tcp://127.0.0.1:9]\n  overflow_dir: {tmp_path / 'overflow'}\n"
    )
    heavy = ("jinja2", "aiosmtplib", "sqlite3", "email_validator", "multiprocessing", "secrets")
    code = (
        f"import os, sys, dispatcher; heavy = {heavy!r}; "
        "print(sorted(m for m in heavy if m in sys.modules)); "
        "dispatcher.enqueue_email('welcome', to='a@example.com'); "
        "print(sorted(m for m in heavy if m in sys.modules)); os._exit(0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.split("\n")[:2] == ["[]", "[]"]


def test_a_multiprocessing_child_keeps_its_requests_at_exit(tmp_path: Path) -> None:
    """Its process ends with os._exit(), past atexit: what no daemon took is spilled anyway."""
    folder = tmp_path / "overflow"
    code = f"""
import multiprocessing, sys, dispatcher
def child():
    dispatcher.configure(None, client={{"connect": ["tcp://127.0.0.1:9"], "exit_wait": 0,
                                        "overflow_dir": {str(folder)!r}}})
    print(dispatcher.enqueue_email("welcome", to="a@example.com"), flush=True)
if __name__ == "__main__":
    process = multiprocessing.get_context(sys.argv[1]).Process(target=child)
    process.start()
    process.join(20)
    sys.exit(process.exitcode)
"""
    script = tmp_path / "app.py"  # spawn imports the child's function from a file
    script.write_text(code)
    for method in ("fork", "spawn"):
        done = subprocess.run(
            [sys.executable, str(script), method],
            timeout=30,
            check=True,
            capture_output=True,
            text=True,
        )
        assert done.stdout.strip() in spilled_ids(folder), method


@pytest.mark.parametrize("kind", ["default client", "Client object"])
def test_a_forked_child_uses_its_own_sockets(daemon: FakeDaemon, kind: str) -> None:
    assert daemon.settings is not None
    # The module functions (enqueue_email, flush, close) act on the default client.
    app: Any = client if kind == "default client" else dispatcher.Client(daemon.settings)
    parent_id = app.enqueue_email("welcome", to="parent@example.com")
    pid = os.fork()
    if pid == 0:  # the child: must not touch the parent's socket, and must deliver
        status = 1
        try:
            app.enqueue_email("welcome", to="child@example.com")
            status = 0 if app.flush(5.0) else 2
            app.close()
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    frames = daemon.wait_for(2)
    assert {str(f["to"]) for f in frames} == {"parent@example.com", "child@example.com"}
    # Ids are the client id and a count: the child's client id is its own, so are its ids.
    assert len({f["client"] for f in frames}) == 2
    assert all(wire.REQUEST_ID.match(f["id"]) and f["id"].startswith(f["client"]) for f in frames)
    assert parent_id and app.flush(5.0)
    app.close()


def test_process_exits_promptly_with_the_daemon_down(tmp_path: Path) -> None:
    folder = tmp_path / "overflow"
    code = (
        "import dispatcher; dispatcher.configure(None, client={'connect': ['tcp://127.0.0.1:9'],"
        f" 'overflow_dir': {str(folder)!r}}});"
        "print(dispatcher.enqueue_email('welcome', to='a@example.com'))"
    )
    # Bounded: exiting must not hang on the undeliverable request, and must keep it.
    done = subprocess.run(
        [sys.executable, "-c", code], timeout=20, check=True, capture_output=True, text=True
    )
    assert spilled_ids(folder) == [done.stdout.strip()]


def test_a_wrong_receipts_address_is_reported_and_nothing_is_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeDaemon()
    with zmq.Context() as context, context.socket(zmq.PULL) as probe:
        nobody = probe.bind_to_random_port("tcp://127.0.0.1")  # free once the probe closes
    folder = tmp_path / "overflow"
    dispatcher.configure(
        None,
        client={
            "connect": [fake.endpoint],
            "acks": [f"tcp://127.0.0.1:{nobody}"],
            "overflow_dir": str(folder),
            "ack_timeout": 0.3,
        },
    )
    try:
        request_id = dispatcher.enqueue_email("welcome", to="a@example.com")
        assert dispatcher.flush(5.0) is False
        assert spilled_ids(folder) == [request_id]
        deadline = time.monotonic() + 10
        while "no receipts socket answers at client.acks" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.02)
    finally:
        client.close()
        fake.close()


def test_an_address_only_email_validator_refuses_is_dead_with_the_reason_not_lost(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: StartDaemon
) -> None:
    """Client and intake check an address's shape only; the full check runs when the request
    is rendered and makes it dead, with the reason. It is acknowledged, so never re-sent."""
    daemon = start_daemon(write_settings(tmp_path, smtp_server.port))
    dispatcher.configure(daemon.settings_path)
    try:
        label = "x" * 64  # a DNS label is at most 63 characters: not a shape the client checks
        request_id = dispatcher.enqueue_email("welcome", to=f"ada@{label}.com", context={})
        assert dispatcher.flush(10.0) is True  # acknowledged: not re-sent, not spilled
    finally:
        client.close()
    daemon.wait_for_counts(dead=1, rejected=0)
    daemon.wait_for_log(f"dead {request_id} template=welcome: to[0]: 'ada@{label}.com' is not")
    assert smtp_server.messages == []


def test_a_closed_client_opens_again_on_its_next_call(daemon: FakeDaemon) -> None:
    assert daemon.settings is not None
    app = dispatcher.Client(daemon.settings)
    first = app.enqueue_email("welcome", to="a@example.com")
    assert app.flush(5.0)
    app.close()
    second = app.enqueue_email("welcome", to="b@example.com")
    assert app.flush(5.0)
    app.close()
    assert {f["id"] for f in daemon.wait_for(2)} == {first, second}  # each acknowledged
    assert first.split("-")[0] != second.split("-")[0]  # a new hand-off, with its own client id


def test_acknowledged_requests_are_forgotten_once_calls_stop(daemon: FakeDaemon) -> None:
    """Calls forget a few acknowledged requests each; the keeper forgets the rest once the
    caller is idle, so memory is given back without a flush(), even when every receipt came
    in one frame after the last call."""
    assert daemon.settings is not None
    daemon.acknowledging = False
    patient = dataclasses.replace(daemon.settings.client, ack_timeout=60.0)  # no timeout path
    app = dispatcher.Client(dataclasses.replace(daemon.settings, client=patient))
    try:
        ids = [app.enqueue_email("welcome", to=f"u{n}@example.com") for n in range(50)]
        daemon.wait_for(50)
        handoff = app._handoff
        assert handoff is not None and len(handoff.pending) == 50
        daemon.pub.send(" ".join([handoff.client_id, *ids]).encode())
        deadline = time.monotonic() + 10
        while len(handoff.pending) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(handoff.pending) == 0 and not handoff.acknowledged
    finally:
        app.close()

"""The client: validates at once, hands over without blocking, stays light and fork-safe."""

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
import zmq

import dispatcher
from dispatcher import client, wire
from dispatcher.errors import InvalidRequest, RequestTooLarge


@pytest.fixture
def pull(tmp_path: Path) -> Iterator[tuple[zmq.Socket[bytes], str]]:
    """A bare PULL socket standing in for the daemon, and the endpoint clients connect to."""
    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    socket.linger = 0
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"
    dispatcher.configure(None, client={"connect": [endpoint]})
    yield socket, endpoint
    client._state.close()
    socket.close()
    context.term()


def receive(socket: zmq.Socket[bytes]) -> dict[str, object]:
    assert socket.poll(5000), "no frame arrived within 5 s"
    return orjson.loads(socket.recv())  # type: ignore[no-any-return]


def test_enqueue_sends_one_frame_with_the_request(pull: tuple[zmq.Socket[bytes], str]) -> None:
    socket, _ = pull
    request_id = dispatcher.enqueue_email(
        "welcome",
        to=["Ada <ada@example.com>"],
        context={"price": Decimal("9.90"), "n": 3},
        send_at=datetime(2030, 1, 1, tzinfo=UTC),
        priority="high",
        attachments=[("a.txt", b"hi")],
    )
    data = receive(socket)
    assert data["id"] == request_id
    assert data["context"] == {"price": "9.90", "n": 3}
    request = wire.validate(data)
    assert request.attachments[0].content_type == "text/plain"
    assert request.send_at == datetime(2030, 1, 1, tzinfo=UTC)
    assert dispatcher.flush(1.0) is True


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
    pull: tuple[zmq.Socket[bytes], str], kwargs: dict[str, object], error: type, reason: str
) -> None:
    with pytest.raises(error, match=reason) as caught:
        dispatcher.enqueue_email("welcome", **kwargs)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)


def test_daemon_down_neither_raises_nor_blocks(caplog: pytest.LogCaptureFixture) -> None:
    with zmq.Context() as context, context.socket(zmq.PULL) as probe:
        port = probe.bind_to_random_port("tcp://127.0.0.1")  # a port nobody listens on after this
    dispatcher.configure(None, client={"connect": [f"tcp://127.0.0.1:{port}"]})
    try:
        with caplog.at_level(logging.ERROR):
            ids = [dispatcher.enqueue_email("welcome", to="a@example.com") for _ in range(20)]
        assert len(set(ids)) == 20
        assert "not handed over: no daemon reachable" in caplog.text
        assert dispatcher.flush(0.1) is False
    finally:
        client._state.close()


def test_import_stays_light() -> None:
    code = (
        "import sys, dispatcher; "
        "print(sorted(m for m in ('jinja2', 'aiosmtplib', 'sqlite3', 'email_validator') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_forked_child_uses_its_own_socket(pull: tuple[zmq.Socket[bytes], str]) -> None:
    socket, _ = pull
    parent_id = dispatcher.enqueue_email("welcome", to="parent@example.com")
    parent_client = client._state.client
    pid = os.fork()
    if pid == 0:  # the child: must not touch the parent's socket, and must deliver
        status = 1
        try:
            child_id = dispatcher.enqueue_email("welcome", to="child@example.com")
            status = 0 if client._state.client is not parent_client and child_id else 1
            client._state.close()
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    received = {str(receive(socket)["to"]) for _ in range(2)}
    assert received == {"parent@example.com", "child@example.com"}
    assert parent_id


def test_process_exits_promptly_with_the_daemon_down(tmp_path: Path) -> None:
    code = (
        "import dispatcher; dispatcher.configure(None, client={'connect': ['tcp://127.0.0.1:9']});"
        "dispatcher.enqueue_email('welcome', to='a@example.com')"
    )
    # Bounded linger: exiting must not hang on the undeliverable request.
    subprocess.run([sys.executable, "-c", code], timeout=20, check=True, capture_output=True)

"""sd_notify: a real datagram socket stands in for systemd, a real daemon process talks to it."""

import os
import signal
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson
import zmq

from dispatcher.notify import Notifier
from tests.daemon import DaemonProcess, write_settings
from tests.smtp_server import SmtpServer, free_port

WATCHDOG_USEC = 400_000  # pings every 0.2 s: several arrive within a short test


class ServiceManager:
    """The manager's end of NOTIFY_SOCKET, on an abstract name; collects every datagram.

    When READY=1 arrives it freezes the sender (SIGSTOP; its pid comes with the datagram, as
    systemd gets it) and tries to connect to the daemon's intake: the kernel completes a TCP
    handshake for a listening socket even while its process is stopped, so this tells whether
    the intake accepted connections when READY was sent, not some time later.
    """

    def __init__(self, intake_port: int) -> None:
        self.name = f"@dispatcher-test-{uuid.uuid4().hex}"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(b"\0" + self.name[1:].encode())
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.socket.settimeout(0.1)
        self.intake_port = intake_port
        self.messages: list[dict[str, str]] = []
        self.senders: set[int] = set()
        self.intake_accepted_at_ready: list[bool] = []  # one entry per READY=1
        self.changed = threading.Condition()
        self.running = True
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        deadline = time.monotonic() + 120  # bounded even if a test forgets to close()
        while self.running and time.monotonic() < deadline:
            try:
                datagram, ancillary, _, _ = self.socket.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in datagram.decode().splitlines())
            pid = _sender_pid(ancillary)
            if fields.get("READY") == "1":
                os.kill(pid, signal.SIGSTOP)
                try:
                    _wait_until_stopped(pid)
                    self.intake_accepted_at_ready.append(self._intake_accepts())
                finally:
                    os.kill(pid, signal.SIGCONT)
            with self.changed:
                self.senders.add(pid)
                self.messages.append(fields)
                self.changed.notify_all()

    def _intake_accepts(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.intake_port), timeout=2).close()
        except OSError:
            return False
        return True

    def wait_until(
        self, done: Callable[[list[dict[str, str]]], bool], what: str, timeout: float = 20.0
    ) -> list[dict[str, str]]:
        """The messages so far, once `done` holds for them (or fail after `timeout`)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not done(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{what} not within {timeout} s: {self.messages}")
                self.changed.wait(left)
            return list(self.messages)

    def wait_for(self, key: str, count: int = 1) -> list[dict[str, str]]:
        """The messages so far, once `count` of them carry `key`."""
        return self.wait_until(lambda ms: sum(key in m for m in ms) >= count, f"{count} x {key}")

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.socket.close()


def _wait_until_stopped(pid: int) -> None:
    """SIGSTOP takes effect asynchronously; wait (bounded) until the kernel shows it."""
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.001)


def _sender_pid(ancillary: list[tuple[int, int, bytes]]) -> int:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid, _uid, _gid = struct.unpack("iII", data[:12])
            return int(pid)
    raise AssertionError("a datagram without the sender's credentials")


def test_ready_once_intake_accepts_then_watchdog_pings_then_stopping_on_sigterm(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    port = free_port()
    settings = write_settings(
        tmp_path, smtp_server.port, intake={"bind": f"tcp://127.0.0.1:{port}"}
    )
    manager = ServiceManager(port)
    env = {"NOTIFY_SOCKET": manager.name, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    daemon = DaemonProcess(settings, env=env)
    try:
        (ready, *_) = manager.wait_for("READY")
        assert manager.intake_accepted_at_ready == [True]
        assert "waiting" in ready["STATUS"]
        # A plain PUSH right after READY is taken and delivered.
        with zmq.Context() as context, context.socket(zmq.PUSH) as push:
            push.linger = 5000
            push.connect(f"tcp://127.0.0.1:{port}")
            request = {"v": 1, "template": "welcome", "to": "ready@example.com"}
            push.send(orjson.dumps({**request, "context": {"name": "R", "activate_url": "x"}}))
            smtp_server.wait_for(1)
        messages = manager.wait_for("WATCHDOG", count=3)
        assert all(m["WATCHDOG"] == "1" for m in messages if "WATCHDOG" in m)
        assert daemon.stop() == 0
        messages = manager.wait_for("STOPPING")
        assert manager.senders == {daemon.process.pid}  # the main process, as NotifyAccess=main
        assert messages[0].get("READY") == "1"  # nothing before READY
        stopping = next(m for m in messages if "STOPPING" in m)
        assert stopping["STOPPING"] == "1" and stopping["STATUS"].startswith("stopping")
    finally:
        daemon.kill()
        manager.close()


def test_status_reports_queue_figures(tmp_path: Path, smtp_server: SmtpServer) -> None:
    port = free_port()
    settings = write_settings(
        tmp_path, smtp_server.port, intake={"bind": f"tcp://127.0.0.1:{port}"}
    )
    manager = ServiceManager(port)
    daemon = DaemonProcess(settings, env={"NOTIFY_SOCKET": manager.name, "WATCHDOG_USEC": "200000"})
    try:
        with zmq.Context() as context, context.socket(zmq.PUSH) as push:
            push.linger = 5000
            push.connect(f"tcp://127.0.0.1:{port}")
            push.send(b"not a request")
        daemon.wait_for_counts(rejected=1)
        manager.wait_until(
            lambda ms: any("1 rejected" in m.get("STATUS", "") for m in ms),
            "a STATUS= counting the rejected frame",
        )
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        manager.close()


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready("ready") is False and notifier.stopping("bye") is False


def test_a_path_socket_receives_the_lines(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        assert notifier.ready("accepting requests")
        assert manager.recv(4096) == b"READY=1\nSTATUS=accepting requests"
        notifier.close()


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_this_process() -> None:
    pid = str(os.getpid())
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}).watchdog_interval == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval is None


def test_a_vanished_manager_is_warned_about_once_and_never_raises(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert notifier.notify(STATUS="x") is False
    assert notifier.notify(STATUS="y") is False
    notifier.close()

"""The daemon's log: one line per event, with what an operator greps for; journald-friendly."""

import contextlib
import logging
import os
import pty
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

import dispatcher
from dispatcher.logline import OneLineFormatter
from tests.daemon import LOG_FORMAT, DaemonProcess, write_settings
from tests.smtp_server import SmtpServer

StartDaemon = Callable[..., DaemonProcess]
ADA = {"name": "Ada", "activate_url": "https://example.com/a"}
STAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")
UNSTAMPED = re.compile(r"^(DEBUG|INFO|WARNING|ERROR) [\w.]+: ")


pytestmark = pytest.mark.usefixtures("fresh_client")


def test_every_event_is_one_line_with_id_template_domain_code_and_attempt(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: StartDaemon
) -> None:
    # A reply of two lines, as relays write them (RFC 5321 4.2.1): its event is still one line.
    smtp_server.fail_data(times=1, reply="451-4.3.0 Try again later\r\n451 4.3.0 Greylisted")
    smtp_server.refuse_recipient("gone@mail.example.org", "550 5.1.1 No such user")
    daemon = start_daemon(write_settings(tmp_path, smtp_server.port, log={"level": "DEBUG"}))
    dispatcher.configure(daemon.settings_path)
    sent = dispatcher.enqueue_email("welcome", to="ada@example.com", context=ADA)
    assert dispatcher.flush(10)
    daemon.wait_for_counts(sent=1)
    dead = dispatcher.enqueue_email("welcome", to="gone@mail.example.org", context=ADA)
    assert dispatcher.flush(10)
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.linger = 5000
        push.connect(daemon.settings.intake.bind)
        push.send(b"sending 0")
    daemon.wait_for_counts(dead=1, rejected=1)
    assert daemon.stop() == 0
    lines = daemon.lines
    assert [line for line in lines if not STAMPED.match(line)] == [], "\n".join(lines)

    def one(pattern: str) -> str:
        (line,) = [line for line in lines if re.search(pattern, line)]
        return line

    assert one(f"DEBUG .*received {sent} template=welcome domain=example.com$")
    assert any(re.search("INFO .*received 1 requests$", line) for line in lines)
    retry = one(f"WARNING .*retry {sent} template=welcome domain=example.com attempt=1 code=451 ")
    assert retry.endswith(": 451 4.3.0 Try again later\\n4.3.0 Greylisted")
    assert one(f"INFO .*sent {sent} template=welcome domain=example.com attempt=2 code=250 ")
    dead_line = one(f"ERROR .*dead {dead} template=welcome domain=mail.example.org attempt=1 ")
    assert "code=550" in dead_line
    assert [line for line in lines if " ERROR " in line] == [dead_line]  # nothing else failed
    assert one("WARNING .*rejected: ")


def test_a_record_with_a_traceback_is_one_line() -> None:
    try:
        raise ValueError("first\nsecond")
    except ValueError:
        record = logging.makeLogRecord(
            {"msg": "failed %s", "args": ("x",), "levelname": "ERROR", "name": "dispatcher.t"}
        )
        record.exc_info = sys.exc_info()
    line = OneLineFormatter(LOG_FORMAT).format(record)
    assert "\n" not in line and "\r" not in line
    assert STAMPED.match(line)
    assert " ERROR dispatcher.t: failed x\\nTraceback (most recent call last):\\n" in line
    assert line.endswith("ValueError: first\\nsecond")


def test_under_journald_no_timestamp_and_the_level_comes_from_settings(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: StartDaemon
) -> None:
    settings = write_settings(tmp_path, smtp_server.port, log={"level": "DEBUG"})
    daemon = start_daemon(settings, {"JOURNAL_STREAM": "8:12345"})
    dispatcher.configure(settings)
    dispatcher.enqueue_email("welcome", to="ada@example.com", context=ADA)
    assert dispatcher.flush(10)
    daemon.wait_for_counts(sent=1)
    assert daemon.stop() == 0
    assert [line for line in daemon.lines if not UNSTAMPED.match(line)] == [], daemon.log
    assert any(line.startswith("DEBUG dispatcher.transport: connected to") for line in daemon.lines)


def test_the_default_level_is_info(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: StartDaemon
) -> None:
    daemon = start_daemon(write_settings(tmp_path, smtp_server.port))
    dispatcher.configure(daemon.settings_path)
    dispatcher.enqueue_email("welcome", to="ada@example.com", context=ADA)
    assert dispatcher.flush(10)
    daemon.wait_for_counts(sent=1)
    assert daemon.stop() == 0
    assert not any(" DEBUG " in line for line in daemon.lines)


A_THREAD_FAILS = """
import threading
from dispatcher import logline

logline.configure("INFO")

def fail():
    raise RuntimeError("in a thread")

thread = threading.Thread(target=fail, name="helper")
thread.start()
thread.join()
"""
PYTHON_REPORTS = (
    A_THREAD_FAILS
    + """
import gc, warnings

warnings.warn("careful\\nnow")

class Broken:
    def __del__(self):
        raise ValueError("in a finalizer")

Broken()
gc.collect()
"""
)


def test_what_python_itself_reports_is_one_stamped_line_each() -> None:
    """A warning, a thread's uncaught exception, an exception in a finalizer: Python prints
    each over several lines of stderr unless the daemon's logging takes them."""
    done = subprocess.run(
        [sys.executable, "-c", PYTHON_REPORTS], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert [line for line in lines if not STAMPED.match(line)] == [], done.stderr
    assert len(lines) == 3, done.stderr
    thread, warning, finalizer = lines
    assert " WARNING py.warnings: " in warning and "UserWarning: careful\\nnow" in warning
    assert " ERROR dispatcher: uncaught exception in thread helper\\nTraceback " in thread
    assert thread.endswith("RuntimeError: in a thread")
    assert " ERROR dispatcher: Exception ignored in: <function Broken.__del__" in finalizer
    assert finalizer.endswith("ValueError: in a finalizer")


def test_in_a_terminal_a_traceback_keeps_its_lines() -> None:
    """`dispatcher dev` in front of a developer: a traceback reads best as Python prints it."""
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-c", A_THREAD_FAILS],
            stdout=subprocess.DEVNULL,
            stderr=terminal,
            timeout=60,
        )
    finally:
        os.close(terminal)
    output = b""
    with contextlib.suppress(OSError):  # EIO once everything written was read
        while chunk := os.read(controller, 4096):
            output += chunk
    os.close(controller)
    assert done.returncode == 0
    lines = output.decode().splitlines()
    assert STAMPED.match(lines[0]) and lines[0].endswith("uncaught exception in thread helper")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: in a thread"

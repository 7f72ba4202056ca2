"""Rendering in worker processes: same messages, no lost request when a worker dies, no orphan."""

import gc
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

import dispatcher
from dispatcher.renderpool import RenderPool
from tests.daemon import ROOT, DaemonProcess, write_settings
from tests.smtp_server import SmtpServer

T = TypeVar("T")

StartDaemon = Callable[..., DaemonProcess]
ADA = {"name": "Ada", "activate_url": "https://example.com/a"}


pytestmark = pytest.mark.usefixtures("fresh_client")


def children(pid: int) -> list[int]:
    """The daemon's render workers (not multiprocessing's resource tracker)."""
    try:
        found = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        return [c for c in found if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Bounded poll."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def send_one(daemon: DaemonProcess, to: str = "ada@example.com") -> str:
    dispatcher.configure(daemon.settings_path)
    request_id = dispatcher.enqueue_email("welcome", to=to, context=ADA)
    assert dispatcher.flush(10)
    return request_id


@pytest.mark.parametrize("processes", [0, 1, 2])
def test_messages_are_the_same_whether_rendered_on_the_loop_or_in_workers(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: StartDaemon, processes: int
) -> None:
    settings = write_settings(tmp_path, smtp_server.port, templates={"render_processes": processes})
    daemon = start_daemon(settings)
    request_id = send_one(daemon)
    [message] = smtp_server.wait_for(1)
    assert request_id in message.message["Message-ID"]
    assert message.message["Subject"]
    assert len(children(daemon.process.pid)) == processes  # spawned with the daemon


def daemon_that_rendered_a_mail(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: StartDaemon
) -> tuple[DaemonProcess, int]:
    """A daemon whose one render worker has rendered a delivered mail; and that worker."""
    daemon = start_daemon(write_settings(tmp_path, smtp_server.port))
    send_one(daemon)
    smtp_server.wait_for(1)
    [worker] = children(daemon.process.pid)
    return daemon, worker


def test_a_killed_render_worker_is_replaced_and_nothing_is_lost(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: StartDaemon
) -> None:
    daemon, worker = daemon_that_rendered_a_mail(tmp_path, smtp_server, start_daemon)
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: not alive(worker))
    send_one(daemon, "grace@example.com")
    daemon.wait_for_counts(sent=2, dead=0, timeout=30)
    assert worker not in children(daemon.process.pid)


def test_render_workers_end_when_the_daemon_is_killed(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: StartDaemon
) -> None:
    daemon, worker = daemon_that_rendered_a_mail(tmp_path, smtp_server, start_daemon)
    daemon.kill()
    wait_until(lambda: not alive(worker))


def test_a_worker_still_starting_when_the_daemon_is_killed_ends_too(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: StartDaemon
) -> None:
    daemon = start_daemon(write_settings(tmp_path, smtp_server.port))
    [worker] = children(daemon.process.pid)  # spawned with the daemon, importing still
    daemon.kill()
    wait_until(lambda: not alive(worker))


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def slow_templates(folder: Path) -> Path:
    """The shipped templates plus `slow`, whose render keeps a worker busy for seconds."""
    templates = folder / "templates"
    shutil.copytree(ROOT / "templates", templates)
    (templates / "slow").mkdir()
    (templates / "slow" / "subject.txt").write_text("Slow\n")
    (templates / "slow" / "body.txt").write_text(
        "{% for a in range(1000) %}{% for b in range(100000) %}{% if b < 0 %}x{% endif %}"
        "{% endfor %}{% endfor %}done {{ name }}\n"
    )
    return templates


def test_a_signal_to_the_whole_process_group_stops_the_daemon_cleanly(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: StartDaemon
) -> None:
    """A terminal's Ctrl-C or a supervisor's group SIGTERM also reaches the render worker: it
    must leave on the daemon's word, not die mid-render and make the daemon report an error."""
    templates = slow_templates(tmp_path)
    settings = write_settings(tmp_path, smtp_server.port, templates={"dir": str(templates)})
    daemon = start_daemon(settings, own_group=True)
    send_one(daemon)  # the worker has started and rendered: from now on its CPU is the render's
    smtp_server.wait_for(1)
    [worker] = children(daemon.process.pid)
    idle = cpu_seconds(worker)
    dispatcher.enqueue_email("slow", to="grace@example.com", context=ADA)
    assert dispatcher.flush(10)
    wait_until(lambda: cpu_seconds(worker) > idle + 0.2)  # rendering the slow one now
    os.killpg(daemon.process.pid, signal.SIGTERM)
    daemon.wait_for_log("stopping")
    assert alive(worker), "the render worker died of the group's signal"
    assert daemon.process.wait(30) == 0
    assert "ERROR" not in daemon.log and "Traceback" not in daemon.log, daemon.log
    assert "stopped:" in daemon.log


def test_a_workers_start_up_is_kept_out_of_later_full_collections() -> None:
    """What a worker loaded before its first render is frozen: a full collection in the
    middle of a batch scans only what rendering made, not every module."""
    assert in_a_worker(gc.get_freeze_count) > 1000


def _reports_through_the_log() -> bool:
    """In a worker: whether an uncaught exception of a thread or of a finalizer is logged."""
    import sys
    import threading

    from dispatcher import logline

    return threading.excepthook is logline._thread_died and sys.unraisablehook is (
        logline._unraisable
    )


def test_a_worker_logs_as_the_daemon_does() -> None:
    """The worker writes to the daemon's stderr: what Python reports there is one line too."""
    assert in_a_worker(_reports_through_the_log)


def in_a_worker(call: Callable[[], T]) -> T:
    """`call()`'s result in a real render worker, as the daemon starts it."""
    pool = RenderPool(ROOT / "templates", "Example <noreply@example.com>", 1)
    try:
        return pool._pool().submit(call).result(timeout=60)
    finally:
        pool.close()

"""Bounded rendering: a runaway template costs its own request, never the queue behind it."""

import fnmatch
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import dispatcher
from dispatcher.renderpool import MAX_MESSAGE_BYTES
from dispatcher.spool.sqlite import SqliteReader
from tests.daemon import ROOT, DaemonProcess, InProcessDaemon, RunningDaemon, write_settings
from tests.smtp_server import SmtpServer

pytestmark = pytest.mark.usefixtures("fresh_client")

ADA = {"name": "Ada", "activate_url": "https://example.com/a"}
# The bug that reached production: 10^10 iterations, each writing a character.
RUNAWAY = "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}"
HUGE = "{% for a in range(11000) %}{{ 'x' * 1000 }}\n{% endfor %}"  # 11 MB of message
GREEDY = "{{ 'x' * 3000000000 }}"  # 3 GB in one allocation


def templates_with(folder: Path, **bodies: str) -> Path:
    """The shipped templates, plus one template per keyword with that text body."""
    templates = folder / "templates"
    shutil.copytree(ROOT / "templates", templates)
    for name, body in bodies.items():
        (templates / name).mkdir()
        (templates / name / "subject.txt").write_text(f"{name}\n")
        (templates / name / "body.txt").write_text(body + "\n")
    return templates


def enqueue(daemon: RunningDaemon, template: str, count: int = 1) -> list[str]:
    dispatcher.configure(daemon.settings_path)
    ids = [
        dispatcher.enqueue_email(template, to=f"user{i}@example.com", context=ADA)
        for i in range(count)
    ]
    assert dispatcher.flush(10)
    return ids


def reason(daemon: RunningDaemon, request_id: str) -> str:
    """Why the spool says the request is dead."""
    with SqliteReader(daemon.settings.spool.path) as spool:
        report = spool.inspect(request_id)
    assert report is not None and report["state"] == "dead", report
    return str(report["last_reply"])


def test_a_runaway_template_is_dead_and_the_twenty_behind_it_are_delivered(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: Callable[..., InProcessDaemon]
) -> None:
    templates = templates_with(tmp_path, runaway=RUNAWAY)
    settings = write_settings(
        tmp_path, smtp_server.port, templates={"dir": str(templates), "render_timeout": 3}
    )
    daemon = run_daemon(settings, render_processes=1)
    started = time.monotonic()
    [runaway] = enqueue(daemon, "runaway")
    enqueue(daemon, "welcome", 20)
    smtp_server.wait_for(20, timeout=20 - (time.monotonic() - started))
    daemon.wait_for_counts(sent=20, dead=1)
    assert reason(daemon, runaway) == "template 'runaway': render took longer than 3 s"
    assert "Traceback" not in daemon.log


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (
            HUGE,
            f"template 'big': rendered message of 11* bytes is over the limit of"
            f" {MAX_MESSAGE_BYTES} bytes",
        ),
        (GREEDY, "templates/big/body.txt:1: MemoryError*"),
    ],
)
def test_a_message_too_large_or_a_render_too_greedy_for_its_worker_is_dead_alone(
    tmp_path: Path,
    smtp_server: SmtpServer,
    run_daemon: Callable[..., InProcessDaemon],
    body: str,
    why: str,
) -> None:
    settings = write_settings(
        tmp_path, smtp_server.port, templates={"dir": str(templates_with(tmp_path, big=body))}
    )
    daemon = run_daemon(settings, render_processes=1)
    [big] = enqueue(daemon, "big")
    enqueue(daemon, "welcome", 3)
    daemon.wait_for_counts(sent=3, dead=1)
    assert fnmatch.fnmatch(reason(daemon, big), why)


def test_rendering_on_the_loop_is_bounded_in_time_too(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """`render_processes: 0` renders on the daemon's main thread, where the alarm reaches."""
    templates = templates_with(tmp_path, runaway=RUNAWAY)
    settings = write_settings(
        tmp_path,
        smtp_server.port,
        templates={"dir": str(templates), "render_timeout": 1, "render_processes": 0},
    )
    daemon = start_daemon(settings)
    [runaway] = enqueue(daemon, "runaway")
    enqueue(daemon, "welcome", 3)
    daemon.wait_for_counts(sent=3, dead=1)
    assert reason(daemon, runaway) == "template 'runaway': render took longer than 1 s"

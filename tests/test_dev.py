"""`dispatcher dev`: daemon, capture SMTP server and preview in one process. A newcomer sends a
mail with `dispatcher send` and finds it on the Outbox page; Ctrl-C stops everything.

Dev runs in this process (`run_dev`) unless the command itself is tested: Ctrl-C, start-up
errors."""

import email
import email.policy
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

from dispatcher.settings import SpoolSettings
from tests.daemon import ROOT, run_cli, write_settings
from tests.postgres import spool_section
from tests.smtp_server import free_port
from tests.test_cli import assert_one_line_error
from tests.ui import InProcessDev, UiProcess

StartUi = Callable[..., UiProcess]
RunDev = Callable[..., InProcessDev]


def dev_settings(folder: Path, spool: dict[str, str] | None = None) -> Path:
    """The shipped templates; sockets, spool and the capture port private to the test."""
    return write_settings(
        folder, free_port(), templates={"dir": str(ROOT / "templates")}, spool=spool or {}
    )


def wait_for_outbox(ui: InProcessDev, count: int, timeout: float = 20.0) -> list[str]:
    """Bounded poll of the Outbox page until it lists `count` messages; their ids, newest first."""
    deadline = time.monotonic() + timeout
    while True:
        ids = re.findall(r'href="/outbox/(\d+)"', ui.get("/outbox").text)
        if len(ids) >= count:
            return ids
        if time.monotonic() > deadline or not ui.alive:
            raise AssertionError(f"Outbox lists {len(ids)} messages, expected {count}\n{ui.log}")
        time.sleep(0.05)


def test_a_sent_mail_appears_in_the_outbox(run_dev: RunDev, tmp_path: Path) -> None:
    settings = dev_settings(tmp_path)
    ui = run_dev(settings)
    assert ui.get("/outbox").status == 200
    assert "Nothing captured yet" in ui.get("/outbox").text
    version = ui.get("/version").text
    sent = run_cli("send", "welcome", "--to", "me@example.com", settings=settings)
    assert sent.returncode == 0, sent.stderr
    assert "sent with sample 'default'" in sent.stderr
    (message_id,) = wait_for_outbox(ui, 1)
    assert ui.get("/version").text != version  # so an open Outbox page reloads itself
    page = ui.get(f"/outbox/{message_id}")
    assert '<h1 class="subject">Welcome to Example, Ada!</h1>' in page.text
    assert "noreply@example.com → me@example.com" in page.text  # the SMTP envelope
    html_part = ui.get(f"/outbox/{message_id}/html")
    assert "Content-Security-Policy" in html_part.headers
    assert '<h1 style="' in html_part.text  # what the daemon sent has its CSS inlined
    eml = ui.get(f"/outbox/{message_id}/eml")
    message = email.message_from_bytes(eml.raw, policy=email.policy.default)
    assert sent.stdout.strip() in str(message["Message-ID"])
    assert ui.get(f"/outbox/{message_id}/text").status == 200
    assert ui.get("/outbox/123").status == 404
    assert ui.get("/templates/welcome/default").status == 200  # the preview is there too


def test_outbox_is_newest_first_and_survives_a_restart(run_dev: RunDev, tmp_path: Path) -> None:
    settings = dev_settings(tmp_path)
    ui = run_dev(settings)
    for sample in ("default", "long_name"):
        sent = run_cli(
            "send", "welcome", "--to", "me@example.com", "--sample", sample, settings=settings
        )
        assert sent.returncode == 0, sent.stderr
        wait_for_outbox(ui, 1 if sample == "default" else 2)
    assert ui.stop() == 0
    again = run_dev(settings)
    newest, oldest = wait_for_outbox(again, 2)
    assert "Zoë" in again.get(f"/outbox/{newest}").text
    assert "Welcome to Example, Ada!" in again.get(f"/outbox/{oldest}").text


def test_a_request_that_cannot_be_rendered_is_shown_with_its_reason(
    run_dev: RunDev, tmp_path: Path, store: SpoolSettings
) -> None:
    settings = dev_settings(tmp_path, spool_section(store))
    ui = run_dev(settings)
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    sent = run_cli(
        "send", "welcome", "--to", "me@example.com", "--context", str(empty), settings=settings
    )
    assert sent.returncode == 0, sent.stderr
    ui.wait_for_log(f"dead {sent.stdout.strip()}")
    page = ui.get("/outbox").text
    assert "Not delivered" in page
    assert f"{sent.stdout.strip()} (welcome)" in page
    assert "templates/welcome/subject.txt:1: &#39;name&#39; is undefined" in page


def test_one_ctrl_c_stops_daemon_capture_and_preview(start_ui: StartUi, tmp_path: Path) -> None:
    settings = dev_settings(tmp_path)
    ui = start_ui("dev", settings)
    smtp_port = int(re.search(r"capturing mail sent to 127\.0\.0\.1:(\d+)", ui.log)[1])  # type: ignore[index]
    assert ui.interrupt() == 0
    assert "stopped:" in ui.log and "dev stopped" in ui.log
    assert "Traceback" not in ui.log
    for port in (smtp_port, int(ui.url.rsplit(":", 1)[1].strip("/"))):
        with socket.socket() as probe:  # nothing listens any more
            assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_dev_with_the_capture_port_taken_fails_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = write_settings(tmp_path, port)
        assert_one_line_error(run_cli("dev", "--port", "0", settings=settings), "smtp.port:")


def test_dev_refuses_to_capture_on_a_remote_smtp_host(tmp_path: Path) -> None:
    settings = write_settings(tmp_path, 25, smtp={"host": "smtp.example.com"})
    assert_one_line_error(
        run_cli("dev", "--port", "0", settings=settings), "must be a loopback address"
    )


def test_a_template_edited_while_dev_runs_is_used_for_the_next_mail(
    run_dev: RunDev, tmp_path: Path
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    settings = write_settings(tmp_path, free_port(), templates={"dir": str(templates)})
    ui = run_dev(settings, render_processes=None)  # a render worker, as dev runs by default
    assert run_cli("send", "welcome", "--to", "me@example.com", settings=settings).returncode == 0
    wait_for_outbox(ui, 1)
    (templates / "welcome" / "subject.txt").write_text("Edited for {{ name }}\n")
    assert run_cli("send", "welcome", "--to", "me@example.com", settings=settings).returncode == 0
    newest, _ = wait_for_outbox(ui, 2)
    assert '<h1 class="subject">Edited for Ada</h1>' in ui.get(f"/outbox/{newest}").text

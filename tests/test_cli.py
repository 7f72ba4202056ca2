"""The `dispatcher` command as a user runs it: clear one-line errors, never a traceback."""

from email import message_from_bytes, policy
from pathlib import Path

import orjson
import pytest
import zmq

from dispatcher import overflow
from tests.daemon import ROOT, DaemonProcess, run_cli, write_settings
from tests.smtp_server import SmtpServer

SHIPPED = ROOT / "settings.yaml"


def assert_one_line_error(result: object, text: str) -> None:
    assert result.returncode == 2, result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in result.stderr  # type: ignore[attr-defined]
    assert result.stderr.strip().count("\n") == 0  # type: ignore[attr-defined]
    assert text in result.stderr  # type: ignore[attr-defined]


def test_check_passes_on_the_shipped_templates() -> None:
    result = run_cli("check", settings=SHIPPED)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: settings and 2 templates" in result.stdout


def test_check_reports_each_failure_as_file_line_message(tmp_path: Path) -> None:
    broken = tmp_path / "templates" / "broken"
    broken.mkdir(parents=True)
    (broken / "subject.txt").write_text("Hi {{ name }}")
    (broken / "body.html").write_text("<p>\n{% if %}\n</p>")
    (broken / "preview.yaml").write_text("default: {name: Ada}\nother: {name: Bob}\n")
    undefined = tmp_path / "templates" / "undefined"
    undefined.mkdir()
    (undefined / "subject.txt").write_text("Hi")
    (undefined / "body.txt").write_text("Hello\n{{ nmae }}\n")
    (undefined / "preview.yaml").write_text("default: {name: Ada}\n")
    lonely = tmp_path / "templates" / "lonely"
    lonely.mkdir()
    (lonely / "subject.txt").write_text("Hello {{ name }}")
    (lonely / "body.txt").write_text("Hello there")
    (tmp_path / "templates" / "_layouts").mkdir()
    (tmp_path / "templates" / "_layouts" / "unused.html").write_text("{% block %}")
    settings = write_settings(tmp_path, 1025, templates={"dir": "templates"})
    result = run_cli("check", settings=settings)
    assert result.returncode == 1
    failures = [line for line in result.stdout.splitlines() if line.startswith("templates/")]
    assert len(failures) == 3, result.stdout  # broken's two samples fail alike: said once
    assert failures[0].startswith("templates/_layouts/unused.html:1: ")  # compiled, never used
    assert failures[1].startswith("templates/broken/body.html:2: ")
    assert failures[2] == (
        "templates/undefined/body.txt:2: 'nmae' is undefined [template undefined, sample default]"
    )
    assert "warning: lonely: no samples" in result.stdout  # a warning, not a failure
    assert "checked 3 templates: 3 failures" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_check_warns_about_a_derived_text_part_but_passes(tmp_path: Path) -> None:
    result = run_cli("check", settings=SHIPPED)
    assert result.returncode == 0
    assert "warning: password_reset: no body.txt; the text part is derived" in result.stdout


@pytest.mark.parametrize("fmt", ["eml", "html", "text"])
def test_render_prints_what_would_be_sent(fmt: str) -> None:
    result = run_cli(
        "render", "welcome", "--sample", "long_name", "--format", fmt, settings=SHIPPED
    )
    assert result.returncode == 0, result.stderr
    if fmt == "eml":
        message = message_from_bytes(result.stdout.encode(), policy=policy.default)
        assert "Zoë" in str(message["Subject"])
        assert message.get_content_type() == "multipart/alternative"
    elif fmt == "html":
        assert "&lt;O'Brien&gt;" in result.stdout
        assert '<h1 style="' in result.stdout  # the layout's <style> is inlined
    else:
        assert "<O'Brien>" in result.stdout


def test_render_without_a_context_uses_the_default_sample() -> None:
    result = run_cli("render", "welcome", "--format", "text", settings=SHIPPED)
    assert result.returncode == 0, result.stderr
    assert "Welcome, Ada!" in result.stdout


def test_render_with_an_empty_context_names_the_undefined_variable(tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    result = run_cli("render", "welcome", "--context", str(empty), settings=SHIPPED)
    assert_one_line_error(result, "templates/welcome/subject.txt:1: 'name' is undefined")


def test_render_with_a_context_file(tmp_path: Path) -> None:
    context = tmp_path / "ctx.json"
    context.write_text('{"name": "Grace", "activate_url": "https://example.com/g"}')
    result = run_cli(
        "render", "welcome", "--context", str(context), "--format", "text", settings=SHIPPED
    )
    assert result.returncode == 0, result.stderr
    assert "Grace" in result.stdout and "https://example.com/g" in result.stdout


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["render", "nope"], "unknown template 'nope'"),
        (["render", "welcome", "--sample", "nope"], "no sample 'nope'"),
        (["send", "welcome", "--to", "not-an-address"], "to[0]: 'not-an-address' is not a valid"),
        (
            ["send", "welcome", "--to", "a@example.com", "--context", "/nonexistent.yaml"],
            "--context /nonexistent.yaml",
        ),
    ],
)
def test_user_mistakes_print_one_line_and_exit_2(args: list[str], text: str) -> None:
    assert_one_line_error(run_cli(*args, settings=SHIPPED), text)


def test_missing_or_bad_settings_file_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(
        run_cli("status", settings=tmp_path / "nope.yaml"), "settings file not found"
    )
    bad = tmp_path / "settings.yaml"
    bad.write_text("smtp:\n  port: twenty-five\n")
    assert_one_line_error(run_cli("check", settings=bad), "smtp.port: expected an integer")


def test_status_without_a_spool_says_so(tmp_path: Path) -> None:
    settings = write_settings(tmp_path, 1025)
    assert_one_line_error(run_cli("status", settings=settings), "no spool at")


def test_send_of_an_unknown_template_is_a_mistake_and_sends_nothing(tmp_path: Path) -> None:
    result = run_cli(
        "send", "nosuch", "--to", "a@example.com", settings=write_settings(tmp_path, 1)
    )
    assert_one_line_error(result, "unknown template 'nosuch' (templates: ")
    assert not (tmp_path / "overflow").exists()


def test_send_without_a_daemon_keeps_the_request_in_the_overflow_folder(tmp_path: Path) -> None:
    result = run_cli(
        "send", "welcome", "--to", "a@example.com", settings=write_settings(tmp_path, 1025)
    )
    assert result.returncode == 0, result.stderr
    request_id = result.stdout.strip()
    assert f"no daemon acknowledged {request_id}; it is kept in" in result.stderr
    assert "Traceback" not in result.stderr
    (spilled,) = overflow.waiting(tmp_path / "overflow")
    assert [orjson.loads(f)["id"] for f in overflow.read(spilled) or []] == [request_id]


def test_send_and_status_against_a_running_daemon(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: "type[DaemonProcess]"
) -> None:
    settings = write_settings(tmp_path, smtp_server.port)
    daemon = start_daemon(settings)
    context = tmp_path / "ctx.yaml"
    context.write_text("name: Ada\nactivate_url: https://example.com/a\n")
    sent = run_cli(
        "send", "welcome", "--to", "me@example.com", "--context", str(context), settings=settings
    )
    assert sent.returncode == 0, sent.stderr
    request_id = sent.stdout.strip()
    (message,) = smtp_server.wait_for(1)
    assert request_id in str(message.message["Message-ID"])
    daemon.wait_for_counts(sent=1)
    human = run_cli("status", settings=settings)
    assert human.returncode == 0 and "sent" in human.stdout
    report = orjson.loads(run_cli("status", "--json", settings=settings).stdout)
    assert report["counts"] == {
        "queued": 0,
        "retry": 0,
        "sending": 0,
        "sent": 1,
        "dead": 0,
        "rejected": 0,
    }
    assert daemon.stop() == 0


def test_run_with_the_intake_address_taken_fails_in_one_line(tmp_path: Path) -> None:
    with zmq.Context() as context, context.socket(zmq.PULL) as taken:
        port = taken.bind_to_random_port("tcp://127.0.0.1")
        settings = write_settings(tmp_path, 1025, intake={"bind": f"tcp://127.0.0.1:{port}"})
        assert_one_line_error(run_cli("run", settings=settings), "intake.bind: cannot bind")


def test_run_without_a_templates_folder_fails_in_one_line(tmp_path: Path) -> None:
    settings = write_settings(tmp_path, 1025, templates={"dir": "missing"})
    assert_one_line_error(run_cli("run", settings=settings), "templates.dir:")

"""`dispatcher.testing`: an app's tests see what it enqueued, rendered with the real templates,
with no daemon running and nothing sent."""

from email.message import EmailMessage
from pathlib import Path

import pytest

import dispatcher
from dispatcher.errors import InvalidRequest, TemplateError
from dispatcher.testing import Outbox, capture
from tests.daemon import write_settings

pytestmark = pytest.mark.usefixtures("fresh_client")


@pytest.fixture(autouse=True)
def no_daemon(tmp_path: Path) -> None:
    """Settings whose sockets nobody listens on: a capture must never need them."""
    dispatcher.configure(write_settings(tmp_path, smtp_port=9))


def test_the_fixture_captures_every_kind_rendered(dispatcher_outbox: Outbox) -> None:
    dispatcher.enqueue_email(
        "welcome",
        to="Ada <ada@example.com>",
        cc="boss@example.com",
        context={"name": "Ada", "activate_url": "https://example.com/a/1"},
        attachments=[("terms.txt", b"Be nice.")],
    )
    dispatcher.enqueue_message(
        to="bob@example.com", subject="Receipt", html="<p>Paid: <b>5</b></p>"
    )
    raw = EmailMessage()
    raw["From"], raw["To"], raw["Subject"] = "app@example.com", "carol@example.com", "Built"
    raw.set_content("Built by the app.")
    dispatcher.enqueue_raw(raw)

    welcome, receipt, built = dispatcher_outbox
    assert welcome.template == "welcome" and welcome.context["name"] == "Ada"
    assert welcome.subject == "Welcome to Example, Ada!"
    assert welcome.to == ["ada@example.com"] and welcome.cc == ["boss@example.com"]
    assert welcome.recipients == ["ada@example.com", "boss@example.com"]
    assert welcome.from_ == "noreply@example.com"
    assert welcome.text is not None and "https://example.com/a/1" in welcome.text
    assert welcome.html is not None and 'href="https://example.com/a/1"' in welcome.html
    assert [(a.filename, a.content) for a in welcome.attachments] == [("terms.txt", b"Be nice.")]
    assert receipt.template is None and receipt.text == "Paid: 5\n"
    assert built.subject == "Built" and built.text == "Built by the app.\n"
    assert built.message["Message-ID"]


def test_capture_refuses_what_the_client_and_the_daemon_would() -> None:
    with capture() as outbox:
        with pytest.raises(InvalidRequest, match="not a valid address"):
            dispatcher.enqueue_message(to="nobody", subject="s", text="t")
        with pytest.raises(TemplateError, match="'activate_url' is undefined"):
            dispatcher.enqueue_email("welcome", to="a@example.com", context={"name": "A"})
    assert list(outbox) == []


def test_capture_ends_with_its_block(tmp_path: Path) -> None:
    with capture() as outbox:
        dispatcher.enqueue_message(to="a@example.com", subject="Inside", text="t")
    client = dispatcher.client.default_client()
    assert client._enqueue.__qualname__ == "Client._enqueue"  # the real one is back
    assert [m.subject for m in outbox] == ["Inside"]


def test_capture_applies_the_staging_redirect(tmp_path: Path) -> None:
    settings = write_settings(tmp_path, 9, mail={"redirect_to": ["qa@example.net"]})
    dispatcher.configure(settings)
    with capture() as outbox:
        dispatcher.enqueue_message(to="ada@customer.org", subject="Hi", text="t")
    (mail,) = outbox
    assert mail.recipients == ["qa@example.net"]
    assert mail.message["X-Original-To"] == "ada@customer.org"


def test_the_plugin_loads_by_its_entry_point_and_by_pytest_plugins(tmp_path: Path) -> None:
    """A user's own test run, in a process of its own (plugin loading is what is tested)."""
    import subprocess
    import sys

    (tmp_path / "test_signup.py").write_text(
        "import dispatcher\n"
        "def test_signup(dispatcher_outbox):\n"
        "    dispatcher.enqueue_message(to='a@example.com', subject='Hi', text='t')\n"
        "    assert [m.subject for m in dispatcher_outbox] == ['Hi']\n"
    )
    for conftest in ("", 'pytest_plugins = ["dispatcher.testing"]\n'):
        (tmp_path / "conftest.py").write_text(conftest)
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stdout + result.stderr

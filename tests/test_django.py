"""The Django email backend: Django's mail API through a real daemon to a real SMTP server, and
transactions that decide whether a mail goes at all."""

from collections.abc import Callable, Iterator
from email.mime.image import MIMEImage
from pathlib import Path

import pytest

import dispatcher
from dispatcher.errors import InvalidRequest
from dispatcher.testing import Outbox, capture
from tests.daemon import InProcessDaemon, write_settings
from tests.django_project import django_project  # noqa: F401  (fixture)
from tests.smtp_server import SmtpServer

RunDaemon = Callable[..., InProcessDaemon]
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)

pytestmark = pytest.mark.usefixtures("django_project", "fresh_client")


@pytest.fixture
def daemon(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> Iterator[InProcessDaemon]:
    """A daemon the backend hands mail to: the default client, as without DISPATCHER_SETTINGS."""
    from django.test import override_settings

    running = run_daemon(write_settings(tmp_path, smtp_server.port))
    dispatcher.configure(running.settings_path)
    with override_settings(DISPATCHER_SETTINGS=None):
        yield running


@pytest.fixture
def outbox() -> Iterator[Outbox]:
    from django.test import override_settings

    with override_settings(DISPATCHER_SETTINGS=None), capture() as captured:
        yield captured


def test_djangos_mail_api_is_delivered_with_the_right_parts(
    daemon: InProcessDaemon, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    from django.contrib.auth.forms import PasswordResetForm
    from django.contrib.auth.models import User
    from django.core.mail import EmailMultiAlternatives, mail_admins, mail_managers, send_mail

    assert send_mail("Plain", "Just text.", None, ["ada@example.com"]) == 1

    report = tmp_path / "report.csv"
    report.write_bytes(b"month,total\nmay,12\n")
    rich = EmailMultiAlternatives(
        "Rich", "Text part.", "Billing <billing@example.com>", ["bob@example.com"],
        bcc=["audit@example.com"], reply_to=["help@example.com"], headers={"X-Campaign": "may"},
    )  # fmt: skip
    rich.attach_alternative('<p>HTML part <img src="cid:logo"></p>', "text/html")
    rich.attach("notes.txt", "Some notes.", "text/plain")
    rich.attach_file(str(report))
    logo = MIMEImage(PNG)
    logo.add_header("Content-ID", "<logo>")
    logo.add_header("Content-Disposition", "inline", filename="logo.png")
    rich.attach(logo)
    assert rich.send() == 1

    mail_admins("Disk full", "On db1.")
    mail_managers("New order", "Order 42.", html_message="<p>Order <b>42</b></p>")

    User.objects.create_user("carol", "carol@example.com", "pw")
    form = PasswordResetForm({"email": "carol@example.com"})
    assert form.is_valid()
    form.save(
        domain_override="shop.example.com",
        use_https=True,
        html_email_template_name="registration/password_reset_email_body.html",
    )
    assert dispatcher.flush(10)
    received = {m.message["Subject"]: m for m in smtp_server.wait_for(5, timeout=30)}
    daemon.wait_for_counts(sent=5)

    plain = received["Plain"]
    assert plain.envelope_from == "shop@example.com"
    assert plain.message.get_content_type() == "text/plain"
    assert plain.message.get_content().strip() == "Just text."

    mail = received["Rich"]
    assert set(mail.rcpt_tos) == {"bob@example.com", "audit@example.com"}
    assert b"audit@example.com" not in mail.data
    assert mail.message["Reply-To"] == "help@example.com"
    assert mail.message["X-Campaign"] == "may"
    html = mail.message.get_body(("html",))
    assert html is not None and "cid:logo" in html.get_content()
    files = {part.get_filename(): part for part in mail.message.iter_attachments()}
    # A text file travels with CRLF line ends, as with Django's SMTP backend.
    assert files["report.csv"].get_content().splitlines() == ["month,total", "may,12"]
    assert files["notes.txt"].get_content() == "Some notes."
    assert files["logo.png"]["Content-ID"] == "<logo>"
    assert files["logo.png"].get_content() == PNG

    admins = received["[Django] Disk full"]
    assert admins.rcpt_tos == ("ops@example.com",) and admins.envelope_from == "alerts@example.com"
    managers = received["[Django] New order"].message.get_body(("html",))
    assert managers is not None and "<b>42</b>" in managers.get_content()

    reset = received["Password reset on shop.example.com"]
    assert reset.rcpt_tos == ("carol@example.com",)
    text, html = reset.message.get_body(("plain",)), reset.message.get_body(("html",))
    assert text is not None and "https://shop.example.com/reset/" in text.get_content()
    assert html is not None and "Choose a new password" in html.get_content()


def test_send_mass_mail_and_fail_silently_count_as_django_says(outbox: Outbox) -> None:
    from django.core.mail import send_mail, send_mass_mail

    messages = [
        ("One", "1", None, ["a@example.com"]),
        ("Two", "2", None, ["b@example.com", "c@example.com"]),
        ("None", "3", None, []),  # no recipients: skipped, as Django's SMTP backend does
    ]
    assert send_mass_mail(messages) == 2
    assert [m.subject for m in outbox] == ["One", "Two"]
    assert outbox[1].recipients == ["b@example.com", "c@example.com"]

    # Django accepts a single-label domain; the dispatcher never could send to it.
    assert send_mail("Bad", "x", None, ["root@localhost"], fail_silently=True) == 0
    with pytest.raises(InvalidRequest, match="not a valid address"):
        send_mail("Bad", "x", None, ["root@localhost"])
    with pytest.raises(InvalidRequest, match="control character"):
        send_mail("=?utf-8?q?hi=0ABcc:_x@example.com?=", "x", None, ["a@example.com"])
    assert len(outbox) == 2


def test_inside_atomic_mail_goes_on_commit_and_never_on_rollback(outbox: Outbox) -> None:
    from django.core.mail import send_mail
    from django.db import transaction

    from dispatcher.django import enqueue_after_commit

    with pytest.raises(RuntimeError), transaction.atomic():
        send_mail("Rolled back", "x", None, ["a@example.com"])
        enqueue_after_commit(
            "welcome", to="a@example.com", context={"name": "A", "activate_url": "u"}
        )
        raise RuntimeError("the signup failed")
    assert list(outbox) == []

    with transaction.atomic():
        send_mail("Committed", "x", None, ["a@example.com"])
        with pytest.raises(RuntimeError), transaction.atomic():  # a savepoint that rolls back
            send_mail("Savepoint rolled back", "x", None, ["a@example.com"])
            raise RuntimeError
        request_id = enqueue_after_commit(
            "welcome", to="a@example.com", context={"name": "Ada", "activate_url": "u"}
        )
        assert list(outbox) == []  # nothing before the commit
    assert [m.subject for m in outbox] == ["Committed", "Welcome to Example, Ada!"]
    assert outbox[1].id == request_id


def test_a_mail_that_can_never_be_sent_fails_in_the_atomic_block(outbox: Outbox) -> None:
    from django.db import transaction

    from dispatcher.django import enqueue_after_commit

    with pytest.raises(InvalidRequest, match="at least one recipient"), transaction.atomic():
        enqueue_after_commit("welcome", to=[], context={})
    assert list(outbox) == []


def test_on_commit_can_be_turned_off(outbox: Outbox) -> None:
    from django.core.mail import send_mail
    from django.db import transaction
    from django.test import override_settings

    with (
        override_settings(DISPATCHER_ON_COMMIT=False),
        pytest.raises(RuntimeError),
        transaction.atomic(),
    ):
        send_mail("At once", "x", None, ["a@example.com"])
        assert [m.subject for m in outbox] == ["At once"]
        raise RuntimeError


def test_dispatcher_settings_can_come_from_a_django_setting(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    from django.core.mail import send_mail
    from django.test import override_settings

    import dispatcher.django

    running = run_daemon(write_settings(tmp_path, smtp_server.port))
    with override_settings(DISPATCHER_SETTINGS=str(running.settings_path)):
        assert send_mail("Configured by Django", "x", None, ["a@example.com"]) == 1
        client = dispatcher.django.client()
        assert client.settings.source == running.settings_path.resolve()
        assert client.flush(10)
        client.close()
    (received,) = smtp_server.wait_for(1, timeout=30)
    assert received.message["Subject"] == "Configured by Django"

"""Mail without a template (`enqueue_message`) and mail the app built (`enqueue_raw`): checked at
once, delivered by a real daemon to a real SMTP server, and the staging redirect of both."""

from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import pytest

import dispatcher
from dispatcher import raw, wire
from dispatcher.errors import InvalidRequest, RequestTooLarge
from dispatcher.message import Redirect, compose_raw, render_request
from dispatcher.render import Renderer
from dispatcher.settings import MailSettings
from tests.daemon import InProcessDaemon, write_settings
from tests.smtp_server import SmtpServer

RunDaemon = Callable[..., InProcessDaemon]
ROOT = Path(__file__).parents[1]
RENDERER = Renderer(ROOT / "templates", "Shop <shop@example.com>")

pytestmark = pytest.mark.usefixtures("fresh_client")


HEADER = b"From: a@example.com\r\nTo: b@example.com\r\n"


def built(**headers: str) -> EmailMessage:
    message = EmailMessage()
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content("Hello from the app.\n")
    return message


def rendered(fields: dict[str, object], redirect: Redirect | None = None) -> bytes:
    request = wire.validate(orjson_roundtrip(fields))
    return render_request(RENDERER, request, redirect).data


def orjson_roundtrip(fields: dict[str, object]) -> dict[str, object]:
    """As the spool stores a request and the render worker reads it back."""
    import orjson

    return dict(orjson.loads(wire.encode(fields)))


def raw_fields(raw: bytes, **extra: object) -> dict[str, object]:
    return wire.request_fields(None, wire.RawOptions(raw=raw, **extra))  # type: ignore[typeddict-item]


# -- delivered end to end ------------------------------------------------------------------


def test_message_and_raw_are_delivered_as_asked(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    daemon = run_daemon(write_settings(tmp_path, smtp_server.port))
    dispatcher.configure(daemon.settings_path)
    dispatcher.enqueue_message(
        to="Ada <ada@example.com>",
        subject="Your invoice",
        html="<p>Total: <b>12 EUR</b>, <a href='https://example.com/i/1'>view it</a></p>",
        attachments=[("invoice.csv", b"total,12\n")],
    )
    message = built(From="Billing <billing@example.com>", To="bob@example.com", Subject="Raw")
    message["Bcc"] = "audit@example.com"
    dispatcher.enqueue_raw(message)
    assert dispatcher.flush(10)
    received = {m.message["Subject"]: m for m in smtp_server.wait_for(2, timeout=30)}
    daemon.wait_for_counts(sent=2)

    html_mail = received["Your invoice"].message
    assert html_mail.get_content_type() == "multipart/mixed"
    text = html_mail.get_body(("plain",))
    assert text is not None
    assert "Total: 12 EUR, view it (https://example.com/i/1)" in text.get_content()
    html = html_mail.get_body(("html",))
    assert html is not None and "<b>12 EUR</b>" in html.get_content()
    (attachment,) = html_mail.iter_attachments()
    assert attachment.get_filename() == "invoice.csv"

    raw_mail = received["Raw"]
    assert raw_mail.envelope_from == "billing@example.com"
    assert set(raw_mail.rcpt_tos) == {"bob@example.com", "audit@example.com"}
    assert b"audit@example.com" not in raw_mail.data  # Bcc is never in the headers
    assert raw_mail.message["Message-ID"] and raw_mail.message["Date"]


def test_a_daemon_rejects_a_foreign_frame_with_an_injected_raw_header(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    """What a sender in another language could push: refused at intake, with the reason."""
    import zmq

    daemon = run_daemon(write_settings(tmp_path, smtp_server.port))
    bad = HEADER + b"Subject: x\nBcc: c@example.com\r\n\r\nhi\r\n"
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.connect(daemon.settings.intake.bind)
    push.send(wire._json({"v": 1, "raw": raw.encode_raw(bad)}))
    daemon.wait_for_log("rejected: raw: mixed or bare CR/LF line endings")
    daemon.wait_for_counts(rejected=1)
    push.close(linger=1000)
    context.term()


# -- checked at once -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"to": "a@example.com", "subject": "Hi"}, "needs text or html"),
        ({"to": "a@example.com", "text": "x"}, "subject: a subject"),
        ({"to": "a@example.com", "subject": "Hi\r\nBcc: x@example.com", "text": "x"}, "control"),
        ({"to": "a@example.com", "subject": "=?utf-8?q?=0A?=", "text": "x"}, "encoded words"),
        ({"to": "a@example.com", "subject": "Hi", "text": "x", "context": {"a": 1}}, "context"),
        ({"subject": "Hi", "text": "x"}, "to: at least one recipient"),
        ({"to": "a@example.com", "subject": "Hi", "text": 3}, "text: expected a string"),
    ],
)
def test_enqueue_message_refuses_what_can_never_be_sent(
    options: dict[str, object], error: str
) -> None:
    with pytest.raises(InvalidRequest, match=error):
        wire.encode(wire.request_fields(None, options))  # type: ignore[arg-type]


def test_enqueue_message_keeps_the_limits() -> None:
    huge = "x" * (wire.MAX_BODY_CHARS + 1)
    with pytest.raises(RequestTooLarge, match="at most"):
        wire.encode(wire.request_fields(None, {"to": "a@b.com", "subject": "s", "text": huge}))
    too_many = [f"u{i}@example.com" for i in range(51)]
    with pytest.raises(InvalidRequest, match="at most 50 recipients"):
        wire.encode(wire.request_fields(None, {"to": too_many, "subject": "s", "text": "t"}))


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (HEADER + b"Subject: x\nBcc: evil@example.com\r\n\r\nbody", "bare CR/LF"),
        (HEADER + b"Subject: x\rBcc: evil@example.com\r\n\r\nbody", "bare CR/LF"),
        (HEADER + b"Subject: =?utf-8?q?x=0ABcc:_evil@example.com?=\r\n\r\nbody", "control"),
        (HEADER + b"Subject: =?utf-8?b?eApCY2M6IGV2aWxAZXhhbXBsZS5jb20=?=\r\n\r\nb", "control"),
        (HEADER + b"To: c@example.com\r\n\r\nbody", "more than one to"),
        (HEADER + b"Subject: caf\xc3\xa9\r\n\r\nbody", "printable ASCII"),
        (HEADER + b" \r\nSubject: x\r\n\r\nbody", "continuation line"),
        (HEADER + b"Subject : x\r\n\r\nbody", "expected 'Name: value'"),
        (b"From: a@example.com\r\nTo: alice@example.org)<bob@example.org>\r\n\r\nb", "addresses"),
        (b"From: a@example.com\r\nTo: b@example.com\r\nSubject: no end", "no empty line"),
        (HEADER + b"Subject: " + b"x" * 1000 + b"\r\n\r\nbody", "longer than 998"),
        (HEADER + b"Message-ID: nope\r\n\r\nbody", "message-id"),
        (b"From: a@example.com\r\nSubject: x\r\n\r\nbody", "no To, Cc or Bcc"),
        (b"From: a@example.com\r\nTo: a@[127.0.0.1]\r\n\r\nbody", "not a valid address"),
    ],
)
def test_enqueue_raw_refuses_a_header_block_a_reader_could_misread(data: bytes, error: str) -> None:
    with pytest.raises(InvalidRequest, match=error):
        wire.validate(orjson_roundtrip(raw_fields(data)))


def test_enqueue_raw_refuses_an_injected_email_message_before_sending() -> None:
    """Python 3.11.7's email package writes a header with a newline as two header lines."""
    message = built(From="a@example.com", To="b@example.com")
    message["Subject"] = "=?utf-8?q?hi=0D=0ABcc=3A_x=40example.com?="
    with pytest.raises(InvalidRequest, match="control character"):
        dispatcher.Client(dispatcher.client.load_settings(environ={})).enqueue_raw(message)


def test_enqueue_raw_refuses_what_is_not_a_message() -> None:
    client = dispatcher.Client(dispatcher.client.load_settings(environ={}))
    with pytest.raises(InvalidRequest, match="EmailMessage or bytes"):
        client.enqueue_raw("From: a@example.com")  # type: ignore[arg-type]
    with pytest.raises(RequestTooLarge):
        client.enqueue_raw(HEADER + b"\r\n" + b"x" * (3 * 1024 * 1024))


def test_a_request_has_one_kind() -> None:
    data = built(From="a@example.com", To="b@example.com").as_bytes()
    fields = {"v": 1, "template": "welcome", "to": "a@example.com", "raw": raw.encode_raw(data)}
    with pytest.raises(InvalidRequest, match="raw: not allowed in a request with a template"):
        wire.check(fields, 100)
    fields = {"v": 1, "raw": raw.encode_raw(data), "subject": "x"}
    with pytest.raises(InvalidRequest, match="subject: not allowed in a request with raw"):
        wire.validate(fields)


# -- what the message holds ----------------------------------------------------------------


def test_raw_gets_from_date_and_message_id_when_missing_and_keeps_its_own() -> None:
    bare = b"To: b@example.com\nSubject: plain LF\n\nbody\n"
    data = rendered(raw_fields(bare))
    head = data.split(b"\r\n\r\n")[0]
    assert head.startswith(b"From: Shop <shop@example.com>\r\n")
    assert b"\r\nDate: " in head and b"\r\nMessage-ID: <" in head
    own = b"From: a@example.com\r\nTo: b@example.com\r\nMessage-ID: <mine@example.com>\r\n\r\nb"
    request = wire.validate(orjson_roundtrip(raw_fields(own)))
    message = compose_raw(request, RENDERER.mail_from)
    assert message.message_id == "<mine@example.com>"
    assert message.data.count(b"Message-ID") == 1


def test_raw_envelope_is_the_callers_when_given() -> None:
    data = built(From="a@example.com", To="b@example.com", Cc="c@example.com").as_bytes()
    fields = raw_fields(data, recipients=["d@example.com"], envelope_from="bounce@example.com")
    request = wire.validate(orjson_roundtrip(fields))
    message = compose_raw(request, RENDERER.mail_from)
    assert message.recipients == ("d@example.com",)
    assert message.envelope_from == "bounce@example.com"


# -- the staging redirect ------------------------------------------------------------------

REDIRECT = Redirect.of(
    MailSettings(redirect_to=("qa@example.net",), redirect_except=("example.com",))
)


def test_redirect_rewrites_every_recipient_but_the_kept_domains() -> None:
    fields = wire.request_fields(
        "welcome",
        {
            "to": ["ada@customer.org", "dev@example.com"],
            "bcc": "boss@customer.org",
            "context": {"name": "Ada", "activate_url": "https://example.com/a"},
        },
    )
    request = wire.validate(orjson_roundtrip(fields))
    message = render_request(RENDERER, request, REDIRECT)
    assert set(message.recipients) == {"dev@example.com", "qa@example.net"}
    head = message.data.split(b"\r\n\r\n")[0]
    assert b"To: dev@example.com, qa@example.net\r\n" in head
    assert b"X-Original-To: ada@customer.org, boss@customer.org\r\n" in head


def test_redirect_applies_to_raw_messages_and_leaves_kept_mail_alone() -> None:
    data = built(From="a@example.com", To="ada@customer.org", Cc="dev@example.com").as_bytes()
    message = render_request(RENDERER, wire.validate(orjson_roundtrip(raw_fields(data))), REDIRECT)
    assert set(message.recipients) == {"dev@example.com", "qa@example.net"}
    head = message.data.split(b"\r\n\r\n")[0]
    assert b"ada@customer.org" not in head.replace(b"X-Original-To: ada@customer.org", b"")
    assert b"To: dev@example.com, qa@example.net\r\n" in head
    kept = built(From="a@example.com", To="dev@sub.example.com").as_bytes()
    request = wire.validate(orjson_roundtrip(raw_fields(kept)))
    unchanged = render_request(RENDERER, request, REDIRECT)
    assert unchanged.recipients == ("dev@sub.example.com",)
    assert b"X-Original-To" not in unchanged.data


def test_redirect_settings_are_checked(tmp_path: Path) -> None:
    from dispatcher.errors import SettingsError
    from dispatcher.settings import load_settings

    with pytest.raises(SettingsError, match=r"mail.redirect_to\[0\]"):
        load_settings(overrides={"mail": {"redirect_to": ["not an address"]}}, environ={})
    with pytest.raises(SettingsError, match=r"mail\.redirect_except: only meaningful"):
        load_settings(overrides={"mail": {"redirect_except": ["example.com"]}}, environ={})


@pytest.mark.parametrize(
    "fields",
    [
        {"to": "a@example.com", "subject": "S", "html": "<p>h</p>", "cc": "c@example.com"},
        {"raw": HEADER + b"Subject: s\r\n\r\nbody", "envelope_from": "e@example.com"},
    ],
)
def test_the_spool_form_of_each_kind_reads_back_the_same(fields: dict[str, object]) -> None:
    """`to_fields` is what tools store (`Incoming.of`); it must validate to the same request."""
    from dispatcher.spool.records import Incoming

    if "raw" in fields:
        request = wire.validate(orjson_roundtrip(raw_fields(**fields)))  # type: ignore[arg-type]
    else:
        request = wire.validate(orjson_roundtrip(wire.request_fields(None, fields)))  # type: ignore[arg-type]
    assert wire.validate(wire.to_fields(request)) == request
    assert Incoming.of(request).template == f"({request.kind})"

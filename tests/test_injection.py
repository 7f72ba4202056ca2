"""Header and address injection: a corpus of attempts, refused at the client, at the daemon for
foreign senders, and end to end never producing an extra header or recipient at the SMTP server.
"""

import email.policy
import sys
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq

from dispatcher import wire
from dispatcher.compose import check_headers
from dispatcher.errors import InvalidRequest, TemplateError
from dispatcher.render import Renderer
from tests.daemon import DaemonProcess, write_settings
from tests.smtp_server import SmtpServer, free_port

StartDaemon = Callable[[Path], DaemonProcess]
EVIL = "evil@evil.example"
CVE_2024_6923 = f"A \u2603 subject=?UTF-8?Q?=0A?=Bcc: {EVIL}"
CONTEXT = {"name": "Ada", "activate_url": "https://example.com/a"}

# Each is meant to smuggle a second recipient or a header line in through one address.
ADDRESS_ATTEMPTS = [
    f"victim@example.com\r\nBcc: {EVIL}",
    f"victim@example.com\nBcc: {EVIL}",
    f"victim@example.com\rBcc: {EVIL}",
    f"victim@example.com, {EVIL}",
    f"victim@example.com; {EVIL}",
    f"Victim <victim@example.com>, Evil <{EVIL}>",
    f"victim@example.com>\r\nBcc: <{EVIL}",
    f"=?UTF-8?Q?=0A?=Bcc: {EVIL} <victim@example.com>",
    f"=?UTF-8?Q?Evil=0D=0ABcc:_{EVIL}?= <victim@example.com>",
    f'"Victim\r\nBcc: {EVIL}" <victim@example.com>',
    f"Victim\u2028Bcc: {EVIL} <victim@example.com>",
    f"victim@example.com\x00{EVIL}",
    f"victim@example.com\x85Bcc: {EVIL}",
    f"alice@example.com)<{EVIL}>",
    f"<{EVIL}>victim@example.com",
    f"victim@example.com%0ABcc:{EVIL}",
    f"{EVIL} (victim@example.com)",
    f"victim@example.com\tBcc: {EVIL}",
]
HEADER_VALUE_ATTEMPTS = [
    f"x\r\nBcc: {EVIL}",
    f"x\nBcc: {EVIL}",
    f"=?UTF-8?Q?=0A?=Bcc: {EVIL}",
    CVE_2024_6923,
    f"x\u2028Bcc: {EVIL}",
    "x\x00y",
    f"x\x0bBcc: {EVIL}",
]
HEADER_NAME_ATTEMPTS = ["Bcc", "bcc", "To", "Cc", "Reply-To", "From", "Sender", "Subject",
                        "Return-Path", "Content-Type", "Message-ID", "X-A\r\nBcc", "X-A: x\r\nBcc",
                        "X A", "", "X-A:"]  # fmt: skip
SUBJECT_ATTEMPTS = [
    f"Ada\r\nBcc: {EVIL}",
    f"Ada\nBcc: {EVIL}",
    f"=?UTF-8?Q?=0A?=Bcc: {EVIL}",
    CVE_2024_6923,
    f"Ada\u2028Bcc: {EVIL}",
    f"Ada\x00Bcc: {EVIL}",
    f"Ada\x85Bcc: {EVIL}",
]


def corpus() -> list[tuple[str, dict[str, Any]]]:
    """(label, request fields beyond template/to) for every attempt in every field."""
    cases: list[tuple[str, dict[str, Any]]] = []
    for i, text in enumerate(ADDRESS_ATTEMPTS):
        cases.append((f"to-{i}", {"to": text}))
        cases.append((f"to-list-{i}", {"to": ["ok@example.com", text]}))
        for name in ("cc", "bcc", "reply_to", "sender"):
            cases.append((f"{name}-{i}", {name: text}))
    for i, text in enumerate(HEADER_VALUE_ATTEMPTS):
        cases.append((f"header-value-{i}", {"headers": {"X-Note": text}}))
        attachment = {"filename": f"a{text}.txt", "data": "eA=="}
        cases.append((f"filename-{i}", {"attachments": [attachment]}))
    for i, name in enumerate(HEADER_NAME_ATTEMPTS):
        cases.append((f"header-name-{i}", {"headers": {name: EVIL}}))
    return cases


CORPUS = corpus()


@pytest.mark.parametrize(("label", "fields"), CORPUS, ids=[c[0] for c in CORPUS])
def test_client_refuses_every_attempt_at_enqueue(label: str, fields: dict[str, Any]) -> None:
    options = {"to": "victim@example.com", "context": CONTEXT, **fields}
    with pytest.raises(ValueError):
        wire.encode(wire.request_fields("welcome", options))


@pytest.mark.parametrize(("label", "fields"), CORPUS, ids=[c[0] for c in CORPUS])
def test_daemon_validation_refuses_every_attempt_from_a_foreign_sender(
    label: str, fields: dict[str, Any]
) -> None:
    frame = orjson.dumps({"v": 1, "template": "welcome", "to": "victim@example.com", **fields})
    with pytest.raises(InvalidRequest):
        wire.decode(frame)


def headers_of(data: bytes) -> list[str]:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    return [name.lower() for name in parsed]


@pytest.mark.parametrize("name", SUBJECT_ATTEMPTS)
def test_context_reaching_the_subject_is_refused_or_stays_one_line(
    tmp_path: Path, name: str
) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "subject.txt").write_text("Hi {{ name }}")
    (tmp_path / "t" / "body.txt").write_text("Hello")
    renderer = Renderer(tmp_path, "Shop <shop@example.com>")
    request = wire.validate({"v": 1, "template": "t", "to": "victim@example.com",
                             "context": {"name": name}})  # fmt: skip
    try:
        message = renderer.render(request)
    except TemplateError as exc:
        assert "subject" in str(exc)
        return
    assert message.recipients == ("victim@example.com",)
    assert "\n" not in message.subject and "\r" not in message.subject
    assert sorted(headers_of(message.data)) == sorted(
        "from to subject date message-id mime-version content-type content-transfer-encoding"
        .split()
    )  # fmt: skip


def test_cve_2024_6923_reproduces_here_and_the_parse_back_check_catches_it() -> None:
    """On Python < 3.11.10 the stdlib writes an encoded newline as a real `Bcc:` line."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["Subject"] = CVE_2024_6923
    msg["Message-ID"] = "<1@example.com>"
    msg.set_content("body")
    data = msg.as_bytes()
    vulnerable = b"\nBcc: " + EVIL.encode() in data
    if sys.version_info[:3] < (3, 11, 10):
        assert vulnerable, "expected this Python to reproduce CVE-2024-6923"
    if vulnerable:
        with pytest.raises(TemplateError, match=r"header check failed: unexpected \['bcc'\]"):
            check_headers(msg, data, "<1@example.com>")
    else:
        check_headers(msg, data, "<1@example.com>")


def test_no_attempt_reaches_the_smtp_server_as_a_header_or_recipient(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: StartDaemon
) -> None:
    """Foreign frames with every attempt, then context attempts that reach the subject, then
    one honest request: only the intended recipients get mail, with only our headers."""
    port = free_port()
    daemon = start_daemon(
        write_settings(tmp_path, smtp_server.port, intake={"bind": f"tcp://127.0.0.1:{port}"})
    )
    refused = [{"to": "victim@example.com", "context": CONTEXT, **f} for _, f in CORPUS]
    over_limit = [
        {"to": [f"u{i}@example.com" for i in range(wire.MAX_RECIPIENTS + 1)]},
        {"to": "victim@example.com", "context": {"x": "y" * wire.MAX_CONTEXT_BYTES}},
        {"to": "victim@example.com", "headers": {f"X-{i}": "1" for i in range(21)}},
        {"to": "victim@example.com", "attachments": [{"filename": "a", "data": ""}] * 11},
        {"to": "victim@example.com", "template": "../welcome"},
        {"to": "victim@example.com", "template": "_layouts"},
    ]
    subject_attempts = [{"to": "victim@example.com", "context": {**CONTEXT, "name": n}}
                        for n in SUBJECT_ATTEMPTS]  # fmt: skip
    honest = {"to": "ada@example.com", "context": CONTEXT}
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.linger = 5000
        push.connect(f"tcp://127.0.0.1:{port}")
        for fields in [*refused, *over_limit, *subject_attempts, honest]:
            push.send(orjson.dumps({"v": 1, "template": "welcome", **fields}))
    rejected = len(refused) + len(over_limit)
    counts = daemon.wait_for_counts(rejected=rejected, queued=0, retry=0, sending=0)
    assert counts["sent"] + counts["dead"] == len(subject_attempts) + 1
    messages = smtp_server.wait_for(counts["sent"])
    assert daemon.process.poll() is None
    for limit in ("at most 50 recipients", "at most 65536 bytes", "at most 20 are allowed",
                  "at most 10 are allowed", "is not a template name"):  # fmt: skip
        assert limit in daemon.log
    assert {r for m in messages for r in m.rcpt_tos} == {"victim@example.com", "ada@example.com"}
    for message in messages:
        assert "bcc" not in headers_of(message.data)
        assert EVIL not in str(message.message["To"]) and message.message["Cc"] is None
        assert len(message.message.get_all("Subject") or []) == 1
    assert any(m.rcpt_tos == ("ada@example.com",) for m in messages)
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("body", "context"),
    [
        ("{{ fmt.format(name) }}", {"fmt": "{0.__class__.__mro__}", "name": "x"}),
        ("{{ name.__class__.__mro__ }}", {"name": "x"}),
        ("{{ (name|attr('__class__')).__subclasses__() }}", {"name": "x"}),
    ],
)
def test_context_cannot_reach_python_internals_through_a_template(
    tmp_path: Path, body: str, context: dict[str, str]
) -> None:
    """Templates run sandboxed: attribute tricks on context values fail instead of leaking."""
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "subject.txt").write_text("Hi")
    (tmp_path / "t" / "body.txt").write_text(body)
    renderer = Renderer(tmp_path, "Shop <shop@example.com>")
    with pytest.raises(TemplateError, match=r"unsafe|undefined|SecurityError"):
        renderer.render_parts("t", context)

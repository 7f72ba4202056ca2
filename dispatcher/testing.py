"""Test doubles for an app's own tests: what it enqueues, captured and rendered, no daemon.

    from dispatcher.testing import capture

    with capture() as outbox:
        signup(client, "ada@example.com")          # calls enqueue_email(), Django's send_mail...
    assert outbox[0].subject == "Welcome, Ada"

Every request any `Client` of the process makes (the module functions, the Django backend,
`enqueue_after_commit`) is checked as the client checks it, rendered as the daemon would render
it (the real templates of the client's settings, `mail.from`, `mail.redirect_to`) and appended
to the outbox; nothing is sent. A template error raises in the test. With pytest, the
`dispatcher_outbox` fixture does the same for one test (the plugin registers itself; or list
`pytest_plugins = ["dispatcher.testing"]`).
"""

import contextlib
import email
import email.message
import email.policy
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from dispatcher import wire
from dispatcher.client import Client
from dispatcher.settings import Settings

if TYPE_CHECKING:  # imported when the first mail is captured: a pytest plugin loads this
    from dispatcher.compose import RenderedMessage
    from dispatcher.message import Redirect
    from dispatcher.render import Renderer


@dataclass(frozen=True, slots=True)
class CapturedMail:
    """One request as the daemon would have sent it."""

    id: str
    template: str | None  # None for `enqueue_message()` and `enqueue_raw()`
    context: dict[str, Any]
    subject: str
    from_: str
    to: list[str]  # the To header's addresses
    cc: list[str]
    recipients: list[str]  # the envelope: To, Cc and Bcc (after any redirect)
    text: str | None
    html: str | None
    attachments: list[wire.Attachment]  # files and inline parts, as the message holds them
    message: email.message.EmailMessage  # the whole message, parsed
    data: bytes  # the bytes SMTP DATA would carry


class Outbox(list[CapturedMail]):
    """The captured mail, oldest first."""


def _addresses(message: email.message.EmailMessage, name: str) -> list[str]:
    header: Any = message[name]
    return [] if header is None else [a.addr_spec for a in header.addresses]


def _captured(request: wire.Request, rendered: "RenderedMessage") -> CapturedMail:
    message = email.message_from_bytes(rendered.data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    text, html = message.get_body(("plain",)), message.get_body(("html",))
    attachments = [
        wire.Attachment(part.get_filename() or "", part.get_content_type(), _content(part))
        for part in message.iter_attachments()
    ]
    return CapturedMail(
        id=request.id,
        template=request.template,
        context=request.context,
        subject=str(message.get("Subject", "")),
        from_=", ".join(_addresses(message, "From")),
        to=_addresses(message, "To"),
        cc=_addresses(message, "Cc"),
        recipients=list(rendered.recipients),
        text=_text(text),
        html=_text(html),
        attachments=attachments,
        message=message,
        data=rendered.data,
    )


def _text(part: email.message.MIMEPart | None) -> str | None:
    """A text part as it was rendered: with `\n` line ends, not SMTP's CRLF."""
    return None if part is None else str(part.get_content()).replace("\r\n", "\n")


def _content(part: email.message.MIMEPart) -> bytes:
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


class _Capture:
    """Stands in for every client's hand-over while a `capture()` is open."""

    def __init__(self) -> None:
        self.outbox = Outbox()
        self.lock = threading.Lock()
        self.renderers: dict[Settings, tuple[Renderer, Redirect | None]] = {}

    def record(self, client: Client, fields: dict[str, Any]) -> str:
        frame = wire.encode(fields)  # what the client would refuse, refused here
        request = wire.validate(orjson.loads(frame))  # and what the daemon would
        from dispatcher.message import render_request

        renderer, redirect = self.renderer(client.settings)
        mail = _captured(request, render_request(renderer, request, redirect))
        with self.lock:
            self.outbox.append(mail)
        return request.id

    def renderer(self, settings: Settings) -> "tuple[Renderer, Redirect | None]":
        """One renderer per settings, as each daemon has its own."""
        from dispatcher.message import Redirect
        from dispatcher.render import Renderer

        with self.lock:
            found = self.renderers.get(settings)
            if found is None:
                renderer = Renderer(settings.templates.dir, settings.mail.from_)
                found = self.renderers[settings] = (renderer, Redirect.of(settings.mail))
            return found


@contextlib.contextmanager
def capture() -> Iterator[Outbox]:
    """Capture every request made in this process until the block ends; yields the outbox."""
    recorder = _Capture()
    saved = Client._enqueue, Client._enqueue_fields

    def enqueue(self: Client, template: str | None, options: Any) -> str:
        return recorder.record(self, wire.request_fields(template, options))

    def enqueue_fields(self: Client, fields: dict[str, Any]) -> str:
        return recorder.record(self, fields)

    Client._enqueue, Client._enqueue_fields = enqueue, enqueue_fields  # type: ignore[method-assign]
    try:
        yield recorder.outbox
    finally:
        Client._enqueue, Client._enqueue_fields = saved  # type: ignore[method-assign]


try:
    import pytest
except ImportError:  # capture() works without pytest
    pass
else:

    @pytest.fixture
    def dispatcher_outbox() -> Iterator[Outbox]:
        """The mail this test enqueued, rendered, none of it sent (see `capture()`)."""
        with capture() as outbox:
            yield outbox

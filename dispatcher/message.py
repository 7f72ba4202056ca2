"""Every kind of request to the message SMTP DATA carries, and the staging redirect.

A template renders through `Renderer`; a request with its own parts (`enqueue_message`) is
composed the same way, its text derived from the HTML as a template's is; a message the app
built (`enqueue_raw`) keeps its header block, less Bcc, plus what it lacks (From, Date,
Message-ID). `mail.redirect_to` rewrites the recipients of all three before that.
"""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from dispatcher import mime
from dispatcher.address import Address, parse_address
from dispatcher.compose import (
    Parts,
    RenderedMessage,
    ascii_addr_spec,
    check_headers,
    compose,
    message_id_for,
)
from dispatcher.errors import TemplateError
from dispatcher.render import Renderer, html_to_text
from dispatcher.settings import MailSettings
from dispatcher.styles import inline_css
from dispatcher.wire import Request

ORIGINAL_TO = "X-Original-To"


@dataclass(frozen=True, slots=True)
class Redirect:
    """`mail.redirect_to` and `mail.redirect_except`: on staging, every recipient becomes
    `to`, except those at `kept_domains` (or their subdomains)."""

    to: tuple[Address, ...]
    kept_domains: tuple[str, ...] = ()

    @classmethod
    def of(cls, mail: MailSettings) -> "Redirect | None":
        """The redirect the settings ask for; None when `mail.redirect_to` is empty."""
        if not mail.redirect_to:
            return None
        to = tuple(
            parse_address(text, f"mail.redirect_to[{i}]") for i, text in enumerate(mail.redirect_to)
        )
        return cls(to, tuple(domain.lower().strip(".") for domain in mail.redirect_except))

    def keeps(self, address: Address) -> bool:
        domain = address.addr_spec.rpartition("@")[2].lower()
        return any(domain == kept or domain.endswith("." + kept) for kept in self.kept_domains)

    def split(self, addresses: Sequence[Address]) -> tuple[list[Address], list[Address]]:
        """The addresses that still get their mail, and those redirected."""
        kept = [a for a in addresses if self.keeps(a)]
        return kept, [a for a in addresses if not self.keeps(a)]

    def apply(self, request: Request) -> Request:
        """A template or parts request with its recipients rewritten, the originals named in
        X-Original-To; unchanged when every recipient is kept."""
        moved = self.split((*request.to, *request.cc, *request.bcc))[1]
        if not moved:
            return request
        headers = {k: v for k, v in request.headers.items() if k.lower() != ORIGINAL_TO.lower()}
        headers[ORIGINAL_TO] = original_to(moved)
        return dataclasses.replace(
            request,
            to=(*self.split(request.to)[0], *self.to),
            cc=tuple(self.split(request.cc)[0]),
            bcc=tuple(self.split(request.bcc)[0]),
            headers=headers,
        )


def original_to(addresses: Sequence[Address]) -> str:
    return ", ".join(dict.fromkeys(ascii_addr_spec(a.addr_spec) for a in addresses))


def render_request(
    renderer: Renderer,
    request: Request,
    redirect: Redirect | None = None,
    now: datetime | None = None,
) -> RenderedMessage:
    """The message for any kind of request, rendered with `renderer`'s templates and sender."""
    if request.raw is not None:
        return compose_raw(request, renderer.mail_from, redirect, now)
    if redirect is not None:
        request = redirect.apply(request)
    if request.template is not None:
        return renderer.render(request, now)
    return compose(message_parts(request), request, request.sender or renderer.mail_from, now)


def message_parts(request: Request) -> Parts:
    """The parts of a request without a template: its HTML with the CSS inlined, and its text
    or, without one, the text derived from the HTML (as for a template without body.txt)."""
    assert request.subject is not None
    html = None if request.html is None else inline_css(request.html, "html")
    text = request.text if request.text is not None else html_to_text(html or "")
    return Parts(subject=request.subject, html=html, text=text)


def compose_raw(
    request: Request,
    mail_from: Address,
    redirect: Redirect | None = None,
    now: datetime | None = None,
) -> RenderedMessage:
    """A built message as sent: its own fields less Bcc, with From (`mail.from`), Date and
    Message-ID added when missing; envelope sender the request's, else Sender, else From."""
    message = request.raw
    assert message is not None
    found = message.addresses
    recipients, moved = list(request.to), list[Address]()
    if redirect is not None:
        recipients, moved = redirect.split(request.to)
    dropped = {"bcc", "to", "cc", ORIGINAL_TO.lower()} if moved else {"bcc"}
    fields = [
        mime.Field(f.name, f.lines.decode("ascii")) for f in message.fields if f.name not in dropped
    ]
    try:
        if not found["from"]:
            fields.insert(0, mime.address_field("From", [_ascii(mail_from)]))
        if moved and redirect is not None:
            shown = [a for a in (*found["to"], *found["cc"]) if redirect.keeps(a)]
            recipients += redirect.to
            fields.append(mime.address_field("To", [_ascii(a) for a in (*shown, *redirect.to)]))
            fields.append(mime.text_field(ORIGINAL_TO, original_to(moved), encode_long_words=False))
        sender = request.envelope_from or (found["sender"] or found["from"] or (mail_from,))[0]
        envelope_from = ascii_addr_spec(sender.addr_spec)
        message_id = message.value("message-id") or message_id_for(request.id, envelope_from)
        if message.value("message-id") is None:
            fields.append(mime.literal_field("Message-ID", message_id))
        if message.value("date") is None:
            fields.append(mime.date_field(now or datetime.now(UTC)))
    except ValueError as exc:
        raise TemplateError(f"cannot build the message: {exc}") from exc
    data = mime.message(fields, mime.Part((), message.body))
    check_headers([f.name for f in fields], data, message_id)
    envelope = dict.fromkeys(ascii_addr_spec(a.addr_spec) for a in recipients)
    subject = message.value("subject") or ""
    return RenderedMessage(message_id, envelope_from, tuple(envelope), subject, data)


def _ascii(address: Address) -> Address:
    return Address(address.display_name, ascii_addr_spec(address.addr_spec))

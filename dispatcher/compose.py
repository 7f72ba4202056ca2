"""A rendered template and its request to the RFC 5322 bytes that SMTP DATA carries.

`dispatcher.mime` writes the bytes; the header block is then scanned back and compared with
what was meant (the check that catches CVE-2024-6923 of the stdlib builder).
"""

import functools
import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from dispatcher import mime
from dispatcher.address import Address
from dispatcher.errors import TemplateError
from dispatcher.inline import missing_cids
from dispatcher.wire import Attachment, Request

# A request id may hold ':', which is not atext and makes Python cut the Message-ID short.
_NOT_ATEXT = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]")
_BLANK_LINE = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")  # where a header block ends
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_MIME_VERSION = mime.literal_field("MIME-Version", "1.0")
_ONE_CLICK = mime.literal_field("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")  # RFC 8058


@dataclass(frozen=True, slots=True)
class Parts:
    """What a template renders to, before any MIME: also what the preview UI shows."""

    subject: str  # one line, not HTML-escaped
    html: str | None  # None when the template has no body.html
    text: str  # body.txt rendered, or derived from the HTML when body.txt is missing
    inline: tuple[Attachment, ...] = ()  # images the HTML shows by `cid:`, each once


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    """A message ready for SMTP: the same bytes and Message-ID on every retry."""

    message_id: str
    envelope_from: str
    recipients: tuple[str, ...]
    subject: str
    data: bytes

    def __reduce__(self) -> tuple[type["RenderedMessage"], tuple[object, ...]]:
        """Pickled as its fields, for the render workers' results: a frozen slotted dataclass's
        own pickling calls `dataclasses.fields()` for every object, both ways."""
        fields = (self.message_id, self.envelope_from, self.recipients, self.subject, self.data)
        return (RenderedMessage, fields)


def compose(
    parts: Parts, request: Request, sender: Address, now: datetime | None = None
) -> RenderedMessage:
    """The full message: header fields, body parts, a Message-ID derived from the request id."""
    envelope_from = ascii_addr_spec(sender.addr_spec)
    message_id = message_id_for(request.id, envelope_from)
    moment = now or datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        fields = _fields(request, parts, sender, message_id, moment)
        body = _body(parts, request, _boundary_seed(message_id, parts, request))
        data = mime.message(fields, body)
    except ValueError as exc:  # mime refuses what it cannot write correctly
        raise TemplateError(f"cannot build the message: {exc}") from exc
    check_headers([f.name for f in (*fields, *body.fields)], data, message_id)
    recipients = dict.fromkeys(ascii_addr_spec(a) for a in request.recipients)
    return RenderedMessage(message_id, envelope_from, tuple(recipients), parts.subject, data)


def message_id_for(request_id: str, envelope_from: str) -> str:
    """`<request-id@sender-domain>`: the same on every retry, so a duplicate can be told."""
    left = _NOT_ATEXT.sub(lambda m: f"={ord(m[0]):02X}", request_id)
    return f"<{left}@{envelope_from.rpartition('@')[2]}>"


def _fields(
    request: Request,
    parts: Parts,
    sender: Address,
    message_id: str,
    moment: datetime,
) -> list[mime.Field]:
    """The message's own header fields, in the order the stdlib builder wrote them."""
    fields = [
        _from_field(sender),
        mime.address_field("To", [_ascii_address(a) for a in request.to]),
    ]
    if request.cc:
        fields.append(mime.address_field("Cc", [_ascii_address(a) for a in request.cc]))
    if request.reply_to:
        reply_to = [_ascii_address(a) for a in request.reply_to]
        fields.append(mime.address_field("Reply-To", reply_to))
    # No Bcc header, ever: Bcc recipients exist only in the SMTP envelope.
    fields += [
        mime.text_field("Subject", parts.subject),
        mime.date_field(moment),
        mime.literal_field("Message-ID", message_id),
        _MIME_VERSION,
    ]
    if request.unsubscribe_url:
        fields += [
            mime.literal_field("List-Unsubscribe", f"<{request.unsubscribe_url}>"),
            _ONE_CLICK,
        ]
    fields += (
        mime.text_field(name, value, encode_long_words=False)
        for name, value in request.headers.items()
    )
    return fields


def _body(parts: Parts, request: Request, seed: str) -> mime.Part:
    """text/plain, or multipart/alternative (text, then HTML; the HTML inside
    multipart/related with its inline images), inside multipart/mixed when there are files.
    Boundaries are numbered outermost first, as `walk()` used to."""
    boundaries = (f"=_{seed}.{index}" for index in range(3))
    inline = (*parts.inline, *(a for a in request.attachments if a.content_id))
    files = [a for a in request.attachments if not a.content_id]
    if parts.html is None:  # nothing shows them inline: they go as files
        files[:0], inline = inline, ()
    elif inline and (missing := missing_cids(parts.html, inline)):
        raise TemplateError(f"cannot build the message: no inline image for cid:{missing[0]}")
    mixed = next(boundaries) if files else ""
    body = mime.text_part(parts.text, "plain")
    if parts.html is not None:
        html = mime.text_part(parts.html, "html")
        alternative = next(boundaries)
        if inline:
            related = (html, *(_file_part(a) for a in inline))
            html = mime.multipart("related", related, next(boundaries))
        body = mime.multipart("alternative", (body, html), alternative)
    if files:
        body = mime.multipart("mixed", (body, *(_file_part(a) for a in files)), mixed)
    return body


def _file_part(attachment: Attachment) -> mime.Part:
    return mime.attachment_part(
        attachment.filename, attachment.content_type, attachment.content, attachment.content_id
    )


def ascii_addr_spec(addr_spec: str) -> str:
    """The address with its domain in punycode: what headers and the envelope can carry.

    A non-ASCII local part would need SMTPUTF8, which Python 3.11's header classes cannot write.
    """
    if addr_spec.isascii():
        return addr_spec
    from email_validator import EmailNotValidError, validate_email

    try:
        ascii_email = validate_email(addr_spec, check_deliverability=False).ascii_email
    except EmailNotValidError as exc:
        raise TemplateError(f"cannot build the message: {addr_spec!r}: {exc}") from None
    if not ascii_email:
        raise TemplateError(
            f"cannot build the message: {addr_spec!r} has a non-ASCII local part (needs SMTPUTF8)"
        )
    return str(ascii_email)


@functools.lru_cache(maxsize=64)
def _from_field(sender: Address) -> mime.Field:
    """Cached: nearly every message has the configured sender."""
    return mime.address_field("From", [_ascii_address(sender)])


def _ascii_address(address: Address) -> Address:
    return Address(address.display_name, ascii_addr_spec(address.addr_spec))


def _boundary_seed(message_id: str, parts: Parts, request: Request) -> str:
    """Boundaries derived from the content, so the same request renders to the same bytes.

    A digest of everything inside the message cannot occur in that content, which is the only
    property a boundary needs; quoted-printable and base64 content cannot hold `=_` at all.
    """
    digest = hashlib.sha256(message_id.encode())
    for text in (parts.subject, parts.text, parts.html or ""):
        digest.update(text.encode("utf-8", "surrogatepass"))
    for attachment in (*parts.inline, *request.attachments):
        digest.update(attachment.filename.encode("utf-8", "surrogatepass") + attachment.content)
    return digest.hexdigest()[:32]


def check_headers(written: Sequence[str], data: bytes, message_id: str) -> None:
    """Split the serialised header block into fields as a mail reader would: it must hold
    exactly the fields we wrote, and the Message-ID we meant.

    `mime` cannot start a header line from a value (see its docstring); this scan (bytes only,
    no email package) is the second line of defence against a builder bug of the
    CVE-2024-6923 kind (an encoded newline turning into a real header line). Every one of
    CR LF, CR and LF counts as a line break here, as it does for the stdlib parser.
    """
    end = data.find(b"\r\n\r\n")
    block = data[:end] if end >= 0 else data
    id_line = b"\r\nMessage-ID: " + message_id.encode("ascii", "replace") + b"\r\n"
    if block.count(b"\r\n") == block.count(b"\r") == block.count(b"\n"):
        # CRLF is the only line break (what mime writes): count the lines that start a field.
        field_count = 1 + block.count(b"\r\n") - block.count(b"\r\n ") - block.count(b"\r\n\t")
        if field_count == len(written) and id_line in block + b"\r\n":
            return
        lines = block.split(b"\r\n")
    else:  # a bare CR or LF: split where a mail reader would, and end where it would
        blank = _BLANK_LINE.search(data)
        lines = _LINE_BREAK.split(data[: blank.start()] if blank else data)
    field_lines = [line for line in lines if line[:1] not in b" \t"]  # not continuations
    came = [line.partition(b":")[0].strip().lower() for line in field_lines]
    meant = [name.lower().encode("ascii", "replace") for name in written]
    if sorted(came) != sorted(meant):
        extra = sorted(n.decode("ascii", "replace") for n in (Counter(came) - Counter(meant)))
        missing = sorted(n.decode("ascii", "replace") for n in (Counter(meant) - Counter(came)))
        raise TemplateError(f"header check failed: unexpected {extra}, missing {missing}")
    written_id = field_lines[came.index(b"message-id")].partition(b":")[2].strip()
    if written_id != message_id.encode("ascii", "replace"):
        raise TemplateError(f"header check failed: Message-ID came out as {written_id!r}")

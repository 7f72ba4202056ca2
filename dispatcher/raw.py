"""Pre-built messages (`enqueue_raw`): an RFC 5322 header block checked as strictly as ours.

An app's own message builder is not trusted to have kept injection out (Python 3.11.7's email
package turns an encoded newline into a header line, CVE-2024-6923), so the block is read as a
strict mail reader would and refused at the first doubt: one line ending throughout, printable
ASCII only, every line a field or a continuation, no field a reader could take twice, encoded
words that decode to no control character, address lists the stdlib parses without a defect.
"""

import base64
import binascii
import codecs
import io
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dispatcher.address import Address, check_address, parse_address
from dispatcher.errors import InvalidRequest, RequestTooLarge

if TYPE_CHECKING:
    import email.message

MAX_RAW_BYTES = 5 * 512 * 1024  # 2.5 MiB: as base64 it stays inside the 4 MiB frame
MAX_HEADER_BLOCK_BYTES = 64 * 1024
MAX_FIELDS = 100
MAX_LINE_BYTES = 998  # RFC 5322 2.1.1
MAX_RECIPIENTS = 50  # as wire.MAX_RECIPIENTS (wire imports this module)
# Fields a message has at most once (RFC 5322 3.6, and the MIME fields): a second one is what
# an injection leaves behind, and readers disagree on which of the two they show.
SINGLE = frozenset(
    "from sender reply-to to cc bcc subject date message-id in-reply-to references"
    " mime-version content-type content-transfer-encoding".split()
)
ADDRESS_FIELDS = ("from", "sender", "reply-to", "to", "cc", "bcc")
_BLANK_LINE = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")  # where a lenient reader ends it
_FIELD = re.compile(rb"([!-9;-~]+):")  # a field name and its colon, nothing between
_PRINTABLE = re.compile(rb"[\t -~]*")
_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([QqBb])\?([^?\s]*)\?=")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
MESSAGE_ID = re.compile(r"<[!-;=?-~]{1,250}@[!-;=?-~]{1,250}>")


@dataclass(frozen=True, slots=True)
class RawField:
    """One header field: its lower-case name, its lines as written (CRLF-ended), its value
    unfolded and with encoded words decoded."""

    name: str
    lines: bytes
    value: str


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A pre-built message that passed the check; `addresses` holds each address field's
    mailboxes (validated by email-validator when parsed with `full=True`)."""

    data: bytes  # as given, for the spool
    fields: tuple[RawField, ...]
    body: bytes
    addresses: dict[str, tuple[Address, ...]]

    def value(self, name: str) -> str | None:
        """The value of the field `name` (lower case), if the message has it."""
        return next((f.value for f in self.fields if f.name == name), None)

    @property
    def recipients(self) -> tuple[Address, ...]:
        """To, Cc and Bcc: the envelope when the caller names none."""
        found = (*self.addresses["to"], *self.addresses["cc"], *self.addresses["bcc"])
        return tuple({a.addr_spec: a for a in found}.values())


def decode_raw(value: object, name: str, *, full: bool) -> RawMessage:
    """The `raw` field (base64 of the message) checked; `full` validates every address."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{name}: expected the message as base64")
    if len(value) > (MAX_RAW_BYTES + 2) // 3 * 4 + 4:
        raise RequestTooLarge(f"{name}: at most {MAX_RAW_BYTES} bytes are allowed")
    try:
        data = base64.b64decode(value, validate=True)
    except (ValueError, TypeError):
        raise InvalidRequest(f"{name}: expected base64") from None
    return parse(data, name, full=full)


def encode_raw(data: bytes) -> str:
    """The `raw` field of a message's bytes."""
    return base64.b64encode(data).decode("ascii")


def message_bytes(message: "email.message.Message | bytes") -> bytes:
    """A message as bytes with CRLF line ends (what SMTP carries), as its policy writes it.

    The fields written must be the fields the message holds: Python 3.11.7 writes a value
    holding an encoded newline (`=?utf-8?q?=0A?=`) as two header lines (CVE-2024-6923).
    """
    if isinstance(message, bytes):
        return message
    import email.generator
    import email.message

    if not isinstance(message, email.message.Message):
        raise InvalidRequest(
            f"raw: expected an email.message.EmailMessage or bytes, got {type(message).__name__}"
        )
    out = io.BytesIO()
    # The generator, not `as_bytes()`: Django's messages override that without a policy.
    policy = message.policy.clone(linesep="\r\n")
    try:
        email.generator.BytesGenerator(out, mangle_from_=False, policy=policy).flatten(message)
        data = out.getvalue()
    except (ValueError, TypeError, LookupError) as exc:  # what the generator refuses
        raise InvalidRequest(f"raw: the message cannot be written: {exc}") from None
    written = [field.name for field in parse(data).fields]
    if written != [name.lower() for name in message]:
        raise InvalidRequest(
            f"raw: the header fields came out as {written}: a value holds a control character"
            " (an encoded CR or LF)"
        )
    return data


def parse(data: bytes, name: str = "raw", *, full: bool = False) -> RawMessage:
    """Split and check a message's header block; every doubt is an `InvalidRequest`."""
    if len(data) > MAX_RAW_BYTES:
        raise RequestTooLarge(f"{name}: {len(data)} bytes, at most {MAX_RAW_BYTES} are allowed")
    block, body = _split(data, name)
    fields: list[RawField] = []
    for number, line in enumerate(block, 1):
        where = f"{name}: header line {number}"
        if len(line) > MAX_LINE_BYTES:
            raise InvalidRequest(f"{where}: longer than {MAX_LINE_BYTES} bytes")
        if not _PRINTABLE.fullmatch(line):
            raise InvalidRequest(f"{where}: only printable ASCII is allowed in headers")
        if line[:1] in (b" ", b"\t"):
            if not fields or not line.strip():  # a blank-looking line ends a header for some
                raise InvalidRequest(f"{where}: a continuation line must continue a field")
            last = fields[-1]
            fields[-1] = RawField(last.name, last.lines + line + b"\r\n", "")
            continue
        match = _FIELD.match(line)
        if match is None:
            raise InvalidRequest(f"{where}: expected 'Name: value', got {line[:40]!r}")
        fields.append(RawField(match[1].decode().lower(), line + b"\r\n", ""))
    if len(fields) > MAX_FIELDS:
        raise InvalidRequest(f"{name}: {len(fields)} header fields, at most {MAX_FIELDS}")
    checked = tuple(_with_value(field, name) for field in fields)
    _check_single(checked, name)
    return RawMessage(data, checked, body, _addresses(checked, name, full))


def _split(data: bytes, name: str) -> tuple[list[bytes], bytes]:
    """The header lines and the body, refusing a block whose line endings are mixed: a bare
    CR or LF is a line break to some readers and part of a value to others."""
    blank = _BLANK_LINE.search(data)
    if blank is None:
        raise InvalidRequest(f"{name}: no empty line ends the header block")
    block, separator = data[: blank.start()], blank[0]
    if len(block) > MAX_HEADER_BLOCK_BYTES:
        raise InvalidRequest(f"{name}: header block over {MAX_HEADER_BLOCK_BYTES} bytes")
    crlf = block.count(b"\r\n")
    if separator == b"\r\n\r\n" and block.count(b"\r") == block.count(b"\n") == crlf:
        return block.split(b"\r\n"), data[blank.end() :]
    if separator == b"\n\n" and b"\r" not in block:
        return block.split(b"\n"), data[blank.end() :]
    raise InvalidRequest(f"{name}: mixed or bare CR/LF line endings in the header block")


def _with_value(field: RawField, name: str) -> RawField:
    """The field with its value unfolded and decoded; controls in a decoded word refused."""
    text = field.lines.decode("ascii").partition(":")[2].replace("\r\n", "").strip()
    where = f"{name}: {field.name}"
    for match in _ENCODED_WORD.finditer(text):
        decoded = _decode_word(match, where)
        if _CONTROL.search(decoded):
            raise InvalidRequest(f"{where}: an encoded word holds a control character (CR, LF)")
    return RawField(field.name, field.lines, text)


def _decode_word(match: re.Match[str], where: str) -> str:
    import email.base64mime
    import email.quoprimime

    charset, encoding, encoded = match[1], match[2].upper(), match[3]
    try:
        codecs.lookup(charset)
        if encoding == "B":
            raw = email.base64mime.decode(encoded)
        else:
            raw = email.quoprimime.header_decode(encoded).encode("latin-1")
        return raw.decode(charset, errors="replace")
    except (LookupError, binascii.Error, UnicodeError, ValueError):
        raise InvalidRequest(f"{where}: an encoded word cannot be decoded") from None


def _check_single(fields: tuple[RawField, ...], name: str) -> None:
    seen: set[str] = set()
    for field in fields:
        if field.name in SINGLE:
            if field.name in seen:
                raise InvalidRequest(f"{name}: more than one {field.name} field")
            seen.add(field.name)
    message_id = next((f.value for f in fields if f.name == "message-id"), None)
    if message_id is not None and not MESSAGE_ID.fullmatch(message_id):
        raise InvalidRequest(f"{name}: message-id {message_id!r} is not <left@right>")
    date = next((f.value for f in fields if f.name == "date"), None)
    if date is not None:
        import email.utils

        try:
            email.utils.parsedate_to_datetime(date)
        except (TypeError, ValueError):
            raise InvalidRequest(f"{name}: date {date!r} is not an RFC 5322 date") from None


def _addresses(
    fields: tuple[RawField, ...], name: str, full: bool
) -> dict[str, tuple[Address, ...]]:
    """Each address field's mailboxes, as the stdlib's strict parser reads them (a defect is
    a refusal: `alice@x)<bob@y>` parses to alice with one), each address checked as ours."""
    found: dict[str, tuple[Address, ...]] = dict.fromkeys(ADDRESS_FIELDS, ())
    for field in fields:
        if field.name not in found or (field.name == "bcc" and not field.value):
            continue
        where = f"{name}: {field.name}"
        header: Any = _header_factory(field.name, field.value)
        if header.defects:
            raise InvalidRequest(f"{where}: cannot be read as addresses: {header.defects[0]}")
        found[field.name] = tuple(_address(a, where, full) for a in header.addresses)
    for single in ("from", "sender"):
        if len(found[single]) > 1 and (single == "sender" or not found["sender"]):
            raise InvalidRequest(f"{name}: {single}: one address expected")
    count = sum(len(found[n]) for n in ("to", "cc", "bcc"))
    if count > MAX_RECIPIENTS:
        raise InvalidRequest(
            f"{name}: {count} recipients; at most {MAX_RECIPIENTS} recipients per request"
        )
    return found


def _header_factory(name: str, value: str) -> Any:
    """The stdlib's strict header parser; imported on first use (`import dispatcher` stays
    light)."""
    import email.policy

    return email.policy.SMTP.header_factory(name, value)


def _address(mailbox: Any, where: str, full: bool) -> Address:
    addr_spec, display_name = str(mailbox.addr_spec), str(mailbox.display_name)
    if _CONTROL.search(display_name):
        raise InvalidRequest(f"{where}: control characters in a display name")
    if full:
        return Address(display_name, parse_address(addr_spec, where).addr_spec)
    check_address(addr_spec, where)
    return Address(display_name, addr_spec)
